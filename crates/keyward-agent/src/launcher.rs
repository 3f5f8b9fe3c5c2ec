//! The launcher behind `keyward run`: start a program with secrets released by the node agent,
//! delivered as environment variables of the program or as memory-only files (memfd), never on
//! disk. The caller should first make its own process not dumpable (the binary does), so that no
//! process of the same uid can ptrace it.
//!
//! The agent measures `keyward run`, not the program, and the `keyward` binary is no identity
//! (anyone may run it). To bind a release to the program that will really use it, `keyward run`
//! opens the program's executable, hashes it through that open file, and claims the digest on
//! every request. The agent honours the claim only from a trusted launcher (its own binary) and
//! adds `exec:uid:UID:sha256:HEX`, UID being the launcher's own: the same program started by
//! another user is another identity. `keyward run` execs the very file it hashed
//! (`/proc/self/fd/N`, so the path cannot be swapped in between); once the program runs, the
//! agent verifies that the child runs an executable with that digest, and the launcher kills it
//! otherwise.
//!
//! A script is bound by its own bytes: the launcher hashes the script and its interpreter (from
//! the `#!` line), claims both (`exec:uid:UID:sha256:<script>` and
//! `exec:uid:UID:interpreter-sha256:<interpreter>`), and runs the interpreter on the very file it
//! hashed (`/dev/fd/N`). Allowing a script does not allow every script of its interpreter.
//!
//! The child does not inherit what could change the code it runs or act with the caller's own
//! credentials: the dynamic loader's variables (`LD_*` and glibc's other unsafe ones), the
//! interpreters' module and start-up variables (`PYTHONPATH`, `NODE_OPTIONS`, `PERL5LIB`,
//! `BASH_ENV`, ...) and `KEYWARD_TOKEN` are removed from its environment ([`SCRUBBED`]).

use std::collections::BTreeMap;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use keyward_client::workload::WorkloadClient;
use zeroize::Zeroizing;

/// Why the launcher failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LaunchError {
    /// The program could not be found, opened, or is not acceptable.
    #[error("{0}")]
    Program(String),
    /// The agent refused or could not be asked.
    #[error("{what}: {source}")]
    Agent {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: keyward_client::Error,
    },
    /// The started program is not the one the secrets were released for; it was killed.
    #[error("the started program is not the one the secrets were released for; it was killed: {0}")]
    Mismatch(keyward_client::Error),
    /// A secret lacks a field, or cannot be encoded.
    #[error("{0}")]
    Secret(String),
    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> LaunchError {
    move |source| LaunchError::Io { what, source }
}

fn sys(what: &'static str) -> impl FnOnce(nix::errno::Errno) -> LaunchError {
    move |e| LaunchError::Io { what, source: e.into() }
}

/// One `ENV=PATH[#FIELD][@VERSION]` binding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// Environment variable the child gets.
    pub env: String,
    /// Secret path.
    pub path: String,
    /// Field (without: the secret's fields as a JSON object).
    pub field: Option<String>,
}

/// Parse `ENV=PATH[#FIELD]`.
pub fn parse_binding(s: &str) -> Result<Binding, String> {
    let (env, rest) = s.split_once('=').ok_or_else(|| format!("{s:?} is not ENV=PATH[#FIELD]"))?;
    let env_ok = !env.is_empty()
        && env.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !env.as_bytes()[0].is_ascii_digit();
    if !env_ok {
        return Err(format!("{env:?} is not an environment variable name (letters, digits, _)"));
    }
    let (path, field) = match rest.split_once('#') {
        Some((p, f)) if !f.is_empty() => (p, Some(f.to_string())),
        Some(_) => return Err(format!("{s:?}: the field after # is empty")),
        None => (rest, None),
    };
    if path.is_empty() {
        return Err(format!("{s:?}: the secret path is empty"));
    }
    Ok(Binding { env: env.to_string(), path: path.to_string(), field })
}

/// What `keyward run` was asked to do.
#[derive(Debug)]
pub struct RunSpec {
    /// The agent's socket.
    pub agent_socket: PathBuf,
    /// Secrets as environment variables.
    pub secrets: Vec<Binding>,
    /// Secrets as memory-only files; the variable names the file (`/dev/fd/N`).
    pub files: Vec<Binding>,
    /// Re-fetch period (zero: never).
    pub refresh: Duration,
    /// Signal sent to the child when a secret changed.
    pub signal: nix::sys::signal::Signal,
    /// The program and its arguments.
    pub command: Vec<String>,
}

/// Find `name` as `execvp` would.
fn resolve(name: &str) -> Result<PathBuf, LaunchError> {
    if name.contains('/') {
        return Ok(PathBuf::from(name));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(name);
        if let Ok(md) = std::fs::metadata(&candidate)
            && md.is_file()
            && std::os::unix::fs::PermissionsExt::mode(&md.permissions()) & 0o111 != 0
        {
            return Ok(candidate);
        }
    }
    Err(LaunchError::Program(format!("{name:?} was not found in PATH")))
}

/// Variables removed from the child's environment: exact names, then prefixes.
pub const SCRUBBED: (&[&str], &[&str]) = (
    &[
        "KEYWARD_TOKEN",
        "GCONV_PATH",
        "GETCONF_DIR",
        "GLIBC_TUNABLES",
        "HOSTALIASES",
        "LOCALDOMAIN",
        "LOCPATH",
        "MALLOC_TRACE",
        "NIS_PATH",
        "NLSPATH",
        "RESOLV_HOST_CONF",
        "RES_OPTIONS",
        "BASH_ENV",
        "ENV",
        "NODE_OPTIONS",
        "NODE_PATH",
        "PERL5LIB",
        "PERL5OPT",
        "PERLLIB",
        "RUBYLIB",
        "RUBYOPT",
        "JAVA_TOOL_OPTIONS",
        "_JAVA_OPTIONS",
        "JDK_JAVA_OPTIONS",
    ],
    &["LD_", "PYTHON", "BASH_FUNC_"],
);

/// Whether a variable is removed from the child's environment.
pub fn scrubbed(name: &std::ffi::OsStr) -> bool {
    let Some(n) = name.to_str() else { return true };
    SCRUBBED.0.contains(&n) || SCRUBBED.1.iter().any(|p| n.starts_with(p))
}

/// The program to exec: its open file and digest and, for a script, the interpreter's.
struct Program {
    file: std::fs::File,
    sha256: String,
    /// For a script: the interpreter's open file, digest and path, and the `#!` line's argument.
    interpreter: Option<(std::fs::File, String, PathBuf, Option<String>)>,
}

/// Hash an open file from its current position on, after `head`.
fn hash_rest(f: &mut std::fs::File, head: &[u8]) -> Result<String, LaunchError> {
    let mut h = keyward_crypto::hash::Sha256Stream::default();
    h.update(head);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io("reading the program"))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finish()))
}

/// Open the program and hash it through the open file. A script (`#!`) is hashed too, and so
/// is its interpreter, which must be an absolute path to an executable that is not a script.
fn open_and_hash(path: &Path) -> Result<Program, LaunchError> {
    let open =
        |p: &Path| std::fs::File::open(p).map_err(|e| LaunchError::Program(format!("opening {}: {e}", p.display())));
    let mut f = open(path)?;
    let mut head = vec![0u8; 256];
    let mut n = 0;
    while n < head.len() {
        let got = f.read(&mut head[n..]).map_err(io("reading the program"))?;
        if got == 0 {
            break;
        }
        n += got;
    }
    head.truncate(n);
    if !head.starts_with(b"#!") {
        let sha256 = hash_rest(&mut f, &head)?;
        return Ok(Program { file: f, sha256, interpreter: None });
    }
    let line = head[2..].split(|b| *b == b'\n').next().unwrap_or_default();
    if line.len() + 2 == head.len() && n == 256 {
        return Err(LaunchError::Program(format!("{}: the #! line is longer than 254 bytes", path.display())));
    }
    let line = std::str::from_utf8(line)
        .map_err(|_| LaunchError::Program(format!("{}: the #! line is not UTF-8", path.display())))?
        .trim();
    // As the kernel reads it: the interpreter, then everything else as one argument.
    let (interp, arg) = match line.split_once([' ', '\t']) {
        Some((i, a)) => (i, Some(a.trim().to_string()).filter(|a| !a.is_empty())),
        None => (line, None),
    };
    if !interp.starts_with('/') {
        return Err(LaunchError::Program(format!(
            "{}: the interpreter in the #! line must be an absolute path, not {interp:?}",
            path.display()
        )));
    }
    let sha256 = hash_rest(&mut f, &head)?;
    let ipath = PathBuf::from(interp);
    let mut ifile = open(&ipath)?;
    let mut ihead = [0u8; 2];
    let got = ifile.read(&mut ihead).map_err(io("reading the interpreter"))?;
    if got == 2 && ihead == *b"#!" {
        return Err(LaunchError::Program(format!("{}: its interpreter {interp} is itself a script", path.display())));
    }
    let isha = hash_rest(&mut ifile, &ihead[..got])?;
    Ok(Program { file: f, sha256, interpreter: Some((ifile, isha, ipath, arg)) })
}

fn keep_across_exec(f: &std::fs::File) -> Result<(), LaunchError> {
    nix::fcntl::fcntl(f, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()))
        .map(|_| ())
        .map_err(sys("clearing close-on-exec"))
}

type Values = BTreeMap<(String, Option<String>), Zeroizing<String>>;

/// Every bound secret's value, by (path, field).
async fn fetch(client: &WorkloadClient, bindings: &[&Binding]) -> Result<Values, LaunchError> {
    let mut secrets = BTreeMap::new();
    let mut out = BTreeMap::new();
    for b in bindings {
        if !secrets.contains_key(&b.path) {
            let s = client
                .get_secret(&b.path, None)
                .await
                .map_err(|source| LaunchError::Agent { what: format!("fetching secret {}", b.path), source })?;
            secrets.insert(b.path.clone(), s);
        }
        let s = &secrets[&b.path];
        let value = match &b.field {
            Some(f) => s
                .data
                .get(f)
                .cloned()
                .ok_or_else(|| LaunchError::Secret(format!("secret {} has no field {f:?}", b.path)))?,
            None => {
                let m: BTreeMap<&str, &str> = s.data.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                Zeroizing::new(serde_json::to_string(&m).map_err(|e| LaunchError::Secret(e.to_string()))?)
            }
        };
        out.insert((b.path.clone(), b.field.clone()), value);
    }
    Ok(out)
}

fn write_memfd(f: &std::fs::File, value: &str) -> Result<(), LaunchError> {
    f.set_len(0).map_err(io("writing a memory file"))?;
    f.write_all_at(value.as_bytes(), 0).map_err(io("writing a memory file"))
}

/// Run the program; returns its exit status.
pub async fn run(spec: RunSpec) -> Result<ExitCode, LaunchError> {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let program = spec.command.first().ok_or_else(|| LaunchError::Program("no command given after --".into()))?;
    let path = resolve(program)?;
    let prog = open_and_hash(&path)?;
    // The child execs this very file (or runs the interpreter on it): no CLOEXEC on them.
    keep_across_exec(&prog.file)?;
    let client = WorkloadClient::new(&spec.agent_socket)
        .map_err(|source| LaunchError::Agent { what: "connecting to the agent".into(), source })?
        .for_exec(&prog.sha256);
    let (mut cmd, client) = command(&prog, program, &spec.command[1..], client)?;
    let all: Vec<&Binding> = spec.secrets.iter().chain(&spec.files).collect();
    let mut values = fetch(&client, &all).await?;
    let memfds = deliver(&mut cmd, &spec, &values)?;
    let mut child = cmd.spawn().map_err(|e| LaunchError::Program(format!("starting {}: {e}", path.display())))?;
    drop(cmd); // the environment copy with the secrets
    let pid = child.id().ok_or_else(|| LaunchError::Program("the program exited at once".into()))?;
    let child_pid = Pid::from_raw(i32::try_from(pid).map_err(|_| LaunchError::Program("pid out of range".into()))?);
    if let Err(e) = client.verify_child(pid).await {
        // A program that already finished cannot be checked, and killing it changes nothing:
        // it ran the file that was hashed (exec'd by its descriptor). Its status stands.
        if let Ok(Some(status)) = child.try_wait() {
            tracing::warn!(pid, program = %path.display(), "the program finished before it could be verified");
            drop(memfds);
            return Ok(exit_code(status));
        }
        let _ = kill(child_pid, Signal::SIGKILL);
        let _ = child.wait().await;
        return Err(LaunchError::Mismatch(e));
    }
    tracing::info!(pid, program = %path.display(), sha256 = %prog.sha256, "started and verified");

    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).map_err(io("handling signals"))?;
    let mut int =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).map_err(io("handling signals"))?;
    let mut tick =
        tokio::time::interval(if spec.refresh.is_zero() { Duration::from_secs(86400 * 365) } else { spec.refresh });
    tick.tick().await;
    let status = loop {
        tokio::select! {
            s = child.wait() => break s.map_err(io("waiting for the program"))?,
            _ = term.recv() => { let _ = kill(child_pid, Signal::SIGTERM); }
            _ = int.recv() => { let _ = kill(child_pid, Signal::SIGINT); }
            _ = tick.tick(), if !spec.refresh.is_zero() => {
                refresh(&client, &all, &mut values, &memfds, pid, child_pid, spec.signal).await?;
            }
        }
    };
    drop(memfds);
    Ok(exit_code(status))
}

/// The command that execs the program through its open file (for a script: runs its
/// interpreter, through the interpreter's open file, on the script's), and the client, which
/// then claims the interpreter too.
fn command(
    prog: &Program,
    program: &str,
    args: &[String],
    mut client: WorkloadClient,
) -> Result<(tokio::process::Command, WorkloadClient), LaunchError> {
    let cmd = match &prog.interpreter {
        None => {
            let mut cmd = tokio::process::Command::new(format!("/proc/self/fd/{}", prog.file.as_raw_fd()));
            cmd.arg0(program).args(args);
            cmd
        }
        Some((ifile, isha, ipath, arg)) => {
            keep_across_exec(ifile)?;
            client = client.with_interpreter(isha);
            let mut cmd = tokio::process::Command::new(format!("/proc/self/fd/{}", ifile.as_raw_fd()));
            cmd.arg0(ipath);
            cmd.args(arg.iter());
            cmd.arg(format!("/dev/fd/{}", prog.file.as_raw_fd())).args(args);
            cmd
        }
    };
    Ok((cmd, client))
}

/// Set the child's environment: the scrubbed variables removed, the secrets as variables and as
/// memory-only files (created here); returns the files with their bindings, to rewrite them.
fn deliver(
    cmd: &mut tokio::process::Command,
    spec: &RunSpec,
    values: &Values,
) -> Result<Vec<(Binding, std::fs::File)>, LaunchError> {
    // Nothing that changes the code the child runs, nor the caller's token.
    for (k, _) in std::env::vars_os() {
        if scrubbed(&k) {
            cmd.env_remove(&k);
        }
    }
    for b in &spec.secrets {
        cmd.env(&b.env, values[&(b.path.clone(), b.field.clone())].as_str());
    }
    let mut memfds = Vec::new();
    for b in &spec.files {
        // Not close-on-exec: the child inherits it and opens it as /dev/fd/N.
        let fd = nix::sys::memfd::memfd_create(b.env.as_str(), nix::sys::memfd::MFdFlags::empty())
            .map_err(sys("creating a memory file"))?;
        let f = std::fs::File::from(fd);
        write_memfd(&f, &values[&(b.path.clone(), b.field.clone())])?;
        cmd.env(&b.env, format!("/dev/fd/{}", f.as_raw_fd()));
        memfds.push((b.clone(), f));
    }
    Ok(memfds)
}

/// Re-fetch the secrets; if any changed, rewrite the memory files and send the program `signal`
/// (a failed fetch leaves the program the current ones).
async fn refresh(
    client: &WorkloadClient,
    all: &[&Binding],
    values: &mut Values,
    memfds: &[(Binding, std::fs::File)],
    pid: u32,
    child_pid: nix::unistd::Pid,
    signal: nix::sys::signal::Signal,
) -> Result<(), LaunchError> {
    match fetch(client, all).await {
        Ok(fresh) if fresh != *values => {
            for (b, f) in memfds {
                write_memfd(f, &fresh[&(b.path.clone(), b.field.clone())])?;
            }
            let changed: Vec<&str> =
                fresh.iter().filter(|(k, v)| values.get(*k) != Some(*v)).map(|((p, _), _)| p.as_str()).collect();
            tracing::info!(pid, secrets = ?changed, signal = %signal, "secrets changed; signalling the program");
            *values = fresh;
            let _ = nix::sys::signal::kill(child_pid, signal);
        }
        Ok(_) => tracing::debug!(pid, "secrets unchanged"),
        Err(e) => tracing::warn!(error = %e, "re-fetching secrets failed; the program keeps the current ones"),
    }
    Ok(())
}

/// The launcher's exit code for the program's status (128 + signal when killed, as shells do).
fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    match (status.code(), std::os::unix::process::ExitStatusExt::signal(&status)) {
        (Some(c), _) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        (None, Some(sig)) => ExitCode::from(u8::try_from(128 + sig).unwrap_or(1)),
        _ => ExitCode::FAILURE,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bindings() {
        assert_eq!(
            parse_binding("DB_PASSWORD=payments/db#password").unwrap(),
            Binding { env: "DB_PASSWORD".into(), path: "payments/db".into(), field: Some("password".into()) }
        );
        assert_eq!(parse_binding("CFG=app/config").unwrap().field, None);
        for bad in ["nopath", "=a/b", "1X=a/b", "A-B=a/b", "X=", "X=a/b#"] {
            assert!(parse_binding(bad).is_err(), "{bad}");
        }
    }
}
