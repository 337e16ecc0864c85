//! Real etcd members for tests, from the `etcd` binary (Debian's `etcd-server`, installed by
//! scripts/install-deps.sh). Each member listens on loopback ports picked free, keeps its data
//! in a temporary directory and is killed when dropped.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failed test

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why etcd cannot run here, if it cannot.
pub fn unavailable() -> Option<String> {
    match Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => None,
        Ok(s) => Some(format!("`etcd --version` exited with {s}")),
        Err(e) => Some(format!(
            "no etcd binary ({e}); scripts/install-deps.sh installs Debian's etcd-server"
        )),
    }
}

/// Prints the line the suite counts as a skip.
#[allow(
    clippy::disallowed_macros,
    reason = "the skip notice must reach the test output"
)]
pub fn skip(test: &str, why: &str) {
    let _ = std::io::Write::write_fmt(
        &mut std::io::stderr(),
        format_args!("skipped: {test} needs etcd ({why})\n"),
    );
}

/// `n` distinct free ports: every listener is held until all are chosen (one at a time, the
/// kernel may hand the same port out twice, and two members would then share a client URL).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// One etcd member of a one-member cluster.
pub struct Etcd {
    child: Option<Child>,
    pub endpoint: String,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

/// PEM files of a test CA, a certificate for the member (127.0.0.1) and one for a client.
pub struct TestTls {
    pub ca_pem: String,
    pub client_cert: String,
    pub client_key: String,
    pub dir: tempfile::TempDir,
}

impl TestTls {
    pub fn make() -> TestTls {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair,
        };
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::default();
        ca.distinguished_name
            .push(DnType::CommonName, "etcd test CA");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let leaf = |name: &str, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
            p.distinguished_name.push(DnType::CommonName, name);
            p.extended_key_usages = vec![usage];
            let cert = p.signed_by(&key, &issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf("etcd", ExtendedKeyUsagePurpose::ServerAuth);
        let (client_cert, client_key) = leaf("flotilla", ExtendedKeyUsagePurpose::ClientAuth);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.crt"), ca_cert.pem()).unwrap();
        std::fs::write(dir.path().join("server.crt"), server_cert).unwrap();
        std::fs::write(dir.path().join("server.key"), server_key).unwrap();
        TestTls {
            ca_pem: ca_cert.pem(),
            client_cert,
            client_key,
            dir,
        }
    }
}

impl Etcd {
    /// Starts a fresh single-member cluster and waits until it answers.
    pub async fn start() -> Etcd {
        Self::start_with(None).await
    }

    /// The same over TLS: https only, and a client certificate signed by `tls`'s CA required.
    pub async fn start_tls(tls: &TestTls) -> Etcd {
        Self::start_with(Some(tls)).await
    }

    async fn start_with(tls: Option<&TestTls>) -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let ports = free_ports(2);
        let (client, peer) = (ports[0], ports[1]);
        let scheme = if tls.is_some() { "https" } else { "http" };
        let endpoint = format!("{scheme}://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = dir.path().join("etcd.log");
        let out = std::fs::File::create(&log).unwrap();
        let mut command = Command::new("etcd");
        if let Some(tls) = tls {
            let file = |f: &str| tls.dir.path().join(f);
            command
                .arg("--cert-file")
                .arg(file("server.crt"))
                .arg("--key-file")
                .arg(file("server.key"))
                .arg("--trusted-ca-file")
                .arg(file("ca.crt"))
                .arg("--client-cert-auth");
        }
        let child = command
            .args(["--name", "m1", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &endpoint])
            .args(["--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("m1={peer_url}")])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start etcd");
        let mut etcd = Etcd {
            child: Some(child),
            endpoint,
            log,
            _dir: dir,
        };
        etcd.wait_ready(tls).await;
        etcd
    }

    async fn wait_ready(&mut self, tls: Option<&TestTls>) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let options = tls.map(|tls| {
            etcd_client::ConnectOptions::new().with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(&tls.ca_pem))
                    .identity(etcd_client::Identity::from_pem(
                        &tls.client_cert,
                        &tls.client_key,
                    )),
            )
        });
        loop {
            if let Ok(mut c) = etcd_client::Client::connect([&self.endpoint], options.clone()).await
                && c.status().await.is_ok()
            {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "etcd exited with {status}: {}",
                    std::fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not answer in 30 s: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn endpoints(&self) -> Vec<String> {
        vec![self.endpoint.clone()]
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One member of a [`Cluster`], stopped or running.
struct Member {
    name: String,
    client: String,
    peer: String,
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// A real etcd cluster of several members on loopback, each of which can be killed and
/// started again (with its data), to take the quorum away and give it back.
pub struct Cluster {
    members: Vec<Member>,
    initial: String,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts `n` members and waits until the cluster takes writes.
    pub async fn start(n: usize) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let ports = free_ports(2 * n);
        let members: Vec<Member> = (1..=n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: format!("http://127.0.0.1:{}", ports[2 * (i - 1)]),
                peer: format!("http://127.0.0.1:{}", ports[2 * (i - 1) + 1]),
                data: dir.path().join(format!("m{i}")),
                log: dir.path().join(format!("m{i}.log")),
                child: None,
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Cluster {
            members,
            initial,
            _dir: dir,
        };
        for i in 0..n {
            cluster.spawn(i);
        }
        cluster.wait_writable().await;
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let initial = self.initial.clone();
        let m = &mut self.members[i];
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .unwrap();
        let child = Command::new("etcd")
            .args(["--name", &m.name, "--data-dir"])
            .arg(&m.data)
            .args(["--listen-client-urls", &m.client])
            .args(["--advertise-client-urls", &m.client])
            .args(["--listen-peer-urls", &m.peer])
            .args(["--initial-advertise-peer-urls", &m.peer])
            .args(["--initial-cluster", &initial])
            .args(["--initial-cluster-token", "flotilla-test"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start etcd");
        m.child = Some(child);
    }

    /// Every member's client URL (running or not), as a client is configured.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client.clone()).collect()
    }

    /// `kill -9` of member `i` (0-based).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again on its data.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
    }

    /// Waits (up to 60 s) until a write through every endpoint succeeds.
    pub async fn wait_writable(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(mut c) = etcd_client::Client::connect(self.endpoints(), None).await
                && c.put("/probe", "x", None).await.is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the etcd cluster took no write in 60 s: {}",
                self.members
                    .iter()
                    .map(|m| std::fs::read_to_string(&m.log).unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
