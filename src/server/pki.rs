//! Development PKI: a throwaway CA, a server certificate for localhost and
//! one client certificate per role, so `cardvault dev` runs with real mTLS
//! from a fresh clone. Never use these certificates in production.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A client identity the dev PKI issues: file stem, tenant, role.
pub struct DevClient {
    /// File stem under the certs directory (`{name}.pem`, `{name}.key`).
    pub name: &'static str,
    /// Tenant the identity acts for (empty for tenant-less roles).
    pub tenant: &'static str,
    /// Role the identity is meant to hold.
    pub role: &'static str,
}

/// Every client certificate `cardvault dev` creates.
pub const DEV_CLIENTS: &[DevClient] = &[
    DevClient {
        name: "merchant",
        tenant: "demo",
        role: "merchant",
    },
    DevClient {
        name: "processor",
        tenant: "demo",
        role: "processor",
    },
    DevClient {
        name: "admin",
        tenant: "",
        role: "admin",
    },
    DevClient {
        name: "auditor",
        tenant: "",
        role: "auditor",
    },
    DevClient {
        name: "other-merchant",
        tenant: "other",
        role: "merchant",
    },
    DevClient {
        name: "other-processor",
        tenant: "other",
        role: "processor",
    },
];

/// The principal (SAN URI) of a dev client.
pub fn dev_principal(c: &DevClient) -> String {
    if c.tenant.is_empty() {
        format!("spiffe://cardvault.dev/{}", c.role)
    } else {
        format!("spiffe://cardvault.dev/{}/{}", c.tenant, c.role)
    }
}

/// Paths of the dev PKI files.
#[derive(Debug, Clone)]
pub struct DevPki {
    /// Directory holding everything.
    pub dir: PathBuf,
}

impl DevPki {
    /// CA certificate (trust anchor for both sides).
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    /// Server certificate.
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }
    /// Server private key.
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }
    /// A client's certificate.
    pub fn client_cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pem"))
    }
    /// A client's private key.
    pub fn client_key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.key"))
    }
}

fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), String> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if private {
        // A new file, so the mode applies (it would not to an existing
        // one), and not through a symlink someone left in its place.
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot replace {}: {e}", path.display())),
        }
        opts.create_new(true).mode(0o600);
    }
    let mut f = opts
        .open(path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    f.write_all(contents.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn rc(e: rcgen::Error) -> String {
    format!("certificate generation failed: {e}")
}

/// Creates the dev PKI in `dir` unless it is already complete; returns its paths.
pub fn ensure_dev_pki(dir: &Path) -> Result<DevPki, String> {
    let pki = DevPki {
        dir: dir.to_owned(),
    };
    let mut wanted = vec![pki.ca(), pki.server_cert(), pki.server_key()];
    for c in DEV_CLIENTS {
        wanted.push(pki.client_cert(c.name));
        wanted.push(pki.client_key(c.name));
    }
    if wanted.iter().all(|p| p.exists()) {
        return Ok(pki);
    }
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;

    let ca_key = KeyPair::generate().map_err(rc)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(rc)?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "cardvault dev CA (INSECURE)");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(rc)?;
    write_file(&pki.ca(), &ca_cert.pem(), false)?;
    write_file(&dir.join("ca.key"), &ca_key.serialize_pem(), true)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().map_err(rc)?;
    let mut sp = CertificateParams::new(vec!["localhost".to_string()]).map_err(rc)?;
    sp.subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    sp.subject_alt_names
        .push(SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()));
    sp.distinguished_name
        .push(DnType::CommonName, "cardvault dev server");
    sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = sp.signed_by(&server_key, &issuer).map_err(rc)?;
    write_file(&pki.server_cert(), &server_cert.pem(), false)?;
    write_file(&pki.server_key(), &server_key.serialize_pem(), true)?;

    for c in DEV_CLIENTS {
        let key = KeyPair::generate().map_err(rc)?;
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(rc)?;
        let cn = if c.tenant.is_empty() {
            c.role.to_string()
        } else {
            format!("{}-{}", c.tenant, c.role)
        };
        p.distinguished_name.push(DnType::CommonName, cn);
        p.subject_alt_names.push(SanType::URI(
            dev_principal(c)
                .try_into()
                .map_err(|e: rcgen::Error| rc(e))?,
        ));
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = p.signed_by(&key, &issuer).map_err(rc)?;
        write_file(&pki.client_cert(c.name), &cert.pem(), false)?;
        write_file(&pki.client_key(c.name), &key.serialize_pem(), true)?;
    }
    Ok(pki)
}

/// The policy `cardvault dev` writes (once) for the dev identities: each
/// gets exactly its role and tenant; budgets are generous so benchmarks run.
pub fn dev_policy_toml() -> String {
    let mut out = String::from(
        "# cardvault dev policy (generated). Edit and send SIGHUP to reload.\n\
         [defaults]\ndetokenize_per_second = 100000\ndetokenize_burst = 100000\n\
         tokenize_per_second = 100000\ntokenize_burst = 100000\n\
         # tokenize_collision_per_second and _burst keep the production\n\
         # defaults: they bound guessing at stored cards (docs/security.md).\n",
    );
    for c in DEV_CLIENTS {
        let tenants = if c.tenant.is_empty() {
            "\"*\"".to_string()
        } else {
            format!("\"{}\"", c.tenant)
        };
        out.push_str(&format!(
            "\n[[principal]]\nname = \"{}\"\nroles = [\"{}\"]\ntenants = [{}]\n",
            dev_principal(c),
            c.role,
            tenants
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    /// Private keys are owner-only, also when an incomplete PKI is made
    /// again over files that were left with looser modes.
    #[test]
    fn regenerated_private_keys_are_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let pki = ensure_dev_pki(dir.path()).unwrap();
        let key = pki.client_key("merchant");
        assert_eq!(mode(&key), 0o600);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        fs::remove_file(pki.server_cert()).unwrap();
        ensure_dev_pki(dir.path()).unwrap();
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&pki.server_key()), 0o600);
        assert_eq!(mode(&dir.path().join("ca.key")), 0o600);
    }
}
