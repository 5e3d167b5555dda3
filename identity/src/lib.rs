//! nid-identity: the identity state machine a data cell replicates ([`machine::IdentityMachine`],
//! an `nid_engine::StateMachine`), and the reads of its applied state ([`queries`]).
//!
//! The rules live in `nid-domain`; this crate decides only what the log order decides and where
//! each value goes: [`enroll`] and [`ops`] apply commands, [`sweep`] forgets what is past its
//! window, [`lookup`] and [`store`] find and open an identity's parts, [`keys_state`] is the key
//! generation the cell seals with, changed only through the log.
//!
//! Invariant: apply is total and deterministic. A command that cannot apply is a `Rejection` in
//! the output (the same on every replica); only this replica's own inability to go on (a missing
//! key generation, a failed disk) is an error, and it halts the replica.

pub mod enroll;
pub mod keys_state;
pub mod lookup;
pub mod machine;
pub mod ops;
pub mod queries;
pub mod store;
pub mod sweep;

pub use keys_state::CellKeys;
pub use machine::{Applied, IdentityMachine};
