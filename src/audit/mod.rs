//! The tamper-evident audit log.
//!
//! One [`AuditBody`] per operation (tokenize, detokenize and each batch
//! item, metadata, delete, denied and failed calls, key operations). The
//! store appends it as an [`AuditRecord`] that links to its predecessor:
//! `hash = SHA-256("cardvault.audit.v1" | seq | prev_hash | body)`. Every N
//! records (and every T seconds) the vault signs the head with an Ed25519
//! key wrapped by the KEK ([`Checkpoint`]). [`verify`] recomputes the chain
//! and the checkpoints and names the first record that does not fit: an
//! edited, deleted, reordered or inserted record breaks a link, and
//! recomputing the links after an edit breaks a signed checkpoint.
//!
//! Never a PAN, CVV or name: the body holds tokens, identities and outcomes.

pub mod action;
pub mod query;

pub use action::AuditAction;

use ring::digest;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

/// Hash of the (virtual) record before the first: 32 zero bytes.
pub const GENESIS: [u8; 32] = [0; 32];

/// What happened, by whom, to which token. Encoded with prost; the stored
/// bytes are what the chain hashes, so re-encoding never matters.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AuditBody {
    /// Milliseconds since the Unix epoch.
    #[prost(int64, tag = "1")]
    pub time_ms: i64,
    /// Principal (certificate identity) of the caller.
    #[prost(string, tag = "2")]
    pub principal: String,
    /// Roles the caller held at the time.
    #[prost(string, repeated, tag = "3")]
    pub roles: Vec<String>,
    /// Tenant the operation acted for (as requested, if it was refused).
    #[prost(string, tag = "4")]
    pub tenant: String,
    /// Operation, e.g. `Detokenize`.
    #[prost(string, tag = "5")]
    pub action: String,
    /// Token concerned, if any.
    #[prost(string, tag = "6")]
    pub token: String,
    /// Stated purpose (detokenize).
    #[prost(string, tag = "7")]
    pub purpose: String,
    /// `OK` or the gRPC code name of the failure.
    #[prost(string, tag = "8")]
    pub outcome: String,
    /// Failure message (never holds a secret; see `Error`).
    #[prost(string, tag = "9")]
    pub error: String,
    /// Request id, to correlate with logs.
    #[prost(string, tag = "10")]
    pub request_id: String,
    /// Peer network address.
    #[prost(string, tag = "11")]
    pub peer: String,
    /// Extra detail for key operations (e.g. `tenant demo: v1 -> v2`).
    #[prost(string, tag = "12")]
    pub detail: String,
    /// The vault replica that served the call (config `audit.replica_id`,
    /// by default the host name): with several replicas on one database,
    /// which one to look at. Empty on records from before.
    #[prost(string, tag = "13")]
    pub replica: String,
}

/// One link of the chain as stored.
#[derive(Clone, PartialEq, prost::Message)]
pub struct AuditRecord {
    /// Position in the chain, from 1, without gaps.
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    /// Hash of the previous record (GENESIS for seq 1).
    #[prost(bytes = "vec", tag = "2")]
    pub prev_hash: Vec<u8>,
    /// This record's hash.
    #[prost(bytes = "vec", tag = "3")]
    pub hash: Vec<u8>,
    /// The encoded [`AuditBody`].
    #[prost(bytes = "vec", tag = "4")]
    pub body: Vec<u8>,
}

impl AuditRecord {
    /// Builds the record that follows `(prev_seq, prev_hash)`.
    pub fn next(prev_seq: u64, prev_hash: &[u8], body: Vec<u8>) -> AuditRecord {
        let seq = prev_seq + 1;
        AuditRecord {
            seq,
            prev_hash: prev_hash.to_vec(),
            hash: link_hash(seq, prev_hash, &body).to_vec(),
            body,
        }
    }

    /// Decodes the body.
    pub fn decode_body(&self) -> Option<AuditBody> {
        prost::Message::decode(self.body.as_slice()).ok()
    }
}

/// A signed statement "the chain up to `seq` ends in `hash`".
#[derive(Clone, PartialEq, prost::Message)]
pub struct Checkpoint {
    /// Sequence number covered.
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    /// Hash of record `seq`.
    #[prost(bytes = "vec", tag = "2")]
    pub hash: Vec<u8>,
    /// Signing time, ms since the epoch.
    #[prost(int64, tag = "3")]
    pub time_ms: i64,
    /// Ed25519 signature over [`checkpoint_message`].
    #[prost(bytes = "vec", tag = "4")]
    pub signature: Vec<u8>,
}

/// The chain link: `SHA-256("cardvault.audit.v1" | seq | prev_hash | body)`.
pub fn link_hash(seq: u64, prev_hash: &[u8], body: &[u8]) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(b"cardvault.audit.v1");
    ctx.update(&seq.to_be_bytes());
    ctx.update(prev_hash);
    ctx.update(body);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// The bytes a checkpoint signature covers.
pub fn checkpoint_message(seq: u64, hash: &[u8], time_ms: i64) -> Vec<u8> {
    let mut m = b"cardvault.audit.checkpoint.v1".to_vec();
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(hash);
    m.extend_from_slice(&time_ms.to_be_bytes());
    m
}

/// Signs a checkpoint for `(seq, hash)`.
pub fn sign_checkpoint(key: &Ed25519KeyPair, seq: u64, hash: &[u8], time_ms: i64) -> Checkpoint {
    Checkpoint {
        seq,
        hash: hash.to_vec(),
        time_ms,
        signature: key
            .sign(&checkpoint_message(seq, hash, time_ms))
            .as_ref()
            .to_vec(),
    }
}

/// The signing key's public half.
pub fn public_key(key: &Ed25519KeyPair) -> Vec<u8> {
    key.public_key().as_ref().to_vec()
}

/// Result of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VerifyReport {
    /// Records examined.
    pub records: u64,
    /// Checkpoints whose signature and hash were checked.
    pub checkpoints: u64,
    /// Highest verified checkpoint.
    pub last_checkpoint_seq: u64,
    /// First record that does not fit (0 when the log is intact).
    pub first_bad_seq: u64,
    /// What is wrong there (empty when intact).
    pub problem: String,
}

impl VerifyReport {
    /// True when nothing is wrong.
    pub fn ok(&self) -> bool {
        self.problem.is_empty()
    }
}

/// Incremental verifier: feed records in key order, then checkpoints.
pub struct Verifier {
    expected_seq: u64,
    prev_hash: Vec<u8>,
    /// Hashes by seq, only for seqs that have a checkpoint.
    wanted: std::collections::HashMap<u64, Vec<u8>>,
    public_key: Vec<u8>,
    report: VerifyReport,
    checkpoints: Vec<Checkpoint>,
}

impl Verifier {
    /// Starts verification; `checkpoints` and `public_key` come from the store
    /// and the unwrapped signing key.
    pub fn new(checkpoints: Vec<Checkpoint>, public_key: Vec<u8>) -> Self {
        Verifier {
            expected_seq: 1,
            prev_hash: GENESIS.to_vec(),
            wanted: checkpoints.iter().map(|c| (c.seq, Vec::new())).collect(),
            public_key,
            report: VerifyReport::default(),
            checkpoints,
        }
    }

    fn fail(&mut self, seq: u64, problem: String) {
        if self.report.ok() {
            self.report.first_bad_seq = seq;
            self.report.problem = problem;
        }
    }

    /// Whether a problem has been found (later records need not be read).
    pub fn failed(&self) -> bool {
        !self.report.ok()
    }

    /// Checks the next stored record. `key_seq` is the seq its storage key says.
    pub fn record(&mut self, key_seq: u64, r: &AuditRecord) {
        if self.failed() {
            return;
        }
        self.report.records += 1;
        let at = self.expected_seq;
        if key_seq != at {
            return self.fail(
                at,
                format!("record {at} is missing (next stored record is {key_seq})"),
            );
        }
        if r.seq != at {
            return self.fail(
                at,
                format!(
                    "record {at} claims to be record {} (moved or reordered)",
                    r.seq
                ),
            );
        }
        if r.prev_hash != self.prev_hash {
            return self.fail(
                at,
                format!(
                    "record {at} does not link to record {} (reordered or inserted)",
                    at - 1
                ),
            );
        }
        if link_hash(r.seq, &r.prev_hash, &r.body).as_slice() != r.hash.as_slice() {
            return self.fail(at, format!("record {at} was altered (hash mismatch)"));
        }
        if r.decode_body().is_none() {
            return self.fail(at, format!("record {at} does not decode"));
        }
        if let Some(h) = self.wanted.get_mut(&at) {
            *h = r.hash.clone();
        }
        self.prev_hash = r.hash.clone();
        self.expected_seq += 1;
    }

    /// Finishes: checks head agreement and every checkpoint.
    /// `head` is the store's head pointer `(seq, hash)`, if it keeps one.
    pub fn finish(mut self, head: Option<(u64, Vec<u8>)>) -> VerifyReport {
        let last = self.expected_seq - 1;
        if !self.failed()
            && let Some((hseq, hhash)) = head
            && (hseq != last || (hseq > 0 && hhash != self.prev_hash))
        {
            self.fail(
                last + 1,
                format!("the log ends at record {last} but its head says {hseq} (records removed from the end?)"),
            );
        }
        let key = UnparsedPublicKey::new(&ED25519, self.public_key.clone());
        let mut cps = std::mem::take(&mut self.checkpoints);
        cps.sort_by_key(|c| c.seq);
        for c in cps {
            let msg = checkpoint_message(c.seq, &c.hash, c.time_ms);
            if key.verify(&msg, &c.signature).is_err() {
                self.fail(
                    c.seq,
                    format!("checkpoint at record {} has an invalid signature", c.seq),
                );
                break;
            }
            if c.seq > last {
                if !self.failed() {
                    self.fail(
                        last + 1,
                        format!(
                            "signed checkpoint at record {} but the log ends at {last}",
                            c.seq
                        ),
                    );
                }
                break;
            }
            match self.wanted.get(&c.seq) {
                Some(h) if *h == c.hash => {
                    self.report.checkpoints += 1;
                    self.report.last_checkpoint_seq = c.seq;
                }
                // Records up to here verified link by link, yet differ from
                // what was signed: the chain was rewritten at or before c.seq.
                Some(h) if !h.is_empty() => {
                    let from = self.report.last_checkpoint_seq + 1;
                    self.report.first_bad_seq = from;
                    self.report.problem = format!(
                        "records {from}..={} were rewritten: they do not match the checkpoint signed at record {}",
                        c.seq, c.seq
                    );
                    break;
                }
                _ => break, // not reached: an earlier problem was reported
            }
        }
        self.report
    }
}

/// Verifies a whole log held in memory (tests and small logs).
pub fn verify(
    records: &[(u64, AuditRecord)],
    checkpoints: Vec<Checkpoint>,
    public_key: Vec<u8>,
    head: Option<(u64, Vec<u8>)>,
) -> VerifyReport {
    let mut v = Verifier::new(checkpoints, public_key);
    for (k, r) in records {
        v.record(*k, r);
    }
    v.finish(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Ed25519KeyPair {
        Ed25519KeyPair::from_seed_unchecked(&[7u8; 32]).unwrap()
    }

    fn body(i: u64) -> Vec<u8> {
        prost::Message::encode_to_vec(&AuditBody {
            action: "Detokenize".into(),
            token: format!("tok_{i}"),
            outcome: "OK".into(),
            ..Default::default()
        })
    }

    fn chain(n: u64, k: &Ed25519KeyPair, every: u64) -> (Vec<(u64, AuditRecord)>, Vec<Checkpoint>) {
        let mut recs = Vec::new();
        let mut cps = Vec::new();
        let (mut seq, mut prev) = (0, GENESIS.to_vec());
        for i in 0..n {
            let r = AuditRecord::next(seq, &prev, body(i));
            seq = r.seq;
            prev = r.hash.clone();
            if seq % every == 0 {
                cps.push(sign_checkpoint(k, seq, &r.hash, 0));
            }
            recs.push((seq, r));
        }
        (recs, cps)
    }

    fn head(recs: &[(u64, AuditRecord)]) -> Option<(u64, Vec<u8>)> {
        recs.last().map(|(s, r)| (*s, r.hash.clone()))
    }

    #[test]
    fn intact_chain_verifies() {
        let k = key();
        let (recs, cps) = chain(50, &k, 10);
        let rep = verify(&recs, cps, public_key(&k), head(&recs));
        assert!(rep.ok(), "{rep:?}");
        assert_eq!(
            (rep.records, rep.checkpoints, rep.last_checkpoint_seq),
            (50, 5, 50)
        );
    }

    #[test]
    fn edits_deletes_reorders_inserts_are_located() {
        let k = key();
        let (recs, cps) = chain(50, &k, 10);
        let pk = public_key(&k);
        // Edit.
        let mut r = recs.clone();
        r[20].1.body = body(999);
        let rep = verify(&r, cps.clone(), pk.clone(), head(&recs));
        assert_eq!(rep.first_bad_seq, 21, "{rep:?}");
        // Delete.
        let mut r = recs.clone();
        r.remove(30);
        assert_eq!(
            verify(&r, cps.clone(), pk.clone(), head(&recs)).first_bad_seq,
            31
        );
        // Reorder (swap contents, keys stay).
        let mut r = recs.clone();
        let (a, b) = (r[10].1.clone(), r[11].1.clone());
        r[10].1 = b;
        r[11].1 = a;
        assert_eq!(
            verify(&r, cps.clone(), pk.clone(), head(&recs)).first_bad_seq,
            11
        );
        // Insert a forged record at 5 and shift the rest (no rehash).
        let mut r: Vec<(u64, AuditRecord)> = recs.clone();
        let forged = AuditRecord::next(4, &recs[3].1.hash, body(777));
        r.insert(4, (5, forged));
        for (i, item) in r.iter_mut().enumerate().skip(5) {
            item.0 = i as u64 + 1;
        }
        assert_eq!(verify(&r, cps.clone(), pk.clone(), None).first_bad_seq, 6);
        // Rewrite from 15 on with valid links: caught by the checkpoint at 20.
        let mut r = recs[..14].to_vec();
        let (mut seq, mut prev) = (14, recs[13].1.hash.clone());
        for i in 0..36 {
            let rec = AuditRecord::next(seq, &prev, body(5000 + i));
            seq = rec.seq;
            prev = rec.hash.clone();
            r.push((seq, rec));
        }
        let rep = verify(&r, cps.clone(), pk.clone(), head(&r));
        assert_eq!(rep.first_bad_seq, 11, "{rep:?}");
        assert!(rep.problem.contains("rewritten"), "{rep:?}");
        // Truncation after the last checkpoint is caught by the head pointer.
        let r = recs[..45].to_vec();
        assert_eq!(
            verify(&r, cps.clone(), pk.clone(), head(&recs)).first_bad_seq,
            46
        );
        // Truncation below a checkpoint is caught by the checkpoint.
        let r = recs[..35].to_vec();
        assert_eq!(
            verify(&r, cps.clone(), pk.clone(), head(&r)).first_bad_seq,
            36
        );
        // A checkpoint signed by another key.
        let other = Ed25519KeyPair::from_seed_unchecked(&[9u8; 32]).unwrap();
        let mut bad = cps.clone();
        bad[1] = sign_checkpoint(&other, 20, &recs[19].1.hash, 0);
        assert_eq!(verify(&recs, bad, pk, head(&recs)).first_bad_seq, 20);
    }
}
