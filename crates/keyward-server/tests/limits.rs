//! Slow and numerous clients: the attacks of a client that opens connections and sends
//! headers a byte at a time, or never, or opens more connections than the server serves. The
//! server closes them at its header-read and idle timeouts and serves at most its cap at once;
//! a legitimate call made during each attack still answers within 2 s.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use keyward_server::{HttpLimits, ServerConfig, start};

async fn server(limits: HttpLimits) -> (keyward_server::Running, tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ServerConfig { http: limits, ..keyward_test_support::server::dev_config(dir.path()) };
    let running = start(cfg).await.unwrap();
    let addr = running.addr.to_string();
    (running, dir, addr)
}

/// `GET /v1/health` on a new connection; how long it took to answer.
async fn legit(addr: &str) -> Duration {
    let started = Instant::now();
    let resp = reqwest::Client::new()
        .get(format!("http://{addr}/v1/health"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("the legitimate call is answered");
    assert_eq!(resp.status(), 200);
    started.elapsed()
}

/// Whether the server closed `s` (read returns 0 or an error) within `within`.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 256];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue, // an error answer before closing
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_at_the_header_read_timeout() {
    let limits = HttpLimits { header_read_timeout: Duration::from_secs(1), ..HttpLimits::default() };
    let (_running, _dir, addr) = server(limits).await;
    // 200 connections, each sending a request line and then a header byte every 300 ms.
    let mut slow: Vec<TcpStream> = (0..200).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    for s in &mut slow {
        s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: ").unwrap();
    }
    let started = Instant::now();
    // The clients keep sending for 8 s; the server's timeout is 1 s.
    let trickle = {
        let mut slow: Vec<TcpStream> = slow.iter().map(|s| s.try_clone().unwrap()).collect();
        std::thread::spawn(move || {
            for _ in 0..27 {
                for s in &mut slow {
                    let _ = s.write_all(b"a");
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        })
    };
    assert!(legit(&addr).await < Duration::from_secs(2), "a legitimate call waits behind slow clients");
    // Every slow connection is closed although it kept sending: all of them well before the
    // clients stop (5 s after they started, against a 1 s timeout: slack for a loaded machine).
    let deadline = started + Duration::from_secs(5);
    let open = tokio::task::spawn_blocking(move || {
        let mut open = 0;
        for s in &mut slow {
            let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
            if !closed_within(s, left) {
                open += 1;
            }
        }
        open
    })
    .await
    .unwrap();
    assert_eq!(open, 0, "every slow connection was closed within 5 s while still sending");
    assert!(started.elapsed() < Duration::from_secs(8), "...before the clients stopped sending");
    trickle.join().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_silent_connections_are_closed() {
    let limits = HttpLimits {
        header_read_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(1),
        ..HttpLimits::default()
    };
    let (_running, _dir, addr) = server(limits).await;
    // A connection that never sends anything.
    let mut silent = TcpStream::connect(&addr).unwrap();
    // A request whose body stops half-way.
    let mut stalled = TcpStream::connect(&addr).unwrap();
    stalled
        .write_all(b"PUT /v1/secrets/data/a HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"da")
        .unwrap();
    let (a, b) = tokio::task::spawn_blocking(move || {
        (closed_within(&mut silent, Duration::from_secs(3)), closed_within(&mut stalled, Duration::from_secs(3)))
    })
    .await
    .unwrap();
    assert!(a, "a silent connection is closed at the header-read timeout");
    assert!(b, "a stalled body is closed at the idle timeout");
    assert!(legit(&addr).await < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_waits_its_turn_and_legitimate_calls_still_answer() {
    let limits =
        HttpLimits { header_read_timeout: Duration::from_millis(800), max_connections: 64, ..HttpLimits::default() };
    let (_running, _dir, addr) = server(limits).await;
    // Twice the cap of connections that send nothing: the server holds at most 64 at once,
    // closes each at its timeout, and takes the next from the queue.
    let mut flood: Vec<TcpStream> = (0..128).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    let started = Instant::now();
    assert!(legit(&addr).await < Duration::from_secs(2), "a legitimate call answers during the flood");
    let all_closed =
        tokio::task::spawn_blocking(move || flood.iter_mut().all(|s| closed_within(s, Duration::from_secs(4))))
            .await
            .unwrap();
    assert!(all_closed, "every flooding connection was closed in turn");
    assert!(started.elapsed() < Duration::from_secs(6));
}
