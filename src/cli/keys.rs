//! `cardvault status | init | unseal | seal | keys ...` (role: admin).

use std::io::{BufRead, Write};

use clap::{Args, Subcommand};
use zeroize::Zeroizing;

use super::{ClientOpts, status_text};
use crate::proto::{self, key_service_client::KeyServiceClient};

/// `cardvault init`.
#[derive(Debug, Args)]
pub struct InitCmd {
    /// Number of key shares to create (one per custodian).
    #[arg(long, default_value_t = 5)]
    pub shares: u32,
    /// Shares needed to unseal.
    #[arg(long, default_value_t = 3)]
    pub threshold: u32,
}

/// `cardvault unseal`.
#[derive(Debug, Args)]
pub struct UnsealCmd {
    /// The share. Without it, the share is read from standard input (which
    /// keeps it out of shell history and `ps`).
    #[arg(long)]
    pub share: Option<String>,
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
    /// Replace the key-encrypting key and issue new shares.
    RotateMaster {
        /// Shares of the new key (default: as before).
        #[arg(long, default_value_t = 0)]
        shares: u32,
        /// Threshold of the new key (default: as before).
        #[arg(long, default_value_t = 0)]
        threshold: u32,
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

fn time(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref().map_or("-".into(), |t| t.seconds.to_string())
}

fn print_shares(shares: &[String], threshold: u32) {
    println!(
        "Key shares (any {threshold} unseal the vault). They are shown ONCE and stored nowhere:"
    );
    println!("give each to a different custodian and never keep two together.\n");
    for (i, s) in shares.iter().enumerate() {
        println!("  share {}: {s}", i + 1);
    }
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
            "shares: {} (threshold {}), unseal progress: {}/{}, key generation: {}, last master rotation: {}",
            s.shares,
            s.threshold,
            s.unseal_progress,
            s.threshold,
            s.key_generation,
            time(&s.last_master_rotation)
        );
    }
    for t in s.tenants {
        println!(
            "tenant {}: active v{} (last rotation {})",
            t.tenant,
            t.active_version,
            time(&t.last_rotation)
        );
        for v in t.versions {
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
            shares: cmd.shares,
            threshold: cmd.threshold,
        })
        .await
        .map_err(|e| status_text(&e))?
        .into_inner();
    print_shares(&r.shares, r.threshold);
    println!("\nThe vault is still sealed: run `cardvault unseal` once per custodian.");
    Ok(())
}

/// `cardvault unseal`.
pub async fn unseal(opts: &ClientOpts, cmd: UnsealCmd) -> Result<(), String> {
    let share = match cmd.share {
        Some(s) => Zeroizing::new(s),
        None if cmd.reset => Zeroizing::new(String::new()),
        None => {
            eprint!("key share: ");
            let _ = std::io::stderr().flush();
            let mut line = Zeroizing::new(String::new());
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .map_err(|e| e.to_string())?;
            Zeroizing::new(line.trim().to_owned())
        }
    };
    let r = client(opts)
        .await?
        .unseal(proto::UnsealRequest {
            share: share.to_string(),
            reset: cmd.reset,
        })
        .await
        .map_err(|e| status_text(&e))?
        .into_inner();
    if r.sealed {
        println!("sealed: {} of {} shares entered", r.progress, r.threshold);
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
            while let Some(p) = stream.message().await.map_err(|e| status_text(&e))? {
                let width = 40usize;
                let frac = if p.total == 0 {
                    1.0
                } else {
                    (p.done + p.skipped) as f64 / p.total as f64
                };
                let filled = ((frac * width as f64) as usize).min(width);
                eprint!(
                    "\\r[{}{}] {}/{} ({:.0}%)",
                    "#".repeat(filled),
                    ".".repeat(width - filled),
                    p.done + p.skipped,
                    p.total,
                    frac * 100.0
                );
                last = p;
            }
            eprintln!();
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
        KeysCmd::RotateMaster { shares, threshold } => {
            let r = c
                .rotate_master_key(proto::RotateMasterKeyRequest { shares, threshold })
                .await
                .map_err(|e| status_text(&e))?
                .into_inner();
            println!(
                "master key rotated: key generation {}. The old shares no longer work.\n",
                r.key_generation
            );
            print_shares(&r.shares, r.threshold);
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
