//! Test harness: runs the real `cardvault` binary in dev mode on a free
//! loopback port with its own data directory, and builds mTLS clients from
//! the certificates it generates.
#![allow(dead_code)]

pub mod custody;
pub mod flaky;
pub mod pg;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cardvault::proto::token_service_client::TokenServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// A running vault process.
pub struct VaultProcess {
    pub child: Child,
    pub addr: String,
    pub data_dir: PathBuf,
    pub stderr_log: PathBuf,
    pub stdout_log: PathBuf,
}

/// Options for starting a vault.
#[derive(Default, Clone)]
pub struct Opts {
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Limit on the vault's open files (`prlimit --nofile`), as on a host
    /// with the common default of 1024.
    pub nofile: Option<u64>,
}

impl VaultProcess {
    /// Starts `cardvault dev` on `data_dir` (created if missing).
    pub fn start(data_dir: &Path, opts: &Opts) -> VaultProcess {
        let mut args: Vec<String> = vec![
            "dev".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
        ];
        args.push(data_dir.display().to_string());
        Self::spawn(data_dir, &args, opts)
    }

    /// Starts `cardvault serve` in production mode (no KEK given: Shamir
    /// key shares) with the dev certificates and policy in `data_dir`.
    pub fn start_serve(data_dir: &Path, opts: &Opts) -> VaultProcess {
        let config = Self::serve_config(data_dir);
        let args = vec![
            "serve".to_string(),
            "--config".into(),
            config.display().to_string(),
        ];
        Self::spawn(data_dir, &args, opts)
    }

    /// Writes the production-mode config `start_serve` uses (dev
    /// certificates and policy in `data_dir`) and returns its path.
    pub fn serve_config(data_dir: &Path) -> PathBuf {
        std::fs::create_dir_all(data_dir).unwrap();
        let pki = cardvault::server::pki::ensure_dev_pki(&data_dir.join("certs")).unwrap();
        let policy = data_dir.join("policy.toml");
        if !policy.exists() {
            std::fs::write(&policy, cardvault::server::pki::dev_policy_toml()).unwrap();
        }
        let config = data_dir.join("cardvault.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\npolicy = \"{}\"\n[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n",
                data_dir.display(),
                policy.display(),
                pki.server_cert().display(),
                pki.server_key().display(),
                pki.ca().display()
            ),
        )
        .unwrap();
        config
    }

    fn spawn(data_dir: &Path, args: &[String], opts: &Opts) -> VaultProcess {
        std::fs::create_dir_all(data_dir).unwrap();
        let n = std::fs::read_dir(data_dir).unwrap().count();
        let stderr_log = data_dir.with_extension(format!("stderr.{n}.log"));
        let stdout_log = data_dir.with_extension(format!("stdout.{n}.log"));
        let mut cmd = match opts.nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}"))
                    .arg("--")
                    .arg(env!("CARGO_BIN_EXE_cardvault"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_cardvault")),
        };
        cmd.args(args)
            .env_remove("CARDVAULT_KEK")
            .env("CARDVAULT_LOG", "debug")
            // A developer's machine may have swap on: production start
            // would refuse it (tested in ops.rs, which overrides this).
            .env("CARDVAULT_ALLOW_SWAP", "true")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_log).unwrap());
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn cardvault");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let log_path = stdout_log.clone();
        std::thread::spawn(move || {
            let mut log = std::fs::File::create(log_path).unwrap();
            let mut sent = false;
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                use std::io::Write;
                let _ = writeln!(log, "{line}");
                if !sent && let Some(addr) = line.strip_prefix("cardvault listening on ") {
                    let _ = tx.send(addr.to_string());
                    sent = true;
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "vault did not start; stderr:\n{}",
                    std::fs::read_to_string(&stderr_log).unwrap_or_default()
                );
            }
        };
        VaultProcess {
            child,
            addr,
            data_dir: data_dir.to_owned(),
            stderr_log,
            stdout_log,
        }
    }

    /// The answer to an audit query whose window starts before 1970 (an
    /// invalid request), as the dev auditor gets it.
    pub async fn query_before_1970(&self) -> tonic::Status {
        let channel = self.channel("auditor").await;
        cardvault::proto::audit_service_client::AuditServiceClient::new(channel)
            .query(cardvault::proto::AuditQueryRequest {
                since: Some(prost_types::Timestamp {
                    seconds: -1,
                    nanos: 0,
                }),
                ..Default::default()
            })
            .await
            .unwrap_err()
    }

    /// The audit events of `action`, as the dev auditor reads them.
    pub async fn audit_events(&self, action: &str) -> Vec<cardvault::proto::AuditEvent> {
        let channel = self.channel("auditor").await;
        cardvault::proto::audit_service_client::AuditServiceClient::new(channel)
            .query(cardvault::proto::AuditQueryRequest {
                action: action.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .events
    }

    /// mTLS channel using the dev certificate `identity` (e.g. "merchant").
    pub async fn channel(&self, identity: &str) -> Channel {
        self.try_channel(identity).await.expect("connect")
    }

    /// [`VaultProcess::channel`], or why it could not connect.
    pub async fn try_channel(&self, identity: &str) -> Result<Channel, String> {
        let certs = self.data_dir.join("certs");
        let read = |n: &str| std::fs::read(certs.join(n)).unwrap();
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("ca.pem")))
            .identity(Identity::from_pem(
                read(&format!("{identity}.pem")),
                read(&format!("{identity}.key")),
            ))
            .domain_name("localhost");
        Channel::from_shared(format!("https://{}", self.addr))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .map_err(|e| e.to_string())
    }

    /// A TokenService client as `identity`, or why it could not connect.
    pub async fn client_result(
        &self,
        identity: &str,
    ) -> Result<TokenServiceClient<Channel>, String> {
        Ok(TokenServiceClient::new(self.try_channel(identity).await?))
    }

    /// A TokenService client as `identity`.
    pub async fn client(&self, identity: &str) -> TokenServiceClient<Channel> {
        TokenServiceClient::new(self.channel(identity).await)
    }

    /// Graceful stop (SIGTERM) and wait. Async so the test's runtime keeps
    /// driving client connections while the server drains them.
    pub async fn stop(mut self) {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let status = self.wait().await;
        assert!(status.success(), "vault exited with {status}");
    }

    async fn wait(&mut self) -> std::process::ExitStatus {
        for _ in 0..600 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("vault did not exit within 30 s");
    }

    /// Abrupt stop (SIGKILL) and wait.
    pub async fn kill9(mut self) {
        self.child.kill().unwrap();
        self.wait().await;
    }

    /// Everything the process logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
            + &std::fs::read_to_string(&self.stdout_log).unwrap_or_default()
    }
}

impl Drop for VaultProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A future expiry year, so tests do not rot.
pub fn exp_year() -> u32 {
    cardvault::card::YearMonth::now_utc().year + 3
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// True when `needle` occurs in `hay`.
pub fn contains_bytes(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// True when `needle` occurs in `hay` not adjacent to another letter or
/// digit (for short numbers such as a CVV, which could otherwise match
/// inside timestamps or hex ids).
pub fn contains_standalone(hay: &str, needle: &str) -> bool {
    hay.match_indices(needle).any(|(i, _)| {
        let before = hay[..i].chars().next_back();
        let after = hay[i + needle.len()..].chars().next();
        !before.is_some_and(|c| c.is_ascii_alphanumeric())
            && !after.is_some_and(|c| c.is_ascii_alphanumeric())
    })
}

impl VaultProcess {
    /// Sends a signal (e.g. "HUP") to the vault process.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args([&format!("-{sig}"), &pid])
            .status()
            .unwrap();
    }

    /// Waits until the logs contain `needle` `count` times (polling, up to
    /// 20 s, generous for a loaded 2-core machine).
    pub async fn wait_for_log(&self, needle: &str, count: usize) {
        for _ in 0..400 {
            if self.logs().matches(needle).count() >= count {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("log line {needle:?} did not appear");
    }

    /// A channel with an arbitrary client identity (PEM cert and key) and
    /// optionally another trust anchor. `Err` if the connection fails.
    pub async fn channel_with(
        &self,
        identity: Option<(String, String)>,
    ) -> Result<Channel, String> {
        let ca = std::fs::read(self.data_dir.join("certs/ca.pem")).unwrap();
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .domain_name("localhost");
        if let Some((cert, key)) = identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        Channel::from_shared(format!("https://{}", self.addr))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .map_err(|e| e.to_string())
    }

    /// A client certificate signed by this vault's dev CA for `principal`
    /// (a SAN URI), which the policy may or may not know.
    pub fn issue_client_cert(&self, principal: &str) -> (String, String) {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SanType};
        let certs = self.data_dir.join("certs");
        let ca_key =
            KeyPair::from_pem(&std::fs::read_to_string(certs.join("ca.key")).unwrap()).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "cardvault dev CA (INSECURE)");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, "stranger");
        p.subject_alt_names
            .push(SanType::URI(principal.try_into().unwrap()));
        let cert = p.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// A client certificate from a CA the vault has never seen.
pub fn foreign_client_cert() -> (String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "cardvault dev CA (INSECURE)");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name
        .push(DnType::CommonName, "demo-merchant");
    let cert = p.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

impl VaultProcess {
    /// The metrics endpoint address, if the vault printed one.
    pub fn metrics_addr(&self) -> Option<String> {
        std::fs::read_to_string(&self.stdout_log)
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("cardvault metrics on ").map(str::to_owned))
    }

    /// Fetches `path` from the metrics endpoint with a plain HTTP/1.1 GET.
    pub async fn http_get(&self, path: &str) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.metrics_addr().expect("metrics endpoint enabled");
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }
}
