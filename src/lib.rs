//! # cardvault
//!
//! A tokenised card vault. Merchant backends exchange card numbers (PANs)
//! for tokens; only payment processors can exchange tokens back; CVVs are
//! never persisted.
//!
//! ## Features
//! * gRPC API (`cardvault.v1.TokenService`) over TLS with client
//!   certificates, plus standard gRPC health and reflection.
//! * PANs encrypted at rest with AES-256-GCM under per-tenant data keys,
//!   themselves wrapped by a key-encrypting key (KEK). Every ciphertext is
//!   bound to its tenant, token and key version by associated data.
//! * Keyed (HMAC-SHA256) per-tenant fingerprints and optional de-duplication.
//! * Opaque tokens (128 random bits) or format-preserving tokens that keep
//!   the last four digits and always fail the Luhn check.
//! * CVVs held in memory only: short TTL, single read, bounded, zeroized.
//! * Secrets are types ([`card::Pan`], [`card::Cvv`], [`crypto::keys::SecretKey`])
//!   that wipe themselves and print masked.
//! * Roles (merchant, processor, admin, auditor) and tenant grants from a
//!   policy file, reloadable on SIGHUP; TLS 1.3 only with mandatory client
//!   certificates; per-principal detokenize budgets.
//! * A tamper-evident audit log: every operation, hash-chained in the same
//!   transaction as the data, signed Ed25519 checkpoints, verification that
//!   locates the first bad record, and a blast-radius report per principal.
//!   Reads fail closed when their audit record cannot be written.
//! * Key custody: a KEK split into Shamir key shares (sealed start, unseal by
//!   custodians), versioned per-tenant data keys with manual and automatic
//!   rotation, online resumable rewrap, retirement, master key rotation.
//! * Embedded storage (sled behind the vault's own write-ahead log, with
//!   group-committed durable writes and crash replay, and an append-only
//!   audit journal file beside it), or PostgreSQL for
//!   many stateless replicas on one database.
//!
//! ## Non-features
//! * No card-network connectivity: the vault stores and returns cards, it
//!   does not authorise payments.
//! * No CVV persistence, ever, and no CVV survives a restart.
//! * No plaintext (non-TLS) listener.
//! * No web UI; operations use the `cardvault` CLI or any gRPC client.
//! * No wiping of copies held inside libraries (tonic/prost/rustls buffers,
//!   `ring` key schedules); core dumps are disabled instead, and `mlockall`
//!   is available.
//!
//! ## Design
//! Requests flow one way: `grpc` (protobuf <-> domain types, errors ->
//! status codes) -> [`auth`] (who may do what, for which tenant) ->
//! [`vault::Vault`] (the domain core, no I/O types) -> [`crypto`], [`store`],
//! [`vault::cvv`], [`audit`]. Nothing below `grpc` knows about tonic.
//! See `docs/security.md` for the threat model and `docs/operations.md`
//! for operations.

#![forbid(unsafe_code)]
// Process hardening (src/server/hardening.rs) uses rustix's safe syscall wrappers,
// so not even that needs `unsafe`.
#![warn(missing_docs)]
// A `pub` item that no one outside the crate can reach says more than it
// means: such items are `pub(crate)`.
#![warn(unreachable_pub)]

pub mod audit;
pub mod auth;
pub mod card;
pub mod cli;

pub mod crypto;
pub mod error;
pub mod fields;
pub(crate) mod grpc;
pub mod server;

pub mod store;
mod sync;
pub mod time;
pub mod token;
pub mod vault;

/// Generated protobuf and gRPC code for `cardvault.v1`.
#[allow(missing_docs)]
pub mod proto {
    tonic::include_proto!("cardvault.v1");

    /// Encoded descriptors of every message and service, for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("cardvault_descriptor");
}

pub use error::{Error, Result};
pub use vault::Vault;
