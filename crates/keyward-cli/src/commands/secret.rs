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

pub(super) async fn randomized(cli: &Cli, r: &RandomizedCmd) -> anyhow::Result<ExitCode> {
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
