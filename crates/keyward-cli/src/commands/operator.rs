//! `keyward operator` (init, unseal, seal, rekey, root rotation, snapshots) and `keyward audit
//! verify`.

use super::*;

/// Read one share from a no-echo prompt on a terminal, else one line of stdin.
pub(super) fn read_share(prompt: &str) -> anyhow::Result<zeroize::Zeroizing<String>> {
    use std::io::IsTerminal;
    let s = if std::io::stdin().is_terminal() {
        zeroize::Zeroizing::new(rpassword::prompt_password(prompt).context("reading the share")?)
    } else {
        let mut line = zeroize::Zeroizing::new(String::new());
        std::io::BufRead::read_line(&mut std::io::stdin().lock().take(4096), &mut line)
            .context("reading the share from stdin")?;
        line
    };
    let trimmed = zeroize::Zeroizing::new(s.trim().to_string());
    if trimmed.is_empty() {
        bail!("no share given: paste one share (as printed by `keyward operator init` or rekey)");
    }
    Ok(trimmed)
}

/// Print new shares once. `recovery`: the server unseals itself (HSM), so they are recovery
/// shares, for when the HSM cannot and to move to another seal.
pub(super) fn print_shares<T: serde::Serialize>(
    output: Output,
    v: &T,
    shares: &[keyward_client::api::SecretString],
    root_token: Option<&str>,
    recovery: bool,
) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_value(output, v);
    }
    let label = if recovery { "Recovery share" } else { "Unseal share" };
    for (i, s) in shares.iter().enumerate() {
        outln!("{label} {}: {}", i + 1, s.as_str());
    }
    if let Some(t) = root_token {
        outln!("Root token: {t}");
    }
    eprintln!(
        "These are shown once. Give each share to a different operator; any threshold of them unseals the server."
    );
    Ok(())
}

/// `keyward operator`: one function per ceremony (`snapshot restore` runs without a server).
pub(super) async fn operator(cli: &Cli, o: &OperatorCmd) -> anyhow::Result<ExitCode> {
    if let OperatorCmd::Snapshot(SnapshotCmd::Restore { file, data }) = o {
        return snapshot_restore(cli.output, file, data);
    }
    let c = client(cli)?;
    match o {
        OperatorCmd::Init { shares, threshold } => init(cli.output, &c, *shares, *threshold).await?,
        OperatorCmd::Unseal { migrate } => unseal(cli.output, &c, *migrate).await?,
        OperatorCmd::Seal => {
            c.seal().await?;
            outln!("Sealed.");
        }
        OperatorCmd::Rekey { shares, threshold, cancel } => rekey(cli.output, &c, *shares, *threshold, *cancel).await?,
        OperatorCmd::Snapshot(SnapshotCmd::Save { file }) => snapshot_save(cli.output, &c, file).await?,
        OperatorCmd::Snapshot(SnapshotCmd::Restore { .. }) => unreachable_restore()?,
        OperatorCmd::RotateRoot => {
            print_value(cli.output, &c.rotate_root().await?)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `operator snapshot restore`: restore a snapshot into an empty data directory (no server involved).
fn snapshot_restore(output: Output, file: &std::path::Path, data: &std::path::Path) -> anyhow::Result<ExitCode> {
    let db = keyward_store::sqlite::restore_snapshot(file, data)?;
    print_value(output, &json!({"restored": db, "data": data}))?;
    eprintln!(
        "Restored. Start `keyward server --data {}` (with the same seal options), then unseal it with the \
         shares of the server the snapshot came from.",
        data.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `operator init`: initialise the server and print its shares and root token once.
async fn init(output: Output, c: &Client, shares: u8, threshold: u8) -> anyhow::Result<()> {
    let v = c.init(&keyward_client::api::InitReq { shares: Some(shares), threshold: Some(threshold) }).await?;
    print_shares(output, &v, &v.shares, Some(v.root_token.as_str()), !v.sealed)?;
    if !v.sealed {
        eprintln!(
            "The server unsealed itself with its HSM ({}). The shares are recovery shares: {threshold} of \
             them unseal it when the HSM cannot, and move it to another seal.",
            v.seal
        );
    } else {
        eprintln!("The server is sealed: run `keyward operator unseal` {threshold} times with different shares.");
    }
    Ok(())
}

/// `operator unseal`: submit one share read from a prompt or stdin, and show the progress.
async fn unseal(output: Output, c: &Client, migrate: bool) -> anyhow::Result<()> {
    let share = read_share("Unseal share: ")?;
    let v = c.unseal(&keyward_client::api::ShareReq { share, migrate }).await?;
    if output == Output::Json {
        print_value(output, &v)?;
    } else if v.complete && migrate {
        outln!("Unsealed; the seal was migrated to this server's seal.");
    } else if v.complete {
        outln!("Unsealed.");
    } else {
        outln!("Unseal progress: {}/{}", v.progress.unwrap_or(0), v.threshold.unwrap_or(0));
    }
    Ok(())
}

/// `operator rekey`: cancel the rekey in progress, or start one if none is and submit one current
/// share; the last share gets the new shares printed once.
async fn rekey(output: Output, c: &Client, shares: u8, threshold: u8, cancel: bool) -> anyhow::Result<()> {
    use keyward_client::api::{InitReq, RekeyShareReq};
    if cancel {
        print_value(output, &c.rekey_cancel().await?)?;
        return Ok(());
    }
    let st = c.rekey_status().await?;
    let nonce = match st.nonce {
        Some(n) => n,
        None => {
            let v = c.rekey_start(&InitReq { shares: Some(shares), threshold: Some(threshold) }).await?;
            eprintln!("Started a rekey to {shares} shares with threshold {threshold}.");
            v.nonce
        }
    };
    let share = read_share("Current unseal share: ")?;
    let v = c.rekey_update(&RekeyShareReq { nonce, share }).await?;
    if let Some(new_shares) = &v.shares {
        let hsm = c.health().await.ok().and_then(|h| h.seal_state).is_some_and(|s| s.hsm_key.is_some());
        print_shares(output, &v, new_shares, None, hsm)?;
        eprintln!("Rekeyed: the old shares no longer unseal this server.");
    } else if output == Output::Json {
        print_value(output, &v)?;
    } else {
        outln!("Rekey progress: {}/{}", v.progress.unwrap_or(0), v.threshold.unwrap_or(0));
    }
    Ok(())
}

/// `operator snapshot save`: download a snapshot into `file` (mode 0600, through a `.partial`
/// file, never over an existing file).
async fn snapshot_save(output: Output, c: &Client, file: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let part = file.with_extension("partial");
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&part)
        .with_context(|| format!("creating {} (it must not exist)", part.display()))?;
    if file.exists() {
        let _ = std::fs::remove_file(&part);
        bail!("{} exists: a snapshot is never written over another file", file.display());
    }
    let written = match c.download(keyward_client::api::routes::SYS_SNAPSHOT, &mut out).await {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            return Err(e.into());
        }
    };
    out.sync_all().with_context(|| format!("writing {}", part.display()))?;
    std::fs::hard_link(&part, file)
        .with_context(|| format!("{} exists: a snapshot is never written over another file", file.display()))?;
    let _ = std::fs::remove_file(&part);
    print_value(output, &json!({"file": file, "bytes": written}))?;
    Ok(())
}

/// `operator snapshot restore` is handled before a client exists.
pub(super) fn unreachable_restore() -> anyhow::Result<()> {
    bail!("internal: snapshot restore reached the client path")
}

pub(super) async fn audit_verify(
    cli: &Cli,
    files: &[std::path::PathBuf],
    key_file: Option<&std::path::Path>,
    local_store: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    let (key, head, server_file) = match (key_file, local_store) {
        (None, Some(dir)) => {
            let key = keyward_kms_plugin::kek::Local::audit_key(dir, keyward_store::SqliteStore::open_shared).await?;
            (key.expose().to_vec(), None, Some(dir.join("audit.log")))
        }
        (k, _) => match k {
            Some(p) => {
                // The base64 key `GET /v1/sys/audit` gives, or the raw 32-byte `audit-key` the node
                // agent, the KMS plugin and the CSI provider keep beside their logs.
                let bytes =
                    zeroize::Zeroizing::new(std::fs::read(p).with_context(|| format!("reading {}", p.display()))?);
                let text = std::str::from_utf8(&bytes).ok().map(str::trim).unwrap_or_default();
                let key = match STANDARD.decode(text) {
                    Ok(k) if k.len() == 32 => k,
                    _ if bytes.len() == 32 => bytes.to_vec(),
                    _ => bail!("{} must hold a 32-byte audit key (raw, or in base64)", p.display()),
                };
                // Without files named: the log beside the key.
                let beside = p.parent().map(|d| d.join("audit.log")).filter(|f| f.exists());
                (key, None, beside)
            }
            None => {
                let v = client(cli)?.audit_info().await?;
                let (Some(key), Some(head)) = (v.key.filter(|_| v.enabled), v.head) else {
                    bail!("the server runs without an audit log");
                };
                let key = STANDARD.decode(key.as_str()).map_err(|_| anyhow!("the server's audit key is not base64"))?;
                let head = keyward_audit::Head { seq: head.seq, hmac: head.hmac };
                (key, Some(head), v.file.map(std::path::PathBuf::from))
            }
        },
    };
    let files: Vec<std::path::PathBuf> = if files.is_empty() {
        let f = server_file.ok_or_else(|| anyhow!("name the audit files to verify"))?;
        keyward_audit::log_files(&f)
    } else {
        files.to_vec()
    };
    match keyward_audit::verify_files(&key, &files, head.as_ref()) {
        Ok(r) => {
            let v = json!({
                "ok": true, "records": r.records, "first_seq": r.first_seq, "last_seq": r.last_seq, "files": files,
                "continues_after": r.continues_after, "note": r.note, "gaps": r.gaps,
            });
            match cli.output {
                Output::Json => print_value(cli.output, &v)?,
                Output::Table => {
                    outln!(
                        "ok: {} records intact (seq {}..{}) in {} file(s)",
                        r.records,
                        r.first_seq,
                        r.last_seq,
                        files.len()
                    );
                    if let Some(after) = r.continues_after {
                        outln!(
                            "note: these files continue the chain after record {after}; the records up to it are in \
                             other files ({})",
                            r.note.as_deref().unwrap_or("not given")
                        );
                    }
                    for g in &r.gaps {
                        outln!("note: a file begins at {g}");
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("audit log BROKEN at {}:{}: {}", e.file, e.line, e.reason);
            Ok(ExitCode::from(2))
        }
    }
}
