//! The state machine: applies committed commands to the `data` and `meta` column families.
//!
//! Apply is deterministic and total: every replica turns the same entry into the same writes or the
//! same rejection, and nothing here panics on bad bytes. Ownership is the fence (DESIGN.md §4): a
//! command for a bucket the cell does not own is rejected with a wrong-owner hint, never applied.
//! All commands of one Ready go into ONE write batch together with the new apply state; an overlay
//! lets later commands of the batch see the writes of earlier ones.

use crate::codec;
use crate::command::{
    BucketRecord, BucketState, Command, CommandResult, EnrollCommand, EnrollSecret, IdentityRecord,
    Rejection, RidRecord,
};
use crate::crypto::Keyring;
use crate::keys::{self, CF_DATA, CF_META, Table};
use crate::storage::{StoreError, cf};
use nid_proto::bucket::BucketId;
use nid_proto::v1::{CellInfo, ClusterConfig, RoutingTable};
use prost::Message as _;
use rocksdb::{DB, WriteBatch};
use std::collections::HashMap;
use std::sync::Arc;

/// Hash domains for data keys.
pub const RID_DOMAIN: &[u8] = b"rid";
/// See [`RID_DOMAIN`].
pub const UIN_DOMAIN: &[u8] = b"uin";

/// `nid.v1.IdentityStatus.ACTIVATED`.
pub const STATUS_ACTIVATED: i32 = 1;

/// Reads and applies against one replica's DB.
pub struct StateMachine {
    db: Arc<DB>,
    keyring: Arc<Keyring>,
}

/// Pending writes of the current apply batch, visible to later commands in it.
#[derive(Default)]
pub struct Overlay {
    data: HashMap<Vec<u8>, Vec<u8>>,
    buckets: HashMap<u16, BucketRecord>,
}

impl StateMachine {
    /// A state machine over `db`.
    pub fn new(db: Arc<DB>, keyring: Arc<Keyring>) -> StateMachine {
        StateMachine { db, keyring }
    }

    /// The keyring.
    pub fn keyring(&self) -> &Keyring {
        &self.keyring
    }

    /// The recorded state of a bucket (NotOwned at version 0 when never set).
    pub fn bucket_record(&self, bucket: u16) -> Result<BucketRecord, StoreError> {
        let Some(id) = BucketId::new(u32::from(bucket)) else {
            return Ok(BucketRecord { state: BucketState::NotOwned, table_version: 0 });
        };
        match self.db.get_cf(cf(&self.db, CF_META)?, keys::bucket_state_key(id))? {
            Some(bytes) => {
                codec::decode(&bytes).map_err(|source| StoreError::Corrupt { what: "bucket state", source })
            }
            None => Ok(BucketRecord { state: BucketState::NotOwned, table_version: 0 }),
        }
    }

    /// Counts buckets per state (for metrics and status).
    pub fn bucket_counts(&self) -> Result<HashMap<&'static str, u64>, StoreError> {
        let mut counts = HashMap::new();
        let (start, end) = keys::bucket_state_range();
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_upper_bound(end.to_vec());
        for item in self.db.iterator_cf_opt(
            cf(&self.db, CF_META)?,
            ro,
            rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward),
        ) {
            let (_, v) = item?;
            let rec: BucketRecord =
                codec::decode(&v).map_err(|source| StoreError::Corrupt { what: "bucket state", source })?;
            let name = match rec.state {
                BucketState::NotOwned => "not_owned",
                BucketState::Owned => "owned",
                BucketState::Importing => "importing",
                BucketState::Frozen => "frozen",
            };
            *counts.entry(name).or_insert(0) += 1;
        }
        Ok(counts)
    }

    fn bucket_in(&self, bucket: u16, overlay: &Overlay) -> Result<BucketRecord, StoreError> {
        match overlay.buckets.get(&bucket) {
            Some(r) => Ok(*r),
            None => self.bucket_record(bucket),
        }
    }

    fn get_in(&self, key: &[u8], overlay: &Overlay) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = overlay.data.get(key) {
            return Ok(Some(v.clone()));
        }
        Ok(self.db.get_cf(cf(&self.db, CF_DATA)?, key)?)
    }

    /// Applies one command, staging its writes into `wb` and `overlay`.
    pub fn apply(
        &self,
        command: &Command,
        wb: &mut WriteBatch,
        overlay: &mut Overlay,
    ) -> Result<CommandResult, StoreError> {
        match command {
            Command::Enroll(cmd) => self.apply_enroll(cmd, wb, overlay),
            Command::ControlInit { config, table } => self.apply_control_init(config, table, wb, overlay),
            Command::ControlRegisterCell { cell } => self.apply_register_cell(cell, wb, overlay),
            Command::ControlCommitMove { bucket, from, to, expected_epoch } => {
                let Some(mut table) = self.routing_table_in(overlay)? else {
                    return Ok(CommandResult::Rejected(Rejection::NoCluster));
                };
                let b = usize::from(*bucket);
                let known = table.cells.iter().any(|c| c.cell_id == *to);
                if b >= table.owner.len() || b >= table.epoch.len() || !known {
                    return Ok(CommandResult::Rejected(Rejection::Malformed("bucket or destination".into())));
                }
                if table.owner[b] != *from || table.epoch[b] != *expected_epoch {
                    return Ok(CommandResult::Rejected(Rejection::MoveConflict));
                }
                table.owner[b] = *to;
                table.epoch[b] += 1;
                table.version += 1;
                self.put_control(keys::CONTROL_TABLE, &table.encode_to_vec(), wb, overlay)?;
                Ok(CommandResult::Control { changed: true, version: table.version })
            }
            Command::SetBuckets { buckets, state, table_version } => {
                let meta = cf(&self.db, CF_META)?;
                for &b in buckets {
                    let Some(id) = BucketId::new(u32::from(b)) else {
                        return Ok(CommandResult::Rejected(Rejection::Malformed(format!(
                            "bucket {b} out of range"
                        ))));
                    };
                    let current = self.bucket_in(b, overlay)?;
                    if current.table_version > *table_version {
                        return Ok(CommandResult::Rejected(Rejection::StaleTableVersion {
                            current: current.table_version,
                        }));
                    }
                    let _ = id;
                }
                for &b in buckets {
                    let Some(id) = BucketId::new(u32::from(b)) else { continue };
                    let rec = BucketRecord { state: *state, table_version: *table_version };
                    wb.put_cf(meta, keys::bucket_state_key(id), codec::encode(&rec));
                    overlay.buckets.insert(b, rec);
                }
                Ok(CommandResult::BucketsSet)
            }
        }
    }

    fn control_value(&self, key: &[u8], overlay: &Overlay) -> Result<Option<Vec<u8>>, StoreError> {
        match self.get_in(key, overlay)? {
            Some(bytes) => codec::decode::<Vec<u8>>(&bytes)
                .map(Some)
                .map_err(|source| StoreError::Corrupt { what: "control record", source }),
            None => Ok(None),
        }
    }

    fn put_control(
        &self,
        key: &[u8],
        value: &[u8],
        wb: &mut WriteBatch,
        overlay: &mut Overlay,
    ) -> Result<(), StoreError> {
        let encoded = codec::encode(&value.to_vec());
        wb.put_cf(cf(&self.db, CF_DATA)?, key, &encoded);
        overlay.data.insert(key.to_vec(), encoded);
        Ok(())
    }

    fn apply_control_init(
        &self,
        config: &[u8],
        table: &[u8],
        wb: &mut WriteBatch,
        overlay: &mut Overlay,
    ) -> Result<CommandResult, StoreError> {
        let Ok(parsed) = RoutingTable::decode(table) else {
            return Ok(CommandResult::Rejected(Rejection::Malformed("routing table".into())));
        };
        if let Some(existing) = self.control_value(keys::CONTROL_CONFIG, overlay)? {
            if existing != config {
                return Ok(CommandResult::Rejected(Rejection::ClusterExists));
            }
            let version = self.routing_table_in(overlay)?.map(|t| t.version).unwrap_or(0);
            return Ok(CommandResult::Control { changed: false, version });
        }
        self.put_control(keys::CONTROL_CONFIG, config, wb, overlay)?;
        self.put_control(keys::CONTROL_TABLE, table, wb, overlay)?;
        Ok(CommandResult::Control { changed: true, version: parsed.version })
    }

    fn apply_register_cell(
        &self,
        cell: &[u8],
        wb: &mut WriteBatch,
        overlay: &mut Overlay,
    ) -> Result<CommandResult, StoreError> {
        let Ok(cell) = CellInfo::decode(cell) else {
            return Ok(CommandResult::Rejected(Rejection::Malformed("cell".into())));
        };
        let Some(mut table) = self.routing_table_in(overlay)? else {
            return Ok(CommandResult::Rejected(Rejection::NoCluster));
        };
        if table.cells.contains(&cell) {
            return Ok(CommandResult::Control { changed: false, version: table.version });
        }
        table.cells.retain(|c| c.cell_id != cell.cell_id);
        table.cells.push(cell);
        table.cells.sort_by_key(|c| c.cell_id);
        table.version += 1;
        self.put_control(keys::CONTROL_TABLE, &table.encode_to_vec(), wb, overlay)?;
        Ok(CommandResult::Control { changed: true, version: table.version })
    }

    fn routing_table_in(&self, overlay: &Overlay) -> Result<Option<RoutingTable>, StoreError> {
        match self.control_value(keys::CONTROL_TABLE, overlay)? {
            Some(bytes) => RoutingTable::decode(bytes.as_slice())
                .map(Some)
                .map_err(|_| StoreError::BadSnapshot("stored routing table does not decode".into())),
            None => Ok(None),
        }
    }

    /// The routing table held by a control cell (None before the cluster exists).
    pub fn routing_table(&self) -> Result<Option<RoutingTable>, StoreError> {
        self.routing_table_in(&Overlay::default())
    }

    /// The cluster config held by a control cell.
    pub fn cluster_config(&self) -> Result<Option<ClusterConfig>, StoreError> {
        match self.control_value(keys::CONTROL_CONFIG, &Overlay::default())? {
            Some(bytes) => ClusterConfig::decode(bytes.as_slice())
                .map(Some)
                .map_err(|_| StoreError::BadSnapshot("stored cluster config does not decode".into())),
            None => Ok(None),
        }
    }

    fn ownership(&self, bucket: u16, overlay: &Overlay) -> Result<Option<Rejection>, StoreError> {
        let rec = self.bucket_in(bucket, overlay)?;
        Ok(match rec.state {
            BucketState::Owned => None,
            BucketState::Importing | BucketState::Frozen => Some(Rejection::RetryLater { bucket }),
            BucketState::NotOwned => Some(Rejection::WrongOwner { bucket, table_version: rec.table_version }),
        })
    }

    fn apply_enroll(
        &self,
        cmd: &EnrollCommand,
        wb: &mut WriteBatch,
        overlay: &mut Overlay,
    ) -> Result<CommandResult, StoreError> {
        let Some(bucket) = BucketId::new(u32::from(cmd.bucket)) else {
            return Ok(CommandResult::Rejected(Rejection::Malformed("bucket out of range".into())));
        };
        if let Some(rejection) = self.ownership(cmd.bucket, overlay)? {
            return Ok(CommandResult::Rejected(rejection));
        }
        let rid_key = keys::data_key(bucket, Table::Rid, &cmd.rid_hash);
        if let Some(sealed) = self.get_in(&rid_key, overlay)? {
            let existing: RidRecord = match self.keyring.open(&rid_key, &sealed).map(|p| codec::decode(&p)) {
                Ok(Ok(r)) => r,
                _ => return Err(StoreError::BadSnapshot("RID index value does not open".into())),
            };
            if !crate::crypto::ct_eq(&existing.payload_mac, &cmd.payload_mac) {
                return Ok(CommandResult::Rejected(Rejection::RidConflict));
            }
            let record = self.identity_in(bucket, &existing.uin, overlay)?;
            return Ok(CommandResult::Enrolled {
                uin: existing.uin,
                created: false,
                totp_secret: record.and_then(|r| r.totp_secret),
            });
        }
        let secret: EnrollSecret =
            match self.keyring.open(&cmd.rid_hash, &cmd.sealed).map(|p| codec::decode(&p)) {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Ok(CommandResult::Rejected(Rejection::Malformed(e.to_string()))),
                Err(e) => return Ok(CommandResult::Rejected(Rejection::Malformed(e.to_string()))),
            };
        for candidate in &secret.candidates {
            let uin_key = self.uin_key(bucket, candidate);
            if self.get_in(&uin_key, overlay)?.is_some() {
                continue;
            }
            let record = IdentityRecord {
                uin: candidate.clone(),
                status: STATUS_ACTIVATED,
                version: 1,
                created_ms: cmd.now_ms,
                updated_ms: cmd.now_ms,
                request: secret.request.clone(),
                pin_verifier: secret.pin_verifier,
                totp_secret: secret.totp_secret.clone(),
                payload_mac: cmd.payload_mac,
            };
            let rid_value = RidRecord { uin: candidate.clone(), payload_mac: cmd.payload_mac };
            let sealed_record = self.keyring.seal(&uin_key, cmd.record_nonce, &codec::encode(&record));
            let sealed_rid = self.keyring.seal(&rid_key, cmd.rid_nonce, &codec::encode(&rid_value));
            let data = cf(&self.db, CF_DATA)?;
            wb.put_cf(data, uin_key, &sealed_record);
            wb.put_cf(data, rid_key, &sealed_rid);
            overlay.data.insert(uin_key.to_vec(), sealed_record);
            overlay.data.insert(rid_key.to_vec(), sealed_rid);
            return Ok(CommandResult::Enrolled {
                uin: candidate.clone(),
                created: true,
                totp_secret: secret.totp_secret,
            });
        }
        Ok(CommandResult::Rejected(Rejection::CandidatesTaken))
    }

    /// The data key of a UIN (given as digits) inside `bucket`.
    pub fn uin_key(&self, bucket: BucketId, uin: &str) -> [u8; 35] {
        keys::data_key(bucket, Table::Identity, &self.keyring.index_hash(UIN_DOMAIN, uin.as_bytes()))
    }

    fn identity_in(
        &self,
        bucket: BucketId,
        uin: &str,
        overlay: &Overlay,
    ) -> Result<Option<IdentityRecord>, StoreError> {
        let key = self.uin_key(bucket, uin);
        let Some(sealed) = self.get_in(&key, overlay)? else { return Ok(None) };
        let plain = self
            .keyring
            .open(&key, &sealed)
            .map_err(|e| StoreError::BadSnapshot(format!("identity record does not open: {e}")))?;
        codec::decode(&plain)
            .map(Some)
            .map_err(|source| StoreError::Corrupt { what: "identity record", source })
    }

    /// Reads an identity by UIN from the applied state.
    pub fn get_identity(&self, bucket: BucketId, uin: &str) -> Result<Option<IdentityRecord>, StoreError> {
        self.identity_in(bucket, uin, &Overlay::default())
    }

    /// Number of identities and RIDs stored in a bucket, and a digest over its raw range (identical on
    /// every replica that applied the same log).
    pub fn bucket_digest(&self, bucket: BucketId) -> Result<(u64, [u8; 32]), StoreError> {
        let (start, end) = keys::bucket_range(bucket);
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_upper_bound(end);
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut n = 0;
        for item in self.db.iterator_cf_opt(
            cf(&self.db, CF_DATA)?,
            ro,
            rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward),
        ) {
            let (k, v) = item?;
            ctx.update(&(k.len() as u32).to_be_bytes());
            ctx.update(&k);
            ctx.update(&(v.len() as u32).to_be_bytes());
            ctx.update(&v);
            n += 1;
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        Ok((n, out))
    }
}
