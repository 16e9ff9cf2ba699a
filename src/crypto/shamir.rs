//! Shamir secret sharing over GF(2^8), used to split the vault's 32-byte
//! key-encrypting key (KEK) into `N` custodian shares of which any `M`
//! recover it (split knowledge and dual control: no single person ever holds
//! the KEK, and fewer than `M` custodians learn nothing about it).
//!
//! Every byte of the secret is shared independently: byte `i` is the
//! constant term of a random polynomial of degree `M - 1`, and share `x`
//! holds that polynomial evaluated at `x`. Any `M` points fix the polynomial,
//! so Lagrange interpolation at `x = 0` gives the byte back; `M - 1` points
//! are consistent with every possible constant term, equally often.
//!
//! Errors are plain strings that never contain secret or share bytes, nor
//! any of the share text they were given, so they are safe to log.
//!
//! This module deliberately depends on nothing else in the crate, so that
//! it can be reviewed and tested on its own.

use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

/// Version tag at the start of every share text; bumping it lets a future
/// format be told apart instead of being misread.
const TEXT_PREFIX: &str = "cvs1-";

/// Domain separation for the share checksum, so the digest can never be
/// confused with a SHA-256 computed elsewhere over similar bytes.
const CHECK_DOMAIN: &str = "cardvault-share-v1";

/// Length of a vault id in the share text: 8 bytes as lowercase hex.
const VAULT_ID_LEN: usize = 16;

// ---------------------------------------------------------------------------
// GF(2^8) arithmetic
// ---------------------------------------------------------------------------

/// The AES reduction polynomial x^8 + x^4 + x^3 + x + 1, without its x^8 bit
/// (that bit is the one shifted out of the byte before reducing).
const REDUCTION: u8 = 0x1b;

/// Builds the exponent and logarithm tables for generator 0x03.
///
/// 0x03 rather than 0x02 because 0x02 does not generate the whole
/// multiplicative group modulo 0x11b (its order is 51), while 0x03 has
/// order 255. The exponent table is doubled to 510 entries (plus padding)
/// so that `log a + log b` never needs reducing modulo 255.
const fn build_tables() -> ([u8; 512], [u8; 256]) {
    let mut exp = [0u8; 512];
    let mut log = [0u8; 256];
    let mut value: u8 = 1;
    let mut i = 0;
    while i < 255 {
        exp[i] = value;
        exp[i + 255] = value;
        // Lossless: i < 255. (`as` because `From` is not usable in a const fn.)
        log[value as usize] = i as u8;
        // value * 3 = value * 2 + value; doubling shifts out the top bit and
        // folds it back in through the reduction polynomial.
        let doubled = (value << 1) ^ if value & 0x80 != 0 { REDUCTION } else { 0 };
        value = doubled ^ value;
        i += 1;
    }
    (exp, log)
}

/// `EXP[i] = 3^i`, for `i` in `0..510`.
static EXP: [u8; 512] = build_tables().0;
/// `LOG[a]` = the `i` with `3^i = a`, for nonzero `a` (`LOG[0]` is unused).
static LOG: [u8; 256] = build_tables().1;

// The table lookups below are indexed by secret-dependent values. That is
// fine for a key ceremony run on demand, but these functions must not be put
// on a path an attacker can invoke and time repeatedly.

/// Multiplication in GF(2^8) modulo 0x11b.
fn mul(a: u8, b: u8) -> u8 {
    if a == 0 || b == 0 {
        0
    } else {
        // At most 254 + 254 = 508, inside the doubled table.
        EXP[usize::from(LOG[usize::from(a)]) + usize::from(LOG[usize::from(b)])]
    }
}

/// Multiplicative inverse in GF(2^8). Zero has no inverse; it maps to zero
/// so the function is total, and callers never pass it (see [`combine`]).
fn inv(a: u8) -> u8 {
    if a == 0 {
        0
    } else {
        // 3^(255 - i) * 3^i = 3^255 = 1.
        EXP[255 - usize::from(LOG[usize::from(a)])]
    }
}

/// Evaluates the polynomial with coefficients `coeffs` (constant term first)
/// at `x`, by Horner's rule. Addition in GF(2^8) is XOR.
fn eval(coeffs: &[u8], x: u8) -> u8 {
    coeffs.iter().rev().fold(0, |acc, &c| mul(acc, x) ^ c)
}

// ---------------------------------------------------------------------------
// Splitting and combining
// ---------------------------------------------------------------------------

/// One custodian's share: the point `x` and, for every secret byte, that
/// byte's polynomial evaluated at `x`.
///
/// `Debug` prints only `x`, so a share logged by accident leaks nothing.
#[derive(Clone)]
pub struct Share {
    /// The evaluation point, `1..=255`; never 0, which would be the secret.
    pub x: u8,
    /// One byte per secret byte; wiped on drop.
    pub y: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `..` marks the withheld share bytes.
        f.debug_struct("Share")
            .field("x", &self.x)
            .finish_non_exhaustive()
    }
}

/// Splits `secret` into `shares` shares, any `threshold` of which recover it.
///
/// Shares get `x = 1..=shares` in order.
///
/// # Errors
///
/// An empty secret, `threshold == 0` or `threshold > shares` (`shares <= 255`
/// is enforced by `u8`), or a failure of the operating system's CSPRNG.
pub fn split(secret: &[u8], threshold: u8, shares: u8) -> Result<Vec<Share>, String> {
    if secret.is_empty() {
        return Err("secret to split is empty".into());
    }
    if threshold == 0 {
        return Err("threshold must be at least 1".into());
    }
    if threshold > shares {
        return Err("threshold must not exceed the number of shares".into());
    }
    let degree_plus_one = usize::from(threshold);

    // One polynomial of `threshold` coefficients per secret byte, laid out
    // contiguously. The whole buffer is filled from the CSPRNG and then each
    // constant term is overwritten with its secret byte; that keeps the secret
    // and the coefficients in a single wiped buffer with no extra copies.
    //
    // Coefficients may come out zero, including the top one. That is
    // intended: a uniformly random polynomial of degree < M is what makes any
    // M - 1 shares independent of the secret; forcing a nonzero top
    // coefficient would bias the shares.
    let len = secret
        .len()
        .checked_mul(degree_plus_one)
        .ok_or_else(|| "secret too large to split".to_string())?;
    let mut polys = Zeroizing::new(vec![0u8; len]);
    SystemRandom::new()
        .fill(&mut polys)
        .map_err(|_| "system random number generator failed".to_string())?;
    for (poly, &byte) in polys.chunks_exact_mut(degree_plus_one).zip(secret) {
        if let Some(constant) = poly.first_mut() {
            *constant = byte;
        }
    }

    let out = (1..=shares)
        .map(|x| {
            // Capacity reserved up front so the vector never reallocates,
            // which would leave an unwiped copy of share bytes behind.
            let mut y = Zeroizing::new(Vec::with_capacity(secret.len()));
            y.extend(
                polys
                    .chunks_exact(degree_plus_one)
                    .map(|poly| eval(poly, x)),
            );
            Share { x, y }
        })
        .collect();
    Ok(out)
}

/// Recovers the secret from shares by Lagrange interpolation at `x = 0`.
///
/// Any `threshold` or more distinct shares of one split give the secret.
/// Fewer shares (or shares of different splits) cannot be detected here and
/// give an unrelated value, so the caller must verify the result, e.g. by
/// checking it against a stored key-check value before using it as the KEK.
///
/// # Errors
///
/// No shares, a share with `x == 0`, two shares with the same `x`, empty
/// share data, or shares of unequal length.
pub fn combine(shares: &[Share]) -> Result<Zeroizing<Vec<u8>>, String> {
    let Some(first) = shares.first() else {
        return Err("no shares to combine".into());
    };
    let len = first.y.len();
    if len == 0 {
        return Err("share data is empty".into());
    }
    let mut seen = [false; 256];
    for share in shares {
        if share.x == 0 {
            // x = 0 would be the secret itself, and makes the Lagrange basis
            // degenerate; no genuine share has it.
            return Err("share with x = 0 is invalid".into());
        }
        let slot = &mut seen[usize::from(share.x)];
        if *slot {
            // Two points with one x would make the denominator below zero.
            return Err("duplicate share x value".into());
        }
        *slot = true;
        if share.y.len() != len {
            return Err("shares have unequal lengths".into());
        }
    }

    let mut secret = Zeroizing::new(vec![0u8; len]);
    for (i, share) in shares.iter().enumerate() {
        // Lagrange basis polynomial l_i evaluated at 0:
        //   prod over j != i of (0 - x_j) / (x_i - x_j) = x_j / (x_i ^ x_j),
        // since subtraction is XOR. The x values are distinct and nonzero
        // (checked above), so no denominator is zero.
        let mut numerator = 1u8;
        let mut denominator = 1u8;
        for (j, other) in shares.iter().enumerate() {
            if j != i {
                numerator = mul(numerator, other.x);
                denominator = mul(denominator, share.x ^ other.x);
            }
        }
        let basis = mul(numerator, inv(denominator));
        for (out, &y) in secret.iter_mut().zip(share.y.iter()) {
            *out ^= mul(y, basis);
        }
    }
    Ok(secret)
}

// ---------------------------------------------------------------------------
// Text form for custodians
// ---------------------------------------------------------------------------

/// Text form handed to custodians, bound to one vault and one key
/// generation so a share of another vault or of a retired KEK is refused
/// before it is combined.
///
/// [`decode_share`] only proves the text is intact; the caller must compare
/// `vault_id` and `generation` with the vault it is unlocking.
#[derive(Clone, Debug)]
pub struct ShareText {
    /// The vault the share belongs to: 16 lowercase hex characters.
    pub vault_id: String,
    /// Which KEK generation the share is of; bumped on every KEK rotation.
    pub generation: u32,
    /// The share itself.
    pub share: Share,
}

/// The first 4 bytes of SHA-256 over the share's binding header and data.
///
/// Covering vault id, generation and x as well as y means an edited header
/// is caught like a typo in the data. It is a typo check, not a MAC: anyone
/// can compute it, so it does not authenticate the share.
fn checksum(vault_id: &str, generation: u32, x: u8, y: &[u8]) -> [u8; 4] {
    let header = format!("{CHECK_DOMAIN}|{vault_id}|{generation}|{x}|");
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(header.as_bytes());
    ctx.update(y);
    let digest = ctx.finish();
    let mut out = [0u8; 4];
    for (o, &b) in out.iter_mut().zip(digest.as_ref()) {
        *o = b;
    }
    out
}

/// Lowercase hex digit for a nibble (only the low 4 bits are used).
fn hex_digit(nibble: u8) -> char {
    char::from(b"0123456789abcdef"[usize::from(nibble & 0x0f)])
}

/// Encodes a share as
/// `cvs1-{vault_id}-{generation}-{x}-{hex(y)}-{check}`.
///
/// `vault_id` must be 16 lowercase hex characters; the function cannot fail,
/// so any other id is encoded as given and [`decode_share`] then refuses the
/// text. The result contains the share, so it is wiped on drop.
#[must_use]
pub fn encode_share(vault_id: &str, generation: u32, share: &Share) -> Zeroizing<String> {
    let check = checksum(vault_id, generation, share.x, &share.y);
    // Exact upper bound, reserved up front so the string never reallocates
    // and leaves an unwiped copy of the share hex behind: prefix, vault id,
    // up to 10 generation digits, up to 3 x digits, the data, 8 check digits
    // and 5 dashes.
    let capacity = TEXT_PREFIX
        .len()
        .saturating_add(vault_id.len())
        .saturating_add(10 + 3 + 8 + 5)
        .saturating_add(share.y.len().saturating_mul(2));
    let mut text = Zeroizing::new(String::with_capacity(capacity));
    text.push_str(TEXT_PREFIX);
    text.push_str(vault_id);
    text.push('-');
    text.push_str(&generation.to_string());
    text.push('-');
    text.push_str(&share.x.to_string());
    text.push('-');
    for &byte in share.y.iter() {
        text.push(hex_digit(byte >> 4));
        text.push(hex_digit(byte));
    }
    text.push('-');
    text.push_str(&hex::encode(check));
    text
}

/// Parses a canonical decimal number: ASCII digits only, no sign, and no
/// leading zero (except "0" itself), so each value has exactly one spelling
/// and the text maps one-to-one onto what the checksum covers.
fn parse_decimal(field: &str) -> Option<u32> {
    let canonical = !field.is_empty()
        && field.bytes().all(|b| b.is_ascii_digit())
        && (field == "0" || !field.starts_with('0'));
    if canonical { field.parse().ok() } else { None }
}

/// Parses share text made by [`encode_share`].
///
/// Surrounding whitespace is ignored.
///
/// # Errors
///
/// Checked in order: the `cvs1-` prefix, the field count, the vault id
/// shape, the generation and x numbers (canonical decimal), `x != 0`, the
/// share hex, and the checksum (a typo gives "share checksum mismatch
/// (typo?)"). Error messages never echo the input.
pub fn decode_share(text: &str) -> Result<ShareText, String> {
    let Some(rest) = text.trim().strip_prefix(TEXT_PREFIX) else {
        return Err("not a cardvault share (expected prefix \"cvs1-\")".into());
    };
    let fields: Vec<&str> = rest.split('-').collect();
    let [vault_id, generation, x, data, check] = fields[..] else {
        return Err("share text must have 6 dash-separated fields".into());
    };

    let vault_id_ok = vault_id.len() == VAULT_ID_LEN
        && vault_id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !vault_id_ok {
        return Err("vault id must be 16 lowercase hex characters".into());
    }
    let Some(generation) = parse_decimal(generation) else {
        return Err("share generation is not a valid number".into());
    };
    let Some(x) = parse_decimal(x).and_then(|x| u8::try_from(x).ok()) else {
        return Err("share x is not a number from 1 to 255".into());
    };
    if x == 0 {
        return Err("share x must not be 0".into());
    }

    if data.is_empty() {
        return Err("share data is empty".into());
    }
    if data.len() % 2 != 0 {
        return Err("share data has an odd number of hex digits".into());
    }
    // Decoded straight into a wiped buffer; `hex::decode` would return a
    // plain Vec that is not wiped.
    let mut y = Zeroizing::new(vec![0u8; data.len() / 2]);
    hex::decode_to_slice(data, &mut y[..])
        .map_err(|_| "share data is not valid hex".to_string())?;

    let mut given = [0u8; 4];
    hex::decode_to_slice(check, &mut given)
        .map_err(|_| "share checksum must be 8 hex characters".to_string())?;
    // Plain comparison: the checksum is public (it is printed next to the
    // data), so there is no secret to leak through timing.
    if given != checksum(vault_id, generation, x, &y) {
        return Err("share checksum mismatch (typo?)".into());
    }

    Ok(ShareText {
        vault_id: vault_id.to_string(),
        generation,
        share: Share { x, y },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const VAULT: &str = "0123456789abcdef";

    /// Bit-by-bit multiplication, independent of the tables, as a reference.
    fn slow_mul(mut a: u8, mut b: u8) -> u8 {
        let mut product = 0;
        while b != 0 {
            if b & 1 != 0 {
                product ^= a;
            }
            a = (a << 1) ^ if a & 0x80 != 0 { REDUCTION } else { 0 };
            b >>= 1;
        }
        product
    }

    fn random_bytes(n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        SystemRandom::new().fill(&mut buf).unwrap();
        buf
    }

    /// `k` distinct indices from `0..n`, by a partial Fisher-Yates shuffle.
    /// (Modulo bias is irrelevant for picking test subsets.)
    fn random_subset(n: usize, k: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..n).collect();
        for i in 0..k {
            let r = u32::from_le_bytes(random_bytes(4).try_into().unwrap()) as usize;
            let j = i + r % (n - i);
            idx.swap(i, j);
        }
        idx.truncate(k);
        idx
    }

    /// Every `k`-subset of `0..n`, for small `n`.
    fn all_subsets(n: usize, k: usize) -> Vec<Vec<usize>> {
        (0u32..(1 << n))
            .filter(|mask| mask.count_ones() as usize == k)
            .map(|mask| (0..n).filter(|i| mask & (1 << i) != 0).collect())
            .collect()
    }

    fn pick(shares: &[Share], idx: &[usize]) -> Vec<Share> {
        idx.iter().map(|&i| shares[i].clone()).collect()
    }

    #[test]
    fn gf_mul_known_answers() {
        // FIPS-197 section 4.2 examples.
        assert_eq!(mul(0x57, 0x83), 0xc1);
        assert_eq!(mul(0x57, 0x13), 0xfe);
        assert_eq!(slow_mul(0x57, 0x83), 0xc1);
    }

    #[test]
    fn gf_tables_match_reference_mul() {
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                assert_eq!(mul(a, b), slow_mul(a, b), "{a:#04x} * {b:#04x}");
            }
        }
    }

    #[test]
    fn gf_inverse_property() {
        for a in 1..=255u8 {
            assert_eq!(mul(a, inv(a)), 1, "inverse of {a:#04x}");
        }
        assert_eq!(inv(0), 0);
    }

    #[test]
    fn horner_eval_matches_direct_sum() {
        let coeffs = [0x2a, 0x17, 0xc3, 0x01];
        for x in 0..=255u8 {
            let mut power = 1u8;
            let mut direct = 0u8;
            for &c in &coeffs {
                direct ^= mul(c, power);
                power = mul(power, x);
            }
            assert_eq!(eval(&coeffs, x), direct);
        }
    }

    #[test]
    fn deterministic_vector() {
        // f(x) = 0x2a + 0x17 x.
        let f = |x: u8| 0x2a ^ mul(0x17, x);
        // By hand: f(1) = 0x2a ^ 0x17 = 0x3d; 0x17 * 2 = 0x2e (no reduction,
        // top bit clear), so f(2) = 0x2a ^ 0x2e = 0x04.
        assert_eq!(f(1), 0x3d);
        assert_eq!(f(2), 0x04);
        let shares = [
            Share {
                x: 1,
                y: Zeroizing::new(vec![f(1)]),
            },
            Share {
                x: 2,
                y: Zeroizing::new(vec![f(2)]),
            },
        ];
        assert_eq!(combine(&shares).unwrap().as_slice(), &[0x2a]);
        // Order of shares must not matter.
        let reversed = [shares[1].clone(), shares[0].clone()];
        assert_eq!(combine(&reversed).unwrap().as_slice(), &[0x2a]);
    }

    #[test]
    fn split_shape() {
        let secret = random_bytes(32);
        let shares = split(&secret, 3, 5).unwrap();
        assert_eq!(shares.len(), 5);
        for (i, share) in shares.iter().enumerate() {
            assert_eq!(usize::from(share.x), i + 1);
            assert_eq!(share.y.len(), 32);
        }
    }

    #[test]
    fn round_trip_every_subset_small() {
        for (m, n) in [(1u8, 1u8), (2, 3), (3, 5), (5, 5)] {
            let secret = random_bytes(32);
            let shares = split(&secret, m, n).unwrap();
            // Every subset of size M or more recovers the secret.
            for k in usize::from(m)..=usize::from(n) {
                for subset in all_subsets(usize::from(n), k) {
                    let got = combine(&pick(&shares, &subset)).unwrap();
                    assert_eq!(got.as_slice(), secret.as_slice(), "({m},{n}) {subset:?}");
                }
            }
        }
    }

    #[test]
    fn round_trip_random_subsets_large() {
        let secret = random_bytes(32);
        let shares = split(&secret, 10, 255).unwrap();
        assert_eq!(shares.len(), 255);
        for _ in 0..50 {
            let subset = random_subset(255, 10);
            let got = combine(&pick(&shares, &subset)).unwrap();
            assert_eq!(got.as_slice(), secret.as_slice(), "{subset:?}");
        }
        // Extremes: the first and last ten, and all of them.
        let first: Vec<usize> = (0..10).collect();
        let last: Vec<usize> = (245..255).collect();
        assert_eq!(combine(&pick(&shares, &first)).unwrap().as_slice(), secret);
        assert_eq!(combine(&pick(&shares, &last)).unwrap().as_slice(), secret);
        assert_eq!(combine(&shares).unwrap().as_slice(), secret);
    }

    #[test]
    fn fewer_than_threshold_gives_another_value() {
        // A match by chance has probability 2^-256 per subset.
        let secret = random_bytes(32);
        let shares = split(&secret, 3, 5).unwrap();
        for k in 1..=2 {
            for subset in all_subsets(5, k) {
                let got = combine(&pick(&shares, &subset)).unwrap();
                assert_ne!(got.as_slice(), secret.as_slice(), "{subset:?}");
            }
        }
        let shares = split(&secret, 10, 255).unwrap();
        for _ in 0..20 {
            let subset = random_subset(255, 9);
            let got = combine(&pick(&shares, &subset)).unwrap();
            assert_ne!(got.as_slice(), secret.as_slice(), "{subset:?}");
        }
    }

    #[test]
    fn splits_are_randomised() {
        let secret = [7u8; 32];
        let a = split(&secret, 2, 3).unwrap();
        let b = split(&secret, 2, 3).unwrap();
        assert_ne!(a[0].y.as_slice(), b[0].y.as_slice());
    }

    #[test]
    fn split_validates_arguments() {
        assert!(split(&[], 1, 1).is_err());
        assert!(split(&[1], 0, 1).is_err());
        assert!(split(&[1], 0, 0).is_err());
        assert!(split(&[1], 1, 0).is_err());
        assert!(split(&[1], 4, 3).is_err());
        assert!(split(&[1], 255, 255).is_ok());
        assert!(split(&[1], 1, 255).is_ok());
    }

    #[test]
    fn combine_rejects_bad_share_sets() {
        let secret = random_bytes(32);
        let shares = split(&secret, 2, 3).unwrap();

        assert_eq!(combine(&[]).unwrap_err(), "no shares to combine");

        let dup = [shares[0].clone(), shares[1].clone(), shares[0].clone()];
        assert_eq!(combine(&dup).unwrap_err(), "duplicate share x value");

        let mut zero = shares[1].clone();
        zero.x = 0;
        assert_eq!(
            combine(&[shares[0].clone(), zero.clone()]).unwrap_err(),
            "share with x = 0 is invalid"
        );
        assert!(combine(&[zero]).is_err());

        let mut short = shares[1].clone();
        short.y.pop();
        assert_eq!(
            combine(&[shares[0].clone(), short]).unwrap_err(),
            "shares have unequal lengths"
        );

        let empty = Share {
            x: 1,
            y: Zeroizing::new(Vec::new()),
        };
        assert!(combine(&[empty]).is_err());
    }

    #[test]
    fn share_debug_hides_y() {
        let share = Share {
            x: 3,
            y: Zeroizing::new(vec![0xde, 0xad, 0xbe, 0xef]),
        };
        let shown = format!("{share:?}");
        assert_eq!(shown, "Share { x: 3, .. }");
        assert!(!shown.contains("dead") && !shown.contains("222"));

        let text = ShareText {
            vault_id: VAULT.into(),
            generation: 1,
            share,
        };
        let shown = format!("{text:?}");
        assert!(!shown.contains("dead") && !shown.contains("222"));
    }

    #[test]
    fn encode_format() {
        let share = Share {
            x: 3,
            y: Zeroizing::new(vec![0x00, 0xab, 0x0f]),
        };
        let text = encode_share(VAULT, 42, &share);
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(b"cardvault-share-v1|0123456789abcdef|42|3|");
        ctx.update(&[0x00, 0xab, 0x0f]);
        let check = hex::encode(&ctx.finish().as_ref()[..4]);
        assert_eq!(
            text.as_str(),
            format!("cvs1-0123456789abcdef-42-3-00ab0f-{check}")
        );
    }

    #[test]
    fn encode_decode_round_trip() {
        let secret = random_bytes(32);
        let shares = split(&secret, 3, 5).unwrap();
        let mut decoded = Vec::new();
        for share in &shares {
            let text = encode_share(VAULT, 7, share);
            // Custodians paste with stray whitespace and newlines.
            let parsed = decode_share(&format!("  {}\n", text.as_str())).unwrap();
            assert_eq!(parsed.vault_id, VAULT);
            assert_eq!(parsed.generation, 7);
            assert_eq!(parsed.share.x, share.x);
            assert_eq!(parsed.share.y.as_slice(), share.y.as_slice());
            decoded.push(parsed.share);
        }
        assert_eq!(combine(&decoded[1..4]).unwrap().as_slice(), secret);

        // Extremes of the numeric fields.
        let share = Share {
            x: 255,
            y: Zeroizing::new(vec![1]),
        };
        for generation in [0, u32::MAX] {
            let text = encode_share(VAULT, generation, &share);
            let parsed = decode_share(&text).unwrap();
            assert_eq!(parsed.generation, generation);
            assert_eq!(parsed.share.x, 255);
        }
    }

    /// A valid share text of `y = 0xa1b2c3d4` and the rejections of variants.
    fn sample_text() -> String {
        let share = Share {
            x: 2,
            y: Zeroizing::new(vec![0xa1, 0xb2, 0xc3, 0xd4]),
        };
        encode_share(VAULT, 5, &share).to_string()
    }

    /// Replaces field `i` (0 = prefix) of the sample text, keeping its
    /// original checksum.
    fn with_field(i: usize, value: &str) -> String {
        let text = sample_text();
        let mut fields: Vec<&str> = text.split('-').collect();
        fields[i] = value;
        fields.join("-")
    }

    fn assert_rejected(text: &str, expected: &str) {
        let err = decode_share(text).unwrap_err();
        assert!(err.contains(expected), "{text:?} gave {err:?}");
        // Never echo the share data back.
        assert!(!err.contains("a1b2c3d4"), "{err:?}");
    }

    #[test]
    fn decode_rejects_wrong_prefix() {
        let text = sample_text();
        assert_rejected(&text.replacen("cvs1", "cvs2", 1), "prefix");
        assert_rejected(&text.replacen("cvs1", "CVS1", 1), "prefix");
        assert_rejected(&text[1..], "prefix");
        assert_rejected("", "prefix");
        assert_rejected("   ", "prefix");
    }

    #[test]
    fn decode_rejects_wrong_field_count() {
        let text = sample_text();
        assert_rejected(&format!("{text}-00"), "6 dash-separated fields");
        assert_rejected(&format!("{text}-"), "6 dash-separated fields");
        let without_last = &text[..text.rfind('-').unwrap()];
        assert_rejected(without_last, "6 dash-separated fields");
        assert_rejected("cvs1-", "6 dash-separated fields");
    }

    #[test]
    fn decode_rejects_bad_vault_id() {
        for id in [
            "0123456789abcde",
            "0123456789abcdef0",
            "0123456789ABCDEF",
            "0123456789abcdeg",
            "",
            " 123456789abcdef",
        ] {
            assert_rejected(&with_field(1, id), "vault id");
        }
        // encode_share cannot fail, but what it makes of a bad id is refused.
        let share = Share {
            x: 1,
            y: Zeroizing::new(vec![1]),
        };
        assert_rejected(&encode_share("vault", 1, &share), "vault id");
        assert_rejected(&encode_share("0123-4567-89ab-cd", 1, &share), "fields");
    }

    #[test]
    fn decode_rejects_bad_numbers() {
        for generation in ["", "x", "+5", "05", "-5", "4294967296", "1.0"] {
            assert!(decode_share(&with_field(2, generation)).is_err());
        }
        assert_rejected(&with_field(2, "abc"), "generation");
        assert_rejected(&with_field(2, "4294967296"), "generation");
        assert_rejected(&with_field(2, "05"), "generation");
        for x in ["", "x", "+2", "02", "256", "1000"] {
            assert_rejected(&with_field(3, x), "share x is not");
        }
        assert_rejected(&with_field(3, "0"), "must not be 0");
    }

    #[test]
    fn decode_rejects_bad_hex() {
        assert_rejected(&with_field(4, "a1b2c3dz"), "not valid hex");
        assert_rejected(&with_field(4, "a1b2c3d"), "odd number");
        assert_rejected(&with_field(4, ""), "empty");
        assert_rejected(&with_field(5, "0011223"), "8 hex");
        assert_rejected(&with_field(5, "001122334"), "8 hex");
        assert_rejected(&with_field(5, "0011223g"), "8 hex");
    }

    #[test]
    fn decode_rejects_every_single_character_typo() {
        let text = sample_text();
        let mut rejected = 0;
        for (i, c) in text.char_indices() {
            for replacement in "0123456789abcdef".chars().filter(|&r| r != c) {
                let mut typo = text.clone();
                typo.replace_range(i..=i, &replacement.to_string());
                let err = decode_share(&typo).unwrap_err();
                assert!(!err.contains("a1b2c3d4"), "{err:?}");
                rejected += 1;
            }
        }
        assert!(rejected > 0);
        // A typo in the data or the checksum itself is named as one.
        assert_rejected(
            &with_field(4, "a1b2c3d5"),
            "share checksum mismatch (typo?)",
        );
        assert_rejected(&with_field(1, "0123456789abcdee"), "checksum mismatch");
        assert_rejected(&with_field(2, "6"), "checksum mismatch");
        assert_rejected(&with_field(3, "3"), "checksum mismatch");
    }

    #[test]
    fn decode_accepts_uppercase_data_hex() {
        // The checksum covers the bytes, so the case of the data hex is
        // immaterial; the vault id stays strictly lowercase.
        let text = sample_text();
        let fields: Vec<&str> = text.split('-').collect();
        let upper = format!(
            "{}-{}-{}-{}-{}-{}",
            fields[0],
            fields[1],
            fields[2],
            fields[3],
            fields[4].to_uppercase(),
            fields[5].to_uppercase()
        );
        let parsed = decode_share(&upper).unwrap();
        assert_eq!(parsed.share.y.as_slice(), &[0xa1, 0xb2, 0xc3, 0xd4]);
    }

    #[test]
    fn decode_never_panics_on_odd_input() {
        for text in [
            "cvs1-----",
            "cvs1------",
            "cvs1-0123456789abcdef-0-1--",
            "cvs1-0123456789abcdef-0-1-00-",
            "cvs1-ééééééééééééééé-0-1-00-00000000",
            "cvs1-0123456789abcdef-0-1-éé-00000000",
            "cvs1-0123456789abcdef-0-1-00-0000000é",
            "cvs1-0123456789abcdef-99999999999999999999-1-00-00000000",
            "\u{0}",
        ] {
            assert!(decode_share(text).is_err(), "{text:?}");
        }
    }
}
