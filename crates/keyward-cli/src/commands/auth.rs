//! `keyward auth kubernetes`, `keyward policy` and `keyward token`.

use super::*;

pub(super) async fn kubernetes(cli: &Cli, k: &K8sCmd) -> anyhow::Result<ExitCode> {
    use keyward_client::api::{K8sConfigReq, K8sLoginReq, K8sRoleReq};
    let c = client(cli)?;
    let read = |p: &std::path::Path| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    let v = match k {
        K8sCmd::Configure {
            issuer,
            audience,
            jwks_file,
            jwks_url,
            discovery,
            ca_file,
            leeway_secs,
            token_review_url,
            token_reviewer_secret,
        } => {
            let mut r = K8sConfigReq {
                issuer: issuer.clone(),
                audience: audience.clone(),
                discovery: *discovery,
                leeway_secs: *leeway_secs,
                token_review_url: token_review_url.clone(),
                token_reviewer_secret: token_reviewer_secret.clone(),
                ..Default::default()
            };
            match (jwks_file, jwks_url, discovery) {
                (Some(f), None, false) => r.jwks = Some(read(f)?),
                (None, Some(u), false) => r.jwks_url = Some(u.clone()),
                (None, None, true) => {}
                _ => bail!("give exactly one of --jwks-file, --jwks-url or --discovery"),
            }
            if let Some(f) = ca_file {
                r.ca_pem = Some(read(f)?);
            }
            val(&c.k8s_configure(&r).await?)?
        }
        K8sCmd::Show => val(&c.k8s_config().await?)?,
        K8sCmd::Role(K8sRoleCmd::Put {
            name,
            namespaces,
            service_accounts,
            policies,
            ttl,
            max_ttl,
            allow_unbound_tokens,
        }) => {
            let r = K8sRoleReq {
                bound_namespaces: namespaces.clone(),
                bound_service_accounts: service_accounts.clone(),
                policies: policies.clone(),
                ttl: Some(ttl.clone()),
                max_ttl: max_ttl.clone(),
                allow_unbound_tokens: *allow_unbound_tokens,
            };
            val(&c.k8s_put_role(name, &r).await?)?
        }
        K8sCmd::Role(K8sRoleCmd::List) => val(&c.k8s_roles().await?)?,
        K8sCmd::Role(K8sRoleCmd::Show { name }) => val(&c.k8s_role(name).await?)?,
        K8sCmd::Role(K8sRoleCmd::Delete { name }) => {
            c.k8s_delete_role(name).await?;
            val(&keyward_client::api::PolicyDeleted { deleted: name.clone() })?
        }
        K8sCmd::Login { role, jwt_file } => {
            let jwt = zeroize::Zeroizing::new(read(jwt_file)?.trim().to_string());
            val(&c.k8s_login(&K8sLoginReq { role: role.clone(), jwt }).await?)?
        }
    };
    print_value(cli.output, &v)?;
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn policy(cli: &Cli, p: &PolicyCmd) -> anyhow::Result<ExitCode> {
    let c = client(cli)?;
    let v = match p {
        PolicyCmd::Put { name, file } => {
            let raw = if file.as_os_str() == "-" {
                read_stdin()?
            } else {
                std::fs::read(file).with_context(|| format!("reading the policy file {}", file.display()))?
            };
            let document: keyward_client::api::PolicyReq = serde_json::from_slice(&raw).context(
                "the policy file must be a JSON object of \"rules\" (and optionally \"description\" and \"identities\")",
            )?;
            val(&c.put_policy(name, &document).await?)?
        }
        PolicyCmd::List => val(&c.policies().await?)?,
        PolicyCmd::Show { name } => val(&c.policy(name).await?)?,
        PolicyCmd::Delete { name } => val(&c.delete_policy(name).await?)?,
        PolicyCmd::Check { accessor, policies, selectors, operation, resource } => {
            let mut r = keyward_client::api::DryRunReq {
                operation: operation.clone(),
                resource: resource.clone(),
                ..Default::default()
            };
            match accessor {
                Some(a) => r.accessor = Some(a.clone()),
                None => {
                    r.policies = Some(policies.clone());
                    r.selectors = Some(selectors.clone());
                }
            }
            let v = c.authorize(&r).await?;
            let allowed = v.allowed;
            match cli.output {
                Output::Json => print_value(cli.output, &v)?,
                Output::Table if allowed => outln!("allowed by {}", v.grant.as_deref().unwrap_or("?")),
                Output::Table => outln!("denied: {}", v.reason.as_deref().unwrap_or("?")),
            }
            return Ok(if allowed { ExitCode::SUCCESS } else { ExitCode::from(3) });
        }
    };
    print_value(cli.output, &v)?;
    Ok(ExitCode::SUCCESS)
}

pub(super) async fn token(cli: &Cli, t: &TokenCmd) -> anyhow::Result<ExitCode> {
    let c = client(cli)?;
    let v = match t {
        TokenCmd::Create { policies, ttl, max_ttl, max_uses, display_name, orphan } => {
            let r = keyward_client::api::TokenCreateReq {
                policies: policies.clone(),
                ttl: ttl.clone(),
                max_ttl: max_ttl.clone(),
                max_uses: *max_uses,
                display_name: display_name.clone(),
                orphan: *orphan,
            };
            val(&c.create_token(&r).await?)?
        }
        TokenCmd::List => {
            let v = c.token_accessors().await?;
            if cli.output == Output::Table {
                let cols = ["accessor", "display_name", "policies", "expires_at", "ttl", "uses", "max_uses", "parent"];
                let mut rows = Vec::with_capacity(v.tokens.len());
                for t in &v.tokens {
                    let t = val(t)?;
                    rows.push(Value::Object(cols.iter().map(|c| (c.to_string(), t[*c].clone())).collect()));
                }
                print_rows(&rows, "")?;
                return Ok(ExitCode::SUCCESS);
            }
            val(&v)?
        }
        TokenCmd::Lookup { accessor } => val(&c.lookup_token(accessor).await?)?,
        TokenCmd::Renew { accessor: Some(a) } => val(&c.renew_token(a).await?)?,
        TokenCmd::Renew { accessor: None } => val(&c.renew_self().await?)?,
        TokenCmd::Revoke { accessor: Some(a) } => val(&c.revoke_token(a).await?)?,
        TokenCmd::Revoke { accessor: None } => val(&c.revoke_self().await?)?,
    };
    print_value(cli.output, &v)?;
    Ok(ExitCode::SUCCESS)
}
