//! A workload that gets its database password from the node agent, with no token anywhere:
//! the agent measures this program, the server releases the secret to that measurement, sealed
//! to a key that exists only in this process.
//!
//! ```sh
//! keyward dev > /tmp/kw.env & sleep 2; . /tmp/kw.env     # also runs an agent (node "dev")
//! printf hunter2 | keyward secret put app/db password=-
//! cargo build --example workload_secret -p keyward-client
//! BIN=target/debug/examples/workload_secret
//! cat > /tmp/app.json <<EOF
//! {"identities": [["unix:sha256:$(sha256sum $BIN | cut -d' ' -f1)", "node:name:dev"]],
//!  "rules": [{"resources": ["secrets/app/db"], "operations": ["read"]}]}
//! EOF
//! keyward policy put app /tmp/app.json
//! env -u KEYWARD_TOKEN $BIN app/db
//! ```
#![forbid(unsafe_code)]

use keyward_client::workload::WorkloadClient;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).unwrap_or_else(|| "app/db".to_string());
    // KEYWARD_AGENT_SOCKET, or /run/keyward/agent.sock
    let agent = WorkloadClient::from_env()?;
    println!("the agent sees this process as: {}", agent.whoami().await?.join(" "));
    let secret = agent.get_secret(&path, None).await?;
    // The values live in wiping buffers; this example only shows that it got them.
    for (field, value) in &secret.data {
        println!("{path} v{}: field {field:?}, {} bytes", secret.version, value.len());
    }
    Ok(())
}
