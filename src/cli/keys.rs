//! `cardvault status | init | unseal | seal | rekey | shares | keys ...`:
//! admin commands, and the custodians' own (`unseal`, `rekey submit`).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use zeroize::Zeroizing;

use super::{ClientOpts, status_text};
use crate::proto::{self, key_service_client::KeyServiceClient};

/// `cardvault init`.
#[derive(Debug, Args)]
pub struct InitCmd {
    /// A custodian, as PRINCIPAL=AGE_PUBLIC_KEY (the principal its client
    /// certificate names, and the `age1...` key `age-keygen` printed).
    /// Repeat once per custodian (2 to 255).
    #[arg(long = "custodian", value_name = "PRINCIPAL=age1...", required = true)]
    pub custodians: Vec<String>,
    /// Custodians needed to unseal (at least 2).
    #[arg(long)]
    pub threshold: u32,
    /// Directory the encrypted shares are written to, one file per custodian.
    #[arg(long, default_value = "./cardvault-shares")]
    pub out_dir: PathBuf,
}

/// A custodian's share, from a file or standard input.
#[derive(Debug, Args)]
pub struct ShareInput {
    /// The custodian's encrypted share file (`.age`, as `init` or `rekey`
    /// wrote it) or a file holding the decrypted share text.
    #[arg(long)]
    pub share_file: Option<PathBuf>,
    /// The custodian's age key file, to decrypt `--share-file` here (on
    /// the custodian's machine). Or decrypt with `age -d -i key.txt
    /// share.age` and pipe the text in.
    #[arg(long = "identity", requires = "share_file")]
    pub age_key: Option<PathBuf>,
}

/// `cardvault unseal` (role: custodian).
#[derive(Debug, Args)]
pub struct UnsealCmd {
    /// The share; without `--share-file` it is read from standard input
    /// (which keeps it out of shell history and `ps`).
    #[command(flatten)]
    pub input: ShareInput,
    /// Forget the shares entered so far.
    #[arg(long)]
    pub reset: bool,
}

/// `cardvault keys ...`
#[derive(Debug, Subcommand)]
pub enum KeysCmd {
    /// Start a new data key version (new writes use it).
    Rotate {
        /// Tenant to rotate.
        #[arg(long, conflicts_with = "all")]
        tenant: Option<String>,
        /// Rotate every tenant.
        #[arg(long)]
        all: bool,
    },
    /// Re-encrypt records under older versions with the newest, showing progress.
    Rewrap {
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Destroy an old data key version (refused while records use it).
    Retire {
        /// Tenant.
        #[arg(long)]
        tenant: String,
        /// Version to destroy.
        #[arg(long)]
        version: u32,
    },
    /// Unlock the tokenize enumeration guard: one bucket (as a refusal or
    /// the EnumerationLock audit record names it) or every bucket of a tenant.
    ClearGuard {
        /// Tenant.
        #[arg(long)]
        tenant: String,
        /// The bucket: 32 letters a-p.
        #[arg(long, conflicts_with = "all_buckets")]
        bucket: Option<String>,
        /// Every bucket of the tenant (also forgets which cards each held).
        #[arg(long)]
        all_buckets: bool,
    },
}

async fn client(opts: &ClientOpts) -> Result<KeyServiceClient<tonic::transport::Channel>, String> {
    Ok(KeyServiceClient::new(opts.connect("admin").await?))
}

/// `cardvault rekey ...`: master key rotation with a quorum of custodians.
#[derive(Debug, Subcommand)]
pub enum RekeyCmd {
    /// Start a rekey (role: admin), naming the new key's custodians.
    Start {
        /// A custodian of the new key, as PRINCIPAL=AGE_PUBLIC_KEY (repeat).
        #[arg(long = "custodian", value_name = "PRINCIPAL=age1...", required = true)]
        custodians: Vec<String>,
        /// Custodians the new key will need to unseal (at least 2).
        #[arg(long)]
        threshold: u32,
    },
    /// Submit your current share (role: custodian). The last one needed
    /// completes the rekey and writes the new encrypted shares.
    Submit {
        /// The rekey's nonce, as `rekey start` printed it.
        #[arg(long)]
        nonce: String,
        /// Your current share.
        #[command(flatten)]
        input: ShareInput,
        /// Where the new encrypted shares go if this completes the rekey.
        #[arg(long, default_value = "./cardvault-shares")]
        out_dir: PathBuf,
    },
    /// Abandon a rekey (admin or custodian); the current shares stay valid.
    Cancel {
        /// The rekey's nonce.
        #[arg(long)]
        nonce: String,
    },
}

/// Parses `PRINCIPAL=age1...` options.
fn custodians(list: &[String]) -> Result<Vec<proto::Custodian>, String> {
    list.iter()
        .map(|c| {
            let (principal, key) = c
                .rsplit_once('=')
                .ok_or_else(|| format!("--custodian {c}: expected PRINCIPAL=age1..."))?;
            Ok(proto::Custodian {
                principal: principal.to_owned(),
                age_recipient: key.to_owned(),
            })
        })
        .collect()
}

/// Writes each custodian's encrypted share to `dir` and says where.
fn write_shares(
    dir: &Path,
    shares: &[proto::CustodianShare],
    threshold: u32,
) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    println!(
        "Shares, one per custodian, each encrypted to that custodian's age key (any {threshold} unseal):"
    );
    for (i, s) in shares.iter().enumerate() {
        let safe: String = s
            .principal
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = dir.join(format!("{}-{safe}.age", i + 1));
        std::fs::write(&path, &s.age_share)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        println!("  {}  ->  {}", s.principal, path.display());
    }
    println!(
        "Send each file to its custodian only. They can be fetched again with `cardvault shares`."
    );
    Ok(())
}

/// Reads the share text: decrypted here from `--share-file` with
/// `--identity`, read from `--share-file`, or from standard input.
fn read_share(input: &ShareInput) -> Result<Zeroizing<String>, String> {
    let text = match (&input.share_file, &input.age_key) {
        (Some(file), Some(identity)) => {
            let key = Zeroizing::new(
                std::fs::read_to_string(identity)
                    .map_err(|e| format!("cannot read {}: {e}", identity.display()))?,
            );
            let sealed =
                std::fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            let plain = crate::crypto::custody::decrypt_with_key_file(&key, &sealed)?;
            Zeroizing::new(
                String::from_utf8(plain.to_vec())
                    .map_err(|_| "the decrypted share is not text".to_string())?,
            )
        }
        (Some(file), None) => {
            let text = Zeroizing::new(
                std::fs::read_to_string(file)
                    .map_err(|e| format!("cannot read {}: {e}", file.display()))?,
            );
            if text.contains("BEGIN AGE ENCRYPTED FILE") {
                return Err(format!(
                    "{} is encrypted: add --identity <your age key file>, or pipe `age -d -i key.txt {}` in",
                    file.display(),
                    file.display()
                ));
            }
            text
        }
        (None, _) => {
            eprint!("key share: ");
            let _ = std::io::stderr().flush();
            let mut line = Zeroizing::new(String::new());
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .map_err(|e| e.to_string())?;
            line
        }
    };
    Ok(Zeroizing::new(text.trim().to_owned()))
}

/// `cardvault rekey ...`.
pub async fn rekey(opts: &ClientOpts, cmd: RekeyCmd) -> Result<(), String> {
    match cmd {
        RekeyCmd::Start {
            custodians: list,
            threshold,
        } => {
            let r = client(opts)
                .await?
                .start_rekey(proto::StartRekeyRequest {
                    threshold,
                    custodians: custodians(&list)?,
                })
                .await
                .map_err(|e| status_text(&e))?
                .into_inner();
            println!(
                "rekey {} started: {} current custodians must each run\n  cardvault rekey submit --nonce {} --share-file <share.age> --identity <key.txt>\nbefore {}",
                r.nonce,
                r.required,
                r.nonce,
                time(&r.expires_at)
            );
        }
        RekeyCmd::Submit {
            nonce,
            input,
            out_dir,
        } => {
            let share = read_share(&input)?;
            let r = KeyServiceClient::new(opts.connect("custodian").await?)
                .submit_rekey_share(proto::SubmitRekeyShareRequest {
                    nonce,
                    share: share.to_string(),
                })
                .await
                .map_err(|e| status_text(&e))?
                .into_inner();
            if r.completed {
                println!(
                    "rekey complete: key generation {}. The old shares no longer work.",
                    r.key_generation
                );
                write_shares(&out_dir, &r.shares, r.new_threshold)?;
            } else {
                println!(
                    "rekey {}: {} of {} current custodians ({})",
                    r.nonce,
                    r.entered_by.len(),
                    r.required,
                    r.entered_by.join(", ")
                );
            }
        }
        RekeyCmd::Cancel { nonce } => {
            client(opts)
                .await?
                .cancel_rekey(proto::CancelRekeyRequest { nonce })
                .await
                .map_err(|e| status_text(&e))?;
            println!("rekey cancelled; the current shares stay valid");
        }
    }
    Ok(())
}

/// `cardvault shares --out-dir DIR` (role: admin): the current encrypted
/// shares again, from the seal configuration.
pub async fn shares(opts: &ClientOpts, out_dir: &Path) -> Result<(), String> {
    let s = client(opts)
        .await?
        .status(proto::StatusRequest {})
        .await
        .map_err(|e| status_text(&e))?
        .into_inner();
    if s.custodians.is_empty() {
        return Err("this vault has no custodian shares (not initialised with key shares)".into());
    }
    write_shares(out_dir, &s.custodians, s.threshold)
}

fn time(t: &Option<prost_types::Timestamp>) -> String {
    super::audit::rfc3339(t)
}

/// `cardvault status`.
pub async fn status(opts: &ClientOpts) -> Result<(), String> {
    let s = client(opts)
        .await?
        .status(proto::StatusRequest {})
        .await
        .map_err(|e| status_text(&e))?
        .into_inner();
    println!(
        "sealed: {}  initialized: {}  mode: {}  store: {}  cvvs held: {}",
        s.sealed, s.initialized, s.seal_mode, s.store, s.cvvs_held
    );
    if s.seal_mode == "shamir" {
        println!(
            "custodians: {} (threshold {}), key generation: {}, last rekey: {}",
            s.custodians
                .iter()
                .map(|c| c.principal.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            s.threshold,
            s.key_generation,
            time(&s.last_master_rotation)
        );
        println!(
            "unseal progress: {}/{} ({})",
            s.unseal_entered_by.len(),
            s.threshold,
            s.unseal_entered_by.join(", ")
        );
        if let Some(r) = &s.rekey {
            println!(
                "rekey {} in progress: {}/{} current custodians ({}), until {}",
                r.nonce,
                r.entered_by.len(),
                r.required,
                r.entered_by.join(", "),
                time(&r.expires_at)
            );
        }
    }
    for t in s.tenants {
        println!(
            "tenant {}: active v{} (last rotation {})",
            t.tenant,
            t.active_version,
            time(&t.last_rotation)
        );
        for v in t.versions {
            if v.retired_at.is_some() {
                println!(
                    "  v{:<4} retired={} (key destroyed) created={}",
                    v.version,
                    time(&v.retired_at),
                    time(&v.created_at)
                );
                continue;
            }
            println!(
                "  v{:<4} records={:<8} encryptions>={:<10} created={}{}",
                v.version,
                v.records,
                v.encryptions,
                time(&v.created_at),
                if v.active { "  (active)" } else { "" }
            );
        }
    }
    Ok(())
}

/// `cardvault init`.
pub async fn init(opts: &ClientOpts, cmd: InitCmd) -> Result<(), String> {
    let r = client(opts)
        .await?
        .init(proto::InitRequest {
            threshold: cmd.threshold,
            custodians: custodians(&cmd.custodians)?,
        })
        .await
        .map_err(|e| status_text(&e))?
        .into_inner();
    write_shares(&cmd.out_dir, &r.shares, r.threshold)?;
    println!(
        "\nThe vault is still sealed: {} custodians each run `cardvault unseal --share-file <share.age> --identity <key.txt>`,\nwith their own client certificate.",
        r.threshold
    );
    Ok(())
}

/// `cardvault unseal` (role: custodian).
pub async fn unseal(opts: &ClientOpts, cmd: UnsealCmd) -> Result<(), String> {
    let share = if cmd.reset && cmd.input.share_file.is_none() {
        Zeroizing::new(String::new())
    } else {
        read_share(&cmd.input)?
    };
    let r = KeyServiceClient::new(opts.connect("custodian").await?)
        .unseal(proto::UnsealRequest {
            share: share.to_string(),
            reset: cmd.reset,
        })
        .await
        .map_err(|e| status_text(&e))?
        .into_inner();
    if r.sealed {
        println!(
            "sealed: {} of {} custodians have entered a share ({})",
            r.progress,
            r.threshold,
            r.entered_by.join(", ")
        );
    } else {
        println!("unsealed");
    }
    Ok(())
}

/// `cardvault seal`.
pub async fn seal(opts: &ClientOpts) -> Result<(), String> {
    client(opts)
        .await?
        .seal(proto::SealRequest {})
        .await
        .map_err(|e| status_text(&e))?;
    println!("sealed: keys and CVVs wiped from memory");
    Ok(())
}

/// `cardvault keys ...`.
pub async fn keys(opts: &ClientOpts, cmd: KeysCmd) -> Result<(), String> {
    let mut c = client(opts).await?;
    match cmd {
        KeysCmd::Rotate { tenant, all } => {
            if tenant.is_none() && !all {
                return Err("give --tenant T or --all".into());
            }
            let r = c
                .rotate_data_key(proto::RotateDataKeyRequest {
                    tenant: tenant.unwrap_or_default(),
                    all,
                })
                .await
                .map_err(|e| status_text(&e))?
                .into_inner();
            for x in r.rotated {
                println!("tenant {}: now v{}", x.tenant, x.new_version);
            }
        }
        KeysCmd::Rewrap { tenant } => {
            let mut stream = c
                .rewrap(proto::RewrapRequest {
                    tenant: tenant.unwrap_or_default(),
                })
                .await
                .map_err(|e| status_text(&e))?
                .into_inner();
            let mut last = proto::RewrapProgress::default();
            // Hidden by indicatif when stderr is not a terminal.
            let bar = indicatif::ProgressBar::new(0).with_style(
                indicatif::ProgressStyle::with_template("[{bar:40}] {pos}/{len} ({percent}%)")
                    .map_err(|e| e.to_string())?
                    .progress_chars("#>."),
            );
            while let Some(p) = stream.message().await.map_err(|e| status_text(&e))? {
                bar.set_length(p.total);
                bar.set_position(p.done + p.skipped);
                last = p;
            }
            bar.finish_and_clear();
            if !last.finished {
                return Err("rewrap stream ended early; run it again to resume".into());
            }
            println!(
                "rewrapped {} records ({} deleted meanwhile)",
                last.done, last.skipped
            );
        }
        KeysCmd::Retire { tenant, version } => {
            c.retire_key(proto::RetireKeyRequest {
                tenant: tenant.clone(),
                version,
            })
            .await
            .map_err(|e| status_text(&e))?;
            println!("tenant {tenant}: v{version} destroyed");
        }
        KeysCmd::ClearGuard {
            tenant,
            bucket,
            all_buckets,
        } => {
            if bucket.is_none() && !all_buckets {
                return Err(
                    "give --bucket B (from the refusal or the audit record) or --all-buckets"
                        .into(),
                );
            }
            let r = c
                .clear_enumeration_guard(proto::ClearEnumerationGuardRequest {
                    tenant: tenant.clone(),
                    bucket: bucket.unwrap_or_default(),
                })
                .await
                .map_err(|e| status_text(&e))?
                .into_inner();
            println!(
                "tenant {tenant}: enumeration guard cleared for {} bucket(s)",
                r.cleared
            );
        }
    }
    Ok(())
}
