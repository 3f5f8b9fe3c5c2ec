//! `keyward image`: encrypt, decrypt and inspect container images in OCI layouts.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use keyward_keyprovider::{BlockingProvider, Provider, WrapSpec};
use keyward_ocicrypt::{DecryptOptions, EncryptOptions, ImageRef, KeyProvider, PrivateKey, Progress, PublicKey};

use crate::cli::{Cli, ImageCmd, ImageCopyArgs, KeyproviderArgs, KeyproviderCmd, Output, ProviderArgs};
use crate::output::{out, outln};

/// Run a `keyward image` command.
pub async fn run(cli: &Cli, cmd: &ImageCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        ImageCmd::Encrypt { recipients, layers, io } => encrypt(cli, recipients, layers, io).await?,
        ImageCmd::Decrypt { keys, keyward, agent_socket, io } => {
            decrypt(cli.output, keys, *keyward, agent_socket, io).await?
        }
        ImageCmd::Inspect { src } => inspect(cli.output, src).await?,
    }
    Ok(ExitCode::SUCCESS)
}

/// `image encrypt`: encrypt the layers of an image to its recipients (`jwe:` public keys, and
/// `keyward:` keys wrapped by the server).
async fn encrypt(cli: &Cli, recipients: &[String], layers: &[i64], io: &ImageCopyArgs) -> anyhow::Result<()> {
    let output = cli.output;
    let (src, dst) = (ImageRef::parse(&io.src)?, ImageRef::parse(&io.dst)?);
    let mut jwe = Vec::new();
    let mut providers: Vec<BlockingProvider> = Vec::new();
    for r in recipients {
        if let Some(spec) = r.strip_prefix("keyward:") {
            let spec = WrapSpec::parse(spec.as_bytes(), None)?;
            let provider =
                Provider::new(keyward_keyprovider::PROVIDER_NAME, Some(crate::commands::client(cli)?), None, None);
            providers.push(BlockingProvider::new(Arc::new(provider), Some(spec), tokio::runtime::Handle::current()));
        } else {
            jwe.push(parse_recipient(r)?);
        }
    }
    let recipients = jwe;
    let (layers, parallel, durable) = (layers.to_vec(), io.parallel, io.sync);
    let report = with_progress("encrypting", move |progress| {
        let providers: Vec<&dyn KeyProvider> = providers.iter().map(|p| p as &dyn KeyProvider).collect();
        keyward_ocicrypt::encrypt_image(
            &src,
            &dst,
            &EncryptOptions {
                recipients: &recipients,
                providers: &providers,
                layers: &layers,
                parallelism: parallel,
                durable,
                progress: Some(progress),
            },
        )
    })
    .await?;
    crate::commands::print_json_or_table(output, &serde_json::to_value(report)?)?;
    Ok(())
}

/// `image decrypt`: decrypt an image's layers with private keys, or (`--keyward`) with layer
/// keys unwrapped through the node agent.
async fn decrypt(
    output: Output,
    keys: &[std::path::PathBuf],
    keyward: bool,
    agent_socket: &std::path::Path,
    io: &ImageCopyArgs,
) -> anyhow::Result<()> {
    let (src, dst) = (ImageRef::parse(&io.src)?, ImageRef::parse(&io.dst)?);
    let keys = keys
        .iter()
        .map(|p| {
            let bytes = zeroize::Zeroizing::new(std::fs::read(p).with_context(|| format!("reading {}", p.display()))?);
            Ok(PrivateKey::from_bytes(&bytes, &p.display().to_string())?)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (parallel, durable) = (io.parallel, io.sync);
    let provider = match keyward {
        true => {
            let agent = keyward_client::workload::WorkloadClient::new(agent_socket)?;
            let provider = Provider::new(keyward_keyprovider::PROVIDER_NAME, None, Some(agent), None);
            Some(BlockingProvider::new(Arc::new(provider), None, tokio::runtime::Handle::current()))
        }
        false => None,
    };
    let report = with_progress("decrypting", move |progress| {
        let providers: Vec<&dyn KeyProvider> = provider.iter().map(|p| p as &dyn KeyProvider).collect();
        keyward_ocicrypt::decrypt_image(
            &src,
            &dst,
            &DecryptOptions {
                keys: &keys,
                providers: &providers,
                parallelism: parallel,
                durable,
                progress: Some(progress),
            },
        )
    })
    .await?;
    crate::commands::print_json_or_table(output, &serde_json::to_value(report)?)?;
    Ok(())
}

/// `image inspect`: show how each layer of an image is encrypted (if it is).
async fn inspect(output: Output, src: &str) -> anyhow::Result<()> {
    let src = ImageRef::parse(src)?;
    let layers = tokio::task::spawn_blocking(move || keyward_ocicrypt::inspect_image(&src)).await??;
    match output {
        Output::Json => outln!("{}", serde_json::to_string_pretty(&layers)?),
        Output::Table => print_inspect(&layers)?,
    }
    Ok(())
}

/// `keyward keyprovider`: one request on stdin (a `cmd` provider), or `serve` over gRPC.
pub async fn keyprovider(cli: &Cli, a: &KeyproviderArgs) -> anyhow::Result<ExitCode> {
    // (It holds layer keys in memory: hardened in main, before anything else runs.)
    let build = |p: &ProviderArgs| -> anyhow::Result<Provider> {
        // Wrapping needs the server; unwrapping only the agent. Build what can be built.
        let server =
            if cli.token.is_some() || cli.client_cert.is_some() { Some(crate::commands::client(cli)?) } else { None };
        let agent = keyward_client::workload::WorkloadClient::new(&p.agent_socket).ok();
        Ok(Provider::new(&p.name, server, agent, p.key.clone()))
    };
    match &a.command {
        None => {
            use tokio::io::AsyncReadExt as _;
            let provider = build(&a.provider)?;
            let mut input = zeroize::Zeroizing::new(Vec::new());
            tokio::io::stdin()
                .take(keyward_keyprovider::protocol::MAX_INPUT as u64 + 1)
                .read_to_end(&mut input)
                .await
                .context("reading the key-provider request on stdin")?;
            let out = provider.handle(&input).await?;
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(&out)?;
            stdout.flush()?;
        }
        Some(KeyproviderCmd::Serve { provider, listen }) => {
            let stop = crate::commands::shutdown_signal();
            let path = keyward_kms_plugin::socket_path(listen).map_err(|e| anyhow::anyhow!(e))?.to_path_buf();
            let provider = Arc::new(build(provider)?);
            // Owner-only: the callers are the container runtime and image tools on this node.
            let listener = keyward_kms_plugin::bind(&path, 0o600)?;
            tracing::info!(socket = %path.display(), name = provider.name(), "ocicrypt key provider listening");
            keyward_keyprovider::serve_unix(listener, provider, stop).await?;
            let _ = std::fs::remove_file(&path);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_recipient(spec: &str) -> anyhow::Result<PublicKey> {
    let Some(path) = spec.strip_prefix("jwe:") else {
        anyhow::bail!("recipient {spec:?}: expected jwe:PUBLIC_KEY_FILE or keyward:KEY");
    };
    let bytes = std::fs::read(path).with_context(|| format!("reading {path}"))?;
    Ok(PublicKey::from_bytes(&bytes, path)?)
}

/// Run a blocking image operation; on a terminal, show its progress on stderr meanwhile.
async fn with_progress<T: Send + 'static>(
    verb: &'static str,
    f: impl FnOnce(&Progress) -> keyward_ocicrypt::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let progress = Arc::new(Progress::default());
    let done = Arc::new(AtomicBool::new(false));
    let display = std::io::stderr().is_terminal().then(|| {
        let (progress, done) = (progress.clone(), done.clone());
        std::thread::spawn(move || show_progress(verb, &progress, &done))
    });
    let worker = progress.clone();
    let result = tokio::task::spawn_blocking(move || f(&worker)).await;
    done.store(true, Ordering::Relaxed);
    if let Some(d) = display {
        let _ = d.join();
    }
    Ok(result??)
}

fn show_progress(verb: &str, p: &Progress, done: &AtomicBool) {
    let start = Instant::now();
    let mut stderr = std::io::stderr();
    let mut shown = false;
    loop {
        let finished = done.load(Ordering::Relaxed);
        let bytes = p.bytes_done.load(Ordering::Relaxed);
        let total = p.bytes_total.load(Ordering::Relaxed);
        let secs = start.elapsed().as_secs_f64().max(0.001);
        if total > 0 {
            let _ = write!(
                stderr,
                "\r{verb}: {}/{} layers, {:.1}/{:.1} MiB, {:.0} MB/s   ",
                p.layers_done.load(Ordering::Relaxed),
                p.layers_total.load(Ordering::Relaxed),
                bytes as f64 / 1048576.0,
                total as f64 / 1048576.0,
                bytes as f64 / 1e6 / secs
            );
            shown = true;
        }
        if finished {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if shown {
        let _ = writeln!(stderr);
    }
}

fn print_inspect(layers: &[keyward_ocicrypt::LayerInfo]) -> anyhow::Result<()> {
    for l in layers {
        if let Some(p) = &l.platform {
            out!("{p}  ");
        }
        outln!(
            "layer {}  {}  {} bytes  {}",
            l.index,
            l.digest,
            l.size,
            if l.encrypted { "encrypted" } else { "not encrypted" }
        );
        outln!("  media type: {}", l.media_type);
        if let Some(c) = &l.cipher {
            outln!("  cipher: {c}");
        }
        for r in &l.jwe_recipients {
            let mut line = format!("  jwe recipient: {}", r.alg);
            if let Some(c) = &r.curve {
                line.push_str(&format!(" ({c})"));
            }
            if let Some(k) = &r.kid {
                line.push_str(&format!("  kid {k}"));
            }
            outln!("{line}");
        }
        for (scheme, n) in &l.other_schemes {
            outln!("  {scheme}: {n} wrapped key(s)");
        }
        for p in &l.problems {
            outln!("  problem: {p}");
        }
    }
    Ok(())
}
