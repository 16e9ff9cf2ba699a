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

use ring::rand::{SecureRandom, SystemRandom};
use ring::{digest, hmac};
use zeroize::Zeroizing;

/// Version tag at the start of every share text; bumping it lets a future
/// format be told apart instead of being misread. (`cvs1-` shares carried
/// no custodian and no MAC; they are no longer accepted.)
const TEXT_PREFIX: &str = "cvs2-";

/// Domain separation for the share checksum, so the digest can never be
/// confused with a SHA-256 computed elsewhere over similar bytes.
const CHECK_DOMAIN: &str = "cardvault-share-v2";

/// Purpose of the key share MACs are made under (derived from the KEK).
const SHARE_MAC_DOMAIN_STR: &str = "cardvault-share-mac-v2";
const SHARE_MAC_DOMAIN: &[u8] = SHARE_MAC_DOMAIN_STR.as_bytes();

/// Length of a vault id in the share text: 8 bytes as lowercase hex.
const VAULT_ID_LEN: usize = 16;

// ---------------------------------------------------------------------------
// GF(2^8) arithmetic
// ---------------------------------------------------------------------------

/// The AES reduction polynomial x^8 + x^4 + x^3 + x + 1, without its x^8 bit
/// (that bit is the one shifted out of the byte before reducing).
const REDUCTION: u8 = 0x1b;

// The arithmetic below runs on key bytes, so it is constant-time: no
// branch and no memory index depends on an operand. (The log/exp tables it
// replaced were indexed by secret bytes, a cache-timing side channel.)

/// All ones if the lowest bit of `bit` is set, else zero, without a branch.
fn mask(bit: u8) -> u8 {
    (bit & 1).wrapping_neg()
}

/// Multiplication in GF(2^8) modulo 0x11b: shift-and-add over all eight
/// bits of `b`, with masks in place of the usual `if`s.
fn mul(mut a: u8, mut b: u8) -> u8 {
    let mut product = 0u8;
    for _ in 0..8 {
        product ^= a & mask(b);
        // Doubling shifts out the top bit and folds it back in through the
        // reduction polynomial.
        a = (a << 1) ^ (REDUCTION & mask(a >> 7));
        b >>= 1;
    }
    product
}

/// Multiplicative inverse in GF(2^8): `a^254` (since `a^255 = 1`), by a
/// fixed sequence of squarings and multiplications. Zero maps to zero, so
/// the function is total; callers never pass it (see [`combine`]).
fn inv(a: u8) -> u8 {
    // 254 = 2 + 4 + ... + 128: multiply the seven squarings together.
    let mut square = a;
    let mut out = 1u8;
    for _ in 1..8 {
        square = mul(square, square);
        out = mul(out, square);
    }
    out
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

/// What one share is issued for. Bound into the share by its MAC (see
/// [`share_mac`]), so none of it can be changed without detection once the
/// KEK is rebuilt, and compared with the vault's own record before that.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    /// The vault the share belongs to: 16 lowercase hex characters.
    pub vault_id: String,
    /// Which KEK generation the share is of; bumped on every rekey.
    pub generation: u32,
    /// Shares needed to rebuild the KEK.
    pub threshold: u8,
    /// The principal (client certificate identity) that alone may enter it.
    pub custodian: String,
}

/// Length of a share MAC (HMAC-SHA256).
pub const MAC_LEN: usize = 32;

/// A parsed share: what it is bound to, the share, and its MAC.
#[derive(Clone, Debug)]
pub struct ShareText {
    /// Vault, generation, threshold and custodian.
    pub binding: Binding,
    /// The share itself.
    pub share: Share,
    /// HMAC under a key derived from the KEK (see [`share_mac`]).
    pub mac: [u8; MAC_LEN],
}

impl ShareText {
    /// Whether the MAC is right under `kek`: false for a forged share, or
    /// one whose binding or data was altered. Constant-time.
    pub fn authentic(&self, kek: &[u8]) -> bool {
        let key = derived_key(kek, SHARE_MAC_DOMAIN);
        hmac::verify(&key, &mac_input(&self.binding, &self.share), &self.mac).is_ok()
    }
}

/// A key for one purpose, derived from the KEK (HMAC-SHA256 of the purpose
/// under the KEK), so no MAC is ever computed under the KEK itself.
pub fn derived_key(kek: &[u8], purpose: &[u8]) -> hmac::Key {
    let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, kek), purpose);
    hmac::Key::new(hmac::HMAC_SHA256, tag.as_ref())
}

/// What a share's MAC covers: every field of the text but the checksum,
/// with the custodian's length so that fields cannot run into each other.
fn mac_input(b: &Binding, share: &Share) -> Zeroizing<Vec<u8>> {
    let header = format!(
        "{SHARE_MAC_DOMAIN_STR}|{}|{}|{}|{}|{}:{}|",
        b.vault_id,
        b.generation,
        b.threshold,
        share.x,
        b.custodian.len(),
        b.custodian
    );
    let mut out = Zeroizing::new(Vec::with_capacity(header.len() + share.y.len()));
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&share.y);
    out
}

/// The MAC binding `share` to `binding`, under a key derived from `kek`.
pub fn share_mac(kek: &[u8], binding: &Binding, share: &Share) -> [u8; MAC_LEN] {
    let key = derived_key(kek, SHARE_MAC_DOMAIN);
    let tag = hmac::sign(&key, &mac_input(binding, share));
    let mut out = [0u8; MAC_LEN];
    out.copy_from_slice(tag.as_ref());
    out
}

/// The first 4 bytes of SHA-256 over every other field of the text.
///
/// A typo check, not a MAC: anyone can compute it. It catches a mistyped
/// or damaged share as soon as it is entered, where the MAC can only be
/// checked once enough shares rebuild the KEK.
fn checksum(fields: &[&str]) -> [u8; 4] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(CHECK_DOMAIN.as_bytes());
    for f in fields {
        ctx.update(b"|");
        ctx.update(f.as_bytes());
    }
    let digest = ctx.finish();
    let mut out = [0u8; 4];
    out.copy_from_slice(&digest.as_ref()[..4]);
    out
}

/// Lowercase hex digit for a nibble (only the low 4 bits are used).
fn hex_digit(nibble: u8) -> char {
    char::from(b"0123456789abcdef"[usize::from(nibble & 0x0f)])
}

/// Encodes a share as
/// `cvs2-{vault_id}-{generation}-{threshold}-{x}-{hex(custodian)}-{hex(y)}-{hex(mac)}-{check}`,
/// with its MAC under a key derived from `kek`.
///
/// `vault_id` must be 16 lowercase hex characters; the function cannot fail,
/// so any other id is encoded as given and [`decode_share`] then refuses the
/// text. The result contains the share, so it is wiped on drop.
#[must_use]
pub fn encode_share(kek: &[u8], binding: &Binding, share: &Share) -> Zeroizing<String> {
    let mac = share_mac(kek, binding, share);
    // Every field is built in a wiped buffer reserved up front, so no
    // reallocation leaves an unwiped copy of the share hex behind.
    let mut y_hex = Zeroizing::new(String::with_capacity(share.y.len() * 2));
    for &byte in share.y.iter() {
        y_hex.push(hex_digit(byte >> 4));
        y_hex.push(hex_digit(byte));
    }
    let generation = binding.generation.to_string();
    let threshold = binding.threshold.to_string();
    let x = share.x.to_string();
    let custodian = hex::encode(binding.custodian.as_bytes());
    let mac = hex::encode(mac);
    let fields = [
        binding.vault_id.as_str(),
        &generation,
        &threshold,
        &x,
        &custodian,
        y_hex.as_str(),
        &mac,
    ];
    let check = hex::encode(checksum(&fields));
    let capacity =
        TEXT_PREFIX.len() + fields.iter().map(|f| f.len() + 1).sum::<usize>() + check.len();
    let mut text = Zeroizing::new(String::with_capacity(capacity));
    text.push_str(TEXT_PREFIX);
    for f in fields {
        text.push_str(f);
        text.push('-');
    }
    text.push_str(&check);
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
/// Surrounding whitespace is ignored. This proves the text intact (its
/// checksum), not authentic: the caller compares the binding with the
/// vault and checks [`ShareText::authentic`] once the KEK is rebuilt.
///
/// # Errors
///
/// Checked in order: the `cvs2-` prefix, the field count, the vault id
/// shape, the numbers (canonical decimal; `x != 0`, a threshold of at
/// least 2), the custodian, the share and MAC hex, and the checksum (a
/// typo gives "share checksum mismatch (typo?)"). Error messages never
/// echo the input.
pub fn decode_share(text: &str) -> Result<ShareText, String> {
    let Some(rest) = text.trim().strip_prefix(TEXT_PREFIX) else {
        return Err("not a cardvault share (expected prefix \"cvs2-\")".into());
    };
    let fields: Vec<&str> = rest.split('-').collect();
    let [
        vault_id,
        generation,
        threshold,
        x,
        custodian,
        data,
        mac,
        check,
    ] = fields[..]
    else {
        return Err("share text must have 9 dash-separated fields".into());
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
    let Some(threshold) = parse_decimal(threshold).and_then(|t| u8::try_from(t).ok()) else {
        return Err("share threshold is not a number from 2 to 255".into());
    };
    if threshold < 2 {
        return Err("share threshold is not a number from 2 to 255".into());
    }
    let Some(x) = parse_decimal(x).and_then(|x| u8::try_from(x).ok()) else {
        return Err("share x is not a number from 1 to 255".into());
    };
    if x == 0 {
        return Err("share x must not be 0".into());
    }
    let custodian = hex::decode(custodian)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .filter(|c| !c.is_empty())
        .ok_or_else(|| "share custodian is not a hex-encoded principal".to_string())?;
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
    let mut mac_bytes = [0u8; MAC_LEN];
    hex::decode_to_slice(mac, &mut mac_bytes)
        .map_err(|_| "share MAC must be 64 hex characters".to_string())?;
    let mut given = [0u8; 4];
    hex::decode_to_slice(check, &mut given)
        .map_err(|_| "share checksum must be 8 hex characters".to_string())?;
    // Over the fields as given, case included: the checksum is public, so a
    // plain comparison leaks nothing.
    let covered = [
        fields[0], fields[1], fields[2], fields[3], fields[4], fields[5], fields[6],
    ];
    if given != checksum(&covered) {
        return Err("share checksum mismatch (typo?)".into());
    }
    Ok(ShareText {
        binding: Binding {
            vault_id: vault_id.to_string(),
            generation,
            threshold,
            custodian,
        },
        share: Share { x, y },
        mac: mac_bytes,
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
    fn gf_mul_matches_the_reference_for_every_pair() {
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                assert_eq!(mul(a, b), slow_mul(a, b), "{a:#04x} * {b:#04x}");
            }
        }
    }

    /// The arithmetic on key bytes has no branch and no table lookup: the
    /// source of `mask`, `mul` and `inv` holds no `if`, `match`, `while`,
    /// early `return`, indexing or table. A structural check, so that an
    /// edit cannot quietly bring back a secret-indexed table or a
    /// data-dependent branch (loops have fixed counts).
    #[test]
    fn gf_arithmetic_is_branch_free_and_table_free() {
        let src = include_str!("shamir.rs");
        for f in ["fn mask(", "fn mul(", "fn inv("] {
            let start = src.find(f).unwrap();
            let end = start + src[start..].find("\n}\n").unwrap();
            let body = &src[start..end];
            for banned in ["if ", "match ", "while ", "[", "static", "return"] {
                assert!(!body.contains(banned), "{f} contains {banned:?}");
            }
        }
        assert!(!src.contains(concat!("static ", "EXP")));
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
            binding: binding(1),
            share,
            mac: [0; MAC_LEN],
        };
        let shown = format!("{text:?}");
        assert!(!shown.contains("dead") && !shown.contains("222"));
    }

    const KEK: [u8; 32] = [7; 32];

    fn binding(generation: u32) -> Binding {
        Binding {
            vault_id: VAULT.into(),
            generation,
            threshold: 2,
            custodian: "spiffe://test/custodian-1".into(),
        }
    }

    #[test]
    fn encode_format() {
        let share = Share {
            x: 3,
            y: Zeroizing::new(vec![0x00, 0xab, 0x0f]),
        };
        let text = encode_share(&KEK, &binding(42), &share);
        let fields: Vec<&str> = text.split('-').collect();
        assert_eq!(fields[..4], ["cvs2", VAULT, "42", "2"]);
        assert_eq!(fields[4], "3");
        assert_eq!(fields[5], hex::encode("spiffe://test/custodian-1"));
        assert_eq!(fields[6], "00ab0f");
        assert_eq!(
            fields[7],
            hex::encode(share_mac(&KEK, &binding(42), &share))
        );
        assert_eq!(fields[8].len(), 8);
    }

    #[test]
    fn encode_decode_round_trip_and_authenticity() {
        let secret = random_bytes(32);
        let shares = split(&secret, 3, 5).unwrap();
        let mut decoded = Vec::new();
        for share in &shares {
            let text = encode_share(&KEK, &binding(7), share);
            // Custodians paste with stray whitespace and newlines.
            let parsed = decode_share(&format!("  {}\n", text.as_str())).unwrap();
            assert_eq!(parsed.binding, binding(7));
            assert_eq!(parsed.share.x, share.x);
            assert_eq!(parsed.share.y.as_slice(), share.y.as_slice());
            assert!(parsed.authentic(&KEK));
            assert!(!parsed.authentic(&[8; 32]), "another KEK's MAC");
            decoded.push(parsed.share);
        }
        assert_eq!(combine(&decoded[1..4]).unwrap().as_slice(), secret);
    }

    #[test]
    fn every_bound_field_is_covered_by_the_mac() {
        let share = Share {
            x: 2,
            y: Zeroizing::new(vec![1, 2, 3]),
        };
        let good = decode_share(&encode_share(&KEK, &binding(1), &share)).unwrap();
        assert!(good.authentic(&KEK));
        let altered = |f: &dyn Fn(&mut ShareText)| {
            let mut t = good.clone();
            f(&mut t);
            t.authentic(&KEK)
        };
        assert!(!altered(&|t| t.binding.vault_id = "fedcba9876543210".into()));
        assert!(!altered(&|t| t.binding.generation = 2));
        assert!(!altered(&|t| t.binding.threshold = 3));
        assert!(!altered(
            &|t| t.binding.custodian = "spiffe://test/custodian-2".into()
        ));
        assert!(!altered(&|t| t.share.x = 3));
        assert!(!altered(&|t| t.share.y[0] ^= 1));
        // A forger who re-encodes an altered share makes a valid checksum,
        // but no valid MAC without the KEK.
        let forged = encode_share(&[9; 32], &binding(1), &share);
        assert!(!decode_share(&forged).unwrap().authentic(&KEK));
    }

    /// A valid share text of `y = 0xa1b2c3d4` and the rejections of variants.
    fn sample_text() -> String {
        let share = Share {
            x: 2,
            y: Zeroizing::new(vec![0xa1, 0xb2, 0xc3, 0xd4]),
        };
        encode_share(&KEK, &binding(5), &share).to_string()
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
        assert_rejected(&text.replacen("cvs2", "cvs1", 1), "prefix");
        assert_rejected(&text.replacen("cvs2", "CVS2", 1), "prefix");
        assert_rejected(&text[1..], "prefix");
        assert_rejected("", "prefix");
        assert_rejected("   ", "prefix");
    }

    #[test]
    fn decode_rejects_wrong_field_count() {
        let text = sample_text();
        assert_rejected(&format!("{text}-00"), "9 dash-separated fields");
        let without_last = &text[..text.rfind('-').unwrap()];
        assert_rejected(without_last, "9 dash-separated fields");
        assert_rejected("cvs2-", "9 dash-separated fields");
    }

    #[test]
    fn decode_rejects_bad_fields() {
        for id in [
            "0123456789abcde",
            "0123456789ABCDEF",
            "0123456789abcdeg",
            "",
        ] {
            assert_rejected(&with_field(1, id), "vault id");
        }
        for generation in ["", "x", "+5", "05", "4294967296", "1.0"] {
            assert_rejected(&with_field(2, generation), "generation");
        }
        for threshold in ["", "0", "1", "256", "02"] {
            assert_rejected(&with_field(3, threshold), "threshold");
        }
        for x in ["", "x", "+2", "02", "256"] {
            assert_rejected(&with_field(4, x), "share x is not");
        }
        assert_rejected(&with_field(4, "0"), "must not be 0");
        assert_rejected(&with_field(5, ""), "custodian");
        assert_rejected(&with_field(5, "zz"), "custodian");
        assert_rejected(&with_field(6, "a1b2c3dz"), "not valid hex");
        assert_rejected(&with_field(6, "a1b2c3d"), "odd number");
        assert_rejected(&with_field(6, ""), "empty");
        assert_rejected(&with_field(7, "00"), "MAC");
        assert_rejected(&with_field(8, "0011223"), "8 hex");
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
        assert_rejected(
            &with_field(6, "a1b2c3d5"),
            "share checksum mismatch (typo?)",
        );
        assert_rejected(&with_field(2, "6"), "checksum mismatch");
    }

    #[test]
    fn decode_never_panics_on_odd_input() {
        for text in [
            "cvs2---------",
            "cvs2-0123456789abcdef-0-2-1-61--00-00",
            "cvs2-ééééééééééééééé-0-2-1-61-00-00-00000000",
            "cvs2-0123456789abcdef-0-2-1-61-éé-00-00000000",
            "cvs2-0123456789abcdef-0-2-1-ff-00-00-00000000",
            "cvs2-0123456789abcdef-99999999999999999999-2-1-61-00-00-00000000",
            "\u{0}",
        ] {
            assert!(decode_share(text).is_err(), "{text:?}");
        }
    }
}
