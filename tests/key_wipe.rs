//! Dropping a data key leaves none of its AES-GCM state in memory: not the
//! key, not the AES round keys, not the GHASH authentication subkey
//! `H = AES_K(0^128)`, with which anyone could forge tags under that key.
//!
//! The test reads its own memory through `/proc/self/mem`, so it needs no
//! unsafe code. It runs without the test harness, on the main thread, so
//! that nothing else allocates or runs while it scans. The values it looks
//! for are kept only XOR-masked, so the scan cannot find its own copy.
//! Before the key is dropped every value must be found (the scan works);
//! afterwards none may be.
//!
//! Moves in Rust can leave stale copies in stack frames that have returned;
//! no library can wipe those. The test scrubs the dead stack below it
//! before scanning, so it checks what the key object itself holds.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};

use aes::cipher::{BlockEncrypt, KeyInit};
use cardvault::crypto::keys::{Aead, SecretKey, unwrap_key, wrap_key};
use zeroize::{Zeroize, Zeroizing};

/// A 16-byte value kept only as `value ^ mask`.
struct Needle {
    name: &'static str,
    masked: [u8; 16],
    mask: [u8; 16],
}

impl Needle {
    fn new(name: &'static str, value: &[u8]) -> Self {
        let mut mask = [0u8; 16];
        getrandom(&mut mask);
        let mut masked = [0u8; 16];
        for i in 0..16 {
            masked[i] = value[i] ^ mask[i];
        }
        Needle { name, masked, mask }
    }

    fn matches(&self, window: &[u8]) -> bool {
        (0..16).all(|i| window[i] ^ self.mask[i] == self.masked[i])
    }
}

fn getrandom(buf: &mut [u8]) {
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(buf))
        .expect("read /dev/urandom");
}

/// Counts where each needle occurs in this process's writable memory.
fn scan(needles: &[Needle]) -> Vec<usize> {
    let maps = BufReader::new(File::open("/proc/self/maps").expect("maps"));
    let regions: Vec<(u64, u64)> = maps
        .lines()
        .map_while(Result::ok)
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let range = parts.next()?;
            let perms = parts.next()?;
            if !perms.starts_with("rw") || line.contains("[vvar") || line.contains("[vsyscall") {
                return None;
            }
            let (a, b) = range.split_once('-')?;
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            ))
        })
        .collect();
    let mut mem = File::open("/proc/self/mem").expect("open /proc/self/mem");
    let mut counts = vec![0usize; needles.len()];
    const CHUNK: usize = 1 << 20;
    let mut buf = vec![0u8; CHUNK + 15];
    // The buffer may itself lie in a scanned region (glibc serves a second
    // large allocation from the heap). Reading it into itself would echo
    // whatever it holds across the region, so its range is left out.
    let own = (buf.as_ptr() as u64, buf.as_ptr() as u64 + buf.len() as u64);
    let spans = regions.into_iter().flat_map(|(start, end)| {
        if own.1 <= start || end <= own.0 {
            vec![(start, end)]
        } else {
            vec![(start, own.0.max(start)), (own.1.min(end), end)]
        }
    });
    for (start, end) in spans {
        let mut at = start;
        while at + 16 <= end {
            let want = ((end - at) as usize).min(CHUNK + 15);
            if mem.seek(SeekFrom::Start(at)).is_err() {
                break;
            }
            let Ok(got) = mem.read(&mut buf[..want]) else {
                break;
            };
            if got < 16 {
                break;
            }
            for p in 0..(got - 15).min(CHUNK) {
                for (n, needle) in needles.iter().enumerate() {
                    if needle.matches(&buf[p..p + 16]) {
                        counts[n] += 1;
                    }
                }
            }
            at += CHUNK as u64;
        }
    }
    buf.zeroize();
    counts
}

/// Overwrites the stack below this frame, where returned calls left their
/// locals (moves and temporaries nothing can wipe).
#[inline(never)]
fn scrub_dead_stack() {
    let mut area = [0u8; 256 * 1024];
    std::hint::black_box(&mut area);
}

/// The GHASH subkey in the form the `polyval` crate stores it:
/// `mulX_POLYVAL(ByteReverse(AES_K(0^128)))` (RFC 8452, appendix A).
fn polyval_subkey(key: &SecretKey) -> Zeroizing<[u8; 16]> {
    let aes = aes::Aes256::new(key.expose().into());
    let mut h = Zeroizing::new([0u8; 16]);
    aes.encrypt_block((&mut *h).into());
    drop(aes);
    h.reverse();
    let mut out = Zeroizing::new([0u8; 16]);
    let mut x = polyval::mulx(&(*h).into());
    out.copy_from_slice(&x);
    x.zeroize();
    out
}

#[inline(never)]
fn needles_for(key: &SecretKey) -> Vec<Needle> {
    let h = polyval_subkey(key);
    let bytes = key.expose();
    let needles = vec![
        Needle::new("key, first half (AES round key 0)", &bytes[..16]),
        Needle::new("key, second half (AES round key 1)", &bytes[16..]),
        Needle::new("GHASH subkey H", &h[..]),
    ];
    needles
}

/// Builds a key, uses it the way the keyring does, and returns it with its
/// needles; the key bytes given to `SecretKey` are wiped.
#[inline(never)]
fn make_key() -> (Box<Aead>, Vec<Needle>) {
    let secret = SecretKey::generate();
    let needles = needles_for(&secret);
    let aead = Box::new(Aead::new(&secret));
    drop(secret);
    // Seal and open, and wrap and unwrap a key, so the per-call state is
    // exercised too.
    let sealed = aead.seal(b"aad", b"4111111111111111");
    assert_eq!(
        aead.open(b"aad", &sealed).expect("opens").as_slice(),
        b"4111111111111111"
    );
    let other = SecretKey::generate();
    let wrapped = wrap_key(&aead, "tenant/t/dek/1", &other);
    assert!(unwrap_key(&aead, "tenant/t/dek/1", &wrapped).is_ok());
    (aead, needles)
}

fn main() {
    if !cfg!(target_os = "linux") {
        println!("key_wipe: skipped (needs /proc/self/mem)");
        return;
    }
    let (aead, needles) = make_key();
    scrub_dead_stack();
    let before = scan(&needles);
    for (needle, count) in needles.iter().zip(&before) {
        assert!(
            *count > 0,
            "the scan must find the live key's {} (it found nothing, so it proves nothing)",
            needle.name
        );
    }
    drop(aead);
    scrub_dead_stack();
    let after = scan(&needles);
    let left: Vec<String> = needles
        .iter()
        .zip(&after)
        .filter(|(_, c)| **c > 0)
        .map(|(n, c)| format!("{} ({c} copies)", n.name))
        .collect();
    assert!(
        left.is_empty(),
        "a dropped key left its state in memory: {}",
        left.join(", ")
    );
    println!("key_wipe: ok (found before drop: {before:?}; after: none)");
}
