//! The keys a cell seals with, shared by its state machine (which changes the active generation
//! only when the log says so) and its services (which seal commands and sign decisions with it).
//!
//! Before the first activation a cell seals with its keyring's root generation. A generation
//! becomes active through an `ActivateKeys` command that the leader proposes only once every voter
//! holds it; applying it on a replica that lacks it (or holds another secret under its id) halts
//! that replica instead of letting it seal or open differently from the others.

use nid_domain::keyring::Keyring;
use nid_domain::records::{GenerationStamp, KeyState};
use std::sync::{Arc, RwLock};

/// The keyring and the cell's key state.
#[derive(Debug)]
pub struct CellKeys {
    keyring: RwLock<Arc<Keyring>>,
    state: RwLock<KeyState>,
}

impl CellKeys {
    /// Keys from `keyring`, before any activation is known.
    pub fn new(keyring: Keyring) -> CellKeys {
        CellKeys { keyring: RwLock::new(Arc::new(keyring)), state: RwLock::new(KeyState::default()) }
    }

    /// The keyring.
    pub fn keyring(&self) -> Arc<Keyring> {
        self.keyring.read().map(|k| k.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Replaces the keyring (a reloaded keyring file). The key state is unchanged: a newly loaded
    /// generation seals only once activated through the log.
    pub fn replace_keyring(&self, keyring: Keyring) {
        if let Ok(mut k) = self.keyring.write() {
            *k = Arc::new(keyring);
        }
    }

    /// The cell's key state as applied.
    pub fn state(&self) -> KeyState {
        self.state.read().map(|s| s.clone()).unwrap_or_default()
    }

    /// Records the applied key state.
    pub fn set_state(&self, state: KeyState) {
        if let Ok(mut s) = self.state.write() {
            *s = state;
        }
    }

    /// Halts unless a command was prepared with this replica's root keys: another root would write
    /// other keys for the same identity.
    pub fn check_fingerprint(&self, fingerprint: &[u8]) -> Result<(), nid_engine::StorageError> {
        if fingerprint == self.keyring().index_fingerprint().as_slice() {
            return Ok(());
        }
        Err(nid_engine::StorageError::Halted(
            "this replica's root key generation differs from the leader's (index fingerprint mismatch); \
             every replica of a cell needs the same keyring"
                .into(),
        ))
    }

    /// The generation that seals and signs now.
    pub fn active_generation(&self) -> u32 {
        match self.state().active {
            Some(GenerationStamp { id, .. }) => id,
            None => self.keyring().root_generation(),
        }
    }
}
