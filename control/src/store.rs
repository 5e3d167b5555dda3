//! Where the control state lives in the `data` column family (above every bucket prefix, so a
//! snapshot carries it and no bucket range meets it) and how it is read back.

use nid_engine::{KvRead, StorageError};
use nid_proto::codec;
use nid_proto::v1::{ClusterConfig, ListPartnersInternalResponse, RebalanceSettings, RoutingTable};

/// The cluster config.
pub const CONFIG: &[u8] = &[0xff, 0xff, 0x01];
/// The routing table (with the cell registry).
pub const TABLE: &[u8] = &[0xff, 0xff, 0x02];
/// The partner list.
pub const PARTNERS: &[u8] = &[0xff, 0xff, 0x03];
/// The migration log ([`crate::commands::MigrationLog`]).
pub const MIGRATIONS: &[u8] = &[0xff, 0xff, 0x04];
/// The rebalancer's settings.
pub const REBALANCE: &[u8] = &[0xff, 0xff, 0x05];

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

/// The migration log.
pub fn migrations(store: &dyn KvRead) -> Result<crate::commands::MigrationLog, StorageError> {
    Ok(read(store, MIGRATIONS, "migration log")?.unwrap_or_default())
}

/// The rebalancer's settings.
pub fn rebalance(store: &dyn KvRead) -> Result<RebalanceSettings, StorageError> {
    Ok(read(store, REBALANCE, "rebalance settings")?.unwrap_or_default())
}
