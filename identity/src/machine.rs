//! The identity state machine: what a data cell's engine applies. Commands come from
//! `nid_domain::prepare` on the leader; apply checks and writes. The engine has already checked
//! that the cell owns the command's bucket.

use crate::keys_state::CellKeys;
use crate::{enroll, ops, sweep};
use nid_domain::commands::{ActivateKeysCommand, Command, command};
use nid_domain::keys::CELL_KEYS;
use nid_domain::outcome::{KeysActivated, Outcome, Rejection};
use nid_domain::records::{GenerationStamp, KeyState};
use nid_engine::{ApplyContext, KvRead as _, StateMachine, StorageError, View};
use nid_proto::codec;
use std::sync::Arc;

/// What applying an identity command produced.
pub type Applied = Result<Outcome, Rejection>;

/// The identity state machine of one replica.
pub struct IdentityMachine {
    keys: Arc<CellKeys>,
}

impl IdentityMachine {
    /// A machine sealing and opening with `keys` (shared with the replica's services).
    pub fn new(keys: Arc<CellKeys>) -> IdentityMachine {
        IdentityMachine { keys }
    }
}

impl StateMachine for IdentityMachine {
    type Command = Command;
    type Output = Applied;

    fn encode(command: &Command) -> Vec<u8> {
        codec::encode(command)
    }

    fn decode(bytes: &[u8]) -> Result<Command, String> {
        codec::decode(bytes).map_err(|e| e.to_string())
    }

    fn bucket(command: &Command) -> Option<u32> {
        command.bucket()
    }

    fn apply(&mut self, command: Command, ctx: &mut ApplyContext<'_>) -> Result<Applied, StorageError> {
        match command.kind {
            Some(command::Kind::Enroll(c)) => enroll::apply(&self.keys, c, ctx),
            Some(command::Kind::Identity(c)) => ops::apply(&self.keys, c, ctx),
            Some(command::Kind::Sweep(c)) => sweep::apply(&self.keys, &c, ctx),
            Some(command::Kind::ActivateKeys(c)) => self.activate(&c, ctx),
            None => Ok(Err(Rejection::Malformed("empty command".into()))),
        }
    }

    fn restore(&mut self, view: &View<'_>) -> Result<(), StorageError> {
        let state = match view.get(CELL_KEYS)? {
            Some(bytes) => codec::decode::<KeyState>(&bytes)
                .map_err(|source| StorageError::Corrupt { what: "cell key state", source })?,
            None => KeyState::default(),
        };
        if let Some(active) = &state.active {
            self.check_held(active)?;
        }
        self.keys.set_state(state);
        Ok(())
    }
}

impl IdentityMachine {
    fn check_held(&self, stamp: &GenerationStamp) -> Result<(), StorageError> {
        match self.keys.keyring().fingerprint(stamp.id) {
            Some(f) if f.as_slice() == stamp.fingerprint.as_slice() => Ok(()),
            Some(_) => Err(StorageError::Halted(format!(
                "key generation {} in this replica's keyring holds another secret than the cell activated",
                stamp.id
            ))),
            None => Err(StorageError::Halted(format!(
                "the cell seals with key generation {}, which this replica's keyring does not hold; \
                 add it to the keyring file and restart",
                stamp.id
            ))),
        }
    }

    fn activate(
        &mut self,
        c: &ActivateKeysCommand,
        ctx: &mut ApplyContext<'_>,
    ) -> Result<Applied, StorageError> {
        let stamp = GenerationStamp { id: c.id, fingerprint: c.fingerprint.clone() };
        self.check_held(&stamp)?;
        let mut state = self.keys.state();
        if state.active.as_ref() != Some(&stamp) {
            state.history.push(stamp.clone());
            state.active = Some(stamp);
        }
        ctx.put(CELL_KEYS, codec::encode(&state))?;
        self.keys.set_state(state);
        tracing::info!(generation = c.id, "key generation active");
        Ok(Ok(Outcome::KeysActivated(KeysActivated(c.id))))
    }
}
