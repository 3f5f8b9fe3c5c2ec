//! `keyward secret` and `keyward randomized`.

use super::*;

pub(super) fn field_value(v: &str) -> anyhow::Result<String> {
    if v == "-" {
        let b = read_stdin()?;
        return String::from_utf8(b).map_err(|_| anyhow!("value on stdin is not UTF-8"));
    }
    if let Some(p) = v.strip_prefix('@') {
        return std::fs::read_to_string(p).with_context(|| format!("reading value file {p}"));
    }
    Ok(v.to_string())
}

pub(super) async fn secret(cli: &Cli, s: &SecretCmd) -> anyhow::Result<ExitCode> {
    let c = client(cli)?;
    let of = |versions: &[u32]| keyward_client::api::VersionsReq { versions: versions.to_vec() };
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
            val(&keyward_client::api::SecretWritten { path: path.clone(), version })?
        }
        SecretCmd::Get { path, version, field } => {
            let v = c.read_secret(path, *version).await?;
            if let Some(f) = field {
                let value = v.data.get(f).ok_or_else(|| anyhow!("secret {path} has no field {f:?}"))?;
                match cli.output {
                    Output::Json => outln!("{}", serde_json::to_string(value.as_str())?),
                    Output::Table => outln!("{}", value.as_str()),
                }
                return Ok(ExitCode::SUCCESS);
            }
            val(&v)?
        }
        SecretCmd::List { prefix, limit, after } => {
            let v = c.list_secrets(prefix, *limit, after.as_deref()).await?;
            if cli.output == Output::Table {
                for p in &v.paths {
                    outln!("{p}");
                }
                return Ok(ExitCode::SUCCESS);
            }
            val(&v)?
        }
        SecretCmd::Versions { path } => val(&c.secret_metadata(path).await?)?,
        SecretCmd::Delete { path, versions } => val(&c.secret_versions_action("delete", path, &of(versions)).await?)?,
        SecretCmd::Undelete { path, versions } => {
            val(&c.secret_versions_action("undelete", path, &of(versions)).await?)?
        }
        SecretCmd::Destroy { path, versions } => {
            val(&c.secret_versions_action("destroy", path, &of(versions)).await?)?
        }
    };
    print_value(cli.output, &v)?;
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn randomized(cli: &Cli, r: &RandomizedCmd) -> anyhow::Result<ExitCode> {
    let c = client(cli)?;
    match r {
        RandomizedCmd::Define { name, kind, length, alphabet, ttl, grace } => {
            let r = keyward_client::api::RandomizedReq {
                kind: kind.clone(),
                length: *length,
                alphabet: alphabet.clone(),
                ttl: ttl.clone(),
                grace: grace.clone(),
            };
            let v = c.define_randomized(name, &r).await?;
            print_value(cli.output, &v)?;
        }
        RandomizedCmd::Show { name } => {
            let v = c.randomized_definition(name).await?;
            print_value(cli.output, &v)?;
        }
        RandomizedCmd::Get { name, value_only } => {
            let v = c.randomized(name).await?;
            if *value_only {
                write_out(format!("{}\n", v.value.as_str()).as_bytes())?;
            } else {
                print_value(cli.output, &v)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
