//! # keyward-metrics
//!
//! Every Keyward daemon keeps its metrics in a [`prometheus_client`] registry and exposes them
//! in the OpenMetrics text format (which Prometheus scrapes): the server at `GET /v1/metrics`
//! (with a token) and, like the node agent, the KMS plugin and the CSI provider, at
//! `GET /metrics` on a `--metrics-listen` address of its own ([`serve`]), meant for a private
//! network.
//!
//! Metrics never carry secrets, tokens, key material or request bodies: only route templates,
//! methods, status codes, operation names and refusal reasons.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};

pub use prometheus_client;
use prometheus_client::registry::Registry;

/// The content type of [`text`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Latency buckets, in seconds: 100 µs to 10 s.
pub const LATENCY_BUCKETS: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0];

/// A histogram with [`LATENCY_BUCKETS`].
pub fn latency_histogram() -> prometheus_client::metrics::histogram::Histogram {
    prometheus_client::metrics::histogram::Histogram::new(LATENCY_BUCKETS)
}

/// Calls of a gRPC service by method and outcome (a status code name, or `OK`).
pub struct Calls {
    registry: Registry,
    calls: prometheus_client::metrics::family::Family<
        Vec<(&'static str, String)>,
        prometheus_client::metrics::counter::Counter,
    >,
}

impl std::fmt::Debug for Calls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Calls")
    }
}

impl Calls {
    /// `PREFIX_calls_total{method, outcome}`, described by `help`.
    pub fn new(prefix: &str, help: &str) -> Self {
        let mut registry = Registry::with_prefix(prefix);
        let calls = prometheus_client::metrics::family::Family::default();
        registry.register("calls", help, calls.clone());
        Self { registry, calls }
    }

    /// Count one call.
    pub fn record(&self, method: &str, outcome: &str) {
        self.calls.get_or_create(&vec![("method", method.to_string()), ("outcome", outcome.to_string())]).inc();
    }

    /// The OpenMetrics text.
    pub fn text(&self) -> String {
        text(&self.registry)
    }
}

/// The registry in the OpenMetrics text format.
pub fn text(registry: &Registry) -> String {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, registry).is_err() {
        out.clear();
    }
    out
}

/// What a scrape answers: the current text (refreshing scrape-time values first).
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Serve `GET /metrics` on `listener` until `shutdown` completes: HTTP/1.1, headers within
/// 10 s, one connection at a time per task, nothing else (404).
pub async fn serve(listener: tokio::net::TcpListener, render: Render, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let render = render.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let render = render.clone();
                async move { Ok::<_, Infallible>(answer(&req, &render)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
        });
    }
}

fn answer(req: &Request<hyper::body::Incoming>, render: &Render) -> Response<Full<Bytes>> {
    let mut resp = if req.method() == hyper::Method::GET && req.uri().path() == "/metrics" {
        let mut r = Response::new(Full::new(Bytes::from(render())));
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(CONTENT_TYPE));
        r
    } else {
        let mut r = Response::new(Full::new(Bytes::from_static(b"only GET /metrics is served here\n")));
        *r.status_mut() = StatusCode::NOT_FOUND;
        r
    };
    resp.headers_mut().insert(hyper::header::CACHE_CONTROL, hyper::header::HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn a_scrape_gets_the_registry_and_nothing_else_is_served() {
        let mut reg = Registry::default();
        let c: Counter = Counter::default();
        reg.register("keyward_things", "Things", c.clone());
        c.inc();
        let reg = Arc::new(reg);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let r2 = reg.clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, Arc::new(move || text(&r2)), async move {
            let _ = rx.await;
        }));
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let ok = get("/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("keyward_things_total 1") && ok.contains("# EOF"), "{ok}");
        assert!(get("/other").await.starts_with("HTTP/1.1 404"));
        tx.send(()).unwrap();
        task.await.unwrap();
    }
}
