//! The `keyward` binary: parses the command line and calls the libraries.
#![forbid(unsafe_code)]

mod cli;
mod commands;
mod image;
mod output;

/// Options of the client commands that the server processes do not take: (id, flag, short).
const CLIENT_ONLY: [(&str, &str, Option<char>); 6] = [
    ("addr", "addr", None),
    ("token", "token", None),
    ("cacert", "cacert", None),
    ("client_cert", "client-cert", None),
    ("client_key", "client-key", None),
    ("output", "output", Some('o')),
];
/// Commands that run a server.
const SERVERS: [&str; 2] = ["server", "dev"];

fn main() -> std::process::ExitCode {
    let cli = match parse_command_line() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    init_tracing(&cli.command);

    // Processes that hold secrets they did not measure themselves (the launcher, the key
    // provider) are made not dumpable first thing: no core file, and no process of the same uid
    // may ptrace them or write their memory from here on.
    if matches!(cli.command, cli::Command::Run(_) | cli::Command::Keyprovider(_))
        && let Err(e) = keyward_attest::harden::harden_process(false)
    {
        eprintln!("error: {e}");
        return std::process::ExitCode::FAILURE;
    }
    if matches!(cli.command, cli::Command::Agent(cli::AgentArgs { command: None, .. })) {
        // Before any thread starts: cgroups must be read as the host sees them, or pods
        // cannot be placed under the kubelet's root.
        match keyward_attest::cgroup::join_host_namespace() {
            Ok(true) => tracing::info!("joined the host's cgroup namespace"),
            Ok(false) => {}
            Err(e) => tracing::warn!(
                error = %e,
                "not in the host's cgroup namespace and cannot join it (needs CAP_SYS_ADMIN and hostPID): \
                 callers in pods will be refused"
            ),
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().max_blocking_threads(64).build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(commands::run(cli)) {
        Ok(code) => code,
        // The reader of our output went away (`| head`): nothing more to say.
        Err(e) if output::is_broken_pipe(&e) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", output::render(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Parse the command line (clap exits by itself on `--help`, `--version` and errors); a client
/// option given to a server command is refused with exit code 2.
fn parse_command_line() -> Result<cli::Cli, std::process::ExitCode> {
    // The client options are global (they may follow any subcommand), but `server` and `dev`
    // neither show nor take them: each gets a hidden option of the same name, which keeps the
    // global one out of it, and is refused if given.
    let mut cmd = <cli::Cli as clap::CommandFactory>::command();
    for name in SERVERS {
        cmd = cmd.mut_subcommand(name, |s| {
            CLIENT_ONLY.iter().fold(s, |s, (id, long, short)| {
                let a = clap::Arg::new(*id).long(*long).hide(true).action(clap::ArgAction::Set);
                s.arg(match short {
                    Some(c) => a.short(*c),
                    None => a,
                })
            })
        })
    }
    let matches = cmd.get_matches();
    if let Some((name, sub)) = matches.subcommand()
        && SERVERS.contains(&name)
        && let Some((_, long, _)) =
            CLIENT_ONLY.iter().find(|(id, _, _)| sub.value_source(id) == Some(clap::parser::ValueSource::CommandLine))
    {
        eprintln!("error: --{long} is an option of the client commands; `keyward {name}` does not take it");
        return Err(std::process::ExitCode::from(2));
    }
    match <cli::Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(c) => Ok(c),
        Err(e) => e.exit(),
    }
}

/// Log to stderr, at `info` for the long-running processes and `warn` for the others unless
/// RUST_LOG says otherwise.
fn init_tracing(command: &cli::Command) {
    let daemon = matches!(
        command,
        cli::Command::Dev(_)
            | cli::Command::Server(_)
            | cli::Command::Agent(cli::AgentArgs { command: None, .. })
            | cli::Command::KmsPlugin(cli::KmsPluginArgs { command: None, .. })
            | cli::Command::CsiProvider(_)
            | cli::Command::Keyprovider(cli::KeyproviderArgs { command: Some(_), .. })
    );
    let default_filter = if daemon { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}
