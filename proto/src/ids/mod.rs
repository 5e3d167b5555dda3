//! UINs and VIDs: identifiers that carry their bucket (DESIGN.md section 3).
//!
//! An identifier is a body followed by a Verhoeff check digit. The body is a keyed permutation of
//! `rank * BUCKETS + bucket`, so whoever holds the cluster's id-scheme seed finds the bucket of an
//! identifier in O(1) and a cell can generate a random identifier inside a chosen bucket.
//!
//! | kind | digits | body domain | ranks per bucket |
//! |------|--------|-------------|------------------|
//! | UIN  | 12     | 10^11       | 6,103,515        |
//! | VID  | 16     | 10^15       | 61,035,156,250   |
//!
//! Bodies whose preimage lies past the last full rank are never issued and fail validation.
//! Errors never repeat the identifier they reject: identifiers are personal data.

mod filters;
mod permutation;
mod verhoeff;

pub use filters::FilterViolation;
pub use permutation::Permutation;

use crate::bucket::{BUCKETS, BucketId};
use ring::{digest, hmac};

/// How many random candidates generation tries before giving up (about 1 in 12 passes the filters).
const MAX_GENERATION_ATTEMPTS: u32 = 10_000;

/// The two kinds of identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdKind {
    /// Unique identification number, 12 digits, one per person, permanent.
    Uin,
    /// Virtual id, 16 digits, revocable, unlinkable to its UIN without the cell's data.
    Vid,
}

impl IdKind {
    /// Total digits including the check digit.
    pub const fn digits(self) -> usize {
        match self {
            IdKind::Uin => 12,
            IdKind::Vid => 16,
        }
    }

    /// Size of the body domain (10 to the number of body digits).
    const fn body_domain(self) -> u64 {
        match self {
            IdKind::Uin => 100_000_000_000,
            IdKind::Vid => 1_000_000_000_000_000,
        }
    }

    /// Number of ranks every bucket has in full.
    const fn ranks_per_bucket(self) -> u64 {
        self.body_domain() / BUCKETS as u64
    }

    /// Feistel split of the body domain (a * b == body_domain).
    const fn split(self) -> (u64, u64) {
        match self {
            IdKind::Uin => (100_000, 1_000_000),
            IdKind::Vid => (10_000_000, 100_000_000),
        }
    }

    fn key_label(self) -> &'static [u8] {
        match self {
            IdKind::Uin => b"nid/v1/ids/uin",
            IdKind::Vid => b"nid/v1/ids/vid",
        }
    }

    /// Lowercase name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            IdKind::Uin => "uin",
            IdKind::Vid => "vid",
        }
    }
}

/// Why a string is not a valid identifier. The message never contains the identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// Empty input.
    #[error("identifier is empty")]
    Empty,
    /// A character is not an ASCII digit.
    #[error("identifier must contain only digits (position {position} is not a digit)")]
    NotDigits {
        /// Zero-based position of the first offending character.
        position: usize,
    },
    /// Length fits neither kind (or not the kind asked for).
    #[error("identifier has {actual} characters; expected {expected}")]
    WrongLength {
        /// Length given.
        actual: usize,
        /// What was acceptable, in words.
        expected: &'static str,
    },
    /// The Verhoeff check digit does not match.
    #[error("check digit mismatch: a digit is mistyped or two adjacent digits are swapped")]
    CheckDigit,
    /// The body was never issued by this cluster's id scheme.
    #[error("not issued by this cluster's id scheme (wrong cluster, or a forged number)")]
    OutOfScheme,
    /// The identifier fails a generation filter, so it was never issued.
    #[error("never issued: {0}")]
    Filter(FilterViolation),
}

/// A validated identifier.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Identifier {
    kind: IdKind,
    /// All digits, check digit included, as a number (16 digits fit a u64).
    value: u64,
    bucket: BucketId,
}

impl std::fmt::Debug for Identifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Identifiers are personal data: debug output (and so logs of structs holding one) never
        // prints the digits.
        f.debug_struct("Identifier")
            .field("kind", &self.kind)
            .field("bucket", &self.bucket)
            .finish_non_exhaustive()
    }
}

impl Identifier {
    /// UIN or VID.
    pub fn kind(&self) -> IdKind {
        self.kind
    }

    /// The bucket the identifier lives in.
    pub fn bucket(&self) -> BucketId {
        self.bucket
    }

    /// The digits as a string, zero-padded to the kind's length. Handle as personal data.
    pub fn to_digits(&self) -> String {
        format!("{:0width$}", self.value, width = self.kind.digits())
    }

    /// The identifier as a number (check digit included), for compact keyed hashing.
    pub fn value(&self) -> u64 {
        self.value
    }
}

/// The cluster's id-scheme seed: 32 bytes fixed at cluster creation.
#[derive(Clone, PartialEq, Eq)]
pub struct IdSchemeSeed([u8; 32]);

impl std::fmt::Debug for IdSchemeSeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IdSchemeSeed(..)")
    }
}

/// Why a seed could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("id-scheme seed must be 64 hexadecimal characters (32 bytes)")]
pub struct SeedError;

impl IdSchemeSeed {
    /// Wraps raw seed bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> IdSchemeSeed {
        IdSchemeSeed(bytes)
    }

    /// Parses 64 hexadecimal characters.
    pub fn from_hex(text: &str) -> Result<IdSchemeSeed, SeedError> {
        let text = text.trim();
        if text.len() != 64 || !text.is_ascii() {
            return Err(SeedError);
        }
        let mut bytes = [0u8; 32];
        for (i, chunk) in text.as_bytes().chunks(2).enumerate() {
            let pair = std::str::from_utf8(chunk).map_err(|_| SeedError)?;
            bytes[i] = u8::from_str_radix(pair, 16).map_err(|_| SeedError)?;
        }
        Ok(IdSchemeSeed(bytes))
    }

    /// The documented development seed: SHA-256 of "nid dev id-scheme seed; never use in
    /// production". Development clusters and tools use it when no seed is configured.
    pub fn dev() -> IdSchemeSeed {
        let hash = digest::digest(&digest::SHA256, DEV_SEED_PHRASE);
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(hash.as_ref());
        IdSchemeSeed(bytes)
    }

    /// The seed's bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The phrase whose SHA-256 is the development seed.
pub const DEV_SEED_PHRASE: &[u8] = b"nid dev id-scheme seed; never use in production";

/// Validates, generates and locates identifiers for one cluster.
#[derive(Debug, Clone)]
pub struct IdScheme {
    uin: Permutation,
    vid: Permutation,
}

impl IdScheme {
    /// Builds the scheme from the cluster's seed.
    pub fn new(seed: &IdSchemeSeed) -> IdScheme {
        let permutation = |kind: IdKind| {
            let master = hmac::Key::new(hmac::HMAC_SHA256, seed.as_bytes());
            let key = hmac::sign(&master, kind.key_label());
            let (a, b) = kind.split();
            Permutation::new(key.as_ref(), a, b)
        };
        IdScheme { uin: permutation(IdKind::Uin), vid: permutation(IdKind::Vid) }
    }

    /// The scheme of development clusters ([`IdSchemeSeed::dev`]).
    pub fn dev() -> IdScheme {
        IdScheme::new(&IdSchemeSeed::dev())
    }

    fn permutation(&self, kind: IdKind) -> &Permutation {
        match kind {
            IdKind::Uin => &self.uin,
            IdKind::Vid => &self.vid,
        }
    }

    /// Validates a UIN or a VID, telling them apart by length.
    pub fn parse(&self, text: &str) -> Result<Identifier, IdError> {
        let kind = match text.len() {
            12 => IdKind::Uin,
            16 => IdKind::Vid,
            0 => return Err(IdError::Empty),
            actual => return Err(IdError::WrongLength { actual, expected: "12 (UIN) or 16 (VID)" }),
        };
        self.parse_kind(text, kind)
    }

    /// Validates an identifier of one kind.
    pub fn parse_kind(&self, text: &str, kind: IdKind) -> Result<Identifier, IdError> {
        if text.is_empty() {
            return Err(IdError::Empty);
        }
        if let Some(position) = text.bytes().position(|b| !b.is_ascii_digit()) {
            return Err(IdError::NotDigits { position });
        }
        if text.len() != kind.digits() {
            let expected = match kind {
                IdKind::Uin => "12 (UIN)",
                IdKind::Vid => "16 (VID)",
            };
            return Err(IdError::WrongLength { actual: text.len(), expected });
        }
        let digits: Vec<u8> = text.bytes().map(|b| b - b'0').collect();
        if !verhoeff::is_valid(&digits) {
            return Err(IdError::CheckDigit);
        }
        if let Some(violation) = filters::first_violation(&digits) {
            return Err(IdError::Filter(violation));
        }
        let value = digits.iter().fold(0u64, |acc, &d| acc * 10 + u64::from(d));
        let body = value / 10;
        let preimage = self.permutation(kind).backward(body);
        let rank = preimage / u64::from(BUCKETS);
        if rank >= kind.ranks_per_bucket() {
            return Err(IdError::OutOfScheme);
        }
        let bucket = BucketId::new((preimage % u64::from(BUCKETS)) as u32)
            .expect("a value modulo BUCKETS is a bucket");
        Ok(Identifier { kind, value, bucket })
    }

    /// Generates a random identifier of `kind` inside `bucket`, drawing randomness from `random`
    /// (a cryptographic source in production; the caller chooses so commands stay deterministic:
    /// the leader generates, the command carries the result).
    pub fn generate(
        &self,
        kind: IdKind,
        bucket: BucketId,
        random: &mut dyn FnMut() -> Result<u64, GenerationError>,
    ) -> Result<Identifier, GenerationError> {
        let ranks = kind.ranks_per_bucket();
        for _ in 0..MAX_GENERATION_ATTEMPTS {
            // Modulo bias is below 2^-30 for these domains and irrelevant to uniqueness.
            let rank = random()? % ranks;
            let body = self.permutation(kind).forward(rank * u64::from(BUCKETS) + u64::from(bucket.get()));
            if let Some(identifier) = self.with_check_digit(kind, body, bucket) {
                return Ok(identifier);
            }
        }
        Err(GenerationError::Exhausted)
    }

    fn with_check_digit(&self, kind: IdKind, body: u64, bucket: BucketId) -> Option<Identifier> {
        let body_digits = kind.digits() - 1;
        let mut digits: Vec<u8> = format!("{body:0body_digits$}").bytes().map(|b| b - b'0').collect();
        let check = verhoeff::check_digit(&digits);
        digits.push(check);
        if filters::first_violation(&digits).is_some() {
            return None;
        }
        Some(Identifier { kind, value: body * 10 + u64::from(check), bucket })
    }
}

/// Why generation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GenerationError {
    /// No candidate passed the filters (practically impossible: each passes with probability
    /// about 1/12).
    #[error("no identifier passing the filters found after {MAX_GENERATION_ATTEMPTS} attempts")]
    Exhausted,
    /// The random source failed.
    #[error("the random source failed")]
    RandomSource,
}

/// Draws a u64 from the operating system's cryptographic random source.
pub fn system_random_u64() -> Result<u64, GenerationError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    ring::rand::SystemRandom::new().fill(&mut bytes).map_err(|_| GenerationError::RandomSource)?;
    Ok(u64::from_be_bytes(bytes))
}

#[cfg(test)]
mod tests;
