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
        if cause.downcast_ref::<keyward_client::Error>().is_some() {
            break;
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

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
