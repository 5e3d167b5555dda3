//! Where the control state lives in the `data` column family (above every bucket prefix, so a
//! snapshot carries it and no bucket range meets it) and how it is read back.

use nid_engine::{KvRead, StorageError};
use nid_proto::codec;
use nid_proto::v1::{ClusterConfig, ListPartnersInternalResponse, RoutingTable};

/// The cluster config.
pub const CONFIG: &[u8] = &[0xff, 0xff, 0x01];
/// The routing table (with the cell registry).
pub const TABLE: &[u8] = &[0xff, 0xff, 0x02];
/// The partner list.
pub const PARTNERS: &[u8] = &[0xff, 0xff, 0x03];

fn read<T: prost::Message + Default>(
    store: &dyn KvRead,
    key: &[u8],
    what: &'static str,
) -> Result<Option<T>, StorageError> {
    match store.get(key)? {
        Some(bytes) => {
            codec::decode(&bytes).map(Some).map_err(|source| StorageError::Corrupt { what, source })
        }
        None => Ok(None),
    }
}

/// The cluster config (None before the cluster exists).
pub fn config(store: &dyn KvRead) -> Result<Option<ClusterConfig>, StorageError> {
    read(store, CONFIG, "cluster config")
}

/// The routing table (None before the cluster exists).
pub fn table(store: &dyn KvRead) -> Result<Option<RoutingTable>, StorageError> {
    read(store, TABLE, "routing table")
}

/// The partners with their credential verifiers.
pub fn partners(store: &dyn KvRead) -> Result<ListPartnersInternalResponse, StorageError> {
    Ok(read(store, PARTNERS, "partner list")?.unwrap_or_default())
}
