//! A throwaway PostgreSQL cluster for tests: Debian's `postgresql` binaries (`.ci/run` installs
//! them), `initdb` and `pg_ctl` run as the `postgres` user when the tests run as root (initdb
//! refuses root), data and socket in a temporary directory, a free loopback port. Stopped on drop.
//! Fails loudly when PostgreSQL is not installed.

use std::path::PathBuf;
use std::process::Command;

use crate::{free_port, is_root};

/// A running cluster; stopped (and its files removed) on drop.
pub struct Cluster {
    _dir: tempfile::TempDir,
    data: PathBuf,
    bin: PathBuf,
    pub port: u16,
    pub socket_dir: PathBuf,
    /// With TLS: the CA certificate that signed the server's certificate.
    pub ca_file: Option<PathBuf>,
}

/// The newest `/usr/lib/postgresql/N/bin`.
fn bindir() -> PathBuf {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is required by this test: apt-get install -y postgresql")
        .filter_map(|e| {
            let e = e.ok()?;
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    found.sort();
    found.pop().expect("no /usr/lib/postgresql/N/bin/initdb: apt-get install -y postgresql").1
}

impl Cluster {
    /// A PostgreSQL tool, run as the postgres user when the tests run as root.
    fn command(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        }
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let out = self.command(tool).args(args).output().unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// A cluster that also accepts TLS, with a certificate for 127.0.0.1 signed by a fresh CA
    /// (made with the `openssl` command); [`Cluster::ca_file`] names the CA.
    pub fn start_tls() -> Self {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let socket_dir = dir.path().join("sock");
        std::fs::create_dir(&data).unwrap();
        std::fs::create_dir(&socket_dir).unwrap();
        if is_root() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
            let status =
                Command::new("chown").args(["-R", "postgres:postgres"]).arg(&data).arg(&socket_dir).status().unwrap();
            assert!(status.success(), "chown to postgres failed");
        }
        let ca_file = tls.then(|| make_certs(&dir.path().join("tls")));
        let cluster = Self { bin: bindir(), data, port: free_port(), socket_dir, _dir: dir, ca_file };
        let data = cluster.data.to_str().unwrap().to_owned();
        cluster.run("initdb", &["-D", &data, "-A", "trust", "-U", "keyward", "--no-sync", "-E", "UTF8"]);
        if let Some(ca) = &cluster.ca_file {
            let tls = ca.parent().unwrap();
            let conf = format!(
                "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
                tls.join("server.pem").display(),
                tls.join("server.key").display()
            );
            let path = cluster.data.join("postgresql.conf");
            let mut all = std::fs::read_to_string(&path).unwrap();
            all.push_str(&conf);
            std::fs::write(&path, all).unwrap();
        }
        cluster.start_again();
        cluster
    }

    /// Start the (stopped) server again on the same port and data.
    pub fn start_again(&self) {
        let data = self.data.to_str().unwrap().to_owned();
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200",
            self.port,
            self.socket_dir.display()
        );
        let log = self.data.join("log");
        self.run("pg_ctl", &["-D", &data, "-o", &opts, "-l", log.to_str().unwrap(), "-w", "-t", "60", "start"]);
    }

    /// A connection string for database `db` (created by [`Cluster::create_db`]).
    pub fn url(&self, db: &str) -> String {
        format!("postgresql://keyward@127.0.0.1:{}/{db}", self.port)
    }

    /// Create an empty database.
    pub fn create_db(&self, name: &str) {
        self.run("createdb", &["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "keyward", name]);
    }

    pub fn stop(&self) {
        let data = self.data.to_str().unwrap().to_owned();
        let _ = self.command("pg_ctl").args(["-D", &data, "-m", "immediate", "-w", "stop"]).output();
    }
}

/// A CA and a server certificate for 127.0.0.1 signed by it, in `dir`; returns the CA file.
fn make_certs(dir: &std::path::Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    crate::certs::ca(dir, "ca", "db CA");
    crate::certs::signed(
        dir,
        "ca",
        "server",
        "/CN=127.0.0.1",
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n",
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join("server.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    if is_root() {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let ok = Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir).status().unwrap().success();
        assert!(ok, "chown to postgres failed");
    }
    dir.join("ca.pem")
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}
