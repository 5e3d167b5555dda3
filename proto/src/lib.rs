//! nid's wire contract and identifier arithmetic: the leaf crate every other crate depends on.
//!
//! - [`v1`]: the generated gRPC contract (package `nid.v1`), public and internal services.
//! - [`ids`]: UINs and VIDs: keyed permutations that carry their bucket, Verhoeff check digits and
//!   the MOSIP-style filters.
//! - [`bucket`]: the bucket count and the bucket of external keys such as RIDs.
//! - [`error`]: the error model shared by every service (gRPC codes plus rich details).
//! - [`codec`]: the one encoding of persisted values and log payloads (a format byte, then protobuf).
//!
//! Invariant: this crate does no I/O and depends on nothing that does (no RocksDB, no Raft, no
//! networking beyond tonic's generated code), so routers, tools and cells agree on it bit for bit.

pub mod bucket;
pub mod codec;
pub mod error;
pub mod ids;
pub mod placement;

/// The generated v1 contract.
#[allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]
pub mod v1 {
    tonic::include_proto!("nid.v1");
}

/// The encoded file descriptor set of the v1 contract, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("nid_v1_descriptor");
