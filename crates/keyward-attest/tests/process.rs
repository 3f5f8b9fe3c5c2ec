//! Pinning and measuring real processes: this test binary, children started from copies of
//! `/bin/sleep`, and peers of a Unix socket that exit before they are looked at.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use keyward_attest::{AttestError, Measurer, Pinned};

fn sha256_file(p: &Path) -> String {
    hex::encode(keyward_crypto::hash::sha256(&std::fs::read(p).unwrap()))
}

/// Install `bytes` as the executable `to`. The file that will be executed is written by a `cp`
/// child process, never through a descriptor of this multi-threaded test process (one open for
/// writing here could be inherited by a child another test forks at that moment, and exec'ing
/// the file would then fail with ETXTBSY).
fn install(bytes: &[u8], to: &Path) {
    let staging = to.with_extension("staging");
    std::fs::write(&staging, bytes).unwrap();
    let tmp = to.with_extension("tmp");
    assert!(Command::new("cp").arg(&staging).arg(&tmp).status().expect("cp").success());
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    // rename over the old file, as package managers do: the running inode stays intact
    std::fs::rename(&tmp, to).unwrap();
}

struct Reap(Child);
impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(path: &Path) -> Reap {
    Reap(Command::new(path).arg("60").spawn().expect("start the copied sleep"))
}

#[test]
fn this_process_over_a_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let listener = UnixListener::bind(&sock).unwrap();
    let _client = UnixStream::connect(&sock).unwrap();
    let (conn, _) = listener.accept().unwrap();

    let pinned = Pinned::from_socket(&conn).unwrap();
    assert_eq!(pinned.pid(), std::process::id());
    let m = Measurer::default().measure(&pinned).unwrap();
    pinned.still_alive().unwrap();

    let exe = std::env::current_exe().unwrap();
    let sel = m.selectors();
    assert!(sel.contains(&format!("unix:sha256:{}", sha256_file(&exe))), "{sel:?}");
    assert!(sel.contains(&format!("unix:path:{}", exe.display())), "{sel:?}");
    let uid = rustix::process::geteuid().as_raw();
    assert!(sel.contains(&format!("unix:uid:{uid}")), "{sel:?}");
}

#[test]
fn a_replaced_binary_keeps_its_hash_and_a_new_start_is_rehashed() {
    let dir = tempfile::tempdir().unwrap();
    let app = dir.path().join("app");
    let v1 = std::fs::read("/bin/sleep").unwrap();
    let mut v2 = v1.clone();
    v2.extend_from_slice(b"\0version 2"); // still a runnable ELF, different bytes
    install(&v1, &app);
    let h1 = sha256_file(&app);

    let measurer = Measurer::default();
    let first = spawn(&app);
    let p1 = Pinned::from_pid(first.0.id()).unwrap();
    // The non-blocking path never hashes: nothing known yet.
    assert!(measurer.measure_if_cached(&p1).unwrap().is_none());
    assert_eq!(measurer.cached(), 0);
    let m1 = measurer.measure(&p1).unwrap();
    assert_eq!(hex::encode(m1.exe_sha256.unwrap()), h1);
    assert_eq!(m1.exe_path, app.as_os_str().as_encoded_bytes());
    assert_eq!(measurer.cached(), 1);

    // Measuring again costs no hashing: the cache is keyed by the file's identity.
    measurer.measure(&p1).unwrap();
    assert_eq!(measurer.cached(), 1);
    let fast = measurer.measure_if_cached(&p1).unwrap().expect("known executable");
    assert_eq!(fast.selectors(), m1.selectors());

    install(&v2, &app);
    let h2 = sha256_file(&app);
    assert_ne!(h1, h2);
    // The file's identity moved (its ctime): the fast path does not answer with the old hash.
    assert!(measurer.measure_if_cached(&p1).unwrap().is_none());

    // The old process still runs the old inode: same hash, and the path says so. (Unlinking
    // changed the old inode's ctime, so it was hashed again, which is the safe direction.)
    let again = measurer.measure(&p1).unwrap();
    assert_eq!(measurer.cached(), 2);
    assert_eq!(hex::encode(again.exe_sha256.unwrap()), h1);
    assert!(again.exe_path.ends_with(b" (deleted)"), "{:?}", String::from_utf8_lossy(&again.exe_path));
    assert!(!again.selectors().contains(&format!("unix:path:{}", app.display())));

    // A process started from the new file gets the new hash.
    let second = spawn(&app);
    let p2 = Pinned::from_pid(second.0.id()).unwrap();
    let m2 = measurer.measure(&p2).unwrap();
    assert_eq!(hex::encode(m2.exe_sha256.unwrap()), h2);
    assert_eq!(measurer.cached(), 3);
    p1.still_alive().unwrap();
    p2.still_alive().unwrap();
}

#[test]
fn an_exited_process_fails_the_liveness_check_and_cannot_be_measured() {
    let dir = tempfile::tempdir().unwrap();
    let app = dir.path().join("app");
    install(&std::fs::read("/bin/sleep").unwrap(), &app);
    let mut child = spawn(&app);
    let pinned = Pinned::from_pid(child.0.id()).unwrap();
    pinned.still_alive().unwrap();
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    assert!(matches!(pinned.still_alive(), Err(AttestError::Gone)));
    assert!(Measurer::default().measure(&pinned).is_err());
}

#[test]
fn a_peer_that_exits_before_accept_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let listener = UnixListener::bind(&sock).unwrap();
    // A child connects and exits at once; its connection waits in the backlog.
    let status = Command::new("python3")
        .arg("-c")
        .arg("import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])")
        .arg(&sock)
        .status()
        .expect("python3 is needed by this test");
    assert!(status.success());
    let (conn, _) = listener.accept().unwrap();
    match Pinned::from_socket(&conn) {
        Err(AttestError::Gone) => {}
        other => panic!("expected Gone, got {other:?}"),
    }
}

#[test]
fn a_peer_that_exits_after_measurement_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let listener = UnixListener::bind(&sock).unwrap();
    // The child connects, then waits for one byte before exiting.
    let mut child = Reap(
        Command::new("python3")
            .arg("-c")
            .arg("import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.recv(1)")
            .arg(&sock)
            .spawn()
            .expect("python3 is needed by this test"),
    );
    let (mut conn, _) = listener.accept().unwrap();
    let pinned = Pinned::from_socket(&conn).unwrap();
    assert_eq!(pinned.pid(), child.0.id());
    let m = Measurer::default().measure(&pinned).unwrap();
    let exe = std::fs::read_link(format!("/proc/{}/exe", child.0.id())).unwrap();
    assert_eq!(hex::encode(m.exe_sha256.unwrap()), sha256_file(&exe));
    pinned.still_alive().unwrap();

    std::io::Write::write_all(&mut conn, b"x").unwrap();
    child.0.wait().unwrap();
    let mut rest = Vec::new();
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = conn.read_to_end(&mut rest);
    assert!(matches!(pinned.still_alive(), Err(AttestError::Gone)));
}

/// A process that reads a line from stdin, then does what it is told: `exec` another program,
/// or drop to uid 65534. The stamp taken before says what changed.
fn obedient() -> Reap {
    Reap(
        Command::new("python3")
            .arg("-c")
            .arg(
                "import os, sys\n\
                 print('ready', flush=True)\n\
                 cmd = sys.stdin.readline().strip()\n\
                 if cmd == 'exec': os.execv('/bin/sleep', ['sleep', '30'])\n\
                 if cmd == 'setuid': os.setgid(65534); os.setuid(65534)\n\
                 sys.stdin.readline()\n",
            )
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3 is needed by this test"),
    )
}

/// Wait until the process runs python (it says so).
fn ready(p: &mut Reap) {
    let mut b = [0u8; 6];
    p.0.stdout.as_mut().unwrap().read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ready\n");
}

fn tell(p: &mut Reap, what: &str) {
    use std::io::Write;
    p.0.stdin.as_mut().unwrap().write_all(format!("{what}\n").as_bytes()).unwrap();
}

/// Wait until `pred` holds of the process's stamp (the command takes a moment).
fn stamp_until(pinned: &Pinned, pred: impl Fn(&keyward_attest::Stamp) -> bool) -> keyward_attest::Stamp {
    for _ in 0..200 {
        let s = pinned.stamp().unwrap();
        if pred(&s) {
            return s;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("the process never changed");
}

#[test]
fn a_stamp_names_an_exec_and_a_credential_change() {
    // exec: same pid, pidfd and start time, another image.
    let mut p = obedient();
    ready(&mut p);
    let pinned = Pinned::from_pid(p.0.id()).unwrap();
    let before = pinned.stamp().unwrap();
    pinned.stamp().unwrap().same_as(&before).unwrap();
    before.uniform_credentials().unwrap();
    tell(&mut p, "exec");
    let after = stamp_until(&pinned, |s| s.same_as(&before).is_err());
    assert!(matches!(after.same_as(&before), Err(AttestError::Exec)), "{:?}", after.same_as(&before));
    pinned.still_alive().unwrap();

    // setuid: same image, other ids.
    if rustix::process::geteuid().is_root() {
        let mut p = obedient();
        ready(&mut p);
        let pinned = Pinned::from_pid(p.0.id()).unwrap();
        let before = pinned.stamp().unwrap();
        tell(&mut p, "setuid");
        let after = stamp_until(&pinned, |s| s.same_as(&before).is_err());
        let e = after.same_as(&before).unwrap_err();
        assert!(matches!(e, AttestError::CredentialsChanged), "{e:?}");
        assert_eq!(e.reason(), "credentials changed");
    }
}
