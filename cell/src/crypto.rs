//! At-rest protection (DESIGN.md §6): keyed hashes for keys, AES-256-GCM for values.
//!
//! A [`Keyring`] derives independent keys from one master secret: the index key (HMAC-SHA256 of
//! natural keys such as a RID or a UIN, so no identifier appears in a RocksDB key) and the data key
//! (AES-256-GCM, with the RocksDB key as associated data, so a value cannot be moved to another
//! key). Every sealed value names the key id it was sealed with, for rotation. The master secret
//! comes from a file (production: written by the KMS/HSM hook) or, for development only, a fixed
//! dev secret that the cell announces loudly.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hmac;

/// A nonce chosen by the leader before proposing, carried in the command so every replica writes
/// the same ciphertext.
pub type SealNonce = [u8; NONCE_LEN];

/// Keys derived from the cell's master secret.
pub struct Keyring {
    key_id: u32,
    index: hmac::Key,
    data: LessSafeKey,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

/// Why a sealed value could not be opened.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    /// Too short to be a sealed value.
    #[error("sealed value truncated")]
    Truncated,
    /// Sealed under a key id this keyring does not hold.
    #[error("sealed under unknown key id {0}")]
    UnknownKey(u32),
    /// Authentication failed: wrong key, wrong associated data, or tampering.
    #[error("sealed value failed authentication")]
    Tampered,
}

impl Keyring {
    /// Derives the keyring from a master secret of at least 32 bytes.
    pub fn from_master(key_id: u32, master: &[u8]) -> Result<Keyring, String> {
        if master.len() < 32 {
            return Err(format!("master secret has {} bytes; at least 32 are required", master.len()));
        }
        let root = hmac::Key::new(hmac::HMAC_SHA256, master);
        let derive = |label: &[u8]| hmac::sign(&root, label);
        let index = hmac::Key::new(hmac::HMAC_SHA256, derive(b"nid/v1/keyring/index").as_ref());
        let data_bytes = derive(b"nid/v1/keyring/data");
        let data = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, data_bytes.as_ref()).map_err(|_| "derive data key".to_string())?,
        );
        Ok(Keyring { key_id, index, data })
    }

    /// The development keyring. Never for production: its secret is in the source.
    pub fn dev() -> Keyring {
        let master = ring::digest::digest(&ring::digest::SHA256, b"nid dev keyring; never use in production");
        Keyring::from_master(0, master.as_ref())
            .unwrap_or_else(|_| unreachable!("a SHA-256 digest is 32 bytes"))
    }

    /// Loads a keyring file: `key_id` (decimal) and the master secret (hex, 64+ chars), as
    /// `<key_id>:<hex>` on one line.
    pub fn from_file(path: &std::path::Path) -> Result<Keyring, String> {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("read keyring {}: {e}", path.display()))?;
        let (id, secret) =
            text.trim().split_once(':').ok_or("keyring file must read <key_id>:<hex secret>")?;
        let id: u32 = id.parse().map_err(|_| "keyring key id is not a number".to_string())?;
        let secret = hex_decode(secret).ok_or("keyring secret is not hex")?;
        Keyring::from_master(id, &secret)
    }

    /// HMAC-SHA256 of `(domain, natural key)` under the index key.
    pub fn index_hash(&self, domain: &[u8], natural_key: &[u8]) -> [u8; 32] {
        let mut ctx = hmac::Context::with_key(&self.index);
        ctx.update(&(domain.len() as u32).to_be_bytes());
        ctx.update(domain);
        ctx.update(natural_key);
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.sign().as_ref());
        out
    }

    /// Seals `plaintext` bound to `aad` (the RocksDB key) with a leader-chosen nonce.
    /// Layout: key id (u32 BE) | nonce | ciphertext and tag.
    pub fn seal(&self, aad: &[u8], nonce: SealNonce, plaintext: &[u8]) -> Vec<u8> {
        let mut body = plaintext.to_vec();
        // Sealing into a Vec only fails when the input exceeds GCM's 64 GiB limit.
        self.data
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut body)
            .unwrap_or_else(|_| unreachable!("values are far below the AES-GCM length limit"));
        let mut out = Vec::with_capacity(4 + NONCE_LEN + body.len());
        out.extend_from_slice(&self.key_id.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&body);
        out
    }

    /// Opens a value sealed by [`Keyring::seal`] under the same `aad`.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        if sealed.len() < 4 + NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(SealError::Truncated);
        }
        let (id, rest) = sealed.split_at(4);
        let id = u32::from_be_bytes([id[0], id[1], id[2], id[3]]);
        if id != self.key_id {
            return Err(SealError::UnknownKey(id));
        }
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Truncated)?;
        let mut body = body.to_vec();
        let plain =
            self.data.open_in_place(nonce, Aad::from(aad), &mut body).map_err(|_| SealError::Tampered)?;
        Ok(plain.to_vec())
    }
}

/// A fresh random nonce from the system's CSPRNG.
pub fn random_nonce() -> Result<SealNonce, ring::error::Unspecified> {
    use ring::rand::SecureRandom as _;
    let mut nonce = [0u8; NONCE_LEN];
    ring::rand::SystemRandom::new().fill(&mut nonce)?;
    Ok(nonce)
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// Constant-time equality for secrets and digests.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_bound_to_key() {
        let k = Keyring::dev();
        let nonce = random_nonce().unwrap();
        let sealed = k.seal(b"key-a", nonce, b"secret record");
        assert!(!sealed.windows(6).any(|w| w == b"secret"), "no plaintext in the sealed value");
        assert_eq!(k.open(b"key-a", &sealed).unwrap(), b"secret record");
        assert_eq!(k.open(b"key-b", &sealed), Err(SealError::Tampered), "moved to another key");
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(k.open(b"key-a", &tampered), Err(SealError::Tampered));
        assert_eq!(k.open(b"key-a", &sealed[..10]), Err(SealError::Truncated));
        let other = Keyring::from_master(7, &[3u8; 32]).unwrap();
        assert_eq!(other.open(b"key-a", &sealed), Err(SealError::UnknownKey(0)));
    }

    #[test]
    fn index_hash_is_keyed_and_domain_separated() {
        let a = Keyring::dev();
        let b = Keyring::from_master(1, &[9u8; 32]).unwrap();
        assert_eq!(a.index_hash(b"rid", b"R1"), a.index_hash(b"rid", b"R1"));
        assert_ne!(a.index_hash(b"rid", b"R1"), b.index_hash(b"rid", b"R1"));
        assert_ne!(a.index_hash(b"rid", b"R1"), a.index_hash(b"uin", b"R1"));
        assert!(Keyring::from_master(1, &[0u8; 16]).is_err());
    }

    #[test]
    fn keyring_file_parses_and_rejects_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, format!("3:{}\n", "ab".repeat(32))).unwrap();
        assert_eq!(Keyring::from_file(&p).unwrap().key_id, 3);
        std::fs::write(&p, "3:zz").unwrap();
        assert!(Keyring::from_file(&p).is_err());
        std::fs::write(&p, "nothing").unwrap();
        assert!(Keyring::from_file(&p).is_err());
    }

    #[test]
    fn ct_eq_matches_eq() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }
}
