//! The rebalancer (DESIGN.md §7), run by the control cell's leader: it compares the routing table
//! with the consistent-hash placement of the cells that take buckets, keeps a bounded number of
//! bucket moves in flight, and drives each through its phases, recording every phase in the
//! control cell's log before acting on the next, so a new leader resumes each move where the old
//! one stopped. Every step is idempotent.
//!
//! One move of bucket b from S to D: D marks b IMPORTING; S tracks b's changes; a full copy of b
//! (one view of S) goes into D through D's log; rounds of changes since the copy follow until few
//! remain; S freezes b (writes get retry-later) and the last changes go over; the counts and
//! checksums of b at S and D must match; then one compare-and-swap on the routing table commits
//! (the only decision point; the record says COMMITTED in the same command). After it S marks b
//! NOT_OWNED (it refuses b from then on: wrong-owner), D marks it OWNED and serves, and S deletes
//! its copy: nothing a reader can observe depends on that deletion, since S refuses b by its fence
//! from the moment NOT_OWNED applies, so it need not wait for routers. Before the commit any
//! failure aborts: D drops its partial copy and gives b up, S owns b again, unfrozen. After the
//! commit the move only goes forward.

use crate::control_service::ControlCell;
use nid_control::commands::{CommitMove, control_command};
use nid_control::store;
use nid_engine::transport::Dialer;
use nid_proto::error::RoutingHint;
use nid_proto::v1::bucket_admin_client::BucketAdminClient;
use nid_proto::v1::{
    BucketExportChunk, BucketState, CellState, ChecksumBucketRequest, DeleteBucketRequest,
    ExportBucketRequest, Migration, MigrationPhase, RoutingTable, SetBucketStateRequest,
};
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// How often the leader looks at the placement.
const TICK: Duration = Duration::from_millis(250);
/// Moves in flight when the settings say 0.
const DEFAULT_IN_FLIGHT: u32 = 8;
/// Buckets one move carries at most (all with the same source and destination): the steps of a
/// move cost about the same for one bucket or many.
const MAX_BATCH: usize = 64;
/// A catch-up round with at most this many changes is followed by the freeze.
const FEW_CHANGES: usize = 64;
/// Catch-up rounds before freezing regardless (writes outpacing the copy).
const MAX_ROUNDS: usize = 8;
/// The reasons a move aborts for (metric label values).
const ABORT_REASONS: [&str; 6] =
    ["unreachable", "checksum", "owner_changed", "refused", "unknown_cell", "resumed"];

/// How long a step before the commit may keep failing before the move aborts.
const STEP_PATIENCE: Duration = Duration::from_secs(30);
/// One call to a cell.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The rebalancer's metrics (on every control replica; only the leader's move).
#[derive(Clone)]
pub struct RebalanceMetrics {
    moves: IntCounterVec,
    in_flight: IntGauge,
    misplaced: IntGauge,
    paused: IntGauge,
    cell_buckets: prometheus::IntGaugeVec,
    bytes: prometheus::IntCounter,
    keys: prometheus::IntCounter,
    freeze: Histogram,
}

impl RebalanceMetrics {
    /// Creates and registers the metrics.
    pub fn new(registry: &Registry) -> prometheus::Result<RebalanceMetrics> {
        let moves = IntCounterVec::new(
            Opts::new(
                "nid_rebalance_moves_total",
                "Bucket moves finished, by result (committed, aborted) and reason.",
            ),
            &["result", "reason"],
        )?;
        let in_flight = IntGauge::new("nid_rebalance_in_flight", "Bucket moves in flight.")?;
        let misplaced = IntGauge::new(
            "nid_rebalance_misplaced_buckets",
            "Buckets whose owner differs from the desired placement.",
        )?;
        let paused = IntGauge::new("nid_rebalance_paused", "1 while the rebalancer is paused.")?;
        let cell_buckets = prometheus::IntGaugeVec::new(
            Opts::new(
                "nid_rebalance_cell_buckets",
                "Buckets per data cell in the routing table (kind=owned) and in the desired placement (kind=desired).",
            ),
            &["cell", "kind"],
        )?;
        let bytes = prometheus::IntCounter::new(
            "nid_rebalance_copied_bytes_total",
            "Bytes (keys and values) copied by bucket moves this leader drove.",
        )?;
        let keys = prometheus::IntCounter::new(
            "nid_rebalance_copied_keys_total",
            "Keys copied by bucket moves this leader drove.",
        )?;
        let freeze = Histogram::with_opts(
            HistogramOpts::new("nid_rebalance_freeze_seconds", "How long a moved bucket refused writes.")
                .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
        )?;
        registry.register(Box::new(moves.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(misplaced.clone()))?;
        registry.register(Box::new(paused.clone()))?;
        registry.register(Box::new(cell_buckets.clone()))?;
        registry.register(Box::new(bytes.clone()))?;
        registry.register(Box::new(keys.clone()))?;
        registry.register(Box::new(freeze.clone()))?;
        Ok(RebalanceMetrics { moves, in_flight, misplaced, paused, cell_buckets, bytes, keys, freeze })
    }

    /// A replica that does not lead reports no rebalancer state (only the leader's gauges count).
    fn clear(&self) {
        self.in_flight.set(0);
        self.misplaced.set(0);
        self.paused.set(0);
        self.cell_buckets.reset();
    }
}

/// The cells (id, weight, state) a placement was computed for.
type CellsKey = Vec<(u64, u32, i32)>;

/// The rebalancer of one control replica.
pub struct Rebalancer {
    control: Arc<ControlCell>,
    dialer: Arc<dyn Dialer>,
    metrics: RebalanceMetrics,
    /// Buckets whose move a task of this replica drives.
    driving: Mutex<HashSet<u32>>,
    /// The leader each data cell had last (address).
    leaders: Mutex<HashMap<u64, String>>,
    /// When the copy rate allows the next bytes.
    next_free: tokio::sync::Mutex<Instant>,
    /// Wakes the planner when a move finishes (room for the next one).
    wake: tokio::sync::Notify,
    /// The desired placement and the cells (id, weight, state) it was computed for.
    placement: Mutex<Option<(CellsKey, Arc<Vec<u64>>)>>,
}

/// Where the placement puts every bucket (None when no cell takes buckets).
pub fn desired(table: &RoutingTable) -> Option<Vec<u64>> {
    nid_proto::placement::desired_for(table).ok()
}

/// Why a step failed.
#[derive(Debug)]
enum StepError {
    /// Worth retrying (a cell unreachable or electing, a timeout).
    Transient(String),
    /// Not worth retrying: the move must abort, with this reason (a metric label).
    Abort(&'static str),
    /// This replica is no longer the control leader: stop; the next leader resumes.
    Deposed,
}

fn transient(e: tonic::Status) -> StepError {
    StepError::Transient(format!("{:?}: {}", e.code(), e.message()))
}

fn now_ts() -> prost_types::Timestamp {
    let d = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

/// Whether two records are of one move (a later move of the same buckets is another).
fn same_move(a: &Migration, b: &Migration) -> bool {
    a.bucket == b.bucket
        && a.from_cell == b.from_cell
        && a.to_cell == b.to_cell
        && a.started_at == b.started_at
        && nid_control::commands::buckets_of(a) == nid_control::commands::buckets_of(b)
}

fn phase(m: &Migration) -> MigrationPhase {
    MigrationPhase::try_from(m.phase).unwrap_or(MigrationPhase::Unspecified)
}

impl Rebalancer {
    /// A rebalancer for the control replica `control`, dialing cells with `dialer`.
    pub fn new(control: Arc<ControlCell>, dialer: Arc<dyn Dialer>, metrics: RebalanceMetrics) -> Rebalancer {
        Rebalancer {
            control,
            dialer,
            metrics,
            driving: Mutex::default(),
            leaders: Mutex::default(),
            next_free: tokio::sync::Mutex::new(Instant::now()),
            wake: tokio::sync::Notify::new(),
            placement: Mutex::default(),
        }
    }

    /// Runs until `shutdown`: while this replica leads the control cell, plans and drives moves.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(TICK) => {}
                _ = self.wake.notified() => {}
            }
            if !self.control.node.is_leader() {
                self.metrics.clear();
                continue;
            }
            if let Err(e) = self.tick().await {
                tracing::debug!(error = %e, "rebalancer tick failed");
            }
            // Moves finishing in a burst are planned for together.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn tick(self: &Arc<Self>) -> Result<(), String> {
        let (table, log, settings) = self
            .control
            .read_state(|v| Ok((store::table(v)?, store::migrations(v)?, store::rebalance(v)?)))
            .await
            .map_err(|e| e.to_string())?;
        let Some(table) = table else { return Ok(()) };
        let Some(desired) = self.desired_cached(&table) else { return Ok(()) };
        let misplaced = (0..table.owner.len()).filter(|&b| table.owner[b] != desired[b]).count();
        self.metrics.misplaced.set(misplaced as i64);
        self.metrics.in_flight.set(log.active.len() as i64);
        self.metrics.paused.set(i64::from(settings.paused));
        self.metrics.cell_buckets.reset();
        for c in &table.cells {
            let cell = c.cell_id.to_string();
            let owned = table.owner.iter().filter(|&&o| o == c.cell_id).count();
            let wanted = desired.iter().filter(|&&o| o == c.cell_id).count();
            self.metrics.cell_buckets.with_label_values(&[cell.as_str(), "owned"]).set(owned as i64);
            self.metrics.cell_buckets.with_label_values(&[cell.as_str(), "desired"]).set(wanted as i64);
        }
        for m in &log.active {
            self.spawn_driver(m.clone());
        }
        // A joining cell that has received its share becomes active.
        for c in &table.cells {
            let joining = c.state == CellState::Joining as i32;
            let waiting =
                (0..table.owner.len()).any(|b| desired[b] == c.cell_id && table.owner[b] != c.cell_id);
            if joining && !waiting {
                let set = nid_control::commands::SetCellState {
                    cell_id: c.cell_id,
                    state: CellState::Active as i32,
                };
                let _ = self.control.propose_kind(control_command::Kind::SetCellState(set)).await;
            }
        }
        if settings.paused {
            return Ok(());
        }
        let max =
            if settings.max_in_flight == 0 { DEFAULT_IN_FLIGHT } else { settings.max_in_flight } as usize;
        let busy: HashSet<u32> = log.active.iter().flat_map(nid_control::commands::buckets_of).collect();
        let mut room = max.saturating_sub(log.active.len());
        if room == 0 || misplaced == 0 {
            return Ok(());
        }
        // Batches of misplaced buckets with the same source and destination, from a point that
        // moves with time, so the moves spread over the source cells.
        let n = table.owner.len();
        let start = (table.version as usize).wrapping_mul(7919) % n.max(1);
        let mut batches: Vec<((u64, u64), Vec<u32>)> = Vec::new();
        for i in 0..n {
            let b = (start + i) % n;
            if table.owner[b] == desired[b] || busy.contains(&(b as u32)) {
                continue;
            }
            let pair = (table.owner[b], desired[b]);
            let open = batches.len();
            match batches.iter_mut().find(|(p, list)| *p == pair && list.len() < MAX_BATCH) {
                Some((_, list)) => list.push(b as u32),
                None if open < room => batches.push((pair, vec![b as u32])),
                None => {}
            }
            if batches.len() >= room && batches.iter().all(|(_, l)| l.len() >= MAX_BATCH) {
                break;
            }
        }
        for ((from, to), buckets) in batches {
            if room == 0 {
                break;
            }
            let m = Migration {
                bucket: buckets[0],
                buckets: buckets.clone(),
                from_cell: from,
                to_cell: to,
                phase: MigrationPhase::Planned as i32,
                table_version: table.version,
                started_at: Some(now_ts()),
                updated_at: Some(now_ts()),
                ..Default::default()
            };
            if self.control.propose_kind(control_command::Kind::RecordMigration(m.clone())).await.is_ok() {
                tracing::info!(bucket = m.bucket, buckets = buckets.len(), from, to, "bucket move planned");
                self.spawn_driver(m);
                room -= 1;
            }
        }
        Ok(())
    }

    /// [`desired`], computed again only when the cells change.
    fn desired_cached(&self, table: &RoutingTable) -> Option<Arc<Vec<u64>>> {
        let key: CellsKey = table.cells.iter().map(|c| (c.cell_id, c.weight, c.state)).collect();
        let mut cache = self.placement.lock().ok()?;
        if let Some((k, d)) = cache.as_ref()
            && *k == key
        {
            return Some(d.clone());
        }
        let d = Arc::new(desired(table)?);
        *cache = Some((key, d.clone()));
        Some(d)
    }

    fn spawn_driver(self: &Arc<Self>, m: Migration) {
        let Ok(mut driving) = self.driving.lock() else { return };
        if !driving.insert(m.bucket) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let bucket = m.bucket;
            me.drive(m).await;
            if let Ok(mut d) = me.driving.lock() {
                d.remove(&bucket);
            }
            me.wake.notify_one();
        });
    }

    /// The move's record as the control log holds it now; None once it is finished.
    async fn recorded(&self, bucket: u32) -> Result<Option<Migration>, StepError> {
        let log = self.control.read_state(store::migrations).await.map_err(|e| self.control_error(e))?;
        Ok(log.active.into_iter().find(|x| x.bucket == bucket))
    }

    /// Drives one move to its end, or until this replica stops leading. Before every step the
    /// record is read again: the log, not this task's memory, says whether the move committed
    /// (a commit whose answer was lost still applied) or is being given up.
    async fn drive(self: &Arc<Self>, m: Migration) {
        let mut m = m;
        let mut frozen_at: Option<Instant> = None;
        let mut first_failure: Option<Instant> = None;
        loop {
            if !self.control.node.is_leader() {
                return;
            }
            match self.recorded(m.bucket).await {
                Ok(None) | Err(StepError::Deposed) => return,
                Ok(Some(r)) => {
                    if !same_move(&r, &m) {
                        return;
                    }
                    // The log's phase wins when it is ahead (a commit or an abort this task did
                    // not hear of, or a new leader starting); this task's copy progress is kept.
                    if phase(&r) >= MigrationPhase::Committed || phase(&m) < phase(&r) {
                        let (copy_index, keys, bytes) = (m.copy_index, m.keys, m.bytes);
                        m = r;
                        m.copy_index = m.copy_index.max(copy_index);
                        m.keys = m.keys.max(keys);
                        m.bytes = m.bytes.max(bytes);
                    }
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
            let step = match phase(&m) {
                MigrationPhase::CleanedUp | MigrationPhase::Aborted | MigrationPhase::Unspecified => return,
                MigrationPhase::Aborting => {
                    let reason =
                        if m.abort_reason.is_empty() { "resumed".to_owned() } else { m.abort_reason.clone() };
                    self.abort(&mut m, &reason).await;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                MigrationPhase::Committed => self.finish(&mut m, frozen_at).await,
                _ => self.advance(&mut m, &mut frozen_at).await,
            };
            let reason = match step {
                Ok(()) => {
                    first_failure = None;
                    continue;
                }
                Err(StepError::Deposed) => return,
                Err(StepError::Abort(reason)) if phase(&m) < MigrationPhase::Committed => {
                    self.abort(&mut m, reason).await;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                Err(StepError::Abort(reason)) => reason.to_owned(),
                Err(StepError::Transient(reason)) => reason,
            };
            tracing::warn!(bucket = m.bucket, phase = phase(&m).as_str_name(), %reason, "bucket move step failed; retrying");
            let since = *first_failure.get_or_insert_with(Instant::now);
            if phase(&m) < MigrationPhase::Committed && since.elapsed() > STEP_PATIENCE {
                self.abort(&mut m, "unreachable").await;
                first_failure = None;
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Takes a move before its commit one phase further.
    async fn advance(&self, m: &mut Migration, frozen_at: &mut Option<Instant>) -> Result<(), StepError> {
        let (from, to, v) = (m.from_cell, m.to_cell, m.table_version);
        let buckets = nid_control::commands::buckets_of(m);
        match phase(m) {
            MigrationPhase::Planned => {
                self.set_state(to, &buckets, BucketState::Importing, v, false).await?;
                self.record(m, MigrationPhase::Importing).await
            }
            MigrationPhase::Importing => {
                self.set_state(from, &buckets, BucketState::Owned, v, true).await?;
                let (index, keys, bytes) = self.copy(from, to, &buckets, 0, true).await?;
                m.copy_index = index;
                m.keys += keys;
                m.bytes += bytes;
                self.record(m, MigrationPhase::Copy).await
            }
            MigrationPhase::Copy | MigrationPhase::CatchUp if frozen_at.is_some() => {
                // A retry after this task froze the source: the buckets refuse writes, so no
                // more rounds (nor their rate limit) and nothing recorded; straight to the end.
                self.drain(m, &buckets).await?;
                self.commit(m, &buckets, *frozen_at).await
            }
            MigrationPhase::Copy | MigrationPhase::CatchUp => {
                // Rounds of changes since the last copy, until few remain; then the freeze.
                for _ in 0..MAX_ROUNDS {
                    let (index, keys, bytes) = self.copy(from, to, &buckets, m.copy_index, true).await?;
                    m.copy_index = index.max(m.copy_index);
                    m.keys += keys;
                    m.bytes += bytes;
                    if keys as usize <= FEW_CHANGES {
                        break;
                    }
                }
                self.record(m, MigrationPhase::CatchUp).await?;
                let started = Instant::now();
                m.frozen_index = self.set_state(from, &buckets, BucketState::Frozen, v, false).await?;
                *frozen_at = Some(started);
                // From here on every step is on the write path of the frozen buckets: nothing is
                // recorded until the commit (a resumed move redoes the catch-up rounds and the
                // checksums, which a frozen source answers the same way again).
                self.drain(m, &buckets).await?;
                self.commit(m, &buckets, *frozen_at).await
            }
            MigrationPhase::Frozen | MigrationPhase::Drained => {
                // Recorded by an older coordinator: the source is frozen; finish the catch-up.
                self.drain(m, &buckets).await?;
                self.commit(m, &buckets, *frozen_at).await
            }
            _ => Ok(()),
        }
    }

    /// The last catch-up of frozen buckets, then their counts and checksums at both ends, which
    /// must match (once more from a full copy if they do not; then the move aborts).
    async fn drain(&self, m: &mut Migration, buckets: &[u32]) -> Result<(), StepError> {
        let (from, to) = (m.from_cell, m.to_cell);
        // The source is frozen: these copies are on the write path and skip the rate limit.
        let (index, keys, bytes) = self.copy(from, to, buckets, m.copy_index, false).await?;
        m.copy_index = index.max(m.copy_index);
        m.keys += keys;
        m.bytes += bytes;
        let (src, dst) = tokio::join!(self.checksums(from, buckets), self.checksums(to, buckets));
        if src? != dst? {
            // Once more from scratch (the source is frozen: a full copy is final).
            let (index, keys, bytes) = self.copy(from, to, buckets, 0, false).await?;
            m.copy_index = index.max(m.copy_index);
            m.keys += keys;
            m.bytes += bytes;
            let (src, dst) = tokio::join!(self.checksums(from, buckets), self.checksums(to, buckets));
            if src? != dst? {
                return Err(StepError::Abort("checksum"));
            }
        }
        Ok(())
    }

    /// The decision point: one compare-and-swap of every bucket's owner and epoch. A retry after
    /// an unknown outcome finds the move already committed in the control log and goes on.
    async fn commit(
        &self,
        m: &mut Migration,
        buckets: &[u32],
        frozen_at: Option<Instant>,
    ) -> Result<(), StepError> {
        let (from, to) = (m.from_cell, m.to_cell);
        let table = self.table().await?;
        if buckets.iter().all(|&b| table.owner.get(b as usize) == Some(&to)) {
            let log = self.control.read_state(store::migrations).await.map_err(|e| self.control_error(e))?;
            if let Some(recorded) = log.active.iter().find(|x| x.bucket == m.bucket && x.to_cell == to)
                && phase(recorded) == MigrationPhase::Committed
            {
                m.phase = recorded.phase;
                m.table_version = recorded.table_version;
                return Ok(());
            }
        }
        if buckets.iter().any(|&b| table.owner.get(b as usize) != Some(&from)) {
            return Err(StepError::Abort("owner_changed"));
        }
        let epochs: Vec<u64> =
            buckets.iter().map(|&b| table.epoch.get(b as usize).copied().unwrap_or(0)).collect();
        let commit = CommitMove {
            bucket: buckets[0],
            from,
            to,
            expected_epoch: epochs[0],
            buckets: buckets.to_vec(),
            expected_epochs: epochs,
        };
        match self.control.propose_kind(control_command::Kind::CommitMove(commit)).await {
            Ok(changed) => {
                m.table_version = changed.version;
                m.phase = MigrationPhase::Committed as i32;
                if let Some(t) = frozen_at {
                    m.freeze_ms = t.elapsed().as_millis().min(u128::from(u32::MAX)) as u32;
                }
                tracing::info!(
                    bucket = m.bucket,
                    buckets = buckets.len(),
                    from,
                    to,
                    version = changed.version,
                    "bucket move committed"
                );
                Ok(())
            }
            Err(e) if e.code() == tonic::Code::Aborted => Err(StepError::Abort("owner_changed")),
            Err(e) => Err(self.control_error(e)),
        }
    }

    /// After the commit: the source lets go, the destination serves, the source's copy goes.
    async fn finish(&self, m: &mut Migration, frozen_at: Option<Instant>) -> Result<(), StepError> {
        let (from, to, v) = (m.from_cell, m.to_cell, m.table_version);
        let buckets = nid_control::commands::buckets_of(m);
        // In this order: the source stops serving reads (a FROZEN source still answers them)
        // before the destination takes writes, so no read can miss an acknowledged write.
        self.set_state(from, &buckets, BucketState::NotOwned, v, false).await?;
        self.set_state(to, &buckets, BucketState::Owned, v, false).await?;
        if let Some(t) = frozen_at {
            m.freeze_ms = t.elapsed().as_millis().min(u128::from(u32::MAX)) as u32;
            self.metrics.freeze.observe(t.elapsed().as_secs_f64());
        }
        self.delete(from, &buckets, v).await?;
        self.record(m, MigrationPhase::CleanedUp).await?;
        self.metrics.moves.with_label_values(&["committed", ""]).inc_by(buckets.len() as u64);
        self.metrics.bytes.inc_by(m.bytes);
        self.metrics.keys.inc_by(m.keys);
        Ok(())
    }

    /// Gives a move up before its commit. The log decides first: ABORTING is recorded only while
    /// the move has not committed, and from then on the commit cannot apply; if the log says the
    /// move committed instead, nothing is undone and the caller goes on forward. Then the
    /// destination drops its copy (best effort: it may be gone for good) and the source owns the
    /// buckets again, unfrozen; then ABORTED. Returns when done, when the log says otherwise, or
    /// when this replica stops leading (a new leader resumes an ABORTING move here).
    async fn abort(&self, m: &mut Migration, reason: &str) {
        let (from, to, v) = (m.from_cell, m.to_cell, m.table_version);
        let buckets = nid_control::commands::buckets_of(m);
        if phase(m) != MigrationPhase::Aborting {
            let mut decided = m.clone();
            decided.abort_reason = reason.to_owned();
            match self.record(&mut decided, MigrationPhase::Aborting).await {
                Ok(()) => *m = decided,
                // Refused (the move committed, or finished) or unknown: the caller reads the
                // record again and follows it.
                Err(_) => return,
            }
        }
        tracing::warn!(bucket = m.bucket, buckets = buckets.len(), from, to, reason, "bucket move aborting");
        let mut first = true;
        loop {
            if !self.control.node.is_leader() {
                return;
            }
            // On a retry, only while the log still says this very move is being given up.
            if !first {
                match self.recorded(m.bucket).await {
                    Ok(Some(r)) if same_move(&r, m) && phase(&r) == MigrationPhase::Aborting => {}
                    _ => return,
                }
            }
            first = false;
            let undone = async {
                let dest = async {
                    self.delete(to, &buckets, v).await?;
                    self.set_state(to, &buckets, BucketState::NotOwned, v, false).await
                };
                if let Err(e) = tokio::time::timeout(Duration::from_secs(15), dest)
                    .await
                    .unwrap_or(Err(StepError::Transient("timeout".into())))
                {
                    tracing::warn!(bucket = m.bucket, cell = to, error = ?e, "the destination did not drop its partial copy");
                }
                self.set_state(from, &buckets, BucketState::Owned, v, false).await?;
                self.record(m, MigrationPhase::Aborted).await
            };
            match undone.await {
                Ok(()) => {
                    let label = if ABORT_REASONS.contains(&reason) { reason } else { "other" };
                    self.metrics.moves.with_label_values(&["aborted", label]).inc_by(buckets.len() as u64);
                    return;
                }
                Err(StepError::Deposed) => return,
                Err(e) => {
                    tracing::warn!(bucket = m.bucket, error = ?e, "undoing a bucket move failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    async fn delete(&self, cell: u64, buckets: &[u32], v: u64) -> Result<(), StepError> {
        self.cell_call(cell, |mut c| async move {
            let request =
                DeleteBucketRequest { bucket: buckets[0], table_version: v, buckets: buckets.to_vec() };
            c.delete_bucket(request).await.map(|_| ())
        })
        .await
    }

    /// Records `m` at `to_phase` in the control log.
    async fn record(&self, m: &mut Migration, to_phase: MigrationPhase) -> Result<(), StepError> {
        let mut next = m.clone();
        next.phase = to_phase as i32;
        next.updated_at = Some(now_ts());
        self.control
            .propose_kind(control_command::Kind::RecordMigration(next.clone()))
            .await
            .map_err(|e| self.control_error(e))?;
        tracing::info!(
            bucket = m.bucket,
            from = m.from_cell,
            to = m.to_cell,
            phase = to_phase.as_str_name(),
            "bucket move"
        );
        *m = next;
        Ok(())
    }

    fn control_error(&self, e: tonic::Status) -> StepError {
        if !self.control.node.is_leader() {
            return StepError::Deposed;
        }
        match e.code() {
            tonic::Code::Aborted | tonic::Code::FailedPrecondition => StepError::Abort("refused"),
            _ => transient(e),
        }
    }

    async fn table(&self) -> Result<RoutingTable, StepError> {
        match self.control.read_state(store::table).await {
            Ok(Some(t)) => Ok(t),
            Ok(None) => Err(StepError::Transient("no routing table".into())),
            Err(e) => Err(self.control_error(e)),
        }
    }

    /// Copies `buckets` from cell `from` into cell `to`: everything (`after` = 0) or the changes
    /// applied after `after`, from one view of the source. Returns the source index the copy is
    /// consistent with, keys and bytes.
    async fn copy(
        &self,
        from: u64,
        to: u64,
        buckets: &[u32],
        after: u64,
        throttled: bool,
    ) -> Result<(u64, u64, u64), StepError> {
        let chunks: Vec<BucketExportChunk> = self
            .cell_call(from, |mut c| async move {
                let request =
                    ExportBucketRequest { bucket: buckets[0], after_index: after, buckets: buckets.to_vec() };
                let mut stream = c.export_bucket(request).await?.into_inner();
                let mut out = Vec::new();
                while let Some(chunk) = stream.message().await? {
                    out.push(chunk);
                }
                Ok(out)
            })
            .await?;
        let index = chunks.iter().map(|c| c.source_index).max().unwrap_or(after);
        let keys: u64 = chunks.iter().map(|c| c.keys.len() as u64).sum();
        let bytes: u64 =
            chunks.iter().flat_map(|c| c.keys.iter().chain(&c.values)).map(|x| x.len() as u64).sum();
        if chunks.is_empty() {
            return Ok((index, 0, 0));
        }
        if throttled {
            self.throttle(bytes).await;
        }
        let chunks = Arc::new(chunks);
        self.cell_call(to, |mut c| {
            let chunks = chunks.clone();
            async move { c.import_bucket(tokio_stream::iter(chunks.to_vec())).await.map(|_| ()) }
        })
        .await?;
        Ok((index, keys, bytes))
    }

    /// Waits until the copy rate allows `bytes` more.
    async fn throttle(&self, bytes: u64) {
        let rate = match self.control.read_state(store::rebalance).await {
            Ok(s) => s.rate_bytes_per_second,
            Err(_) => 0,
        };
        if rate == 0 {
            return;
        }
        let wait_until = {
            let mut next = self.next_free.lock().await;
            let now = Instant::now();
            let start = (*next).max(now);
            *next = start + Duration::from_secs_f64(bytes as f64 / rate as f64);
            start
        };
        tokio::time::sleep_until(wait_until.into()).await;
    }

    /// Count and checksum of every bucket of `buckets` at `cell`'s leader, from one view.
    async fn checksums(&self, cell: u64, buckets: &[u32]) -> Result<Vec<(u32, u64, Vec<u8>)>, StepError> {
        self.cell_call(cell, |mut c| async move {
            let request =
                ChecksumBucketRequest { bucket: buckets[0], local: false, buckets: buckets.to_vec() };
            let r = c.checksum_bucket(request).await?.into_inner();
            Ok(r.checksums.into_iter().map(|x| (x.bucket, x.records, x.sha256)).collect())
        })
        .await
    }

    /// Sets `buckets`' state on `cell` (with change tracking when `track`); the index it applied at.
    async fn set_state(
        &self,
        cell: u64,
        buckets: &[u32],
        state: BucketState,
        v: u64,
        track: bool,
    ) -> Result<u64, StepError> {
        self.cell_call(cell, |mut c| async move {
            let request = SetBucketStateRequest {
                buckets: buckets.to_vec(),
                state: state as i32,
                table_version: v,
                track_changes: track,
            };
            Ok(c.set_bucket_state(request).await?.into_inner().applied_index)
        })
        .await
    }

    /// Calls the leader of data cell `cell` (following not-leader hints across its replicas).
    async fn cell_call<T, F, Fut>(&self, cell: u64, mut f: F) -> Result<T, StepError>
    where
        F: FnMut(BucketAdminClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let table = self.table().await?;
        let replicas: Vec<String> = table
            .cells
            .iter()
            .find(|c| c.cell_id == cell)
            .map(|c| c.replicas.iter().map(|r| r.address.clone()).collect())
            .unwrap_or_default();
        if replicas.is_empty() {
            return Err(StepError::Abort("unknown_cell"));
        }
        let cached = self.leaders.lock().ok().and_then(|l| l.get(&cell).cloned());
        let mut order: Vec<String> = cached.into_iter().filter(|a| replicas.contains(a)).collect();
        for r in &replicas {
            if !order.contains(r) {
                order.push(r.clone());
            }
        }
        let mut last = StepError::Transient("no replica answered".into());
        let mut tried = 0;
        while let Some(address) = order.first().cloned() {
            order.remove(0);
            tried += 1;
            if tried > 6 {
                break;
            }
            let channel = match self.dialer.endpoint(&address) {
                Ok(e) => {
                    self.dialer.connect_lazy(e.connect_timeout(Duration::from_secs(1)).timeout(CALL_TIMEOUT))
                }
                Err(_) => continue,
            };
            let client = BucketAdminClient::new(channel).max_decoding_message_size(16 << 20);
            match f(client).await {
                Ok(v) => {
                    if let Ok(mut l) = self.leaders.lock() {
                        l.insert(cell, address);
                    }
                    return Ok(v);
                }
                Err(e) => {
                    if let Some(RoutingHint::NotLeader { leader, .. }) = RoutingHint::from_status(&e) {
                        if let Some((_, a)) = leader
                            && replicas.contains(&a)
                            && a != address
                        {
                            order.retain(|x| *x != a);
                            order.insert(0, a);
                        }
                        last = transient(e);
                        continue;
                    }
                    match e.code() {
                        tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument => {
                            tracing::warn!(cell, code = ?e.code(), message = e.message(), "a cell refused a bucket move step");
                            return Err(StepError::Abort("refused"));
                        }
                        _ => last = transient(e),
                    }
                }
            }
        }
        Err(last)
    }
}
