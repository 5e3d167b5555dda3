//! The state machine: applies committed commands to the `data` and `meta` column families.
//!
//! Apply is deterministic and total: every replica turns the same entry into the same writes or the
//! same rejection, and nothing here panics on bad bytes. Ownership is the fence (DESIGN.md §4): a
//! command for a bucket the cell does not own is rejected with a wrong-owner hint, never applied.
//! All commands of one Ready go into ONE write batch together with the new apply state; an overlay
//! lets later commands of the batch see the writes of earlier ones.

use crate::codec;
use crate::command::{
    AuditRecord, AuthAttempt, AuthOutcome, BucketRecord, BucketState, Command, CommandResult, EnrollCommand,
    EnrollSecret, HistoryEntry, IdentityCommand, IdentityOp, IdentityRecord, IdentityResult, Rejection,
    RidRecord, Target, TxnRecord, VidIndex,
};
use crate::crypto::{Keyring, ct_eq, derived_nonce};
use crate::identity;
use crate::keys::{self, CF_DATA, CF_META, Table};
use crate::storage::{StoreError, cf};
use nid_proto::bucket::BucketId;
use nid_proto::v1::{
    AuthReason, CellInfo, ClusterConfig, ListPartnersInternalResponse, PartnerRecord, RoutingTable,
};
use prost::Message as _;
use rocksdb::{DB, WriteBatch};
use std::collections::HashMap;
use std::sync::Arc;

/// Hash domains for data keys.
pub const RID_DOMAIN: &[u8] = b"rid";
/// See [`RID_DOMAIN`].
pub const UIN_DOMAIN: &[u8] = b"uin";
/// See [`RID_DOMAIN`].
pub const VID_DOMAIN: &[u8] = b"vid";
/// See [`RID_DOMAIN`].
pub const TXN_DOMAIN: &[u8] = b"txn";
/// Hash domain of the digest of an authentication request (replay index values).
pub const TXN_REQUEST_DOMAIN: &[u8] = b"txn-request";

/// Nonce indexes of the values one command writes (each value gets its own nonce).
mod nonce {
    pub const RECORD: u32 = 0;
    pub const RID: u32 = 1;
    pub const HISTORY: u32 = 2;
    pub const VID: u32 = 3;
    pub const AUDIT: u32 = 4;
    pub const TXN: u32 = 5;
}

/// The result of verifying an identity's audit chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainReport {
    /// True when every link and the head match.
    pub intact: bool,
    /// Records checked.
    pub records: u64,
    /// Sequence number of the first broken link (0 when intact).
    pub first_broken: u64,
}

/// Reads and applies against one replica's DB.
pub struct StateMachine {
    db: Arc<DB>,
    keyring: Arc<Keyring>,
}

/// Associated data of a sealed identity operation: the bucket and the target, so a sealed payload
/// cannot be replayed against another identity.
pub fn op_aad(bucket: u16, target: &Target) -> Vec<u8> {
    let (tag, hash) = match target {
        Target::Uin(h) => (b'u', h),
        Target::Vid(h) => (b'v', h),
    };
    let mut aad = b"nid/v1/op".to_vec();
    aad.extend_from_slice(&bucket.to_be_bytes());
    aad.push(tag);
    aad.extend_from_slice(hash);
    aad
}

/// Pending writes of the current apply batch, visible to later commands in it.
#[derive(Default)]
pub struct Overlay {
    /// Written (Some) or deleted (None) `data` CF values.
    data: HashMap<Vec<u8>, Option<Vec<u8>>>,
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
            return Ok(v.clone());
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
            Command::Identity(cmd) => self.apply_identity(cmd, wb, overlay),
            Command::ControlPutPartner { partner, create_only } => {
                self.apply_put_partner(partner, *create_only, wb, overlay)
            }
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
            Command::SweepTxnMarkers { first, end, before_ms, limit } => {
                self.apply_sweep(*first, *end, *before_ms, *limit, wb, overlay)
            }
        }
    }

    /// Deletes the replay markers decided before `before_ms` in the owned buckets of
    /// `[first, end)`, up to `limit`, with their time-index entries. A marker rewritten since (a
    /// later decision under the same key) is kept; only its stale index entry goes. Buckets that
    /// are importing or frozen are left alone, so a bucket in migration does not change under it.
    fn apply_sweep(
        &self,
        first: u16,
        end: u16,
        before_ms: u64,
        limit: u32,
        wb: &mut WriteBatch,
        overlay: &mut Overlay,
    ) -> Result<CommandResult, StoreError> {
        if first >= end || end > nid_proto::bucket::BUCKETS || limit == 0 {
            return Ok(CommandResult::Rejected(Rejection::Malformed("sweep range or limit".into())));
        }
        let data = cf(&self.db, CF_DATA)?;
        let mut deleted = 0u64;
        // One iterator for the span, positioned per bucket (an iterator per bucket costs more
        // than the seek).
        let mut it = self.db.raw_iterator_cf(data);
        for b in first..end {
            let Some(bucket) = BucketId::new(u32::from(b)) else { continue };
            if self.bucket_in(b, overlay)?.state != BucketState::Owned {
                continue;
            }
            let (start, upper) = keys::time_range(bucket, Table::TxnByTime, before_ms);
            it.seek(start);
            while let Some(tkey) = it.key().filter(|k| *k < upper.as_slice()).map(<[u8]>::to_vec) {
                it.next();
                // Already deleted by an earlier command of this batch: every replica must see the
                // same set whatever its batching.
                if matches!(overlay.data.get(&tkey), Some(None)) {
                    continue;
                }
                if deleted >= u64::from(limit) {
                    return Ok(CommandResult::Swept { deleted, resume: Some(b) });
                }
                if let Some(hash) = keys::time_key_hash(&tkey) {
                    let marker = keys::data_key(bucket, Table::Txn, &hash);
                    let rewritten = self
                        .get_in(&marker, overlay)?
                        .and_then(|v| self.decided(&marker, &v))
                        .is_some_and(|r| r.time_ms >= before_ms);
                    if !rewritten {
                        wb.delete_cf(data, marker);
                        overlay.data.insert(marker.to_vec(), None);
                    }
                }
                wb.delete_cf(data, &tkey);
                overlay.data.insert(tkey, None);
                deleted += 1;
            }
            it.status()?;
        }
        Ok(CommandResult::Swept { deleted, resume: None })
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
        overlay.data.insert(key.to_vec(), Some(encoded));
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

    /// The fence of every client command: the bucket must exist and be owned here.
    fn owned_bucket(
        &self,
        bucket: u16,
        overlay: &Overlay,
    ) -> Result<Result<BucketId, Rejection>, StoreError> {
        let Some(id) = BucketId::new(u32::from(bucket)) else {
            return Ok(Err(Rejection::Malformed("bucket out of range".into())));
        };
        Ok(match self.ownership(bucket, overlay)? {
            Some(rejection) => Err(rejection),
            None => Ok(id),
        })
    }

    fn apply_enroll(
        &self,
        cmd: &EnrollCommand,
        wb: &mut WriteBatch,
        overlay: &mut Overlay,
    ) -> Result<CommandResult, StoreError> {
        let bucket = match self.owned_bucket(cmd.bucket, overlay)? {
            Ok(bucket) => bucket,
            Err(rejection) => return Ok(CommandResult::Rejected(rejection)),
        };
        let rid_key = keys::data_key(bucket, Table::Rid, &cmd.rid_hash);
        if let Some(sealed) = self.get_in(&rid_key, overlay)? {
            let existing: RidRecord = match self.keyring.open(&rid_key, &sealed).map(|p| codec::decode(&p)) {
                Ok(Ok(r)) => r,
                _ => return Err(StoreError::BadSnapshot("RID index value does not open".into())),
            };
            if !ct_eq(&existing.payload_mac, &cmd.payload_mac) {
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
                status: identity::ACTIVATED,
                status_reason: String::new(),
                version: 1,
                created_ms: cmd.now_ms,
                updated_ms: cmd.now_ms,
                request: secret.request.clone(),
                payload_mac: cmd.payload_mac,
                pin: secret.pin_verifier,
                totp_secret: secret.totp_secret.clone(),
                totp_last_step: 0,
                vids: Vec::new(),
                locks: Vec::new(),
                failures: 0,
                locked_until_ms: 0,
                audit_len: 0,
                audit_head: [0; 32],
            };
            let rid_value = RidRecord { uin: candidate.clone(), payload_mac: cmd.payload_mac };
            let sealed_rid =
                self.keyring.seal(&rid_key, derived_nonce(&cmd.seed, nonce::RID), &codec::encode(&rid_value));
            let data = cf(&self.db, CF_DATA)?;
            wb.put_cf(data, rid_key, &sealed_rid);
            overlay.data.insert(rid_key.to_vec(), Some(sealed_rid));
            self.put_record(bucket, &record, &cmd.seed, true, wb, overlay)?;
            return Ok(CommandResult::Enrolled {
                uin: candidate.clone(),
                created: true,
                totp_secret: secret.totp_secret,
            });
        }
        Ok(CommandResult::Rejected(Rejection::CandidatesTaken))
    }

    /// Writes the current record and, when `new_version`, its history entry.
    fn put_record(
        &self,
        bucket: BucketId,
        record: &IdentityRecord,
        seed: &[u8; 16],
        new_version: bool,
        wb: &mut WriteBatch,
        overlay: &mut Overlay,
    ) -> Result<(), StoreError> {
        let data = cf(&self.db, CF_DATA)?;
        let uin_hash = self.keyring.index_hash(UIN_DOMAIN, record.uin.as_bytes());
        let key = keys::data_key(bucket, Table::Identity, &uin_hash);
        let sealed = self.keyring.seal_versioned(
            &key,
            record.version,
            derived_nonce(seed, nonce::RECORD),
            &codec::encode(record),
        );
        wb.put_cf(data, key, &sealed);
        overlay.data.insert(key.to_vec(), Some(sealed));
        if new_version {
            let hkey = keys::sequence_key(bucket, Table::History, &uin_hash, record.version);
            let entry = record.history_entry();
            let sealed =
                self.keyring.seal(&hkey, derived_nonce(seed, nonce::HISTORY), &codec::encode(&entry));
            wb.put_cf(data, hkey, &sealed);
            overlay.data.insert(hkey.to_vec(), Some(sealed));
        }
        Ok(())
    }

    /// Loads the identity a target names (None when no identity has it), opening the record once.
    fn load_in(
        &self,
        bucket: BucketId,
        target: &Target,
        overlay: &Overlay,
    ) -> Result<Option<IdentityRecord>, StoreError> {
        let hash = match target {
            Target::Uin(hash) => {
                let key = keys::data_key(bucket, Table::Identity, hash);
                return match self.get_in(&key, overlay)? {
                    Some(sealed) => Ok(Some(self.open_record(&key, &sealed)?)),
                    None => Ok(None),
                };
            }
            Target::Vid(hash) => hash,
        };
        let key = keys::data_key(bucket, Table::Vid, hash);
        let Some(sealed) = self.get_in(&key, overlay)? else { return Ok(None) };
        let index: VidIndex = self
            .keyring
            .open(&key, &sealed)
            .map_err(|e| StoreError::BadSnapshot(format!("VID index value does not open: {e}")))
            .and_then(|p| {
                codec::decode(&p).map_err(|source| StoreError::Corrupt { what: "VID index", source })
            })?;
        match self.identity_in(bucket, &index.uin, overlay)? {
            Some(rec) => Ok(Some(rec)),
            None => Err(StoreError::BadSnapshot("a VID index names a missing identity".into())),
        }
    }

    fn open_record(&self, key: &[u8], sealed: &[u8]) -> Result<IdentityRecord, StoreError> {
        let (version, plain) = self
            .keyring
            .open_versioned(key, sealed)
            .map_err(|e| StoreError::BadSnapshot(format!("identity record does not open: {e}")))?;
        let record: IdentityRecord = codec::decode(&plain)
            .map_err(|source| StoreError::Corrupt { what: "identity record", source })?;
        if record.version != version {
            return Err(StoreError::BadSnapshot("identity record version does not match its label".into()));
        }
        Ok(record)
    }

    fn apply_identity(
        &self,
        cmd: &IdentityCommand,
        wb: &mut WriteBatch,
        overlay: &mut Overlay,
    ) -> Result<CommandResult, StoreError> {
        let bucket = match self.owned_bucket(cmd.bucket, overlay)? {
            Ok(bucket) => bucket,
            Err(rejection) => return Ok(CommandResult::Rejected(rejection)),
        };
        let op: IdentityOp = match self.keyring.open(&op_aad(cmd.bucket, &cmd.target), &cmd.sealed) {
            Ok(plain) => match codec::decode(&plain) {
                Ok(op) => op,
                Err(e) => return Ok(CommandResult::Rejected(Rejection::Malformed(e.to_string()))),
            },
            Err(e) => return Ok(CommandResult::Rejected(Rejection::Malformed(e.to_string()))),
        };
        let now = cmd.now_ms;
        let Some(mut rec) = self.load_in(bucket, &cmd.target, overlay)? else {
            return Ok(match op {
                IdentityOp::Authenticate(a) => {
                    let reason = if identity::factors_allowed(&a) {
                        AuthReason::UnknownId
                    } else {
                        AuthReason::FactorNotAllowed
                    };
                    CommandResult::Identity(IdentityResult::Auth(AuthOutcome {
                        authenticated: false,
                        reasons: vec![reason as i32],
                        uin: None,
                        time_ms: now,
                        repeated: false,
                    }))
                }
                _ => CommandResult::Rejected(Rejection::NotFound),
            });
        };
        let via_vid = matches!(cmd.target, Target::Vid(_)).then_some(());
        let before = rec.version;
        // The VID a command came through, in clear, is only known inside the record: match its hash.
        let vid = match (&cmd.target, via_vid) {
            (Target::Vid(h), Some(())) => rec
                .vids
                .iter()
                .find(|v| self.keyring.index_hash(VID_DOMAIN, v.vid.as_bytes()) == *h)
                .map(|v| v.vid.clone()),
            _ => None,
        };
        if matches!(cmd.target, Target::Vid(_)) && vid.is_none() {
            return Err(StoreError::BadSnapshot("a VID index names an identity without that VID".into()));
        }
        let result = match op {
            IdentityOp::Update { expected_version, demographics, biometrics } => {
                identity::update(&mut rec, expected_version, &demographics, &biometrics, now)
                    .map(IdentityResult::Version)
            }
            IdentityOp::SetStatus { status, reason } => {
                identity::set_status(&mut rec, status, &reason, now).map(IdentityResult::Version)
            }
            IdentityOp::CreateVid { kind, expires_ms, max_uses, candidates } => {
                let mut chosen = None;
                for c in candidates {
                    let vkey = keys::data_key(
                        bucket,
                        Table::Vid,
                        &self.keyring.index_hash(VID_DOMAIN, c.as_bytes()),
                    );
                    if self.get_in(&vkey, overlay)?.is_none() {
                        chosen = Some((c, vkey));
                        break;
                    }
                }
                match chosen {
                    None => Err(Rejection::CandidatesTaken),
                    Some((c, vkey)) => {
                        let created = identity::create_vid(&mut rec, c, kind, expires_ms, max_uses, now);
                        if created.is_ok() {
                            let value = codec::encode(&VidIndex { uin: rec.uin.clone() });
                            let sealed =
                                self.keyring.seal(&vkey, derived_nonce(&cmd.seed, nonce::VID), &value);
                            wb.put_cf(cf(&self.db, CF_DATA)?, vkey, &sealed);
                            overlay.data.insert(vkey.to_vec(), Some(sealed));
                        }
                        created.map(IdentityResult::Vid)
                    }
                }
            }
            IdentityOp::RevokeVid => match &vid {
                Some(v) => identity::revoke_vid(&mut rec, v, now).map(|()| IdentityResult::VidRevoked),
                None => Err(Rejection::Malformed("revoke needs a VID target".into())),
            },
            IdentityOp::LockAuthTypes { lock, unlock } => {
                identity::lock_auth_types(&mut rec, &lock, &unlock, now).map(IdentityResult::Locks)
            }
            IdentityOp::Authenticate(attempt) => {
                let txn_key = self.txn_key(bucket, &attempt.partner_id, &attempt.transaction_id, &rec.uin);
                let request_mac = self.request_mac(&attempt, vid.as_deref());
                let seen = self.get_in(&txn_key, overlay)?;
                // A retry of the very same request (a client or the router after an ambiguous
                // failure) gets the decision already made, unchanged and without a second audit
                // entry; the same transaction id with anything else is a replay.
                if let Some(earlier) = seen.as_deref().and_then(|v| self.decided(&txn_key, v))
                    && ct_eq(&earlier.request_mac, &request_mac)
                {
                    return Ok(CommandResult::Identity(IdentityResult::Auth(AuthOutcome {
                        authenticated: earlier.authenticated,
                        reasons: earlier.reasons,
                        uin: Some(rec.uin.clone()),
                        time_ms: earlier.time_ms,
                        repeated: true,
                    })));
                }
                let decision = identity::authenticate(
                    &mut rec,
                    &attempt,
                    vid.as_deref(),
                    seen.is_some(),
                    now,
                    &self.keyring,
                );
                let data = cf(&self.db, CF_DATA)?;
                if decision.record_transaction {
                    let record = TxnRecord {
                        request_mac,
                        authenticated: decision.authenticated,
                        reasons: decision.reasons.clone(),
                        time_ms: now,
                    };
                    let sealed = self.keyring.seal(
                        &txn_key,
                        derived_nonce(&cmd.seed, nonce::TXN),
                        &codec::encode(&record),
                    );
                    wb.put_cf(data, txn_key, &sealed);
                    overlay.data.insert(txn_key.to_vec(), Some(sealed));
                    // The same marker in time order, for the sweep (see `apply_sweep`).
                    let mut hash = [0u8; 32];
                    hash.copy_from_slice(&txn_key[3..]);
                    let tkey = keys::time_key(bucket, Table::TxnByTime, now, &hash);
                    let empty = codec::encode(&());
                    wb.put_cf(data, tkey, &empty);
                    overlay.data.insert(tkey.to_vec(), Some(empty));
                }
                let audit = identity::append_audit(&mut rec, &attempt, &decision, now);
                let uin_hash = self.keyring.index_hash(UIN_DOMAIN, rec.uin.as_bytes());
                let akey = keys::sequence_key(bucket, Table::Audit, &uin_hash, audit.seq);
                let sealed =
                    self.keyring.seal(&akey, derived_nonce(&cmd.seed, nonce::AUDIT), &codec::encode(&audit));
                wb.put_cf(data, akey, &sealed);
                overlay.data.insert(akey.to_vec(), Some(sealed));
                Ok(IdentityResult::Auth(AuthOutcome {
                    authenticated: decision.authenticated,
                    reasons: decision.reasons,
                    uin: Some(rec.uin.clone()),
                    time_ms: now,
                    repeated: false,
                }))
            }
        };
        match result {
            Ok(result) => {
                let changed_version = rec.version != before;
                self.put_record(bucket, &rec, &cmd.seed, changed_version, wb, overlay)?;
                Ok(CommandResult::Identity(result))
            }
            Err(rejection) => Ok(CommandResult::Rejected(rejection)),
        }
    }

    /// Keyed digest of what the partner sent in an authentication: its request time, the factors
    /// and the VID it came through, if any (the partner, transaction and UIN are in the key already;
    /// the partner's allowed types and policy are the service's, not the request's).
    fn request_mac(&self, attempt: &AuthAttempt, via_vid: Option<&str>) -> [u8; 32] {
        let natural = codec::encode(&(
            attempt.request_time_ms,
            &attempt.demographic,
            &attempt.pin,
            &attempt.totp,
            via_vid,
        ));
        self.keyring.index_hash(TXN_REQUEST_DOMAIN, &natural)
    }

    /// The decision stored under a replay-index key; None for a marker this version cannot read
    /// (such a marker still refuses the transaction as a replay).
    fn decided(&self, txn_key: &[u8], sealed: &[u8]) -> Option<TxnRecord> {
        let plain = self.keyring.open(txn_key, sealed).ok()?;
        codec::decode(&plain).ok()
    }

    fn txn_key(&self, bucket: BucketId, partner: &str, txn: &str, uin: &str) -> [u8; 35] {
        let mut natural = Vec::with_capacity(partner.len() + txn.len() + uin.len() + 8);
        natural.extend_from_slice(&(partner.len() as u32).to_be_bytes());
        natural.extend_from_slice(partner.as_bytes());
        natural.extend_from_slice(&(txn.len() as u32).to_be_bytes());
        natural.extend_from_slice(txn.as_bytes());
        natural.extend_from_slice(uin.as_bytes());
        keys::data_key(bucket, Table::Txn, &self.keyring.index_hash(TXN_DOMAIN, &natural))
    }

    fn apply_put_partner(
        &self,
        partner: &[u8],
        create_only: bool,
        wb: &mut WriteBatch,
        overlay: &mut Overlay,
    ) -> Result<CommandResult, StoreError> {
        let Ok(record) = PartnerRecord::decode(partner) else {
            return Ok(CommandResult::Rejected(Rejection::Malformed("partner".into())));
        };
        let Some(id) = record.partner.as_ref().map(|p| p.partner_id.clone()) else {
            return Ok(CommandResult::Rejected(Rejection::Malformed("partner".into())));
        };
        if self.routing_table_in(overlay)?.is_none() {
            return Ok(CommandResult::Rejected(Rejection::NoCluster));
        }
        let mut list = self.partners_in(overlay)?;
        let exists = list.partners.iter().any(|p| p.partner.as_ref().is_some_and(|p| p.partner_id == id));
        if create_only && exists {
            return Ok(CommandResult::Rejected(Rejection::PartnerExists));
        }
        if list.partners.contains(&record) {
            return Ok(CommandResult::Control { changed: false, version: list.partners_version });
        }
        list.partners.retain(|p| p.partner.as_ref().is_none_or(|p| p.partner_id != id));
        list.partners.push(record);
        list.partners.sort_by(|a, b| {
            let id = |r: &PartnerRecord| r.partner.as_ref().map(|p| p.partner_id.clone()).unwrap_or_default();
            id(a).cmp(&id(b))
        });
        list.partners_version += 1;
        self.put_control(keys::CONTROL_PARTNERS, &list.encode_to_vec(), wb, overlay)?;
        Ok(CommandResult::Control { changed: true, version: list.partners_version })
    }

    fn partners_in(&self, overlay: &Overlay) -> Result<ListPartnersInternalResponse, StoreError> {
        match self.control_value(keys::CONTROL_PARTNERS, overlay)? {
            Some(bytes) => ListPartnersInternalResponse::decode(bytes.as_slice())
                .map_err(|_| StoreError::BadSnapshot("stored partner list does not decode".into())),
            None => Ok(ListPartnersInternalResponse::default()),
        }
    }

    /// The partners held by a control cell, with their credential verifiers.
    pub fn partners(&self) -> Result<ListPartnersInternalResponse, StoreError> {
        self.partners_in(&Overlay::default())
    }

    /// Resolves a UIN or VID target in the applied state to its identity (None when unknown or,
    /// for a VID, when the VID is not usable at `now_ms`).
    pub fn lookup(
        &self,
        bucket: BucketId,
        target: &Target,
        now_ms: u64,
    ) -> Result<Option<IdentityRecord>, StoreError> {
        let Some(rec) = self.load_in(bucket, target, &Overlay::default())? else { return Ok(None) };
        if let Target::Vid(h) = target {
            let usable = rec.vids.iter().any(|v| {
                self.keyring.index_hash(VID_DOMAIN, v.vid.as_bytes()) == *h && identity::vid_usable(v, now_ms)
            });
            if !usable {
                return Ok(None);
            }
        }
        Ok(Some(rec))
    }

    /// The target naming an identifier: the keyed hash of a UIN or a VID.
    pub fn target(&self, is_vid: bool, id: &str) -> Target {
        if is_vid {
            Target::Vid(self.keyring.index_hash(VID_DOMAIN, id.as_bytes()))
        } else {
            Target::Uin(self.keyring.index_hash(UIN_DOMAIN, id.as_bytes()))
        }
    }

    /// Versions `from..` of an identity's history, at most `limit`, and the next version if more.
    pub fn history(
        &self,
        bucket: BucketId,
        uin: &str,
        from: u64,
        limit: usize,
    ) -> Result<(Vec<HistoryEntry>, Option<u64>), StoreError> {
        let hash = self.keyring.index_hash(UIN_DOMAIN, uin.as_bytes());
        let start = keys::sequence_key(bucket, Table::History, &hash, from);
        let end = keys::sequence_key(bucket, Table::History, &hash, u64::MAX);
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_upper_bound(end.to_vec());
        let mut out = Vec::new();
        for item in self.db.iterator_cf_opt(
            cf(&self.db, CF_DATA)?,
            ro,
            rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward),
        ) {
            let (k, v) = item?;
            let entry: HistoryEntry = self
                .keyring
                .open(&k, &v)
                .map_err(|e| StoreError::BadSnapshot(format!("history entry does not open: {e}")))
                .and_then(|p| {
                    codec::decode(&p).map_err(|source| StoreError::Corrupt { what: "history", source })
                })?;
            if out.len() == limit {
                return Ok((out, Some(entry.version)));
            }
            out.push(entry);
        }
        Ok((out, None))
    }

    /// Audit records of an identity, newest first, starting at sequence `before` (exclusive; None =
    /// from the newest); at most `limit`, and the sequence to continue from if more.
    pub fn audit_page(
        &self,
        bucket: BucketId,
        uin: &str,
        before: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<AuditRecord>, Option<u64>), StoreError> {
        let hash = self.keyring.index_hash(UIN_DOMAIN, uin.as_bytes());
        let lower = keys::sequence_key(bucket, Table::Audit, &hash, 0);
        let upper = keys::sequence_key(bucket, Table::Audit, &hash, before.unwrap_or(u64::MAX));
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_lower_bound(lower.to_vec());
        ro.set_iterate_upper_bound(upper.to_vec());
        let mut out = Vec::new();
        for item in self.db.iterator_cf_opt(cf(&self.db, CF_DATA)?, ro, rocksdb::IteratorMode::End) {
            let (k, v) = item?;
            let record = self.open_audit(&k, &v)?;
            if out.len() == limit {
                return Ok((out, Some(record.seq + 1)));
            }
            out.push(record);
        }
        Ok((out, None))
    }

    fn open_audit(&self, key: &[u8], value: &[u8]) -> Result<AuditRecord, StoreError> {
        self.keyring
            .open(key, value)
            .map_err(|e| StoreError::BadSnapshot(format!("audit record does not open: {e}")))
            .and_then(|p| {
                codec::decode(&p).map_err(|source| StoreError::Corrupt { what: "audit record", source })
            })
    }

    /// Walks an identity's audit chain: every record must sit at its sequence, link to the hash of
    /// the one before, and the last must match the head kept in the identity record. A record that
    /// no longer opens (tampered ciphertext) breaks the chain at its position.
    pub fn verify_audit_chain(
        &self,
        bucket: BucketId,
        rec: &IdentityRecord,
    ) -> Result<ChainReport, StoreError> {
        let hash = self.keyring.index_hash(UIN_DOMAIN, rec.uin.as_bytes());
        let lower = keys::sequence_key(bucket, Table::Audit, &hash, 0);
        let upper = keys::sequence_key(bucket, Table::Audit, &hash, u64::MAX);
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_upper_bound(upper.to_vec());
        let mut prev = [0u8; 32];
        let mut expected = 1u64;
        let broken = |at: u64, records: u64| ChainReport { intact: false, records, first_broken: at };
        for item in self.db.iterator_cf_opt(
            cf(&self.db, CF_DATA)?,
            ro,
            rocksdb::IteratorMode::From(&lower, rocksdb::Direction::Forward),
        ) {
            let (k, v) = item?;
            let Ok(record) = self.open_audit(&k, &v) else { return Ok(broken(expected, expected - 1)) };
            if record.seq != expected || record.prev != prev {
                return Ok(broken(expected, expected - 1));
            }
            prev = identity::audit_hash(&record);
            expected += 1;
        }
        let records = expected - 1;
        if records != rec.audit_len || prev != rec.audit_head {
            // Missing or extra records at the end, or a last record that is not the recorded head.
            let at = if records == rec.audit_len { records.max(1) } else { records.min(rec.audit_len) + 1 };
            return Ok(broken(at, records));
        }
        Ok(ChainReport { intact: true, records, first_broken: 0 })
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
        self.open_record(&key, &sealed).map(Some)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A state machine over a fresh DB that owns bucket 5 and holds, there and in the unowned
    /// bucket 6, replay markers decided at the given times (index entry time, marker's own time).
    fn with_markers(dir: &std::path::Path, markers: &[(u64, u64)]) -> StateMachine {
        let db = crate::storage::open_db(dir).unwrap();
        let fsm = StateMachine::new(db.clone(), Arc::new(Keyring::dev()));
        let mut wb = WriteBatch::default();
        let own = Command::SetBuckets { buckets: vec![5], state: BucketState::Owned, table_version: 1 };
        assert_eq!(fsm.apply(&own, &mut wb, &mut Overlay::default()).unwrap(), CommandResult::BucketsSet);
        let data = cf(&db, CF_DATA).unwrap();
        for bucket in [5u32, 6] {
            let b = BucketId::new(bucket).unwrap();
            for (i, &(indexed, decided)) in markers.iter().enumerate() {
                let hash = [i as u8 + 1; 32];
                let marker = keys::data_key(b, Table::Txn, &hash);
                let record = TxnRecord {
                    request_mac: [0; 32],
                    authenticated: true,
                    reasons: vec![],
                    time_ms: decided,
                };
                let sealed = fsm.keyring.seal(
                    &marker,
                    derived_nonce(&hash[..16].try_into().unwrap(), 0),
                    &codec::encode(&record),
                );
                wb.put_cf(data, marker, sealed);
                wb.put_cf(data, keys::time_key(b, Table::TxnByTime, indexed, &hash), codec::encode(&()));
            }
        }
        db.write(wb).unwrap();
        fsm
    }

    fn sweep(limit: u32) -> Command {
        Command::SweepTxnMarkers { first: 0, end: nid_proto::bucket::BUCKETS, before_ms: 1_000, limit }
    }

    type KeyValue = (Box<[u8]>, Box<[u8]>);

    fn contents(fsm: &StateMachine) -> Vec<KeyValue> {
        let data = cf(&fsm.db, CF_DATA).unwrap();
        fsm.db.iterator_cf(data, rocksdb::IteratorMode::Start).map(Result::unwrap).collect()
    }

    #[test]
    fn a_sweep_deletes_old_markers_of_owned_buckets_keeps_rewritten_ones_and_ignores_batching() {
        // Four old markers, one of them rewritten at 5_000 after being indexed at 100, and one young.
        let markers = [(100, 100), (200, 200), (300, 5_000), (400, 400), (2_000, 2_000)];
        let one = tempfile::tempdir().unwrap();
        let two = tempfile::tempdir().unwrap();
        let (a, b) = (with_markers(one.path(), &markers), with_markers(two.path(), &markers));

        // Replica a applies two sweeps in one batch, replica b in two batches: same results, same
        // state (the second sweep of a's batch must not count what the first already deleted).
        let (mut wb, mut overlay) = (WriteBatch::default(), Overlay::default());
        let in_one = [
            a.apply(&sweep(3), &mut wb, &mut overlay).unwrap(),
            a.apply(&sweep(3), &mut wb, &mut overlay).unwrap(),
        ];
        a.db.write(wb).unwrap();
        let mut in_two = Vec::new();
        for _ in 0..2 {
            let mut wb = WriteBatch::default();
            in_two.push(b.apply(&sweep(3), &mut wb, &mut Overlay::default()).unwrap());
            b.db.write(wb).unwrap();
        }
        assert_eq!(in_one.to_vec(), in_two);
        assert_eq!(
            in_two,
            vec![
                CommandResult::Swept { deleted: 3, resume: Some(5) },
                CommandResult::Swept { deleted: 1, resume: None }
            ]
        );
        assert_eq!(contents(&a), contents(&b));

        let left = contents(&a);
        let owned = |k: &[u8]| k[..2] == 5u16.to_be_bytes();
        let in_table = |t: Table| left.iter().filter(|(k, _)| owned(k) && k[2] == t as u8).count();
        // The rewritten marker and the young one stay; only the young one keeps an index entry.
        assert_eq!((in_table(Table::Txn), in_table(Table::TxnByTime)), (2, 1));
        assert!(
            left.iter().any(|(k, _)| **k == keys::data_key(BucketId::new(5).unwrap(), Table::Txn, &[3; 32]))
        );
        // The unowned bucket is untouched.
        assert_eq!(left.iter().filter(|(k, _)| !owned(k)).count(), 2 * markers.len());
        assert_eq!(
            a.apply(
                &Command::SweepTxnMarkers { first: 10, end: 10, before_ms: 1, limit: 1 },
                &mut WriteBatch::default(),
                &mut Overlay::default()
            )
            .unwrap(),
            CommandResult::Rejected(Rejection::Malformed("sweep range or limit".into()))
        );
    }
}
