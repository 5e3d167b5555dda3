//! The control state machine: the cluster config (once), the routing table (versions only grow;
//! a bucket moves only by compare-and-swap on its epoch), the cell registry and the partners. It
//! owns no buckets; its keys sit above every bucket prefix. Apply is total: every arithmetic step
//! is checked and a command that cannot apply is refused the same way on every replica.

use crate::commands::{
    Changed, CommitMove, ControlCommand, ControlRejection, Init, PutPartner, control_command,
};
use crate::store::{self, CONFIG, PARTNERS, TABLE};
use nid_engine::{ApplyContext, StateMachine, StorageError, View};
use nid_proto::codec;
use nid_proto::v1::{CellInfo, PartnerRecord};
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
        let result = match command.kind {
            Some(control_command::Kind::Init(c)) => init(c, ctx)?,
            Some(control_command::Kind::RegisterCell(c)) => register_cell(c, ctx)?,
            Some(control_command::Kind::PutPartner(c)) => put_partner(c, ctx)?,
            Some(control_command::Kind::CommitMove(c)) => commit_move(&c, ctx)?,
            None => Err(ControlRejection::Malformed("empty command")),
        };
        if let Some(table) = store::table(&*ctx)? {
            self.table_version.send_if_modified(|v| {
                let grew = table.version > *v;
                *v = (*v).max(table.version);
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

fn commit_move(c: &CommitMove, ctx: &mut ApplyContext<'_>) -> Result<ControlApplied, StorageError> {
    let Some(mut table) = store::table(&*ctx)? else { return Ok(Err(ControlRejection::NoCluster)) };
    let b = c.bucket as usize;
    let known = table.cells.iter().any(|cell| cell.cell_id == c.to);
    if b >= table.owner.len() || b >= table.epoch.len() || !known || c.from == c.to {
        return Ok(Err(ControlRejection::Malformed("bucket or destination")));
    }
    if table.owner[b] != c.from || table.epoch[b] != c.expected_epoch {
        return Ok(Err(ControlRejection::MoveConflict));
    }
    let (Some(epoch), Some(version)) = (table.epoch[b].checked_add(1), table.version.checked_add(1)) else {
        return Ok(Err(ControlRejection::Exhausted));
    };
    table.owner[b] = c.to;
    table.epoch[b] = epoch;
    table.version = version;
    ctx.put(TABLE, codec::encode(&table))?;
    Ok(Ok(Changed { changed: true, version }))
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
