//! The replica's RocksDB: one database, one write-ahead log, three column families (`raft`, `meta`,
//! `data`; see [`crate::keys`]), so a write batch spanning them is atomic.

use crate::error::StorageError;
use crate::keys::{CF_DATA, CF_META, CF_RAFT};
use rocksdb::DB;
use std::path::Path;
use std::sync::Arc;

/// Opens (creating if needed) the replica's DB with its three column families.
pub fn open_db(path: &Path) -> Result<Arc<DB>, StorageError> {
    let mut opts = rocksdb::Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_max_background_jobs(2);
    opts.set_bytes_per_sync(1 << 20);
    // Compactions run at a lower CPU priority than the Raft loop and the gRPC threads: on a busy
    // machine they yield instead of stalling requests (every replica of a cell compacts at about
    // the same moment, having written the same bytes). Flushes keep their priority: starved, they
    // would fill the memtables and stall every write.
    let mut env = rocksdb::Env::new()?;
    env.lower_thread_pool_cpu_priority();
    opts.set_env(&env);
    let mut data_opts = rocksdb::Options::default();
    data_opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    let cfs = vec![
        rocksdb::ColumnFamilyDescriptor::new(CF_RAFT, rocksdb::Options::default()),
        rocksdb::ColumnFamilyDescriptor::new(CF_META, rocksdb::Options::default()),
        rocksdb::ColumnFamilyDescriptor::new(CF_DATA, data_opts),
    ];
    Ok(Arc::new(DB::open_cf_descriptors(&opts, path, cfs)?))
}

/// A column family handle by name.
pub fn cf<'a>(db: &'a DB, name: &'static str) -> Result<&'a rocksdb::ColumnFamily, StorageError> {
    db.cf_handle(name).ok_or(StorageError::MissingCf(name))
}
