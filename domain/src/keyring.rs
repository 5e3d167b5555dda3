//! At-rest protection (DESIGN.md §6): keyed hashes for keys, AES-256-GCM for values, Ed25519 for
//! decisions, HMAC for PIN verifiers and partner tokens.
//!
//! A [`Keyring`] holds one or more generations, each a key id and a master secret. Every generation
//! derives its own data key (AES-256-GCM; the RocksDB key is the associated data, so a value cannot
//! move to another key) and signing key, and every sealed value names the generation that sealed
//! it. Which generation seals new values is NOT this keyring's choice: it is the cell's active
//! generation, activated through the Raft log (see `nid-identity`), so every replica seals with the
//! same generation at the same log index. The index, PIN, partner-token and demographic-digest keys
//! name stored keys and verifiers, so they come from the ROOT generation (the lowest id) and do not
//! change with rotation; replacing them means re-indexing the data, an offline procedure not built.
//!
//! Master secrets come through [`KeySource`]: a file here, a KMS/HSM unwrap in production.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hmac;
use ring::signature::{Ed25519KeyPair, KeyPair as _};
use std::collections::BTreeMap;
use subtle::ConstantTimeEq as _;

/// An AES-GCM nonce.
pub type SealNonce = [u8; NONCE_LEN];

/// Where master secrets come from. A KMS/HSM implementation returns the same pairs after
/// unwrapping them (envelope encryption), so nothing else changes.
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
            let id: u32 = id.trim().parse().map_err(|_| "keyring key id is not a number".to_string())?;
            let secret = hex::decode(secret.trim()).map_err(|_| "keyring secret is not hex".to_string())?;
            out.push((id, secret));
        }
        Ok(out)
    }
}

/// One generation's keys.
struct Generation {
    data: LessSafeKey,
    signing: Ed25519KeyPair,
    signing_key_id: String,
    fingerprint: [u8; 8],
}

impl Generation {
    fn new(id: u32, master: &[u8]) -> Result<Generation, String> {
        if master.len() < 32 {
            return Err(format!("master secret {id} has {} bytes; at least 32 are required", master.len()));
        }
        let root = hmac::Key::new(hmac::HMAC_SHA256, master);
        let derive = |label: &[u8]| hmac::sign(&root, label);
        let data = LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, derive(b"nid/v1/keyring/data").as_ref())
                .map_err(|_| "derive data key".to_string())?,
        );
        let seed = derive(b"nid/v1/keyring/signing");
        let signing = Ed25519KeyPair::from_seed_unchecked(&seed.as_ref()[..32])
            .map_err(|_| "derive signing key".to_string())?;
        let public = ring::digest::digest(&ring::digest::SHA256, signing.public_key().as_ref());
        let signing_key_id = format!("ed25519-{id}-{}", hex::encode(&public.as_ref()[..4]));
        let mut fingerprint = [0u8; 8];
        fingerprint.copy_from_slice(&derive(b"nid/v1/keyring/fingerprint").as_ref()[..8]);
        Ok(Generation { data, signing, signing_key_id, fingerprint })
    }
}

/// The keys derived from the root generation (see the module documentation).
struct RootKeys {
    index: hmac::Key,
    pin: hmac::Key,
    token: hmac::Key,
    demographic: hmac::Key,
    fingerprint: [u8; 8],
}

/// Keys derived from the cluster's master secrets.
pub struct Keyring {
    generations: BTreeMap<u32, Generation>,
    root: RootKeys,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring").field("generations", &self.generation_ids()).finish_non_exhaustive()
    }
}

/// Why a sealed value could not be opened.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    /// Too short to be a sealed value.
    #[error("sealed value truncated")]
    Truncated,
    /// Sealed under a generation this keyring does not hold.
    #[error("sealed under key generation {0}, which this keyring does not hold")]
    UnknownKey(u32),
    /// The ciphertext, its tag or its associated data does not match.
    #[error("sealed value does not authenticate (tampered, or moved to another key)")]
    Tampered,
}

/// The length of a sealed value's header: generation id (u32 BE) then the nonce.
pub const SEAL_HEADER: usize = 4 + NONCE_LEN;

impl Keyring {
    /// A keyring of several generations (any order; ids must be distinct).
    pub fn from_generations(masters: &[(u32, Vec<u8>)]) -> Result<Keyring, String> {
        let mut generations = BTreeMap::new();
        for (id, master) in masters {
            if generations.insert(*id, Generation::new(*id, master)?).is_some() {
                return Err("keyring key ids must be distinct".into());
            }
        }
        let (&root_id, _) = generations.first_key_value().ok_or("the keyring holds no key")?;
        let root_master = masters
            .iter()
            .find(|(id, _)| *id == root_id)
            .map(|(_, m)| m.as_slice())
            .ok_or("the keyring holds no key")?;
        let master = hmac::Key::new(hmac::HMAC_SHA256, root_master);
        let key = |label: &[u8]| hmac::Key::new(hmac::HMAC_SHA256, hmac::sign(&master, label).as_ref());
        let index_tag = hmac::sign(&master, b"nid/v1/keyring/index");
        let mut fingerprint = [0u8; 8];
        fingerprint
            .copy_from_slice(&ring::digest::digest(&ring::digest::SHA256, index_tag.as_ref()).as_ref()[..8]);
        let root = RootKeys {
            index: hmac::Key::new(hmac::HMAC_SHA256, index_tag.as_ref()),
            pin: key(b"nid/v1/keyring/pin"),
            token: key(b"nid/v1/keyring/partner-token"),
            demographic: key(b"nid/v1/keyring/demographic"),
            fingerprint,
        };
        Ok(Keyring { generations, root })
    }

    /// A keyring of one generation.
    pub fn from_master(id: u32, master: &[u8]) -> Result<Keyring, String> {
        Keyring::from_generations(&[(id, master.to_vec())])
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

    /// The generations held, ascending.
    pub fn generation_ids(&self) -> Vec<u32> {
        self.generations.keys().copied().collect()
    }

    /// The root generation (lowest id): the one a new cell seals with until another is activated.
    pub fn root_generation(&self) -> u32 {
        self.generations.keys().next().copied().unwrap_or(0)
    }

    /// Whether this keyring holds generation `id`.
    pub fn holds(&self, id: u32) -> bool {
        self.generations.contains_key(&id)
    }

    /// A short public fingerprint of generation `id` (to check that replicas hold the same secret
    /// under one id without revealing it).
    pub fn fingerprint(&self, id: u32) -> Option<[u8; 8]> {
        self.generations.get(&id).map(|g| g.fingerprint)
    }

    /// The fingerprint of the root keys (index, PIN, token, digests): replicas whose fingerprints
    /// differ would write different keys for the same identity, so commands carry it and apply
    /// checks it.
    pub fn index_fingerprint(&self) -> [u8; 8] {
        self.root.fingerprint
    }

    /// Every published signing key: (key id, raw public key), highest generation first.
    pub fn signing_public_keys(&self) -> Vec<(String, Vec<u8>)> {
        self.generations
            .values()
            .rev()
            .map(|g| (g.signing_key_id.clone(), g.signing.public_key().as_ref().to_vec()))
            .collect()
    }

    /// HMAC-SHA256 of `(domain, natural key)` under the index key.
    pub fn index_hash(&self, domain: &[u8], natural_key: &[u8]) -> [u8; 32] {
        let mut ctx = hmac::Context::with_key(&self.root.index);
        ctx.update(&(domain.len() as u32).to_be_bytes());
        ctx.update(domain);
        ctx.update(natural_key);
        tag32(ctx.sign())
    }

    /// The PIN verifier MAC: HMAC-SHA256 under the PIN key over (salt, PIN).
    pub fn pin_mac(&self, salt: &[u8], pin: &str) -> [u8; 32] {
        let mut ctx = hmac::Context::with_key(&self.root.pin);
        ctx.update(salt);
        ctx.update(pin.as_bytes());
        tag32(ctx.sign())
    }

    /// A keyed digest of one demographic field value (`field` separates the fields), compared at
    /// authentication instead of the value itself.
    pub fn demographic_digest(&self, field: &[u8], value: &str) -> [u8; 32] {
        let mut ctx = hmac::Context::with_key(&self.root.demographic);
        ctx.update(&(field.len() as u32).to_be_bytes());
        ctx.update(field);
        ctx.update(value.as_bytes());
        tag32(ctx.sign())
    }

    /// The partner-specific token of a person: HMAC(token key, partner id || UIN), hex. Stable per
    /// (partner, person); two partners get unrelated tokens and cannot correlate a person.
    pub fn partner_token(&self, partner_id: &str, uin: &str) -> String {
        let mut ctx = hmac::Context::with_key(&self.root.token);
        ctx.update(&(partner_id.len() as u32).to_be_bytes());
        ctx.update(partner_id.as_bytes());
        ctx.update(uin.as_bytes());
        hex::encode(ctx.sign().as_ref())
    }

    /// Signs `message` with generation `generation`'s decision-signing key (Ed25519); returns the
    /// signature and the key id, or None when the generation is not held.
    pub fn sign(&self, generation: u32, message: &[u8]) -> Option<(Vec<u8>, &str)> {
        let g = self.generations.get(&generation)?;
        Some((g.signing.sign(message).as_ref().to_vec(), g.signing_key_id.as_str()))
    }

    /// Seals `plaintext` bound to `aad` (the RocksDB key) under generation `generation`.
    /// Layout: generation id (u32 BE) | nonce | ciphertext and tag.
    pub fn seal(
        &self,
        generation: u32,
        aad: &[u8],
        nonce: SealNonce,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, SealError> {
        let g = self.generations.get(&generation).ok_or(SealError::UnknownKey(generation))?;
        let mut out = Vec::with_capacity(SEAL_HEADER + plaintext.len() + AES_256_GCM.tag_len());
        out.extend_from_slice(&generation.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let tag = g
            .data
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut out[SEAL_HEADER..],
            )
            .map_err(|_| SealError::Tampered)?;
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Opens a value sealed by [`Keyring::seal`] under the same `aad`.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        let generation = sealed_generation(sealed)?;
        if sealed.len() < SEAL_HEADER + AES_256_GCM.tag_len() {
            return Err(SealError::Truncated);
        }
        let g = self.generations.get(&generation).ok_or(SealError::UnknownKey(generation))?;
        let nonce =
            Nonce::try_assume_unique_for_key(&sealed[4..SEAL_HEADER]).map_err(|_| SealError::Truncated)?;
        let mut body = sealed[SEAL_HEADER..].to_vec();
        let plain =
            g.data.open_in_place(nonce, Aad::from(aad), &mut body).map_err(|_| SealError::Tampered)?;
        let n = plain.len();
        body.truncate(n);
        Ok(body)
    }
}

/// The generation a sealed value names, without opening it.
pub fn sealed_generation(sealed: &[u8]) -> Result<u32, SealError> {
    let id: [u8; 4] = sealed.get(..4).and_then(|b| b.try_into().ok()).ok_or(SealError::Truncated)?;
    Ok(u32::from_be_bytes(id))
}

fn tag32(tag: hmac::Tag) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(&tag.as_ref()[..32]);
    out
}

/// The `i`-th nonce derived from a command's leader-chosen random seed: SHA-256(seed || i),
/// truncated. Every replica derives the same nonces, so every replica writes the same ciphertext.
pub fn derived_nonce(seed: &[u8], i: u32) -> SealNonce {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"nid/v1/nonce");
    ctx.update(seed);
    ctx.update(&i.to_be_bytes());
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&ctx.finish().as_ref()[..NONCE_LEN]);
    nonce
}

/// Constant-time equality for secrets and digests.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nonce() -> SealNonce {
        crate::random::bytes::<NONCE_LEN>().unwrap()
    }

    #[test]
    fn seal_open_round_trip_bound_to_key() {
        let k = Keyring::dev();
        let sealed = k.seal(0, b"key-a", nonce(), b"secret record").unwrap();
        assert!(!sealed.windows(6).any(|w| w == b"secret"), "no plaintext in the sealed value");
        assert_eq!(k.open(b"key-a", &sealed).unwrap(), b"secret record");
        assert_eq!(k.open(b"key-b", &sealed), Err(SealError::Tampered), "moved to another key");
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(k.open(b"key-a", &tampered), Err(SealError::Tampered));
        assert_eq!(k.open(b"key-a", &sealed[..10]), Err(SealError::Truncated));
        assert_eq!(k.open(b"key-a", &sealed[..2]), Err(SealError::Truncated));
        let other = Keyring::from_master(7, &[3u8; 32]).unwrap();
        assert_eq!(other.open(b"key-a", &sealed), Err(SealError::UnknownKey(0)));
        assert_eq!(k.seal(9, b"k", nonce(), b"v"), Err(SealError::UnknownKey(9)));
    }

    #[test]
    fn index_hash_is_keyed_and_domain_separated() {
        let a = Keyring::dev();
        let b = Keyring::from_master(1, &[9u8; 32]).unwrap();
        assert_eq!(a.index_hash(b"rid", b"R1"), a.index_hash(b"rid", b"R1"));
        assert_ne!(a.index_hash(b"rid", b"R1"), b.index_hash(b"rid", b"R1"));
        assert_ne!(a.index_hash(b"rid", b"R1"), a.index_hash(b"uin", b"R1"));
        assert_ne!(a.index_fingerprint(), b.index_fingerprint());
        assert!(Keyring::from_master(1, &[0u8; 16]).is_err());
    }

    #[test]
    fn keyring_file_parses_and_rejects_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, format!("3:{}\n", "ab".repeat(32))).unwrap();
        assert_eq!(Keyring::from_file(&p).unwrap().generation_ids(), vec![3]);
        std::fs::write(&p, "3:zz").unwrap();
        assert!(Keyring::from_file(&p).is_err());
        std::fs::write(&p, "nothing").unwrap();
        assert!(Keyring::from_file(&p).is_err());
        std::fs::write(&p, format!("# two generations\n1:{}\n1:{}\n", "ab".repeat(32), "cd".repeat(32)))
            .unwrap();
        assert!(Keyring::from_file(&p).is_err(), "duplicate ids");
    }

    #[test]
    fn rotation_keeps_old_values_readable_and_root_keys_stable() {
        let g1 = (1u32, vec![1u8; 32]);
        let g2 = (2u32, vec![2u8; 32]);
        let old = Keyring::from_generations(std::slice::from_ref(&g1)).unwrap();
        let rotated = Keyring::from_generations(&[g2, g1]).unwrap();
        let sealed_old = old.seal(1, b"k", nonce(), b"v1").unwrap();
        assert_eq!(rotated.open(b"k", &sealed_old).unwrap(), b"v1", "old generation still opens");
        let sealed_new = rotated.seal(2, b"k", nonce(), b"v2").unwrap();
        assert_eq!(sealed_generation(&sealed_new), Ok(2));
        assert_eq!(old.open(b"k", &sealed_new), Err(SealError::UnknownKey(2)));
        assert_eq!(old.index_hash(b"uin", b"1"), rotated.index_hash(b"uin", b"1"), "index keys stay");
        assert_eq!(old.index_fingerprint(), rotated.index_fingerprint());
        assert_eq!(old.pin_mac(&[0; 16], "1234"), rotated.pin_mac(&[0; 16], "1234"));
        assert_eq!(old.partner_token("p", "1"), rotated.partner_token("p", "1"));
        assert_eq!(old.fingerprint(1), rotated.fingerprint(1));
        assert_ne!(rotated.fingerprint(1), rotated.fingerprint(2));
        assert_eq!(rotated.root_generation(), 1);
        let published: Vec<String> = rotated.signing_public_keys().into_iter().map(|(id, _)| id).collect();
        assert_eq!(published.len(), 2);
        assert!(published[0].starts_with("ed25519-2-") && published[1].starts_with("ed25519-1-"));
        let same_id_other_secret = Keyring::from_master(1, &[7u8; 32]).unwrap();
        assert_ne!(
            same_id_other_secret.fingerprint(1),
            old.fingerprint(1),
            "the fingerprint names the secret"
        );
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
        assert_ne!(k.partner_token("ab", "1"), k.partner_token("a", "b1"));
        assert_eq!(t1.len(), 64);
    }

    #[test]
    fn signatures_verify_with_the_published_key_and_fail_after_one_byte_changes() {
        use ring::signature::{ED25519, UnparsedPublicKey};
        let k = Keyring::dev();
        let message = b"decision bytes".to_vec();
        let (sig, key_id) = k.sign(0, &message).unwrap();
        assert!(key_id.starts_with("ed25519-0-"));
        let (_, public) = &k.signing_public_keys()[0];
        let public = UnparsedPublicKey::new(&ED25519, public);
        assert!(public.verify(&message, &sig).is_ok());
        let mut changed = message.clone();
        changed[0] ^= 1;
        assert!(public.verify(&changed, &sig).is_err());
        assert!(k.sign(5, &message).is_none());
    }

    #[test]
    fn derived_nonces_differ_per_index_and_seed_and_ct_eq_matches_eq() {
        let a = derived_nonce(&[1; 16], 0);
        assert_eq!(a, derived_nonce(&[1; 16], 0));
        assert_ne!(a, derived_nonce(&[1; 16], 1));
        assert_ne!(a, derived_nonce(&[2; 16], 0));
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }
}
