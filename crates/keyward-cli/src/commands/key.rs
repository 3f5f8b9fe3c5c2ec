//! `keyward key`: create, list, describe, update, aliases, lifecycle.

use super::*;

pub(super) async fn key(cli: &Cli, k: &KeyCmd) -> anyhow::Result<ExitCode> {
    let c = client(cli)?;
    let v = match k {
        KeyCmd::Create { name, key_type, description, rotate_every } => {
            val(&c.create_key(name, key_type, description, rotate_every.as_deref()).await?)?
        }
        KeyCmd::List { limit, after } => {
            let v = c.list_keys(*limit, after.as_deref()).await?;
            if cli.output == Output::Table {
                let cols = ["name", "type", "state", "current_version", "rotate_every", "created_at"];
                let mut rows = Vec::with_capacity(v.keys.len());
                for k in &v.keys {
                    let k = val(k)?;
                    rows.push(Value::Object(cols.iter().map(|c| (c.to_string(), k[*c].clone())).collect()));
                }
                print_rows(&rows, "")?;
                if let Some(n) = &v.next {
                    outln!("(more: --after {n})");
                }
                return Ok(ExitCode::SUCCESS);
            }
            val(&v)?
        }
        KeyCmd::Show { name } => val(&c.describe_key(name).await?)?,
        KeyCmd::Rotate { name } => val(&c.key_action(name, "rotate").await?)?,
        KeyCmd::Enable { name } => val(&c.key_action(name, "enable").await?)?,
        KeyCmd::Disable { name } => val(&c.key_action(name, "disable").await?)?,
        KeyCmd::CancelDelete { name } => {
            let v = c.key_action(name, "cancel-deletion").await?;
            eprintln!("Deletion cancelled. The key is disabled: `keyward key enable {name}` to use it again.");
            val(&v)?
        }
        KeyCmd::Delete { name, pending_days } => val(&c.schedule_deletion(name, *pending_days).await?)?,
        KeyCmd::Update { name, description } => {
            val(&c.update_key(name, &keyward_client::api::UpdateKeyReq { description: description.clone() }).await?)?
        }
        KeyCmd::Alias(AliasCmd::List) => val(&c.aliases().await?)?,
        KeyCmd::Alias(AliasCmd::Set { alias, key }) => {
            val(&c.set_alias(alias_name(alias)?, &keyward_client::api::AliasReq { key: key.clone() }).await?)?
        }
        KeyCmd::Alias(AliasCmd::Delete { alias }) => val(&c.delete_alias(alias_name(alias)?).await?)?,
        KeyCmd::RotationPolicy { name, rotate_every, off } => {
            if rotate_every.is_none() && !off {
                bail!("give --rotate-every PERIOD or --off");
            }
            let r = keyward_client::api::RotationPolicyReq { rotate_every: rotate_every.clone() };
            val(&c.set_rotation(name, &r).await?)?
        }
    };
    print_value(cli.output, &v)?;
    Ok(ExitCode::SUCCESS)
}

/// `alias/NAME` as the last segment of `/v1/aliases/NAME`.
/// NAME of `alias/NAME`.
pub(super) fn alias_name(alias: &str) -> anyhow::Result<&str> {
    match alias.strip_prefix("alias/") {
        Some(n) if !n.is_empty() && !n.contains('/') => Ok(n),
        _ => bail!("an alias is written alias/NAME (e.g. alias/payments-current), not {alias:?}"),
    }
}
