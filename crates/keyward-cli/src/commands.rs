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

/// The largest message the server signs as such; larger input is signed by its digest.
const MAX_SIGNED_MESSAGE: usize = 64 * 1024;

enum Signable {
    Message(Vec<u8>),
    Digest([u8; 32]),
}

/// Stdin as a message to sign, or (above the server's message limit, or with `digest`) its
/// SHA-256, hashed as it streams in: any size.
fn read_signable(digest: bool) -> anyhow::Result<Signable> {
    let mut stdin = std::io::stdin().lock();
    let mut head = Vec::new();
    (&mut stdin).take(MAX_SIGNED_MESSAGE as u64 + 1).read_to_end(&mut head).context("reading stdin")?;
    if !digest && head.len() <= MAX_SIGNED_MESSAGE {
        return Ok(Signable::Message(head));
    }
    let mut h = keyward_crypto::hash::Sha256Stream::default();
    h.update(&head);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = stdin.read(&mut buf).context("reading stdin")?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(Signable::Digest(h.finish()))
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

pub(crate) fn print_json_or_table(output: Output, v: &Value) -> anyhow::Result<()> {
    print_value(output, v)
}

fn print_value(output: Output, v: &Value) -> anyhow::Result<()> {
    match output {
        Output::Json => outln!("{}", serde_json::to_string_pretty(v)?),
        Output::Table => print_table(v, "")?,
    }
    Ok(())
}

fn scalar(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(items) if items.iter().all(|i| !i.is_object() && !i.is_array()) => {
            items.iter().map(scalar).collect::<Vec<_>>().join(", ")
        }
        // A list of lists (a policy's identity sets): each set, then the next.
        Value::Array(items) if items.iter().all(Value::is_array) => {
            items.iter().map(scalar).collect::<Vec<_>>().join(" | ")
        }
        other => other.to_string(),
    }
}

fn is_plain(v: &Value) -> bool {
    match v {
        Value::Object(_) => false,
        Value::Array(a) => !a.iter().any(Value::is_object),
        _ => true,
    }
}

/// Print an object as aligned `key: value` lines; arrays of objects as tables. An object that
/// is only a list (`{"policies": [...]}`) prints its items: one per line, or as a table.
fn print_table(v: &Value, indent: &str) -> anyhow::Result<()> {
    match v {
        Value::Object(m) if m.len() == 1 && m.values().all(Value::is_array) => {
            let items = m.values().flat_map(|x| x.as_array().into_iter().flatten()).cloned().collect::<Vec<_>>();
            if items.iter().all(is_plain) {
                for item in &items {
                    outln!("{indent}{}", scalar(item));
                }
            } else {
                print_rows(&items, indent)?;
            }
        }
        Value::Object(m) => {
            let width = m.iter().filter(|(_, v)| is_plain(v)).map(|(k, _)| k.len()).max().unwrap_or(0);
            for (k, val) in m {
                match val {
                    Value::Array(items) if items.is_empty() => outln!("{indent}{k:width$}  -"),
                    Value::Array(items) if items.iter().all(|i| i.is_array()) => {
                        outln!("{indent}{k}:");
                        for i in items {
                            outln!("{indent}  {}", scalar(i));
                        }
                    }
                    Value::Array(items) if !is_plain(val) => {
                        outln!("{indent}{k}:");
                        print_rows(items, &format!("{indent}  "))?;
                    }
                    Value::Object(_) => {
                        outln!("{indent}{k}:");
                        print_table(val, &format!("{indent}  "))?;
                    }
                    _ => outln!("{indent}{k:width$}  {}", scalar(val)),
                }
            }
        }
        Value::Array(items) => print_rows(items, indent)?,
        other => outln!("{indent}{}", scalar(other)),
    }
    Ok(())
}

/// Rows of objects under upper-case column names; lists inside a cell are joined.
fn print_rows(items: &[Value], indent: &str) -> anyhow::Result<()> {
    let mut cols: Vec<String> = Vec::new();
    for it in items {
        if let Value::Object(m) = it {
            for (k, v) in m {
                if !v.is_object() && !cols.contains(k) {
                    cols.push(k.clone());
                }
            }
        }
    }
    if cols.is_empty() {
        for it in items {
            outln!("{indent}{}", scalar(it));
        }
        return Ok(());
    }
    let rows: Vec<Vec<String>> = items.iter().map(|it| cols.iter().map(|c| scalar(&it[c])).collect()).collect();
    let widths: Vec<usize> =
        cols.iter().enumerate().map(|(i, c)| rows.iter().map(|r| r[i].len()).max().unwrap_or(0).max(c.len())).collect();
    let line = |cells: Vec<String>| -> anyhow::Result<()> {
        let parts: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:w$}", w = widths[i])).collect();
        outln!("{indent}{}", parts.join("  ").trim_end());
        Ok(())
    };
    line(cols.iter().map(|c| c.to_uppercase()).collect())?;
    for r in rows {
        line(r)?;
    }
    Ok(())
}

/// Run the parsed command.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Dev(a) => dev(a.clone()).await,
        Command::Server(a) => server(a.clone()).await,
        Command::Agent(AgentArgs { command: Some(c), socket, .. }) => {
            let cmd = match c {
                AgentCmd::Whoami => WorkloadCmd::Whoami,
                AgentCmd::Secret { path, version, field } => {
                    WorkloadCmd::Secret { path: path.clone(), version: *version, field: field.clone() }
                }
            };
            workload(cli.output, &WorkloadArgs { agent_socket: socket.clone(), command: cmd }).await
        }
        Command::Agent(a) => agent(&cli, a.clone()).await,
        Command::KmsPlugin(KmsPluginArgs { command: Some(KmsPluginCmd::Rotate), key, data_dir, local, .. }) => {
            if !local {
                bail!(
                    "`kms-plugin rotate` rotates a local-mode key (pass --local); in service mode run `keyward key rotate {key}` against the server"
                );
            }
            let k =
                keyward_kms_plugin::kek::Local::rotate(data_dir, keyward_store::SqliteStore::open_shared, key).await?;
            print_value(cli.output, &json!({"key": k.name, "version": k.version, "key_id": k.key_id()}))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::KmsPlugin(a) => kms_plugin(&cli, a.clone()).await,
        Command::CsiProvider(a) => csi_provider(&cli, a.clone()).await,
        Command::Run(a) => {
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
        Command::Node(NodeCmd::JoinToken { node, ttl }) => {
            let v = client(&cli)?
                .request(
                    keyward_client::Method::POST,
                    "/v1/auth/agent/join-token",
                    Some(&json!({"node": node, "ttl": ttl})),
                )
                .await?;
            print_value(cli.output, &v)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Node(NodeCmd::List) => {
            let v = client(&cli)?.request(keyward_client::Method::GET, "/v1/agents", None).await?;
            print_value(cli.output, &v)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Node(NodeCmd::Revoke { node }) => {
            let v = client(&cli)?
                .request(keyward_client::Method::POST, &format!("/v1/agents/{node}/revoke"), Some(&json!({})))
                .await?;
            print_value(cli.output, &v)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Workload(w) => workload(cli.output, w).await,
        Command::Image(c) => crate::image::run(&cli, c).await,
        Command::Keyprovider(a) => crate::image::keyprovider(&cli, a).await,
        Command::Status => {
            let v = client(&cli)?.health().await?;
            print_value(cli.output, &v)?;
            if cli.output == Output::Table {
                match v["status"].as_str() {
                    Some("uninitialized") => eprintln!("Not initialized: run `keyward operator init` once."),
                    Some("sealed") => eprintln!(
                        "Sealed: run `keyward operator unseal` with {} share(s) ({} given so far).",
                        v["threshold"], v["progress"]
                    ),
                    _ => {}
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Completion { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut buf = Vec::new();
            clap_complete::generate(*shell, &mut cmd, "keyward", &mut buf);
            write_out(&buf)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { out } => {
            std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
            let cmd = <Cli as clap::CommandFactory>::command();
            clap_mangen::generate_to(cmd, out).with_context(|| format!("writing man pages into {}", out.display()))?;
            eprintln!("Man pages written to {} (try `man -l {}/keyward.1`).", out.display(), out.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Operator(o) => operator(&cli, o).await,
        Command::Key(k) => key(&cli, k).await,
        Command::Encrypt { key, ctx, base64 } => {
            let pt = zeroize::Zeroizing::new(read_stdin()?);
            let e = client(&cli)?.encrypt(key, &pt, &ctx_map(&ctx.context)).await?;
            if cli.output == Output::Json {
                let v =
                    json!({"ciphertext": STANDARD.encode(&e.ciphertext), "key": e.key, "key_version": e.key_version});
                print_value(cli.output, &v)?;
            } else if *base64 {
                outln!("{}", STANDARD.encode(&e.ciphertext));
            } else {
                write_out(&e.ciphertext)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Decrypt { ctx, base64 } => {
            let input = read_stdin()?;
            let ct = if *base64 { decode_b64_input(&input)? } else { input };
            let d = client(&cli)?.decrypt(&ct, &ctx_map(&ctx.context)).await?;
            if cli.output == Output::Json {
                // Written directly: a JSON value would hold a copy of the plaintext nobody wipes.
                let b64 = zeroize::Zeroizing::new(STANDARD.encode(&*d.plaintext));
                outln!(
                    "{{\n  \"plaintext\": \"{}\",\n  \"key\": {},\n  \"key_version\": {}\n}}",
                    &*b64,
                    serde_json::to_string(&d.key)?,
                    d.key_version
                );
            } else if *base64 {
                outln!("{}", STANDARD.encode(&*d.plaintext));
            } else {
                write_out(&d.plaintext)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Reencrypt { ctx, to_key, to_context, base64 } => {
            let input = read_stdin()?;
            let ct = if *base64 { decode_b64_input(&input)? } else { input };
            let e =
                client(&cli)?.reencrypt(&ct, &ctx_map(&ctx.context), to_key.as_deref(), &ctx_map(to_context)).await?;
            if cli.output == Output::Json {
                let v = json!({
                    "ciphertext": STANDARD.encode(&e.ciphertext), "key": e.key, "key_version": e.key_version,
                    "source_key": e.source_key, "source_key_version": e.source_key_version,
                });
                return print_value(cli.output, &v).map(|()| ExitCode::SUCCESS);
            }
            eprintln!(
                "Re-encrypted from {} version {} to {} version {}.",
                e.source_key, e.source_key_version, e.key, e.key_version
            );
            if *base64 {
                outln!("{}", STANDARD.encode(&e.ciphertext));
            } else {
                write_out(&e.ciphertext)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::GenerateDataKey { key, ctx, bytes, without_plaintext } => {
            let dk = client(&cli)?.generate_data_key(key, &ctx_map(&ctx.context), *bytes, !without_plaintext).await?;
            let mut v =
                json!({"key": key, "key_version": dk.key_version, "ciphertext": STANDARD.encode(&dk.ciphertext)});
            if let Some(p) = &dk.plaintext {
                v["plaintext"] = json!(STANDARD.encode(&**p));
            }
            print_value(cli.output, &v)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Sign { key, digest, signature_file } => {
            let body = match read_signable(*digest)? {
                Signable::Message(m) => json!({"message": STANDARD.encode(&m)}),
                Signable::Digest(d) => json!({"digest": STANDARD.encode(d)}),
            };
            let v = client(&cli)?
                .request(reqwest_post(), &format!("/v1/keys/{}/sign", keyward_client::key_segment(key)), Some(&body))
                .await?;
            match signature_file {
                Some(f) => {
                    let sig =
                        v["signature"].as_str().ok_or_else(|| anyhow!("the server answered without a signature"))?;
                    std::fs::write(f, format!("{sig}\n")).with_context(|| format!("writing {}", f.display()))?;
                    if cli.output == Output::Json {
                        print_value(cli.output, &v)?;
                    }
                    Ok(ExitCode::SUCCESS)
                }
                None => single_or_value(cli.output, &v, "signature"),
            }
        }
        Command::Verify { key, signature, signature_file, digest } => {
            let signature = match (signature, signature_file) {
                (Some(s), _) => s.trim().to_string(),
                (None, Some(f)) => std::fs::read_to_string(f)
                    .with_context(|| format!("reading the signature file {}", f.display()))?
                    .trim()
                    .to_string(),
                (None, None) => bail!("give --signature or --signature-file"),
            };
            let mut body = match read_signable(*digest)? {
                Signable::Message(m) => json!({"message": STANDARD.encode(&m)}),
                Signable::Digest(d) => json!({"digest": STANDARD.encode(d)}),
            };
            body["signature"] = json!(signature);
            let v = client(&cli)?
                .request(reqwest_post(), &format!("/v1/keys/{}/verify", keyward_client::key_segment(key)), Some(&body))
                .await?;
            validity(cli.output, &v)
        }
        Command::Mac { key } => {
            let msg = read_stdin()?;
            let v = client(&cli)?
                .request(
                    reqwest_post(),
                    &format!("/v1/keys/{}/mac", keyward_client::key_segment(key)),
                    Some(&json!({"message": STANDARD.encode(&msg)})),
                )
                .await?;
            single_or_value(cli.output, &v, "mac")
        }
        Command::VerifyMac { key, mac } => {
            let msg = read_stdin()?;
            let v = client(&cli)?
                .request(
                    reqwest_post(),
                    &format!("/v1/keys/{}/verify-mac", keyward_client::key_segment(key)),
                    Some(&json!({"message": STANDARD.encode(&msg), "mac": mac.trim()})),
                )
                .await?;
            validity(cli.output, &v)
        }
        Command::Random { bytes, encoding } => {
            let v = client(&cli)?.request(reqwest_post(), "/v1/random", Some(&json!({"bytes": bytes}))).await?;
            let raw = STANDARD.decode(v["bytes"].as_str().unwrap_or_default()).map_err(|_| anyhow!("bad response"))?;
            match encoding {
                Encoding::Base64 => outln!("{}", STANDARD.encode(&raw)),
                Encoding::Hex => outln!("{}", hex::encode(&raw)),
                Encoding::Raw => write_out(&raw)?,
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Secret(s) => secret(&cli, s).await,
        Command::Bench(b) => bench(&cli, b).await,
        Command::Audit(AuditCmd::Verify { files, key_file, local_store }) => {
            audit_verify(&cli, files, key_file.as_deref(), local_store.as_deref()).await
        }
        Command::Audit(AuditCmd::Info) => {
            let mut v = client(&cli)?.request(keyward_client::Method::GET, "/v1/sys/audit", None).await?;
            // The chain key is for `audit verify`; it is not printed.
            if let Some(o) = v.as_object_mut() {
                o.remove("key");
            }
            print_value(cli.output, &v)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy(p) => policy(&cli, p).await,
        Command::Randomized(r) => randomized(&cli, r).await,
        Command::Token(t) => token(&cli, t).await,
        Command::Auth(AuthCmd::Whoami) => {
            let v = client(&cli)?.request(keyward_client::Method::GET, "/v1/auth/whoami", None).await?;
            print_value(cli.output, &v)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Auth(AuthCmd::Kubernetes(k)) => kubernetes(&cli, k).await,
    }
}

async fn kubernetes(cli: &Cli, k: &K8sCmd) -> anyhow::Result<ExitCode> {
    use keyward_client::Method;
    let c = client(cli)?;
    let read = |p: &std::path::Path| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    let v = match k {
        K8sCmd::Configure { issuer, audience, jwks_file, jwks_url, discovery, ca_file, leeway_secs } => {
            let mut body = json!({"issuer": issuer, "audience": audience, "discovery": discovery});
            match (jwks_file, jwks_url, discovery) {
                (Some(f), None, false) => body["jwks"] = json!(read(f)?),
                (None, Some(u), false) => body["jwks_url"] = json!(u),
                (None, None, true) => {}
                _ => bail!("give exactly one of --jwks-file, --jwks-url or --discovery"),
            }
            if let Some(f) = ca_file {
                body["ca_pem"] = json!(read(f)?);
            }
            if let Some(l) = leeway_secs {
                body["leeway_secs"] = json!(l);
            }
            c.request(Method::PUT, "/v1/auth/kubernetes/config", Some(&body)).await?
        }
        K8sCmd::Show => c.request(Method::GET, "/v1/auth/kubernetes/config", None).await?,
        K8sCmd::Role(K8sRoleCmd::Put {
            name,
            namespaces,
            service_accounts,
            policies,
            ttl,
            max_ttl,
            allow_unbound_tokens,
        }) => {
            let body = json!({
                "bound_namespaces": namespaces,
                "bound_service_accounts": service_accounts,
                "policies": policies,
                "ttl": ttl,
                "max_ttl": max_ttl,
                "allow_unbound_tokens": allow_unbound_tokens,
            });
            c.request(Method::PUT, &format!("/v1/auth/kubernetes/roles/{name}"), Some(&body)).await?
        }
        K8sCmd::Role(K8sRoleCmd::List) => c.request(Method::GET, "/v1/auth/kubernetes/roles", None).await?,
        K8sCmd::Role(K8sRoleCmd::Show { name }) => {
            c.request(Method::GET, &format!("/v1/auth/kubernetes/roles/{name}"), None).await?
        }
        K8sCmd::Role(K8sRoleCmd::Delete { name }) => {
            c.request(Method::DELETE, &format!("/v1/auth/kubernetes/roles/{name}"), None).await?;
            json!({"deleted": name})
        }
        K8sCmd::Login { role, jwt_file } => {
            let jwt = zeroize::Zeroizing::new(read(jwt_file)?.trim().to_string());
            let body = json!({"role": role, "jwt": &*jwt});
            c.request(Method::POST, "/v1/auth/kubernetes/login", Some(&body)).await?
        }
    };
    print_value(cli.output, &v)?;
    Ok(ExitCode::SUCCESS)
}

fn reqwest_post() -> keyward_client::Method {
    keyward_client::Method::POST
}

fn single_or_value(output: Output, v: &Value, field: &str) -> anyhow::Result<ExitCode> {
    match output {
        Output::Json => print_value(output, v)?,
        Output::Table => outln!("{}", v[field].as_str().unwrap_or_default()),
    }
    Ok(ExitCode::SUCCESS)
}

fn validity(output: Output, v: &Value) -> anyhow::Result<ExitCode> {
    let valid = v["valid"].as_bool().unwrap_or(false);
    match output {
        Output::Json => print_value(output, v)?,
        Output::Table => outln!("{}", if valid { "valid" } else { "INVALID" }),
    }
    Ok(if valid { ExitCode::SUCCESS } else { ExitCode::from(3) })
}

async fn key(cli: &Cli, k: &KeyCmd) -> anyhow::Result<ExitCode> {
    let c = client(cli)?;
    let v = match k {
        KeyCmd::Create { name, key_type, description, rotate_every } => {
            c.create_key(name, key_type, description, rotate_every.as_deref()).await?
        }
        KeyCmd::List { limit, after } => {
            let mut q = Vec::new();
            if let Some(l) = limit {
                q.push(format!("limit={l}"));
            }
            if let Some(a) = after {
                q.push(format!("after={a}"));
            }
            let path = if q.is_empty() { "/v1/keys".to_string() } else { format!("/v1/keys?{}", q.join("&")) };
            let v = c.request(keyward_client::Method::GET, &path, None).await?;
            if cli.output == Output::Table {
                let cols = ["name", "type", "state", "current_version", "rotate_every", "created_at"];
                let rows: Vec<Value> = v["keys"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .map(|k| Value::Object(cols.iter().map(|c| (c.to_string(), k[*c].clone())).collect()))
                    .collect();
                print_rows(&rows, "")?;
                if let Some(n) = v["next"].as_str() {
                    outln!("(more: --after {n})");
                }
                return Ok(ExitCode::SUCCESS);
            }
            v
        }
        KeyCmd::Show { name } => c.describe_key(name).await?,
        KeyCmd::Rotate { name } => c.key_action(name, "rotate").await?,
        KeyCmd::Enable { name } => c.key_action(name, "enable").await?,
        KeyCmd::Disable { name } => c.key_action(name, "disable").await?,
        KeyCmd::CancelDelete { name } => {
            let v = c.key_action(name, "cancel-deletion").await?;
            eprintln!("Deletion cancelled. The key is disabled: `keyward key enable {name}` to use it again.");
            v
        }
        KeyCmd::Delete { name, pending_days } => c.schedule_deletion(name, *pending_days).await?,
        KeyCmd::Update { name, description } => {
            c.request(
                keyward_client::Method::PATCH,
                &format!("/v1/keys/{}", keyward_client::key_segment(name)),
                Some(&json!({"description": description})),
            )
            .await?
        }
        KeyCmd::Alias(AliasCmd::List) => c.request(keyward_client::Method::GET, "/v1/aliases", None).await?,
        KeyCmd::Alias(AliasCmd::Set { alias, key }) => {
            c.request(
                keyward_client::Method::PUT,
                &format!("/v1/aliases/{}", alias_segment(alias)?),
                Some(&json!({"key": key})),
            )
            .await?
        }
        KeyCmd::Alias(AliasCmd::Delete { alias }) => {
            c.request(keyward_client::Method::DELETE, &format!("/v1/aliases/{}", alias_segment(alias)?), None).await?
        }
        KeyCmd::RotationPolicy { name, rotate_every, off } => {
            if rotate_every.is_none() && !off {
                bail!("give --rotate-every PERIOD or --off");
            }
            c.request(
                keyward_client::Method::PUT,
                &format!("/v1/keys/{}/rotation-policy", keyward_client::key_segment(name)),
                Some(&json!({"rotate_every": rotate_every})),
            )
            .await?
        }
    };
    print_value(cli.output, &v)?;
    Ok(ExitCode::SUCCESS)
}

/// `alias/NAME` as the last segment of `/v1/aliases/NAME`.
fn alias_segment(alias: &str) -> anyhow::Result<String> {
    match alias.strip_prefix("alias/") {
        Some(n) if !n.is_empty() && !n.contains('/') => Ok(keyward_client::key_segment(n)),
        _ => bail!("an alias is written alias/NAME (e.g. alias/payments-current), not {alias:?}"),
    }
}

fn field_value(v: &str) -> anyhow::Result<String> {
    if v == "-" {
        let b = read_stdin()?;
        return String::from_utf8(b).map_err(|_| anyhow!("value on stdin is not UTF-8"));
    }
    if let Some(p) = v.strip_prefix('@') {
        return std::fs::read_to_string(p).with_context(|| format!("reading value file {p}"));
    }
    Ok(v.to_string())
}

async fn secret(cli: &Cli, s: &SecretCmd) -> anyhow::Result<ExitCode> {
    let c = client(cli)?;
    let path_of = |p: &str| format!("/v1/secrets/{p}");
    let v = match s {
        SecretCmd::Put { path, fields, from_file, cas } => {
            let data: BTreeMap<String, String> = match from_file {
                Some(f) => {
                    let raw = if f.as_os_str() == "-" {
                        read_stdin()?
                    } else {
                        std::fs::read(f).with_context(|| format!("reading {}", f.display()))?
                    };
                    serde_json::from_slice(&raw).context("--from-file must hold a JSON object of string values")?
                }
                None => {
                    if fields.is_empty() {
                        bail!("give at least one KEY=VALUE field, or --from-file");
                    }
                    let mut m = BTreeMap::new();
                    for (k, v) in fields {
                        m.insert(k.clone(), field_value(v)?);
                    }
                    m
                }
            };
            let version = c.put_secret(path, &data, *cas).await?;
            json!({"path": path, "version": version})
        }
        SecretCmd::Get { path, version, field } => {
            let q = version.map(|v| format!("?version={v}")).unwrap_or_default();
            let v = c
                .request(keyward_client::Method::GET, &format!("{}{q}", path_of(&format!("data/{path}"))), None)
                .await?;
            if let Some(f) = field {
                let val = v["data"][f].as_str().ok_or_else(|| anyhow!("secret {path} has no field {f:?}"))?;
                match cli.output {
                    Output::Json => outln!("{}", serde_json::to_string(val)?),
                    Output::Table => outln!("{val}"),
                }
                return Ok(ExitCode::SUCCESS);
            }
            v
        }
        SecretCmd::List { prefix, limit, after } => {
            let mut q = form_urlencoded::Serializer::new(String::new());
            q.append_pair("prefix", prefix);
            if let Some(l) = limit {
                q.append_pair("limit", &l.to_string());
            }
            if let Some(a) = after {
                q.append_pair("after", a);
            }
            let v = c.request(keyward_client::Method::GET, &format!("/v1/secrets?{}", q.finish()), None).await?;
            if cli.output == Output::Table {
                for p in v["paths"].as_array().map(Vec::as_slice).unwrap_or_default() {
                    outln!("{}", p.as_str().unwrap_or_default());
                }
                return Ok(ExitCode::SUCCESS);
            }
            v
        }
        SecretCmd::Versions { path } => {
            c.request(keyward_client::Method::GET, &path_of(&format!("metadata/{path}")), None).await?
        }
        SecretCmd::Delete { path, versions } => {
            c.request(
                keyward_client::Method::POST,
                &path_of(&format!("delete/{path}")),
                Some(&json!({"versions": versions})),
            )
            .await?
        }
        SecretCmd::Undelete { path, versions } => {
            c.request(
                keyward_client::Method::POST,
                &path_of(&format!("undelete/{path}")),
                Some(&json!({"versions": versions})),
            )
            .await?
        }
        SecretCmd::Destroy { path, versions } => {
            c.request(
                keyward_client::Method::POST,
                &path_of(&format!("destroy/{path}")),
                Some(&json!({"versions": versions})),
            )
            .await?
        }
    };
    print_value(cli.output, &v)?;
    Ok(ExitCode::SUCCESS)
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

/// Read one share from a no-echo prompt on a terminal, else one line of stdin.
fn read_share(prompt: &str) -> anyhow::Result<zeroize::Zeroizing<String>> {
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
fn print_shares(output: Output, v: &Value, root_token: Option<&str>, recovery: bool) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_value(output, v);
    }
    let label = if recovery { "Recovery share" } else { "Unseal share" };
    for (i, s) in v["shares"].as_array().into_iter().flatten().enumerate() {
        outln!("{label} {}: {}", i + 1, s.as_str().unwrap_or(""));
    }
    if let Some(t) = root_token {
        outln!("Root token: {t}");
    }
    eprintln!(
        "These are shown once. Give each share to a different operator; any threshold of them unseals the server."
    );
    Ok(())
}

async fn operator(cli: &Cli, o: &OperatorCmd) -> anyhow::Result<ExitCode> {
    if let OperatorCmd::Snapshot(SnapshotCmd::Restore { file, data }) = o {
        let db = keyward_store::sqlite::restore_snapshot(file, data)?;
        print_value(cli.output, &json!({"restored": db, "data": data}))?;
        eprintln!(
            "Restored. Start `keyward server --data {}` (with the same seal options), then unseal it with the \
             shares of the server the snapshot came from.",
            data.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let c = client(cli)?;
    use keyward_client::Method;
    const GET: Method = Method::GET;
    const POST: Method = Method::POST;
    const DELETE: Method = Method::DELETE;
    match o {
        OperatorCmd::Init { shares, threshold } => {
            let v = c.request(POST, "/v1/sys/init", Some(&json!({"shares": shares, "threshold": threshold}))).await?;
            print_shares(cli.output, &v, v["root_token"].as_str(), v["sealed"] == false)?;
            if v["sealed"] == false {
                eprintln!(
                    "The server unsealed itself with its HSM ({}). The shares are recovery shares: {threshold} of \
                     them unseal it when the HSM cannot, and move it to another seal.",
                    v["seal"].as_str().unwrap_or("")
                );
            } else {
                eprintln!(
                    "The server is sealed: run `keyward operator unseal` {threshold} times with different shares."
                );
            }
        }
        OperatorCmd::Unseal { migrate } => {
            let share = read_share("Unseal share: ")?;
            let v = c.request(POST, "/v1/sys/unseal", Some(&json!({"share": &*share, "migrate": migrate}))).await?;
            if cli.output == Output::Json {
                print_value(cli.output, &v)?;
            } else if v["complete"] == true && *migrate {
                outln!("Unsealed; the seal was migrated to this server's seal.");
            } else if v["complete"] == true {
                outln!("Unsealed.");
            } else {
                outln!("Unseal progress: {}/{}", v["progress"], v["threshold"]);
            }
        }
        OperatorCmd::Seal => {
            c.request(POST, "/v1/sys/seal", Some(&json!({}))).await?;
            outln!("Sealed.");
        }
        OperatorCmd::Rekey { shares, threshold, cancel } => {
            if *cancel {
                print_value(cli.output, &c.request(DELETE, "/v1/sys/rekey", None).await?)?;
                return Ok(ExitCode::SUCCESS);
            }
            let st = c.request(GET, "/v1/sys/rekey", None).await?;
            let nonce = match st["nonce"].as_str() {
                Some(n) => n.to_string(),
                None => {
                    let v = c
                        .request(POST, "/v1/sys/rekey", Some(&json!({"shares": shares, "threshold": threshold})))
                        .await?;
                    eprintln!("Started a rekey to {shares} shares with threshold {threshold}.");
                    v["nonce"].as_str().ok_or_else(|| anyhow!("the server returned no rekey nonce"))?.to_string()
                }
            };
            let share = read_share("Current unseal share: ")?;
            let v = c.request(POST, "/v1/sys/rekey/update", Some(&json!({"nonce": nonce, "share": &*share}))).await?;
            if v["shares"].is_array() {
                let hsm = c.health().await.ok().is_some_and(|h| h["hsm_key"].is_string());
                print_shares(cli.output, &v, None, hsm)?;
                eprintln!("Rekeyed: the old shares no longer unseal this server.");
            } else if cli.output == Output::Json {
                print_value(cli.output, &v)?;
            } else {
                outln!("Rekey progress: {}/{}", v["progress"], v["threshold"]);
            }
        }
        OperatorCmd::Snapshot(SnapshotCmd::Save { file }) => {
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
            let written = match c.download("/v1/sys/snapshot", &mut out).await {
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
            print_value(cli.output, &json!({"file": file, "bytes": written}))?;
        }
        OperatorCmd::Snapshot(SnapshotCmd::Restore { .. }) => unreachable_restore()?,
        OperatorCmd::RotateRoot => {
            print_value(cli.output, &c.request(POST, "/v1/sys/rotate-root", Some(&json!({}))).await?)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `operator snapshot restore` is handled before a client exists.
fn unreachable_restore() -> anyhow::Result<()> {
    bail!("internal: snapshot restore reached the client path")
}

/// The PKCS#11 seal settings, with the PIN read from its file.
fn pkcs11_config(a: &ServerArgs) -> anyhow::Result<Option<keyward_hsm::Pkcs11Config>> {
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

async fn server(a: ServerArgs) -> anyhow::Result<ExitCode> {
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

async fn serve_until_signal(
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

async fn dev(a: DevArgs) -> anyhow::Result<ExitCode> {
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

type DevAgent = (std::path::PathBuf, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>);

/// Join an agent for node `dev` to the dev server with a fresh join token, serving on `socket`.
async fn start_dev_agent(
    addr: std::net::SocketAddr,
    root: &str,
    socket: &std::path::Path,
    audit_dir: &std::path::Path,
) -> anyhow::Result<DevAgent> {
    let url = format!("http://{addr}");
    let admin = Client::builder(url.clone()).token(root).build()?;
    let v = admin
        .request(keyward_client::Method::POST, "/v1/auth/agent/join-token", Some(&json!({"node": "dev", "ttl": "1m"})))
        .await?;
    let jt = v["join_token"].as_str().ok_or_else(|| anyhow!("no join token in the answer"))?;
    let cfg = keyward_agent::upstream::UpstreamConfig {
        addr: url,
        ca_pem: None,
        join: keyward_agent::upstream::JoinCredential::Token(zeroize::Zeroizing::new(jt.to_string())),
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

async fn agent(cli: &Cli, a: AgentArgs) -> anyhow::Result<ExitCode> {
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
        socket: a.socket,
        hash_limit: a.hash_limit,
        outage_window: a.outage_window,
        kubelet_roots,
        limits: keyward_agent::ConnLimits { per_uid: a.max_connections_per_uid, total: a.max_connections },
        metrics_listen: a.metrics_listen,
        ..Default::default()
    };

    let join = match (&a.join_token_file, &a.k8s_join_role) {
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
    };
    let upstream = match join {
        Some(join) => {
            let ca_pem = match &cli.cacert {
                Some(p) => Some(std::fs::read(p).with_context(|| format!("reading CA certificate {}", p.display()))?),
                None => None,
            };
            let cfg = keyward_agent::upstream::UpstreamConfig { addr: cli.addr.clone(), ca_pem, join };
            let up = keyward_agent::upstream::Upstream::join(&cfg)
                .await
                .with_context(|| format!("joining the Keyward server at {}", cli.addr))?;
            Some(std::sync::Arc::new(up))
        }
        None => None,
    };
    let kubelet = match &a.kubelet_url {
        Some(url) => {
            let ca_pem = std::fs::read(&a.kubelet_ca)
                .with_context(|| format!("reading the kubelet CA {}", a.kubelet_ca.display()))?;
            let cfg = keyward_agent::kubelet::KubeletConfig {
                url: url.clone(),
                token_file: a.kubelet_token_file.clone(),
                ca_pem,
                poll_attempts: a.kubelet_poll_attempts,
                poll_interval: a.kubelet_poll_interval,
            };
            Some(std::sync::Arc::new(keyward_agent::kubelet::Kubelet::new(cfg)?))
        }
        None => None,
    };
    let listener = keyward_agent::bind(&config.socket)?;
    // After the socket: a second agent started by mistake stops there, before it touches the
    // first one's log.
    let log = keyward_agent::AgentLog::open(&a.audit_dir)
        .with_context(|| format!("opening the agent's audit log in {} (set --audit-dir)", a.audit_dir.display()))?;
    keyward_agent::serve(&config, listener, upstream, kubelet, log, stop).await?;
    Ok(ExitCode::SUCCESS)
}

async fn randomized(cli: &Cli, r: &RandomizedCmd) -> anyhow::Result<ExitCode> {
    let c = client(cli)?;
    let seg = |n: &str| n.replace('/', "%2F");
    match r {
        RandomizedCmd::Define { name, kind, length, alphabet, ttl, grace } => {
            let body = json!({"kind": kind, "length": length, "alphabet": alphabet, "ttl": ttl, "grace": grace});
            let v =
                c.request(keyward_client::Method::PUT, &format!("/v1/randomized/{}", seg(name)), Some(&body)).await?;
            print_value(cli.output, &v)?;
        }
        RandomizedCmd::Show { name } => {
            let v = c
                .request(keyward_client::Method::GET, &format!("/v1/randomized/{}/definition", seg(name)), None)
                .await?;
            print_value(cli.output, &v)?;
        }
        RandomizedCmd::Get { name, value_only } => {
            let v = c.request(keyward_client::Method::GET, &format!("/v1/randomized/{}", seg(name)), None).await?;
            if *value_only {
                let value = v["value"].as_str().ok_or_else(|| anyhow!("the server answered without a value"))?;
                write_out(format!("{value}\n").as_bytes())?;
            } else {
                print_value(cli.output, &v)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn kms_plugin(cli: &Cli, a: KmsPluginArgs) -> anyhow::Result<ExitCode> {
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

async fn csi_provider(cli: &Cli, a: CsiProviderArgs) -> anyhow::Result<ExitCode> {
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
async fn serve_metrics(
    addr: std::net::SocketAddr,
    calls: std::sync::Arc<keyward_metrics::Calls>,
) -> anyhow::Result<()> {
    let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding the metrics address {addr}"))?;
    tracing::info!(addr = %l.local_addr()?, "metrics on GET /metrics (no authentication)");
    tokio::spawn(keyward_metrics::serve(l, std::sync::Arc::new(move || calls.text()), std::future::pending()));
    Ok(())
}

async fn workload(output: Output, w: &WorkloadArgs) -> anyhow::Result<ExitCode> {
    let agent = keyward_client::workload::WorkloadClient::new(&w.agent_socket)?;
    match &w.command {
        WorkloadCmd::Whoami => {
            print_value(output, &json!({"selectors": agent.whoami().await?}))?;
        }
        WorkloadCmd::Secret { path, version, field } => {
            let s = agent.get_secret(path, *version).await?;
            match field {
                Some(f) => {
                    let v = s.data.get(f).ok_or_else(|| anyhow!("secret {path} has no field {f:?}"))?;
                    let mut out = std::io::stdout().lock();
                    out.write_all(v.as_bytes())?;
                    out.write_all(b"\n")?;
                }
                None => {
                    let data: serde_json::Map<String, Value> =
                        s.data.iter().map(|(k, v)| (k.clone(), Value::String(v.to_string()))).collect();
                    print_value(output, &json!({"version": s.version, "data": data}))?;
                }
            }
        }
        WorkloadCmd::Randomized { name } => {
            let r = agent.randomized(name).await?;
            write_out(format!("{}\n", r.value.as_str()).as_bytes())?;
        }
        WorkloadCmd::Sign { key } => {
            let mut msg = Vec::new();
            std::io::stdin().read_to_end(&mut msg)?;
            outln!("{}", STANDARD.encode(agent.sign(key, &msg).await?));
        }
        WorkloadCmd::GenerateDataKey { key, ctx } => {
            let dk = agent.generate_data_key(key, &ctx_map(&ctx.context), None).await?;
            let plaintext = dk.plaintext.as_ref().map(|p| STANDARD.encode(p.as_slice()));
            print_value(
                output,
                &json!({"plaintext": plaintext, "ciphertext": STANDARD.encode(&dk.ciphertext), "key_version": dk.key_version}),
            )?;
        }
        WorkloadCmd::Decrypt { ctx } => {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text)?;
            let ct = STANDARD.decode(text.trim()).context("stdin must be a base64 ciphertext")?;
            let d = agent.decrypt(&ct, &ctx_map(&ctx.context)).await?;
            std::io::stdout().lock().write_all(&d.plaintext)?;
        }
    }
    Ok(ExitCode::SUCCESS)
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

async fn audit_verify(
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
                let v = client(cli)?.request(keyward_client::Method::GET, "/v1/sys/audit", None).await?;
                if v["enabled"] != json!(true) {
                    bail!("the server runs without an audit log");
                }
                let key = STANDARD
                    .decode(v["key"].as_str().unwrap_or_default())
                    .map_err(|_| anyhow!("bad key in response"))?;
                let head = keyward_audit::Head {
                    seq: v["head"]["seq"].as_u64().unwrap_or(0),
                    hmac: v["head"]["hmac"].as_str().unwrap_or_default().to_string(),
                };
                (key, Some(head), v["file"].as_str().map(std::path::PathBuf::from))
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

async fn policy(cli: &Cli, p: &PolicyCmd) -> anyhow::Result<ExitCode> {
    use keyward_client::Method;
    let c = client(cli)?;
    let v = match p {
        PolicyCmd::Put { name, file } => {
            let raw = if file.as_os_str() == "-" {
                read_stdin()?
            } else {
                std::fs::read(file).with_context(|| format!("reading the policy file {}", file.display()))?
            };
            let body: Value = serde_json::from_slice(&raw).context("the policy file must be JSON")?;
            c.request(Method::PUT, &format!("/v1/policies/{name}"), Some(&body)).await?
        }
        PolicyCmd::List => c.request(Method::GET, "/v1/policies", None).await?,
        PolicyCmd::Show { name } => c.request(Method::GET, &format!("/v1/policies/{name}"), None).await?,
        PolicyCmd::Delete { name } => c.request(Method::DELETE, &format!("/v1/policies/{name}"), None).await?,
        PolicyCmd::Check { accessor, policies, selectors, operation, resource } => {
            let mut body = json!({"operation": operation, "resource": resource});
            match accessor {
                Some(a) => body["accessor"] = json!(a),
                None => {
                    body["policies"] = json!(policies);
                    body["selectors"] = json!(selectors);
                }
            }
            let v = c.request(Method::POST, "/v1/sys/authorize", Some(&body)).await?;
            let allowed = v["allowed"].as_bool().unwrap_or(false);
            match cli.output {
                Output::Json => print_value(cli.output, &v)?,
                Output::Table if allowed => outln!("allowed by {}", v["grant"].as_str().unwrap_or("?")),
                Output::Table => outln!("denied: {}", v["reason"].as_str().unwrap_or("?")),
            }
            return Ok(if allowed { ExitCode::SUCCESS } else { ExitCode::from(3) });
        }
    };
    print_value(cli.output, &v)?;
    Ok(ExitCode::SUCCESS)
}

async fn token(cli: &Cli, t: &TokenCmd) -> anyhow::Result<ExitCode> {
    use keyward_client::Method;
    let c = client(cli)?;
    let v = match t {
        TokenCmd::Create { policies, ttl, max_ttl, max_uses, display_name, orphan } => {
            c.request(
                Method::POST,
                "/v1/auth/token/create",
                Some(
                    &json!({"policies": policies, "ttl": ttl, "max_ttl": max_ttl, "max_uses": max_uses, "display_name": display_name, "orphan": orphan}),
                ),
            )
            .await?
        }
        TokenCmd::List => {
            let v = c.request(Method::GET, "/v1/auth/token/accessors", None).await?;
            if cli.output == Output::Table {
                let cols = ["accessor", "display_name", "policies", "expires_at", "ttl", "uses", "max_uses", "parent"];
                let rows: Vec<Value> = v["tokens"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .map(|t| Value::Object(cols.iter().map(|c| (c.to_string(), t[*c].clone())).collect()))
                    .collect();
                print_rows(&rows, "")?;
                return Ok(ExitCode::SUCCESS);
            }
            v
        }
        TokenCmd::Lookup { accessor } => {
            c.request(Method::POST, "/v1/auth/token/lookup", Some(&json!({"accessor": accessor}))).await?
        }
        TokenCmd::Renew { accessor: Some(a) } => {
            c.request(Method::POST, "/v1/auth/token/renew", Some(&json!({"accessor": a}))).await?
        }
        TokenCmd::Renew { accessor: None } => c.request(Method::POST, "/v1/auth/token/renew-self", Some(&json!({}))).await?,
        TokenCmd::Revoke { accessor: Some(a) } => {
            c.request(Method::POST, "/v1/auth/token/revoke", Some(&json!({"accessor": a}))).await?
        }
        TokenCmd::Revoke { accessor: None } => {
            c.request(Method::POST, "/v1/auth/token/revoke-self", Some(&json!({}))).await?
        }
    };
    print_value(cli.output, &v)?;
    Ok(ExitCode::SUCCESS)
}
