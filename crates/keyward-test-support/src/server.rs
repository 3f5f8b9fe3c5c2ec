//! A dev-mode server started in this process, its root token, and raw HTTP requests to it.

use keyward_client::Client;
pub use keyward_server::Running;
use keyward_server::{ServerConfig, start};

/// A dev server listening on `listen` (`127.0.0.1:0` for any free port) with its data in `data`;
/// its root token is in [`Running::root_token_file`].
pub async fn dev_server(data: &std::path::Path, listen: &str) -> Running {
    start(ServerConfig::dev(listen.parse().unwrap(), data.to_path_buf())).await.expect("the dev server starts")
}

/// The root token a dev server wrote for the local tools.
pub fn root_token(running: &Running) -> String {
    std::fs::read_to_string(running.root_token_file.as_ref().expect("a dev server writes its root token"))
        .unwrap()
        .trim()
        .to_string()
}

/// A dev-mode configuration on a free loopback port with its data under `dir/data`.
pub fn dev_config(dir: &std::path::Path) -> ServerConfig {
    ServerConfig::dev("127.0.0.1:0".parse().unwrap(), dir.join("data"))
}

/// A dev server on a free loopback port, its data in a temporary directory.
pub struct TestServer {
    pub running: Option<Running>,
    pub dir: tempfile::TempDir,
    pub token: String,
    pub addr: String,
}

impl TestServer {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir).await
    }

    pub async fn start_in(dir: tempfile::TempDir) -> Self {
        let cfg = dev_config(dir.path());
        let running = start(cfg).await.expect("server starts");
        let token = std::fs::read_to_string(running.root_token_file.as_ref().unwrap()).unwrap();
        let addr = format!("http://{}", running.addr);
        Self { running: Some(running), dir, token, addr }
    }

    pub fn client(&self) -> Client {
        Client::builder(self.addr.clone()).token(self.token.clone()).build().unwrap()
    }

    pub fn anonymous(&self) -> Client {
        Client::builder(self.addr.clone()).build().unwrap()
    }

    pub async fn restart(mut self) -> Self {
        self.running.take().unwrap().shutdown().await.unwrap();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        Self::start_in(dir).await
    }
}

pub async fn raw(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    ctype: Option<&str>,
    body: Vec<u8>,
) -> (u16, serde_json::Value, Option<String>) {
    let http = reqwest::Client::new();
    let mut rb = http.request(reqwest::Method::from_bytes(method.as_bytes()).unwrap(), format!("{addr}{path}"));
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    if let Some(c) = ctype {
        rb = rb.header("content-type", c);
    }
    let resp = rb.body(body).send().await.unwrap();
    let status = resp.status().as_u16();
    let rid = resp.headers().get("x-request-id").map(|v| v.to_str().unwrap().to_string());
    let bytes = resp.bytes().await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null), rid)
}
