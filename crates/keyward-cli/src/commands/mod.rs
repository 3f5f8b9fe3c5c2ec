//! Command implementations: each turns arguments into library calls and prints the result.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::process::ExitCode;

use anyhow::{Context, anyhow, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use keyward_client::Client;
use serde_json::{Value, json};

use crate::cli::*;
use crate::output::outln;

mod auth;
mod crypto;
mod daemons;
mod key;
mod operator;
mod output;
mod secret;
mod workload;

use self::auth::*;
use self::crypto::*;
use self::daemons::*;
use self::key::*;
use self::operator::*;
pub(crate) use self::output::print_json_or_table;
use self::output::*;
use self::secret::*;
use self::workload::*;

const STDIN_LIMIT: u64 = 1024 * 1024;

pub(crate) fn client(cli: &Cli) -> anyhow::Result<Client> {
    Ok(client_builder(cli)?.build()?)
}

fn client_builder(cli: &Cli) -> anyhow::Result<keyward_client::ClientBuilder> {
    let mut b = Client::builder(cli.addr.clone());
    if let Some(t) = &cli.token {
        b = b.token(t.clone());
    }
    if let Some(p) = &cli.cacert {
        b = b.ca_cert_pem(std::fs::read(p).with_context(|| format!("reading CA certificate {}", p.display()))?);
    }
    if let (Some(cert), Some(key)) = (&cli.client_cert, &cli.client_key) {
        let mut pem = zeroize::Zeroizing::new(
            std::fs::read(key).with_context(|| format!("reading client key {}", key.display()))?,
        );
        pem.push(b'\n');
        pem.extend(std::fs::read(cert).with_context(|| format!("reading client certificate {}", cert.display()))?);
        b = b.client_identity_pem(pem.to_vec());
    }
    Ok(b)
}

fn read_stdin() -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::new();
    std::io::stdin().take(STDIN_LIMIT + 1).read_to_end(&mut buf).context("reading stdin")?;
    if buf.len() as u64 > STDIN_LIMIT {
        bail!("input on stdin is larger than {STDIN_LIMIT} bytes");
    }
    Ok(buf)
}

fn ctx_map(c: &[(String, String)]) -> BTreeMap<String, String> {
    c.iter().cloned().collect()
}

fn write_out(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)?;
    out.flush()?;
    Ok(())
}

fn decode_b64_input(input: &[u8]) -> anyhow::Result<Vec<u8>> {
    let text = std::str::from_utf8(input).context("base64 input is not text")?;
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    STANDARD.decode(compact).map_err(|_| anyhow!("input is not valid base64 (omit --base64 for raw bytes)"))
}

/// Run the parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Dev(a) => dev(a.clone()).await,
        Command::Server(a) => server(a.clone()).await,
        Command::Agent(AgentArgs { command: Some(c), socket, .. }) => agent_query(cli.output, c, socket).await,
        Command::Agent(a) => agent(&cli, a.clone()).await,
        Command::KmsPlugin(KmsPluginArgs { command: Some(KmsPluginCmd::Rotate), key, data_dir, local, .. }) => {
            kms_plugin_rotate(cli.output, key, data_dir, *local).await
        }
        Command::KmsPlugin(a) => kms_plugin(&cli, a.clone()).await,
        Command::CsiProvider(a) => csi_provider(&cli, a.clone()).await,
        Command::Run(a) => launch(a).await,
        Command::Node(n) => node(&cli, n).await,
        Command::Workload(w) => workload(cli.output, w).await,
        Command::Image(c) => crate::image::run(&cli, c).await,
        Command::Keyprovider(a) => crate::image::keyprovider(&cli, a).await,
        Command::Status => status(&cli).await,
        Command::Completion { shell } => completion(*shell),
        Command::Man { out } => man(out),
        Command::Operator(o) => operator(&cli, o).await,
        Command::Key(k) => key(&cli, k).await,
        c @ (Command::Encrypt { .. }
        | Command::Decrypt { .. }
        | Command::Reencrypt { .. }
        | Command::GenerateDataKey { .. }
        | Command::Sign { .. }
        | Command::Verify { .. }
        | Command::Mac { .. }
        | Command::VerifyMac { .. }
        | Command::Random { .. }) => crypto(&cli, c).await,
        Command::Secret(s) => secret(&cli, s).await,
        Command::Bench(b) => bench(&cli, b).await,
        Command::Audit(a) => audit(&cli, a).await,
        Command::Policy(p) => policy(&cli, p).await,
        Command::Randomized(r) => randomized(&cli, r).await,
        Command::Token(t) => token(&cli, t).await,
        Command::Auth(a) => auth(&cli, a).await,
    }
}

/// `keyward agent whoami|secret`: ask the running agent at `socket`, as `keyward workload` does.
async fn agent_query(output: Output, c: &AgentCmd, socket: &std::path::Path) -> anyhow::Result<ExitCode> {
    let cmd = match c {
        AgentCmd::Whoami => WorkloadCmd::Whoami,
        AgentCmd::Secret { path, version, field } => {
            WorkloadCmd::Secret { path: path.clone(), version: *version, field: field.clone() }
        }
    };
    workload(output, &WorkloadArgs { agent_socket: socket.to_path_buf(), command: cmd }).await
}

/// `keyward kms-plugin rotate --local`: rotate the local-mode key in `data_dir`.
async fn kms_plugin_rotate(
    output: Output,
    key: &str,
    data_dir: &std::path::Path,
    local: bool,
) -> anyhow::Result<ExitCode> {
    if !local {
        bail!(
            "`kms-plugin rotate` rotates a local-mode key (pass --local); in service mode run `keyward key rotate {key}` against the server"
        );
    }
    let k = keyward_kms_plugin::kek::Local::rotate(data_dir, keyward_store::SqliteStore::open_shared, key).await?;
    print_value(output, &json!({"key": k.name, "version": k.version, "key_id": k.key_id()}))?;
    Ok(ExitCode::SUCCESS)
}

/// `keyward run`: start the program with secrets from the node agent; its exit status.
async fn launch(a: &RunArgs) -> anyhow::Result<ExitCode> {
    // (Hardened in main, before anything else runs.)
    Ok(keyward_agent::launcher::run(keyward_agent::launcher::RunSpec {
        agent_socket: a.agent_socket.clone(),
        secrets: a.secrets.clone(),
        files: a.files.clone(),
        refresh: a.refresh,
        signal: a.signal,
        command: a.command.clone(),
    })
    .await?)
}

/// `keyward node join-token|list|revoke`.
async fn node(cli: &Cli, n: &NodeCmd) -> anyhow::Result<ExitCode> {
    match n {
        NodeCmd::JoinToken { node, ttl } => {
            let r = keyward_client::api::JoinTokenReq { node: node.clone(), ttl: ttl.clone() };
            let v = client(cli)?.join_token(&r).await?;
            print_value(cli.output, &v)?;
        }
        NodeCmd::List => {
            let v = client(cli)?.agents().await?;
            print_value(cli.output, &v)?;
        }
        NodeCmd::Revoke { node } => {
            let v = client(cli)?.revoke_node(node).await?;
            print_value(cli.output, &v)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `keyward status`: the server's health, with what to do next when it is not initialised or sealed.
async fn status(cli: &Cli) -> anyhow::Result<ExitCode> {
    let v = client(cli)?.health().await?;
    print_value(cli.output, &v)?;
    if cli.output == Output::Table {
        let (threshold, progress) = v.seal_state.as_ref().map_or((0, 0), |s| (s.threshold, s.progress));
        match v.status.as_str() {
            "uninitialized" => eprintln!("Not initialized: run `keyward operator init` once."),
            "sealed" => {
                eprintln!("Sealed: run `keyward operator unseal` with {threshold} share(s) ({progress} given so far).")
            }
            _ => {}
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `keyward completion SHELL`: print the shell's completion script.
fn completion(shell: clap_complete::Shell) -> anyhow::Result<ExitCode> {
    let mut cmd = <Cli as clap::CommandFactory>::command();
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut cmd, "keyward", &mut buf);
    write_out(&buf)?;
    Ok(ExitCode::SUCCESS)
}

/// `keyward man --out DIR`: write the man pages into DIR.
fn man(out: &std::path::Path) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let cmd = <Cli as clap::CommandFactory>::command();
    clap_mangen::generate_to(cmd, out).with_context(|| format!("writing man pages into {}", out.display()))?;
    eprintln!("Man pages written to {} (try `man -l {}/keyward.1`).", out.display(), out.display());
    Ok(ExitCode::SUCCESS)
}

/// `keyward audit verify|info`.
async fn audit(cli: &Cli, a: &AuditCmd) -> anyhow::Result<ExitCode> {
    match a {
        AuditCmd::Verify { files, key_file, local_store } => {
            audit_verify(cli, files, key_file.as_deref(), local_store.as_deref()).await
        }
        AuditCmd::Info => {
            let mut v = client(cli)?.audit_info().await?;
            // The chain key is for `audit verify`; it is not printed.
            v.key = None;
            print_value(cli.output, &v)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `keyward auth whoami|kubernetes`.
async fn auth(cli: &Cli, a: &AuthCmd) -> anyhow::Result<ExitCode> {
    match a {
        AuthCmd::Whoami => {
            let v = client(cli)?.whoami().await?;
            print_value(cli.output, &v)?;
            Ok(ExitCode::SUCCESS)
        }
        AuthCmd::Kubernetes(k) => kubernetes(cli, k).await,
    }
}

async fn bench(cli: &Cli, b: &BenchArgs) -> anyhow::Result<ExitCode> {
    let op = keyward_bench::Op::parse(&b.op).ok_or_else(|| {
        anyhow!(
            "unknown --op {:?}: use encrypt, decrypt, generate-data-key, secret-get, secret-put or key-create",
            b.op
        )
    })?;
    let cfg = keyward_bench::BenchConfig {
        op,
        concurrency: b.concurrency,
        duration: b.duration,
        warmup: b.warmup,
        size: b.size,
        key: b.key.clone(),
        secret_path: b.secret_path.clone(),
        max_ops: b.max_ops,
        agent_socket: b.agent_socket.clone(),
        verify: b.verify,
    };
    let report = keyward_bench::run(client(cli)?, cfg).await?;
    if b.json || cli.output == Output::Json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        outln!("{report}");
    }
    if report.wrong > 0 {
        eprintln!("FAILED: {} acknowledged operations were lost or answered wrongly", report.wrong);
    }
    Ok(if report.ops == 0 || report.wrong > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// Completes on SIGTERM or SIGINT. The handlers are installed when this is called, not when the
/// future is first polled, so call it before the socket a test or supervisor waits for exists.
pub(crate) fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
