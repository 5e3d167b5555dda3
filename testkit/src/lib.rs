//! nid-testkit: an in-process nid cell for tests (a dev-dependency only; no production crate links
//! it). [`cluster::Cluster`] runs real replicas of any state machine over a filtered in-memory
//! [`net::Net`]; [`toy`] is the key-value state machine the engine's own tests replicate;
//! [`identity::IdentityCluster`] is a data cell with the services `nid-cell` serves.

pub mod cluster;
pub mod identity;
pub mod net;
pub mod toy;

pub use cluster::{Cluster, WAIT};
pub use net::{DropTypes, Filter, Partition};
