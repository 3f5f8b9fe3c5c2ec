//! The `keyward` binary: parses the command line and calls the libraries.
#![forbid(unsafe_code)]

mod cli;
mod commands;
mod image;
mod output;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    let daemon = matches!(
        cli.command,
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
