//! Key custodians for ceremony tests: each a principal with a client
//! certificate from the vault's dev CA, the custodian role in its policy,
//! and an age key of its own.

use std::path::{Path, PathBuf};

use age::secrecy::ExposeSecret;
use cardvault::proto::key_service_client::KeyServiceClient;
use tonic::transport::Channel;

use super::{Opts, VaultProcess};

/// One custodian.
pub struct Custodian {
    /// The principal its certificate names.
    pub principal: String,
    /// Its age key.
    pub identity: age::x25519::Identity,
    /// Its client certificate and key (PEM), once issued.
    pub cert: Option<(String, String)>,
}

impl Custodian {
    /// `age1...`.
    pub fn recipient(&self) -> String {
        self.identity.to_public().to_string()
    }

    /// The key file `age-keygen` would write.
    pub fn key_file(&self) -> String {
        format!(
            "# created: by the test\n# public key: {}\n{}\n",
            self.recipient(),
            self.identity.to_string().expose_secret()
        )
    }

    /// Opens an encrypted share with this custodian's key.
    pub fn open(&self, age_share: &str) -> String {
        String::from_utf8(age::decrypt(&self.identity, age_share.as_bytes()).unwrap()).unwrap()
    }

    /// A KeyService client as this custodian.
    pub async fn keys(&self, v: &VaultProcess) -> KeyServiceClient<Channel> {
        KeyServiceClient::new(v.channel_with(self.cert.clone()).await.unwrap())
    }

    /// Writes its certificate, key and age key file under `dir`; returns
    /// (cert, key, age key file).
    pub fn write_files(&self, dir: &Path, n: usize) -> (PathBuf, PathBuf, PathBuf) {
        let (cert, key) = self.cert.as_ref().expect("issued");
        let paths = (
            dir.join(format!("custodian-{n}.pem")),
            dir.join(format!("custodian-{n}.key")),
            dir.join(format!("custodian-{n}-age.txt")),
        );
        std::fs::write(&paths.0, cert).unwrap();
        std::fs::write(&paths.1, key).unwrap();
        std::fs::write(&paths.2, self.key_file()).unwrap();
        paths
    }

    /// As the vault's API names a custodian.
    pub fn proto(&self) -> cardvault::proto::Custodian {
        cardvault::proto::Custodian {
            principal: self.principal.clone(),
            age_recipient: self.recipient(),
        }
    }
}

/// `n` custodians named `spiffe://cardvault.test/custodian-{1..n}` (and
/// `extra` more, for a later rekey), in the policy of a production-mode
/// vault started on `data` (sealed, no KEK: shares). Their certificates
/// are issued once it runs.
pub fn start(data: &Path, n: usize, extra: usize, opts: &Opts) -> (VaultProcess, Vec<Custodian>) {
    std::fs::create_dir_all(data).unwrap();
    cardvault::server::pki::ensure_dev_pki(&data.join("certs")).unwrap();
    let mut custodians: Vec<Custodian> = (1..=n + extra)
        .map(|i| Custodian {
            principal: format!("spiffe://cardvault.test/custodian-{i}"),
            identity: age::x25519::Identity::generate(),
            cert: None,
        })
        .collect();
    let mut policy = cardvault::server::pki::dev_policy_toml();
    for c in &custodians {
        policy.push_str(&format!(
            "\n[[principal]]\nname = \"{}\"\nroles = [\"custodian\"]\ntenants = [\"*\"]\n",
            c.principal
        ));
    }
    std::fs::write(data.join("policy.toml"), policy).unwrap();
    let v = VaultProcess::start_serve(data, opts);
    for c in &mut custodians {
        c.cert = Some(v.issue_client_cert(&c.principal));
    }
    (v, custodians)
}
