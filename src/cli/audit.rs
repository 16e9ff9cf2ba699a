//! `cardvault audit query | blast-radius | verify` (role: auditor).

use clap::{Args, Subcommand};
use serde_json::json;

use super::{ClientOpts, status_text};
use crate::proto::{self, audit_service_client::AuditServiceClient};

/// `cardvault audit ...`
#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// List audit records matching filters (oldest first).
    Query(QueryArgs),
    /// Every card a principal read in a window, per tenant.
    BlastRadius(BlastArgs),
    /// Recompute the hash chain and check the signed checkpoints.
    Verify,
}

/// Filters for `audit query`.
#[derive(Debug, Args)]
pub struct QueryArgs {
    /// Principal (certificate SAN URI or CN).
    #[arg(long, default_value = "")]
    pub principal: String,
    /// Tenant.
    #[arg(long, default_value = "")]
    pub tenant: String,
    /// Action, e.g. Detokenize; `Reads` for every read of a card
    /// (Detokenize and DetokenizeBatch): `--action Reads --token T` is
    /// every read of token T.
    #[arg(long, default_value = "")]
    pub action: String,
    /// Token.
    #[arg(long, default_value = "")]
    pub token: String,
    /// From (inclusive): Unix seconds or YYYY-MM-DDTHH:MM:SSZ.
    #[arg(long)]
    pub since: Option<String>,
    /// Until (exclusive): Unix seconds or YYYY-MM-DDTHH:MM:SSZ.
    #[arg(long)]
    pub until: Option<String>,
    /// Most records to print (asked for in pages of at most 10,000).
    #[arg(long, default_value_t = 1000)]
    pub limit: u32,
    /// Only records after this position, to continue where a query
    /// stopped: the tenant's numbering (`tenant_seq`) with --tenant, else
    /// the chain's seq.
    #[arg(long, default_value_t = 0)]
    pub after_seq: u64,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `audit blast-radius`.
#[derive(Debug, Args)]
pub struct BlastArgs {
    /// Principal whose reads are wanted.
    #[arg(
        long,
        required_unless_present = "certificate",
        conflicts_with = "certificate"
    )]
    pub principal: Option<String>,
    /// Or: the (leaked) client certificate, PEM; its principal is used.
    #[arg(long)]
    pub certificate: Option<std::path::PathBuf>,
    /// From (inclusive): Unix seconds or YYYY-MM-DDTHH:MM:SSZ.
    #[arg(long)]
    pub since: Option<String>,
    /// Until (exclusive): Unix seconds or YYYY-MM-DDTHH:MM:SSZ.
    #[arg(long)]
    pub until: Option<String>,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parses Unix seconds or `YYYY-MM-DDTHH:MM:SSZ`.
pub fn parse_time(s: &str) -> Result<prost_types::Timestamp, String> {
    if let Ok(secs) = s.parse::<i64>() {
        return Ok(prost_types::Timestamp {
            seconds: secs,
            nanos: 0,
        });
    }
    let bad = || format!("time {s:?}: use Unix seconds or YYYY-MM-DDTHH:MM:SSZ");
    let b = s.as_bytes();
    if b.len() != 20
        || b[4] != b'-'
        || b[7] != b'-'
        || b[10] != b'T'
        || b[13] != b':'
        || b[16] != b':'
        || b[19] != b'Z'
    {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| s[r].parse::<i64>().map_err(|_| bad());
    let (y, mo, d, h, mi, se) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return Err(bad());
    }
    Ok(prost_types::Timestamp {
        seconds: days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + se,
        nanos: 0,
    })
}

fn opt_time(s: &Option<String>) -> Result<Option<prost_types::Timestamp>, String> {
    s.as_deref().map(parse_time).transpose()
}

/// A time as people and `--since` read it: RFC 3339, UTC (`-` if none).
pub(crate) fn rfc3339(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref().map_or("-".into(), |t| {
        crate::time::rfc3339(t.seconds.saturating_mul(1000))
    })
}

/// The principal a PEM certificate file names (as the vault would see it).
fn principal_of_pem(path: &std::path::Path) -> Result<String, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::from_pem_file(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    crate::grpc::identity::principal_from_cert(der.as_ref())
        .ok_or_else(|| format!("{} names no principal (no SAN URI or CN)", path.display()))
}

/// Prints one audit event, as a JSON line or a table row.
/// Prints one event; `by_tenant` shows the tenant's numbering first.
fn print_event(e: &proto::AuditEvent, json: bool, by_tenant: bool) {
    if json {
        // 0 means "not shown to this caller" or "not asked for".
        let some = |n: u64| (n > 0).then_some(n);
        println!(
            "{}",
            json!({
                "seq": some(e.seq), "tenant_seq": some(e.tenant_seq), "time": rfc3339(&e.time), "principal": e.principal, "roles": e.roles,
                "tenant": e.tenant, "action": e.action, "token": e.token, "purpose": e.purpose,
                "outcome": e.outcome, "error": e.error, "request_id": e.request_id,
                "peer": e.peer, "detail": e.detail, "hash": e.hash, "replica": e.replica,
            })
        );
    } else {
        println!(
            "{:>8}  {:<20}  {:<16}  {:<8}  {:<26}  {:<18}  {:<40}  {:<16}  {}",
            if by_tenant { e.tenant_seq } else { e.seq },
            rfc3339(&e.time),
            e.action,
            e.tenant,
            e.token,
            e.outcome,
            e.principal,
            e.purpose,
            e.replica
        );
    }
}

/// Runs an audit subcommand.
pub async fn run(opts: &ClientOpts, cmd: AuditCmd) -> Result<(), String> {
    let mut client = AuditServiceClient::new(opts.connect("auditor").await?);
    match cmd {
        AuditCmd::Query(q) => {
            let by_tenant = !q.tenant.is_empty();
            if !q.json {
                println!(
                    "{:>8}  {:<20}  {:<16}  {:<8}  {:<26}  {:<18}  {:<40}  purpose",
                    if by_tenant { "tenant#" } else { "seq" },
                    "time",
                    "action",
                    "tenant",
                    "token",
                    "outcome",
                    "principal"
                );
            }
            // Page by page (the vault answers at most 10,000 a call) until
            // the log is scanned to its end or --limit records are printed,
            // then say where to continue: a silent cut would pass for "no
            // more records".
            let (since, until) = (opt_time(&q.since)?, opt_time(&q.until)?);
            let page = crate::vault::audit_log::MAX_QUERY_LIMIT as u32;
            let (mut after, mut left) = (q.after_seq, q.limit);
            while left > 0 {
                let want = left.min(page);
                let r = client
                    .query(proto::AuditQueryRequest {
                        principal: q.principal.clone(),
                        tenant: q.tenant.clone(),
                        action: q.action.clone(),
                        token: q.token.clone(),
                        since,
                        until,
                        after_seq: after,
                        limit: want,
                    })
                    .await
                    .map_err(|s| status_text(&s))?
                    .into_inner();
                let n = r.events.len() as u32;
                for e in r.events {
                    print_event(&e, q.json, by_tenant);
                }
                after = r.next_after_seq;
                left -= n.min(left);
                if n < want {
                    break;
                }
                if left == 0 {
                    eprintln!(
                        "limit of {} records reached; more may match: add --after-seq {after}",
                        q.limit
                    );
                }
            }
        }
        AuditCmd::BlastRadius(b) => {
            let principal = match (&b.principal, &b.certificate) {
                (Some(p), _) => p.clone(),
                (None, Some(path)) => principal_of_pem(path)?,
                (None, None) => return Err("give --principal or --certificate".into()),
            };
            let r = client
                .blast_radius(proto::BlastRadiusRequest {
                    principal,
                    since: opt_time(&b.since)?,
                    until: opt_time(&b.until)?,
                })
                .await
                .map_err(|s| status_text(&s))?
                .into_inner();
            if b.json {
                let tenants: Vec<_> = r
                    .tenants
                    .iter()
                    .map(|t| {
                        json!({
                            "tenant": t.tenant,
                            "tokens": t.tokens.iter().map(|k| json!({
                                "token": k.token, "reads": k.reads,
                                "first_read": rfc3339(&k.first_read), "last_read": rfc3339(&k.last_read),
                            })).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                println!(
                    "{}",
                    json!({"principal": r.principal, "distinct_tokens": r.distinct_tokens,
                           "total_reads": r.total_reads, "tenants": tenants})
                );
            } else {
                println!(
                    "principal {}: {} distinct cards read ({} reads)",
                    r.principal, r.distinct_tokens, r.total_reads
                );
                for t in r.tenants {
                    println!("tenant {} ({} cards)", t.tenant, t.tokens.len());
                    for k in t.tokens {
                        println!(
                            "  {}  reads={}  first={}  last={}",
                            k.token,
                            k.reads,
                            rfc3339(&k.first_read),
                            rfc3339(&k.last_read)
                        );
                    }
                }
            }
        }
        AuditCmd::Verify => {
            let r = client
                .verify(proto::VerifyAuditRequest {})
                .await
                .map_err(|s| status_text(&s))?
                .into_inner();
            if r.ok {
                println!(
                    "audit log intact: {} records, {} signed checkpoints (last at {})",
                    r.records, r.checkpoints, r.last_checkpoint_seq
                );
            } else {
                return Err(format!(
                    "audit log BROKEN at record {}: {} ({} records read)",
                    r.first_bad_seq, r.problem, r.records
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(parse_time("0").unwrap().seconds, 0);
        assert_eq!(parse_time("1970-01-02T00:00:00Z").unwrap().seconds, 86_400);
        assert_eq!(
            parse_time("2000-03-01T00:00:00Z").unwrap().seconds,
            951_868_800
        );
        assert_eq!(
            parse_time("2026-11-23T18:00:00Z").unwrap().seconds,
            1_795_456_800
        );
        assert!(parse_time("yesterday").is_err());
        assert!(parse_time("2026-13-01T00:00:00Z").is_err());
    }
}
