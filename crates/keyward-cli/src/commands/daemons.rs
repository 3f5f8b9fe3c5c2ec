//! The long-running commands: `server`, `dev` (with its agent), `agent`, `kms-plugin`,
//! `csi-provider`, and their metrics endpoints.

use super::*;

/// The PKCS#11 seal settings, with the PIN read from its file.
pub(super) fn pkcs11_config(a: &ServerArgs) -> anyhow::Result<Option<keyward_hsm::Pkcs11Config>> {
    let Some(library) = a.pkcs11_lib.clone() else { return Ok(None) };
    let token_label = a.pkcs11_token.clone().ok_or_else(|| anyhow!("--pkcs11-lib needs --pkcs11-token LABEL"))?;
    let pin_file = a
        .pkcs11_pin_file
        .as_ref()
        .ok_or_else(|| anyhow!("--pkcs11-lib needs --pkcs11-pin-file FILE (the user PIN)"))?;
    let raw = zeroize::Zeroizing::new(
        std::fs::read(pin_file).with_context(|| format!("reading the PKCS#11 PIN from {}", pin_file.display()))?,
    );
    let pin = raw.strip_suffix(b"\n").unwrap_or(&raw);
    let pin = pin.strip_suffix(b"\r").unwrap_or(pin);
    if pin.is_empty() {
        bail!("{} is empty: it must hold the token's user PIN", pin_file.display());
    }
    Ok(Some(keyward_hsm::Pkcs11Config {
        library,
        token_label,
        key_label: a.pkcs11_key.clone(),
        pin: keyward_crypto::SecretBytes::copy_from(pin),
    }))
}

pub(super) async fn server(a: ServerArgs) -> anyhow::Result<ExitCode> {
    let stop = shutdown_signal();
    let h = keyward_attest::harden::harden_process(!a.insecure_no_mlock)?;
    tracing::info!(?h, "process hardened");
    let pkcs11 = pkcs11_config(&a)?;
    let cfg = keyward_server::ServerConfig {
        listen: a.listen,
        data_dir: a.data.clone(),
        dev: false,
        scheduler_interval: a.scheduler_interval,
        tls: Some(keyward_server::tls::TlsFiles { cert: a.tls_cert, key: a.tls_key, client_ca: a.tls_client_ca }),
        insecure_file_seal: a.insecure_file_seal,
        pkcs11,
        audit: a.audit.settings(),
        storage: match &a.postgres_url {
            Some(url) => keyward_server::Storage::Postgres(keyward_store::PostgresConfig {
                ca_file: a.postgres_ca.clone(),
                ..keyward_store::PostgresConfig::new(url.clone())
            }),
            None => keyward_server::Storage::Sqlite,
        },
        cluster: keyward_server::ClusterConfig {
            max_staleness: a.max_staleness,
            lease_ttl: a.scheduler_lease,
            ..Default::default()
        },
        http: a.http.limits(),
        metrics_listen: a.metrics_listen,
    };
    let mut running = keyward_server::start(cfg).await?;
    eprintln!("Keyward server on https://{} (data in {})", running.addr, a.data.display());
    if let Some(m) = running.metrics_addr {
        eprintln!("Metrics on http://{m}/metrics (no token: keep this address private)");
    }
    if let Some(t) = &running.new_root_token {
        eprintln!("Initialised a new store. The root token is shown once and stored only as a hash:");
        outln!("export KEYWARD_TOKEN={}", String::from_utf8_lossy(t.expose()));
        std::io::stdout().flush()?;
    }
    serve_until_signal(&mut running, stop).await
}

pub(super) async fn serve_until_signal(
    running: &mut keyward_server::Running,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<ExitCode> {
    tokio::select! {
        r = running.wait() => { r?; }
        _ = stop => {
            eprintln!("shutting down");
            running.begin_shutdown();
            running.wait().await?;
            running.leave().await;
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn dev(a: DevArgs) -> anyhow::Result<ExitCode> {
    let stop = shutdown_signal();
    let h = keyward_attest::harden::harden_process(false)?;
    tracing::info!(?h, "process hardened");
    let data = match a.data {
        Some(d) => d,
        None => {
            let home = std::env::var_os("HOME").ok_or_else(|| anyhow!("HOME is not set; pass --data DIR"))?;
            std::path::PathBuf::from(home).join(".keyward").join("dev")
        }
    };
    let cfg = keyward_server::ServerConfig {
        listen: a.listen,
        data_dir: data.clone(),
        dev: true,
        scheduler_interval: a.scheduler_interval,
        tls: None,
        insecure_file_seal: true,
        pkcs11: None,
        audit: a.audit.settings(),
        storage: keyward_server::Storage::Sqlite,
        cluster: Default::default(),
        http: a.http.limits(),
        metrics_listen: a.metrics_listen,
    };
    let mut running = keyward_server::start(cfg).await?;
    let token = match &running.new_root_token {
        Some(t) => Some(String::from_utf8_lossy(t.expose()).into_owned()),
        None => {
            running.root_token_file.as_ref().and_then(|f| std::fs::read_to_string(f).ok()).map(|s| s.trim().to_string())
        }
    };
    eprintln!("Keyward dev server on http://{} (data in {})", running.addr, data.display());
    if let Some(m) = running.metrics_addr {
        eprintln!("Metrics on http://{m}/metrics");
    }
    eprintln!("WARNING: dev mode keeps the root key unencrypted on disk and serves plain HTTP. Not for real secrets.");
    if running.new_root_token.is_some() {
        eprintln!("A new root token was created; it is also in {} (mode 0600).", data.join("root-token").display());
    }
    outln!("export KEYWARD_ADDR=http://{}", running.addr);
    match &token {
        Some(t) => outln!("export KEYWARD_TOKEN={t}"),
        None => eprintln!("The root token file is missing; the root token cannot be shown again."),
    }
    // A node agent in the same process, so attested release can be tried on one machine.
    let mut dev_agent = None;
    if let Some(t) = &token {
        match start_dev_agent(running.addr, t, &data.join("agent.sock"), &data.join("agent")).await {
            Ok((socket, stop, task)) => {
                outln!("export KEYWARD_AGENT_SOCKET={}", socket.display());
                dev_agent = Some((stop, task));
            }
            // A comment, so the output stays something a shell can `eval`.
            Err(e) => outln!("# the dev node agent did not start: {e:#}"),
        }
    }
    std::io::stdout().flush()?;
    let code = serve_until_signal(&mut running, stop).await;
    if let Some((stop, task)) = dev_agent {
        let _ = stop.send(());
        let _ = task.await;
    }
    code
}

pub(super) type DevAgent = (std::path::PathBuf, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>);

/// Join an agent for node `dev` to the dev server with a fresh join token, serving on `socket`.
pub(super) async fn start_dev_agent(
    addr: std::net::SocketAddr,
    root: &str,
    socket: &std::path::Path,
    audit_dir: &std::path::Path,
) -> anyhow::Result<DevAgent> {
    let url = format!("http://{addr}");
    let admin = Client::builder(url.clone()).token(root).build()?;
    let v = admin.join_token(&keyward_client::api::JoinTokenReq { node: "dev".into(), ttl: Some("1m".into()) }).await?;
    let cfg = keyward_agent::upstream::UpstreamConfig {
        addr: url,
        ca_pem: None,
        join: keyward_agent::upstream::JoinCredential::Token(v.join_token),
    };
    let up = std::sync::Arc::new(keyward_agent::upstream::Upstream::join(&cfg).await?);
    let config = keyward_agent::AgentConfig { socket: socket.to_path_buf(), ..Default::default() };
    let log = keyward_agent::AgentLog::open(audit_dir)?;
    let listener = keyward_agent::bind(&config.socket)?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let shutdown = async move {
            let _ = stopped.await;
        };
        if let Err(e) = keyward_agent::serve(&config, listener, Some(up), None, log, shutdown).await {
            tracing::error!(error = %e, "the dev node agent stopped");
        }
    });
    Ok((socket.to_path_buf(), stop, task))
}

/// `keyward agent`: join the server (if asked to) and serve the Workload API until a signal.
pub(super) async fn agent(cli: &Cli, a: AgentArgs) -> anyhow::Result<ExitCode> {
    let stop = shutdown_signal();
    // The agent holds its Ed25519 key and token for as long as it runs.
    let h = keyward_attest::harden::harden_process(false)?;
    tracing::info!(?h, "process hardened");
    let kubelet_roots = if a.cgroup_roots.is_empty() {
        keyward_attest::cgroup::KubeletRoots::default()
    } else {
        keyward_attest::cgroup::KubeletRoots::new(&a.cgroup_roots).map_err(|e| anyhow!("--cgroup-root: {e}"))?
    };
    let config = keyward_agent::AgentConfig {
        socket: a.socket.clone(),
        hash_limit: a.hash_limit,
        outage_window: a.outage_window,
        kubelet_roots,
        limits: keyward_agent::ConnLimits { per_uid: a.max_connections_per_uid, total: a.max_connections },
        metrics_listen: a.metrics_listen,
        ..Default::default()
    };
    let upstream = match join_credential(&a)? {
        Some(join) => Some(join_server(cli, join).await?),
        None => None,
    };
    let kubelet = kubelet_client(&a)?;
    let listener = keyward_agent::bind(&config.socket)?;
    // After the socket: a second agent started by mistake stops there, before it touches the
    // first one's log.
    let log = keyward_agent::AgentLog::open(&a.audit_dir)
        .with_context(|| format!("opening the agent's audit log in {} (set --audit-dir)", a.audit_dir.display()))?;
    keyward_agent::serve(&config, listener, upstream, kubelet, log, stop).await?;
    Ok(ExitCode::SUCCESS)
}

/// The credential the agent joins the server with: a join token from a file only this user can
/// read, or a Kubernetes ServiceAccount token file; none without either (not joined).
fn join_credential(a: &AgentArgs) -> anyhow::Result<Option<keyward_agent::upstream::JoinCredential>> {
    Ok(match (&a.join_token_file, &a.k8s_join_role) {
        (Some(f), _) => {
            // A join token is a credential for the whole node until it is spent: whoever reads
            // it first joins as the node.
            use std::os::unix::fs::MetadataExt;
            let md = std::fs::metadata(f).with_context(|| format!("reading the join token file {}", f.display()))?;
            if md.mode() & 0o077 != 0 || md.uid() != rustix::process::geteuid().as_raw() {
                bail!(
                    "the join token file {} can be read by other users (mode {:o}, owner uid {}): whoever reads it first \
                     joins as this node. Make a new join token and keep it in a file only this user can read \
                     (umask 077; chmod 600)",
                    f.display(),
                    md.mode() & 0o777,
                    md.uid()
                );
            }
            let token = zeroize::Zeroizing::new(
                std::fs::read_to_string(f).with_context(|| format!("reading the join token file {}", f.display()))?,
            );
            Some(keyward_agent::upstream::JoinCredential::Token(zeroize::Zeroizing::new(token.trim().to_string())))
        }
        // Read at every join: the kubelet refreshes the projected token in place, and the
        // agent joins again by itself before its token's maximum lifetime.
        (None, Some(role)) => Some(keyward_agent::upstream::JoinCredential::KubernetesFile {
            role: role.clone(),
            path: a.k8s_token_file.clone(),
        }),
        (None, None) => None,
    })
}

/// Join the Keyward server at `--addr` (trusting `--cacert` if given) with `join`.
async fn join_server(
    cli: &Cli,
    join: keyward_agent::upstream::JoinCredential,
) -> anyhow::Result<std::sync::Arc<keyward_agent::upstream::Upstream>> {
    let ca_pem = match &cli.cacert {
        Some(p) => Some(std::fs::read(p).with_context(|| format!("reading CA certificate {}", p.display()))?),
        None => None,
    };
    let cfg = keyward_agent::upstream::UpstreamConfig { addr: cli.addr.clone(), ca_pem, join };
    let up = keyward_agent::upstream::Upstream::join(&cfg)
        .await
        .with_context(|| format!("joining the Keyward server at {}", cli.addr))?;
    Ok(std::sync::Arc::new(up))
}

/// The kubelet client that places callers in pods, when `--kubelet-url` is given.
fn kubelet_client(a: &AgentArgs) -> anyhow::Result<Option<std::sync::Arc<keyward_agent::kubelet::Kubelet>>> {
    let Some(url) = &a.kubelet_url else { return Ok(None) };
    let ca_pem =
        std::fs::read(&a.kubelet_ca).with_context(|| format!("reading the kubelet CA {}", a.kubelet_ca.display()))?;
    let cfg = keyward_agent::kubelet::KubeletConfig {
        url: url.clone(),
        token_file: a.kubelet_token_file.clone(),
        ca_pem,
        poll_attempts: a.kubelet_poll_attempts,
        poll_interval: a.kubelet_poll_interval,
    };
    Ok(Some(std::sync::Arc::new(keyward_agent::kubelet::Kubelet::new(cfg)?)))
}

pub(super) async fn kms_plugin(cli: &Cli, a: KmsPluginArgs) -> anyhow::Result<ExitCode> {
    use keyward_kms_plugin::{CallerPolicy, Kek, Plugin, PluginSettings, kek};
    let stop = shutdown_signal();
    let h = keyward_attest::harden::harden_process(false)?;
    tracing::info!(?h, "process hardened");
    let path = keyward_kms_plugin::socket_path(&a.listen).map_err(|e| anyhow!(e))?.to_path_buf();
    let mut uids: std::collections::BTreeSet<u32> = a.allow_uids.iter().copied().collect();
    if uids.is_empty() {
        use std::os::unix::fs::MetadataExt;
        uids.insert(std::fs::metadata("/proc/self").context("reading the plugin's own uid")?.uid());
    }
    let exe_sha256 =
        a.allow_exe_sha256
            .iter()
            .map(|h| {
                hex::decode(h.trim()).ok().and_then(|v| <[u8; 32]>::try_from(v).ok()).ok_or_else(|| {
                    anyhow!("--allow-exe-sha256 {h:?} is not 64 hex digits (use the output of sha256sum)")
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
    let (backend, audit) = if a.local {
        tracing::warn!(
            dir = %a.data_dir.display(),
            "local mode: the key-encryption key is sealed with the INSECURE FILE SEAL in the data directory"
        );
        let (l, audit) =
            kek::Local::open(&a.data_dir, keyward_store::SqliteStore::open_shared, &a.key, a.rotate_every).await?;
        (Kek::Local(l), audit)
    } else {
        let mut b = client_builder(cli)?;
        if let Some(f) = &a.token_file {
            let t = zeroize::Zeroizing::new(
                std::fs::read_to_string(f).with_context(|| format!("reading the token file {}", f.display()))?,
            );
            b = b.token(t.trim().to_string());
        }
        let (s, audit) = kek::Service::open(b.build()?, &a.key, &a.data_dir)?;
        (Kek::Service(s), audit)
    };
    let settings =
        PluginSettings { status_cache: a.status_cache, outage_window: a.outage_window, ..PluginSettings::default() };
    let plugin = std::sync::Arc::new(Plugin::new(backend, audit, settings));
    if let Some(addr) = a.metrics_listen {
        serve_metrics(addr, plugin.metrics()).await?;
    }
    match plugin.status().await {
        Ok(k) => tracing::info!(key_id = %k.key_id(), "key-encryption key ready"),
        Err(e) => tracing::warn!(reason = %e, "not healthy yet; Status reports it until it is"),
    }
    let listener = keyward_kms_plugin::bind(&path, a.socket_mode)?;
    tracing::info!(socket = %path.display(), uids = ?uids, executables = exe_sha256.len(), "KMS v2 plugin listening");
    let policy = CallerPolicy { uids, exe_sha256 };
    keyward_kms_plugin::serve(listener, plugin, policy, stop).await?;
    let _ = std::fs::remove_file(&path);
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn csi_provider(cli: &Cli, a: CsiProviderArgs) -> anyhow::Result<ExitCode> {
    let stop = shutdown_signal();
    // The provider holds pods' Keyward tokens in memory while they are valid.
    let h = keyward_attest::harden::harden_process(false)?;
    tracing::info!(?h, "process hardened");
    let ca_pem = match &cli.cacert {
        Some(p) => Some(std::fs::read(p).with_context(|| format!("reading CA certificate {}", p.display()))?),
        None => None,
    };
    let audit = keyward_audit::open_with_key_file(&a.data_dir)?;
    let cfg = keyward_csi::ProviderConfig {
        addr: cli.addr.clone(),
        allowed_addresses: a.allowed_addresses.clone(),
        audience: a.audience.clone(),
        ca_pem,
        timeout: a.timeout,
        allow_secret_tokens: a.insecure_allow_secret_tokens,
    };
    if a.insecure_allow_secret_tokens {
        tracing::warn!(
            "pods' tokens are also taken from nodePublishSecretRef Secrets (--insecure-allow-secret-tokens)"
        );
    }
    let provider = std::sync::Arc::new(keyward_csi::Provider::new(cfg, std::sync::Arc::new(audit)));
    if let Some(addr) = a.metrics_listen {
        serve_metrics(addr, provider.metrics()).await?;
    }
    let listener = keyward_csi::bind(&a.provider_dir)?;
    let socket = a.provider_dir.join(format!("{}.sock", keyward_csi::PROVIDER_NAME));
    tracing::info!(socket = %socket.display(), server = %cli.addr, audience = %a.audience, "CSI provider listening");
    keyward_csi::serve(listener, provider, stop).await?;
    let _ = std::fs::remove_file(&socket);
    Ok(ExitCode::SUCCESS)
}

/// Serve `calls` at `GET /metrics` on `addr` for as long as the process runs.
pub(super) async fn serve_metrics(
    addr: std::net::SocketAddr,
    calls: std::sync::Arc<keyward_metrics::Calls>,
) -> anyhow::Result<()> {
    let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding the metrics address {addr}"))?;
    tracing::info!(addr = %l.local_addr()?, "metrics on GET /metrics (no authentication)");
    tokio::spawn(keyward_metrics::serve(l, std::sync::Arc::new(move || calls.text()), std::future::pending()));
    Ok(())
}
