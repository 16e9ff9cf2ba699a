//! The tokenize enumeration oracle, tried as an attacker on the app tier
//! would: with a merchant certificate and a token only. Metadata shows the
//! BIN, last four, brand and length; tokenizing every card number that fits
//! and comparing fingerprint, `existing` and token would single out the
//! stored card. These tests perform that attack and check that no answer
//! tells the true candidate from the others, and that legitimate loads are
//! not refused.

mod common;

use cardvault::card::{luhn_valid, with_check_digit};
use cardvault::proto::{
    GetMetadataRequest, TokenFormat, TokenizeBatchItem, TokenizeBatchRequest, TokenizeRequest,
    tokenize_batch_result,
};
use common::{Opts, VaultProcess, exp_year};
use tonic::Code;

fn start() -> (tempfile::TempDir, VaultProcess) {
    let dir = tempfile::tempdir().unwrap();
    let v = VaultProcess::start(&dir.path().join("data"), &Opts::default());
    (dir, v)
}

/// A small seeded generator (xorshift64*), so a failure names its seed.
struct Rng(u64);

impl Rng {
    fn from_time() -> Rng {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1;
        eprintln!("rng seed {seed}");
        Rng(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn digits(&mut self, n: usize) -> String {
        (0..n)
            .map(|_| char::from(b'0' + self.below(10) as u8))
            .collect()
    }
    /// A random valid 16-digit Visa or Mastercard number.
    fn card(&mut self) -> String {
        let prefix = if self.below(2) == 0 {
            format!("4{}", self.digits(14))
        } else {
            format!("5{}{}", 1 + self.below(5), self.digits(13))
        };
        with_check_digit(&prefix)
    }
}

fn tokenize_req(pan: &str, format: TokenFormat, dedupe: bool) -> TokenizeRequest {
    TokenizeRequest {
        tenant: "demo".into(),
        pan: pan.into(),
        exp_month: 12,
        exp_year: exp_year(),
        format: format as i32,
        dedupe,
        ..Default::default()
    }
}

/// Every Luhn-valid card number with `head` in front, `last4` at the end
/// and `len` digits, in a random order, with `truth` placed at index
/// `at` (0-based) of the first `count`.
fn candidates(
    rng: &mut Rng,
    head: &str,
    last4: &str,
    len: usize,
    truth: &str,
    at: usize,
    count: usize,
) -> Vec<String> {
    let middle = len - head.len() - 4;
    let mut out = Vec::new();
    while out.len() < count - 1 {
        let pan = format!("{head}{}{last4}", rng.digits(middle));
        if luhn_valid(&pan) && pan != truth && !out.contains(&pan) {
            out.push(pan);
        }
    }
    out.insert(at, truth.to_owned());
    out
}

/// What a caller can see of one tokenize answer, reduced to what could
/// single out the stored card: for an answer, whether it matches the
/// target in fingerprint, token or `existing`; for a refusal, its code
/// and text.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Answer {
        same_fingerprint: bool,
        same_token: bool,
        existing: bool,
    },
    Refused(Code, String),
}

/// Performs the attack on the token of `truth` (tokenized with `format`)
/// with the merchant identity only, and returns what each candidate's
/// tokenizes showed and the true candidate's index.
async fn attack(v: &VaultProcess, rng: &mut Rng, truth: &str, format: TokenFormat) {
    let mut merchant = v.client("merchant").await;
    // The card as the vault's user stored it earlier.
    let token = merchant
        .tokenize(tokenize_req(truth, format, false))
        .await
        .unwrap()
        .into_inner()
        .token;
    // The attacker: a merchant identity and the token.
    let meta = merchant
        .get_metadata(GetMetadataRequest {
            tenant: "demo".into(),
            token: token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let len = match meta.brand.as_str() {
        "AMEX" => 15,
        _ => 16,
    };
    let head = if format == TokenFormat::FormatPreservingKeepBin {
        // What the token itself shows: the first six digits.
        assert_eq!(token.len(), len);
        token[..6].to_owned()
    } else {
        meta.bin.clone()
    };
    assert_eq!(head, truth[..6], "metadata shows the BIN");
    assert_eq!(meta.last4, truth[len - 4..]);
    let at = 9 + rng.below(51) as usize; // the 10th to the 60th
    let list = candidates(rng, &head, &meta.last4, len, truth, at, 64);
    let mut seen = Vec::new();
    for pan in &list {
        let mut answers = Vec::new();
        // With dedupe first: a wrong card is then new to the tenant, so
        // `existing` could only come from the stored card.
        for dedupe in [true, false] {
            let r = merchant.tokenize(tokenize_req(pan, format, dedupe)).await;
            answers.push(match r {
                Ok(r) => {
                    let r = r.into_inner();
                    Seen::Answer {
                        same_fingerprint: r.fingerprint == meta.fingerprint,
                        same_token: r.token == token,
                        existing: r.existing,
                    }
                }
                Err(s) => Seen::Refused(s.code(), s.message().to_owned()),
            });
        }
        seen.push(answers);
    }
    let tells = |s: &Seen| {
        matches!(s, Seen::Answer { same_fingerprint, same_token, existing }
            if *same_fingerprint || *same_token || *existing)
    };
    for (i, answers) in seen.iter().enumerate() {
        assert!(
            !answers.iter().any(tells),
            "candidate {} of {} ({}) was singled out: {answers:?}",
            i + 1,
            list.len(),
            if i == at {
                "the true card"
            } else {
                "a wrong card"
            }
        );
    }
    // The true card's answers are those of the wrong cards around it.
    assert_eq!(seen[at], seen[at - 1], "true card vs the one before");
    assert_eq!(seen[at], seen[at + 1], "true card vs the one after");
    // The guard refused, and said so without digits.
    for answers in &seen[at - 1..=at + 1] {
        for a in answers {
            match a {
                Seen::Refused(code, msg) => {
                    assert_eq!(*code, Code::ResourceExhausted);
                    assert!(!msg.contains(&meta.last4) && !msg.contains(&head), "{msg}");
                }
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
    }
}

#[tokio::test]
async fn a_merchant_cannot_single_out_a_visa_card_by_tokenizing_candidates() {
    let (_d, v) = start();
    let mut rng = Rng::from_time();
    let truth = with_check_digit(&format!("411111{}", rng.digits(9)));
    attack(&v, &mut rng, &truth, TokenFormat::Opaque).await;
}

#[tokio::test]
async fn a_merchant_cannot_single_out_an_amex_card_by_tokenizing_candidates() {
    let (_d, v) = start();
    let mut rng = Rng::from_time();
    let truth = with_check_digit(&format!("378282{}", rng.digits(8)));
    attack(&v, &mut rng, &truth, TokenFormat::Opaque).await;
}

#[tokio::test]
async fn a_merchant_cannot_single_out_a_card_from_a_keep_bin_token() {
    let (_d, v) = start();
    let mut rng = Rng::from_time();
    let truth = with_check_digit(&format!("555555{}", rng.digits(9)));
    attack(&v, &mut rng, &truth, TokenFormat::FormatPreservingKeepBin).await;
}

/// Tokenizes `pans` in batches of 1,000 as the dev merchant and returns
/// every item error.
async fn batch_errors(v: &VaultProcess, pans: &[String], dedupe: bool) -> Vec<String> {
    batch_results(v, pans, dedupe)
        .await
        .into_iter()
        .filter_map(Result::err)
        .collect()
}

/// One result per card (a whole-batch refusal as one error).
async fn batch_results(v: &VaultProcess, pans: &[String], dedupe: bool) -> Vec<Result<(), String>> {
    let mut merchant = v.client("merchant").await;
    let mut out = Vec::new();
    for chunk in pans.chunks(1000) {
        let items = chunk
            .iter()
            .enumerate()
            .map(|(i, p)| TokenizeBatchItem {
                reference: i.to_string(),
                pan: p.clone(),
                exp_month: 12,
                exp_year: exp_year(),
                ..Default::default()
            })
            .collect();
        let res = merchant
            .tokenize_batch(TokenizeBatchRequest {
                tenant: "demo".into(),
                items,
                format: TokenFormat::Opaque as i32,
                dedupe,
            })
            .await;
        match res {
            Ok(r) => {
                for item in r.into_inner().results {
                    out.push(match item.result {
                        Some(tokenize_batch_result::Result::Error(e)) => {
                            Err(format!("{}: {}", e.code, e.message))
                        }
                        _ => Ok(()),
                    });
                }
            }
            Err(s) => out.push(Err(format!("whole batch: {s:?}"))),
        }
    }
    out
}

#[tokio::test]
async fn legitimate_loads_pass_the_dev_policy() {
    let (_d, v) = start();
    legitimate_loads(&v).await;
}

/// The `[defaults]` of the documented production policy, applied to the
/// dev principals.
#[tokio::test]
async fn legitimate_loads_pass_the_production_example_policy() {
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/policy.example.toml"
    ))
    .unwrap();
    let defaults: Vec<&str> = example
        .split("[defaults]\n")
        .nth(1)
        .unwrap()
        .lines()
        .take_while(|l| !l.starts_with('['))
        .filter(|l| l.contains('=') && !l.starts_with('#'))
        .collect();
    assert!(
        defaults
            .iter()
            .any(|l| l.starts_with("tokenize_collision_burst"))
    );
    let (_d, v) = start_with_defaults(&defaults.join("\n"), Vec::new());
    legitimate_loads(&v).await;
}

/// 20,000 distinct cards, one card 50 times with dedupe, then two batches
/// of 1,000 back to back: no refusal.
async fn legitimate_loads(v: &VaultProcess) {
    let mut rng = Rng::from_time();
    let mut pans: Vec<String> = Vec::new();
    while pans.len() < 20_000 {
        let p = rng.card();
        if !pans.contains(&p) {
            pans.push(p);
        }
    }
    // 20,000 distinct cards from one merchant.
    let errors = batch_errors(v, &pans, false).await;
    assert!(
        errors.is_empty(),
        "{} refused: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    // One card re-tokenized 50 times with dedupe.
    let mut merchant = v.client("merchant").await;
    let again = rng.card();
    for i in 0..50 {
        let r = merchant
            .tokenize(tokenize_req(&again, TokenFormat::Opaque, true))
            .await
            .unwrap_or_else(|s| panic!("re-tokenize {i} refused: {s:?}"))
            .into_inner();
        assert_eq!(r.existing, i > 0);
    }
    // Two batches of 1,000 distinct new cards, back to back.
    let fresh: Vec<String> = (0..2000).map(|_| rng.card()).collect();
    let start = std::time::Instant::now();
    let errors = batch_errors(v, &fresh, true).await;
    eprintln!("two batches of 1,000 took {:?}", start.elapsed());
    assert!(
        errors.is_empty(),
        "{} refused: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
}

/// A wrong card with the visible digits of `truth` (same first six, last
/// four and length), different from every card in `taken`.
fn neighbour(rng: &mut Rng, truth: &str, taken: &[String]) -> String {
    loop {
        let len = truth.len();
        let pan = format!(
            "{}{}{}",
            &truth[..6],
            rng.digits(len - 10),
            &truth[len - 4..]
        );
        if luhn_valid(&pan) && pan != truth && !taken.contains(&pan) {
            return pan;
        }
    }
}

/// Starts a dev vault whose policy has these `[defaults]` lines added.
fn start_with_defaults(
    defaults: &str,
    env: Vec<(String, String)>,
) -> (tempfile::TempDir, VaultProcess) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    // Each line replaces the dev policy's own value of that setting.
    let mut policy: String = cardvault::server::pki::dev_policy_toml()
        .lines()
        .filter(|l| {
            !defaults
                .lines()
                .any(|d| l.starts_with(d.split('=').next().unwrap()))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    policy = policy.replacen("[defaults]\n", &format!("[defaults]\n{defaults}\n"), 1);
    std::fs::write(data.join("policy.toml"), policy).unwrap();
    let v = VaultProcess::start(
        &data,
        &Opts {
            env,
            ..Default::default()
        },
    );
    (dir, v)
}

async fn tokenize(v: &VaultProcess, who: &str, pan: &str) -> Result<String, tonic::Status> {
    let mut c = v.client(who).await;
    let mut req = tokenize_req(pan, TokenFormat::Opaque, true);
    if who == "other-merchant" {
        req.tenant = String::new();
    }
    c.tokenize(req).await.map(|r| r.into_inner().token)
}

/// Wide guessing: a few guesses against each of many stored cards stays
/// under every bucket's threshold, so the collision budget bounds it. Once
/// it is spent, every tokenize of that principal is refused alike, a
/// stored card's and a card new to the tenant's included; other
/// principals go on.
#[tokio::test]
async fn wide_guessing_spends_the_collision_budget_then_every_tokenize_is_refused() {
    let (_d, v) = start_with_defaults(
        "tokenize_collision_per_second = 0.001\ntokenize_collision_burst = 5",
        vec![("CARDVAULT_METRICS_LISTEN".into(), "127.0.0.1:0".into())],
    );
    let mut rng = Rng::from_time();
    let targets: Vec<String> = (0..8).map(|_| rng.card()).collect();
    for t in &targets {
        // New cards in empty buckets: no collision, never charged.
        tokenize(&v, "merchant", t).await.unwrap();
    }
    // One guess per stored card: each is a new card in an occupied bucket.
    let mut refusals = Vec::new();
    for (i, t) in targets.iter().enumerate() {
        let guess = neighbour(&mut rng, t, &targets);
        match tokenize(&v, "merchant", &guess).await {
            Ok(_) => assert!(i < 5, "guess {i} passed a spent budget"),
            Err(s) => {
                assert!(i >= 5, "guess {i} refused early: {s:?}");
                refusals.push(s);
            }
        }
    }
    assert_eq!(refusals.len(), 3);
    // Spent: a stored card and a brand-new card are refused the same way.
    for pan in [targets[7].clone(), rng.card()] {
        let s = tokenize(&v, "merchant", &pan).await.unwrap_err();
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert!(
            s.message().contains("collision budget exceeded") && s.message().contains("retry in"),
            "{s:?}"
        );
    }
    // Another principal has its own budget.
    tokenize(&v, "other-merchant", &rng.card()).await.unwrap();
    // Audited with the principal, and counted.
    let refused: Vec<_> = v
        .audit_events("Tokenize")
        .await
        .into_iter()
        .filter(|e| e.outcome == "RESOURCE_EXHAUSTED")
        .collect();
    assert_eq!(refused.len(), 5);
    assert!(refused.iter().all(|e| e.principal.contains("merchant")));
    let metrics = v.http_get("/metrics").await;
    assert!(
        metrics.contains("cardvault_tokenize_rate_limited_total 5"),
        "{metrics}"
    );
}

/// The plain tokenize budget counts every valid card, batch items one by
/// one; bad input is refused as such and never charged.
#[tokio::test]
async fn the_tokenize_budget_counts_batch_items_and_not_bad_input() {
    let (_d, v) = start_with_defaults(
        "tokenize_per_second = 0.001\ntokenize_burst = 10",
        Vec::new(),
    );
    let mut rng = Rng::from_time();
    let mut merchant = v.client("merchant").await;
    // Bad input: INVALID_ARGUMENT, and nothing spent.
    for _ in 0..20 {
        let s = merchant
            .tokenize(tokenize_req("4111111111111112", TokenFormat::Opaque, false))
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    }
    // A batch of 11 valid cards does not fit a budget of 10 ...
    let eleven: Vec<String> = (0..11).map(|_| rng.card()).collect();
    let errors = batch_errors(&v, &eleven, false).await;
    assert!(
        errors.len() == 1 && errors[0].contains("tokenize budget exceeded"),
        "{errors:?}"
    );
    // ... 10 do, and then the budget is spent.
    assert!(batch_errors(&v, &eleven[..10], false).await.is_empty());
    let s = merchant
        .tokenize(tokenize_req(&rng.card(), TokenFormat::Opaque, false))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
}

/// A batch is no way around the guard: its items count one by one, and
/// those past the threshold are refused like single calls.
#[tokio::test]
async fn a_batch_of_candidates_is_stopped_at_the_threshold() {
    let (_d, v) = start();
    let mut rng = Rng::from_time();
    let truth = rng.card();
    tokenize(&v, "merchant", &truth).await.unwrap();
    let mut list = Vec::new();
    while list.len() < 30 {
        let n = neighbour(&mut rng, &truth, &list);
        list.push(n);
    }
    list.insert(20, truth.clone());
    let results = batch_results(&v, &list, true).await;
    // The stored card plus 7 candidates fill the bucket; every other
    // candidate is refused by the guard. (Whether the stored card's item
    // is answered depends on whether it is reached before the bucket
    // locks, as for single calls: it is one of the 8 the window allows.)
    let wrong: Vec<_> = results
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 20)
        .map(|(_, r)| r)
        .collect();
    assert_eq!(wrong.iter().filter(|r| r.is_ok()).count(), 7, "{results:?}");
    assert!(
        wrong
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| e.contains("enumeration guard")),
        "{results:?}"
    );
}

/// A bucket locked by the guard stays locked across a restart, is audited
/// and logged (without digits) and counted, and an admin can clear it.
#[tokio::test]
async fn a_locked_bucket_survives_a_restart_and_an_admin_clears_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let opts = Opts {
        env: vec![("CARDVAULT_METRICS_LISTEN".into(), "127.0.0.1:0".into())],
        ..Default::default()
    };
    let v = VaultProcess::start(&data, &opts);
    let mut rng = Rng::from_time();
    let truth = rng.card();
    tokenize(&v, "merchant", &truth).await.unwrap();
    let mut wrong = Vec::new();
    let refusal = loop {
        let n = neighbour(&mut rng, &truth, &wrong);
        wrong.push(n.clone());
        if let Err(s) = tokenize(&v, "merchant", &n).await {
            break s;
        }
    };
    assert_eq!(
        wrong.len(),
        8,
        "the stored card and 7 others fill a bucket of 8"
    );
    assert_eq!(refusal.code(), Code::ResourceExhausted);
    let msg = refusal.message().to_owned();
    let bucket = msg
        .split("(bucket ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .expect("the refusal names the bucket")
        .to_owned();
    // The stored card is refused with the same text.
    assert_eq!(
        tokenize(&v, "merchant", &truth)
            .await
            .unwrap_err()
            .message(),
        msg
    );
    // A security event without digits, an audit record and a metric.
    let logs = v.logs();
    let event = logs
        .lines()
        .find(|l| l.contains("enumeration_lock"))
        .expect("security event logged");
    assert!(
        event.contains(&bucket) && event.contains("merchant"),
        "{event}"
    );
    assert!(
        !event.contains(&truth[..6]) && !event.contains(&truth[12..]),
        "{event}"
    );
    let locks = v.audit_events("EnumerationLock").await;
    assert_eq!(locks.len(), 1);
    assert!(locks[0].principal.contains("merchant") && locks[0].detail.contains(&bucket));
    assert!(
        v.http_get("/metrics")
            .await
            .contains("cardvault_enumeration_locks_total 1")
    );
    v.stop().await;

    // Restarted: still locked, for the stored card too.
    let v = VaultProcess::start(&data, &opts);
    let s = tokenize(&v, "merchant", &truth).await.unwrap_err();
    assert_eq!(s.message(), msg);
    // A malformed bucket is refused as such.
    let mut keys =
        cardvault::proto::key_service_client::KeyServiceClient::new(v.channel("admin").await);
    let bad = keys
        .clear_enumeration_guard(cardvault::proto::ClearEnumerationGuardRequest {
            tenant: "demo".into(),
            bucket: "0123".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().starts_with("bucket: "), "{bad:?}");
    // A merchant may not clear it.
    let denied =
        cardvault::proto::key_service_client::KeyServiceClient::new(v.channel("merchant").await)
            .clear_enumeration_guard(cardvault::proto::ClearEnumerationGuardRequest {
                tenant: "demo".into(),
                bucket: bucket.clone(),
            })
            .await
            .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    // The admin clears it with the CLI.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cardvault"))
        .args([
            "keys",
            "clear-guard",
            "--tenant",
            "demo",
            "--bucket",
            &bucket,
        ])
        .args([
            "--addr",
            &format!("https://{}", v.addr),
            "--server-name",
            "localhost",
        ])
        .arg("--dev-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("cleared for 1 bucket"));
    tokenize(&v, "merchant", &truth).await.unwrap();
    let cleared = v.audit_events("ClearEnumerationGuard").await;
    assert_eq!(cleared.len(), 3, "the malformed, the denied and the clear");
    assert!(
        cleared
            .iter()
            .any(|e| e.outcome == "OK" && e.detail.contains(&bucket))
    );
}

/// A budget that admits everything and records what it was asked.
#[derive(Default)]
struct Recorded(std::sync::Mutex<Vec<bool>>);

impl cardvault::vault::TokenizeBudget for Recorded {
    fn admit(&self, collision: bool) -> cardvault::Result<()> {
        self.0.lock().unwrap().push(collision);
        Ok(())
    }
}

/// A bucket's first card writes no guard state (its index entry marks the
/// bucket), yet counts: the next card into the bucket is charged as a
/// collision and the state written then starts from the first card, so
/// the bucket still locks at the threshold, the first card included.
#[tokio::test]
async fn a_buckets_first_card_writes_no_state_and_still_counts() {
    use cardvault::vault::{CallContext, NewCard, TokenizeOptions, Vault, VaultConfig};
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(common::flaky::Flaky::open(dir.path()));
    let v = Vault::new(
        store.clone() as std::sync::Arc<dyn cardvault::store::Store>,
        VaultConfig::default(),
    );
    v.unseal(cardvault::crypto::keys::SecretKey::generate())
        .await
        .unwrap();
    let (ctx, tenant) = (
        CallContext::default(),
        cardvault::fields::Tenant::parse("shop").unwrap(),
    );
    let budget = Recorded::default();
    let swaps = || store.guard_swaps.load(std::sync::atomic::Ordering::SeqCst);
    let tokenize = |pan: String, dedupe: bool| {
        let opts = TokenizeOptions {
            dedupe,
            ..TokenizeOptions::default()
        };
        v.tokenize(&ctx, &tenant, NewCard::sample(&pan), opts, &budget)
    };
    let first = "4111111111111111".to_owned();
    tokenize(first.clone(), false).await.unwrap();
    assert_eq!(swaps(), 0, "a bucket's first card writes no guard state");
    let again = tokenize(first.clone(), true).await.unwrap();
    assert!(again.existing);
    // A card of another bucket is a first card too.
    tokenize("5555555555554444".to_owned(), false)
        .await
        .unwrap();
    assert_eq!(swaps(), 0);
    assert_eq!(*budget.0.lock().unwrap(), [false, false, false]);

    // The second card into the first card's bucket is a collision, and
    // the state is written from then on.
    let mut rng = Rng::from_time();
    let mut taken = vec![first.clone()];
    let second = neighbour(&mut rng, &first, &taken);
    taken.push(second.clone());
    tokenize(second.clone(), false).await.unwrap();
    assert_eq!(budget.0.lock().unwrap().last(), Some(&true));
    assert_eq!(swaps(), 1);

    // With the first card counted, 6 more cards reach the threshold of 8
    // and the next one locks the bucket, for every card in it.
    for _ in 0..6 {
        let pan = neighbour(&mut rng, &first, &taken);
        taken.push(pan.clone());
        tokenize(pan, false).await.unwrap();
    }
    let ninth = neighbour(&mut rng, &first, &taken);
    let refused = tokenize(ninth, false).await.unwrap_err();
    assert!(
        matches!(refused, cardvault::Error::ResourceExhausted(_)),
        "{refused:?}"
    );
    let also = tokenize(first, true).await.unwrap_err();
    assert_eq!(also, refused, "the first card gets the same refusal");
}
