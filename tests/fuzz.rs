//! Fuzzing of the decoders that read outside input, on stable Rust with
//! proptest: random bytes and strings, and mutations of valid inputs
//! (flipped bits, cuts, splices). No input may panic; where a valid input
//! is mutated, what still decodes must be what was encoded. The number of
//! cases per property is proptest's (`PROPTEST_CASES`, 256 by default);
//! `.ci/run` runs a deeper, bounded pass. Decoders private to a module
//! (the audit journal's frames, audit buckets, the guard's state) are
//! fuzzed in that module's unit tests.

use cardvault::auth::policy::Policy;
use cardvault::card::{Brand, CardholderName, Cvv, Expiry, Pan, YearMonth};
use cardvault::crypto::custody::Recipient;
use cardvault::crypto::sealed::{self, SessionKey};
use cardvault::crypto::shamir;
use cardvault::fields::{Purpose, Tenant};
use cardvault::server::config::Config;
use cardvault::store::wal::{self, Mutation};
use cardvault::token::Token;
use cardvault::vault::collect::parse_payload;
use cardvault::vault::guard::BucketId;
use proptest::prelude::*;

const TODAY: YearMonth = YearMonth {
    year: 2026,
    month: 12,
};

fn mutation() -> impl Strategy<Value = Mutation> {
    (
        0u8..6,
        prop::collection::vec(any::<u8>(), 0..40),
        prop::option::of(prop::collection::vec(any::<u8>(), 0..600)),
    )
        .prop_map(|(tree, key, value)| Mutation { tree, key, value })
}

/// A log of valid frames, and its operations.
fn log() -> impl Strategy<Value = (Vec<u8>, Vec<Vec<Mutation>>)> {
    prop::collection::vec(prop::collection::vec(mutation(), 1..4), 1..12).prop_map(|ops| {
        let mut buf = Vec::new();
        for op in &ops {
            wal::encode_frame(op, &mut buf);
        }
        (buf, ops)
    })
}

/// Text that looks enough like the real thing to get past first checks:
/// digits, separators, letters, and a few odd characters.
fn cardish() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9 -]{0,40}",
        "[0-9]{12,19}",
        "tok_[A-Za-z0-9_-]{0,30}",
        any::<String>(),
        "[\\PC]{0,40}",
    ]
}

proptest! {
    #[test]
    fn log_frames_decode_without_panic(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let (_, valid) = wal::decode_frames(&bytes);
        prop_assert!(valid <= bytes.len());
        let _ = wal::end_of(&bytes, valid);
        let _ = wal::frame_spans(&bytes);
    }

    /// A damaged log decodes to a prefix of what was written, and the
    /// damage is never called clean.
    #[test]
    fn damaged_logs_decode_to_a_prefix((buf, ops) in log(), at in any::<prop::sample::Index>(), bit in 0u8..8, cut in any::<bool>()) {
        let mut bad = buf.clone();
        let i = at.index(bad.len());
        if cut {
            bad.truncate(i);
        } else {
            bad[i] ^= 1 << bit;
        }
        let (got, valid) = wal::decode_frames(&bad);
        prop_assert!(got.len() <= ops.len());
        prop_assert_eq!(&got[..], &ops[..got.len()]);
        if got.len() < ops.len() && !cut {
            prop_assert_ne!(wal::end_of(&bad, valid), wal::End::Clean);
        }
    }

    #[test]
    fn card_fields_parse_without_panic(s in cardish(), month in any::<u32>(), year in any::<u32>()) {
        if let Ok(p) = Pan::parse(&s) {
            // A parsed card never shows more than its visible digits.
            let shown = format!("{p:?}");
            prop_assert!(!shown.contains(p.expose()));
            let _ = Cvv::parse(&s, p.brand());
        }
        let _ = Cvv::parse(&s, Brand::Amex);
        let _ = CardholderName::parse(&s);
        let _ = Expiry::new(month, year, TODAY);
        let _ = Token::parse(&s);
        let _ = Tenant::parse(&s);
        let _ = Purpose::parse(&s);
        let _ = BucketId::parse(&s);
    }

    /// Errors about a card number never carry its digits.
    #[test]
    fn card_number_errors_never_echo_the_input(s in "[0-9]{12,19}") {
        if let Err(e) = Pan::parse(&s) {
            prop_assert!(!e.to_string().contains(&s));
        }
    }

    #[test]
    fn policy_and_config_files_parse_without_panic(text in prop_oneof![
        any::<String>(),
        "(\\[[a-z_.]{1,12}\\]\n)?([a-z_]{1,16} = (\"[a-z0-9 :/._-]{0,20}\"|[0-9]{1,12}|true|\\[\"[a-z]{1,8}\"\\])\n){0,6}",
    ]) {
        let _ = Policy::from_toml(&text);
        if let Ok(c) = Config::from_toml(&text) {
            let _ = c.validate();
        }
    }

    #[test]
    fn key_shares_and_recipients_decode_without_panic(text in prop_oneof![
        any::<String>(),
        "cvs[0-9]:[0-9a-f:|a-z=+/]{0,120}",
        "age1[a-z0-9]{0,70}",
    ]) {
        let _ = shamir::decode_share(&text);
        let _ = Recipient::parse(&text);
    }

    /// A share's text, damaged anywhere, is refused, or decodes to a share
    /// that no longer authenticates, or (a change of spelling only, such
    /// as the case of a hex digit) to exactly the share it was.
    #[test]
    fn damaged_key_shares_do_not_authenticate(at in any::<prop::sample::Index>(), to in any::<char>()) {
        let kek = [9u8; 32];
        let binding = shamir::Binding {
            vault_id: "0123456789abcdef".into(),
            generation: 2,
            threshold: 2,
            custodian: "alice@example".into(),
        };
        let shares = shamir::split(&[7u8; 32], 2, 3).unwrap();
        let text = shamir::encode_share(&kek, &binding, &shares[0]);
        let chars: Vec<char> = text.chars().collect();
        let i = at.index(chars.len());
        prop_assume!(chars[i] != to);
        let mut bad = chars.clone();
        bad[i] = to;
        let bad: String = bad.into_iter().collect();
        if let Ok(decoded) = shamir::decode_share(&bad)
            && decoded.authentic(&kek)
        {
            prop_assert_eq!(&decoded.binding, &binding);
            prop_assert_eq!(decoded.share.x, shares[0].x);
            prop_assert_eq!(&decoded.share.y[..], &shares[0].y[..]);
        }
    }

    #[test]
    fn sealed_cards_are_refused_without_panic(text in prop_oneof![
        any::<String>(),
        "v1\\.[A-Za-z0-9_-]{0,200}",
    ]) {
        let (key, _) = SessionKey::derive(&[1u8; 32]);
        prop_assert!(key.open(&text, "demo", "cs_AAAAAAAAAAAAAAAAAAAAAA").is_err());
    }

    /// A seal altered anywhere does not open; the untouched one does.
    #[test]
    fn altered_seals_do_not_open(at in any::<prop::sample::Index>(), to in "[A-Za-z0-9_=.-]") {
        let (key, public) = SessionKey::derive(&[2u8; 32]);
        let good = sealed::seal(&public, "demo", "cs_x", br#"{"pan":"4111111111111111","exp_month":1,"exp_year":2030}"#).unwrap();
        prop_assert!(key.open(&good, "demo", "cs_x").is_ok());
        let mut bad: Vec<char> = good.chars().collect();
        let i = at.index(bad.len());
        let to = to.chars().next().unwrap();
        prop_assume!(bad[i] != to);
        bad[i] = to;
        let bad: String = bad.into_iter().collect();
        prop_assert!(key.open(&bad, "demo", "cs_x").is_err());
    }

    #[test]
    fn sealed_card_payloads_parse_without_panic_or_echo(bytes in prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300),
        "\\{(\"(pan|exp_month|exp_year|cvv|name|x)\":(\"[0-9 \\\\\"a-z-]{0,20}\"|-?[0-9]{1,12}|null|true|\\[\\]),?){0,6}\\}".prop_map(String::into_bytes),
    ]) {
        if let Err(e) = parse_payload(&bytes, TODAY) {
            let text = String::from_utf8_lossy(&bytes);
            // No run of 12 or more digits from the input is in the error.
            let msg = e.to_string();
            for w in text.split(|c: char| !c.is_ascii_digit()).filter(|w| w.len() >= 12) {
                prop_assert!(!msg.contains(w), "{msg}");
            }
        }
    }
}
