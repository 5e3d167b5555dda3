//! nid-control: the state machine of the control cell ([`machine::ControlMachine`]): cluster
//! config, routing table, cell registry and partners, replicated by `nid-engine` like any other
//! state machine. [`commands`] are what its log carries (and the checks a service runs before
//! proposing them); [`store`] is where its state lives and how services read it.
//!
//! Invariants: routing-table versions only grow; a bucket changes owner only through a
//! compare-and-swap on its epoch; apply never panics (checked arithmetic, deterministic refusals).

pub mod commands;
pub mod machine;
pub mod store;

pub use commands::{Changed, ControlCommand, ControlRejection};
pub use machine::{ControlApplied, ControlMachine};
