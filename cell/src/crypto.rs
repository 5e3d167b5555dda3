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
use ring::signature::{Ed25519KeyPair, KeyPair as _};

/// A nonce chosen by the leader before proposing, carried in the command so every replica writes
/// the same ciphertext.
pub type SealNonce = [u8; NONCE_LEN];

/// Keys derived from the cluster's master secrets. A keyring holds one or more generations, each a
/// key id and a master secret. The newest generation (highest id) seals new values and signs
/// decisions; every generation opens what it sealed and its public signing key stays published, so
/// rotation is "add a generation, restart the replicas one by one". The index, PIN and partner-token
/// keys name stored keys and verifiers, so they come from the OLDEST generation and do not change
/// with rotation (replacing them means re-indexing the data: an offline procedure, see
/// ARCHITECTURE.md).
pub struct Keyring {
    key_id: u32,
    index: hmac::Key,
    data: LessSafeKey,
    older: Vec<(u32, LessSafeKey, Ed25519KeyPair, String)>,
    pin: hmac::Key,
    token: hmac::Key,
    signing: Ed25519KeyPair,
    signing_key_id: String,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

/// Where master secrets come from. The file source is for development and for deployments that
/// mount secrets; a KMS/HSM implementation returns the same pairs after unwrapping them (envelope
/// encryption), so nothing else changes.
pub trait KeySource {
    /// The generations as (key id, master secret of at least 32 bytes).
    fn load(&self) -> Result<Vec<(u32, Vec<u8>)>, String>;
}

/// A keyring file: one generation per line, `<key_id>:<hex secret>`; `#` starts a comment.
pub struct FileKeySource(pub std::path::PathBuf);

impl KeySource for FileKeySource {
    fn load(&self) -> Result<Vec<(u32, Vec<u8>)>, String> {
        let path = &self.0;
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("read keyring {}: {e}", path.display()))?;
        let mut out = Vec::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let (id, secret) =
                line.split_once(':').ok_or("each keyring line must read <key_id>:<hex secret>")?;
            let id: u32 = id.parse().map_err(|_| "keyring key id is not a number".to_string())?;
            let secret = hex_decode(secret).ok_or("keyring secret is not hex")?;
            out.push((id, secret));
        }
        Ok(out)
    }
}

struct Generation {
    id: u32,
    root: hmac::Key,
}

impl Generation {
    fn new(id: u32, master: &[u8]) -> Result<Generation, String> {
        if master.len() < 32 {
            return Err(format!("master secret {id} has {} bytes; at least 32 are required", master.len()));
        }
        Ok(Generation { id, root: hmac::Key::new(hmac::HMAC_SHA256, master) })
    }

    fn derive(&self, label: &[u8]) -> hmac::Tag {
        hmac::sign(&self.root, label)
    }

    fn data(&self) -> Result<LessSafeKey, String> {
        let bytes = self.derive(b"nid/v1/keyring/data");
        Ok(LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, bytes.as_ref()).map_err(|_| "derive data key".to_string())?,
        ))
    }

    fn signing(&self) -> Result<(Ed25519KeyPair, String), String> {
        let seed = self.derive(b"nid/v1/keyring/signing");
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed.as_ref()[..32])
            .map_err(|_| "derive signing key".to_string())?;
        let fingerprint = ring::digest::digest(&ring::digest::SHA256, pair.public_key().as_ref());
        let id = format!("ed25519-{}-{}", self.id, hex::encode(&fingerprint.as_ref()[..4]));
        Ok((pair, id))
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
    /// A keyring of one generation.
    pub fn from_master(key_id: u32, master: &[u8]) -> Result<Keyring, String> {
        Keyring::from_generations(&[(key_id, master.to_vec())])
    }

    /// A keyring of several generations (any order; ids must be distinct).
    pub fn from_generations(masters: &[(u32, Vec<u8>)]) -> Result<Keyring, String> {
        let mut generations =
            masters.iter().map(|(id, m)| Generation::new(*id, m)).collect::<Result<Vec<_>, _>>()?;
        generations.sort_by_key(|g| g.id);
        if generations.windows(2).any(|w| w[0].id == w[1].id) {
            return Err("keyring key ids must be distinct".into());
        }
        let (oldest, current) = match (generations.first(), generations.last()) {
            (Some(o), Some(c)) => (o, c),
            _ => return Err("the keyring holds no key".into()),
        };
        let index = hmac::Key::new(hmac::HMAC_SHA256, oldest.derive(b"nid/v1/keyring/index").as_ref());
        let pin = hmac::Key::new(hmac::HMAC_SHA256, oldest.derive(b"nid/v1/keyring/pin").as_ref());
        let token =
            hmac::Key::new(hmac::HMAC_SHA256, oldest.derive(b"nid/v1/keyring/partner-token").as_ref());
        let (signing, signing_key_id) = current.signing()?;
        let mut older = Vec::new();
        for g in &generations[..generations.len() - 1] {
            let (pair, id) = g.signing()?;
            older.push((g.id, g.data()?, pair, id));
        }
        Ok(Keyring {
            key_id: current.id,
            index,
            data: current.data()?,
            older,
            pin,
            token,
            signing,
            signing_key_id,
        })
    }

    /// The development keyring. Never for production: its secret is in the source.
    pub fn dev() -> Keyring {
        let master = ring::digest::digest(&ring::digest::SHA256, b"nid dev keyring; never use in production");
        Keyring::from_master(0, master.as_ref())
            .unwrap_or_else(|_| unreachable!("a SHA-256 digest is 32 bytes"))
    }

    /// Loads a keyring from a source (a file, or a KMS hook).
    pub fn load(source: &dyn KeySource) -> Result<Keyring, String> {
        Keyring::from_generations(&source.load()?)
    }

    /// Loads a keyring file (see [`FileKeySource`]).
    pub fn from_file(path: &std::path::Path) -> Result<Keyring, String> {
        Keyring::load(&FileKeySource(path.to_path_buf()))
    }

    /// The id of the generation that seals new values.
    pub fn key_id(&self) -> u32 {
        self.key_id
    }

    /// Every published signing key: (key id, raw public key), current first.
    pub fn signing_public_keys(&self) -> Vec<(String, Vec<u8>)> {
        let mut out = vec![(self.signing_key_id.clone(), self.signing_public_key())];
        for (_, _, pair, id) in self.older.iter().rev() {
            out.push((id.clone(), pair.public_key().as_ref().to_vec()));
        }
        out
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

    /// The PIN verifier MAC: HMAC-SHA256 under the PIN key over (salt, PIN).
    pub fn pin_mac(&self, salt: &[u8; 16], pin: &str) -> [u8; 32] {
        let mut ctx = hmac::Context::with_key(&self.pin);
        ctx.update(salt);
        ctx.update(pin.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.sign().as_ref());
        out
    }

    /// The partner-specific token of a person: HMAC(token key, partner id || UIN), hex. Stable per
    /// (partner, person); two partners get unrelated tokens and cannot correlate a person.
    pub fn partner_token(&self, partner_id: &str, uin: &str) -> String {
        let mut ctx = hmac::Context::with_key(&self.token);
        ctx.update(&(partner_id.len() as u32).to_be_bytes());
        ctx.update(partner_id.as_bytes());
        ctx.update(uin.as_bytes());
        hex::encode(ctx.sign().as_ref())
    }

    /// Signs `message` with the decision-signing key (Ed25519).
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.signing.sign(message).as_ref().to_vec()
    }

    /// Id of the decision-signing key, as published by GetSigningKeys.
    pub fn signing_key_id(&self) -> &str {
        &self.signing_key_id
    }

    /// The raw 32-byte Ed25519 public key of the signing key.
    pub fn signing_public_key(&self) -> Vec<u8> {
        self.signing.public_key().as_ref().to_vec()
    }

    /// Seals a value that changes over time: the version goes in front in clear and into the
    /// associated data with the key, so an old version cannot be replayed under the key.
    /// Layout: version (u64 BE) | [`Keyring::seal`] output.
    pub fn seal_versioned(&self, key: &[u8], version: u64, nonce: SealNonce, plaintext: &[u8]) -> Vec<u8> {
        let mut out = version.to_be_bytes().to_vec();
        out.extend_from_slice(&self.seal(&versioned_aad(key, version), nonce, plaintext));
        out
    }

    /// Opens a value sealed by [`Keyring::seal_versioned`]; returns the version and the plaintext.
    pub fn open_versioned(&self, key: &[u8], sealed: &[u8]) -> Result<(u64, Vec<u8>), SealError> {
        if sealed.len() < 8 {
            return Err(SealError::Truncated);
        }
        let (v, rest) = sealed.split_at(8);
        let version = u64::from_be_bytes(v.try_into().map_err(|_| SealError::Truncated)?);
        Ok((version, self.open(&versioned_aad(key, version), rest)?))
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
        let key = if id == self.key_id {
            &self.data
        } else {
            &self.older.iter().find(|g| g.0 == id).ok_or(SealError::UnknownKey(id))?.1
        };
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Truncated)?;
        let mut body = body.to_vec();
        let plain = key.open_in_place(nonce, Aad::from(aad), &mut body).map_err(|_| SealError::Tampered)?;
        Ok(plain.to_vec())
    }
}

fn versioned_aad(key: &[u8], version: u64) -> Vec<u8> {
    let mut aad = key.to_vec();
    aad.extend_from_slice(&version.to_be_bytes());
    aad
}

/// The `i`-th nonce derived from a command's leader-chosen random seed: SHA-256(seed || i),
/// truncated. Every replica derives the same nonces, so every replica writes the same ciphertext.
pub fn derived_nonce(seed: &[u8; 16], i: u32) -> SealNonce {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"nid/v1/nonce");
    ctx.update(seed);
    ctx.update(&i.to_be_bytes());
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&ctx.finish().as_ref()[..NONCE_LEN]);
    nonce
}

/// Fresh random bytes from the system's CSPRNG.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], ring::error::Unspecified> {
    use ring::rand::SecureRandom as _;
    let mut out = [0u8; N];
    ring::rand::SystemRandom::new().fill(&mut out)?;
    Ok(out)
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
        assert_eq!(Keyring::from_file(&p).unwrap().key_id(), 3);
        std::fs::write(&p, "3:zz").unwrap();
        assert!(Keyring::from_file(&p).is_err());
        std::fs::write(&p, "nothing").unwrap();
        assert!(Keyring::from_file(&p).is_err());
        std::fs::write(&p, format!("# two generations\n1:{}\n1:{}\n", "ab".repeat(32), "cd".repeat(32)))
            .unwrap();
        assert!(Keyring::from_file(&p).is_err(), "duplicate ids");
    }

    #[test]
    fn rotation_keeps_old_values_readable_and_indexes_stable() {
        let g1 = (1u32, vec![1u8; 32]);
        let g2 = (2u32, vec![2u8; 32]);
        let old = Keyring::from_generations(std::slice::from_ref(&g1)).unwrap();
        let rotated = Keyring::from_generations(&[g2, g1]).unwrap();
        let sealed_old = old.seal(b"k", random_nonce().unwrap(), b"v1");
        assert_eq!(rotated.open(b"k", &sealed_old).unwrap(), b"v1", "old generation still opens");
        let sealed_new = rotated.seal(b"k", random_nonce().unwrap(), b"v2");
        assert_eq!(&sealed_new[..4], &2u32.to_be_bytes(), "the newest generation seals");
        assert_eq!(old.open(b"k", &sealed_new), Err(SealError::UnknownKey(2)));
        assert_eq!(old.index_hash(b"uin", b"1"), rotated.index_hash(b"uin", b"1"), "index keys stay");
        assert_eq!(old.pin_mac(&[0; 16], "1234"), rotated.pin_mac(&[0; 16], "1234"));
        assert_eq!(old.partner_token("p", "1"), rotated.partner_token("p", "1"));
        let published: Vec<String> = rotated.signing_public_keys().into_iter().map(|(id, _)| id).collect();
        assert_eq!(published.len(), 2);
        assert_eq!(published[0], rotated.signing_key_id());
        assert_eq!(published[1], old.signing_key_id(), "the retired key stays published");
    }

    #[test]
    fn versioned_values_are_bound_to_their_version() {
        let k = Keyring::dev();
        let sealed = k.seal_versioned(b"key", 7, random_nonce().unwrap(), b"record v7");
        assert_eq!(k.open_versioned(b"key", &sealed).unwrap(), (7, b"record v7".to_vec()));
        let mut relabelled = sealed.clone();
        relabelled[..8].copy_from_slice(&8u64.to_be_bytes());
        assert_eq!(k.open_versioned(b"key", &relabelled), Err(SealError::Tampered));
        assert_eq!(k.open_versioned(b"other", &sealed), Err(SealError::Tampered));
    }

    #[test]
    fn pin_macs_are_salted_and_keyed() {
        let a = Keyring::dev();
        let b = Keyring::from_master(1, &[9u8; 32]).unwrap();
        assert_eq!(a.pin_mac(&[1; 16], "1234"), a.pin_mac(&[1; 16], "1234"));
        assert_ne!(a.pin_mac(&[1; 16], "1234"), a.pin_mac(&[2; 16], "1234"), "salted");
        assert_ne!(a.pin_mac(&[1; 16], "1234"), b.pin_mac(&[1; 16], "1234"), "keyed");
    }

    #[test]
    fn partner_tokens_are_stable_per_partner_and_unrelated_across_partners() {
        let k = Keyring::dev();
        let t1 = k.partner_token("bank-a", "123456789012");
        assert_eq!(t1, k.partner_token("bank-a", "123456789012"));
        assert_ne!(t1, k.partner_token("bank-b", "123456789012"));
        assert_ne!(t1, k.partner_token("bank-a", "123456789013"));
        // The length prefix keeps (partner, uin) boundaries unambiguous.
        assert_ne!(k.partner_token("ab", "1"), k.partner_token("a", "b1"));
        assert_eq!(t1.len(), 64);
    }

    #[test]
    fn signatures_verify_with_the_published_key_and_fail_after_one_byte_changes() {
        use ring::signature::{ED25519, UnparsedPublicKey};
        let k = Keyring::dev();
        let message = b"decision bytes".to_vec();
        let sig = k.sign(&message);
        let public = UnparsedPublicKey::new(&ED25519, k.signing_public_key());
        assert!(public.verify(&message, &sig).is_ok());
        let mut changed = message.clone();
        changed[0] ^= 1;
        assert!(public.verify(&changed, &sig).is_err());
        assert!(k.signing_key_id().starts_with("ed25519-0-"));
        let other = Keyring::from_master(0, &[5u8; 32]).unwrap();
        assert_ne!(other.signing_key_id(), k.signing_key_id(), "the key id names the key");
    }

    #[test]
    fn derived_nonces_differ_per_index_and_seed() {
        let a = derived_nonce(&[1; 16], 0);
        assert_eq!(a, derived_nonce(&[1; 16], 0));
        assert_ne!(a, derived_nonce(&[1; 16], 1));
        assert_ne!(a, derived_nonce(&[2; 16], 0));
    }

    #[test]
    fn ct_eq_matches_eq() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }
}
