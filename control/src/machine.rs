//! The control state machine: the cluster config (once), the routing table (versions only grow;
//! a bucket moves only by compare-and-swap on its epoch), the cell registry and the partners. It
//! owns no buckets; its keys sit above every bucket prefix. Apply is total: every arithmetic step
//! is checked and a command that cannot apply is refused the same way on every replica.

use crate::commands::{
    Changed, CommitMove, ControlCommand, ControlRejection, FINISHED_KEPT, Init, PutPartner, SetCellState,
    UpdateReplicas, control_command,
};
use crate::store::{self, CONFIG, MIGRATIONS, PARTNERS, REBALANCE, TABLE};
use nid_engine::{ApplyContext, StateMachine, StorageError, View};
use nid_proto::codec;
use nid_proto::v1::{CellInfo, PartnerRecord};
use nid_proto::v1::{CellState, Migration, MigrationPhase, SetRebalanceRequest};
use std::sync::Arc;
use tokio::sync::watch;

/// What applying a control command produced.
pub type ControlApplied = Result<Changed, ControlRejection>;

/// The control state machine of one replica.
pub struct ControlMachine {
    table_version: Arc<watch::Sender<u64>>,
}

impl ControlMachine {
    /// A machine that announces each applied routing-table version on `table_version` (watchers
    /// wake on it instead of polling).
    pub fn new(table_version: Arc<watch::Sender<u64>>) -> ControlMachine {
        ControlMachine { table_version }
    }
}

impl StateMachine for ControlMachine {
    type Command = ControlCommand;
    type Output = ControlApplied;

    fn encode(command: &ControlCommand) -> Vec<u8> {
        codec::encode(command)
    }

    fn decode(bytes: &[u8]) -> Result<ControlCommand, String> {
        codec::decode(bytes).map_err(|e| e.to_string())
    }

    fn bucket(_command: &ControlCommand) -> Option<u32> {
        None
    }

    fn apply(
        &mut self,
        command: ControlCommand,
        ctx: &mut ApplyContext<'_>,
    ) -> Result<ControlApplied, StorageError> {
        // Only these change the routing table; the others need not decode it again afterwards.
        let changes_table = matches!(
            command.kind,
            Some(
                control_command::Kind::Init(_)
                    | control_command::Kind::RegisterCell(_)
                    | control_command::Kind::CommitMove(_)
                    | control_command::Kind::SetCellState(_)
                    | control_command::Kind::RemoveCell(_)
                    | control_command::Kind::UpdateReplicas(_)
            )
        );
        let result = match command.kind {
            Some(control_command::Kind::Init(c)) => init(c, ctx)?,
            Some(control_command::Kind::RegisterCell(c)) => register_cell(c, ctx)?,
            Some(control_command::Kind::PutPartner(c)) => put_partner(c, ctx)?,
            Some(control_command::Kind::CommitMove(c)) => commit_move(&c, ctx)?,
            Some(control_command::Kind::RecordMigration(m)) => record_migration(m, ctx)?,
            Some(control_command::Kind::SetCellState(c)) => set_cell_state(&c, ctx)?,
            Some(control_command::Kind::RemoveCell(id)) => remove_cell(id, ctx)?,
            Some(control_command::Kind::SetRebalance(r)) => set_rebalance(&r, ctx)?,
            Some(control_command::Kind::UpdateReplicas(u)) => update_replicas(u, ctx)?,
            None => Err(ControlRejection::Malformed("empty command")),
        };
        if let Ok(Changed { changed: true, version }) = result
            && changes_table
        {
            self.table_version.send_if_modified(|v| {
                let grew = version > *v;
                *v = (*v).max(version);
                grew
            });
        }
        Ok(result)
    }

    fn restore(&mut self, view: &View<'_>) -> Result<(), StorageError> {
        if let Some(table) = store::table(view)? {
            self.table_version.send_replace(table.version);
        }
        Ok(())
    }
}

fn init(c: Init, ctx: &mut ApplyContext<'_>) -> Result<ControlApplied, StorageError> {
    let (Some(config), Some(table)) = (c.config, c.table) else {
        return Ok(Err(ControlRejection::Malformed("init without config or table")));
    };
    if crate::commands::check_init(&config, &table).is_some() {
        return Ok(Err(ControlRejection::Malformed("init config or table")));
    }
    if let Some(existing) = store::config(&*ctx)? {
        if existing != config {
            return Ok(Err(ControlRejection::ClusterExists));
        }
        let version = store::table(&*ctx)?.map(|t| t.version).unwrap_or(0);
        return Ok(Ok(Changed { changed: false, version }));
    }
    ctx.put(CONFIG, codec::encode(&config))?;
    ctx.put(TABLE, codec::encode(&table))?;
    Ok(Ok(Changed { changed: true, version: table.version }))
}

fn register_cell(cell: CellInfo, ctx: &mut ApplyContext<'_>) -> Result<ControlApplied, StorageError> {
    if crate::commands::check_cell(&cell).is_some() {
        return Ok(Err(ControlRejection::Malformed("cell")));
    }
    let Some(mut table) = store::table(&*ctx)? else { return Ok(Err(ControlRejection::NoCluster)) };
    let mut cell = cell;
    // Registering a registered cell again may update its replicas, never its state (joining,
    // active, draining change only through SetCellState and the rebalancer).
    if let Some(existing) = table.cells.iter().find(|c| c.cell_id == cell.cell_id) {
        cell.state = existing.state;
    }
    if table.cells.contains(&cell) {
        return Ok(Ok(Changed { changed: false, version: table.version }));
    }
    let Some(version) = table.version.checked_add(1) else { return Ok(Err(ControlRejection::Exhausted)) };
    table.cells.retain(|c| c.cell_id != cell.cell_id);
    table.cells.push(cell);
    table.cells.sort_by_key(|c| c.cell_id);
    table.version = version;
    ctx.put(TABLE, codec::encode(&table))?;
    Ok(Ok(Changed { changed: true, version }))
}

fn update_replicas(u: UpdateReplicas, ctx: &mut ApplyContext<'_>) -> Result<ControlApplied, StorageError> {
    let Some(mut table) = store::table(&*ctx)? else { return Ok(Err(ControlRejection::NoCluster)) };
    let Some(i) = table.cells.iter().position(|c| c.cell_id == u.cell_id) else {
        return Ok(Err(ControlRejection::NoSuchCell));
    };
    let updated = CellInfo { replicas: u.replicas, ..table.cells[i].clone() };
    if crate::commands::check_cell(&updated).is_some() {
        return Ok(Err(ControlRejection::Malformed("cell replicas")));
    }
    if table.cells[i] == updated {
        return Ok(Ok(Changed { changed: false, version: table.version }));
    }
    if table.cells[i].replicas != u.expected {
        return Ok(Err(ControlRejection::RegistryChanged));
    }
    let Some(version) = table.version.checked_add(1) else { return Ok(Err(ControlRejection::Exhausted)) };
    table.cells[i] = updated;
    table.version = version;
    ctx.put(TABLE, codec::encode(&table))?;
    Ok(Ok(Changed { changed: true, version }))
}

fn commit_move(c: &CommitMove, ctx: &mut ApplyContext<'_>) -> Result<ControlApplied, StorageError> {
    let Some(mut table) = store::table(&*ctx)? else { return Ok(Err(ControlRejection::NoCluster)) };
    let (buckets, epochs): (Vec<u32>, Vec<u64>) = if c.buckets.is_empty() {
        (vec![c.bucket], vec![c.expected_epoch])
    } else {
        (c.buckets.clone(), c.expected_epochs.clone())
    };
    let known = table.cells.iter().any(|cell| cell.cell_id == c.to);
    let distinct: std::collections::HashSet<u32> = buckets.iter().copied().collect();
    if buckets.len() != epochs.len()
        || distinct.len() != buckets.len()
        || buckets.iter().any(|&b| b as usize >= table.owner.len() || b as usize >= table.epoch.len())
        || !known
        || c.from == c.to
    {
        return Ok(Err(ControlRejection::Malformed("buckets, epochs or destination")));
    }
    // A bucket a move is driving commits only as that move, whole, and only once the move has
    // copied and not begun to abort. A commit naming its batch (the rebalancer's) needs its move in
    // flight; a hand commit of one bucket (repairs, tests) needs no move to drive it.
    let mut log = store::migrations(&*ctx)?;
    let driving =
        log.active.iter().position(|m| crate::commands::buckets_of(m).iter().any(|b| distinct.contains(b)));
    match (driving, c.buckets.is_empty()) {
        (None, false) => {
            return Ok(Err(ControlRejection::MigrationConflict("no move of these buckets is in flight")));
        }
        (Some(_), true) => {
            return Ok(Err(ControlRejection::MigrationConflict("a move drives this bucket")));
        }
        _ => {}
    }
    if let Some(i) = driving {
        let m = &log.active[i];
        let ready = matches!(
            phase(m),
            Some(
                MigrationPhase::Copy
                    | MigrationPhase::CatchUp
                    | MigrationPhase::Frozen
                    | MigrationPhase::Drained
            )
        );
        if crate::commands::buckets_of(m) != buckets || m.from_cell != c.from || m.to_cell != c.to || !ready {
            return Ok(Err(ControlRejection::MigrationConflict("the buckets are in another move or phase")));
        }
    }
    // Every bucket moves, or none.
    for (&b, &e) in buckets.iter().zip(&epochs) {
        if table.owner[b as usize] != c.from || table.epoch[b as usize] != e {
            return Ok(Err(ControlRejection::MoveConflict));
        }
    }
    let Some(version) = table.version.checked_add(1) else { return Ok(Err(ControlRejection::Exhausted)) };
    for &b in &buckets {
        let Some(epoch) = table.epoch[b as usize].checked_add(1) else {
            return Ok(Err(ControlRejection::Exhausted));
        };
        table.owner[b as usize] = c.to;
        table.epoch[b as usize] = epoch;
    }
    table.version = version;
    ctx.put(TABLE, codec::encode(&table))?;
    // The move's record says committed in the same command: a resumed coordinator never has to
    // guess whether the compare-and-swap happened.
    if let Some(m) = driving.and_then(|i| log.active.get_mut(i)) {
        m.phase = MigrationPhase::Committed as i32;
        m.table_version = version;
        ctx.put(MIGRATIONS, codec::encode(&log))?;
    }
    Ok(Ok(Changed { changed: true, version }))
}

fn phase(m: &Migration) -> Option<MigrationPhase> {
    MigrationPhase::try_from(m.phase).ok()
}

/// Records a move's progress. A new move of a bucket starts PLANNED, from its owner, to a cell
/// that takes buckets, while no other move of it is in flight; a recorded move only goes forward
/// (ABORTING, then ABORTED, from any phase before COMMITTED; COMMITTED only through the commit itself; CLEANED_UP
/// after it). Finished moves leave the in-flight list for the bounded history.
fn record_migration(m: Migration, ctx: &mut ApplyContext<'_>) -> Result<ControlApplied, StorageError> {
    use MigrationPhase as P;
    let Some(new) = phase(&m).filter(|p| *p != P::Unspecified) else {
        return Ok(Err(ControlRejection::Malformed("migration phase")));
    };
    let buckets = crate::commands::buckets_of(&m);
    let distinct: std::collections::HashSet<u32> = buckets.iter().copied().collect();
    if buckets.iter().any(|&b| b >= u32::from(nid_proto::bucket::BUCKETS))
        || distinct.len() != buckets.len()
        || buckets[0] != m.bucket
        || m.from_cell == m.to_cell
    {
        return Ok(Err(ControlRejection::Malformed("migration buckets or cells")));
    }
    let mut log = store::migrations(&*ctx)?;
    // The routing table is a large value: only a new move needs it (its owner and destination).
    // The version in the result is the table's for a new move, 0 otherwise.
    let unchanged = Changed { changed: false, version: 0 };
    match log.active.iter().position(|a| a.bucket == m.bucket) {
        None => {
            if new != P::Planned {
                // A late copy of a move's last record changes nothing; any other record of a
                // finished move (a stale coordinator's) is refused.
                if log.finished.iter().any(|f| {
                    f.bucket == m.bucket
                        && f.from_cell == m.from_cell
                        && f.to_cell == m.to_cell
                        && f.phase == m.phase
                }) {
                    return Ok(Ok(unchanged));
                }
                return Ok(Err(ControlRejection::MigrationConflict("no move of this bucket is in flight")));
            }
            let Some(table) = store::table(&*ctx)? else { return Ok(Err(ControlRejection::NoCluster)) };
            if buckets.iter().any(|&x| table.owner.get(x as usize) != Some(&m.from_cell)) {
                return Ok(Err(ControlRejection::MigrationConflict("the source does not own every bucket")));
            }
            let moving: std::collections::HashSet<u32> =
                log.active.iter().flat_map(crate::commands::buckets_of).collect();
            if buckets.iter().any(|x| moving.contains(x)) {
                return Ok(Err(ControlRejection::MigrationConflict("another move of a bucket is in flight")));
            }
            let takes = table.cells.iter().any(|c| {
                c.cell_id == m.to_cell
                    && matches!(CellState::try_from(c.state), Ok(CellState::Joining | CellState::Active))
            });
            if !takes {
                return Ok(Err(ControlRejection::MigrationConflict("the destination takes no buckets")));
            }
            log.active.push(m);
        }
        Some(i) => {
            let current = &log.active[i];
            if current.from_cell != m.from_cell
                || current.to_cell != m.to_cell
                || crate::commands::buckets_of(current) != buckets
            {
                return Ok(Err(ControlRejection::MigrationConflict(
                    "another move of this bucket is in flight",
                )));
            }
            let old = phase(current).unwrap_or(P::Unspecified);
            // ABORTING (numbered after every other phase) is entered only before the commit and
            // leaves only to ABORTED; the commit cannot happen once it is recorded.
            let allowed = match new {
                P::Aborting => old < P::Committed || old == P::Aborting,
                P::Aborted => old == P::Aborting,
                P::Committed => old == P::Committed,
                P::CleanedUp => old == P::Committed,
                _ => old < P::Committed && new >= old,
            };
            if !allowed {
                return Ok(Err(ControlRejection::MigrationConflict("phases only go forward")));
            }
            if *current == m {
                return Ok(Ok(unchanged));
            }
            let mut m = m;
            // What the commit recorded stays.
            if old == P::Committed {
                m.table_version = current.table_version;
            }
            if matches!(new, P::Aborted | P::CleanedUp) {
                log.active.remove(i);
                log.finished.push(m);
                let excess = log.finished.len().saturating_sub(FINISHED_KEPT);
                log.finished.drain(..excess);
            } else {
                log.active[i] = m;
            }
        }
    }
    ctx.put(MIGRATIONS, codec::encode(&log))?;
    Ok(Ok(Changed { changed: true, version: 0 }))
}

fn set_cell_state(c: &SetCellState, ctx: &mut ApplyContext<'_>) -> Result<ControlApplied, StorageError> {
    let Some(mut table) = store::table(&*ctx)? else { return Ok(Err(ControlRejection::NoCluster)) };
    let Ok(state @ (CellState::Joining | CellState::Active | CellState::Draining)) =
        CellState::try_from(c.state)
    else {
        return Ok(Err(ControlRejection::Malformed("cell state")));
    };
    let Some(i) = table.cells.iter().position(|x| x.cell_id == c.cell_id) else {
        return Ok(Err(ControlRejection::NoSuchCell));
    };
    if table.cells[i].state == state as i32 {
        return Ok(Ok(Changed { changed: false, version: table.version }));
    }
    let takers = table
        .cells
        .iter()
        .filter(|x| x.cell_id != c.cell_id && x.state != CellState::Draining as i32)
        .count();
    if state == CellState::Draining && takers == 0 {
        return Ok(Err(ControlRejection::CellBusy("the last cell that takes buckets cannot drain")));
    }
    let Some(version) = table.version.checked_add(1) else { return Ok(Err(ControlRejection::Exhausted)) };
    table.cells[i].state = state as i32;
    table.version = version;
    ctx.put(TABLE, codec::encode(&table))?;
    Ok(Ok(Changed { changed: true, version }))
}

fn remove_cell(cell_id: u64, ctx: &mut ApplyContext<'_>) -> Result<ControlApplied, StorageError> {
    let Some(mut table) = store::table(&*ctx)? else { return Ok(Err(ControlRejection::NoCluster)) };
    if !table.cells.iter().any(|c| c.cell_id == cell_id) {
        return Ok(Err(ControlRejection::NoSuchCell));
    }
    if table.owner.contains(&cell_id) {
        return Ok(Err(ControlRejection::CellBusy("it still owns buckets; drain it first")));
    }
    if store::migrations(&*ctx)?.active.iter().any(|m| m.from_cell == cell_id || m.to_cell == cell_id) {
        return Ok(Err(ControlRejection::CellBusy("a bucket move involves it")));
    }
    let Some(version) = table.version.checked_add(1) else { return Ok(Err(ControlRejection::Exhausted)) };
    table.cells.retain(|c| c.cell_id != cell_id);
    table.version = version;
    ctx.put(TABLE, codec::encode(&table))?;
    Ok(Ok(Changed { changed: true, version }))
}

fn set_rebalance(
    r: &SetRebalanceRequest,
    ctx: &mut ApplyContext<'_>,
) -> Result<ControlApplied, StorageError> {
    if crate::commands::check_rebalance(r).is_some() {
        return Ok(Err(ControlRejection::Malformed("rebalance settings")));
    }
    let Some(table) = store::table(&*ctx)? else { return Ok(Err(ControlRejection::NoCluster)) };
    let mut settings = store::rebalance(&*ctx)?;
    let before = settings;
    if let Some(p) = r.paused {
        settings.paused = p;
    }
    if let Some(rate) = r.rate_bytes_per_second {
        settings.rate_bytes_per_second = rate;
    }
    if let Some(n) = r.max_in_flight {
        settings.max_in_flight = n;
    }
    if settings == before {
        return Ok(Ok(Changed { changed: false, version: table.version }));
    }
    ctx.put(REBALANCE, codec::encode(&settings))?;
    Ok(Ok(Changed { changed: true, version: table.version }))
}

fn put_partner(c: PutPartner, ctx: &mut ApplyContext<'_>) -> Result<ControlApplied, StorageError> {
    let Some(record) = c.partner else { return Ok(Err(ControlRejection::Malformed("partner"))) };
    let Some(id) = record.partner.as_ref().map(|p| p.partner_id.clone()) else {
        return Ok(Err(ControlRejection::Malformed("partner")));
    };
    if store::table(&*ctx)?.is_none() {
        return Ok(Err(ControlRejection::NoCluster));
    }
    let mut list = store::partners(&*ctx)?;
    let exists = list.partners.iter().any(|p| p.partner.as_ref().is_some_and(|p| p.partner_id == id));
    if c.create_only && exists {
        return Ok(Err(ControlRejection::PartnerExists));
    }
    if list.partners.contains(&record) {
        return Ok(Ok(Changed { changed: false, version: list.partners_version }));
    }
    let Some(version) = list.partners_version.checked_add(1) else {
        return Ok(Err(ControlRejection::Exhausted));
    };
    list.partners.retain(|p| p.partner.as_ref().is_none_or(|p| p.partner_id != id));
    list.partners.push(record);
    let id_of = |r: &PartnerRecord| r.partner.as_ref().map(|p| p.partner_id.clone()).unwrap_or_default();
    list.partners.sort_by_key(id_of);
    list.partners_version = version;
    ctx.put(PARTNERS, codec::encode(&list))?;
    Ok(Ok(Changed { changed: true, version }))
}
