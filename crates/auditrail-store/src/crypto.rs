//! Envelope encryption at rest. A master key (versioned; see [`crate::keys`]) wraps one random
//! 32-byte secret per segment; HKDF derives from that secret the segment's AES-256-GCM data key
//! and its salt key (for commitments). Destroying a segment's wrapped secret crypto-erases its
//! events and their salts at once, while the tree's leaves stay verifiable.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hkdf::Hkdf;
use sha2::Sha256;

pub const KEY_BYTES: usize = 32;
pub const NONCE_BYTES: usize = 12;
pub const TAG_BYTES: usize = 16;

/// Fills a buffer from the operating system's generator. Failure means the machine cannot make
/// keys or nonces safely, so it is fatal.
pub fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("the operating system's random generator failed");
    b
}

pub fn random_fill(buf: &mut [u8]) {
    getrandom::fill(buf).expect("the operating system's random generator failed");
}

/// The operating system's random bytes, drawn a few KiB at a time for a caller that needs a
/// few bytes per event (a `getrandom` call per event was a measurable share of bulk ingest).
/// For values that are public once used, such as the random part of a UUID: never for keys or
/// nonces, which draw from [`random_fill`] directly.
pub struct RandomPool {
    buf: Box<[u8; RandomPool::BYTES]>,
    at: usize,
}

impl RandomPool {
    const BYTES: usize = 4096;

    pub fn new() -> RandomPool {
        RandomPool { buf: Box::new([0; RandomPool::BYTES]), at: RandomPool::BYTES }
    }

    /// Fills `out` (at most 4 KiB) with bytes no one has been given before.
    pub fn fill(&mut self, out: &mut [u8]) {
        assert!(out.len() <= RandomPool::BYTES, "a pool hands out at most its size at once");
        if RandomPool::BYTES - self.at < out.len() {
            random_fill(&mut self.buf[..]);
            self.at = 0;
        }
        out.copy_from_slice(&self.buf[self.at..self.at + out.len()]);
        self.at += out.len();
    }
}

impl Default for RandomPool {
    fn default() -> RandomPool {
        RandomPool::new()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("authentication failed: wrong key or altered bytes")]
pub struct AuthError;

/// AES-256-GCM with a fixed key.
#[derive(Clone)]
pub struct Sealer(Aes256Gcm);

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

impl Sealer {
    pub fn new(key: &[u8; KEY_BYTES]) -> Sealer {
        Sealer(Aes256Gcm::new_from_slice(key).expect("32-byte key"))
    }

    pub fn seal(&self, nonce: &[u8; NONCE_BYTES], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        self.0
            .encrypt(&Nonce::from(*nonce), Payload { msg: plaintext, aad })
            .expect("AES-GCM encryption of a bounded message cannot fail")
    }

    pub fn open(
        &self,
        nonce: &[u8; NONCE_BYTES],
        aad: &[u8],
        sealed: &[u8],
    ) -> Result<Vec<u8>, AuthError> {
        self.0.decrypt(&Nonce::from(*nonce), Payload { msg: sealed, aad }).map_err(|_| AuthError)
    }
}

/// A 32-byte key derived from `secret` for the purpose `info` (HKDF-SHA256, no salt): one
/// secret, several independent keys.
pub fn derive_key(secret: &[u8; KEY_BYTES], info: &[u8]) -> [u8; KEY_BYTES] {
    let mut key = [0u8; KEY_BYTES];
    Hkdf::<Sha256>::new(None, secret).expand(info, &mut key).expect("32 bytes is a valid length");
    key
}

/// The keys of one segment, derived from its secret.
#[derive(Clone)]
pub struct SegmentKeys {
    pub data: Sealer,
    /// Derives each event's commitment salt from the segment's salt key.
    pub salts: auditrail_core::leaf::SaltDeriver,
    /// The segment's compression dictionary, if it has one (`crate::dictionary`): opening a
    /// block needs it as much as the data key, and it is sealed under that key.
    pub dictionary: Option<std::sync::Arc<crate::dictionary::Dictionary>>,
}

impl std::fmt::Debug for SegmentKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SegmentKeys(..)")
    }
}

impl SegmentKeys {
    pub fn derive(secret: &[u8; KEY_BYTES]) -> SegmentKeys {
        let data = derive_key(secret, b"auditrail/segment/data-key/v1");
        let salt_key = derive_key(secret, b"auditrail/segment/salt-key/v1");
        SegmentKeys {
            data: Sealer::new(&data),
            salts: auditrail_core::leaf::SaltDeriver::new(&salt_key),
            dictionary: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Across several refills of the pool, no two draws are alike (ten random bytes repeat
    /// only if the pool hands the same bytes out twice).
    #[test]
    fn a_random_pool_never_hands_out_the_same_bytes_twice() {
        let mut pool = RandomPool::new();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..3 * RandomPool::BYTES / 10 {
            let mut id = [0u8; 10];
            pool.fill(&mut id);
            assert!(seen.insert(id), "a draw repeated");
        }
        let mut whole = [0u8; RandomPool::BYTES];
        pool.fill(&mut whole);
        assert!(whole.iter().any(|&b| b != 0));
    }

    #[test]
    fn seal_open_and_detect_changes() {
        let s = Sealer::new(&[3; 32]);
        let sealed = s.seal(&[1; 12], b"aad", b"hello");
        assert_eq!(s.open(&[1; 12], b"aad", &sealed).unwrap(), b"hello");
        assert_eq!(s.open(&[1; 12], b"aaD", &sealed), Err(AuthError));
        let mut bad = sealed.clone();
        bad[0] ^= 1;
        assert_eq!(s.open(&[1; 12], b"aad", &bad), Err(AuthError));
    }
}
