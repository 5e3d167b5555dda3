//! nid-domain: the identity domain, pure. No RocksDB, no Raft, no gRPC server: the router
//! validates with it, the identity state machine applies with it, and its tests build in seconds.
//!
//! - [`validate`]: every public request checked field by field (names the field, never the value).
//! - [`prepare`]: the leader's side: a validated request becomes a command (candidates, salts,
//!   digests and seals chosen once, before proposing).
//! - [`commands`] and [`outcome`]: what the Raft log carries, and what apply answers (typed).
//! - [`records`], [`keys`]: the stored schema (encoded with `nid_proto::codec`: protobuf with our
//!   own tags behind a format byte) and the key layout of a bucket.
//! - [`lifecycle`], [`authenticate`], [`demographics`], [`totp`]: the rules, as pure functions
//!   over stored records with time taken from the command.
//! - [`keyring`], [`random`], [`time`]: keys and sealing, randomness, clocks and dates.
//! - [`views`]: stored records back to public answers, and the signed decision.
//!
//! Invariant: nothing here performs I/O except reading a keyring file and drawing from the
//! system's random source; apply-side functions are deterministic in their inputs.

pub mod authenticate;
pub mod commands;
pub mod demographics;
pub mod keyring;
pub mod keys;
pub mod lifecycle;
pub mod outcome;
pub mod prepare;
pub mod random;
pub mod records;
pub mod time;
pub mod totp;
pub mod validate;
pub mod views;
