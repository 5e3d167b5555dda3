//! Sealed values in and out of the `data` column family: open-and-decode for reads (apply and
//! views alike, through [`KvRead`]) and encode-and-seal for apply's writes, with nonces derived
//! from the command's seed so every replica writes the same bytes.
//!
//! A value that names a key generation this replica does not hold is not a refusal: it halts the
//! replica ([`Missing::halt`]), because the other replicas can open it and this one would diverge.

use nid_domain::keyring::{Keyring, SealError, derived_nonce};
use nid_engine::{ApplyContext, KvRead, StorageError};
use nid_proto::codec;

/// Why a stored value could not be read.
#[derive(Debug)]
pub enum ReadError {
    /// This replica lacks the key generation the value was sealed with.
    MissingKey(u32),
    /// The value does not open (tampered, or corrupt) or does not decode.
    Corrupt(&'static str),
    /// The storage failed.
    Storage(StorageError),
}

impl From<StorageError> for ReadError {
    fn from(e: StorageError) -> ReadError {
        ReadError::Storage(e)
    }
}

impl From<ReadError> for StorageError {
    fn from(e: ReadError) -> StorageError {
        match e {
            ReadError::MissingKey(id) => StorageError::Halted(format!(
                "a stored value is sealed with key generation {id}, which this replica's keyring does not hold; \
                 add it to the keyring file and restart"
            )),
            ReadError::Corrupt(what) => {
                StorageError::Halted(format!("stored {what} does not open or decode"))
            }
            ReadError::Storage(e) => e,
        }
    }
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::MissingKey(id) => write!(f, "key generation {id} is not in this replica's keyring"),
            ReadError::Corrupt(what) => write!(f, "stored {what} does not open or decode"),
            ReadError::Storage(e) => write!(f, "{e}"),
        }
    }
}

/// Opens and decodes the sealed value under `key` (associated data `aad`).
pub fn read<T: prost::Message + Default>(
    store: &dyn KvRead,
    keyring: &Keyring,
    key: &[u8],
    aad: &[u8],
    what: &'static str,
) -> Result<Option<T>, ReadError> {
    match store.get(key)? {
        Some(sealed) => open(keyring, aad, &sealed, what).map(Some),
        None => Ok(None),
    }
}

/// Opens and decodes a sealed value.
pub fn open<T: prost::Message + Default>(
    keyring: &Keyring,
    aad: &[u8],
    sealed: &[u8],
    what: &'static str,
) -> Result<T, ReadError> {
    let plain = keyring.open(aad, sealed).map_err(|e| match e {
        SealError::UnknownKey(id) => ReadError::MissingKey(id),
        SealError::Tampered | SealError::Truncated => ReadError::Corrupt(what),
    })?;
    codec::decode(&plain).map_err(|_| ReadError::Corrupt(what))
}

/// Seals values for apply with the cell's active generation and nonces derived from one seed.
pub struct Writer<'k> {
    /// The keyring.
    pub keyring: &'k Keyring,
    /// The generation that seals.
    pub generation: u32,
    /// The command's seed.
    pub seed: &'k [u8],
}

impl Writer<'_> {
    /// Seals `value` (nonce number `nonce`) bound to `aad` and writes it under `key`.
    pub fn put<T: prost::Message>(
        &self,
        ctx: &mut ApplyContext<'_>,
        key: &[u8],
        aad: &[u8],
        nonce: u32,
        value: &T,
    ) -> Result<(), StorageError> {
        let sealed = self
            .keyring
            .seal(self.generation, aad, derived_nonce(self.seed, nonce), &codec::encode(value))
            .map_err(|e| StorageError::Halted(format!("cannot seal with the active key generation: {e}")))?;
        ctx.put(key, sealed)
    }
}

/// Nonce numbers of the values one command writes (each value its own nonce).
pub mod nonce {
    /// The auth profile.
    pub const PROFILE: u32 = 0;
    /// The hot auth state.
    pub const STATE: u32 = 1;
    /// The cold record.
    pub const COLD: u32 = 2;
    /// A history entry.
    pub const HISTORY: u32 = 3;
    /// A VID index value.
    pub const VID: u32 = 4;
    /// An audit record.
    pub const AUDIT: u32 = 5;
    /// A replay marker.
    pub const TXN: u32 = 6;
    /// A request record.
    pub const REQUEST: u32 = 7;
}
