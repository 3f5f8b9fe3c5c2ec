//! `keyward workload`: a workload asking the node agent, as the process it is.

use super::*;

pub(super) async fn workload(output: Output, w: &WorkloadArgs) -> anyhow::Result<ExitCode> {
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
