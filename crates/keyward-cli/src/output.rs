//! Writing to stdout and reporting errors at the binary's edge.
//!
//! Everything the CLI prints goes through [`outln!`]/[`out!`], which return an error instead of
//! panicking when stdout is closed (`keyward key list | head -1`); [`report`] then exits
//! quietly.

/// `println!` that returns an error (the caller's `?`) instead of panicking on a closed stdout.
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($t)*)?
    }};
}

/// `print!` that returns an error instead of panicking on a closed stdout.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        write!(std::io::stdout().lock(), $($t)*)?
    }};
}

pub(crate) use {out, outln};

/// Whether the error is a write to a closed pipe (the reader went away: not a failure).
pub(crate) fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}

/// One line for the user: each cause once (libraries often repeat their source's text in their
/// own message), ending at the SDK's error, whose message is already complete.
pub(crate) fn render(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        if let Some(k) = cause.downcast_ref::<keyward_client::Error>() {
            if let Some(hint) = hint(k) {
                line.push_str(&hint);
            }
            break;
        }
    }
    line
}

/// The command that fixes a server's refusal, where there is one: the server says what to do
/// in API terms, the CLI names its own command.
fn hint(e: &keyward_client::Error) -> Option<String> {
    let keyward_client::Error::Api { code, message, .. } = e else { return None };
    // The server names the key first, quoted.
    let name = message.split('"').nth(1).filter(|n| !n.is_empty() && !n.contains(char::is_whitespace))?;
    match code.as_str() {
        "key_disabled" => Some(format!(" (`keyward key enable {name}`)")),
        "key_pending_deletion" => {
            Some(format!(" (`keyward key cancel-delete {name}`, then `keyward key enable {name}`)"))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_gets_the_command_that_fixes_it() {
        let api = |code: &str, message: &str| {
            anyhow::Error::new(keyward_client::Error::Api {
                status: 409,
                code: code.into(),
                message: message.into(),
                request_id: "r".into(),
            })
        };
        let e = render(&api("key_disabled", "key \"k1\" is disabled: enable it to use it again"));
        assert!(e.ends_with("(`keyward key enable k1`)"), "{e}");
        let e = render(&api("key_pending_deletion", "key \"k1\" is pending deletion: cancel the deletion"));
        assert!(e.contains("`keyward key cancel-delete k1`, then `keyward key enable k1`"), "{e}");
        let e = render(&api("conflict", "conflict: \"x\""));
        assert!(!e.contains("keyward key"), "{e}");
    }

    #[test]
    fn each_cause_is_said_once() {
        let io = std::io::Error::from(std::io::ErrorKind::AddrInUse);
        let e = anyhow::Error::new(io)
            .context(format!("binding 127.0.0.1:1: {}", std::io::Error::from(std::io::ErrorKind::AddrInUse)));
        assert_eq!(render(&e), "binding 127.0.0.1:1: address in use");
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(render(&e), "outer: inner");
    }

    #[test]
    fn a_closed_pipe_is_recognised_through_context() {
        let e = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::BrokenPipe)).context("writing");
        assert!(is_broken_pipe(&e));
        assert!(!is_broken_pipe(&anyhow::anyhow!("other")));
    }
}
