//! nid-engine: one replica of a Raft group (tikv raft-rs) over RocksDB, generic over the
//! [`StateMachine`] it replicates. It knows nothing of identities: the identity and control state
//! machines plug in from their own crates, and its own tests use a toy state machine.
//!
//! Bottom up: [`keys`], [`db`] and [`state`] (the engine's keyspace, RocksDB and persisted
//! state); [`storage`]
//! (`raft::Storage` over RocksDB) and [`snapshot`] (snapshots as SST files); [`state_machine`]
//! (the trait, apply contexts and read views); [`buckets`] (ownership, the fence); [`peer`] (the
//! Raft loop on its own thread) fed by [`mailbox`]; [`node`] (the handle services use);
//! [`transport`] and [`transport_service`] (gRPC between replicas) dialing from the
//! [`address_book`]; [`membership`] (checked membership changes); [`metrics`]; [`logger`].
//!
//! Invariants: entries are applied only after Raft commits them, in order, each Ready's applied
//! entries in ONE write batch with the apply state they advance to; apply never panics on a
//! committed entry (a command that cannot apply is refused the same way on every replica, and a
//! replica that cannot go on stops instead of diverging); writes to a bucket apply only while the
//! cell owns it.

pub mod address_book;
pub mod bucket_data;
pub mod buckets;
pub mod db;
pub mod error;
pub mod keys;
pub mod logger;
pub mod mailbox;
pub mod membership;
pub mod metrics;
pub mod node;
pub mod peer;
pub mod snapshot;
pub mod state;
pub mod state_machine;
pub mod storage;
pub mod transport;
pub mod transport_service;

pub use buckets::{BucketRecord, BucketState};
pub use error::{EngineError, StorageError};
pub use node::{Node, NodeSetup};
pub use peer::{PeerConfig, PeerStatus, Transport};
pub use state::Member;
pub use state_machine::{ApplyContext, KvRead, StateMachine, View};
