//! The replica's RocksDB: one database, one write-ahead log, three column families (`raft`, `meta`,
//! `data`; see [`crate::keys`]), so a write batch spanning them is atomic.

use crate::error::StorageError;
use crate::keys::{CF_DATA, CF_META, CF_RAFT};
use rocksdb::DB;
use std::path::Path;
use std::sync::Arc;

/// The write-ahead log's bound.
const MAX_TOTAL_WAL_BYTES: u64 = 256 << 20;

/// The block cache of a replica unless configured (`--block-cache-mib`).
pub const DEFAULT_BLOCK_CACHE_MIB: usize = 256;

/// Opens (creating if needed) the replica's DB with its three column families and the default
/// block cache.
pub fn open_db(path: &Path) -> Result<Arc<DB>, StorageError> {
    open_db_with(path, DEFAULT_BLOCK_CACHE_MIB)
}

/// [`open_db`] with a block cache of `cache_mib` MiB shared by the column families.
///
/// Point reads dominate (the identity record, the replay marker of a transaction id, the RID
/// index), many of them for keys that do not exist: the data column family keeps a Bloom filter
/// per table (10 bits per key, about 1% false positives) so a miss costs no data block, and its
/// index and filter blocks live in the cache (pinned for L0) so memory stays within the cache's
/// size as the data grows instead of growing with the number of tables.
pub fn open_db_with(path: &Path, cache_mib: usize) -> Result<Arc<DB>, StorageError> {
    let cache = rocksdb::Cache::new_lru_cache(cache_mib.max(8) << 20);
    let table = |bloom: bool| {
        let mut t = rocksdb::BlockBasedOptions::default();
        t.set_block_cache(&cache);
        if bloom {
            t.set_bloom_filter(10.0, false);
            t.set_cache_index_and_filter_blocks(true);
            t.set_pin_l0_filter_and_index_blocks_in_cache(true);
        }
        t
    };
    let mut opts = rocksdb::Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_max_background_jobs(2);
    opts.set_bytes_per_sync(1 << 20);
    // A write-ahead log file goes only once every column family has flushed what it holds, and
    // `meta` (a few small keys rewritten on every apply) rarely fills a memtable: under RocksDB's
    // default bound (4x all memtables, 1.5 GiB here) the log held 1.9 GiB per replica at
    // 1,000,000 identities (beside 1.1 GiB of tables), all of it replayed on restart. Past this
    // size RocksDB flushes the column families holding the oldest log (mostly `meta`: small files).
    opts.set_max_total_wal_size(MAX_TOTAL_WAL_BYTES);
    // Compactions run at a lower CPU priority than the Raft loop and the gRPC threads: on a busy
    // machine they yield instead of stalling requests (every replica of a cell compacts at about
    // the same moment, having written the same bytes). Flushes keep their priority: starved, they
    // would fill the memtables and stall every write.
    let mut env = rocksdb::Env::new()?;
    env.lower_thread_pool_cpu_priority();
    opts.set_env(&env);
    let mut data_opts = data_file_options();
    data_opts.set_block_based_table_factory(&table(true));
    let mut raft_opts = rocksdb::Options::default();
    raft_opts.set_block_based_table_factory(&table(false));
    let mut meta_opts = rocksdb::Options::default();
    meta_opts.set_block_based_table_factory(&table(false));
    let cfs = vec![
        rocksdb::ColumnFamilyDescriptor::new(CF_RAFT, raft_opts),
        rocksdb::ColumnFamilyDescriptor::new(CF_META, meta_opts),
        rocksdb::ColumnFamilyDescriptor::new(CF_DATA, data_opts),
    ];
    Ok(Arc::new(DB::open_cf_descriptors(&opts, path, cfs)?))
}

/// How the data column family's tables are written: LZ4 blocks with a Bloom filter. Snapshot files
/// are written the same way, so data a replica ingests when it catches up by snapshot is as
/// compact and as cheap to miss as data it wrote itself.
pub fn data_file_options() -> rocksdb::Options {
    let mut opts = rocksdb::Options::default();
    opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_bloom_filter(10.0, false);
    opts.set_block_based_table_factory(&table);
    opts
}

/// A column family handle by name.
pub fn cf<'a>(db: &'a DB, name: &'static str) -> Result<&'a rocksdb::ColumnFamily, StorageError> {
    db.cf_handle(name).ok_or(StorageError::MissingCf(name))
}
