//! `keyward auth kubernetes`, `keyward policy` and `keyward token`.

use super::*;

pub(super) async fn kubernetes(cli: &Cli, k: &K8sCmd) -> anyhow::Result<ExitCode> {
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

pub(super) async fn policy(cli: &Cli, p: &PolicyCmd) -> anyhow::Result<ExitCode> {
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

pub(super) async fn token(cli: &Cli, t: &TokenCmd) -> anyhow::Result<ExitCode> {
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
