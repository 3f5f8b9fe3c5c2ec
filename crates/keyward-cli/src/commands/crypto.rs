//! The cryptographic commands: encrypt, decrypt, reencrypt, data keys, sign and verify (messages,
//! or digests above the message limit), MACs, random bytes.

use super::*;
use keyward_client::api::{MessageReq, SignReq, VerifyMacReq, VerifyReq};

/// The largest message the server signs as such; larger input is signed by its digest.
pub(super) const MAX_SIGNED_MESSAGE: usize = 64 * 1024;

pub(super) enum Signable {
    Message(Vec<u8>),
    Digest([u8; 32]),
}

/// Stdin as a message to sign, or (above the server's message limit, or with `digest`) its
/// SHA-256, hashed as it streams in: any size.
pub(super) fn read_signable(digest: bool) -> anyhow::Result<Signable> {
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

/// The cryptographic commands: encrypt, decrypt, reencrypt, generate-data-key, sign, verify,
/// mac, verify-mac, random.
pub(super) async fn crypto(cli: &Cli, c: &Command) -> anyhow::Result<ExitCode> {
    match c {
        Command::Encrypt { key, ctx, base64 } => encrypt(cli, key, ctx, *base64).await,
        Command::Decrypt { ctx, base64 } => decrypt(cli, ctx, *base64).await,
        Command::Reencrypt { ctx, to_key, to_context, base64 } => {
            reencrypt(cli, ctx, to_key.as_deref(), to_context, *base64).await
        }
        Command::GenerateDataKey { key, ctx, bytes, without_plaintext } => {
            data_key(cli, key, ctx, *bytes, *without_plaintext).await
        }
        Command::Sign { key, digest, signature_file } => sign(cli, key, *digest, signature_file.as_deref()).await,
        Command::Verify { key, signature, signature_file, digest } => {
            verify(cli, key, signature.as_deref(), signature_file.as_deref(), *digest).await
        }
        Command::Mac { key } => mac(cli, key).await,
        Command::VerifyMac { key, mac } => verify_mac(cli, key, mac).await,
        Command::Random { bytes, encoding } => random(cli, *bytes, *encoding).await,
        _ => bail!("internal error: not a cryptographic command"),
    }
}

/// `keyward encrypt`: stdin under a key.
async fn encrypt(cli: &Cli, key: &str, ctx: &ContextArgs, base64: bool) -> anyhow::Result<ExitCode> {
    let pt = zeroize::Zeroizing::new(read_stdin()?);
    let e = client(cli)?.encrypt(key, &pt, &ctx_map(&ctx.context)).await?;
    if cli.output == Output::Json {
        let v = keyward_client::api::Ciphertext {
            ciphertext: STANDARD.encode(&e.ciphertext),
            key: e.key,
            key_version: e.key_version,
        };
        print_value(cli.output, &v)?;
    } else if base64 {
        outln!("{}", STANDARD.encode(&e.ciphertext));
    } else {
        write_out(&e.ciphertext)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `keyward decrypt`: a ciphertext on stdin.
async fn decrypt(cli: &Cli, ctx: &ContextArgs, base64: bool) -> anyhow::Result<ExitCode> {
    let input = read_stdin()?;
    let ct = if base64 { decode_b64_input(&input)? } else { input };
    let d = client(cli)?.decrypt(&ct, &ctx_map(&ctx.context)).await?;
    if cli.output == Output::Json {
        let v = keyward_client::api::Plaintext {
            plaintext: zeroize::Zeroizing::new(STANDARD.encode(&*d.plaintext)),
            key: d.key.clone(),
            key_version: d.key_version,
        };
        print_value(cli.output, &v)?;
    } else if base64 {
        outln!("{}", STANDARD.encode(&*d.plaintext));
    } else {
        write_out(&d.plaintext)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `keyward reencrypt`: a ciphertext on stdin, to another key or context.
async fn reencrypt(
    cli: &Cli,
    ctx: &ContextArgs,
    to_key: Option<&str>,
    to_context: &[(String, String)],
    base64: bool,
) -> anyhow::Result<ExitCode> {
    let input = read_stdin()?;
    let ct = if base64 { decode_b64_input(&input)? } else { input };
    let e = client(cli)?.reencrypt(&ct, &ctx_map(&ctx.context), to_key, &ctx_map(to_context)).await?;
    if cli.output == Output::Json {
        let v = keyward_client::api::Reencrypted {
            ciphertext: STANDARD.encode(&e.ciphertext),
            key: e.key,
            key_version: e.key_version,
            source_key: e.source_key,
            source_key_version: e.source_key_version,
        };
        return print_value(cli.output, &v).map(|()| ExitCode::SUCCESS);
    }
    eprintln!(
        "Re-encrypted from {} version {} to {} version {}.",
        e.source_key, e.source_key_version, e.key, e.key_version
    );
    if base64 {
        outln!("{}", STANDARD.encode(&e.ciphertext));
    } else {
        write_out(&e.ciphertext)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `keyward generate-data-key`.
async fn data_key(
    cli: &Cli,
    key: &str,
    ctx: &ContextArgs,
    bytes: Option<usize>,
    without_plaintext: bool,
) -> anyhow::Result<ExitCode> {
    let dk = client(cli)?.generate_data_key(key, &ctx_map(&ctx.context), bytes, !without_plaintext).await?;
    let v = keyward_client::api::DataKey {
        plaintext: dk.plaintext.as_ref().map(|p| zeroize::Zeroizing::new(STANDARD.encode(&**p))),
        ciphertext: STANDARD.encode(&dk.ciphertext),
        key: key.to_string(),
        key_version: dk.key_version,
    };
    print_value(cli.output, &v)?;
    Ok(ExitCode::SUCCESS)
}

/// `keyward sign`: the message on stdin, or its digest above the message limit.
async fn sign(
    cli: &Cli,
    key: &str,
    digest: bool,
    signature_file: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    let r = match read_signable(digest)? {
        Signable::Message(m) => SignReq { message: Some(STANDARD.encode(&m)), digest: None },
        Signable::Digest(d) => SignReq { message: None, digest: Some(STANDARD.encode(d)) },
    };
    let v = client(cli)?.sign(key, &r).await?;
    match signature_file {
        Some(f) => {
            std::fs::write(f, format!("{}\n", v.signature)).with_context(|| format!("writing {}", f.display()))?;
            if cli.output == Output::Json {
                print_value(cli.output, &v)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        None => single_or_value(cli.output, &v, &v.signature),
    }
}

/// `keyward verify`.
async fn verify(
    cli: &Cli,
    key: &str,
    signature: Option<&str>,
    signature_file: Option<&std::path::Path>,
    digest: bool,
) -> anyhow::Result<ExitCode> {
    let signature = match (signature, signature_file) {
        (Some(s), _) => s.trim().to_string(),
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("reading the signature file {}", f.display()))?
            .trim()
            .to_string(),
        (None, None) => bail!("give --signature or --signature-file"),
    };
    let r = match read_signable(digest)? {
        Signable::Message(m) => VerifyReq { message: Some(STANDARD.encode(&m)), digest: None, signature },
        Signable::Digest(d) => VerifyReq { message: None, digest: Some(STANDARD.encode(d)), signature },
    };
    let v = client(cli)?.verify(key, &r).await?;
    validity(cli.output, &v)
}

/// `keyward mac`.
async fn mac(cli: &Cli, key: &str) -> anyhow::Result<ExitCode> {
    let msg = read_stdin()?;
    let v = client(cli)?.mac(key, &MessageReq { message: STANDARD.encode(&msg) }).await?;
    single_or_value(cli.output, &v, &v.mac)
}

/// `keyward verify-mac`.
async fn verify_mac(cli: &Cli, key: &str, mac: &str) -> anyhow::Result<ExitCode> {
    let msg = read_stdin()?;
    let r = VerifyMacReq { message: STANDARD.encode(&msg), mac: mac.trim().to_string() };
    let v = client(cli)?.verify_mac(key, &r).await?;
    validity(cli.output, &v)
}

/// `keyward random`.
async fn random(cli: &Cli, bytes: usize, encoding: Encoding) -> anyhow::Result<ExitCode> {
    let v = client(cli)?.random(bytes).await?;
    let raw = zeroize::Zeroizing::new(
        STANDARD.decode(v.bytes.as_str()).map_err(|_| anyhow!("the server's random bytes are not base64"))?,
    );
    match encoding {
        Encoding::Base64 => outln!("{}", STANDARD.encode(&raw)),
        Encoding::Hex => outln!("{}", hex::encode(&raw)),
        Encoding::Raw => write_out(&raw)?,
    }
    Ok(ExitCode::SUCCESS)
}
