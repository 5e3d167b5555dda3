//! `nidctl cell add|drain|remove` and `nidctl rebalance plan|status|pause|resume|rate|parallel`:
//! growing and shrinking the cluster through the router's Admin service (the control cell's
//! leader moves the buckets). `nidctl cell replace-replica`: a replica that lost its data comes
//! back under a new node id, through the cell leader's membership changes, and the control cell's
//! registry is updated to the cell's new members.

use crate::Output;
use crate::credentials::with_bearer;
use crate::partner::{AdminArgs, admin_client};
use nid_proto::v1::cell_client::CellClient;
use nid_proto::v1::membership_change::Kind;
use nid_proto::v1::{
    AddCellRequest, CellInfo, CellState, ChangeMembershipRequest, DrainCellRequest, GetCellStatusRequest,
    GetClusterStatusRequest, GetRebalanceStatusRequest, GetRebalanceStatusResponse, MembershipChange,
    Migration, MigrationPhase, RemoveCellRequest, ReplicaInfo, SetRebalanceRequest,
    UpdateCellReplicasRequest,
};
use std::io::IsTerminal as _;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

/// `nidctl cell ...`.
#[derive(Debug, clap::Subcommand)]
pub enum CellCommand {
    /// Register the running, empty replicas of a new cell; the rebalancer then moves its share
    /// of the buckets to it. Refused for replicas that are unreachable, not empty, of another
    /// cluster, or not in distinct zones.
    Add {
        /// The new cell's id (unique, never reused).
        #[arg(long)]
        cell_id: u64,
        /// A replica, NODE=HOST:PORT@ZONE; give one per zone (at least 3).
        #[arg(long = "replica", required = true, value_parser = parse_replica)]
        replicas: Vec<ReplicaInfo>,
        /// Relative capacity (1..=1000; default 100).
        #[arg(long, default_value_t = 0)]
        weight: u32,
    },
    /// Move every bucket of a cell away (the cell becomes DRAINING).
    Drain {
        /// The cell.
        cell_id: u64,
    },
    /// Remove a drained cell (it owns no bucket) from the registry.
    Remove {
        /// The cell.
        cell_id: u64,
    },
    /// Replace a data-cell replica that lost its data (or moves to a new disk) by one started
    /// empty under a new node id: the cell's leader adds it as a learner, it catches up (by
    /// snapshot), then the old id is removed and the new one made a voter, and the control
    /// cell's registry records the cell's new members. Start the new
    /// replica first, with `--peers` listing the cell's members and not itself. Run it while the
    /// cell's other replicas are healthy. Never restart a wiped replica under its old id.
    ReplaceReplica {
        /// The cell.
        cell_id: u64,
        /// The node id of the replica to replace.
        #[arg(long)]
        node: u64,
        /// The new replica's node id (never used before in this cell).
        #[arg(long)]
        new_node: u64,
        /// The new replica's address (default: the old one's). The control cell's registry is
        /// updated to it once the replacement is done.
        #[arg(long)]
        address: Option<String>,
        /// The new replica's zone (default: the old one's).
        #[arg(long)]
        zone: Option<String>,
        /// Give up waiting for the new replica to catch up after this many seconds.
        #[arg(long, default_value_t = 600)]
        wait_secs: u64,
    },
}

/// `nidctl rebalance ...`.
#[derive(Debug, clap::Subcommand)]
pub enum RebalanceCommand {
    /// Dry run: how many buckets each cell owns now and would own under the desired placement.
    Plan,
    /// Buckets per cell, moves in flight with phase, keys and bytes copied, rate and ETA.
    Status {
        /// Refresh every second until nothing is misplaced (a progress bar on a terminal).
        #[arg(long)]
        watch: bool,
    },
    /// Start no new moves (moves in flight finish).
    Pause,
    /// Start moves again.
    Resume,
    /// Limit the copy rate over all moves, in MB/s (0: unlimited).
    Rate {
        /// Megabytes per second.
        mb_per_second: f64,
    },
    /// Moves in flight at once (1..=64).
    Parallel {
        /// How many.
        moves: u32,
    },
}

fn parse_replica(text: &str) -> Result<ReplicaInfo, String> {
    let (node, rest) = text.split_once('=').ok_or("expected NODE=HOST:PORT@ZONE")?;
    let (address, zone) = rest.split_once('@').ok_or("expected NODE=HOST:PORT@ZONE")?;
    let node_id: u64 = node.parse().map_err(|_| "NODE must be a number".to_owned())?;
    if address.is_empty() || zone.is_empty() {
        return Err("expected NODE=HOST:PORT@ZONE".into());
    }
    Ok(ReplicaInfo { node_id, address: address.to_owned(), zone: zone.to_owned() })
}

fn failed(what: &str, e: tonic::Status) -> anyhow::Result<ExitCode> {
    eprintln!("nidctl: {what} failed: {:?}: {}", e.code(), e.message());
    Ok(ExitCode::from(1))
}

/// `nidctl cell ...`.
pub async fn cell(
    command: CellCommand,
    admin: &AdminArgs,
    router: Option<&str>,
    dir: &Path,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let (mut client, token) = admin_client(admin, router, dir).await?;
    match command {
        CellCommand::Add { cell_id, replicas, weight } => {
            let cell = CellInfo { cell_id, replicas, weight, state: CellState::Joining as i32 };
            match client.add_cell(with_bearer(AddCellRequest { cell: Some(cell) }, &token)?).await {
                Ok(r) => {
                    let r = r.into_inner();
                    match output {
                        Output::Table => println!(
                            "cell {cell_id} added (table version {}); {} buckets will move to it",
                            r.table_version, r.buckets_planned
                        ),
                        Output::Json => println!(
                            "{}",
                            serde_json::json!({"cell_id": cell_id, "table_version": r.table_version,
                                "buckets_planned": r.buckets_planned})
                        ),
                    }
                }
                Err(e) => return failed("cell add", e),
            }
        }
        CellCommand::Drain { cell_id } => {
            match client.drain_cell(with_bearer(DrainCellRequest { cell_id }, &token)?).await {
                Ok(r) => println!("cell {cell_id} draining (table version {})", r.into_inner().table_version),
                Err(e) => return failed("cell drain", e),
            }
        }
        CellCommand::Remove { cell_id } => {
            match client.remove_cell(with_bearer(RemoveCellRequest { cell_id }, &token)?).await {
                Ok(r) => println!("cell {cell_id} removed (table version {})", r.into_inner().table_version),
                Err(e) => return failed("cell remove", e),
            }
        }
        CellCommand::ReplaceReplica { cell_id, node, new_node, address, zone, wait_secs } => {
            let status = match client.get_cluster_status(GetClusterStatusRequest {}).await {
                Ok(s) => s.into_inner(),
                Err(e) => return failed("cell replace-replica", e),
            };
            let Some(cell) =
                status.cells.iter().find(|c| c.cell.as_ref().is_some_and(|i| i.cell_id == cell_id))
            else {
                anyhow::bail!("no data cell {cell_id} in the cluster status");
            };
            // A typo must not make a live voter "the replacement": the new id is one the cell's
            // registered replicas never had, unless the registry already records this very
            // replacement (a run again after it finished).
            let registered = cell.cell.as_ref().map(|i| i.replicas.as_slice()).unwrap_or_default();
            let lists = |id: u64| registered.iter().any(|r| r.node_id == id);
            let member = |id: u64| cell.replicas.iter().any(|r| r.node_id == id && r.healthy);
            if lists(new_node) && !lists(node) && member(new_node) && !member(node) && new_node != node {
                match output {
                    Output::Table => println!(
                        "cell {cell_id}: node {node} is not a member and node {new_node} is, in the cell \
                         and in the registry; nothing to do"
                    ),
                    Output::Json => println!(
                        "{}",
                        serde_json::json!({"cell_id": cell_id, "old_node": node, "new_node": new_node,
                            "nothing_to_do": true})
                    ),
                }
                return Ok(ExitCode::SUCCESS);
            }
            if new_node == node || lists(new_node) {
                anyhow::bail!("--new-node {new_node} is a replica id this cell already had: pick a new one");
            }
            // Run again after a step that failed, it goes on from where the two nodes are (the
            // new node keeps the address and zone it joined with).
            let old = cell.replicas.iter().find(|r| r.node_id == node);
            let added = cell.replicas.iter().find(|r| r.node_id == new_node);
            let Some(known) = added.or(old) else {
                anyhow::bail!("node {node} is not a replica of cell {cell_id}");
            };
            let Some(leader) = cell.replicas.iter().find(|r| r.is_leader && r.node_id != node) else {
                anyhow::bail!(
                    "cell {cell_id} has no leader other than node {node}: if node {node} leads, move \
                     leadership away first; otherwise restore the cell's quorum"
                );
            };
            let new = MembershipChange {
                kind: Kind::AddLearner as i32,
                node_id: new_node,
                address: address.unwrap_or_else(|| known.address.clone()),
                zone: zone.unwrap_or_else(|| known.zone.clone()),
            };
            let wait = Duration::from_secs(wait_secs);
            let steps = Steps { add: added.is_none(), remove: old.is_some() };
            let replicas = replace_replica(cell_id, &leader.address, node, new, steps, wait, output).await?;
            // The registry lists the cell's replicas as they are now: the addresses routers and
            // the rebalancer dial, and what the next replace-replica checks against.
            let request = UpdateCellReplicasRequest { cell_id, replicas };
            match client.update_cell_replicas(with_bearer(request, &token)?).await {
                Ok(r) => eprintln!(
                    "nidctl: the registry lists cell {cell_id}'s new replicas (table version {})",
                    r.into_inner().table_version
                ),
                Err(e) => {
                    return failed(
                        "cell replace-replica: the membership changed, but updating the registry",
                        e,
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The status of cell `cell_id` from the replica at `leader`, which must still lead it: only the
/// leader knows how far the other members have come.
async fn leader_status(
    cell: &mut CellClient<tonic::transport::Channel>,
    leader: &str,
    cell_id: u64,
) -> anyhow::Result<nid_proto::v1::CellStatus> {
    let status = cell.get_cell_status(GetCellStatusRequest {}).await.map_err(grpc_error)?.into_inner();
    let leads = status.replicas.iter().any(|r| r.is_leader && r.address == leader);
    if !leads {
        anyhow::bail!("leadership of cell {cell_id} moved away from {leader}; run this again");
    }
    Ok(status)
}

fn grpc_error(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", e.code(), e.message())
}

/// Which membership changes of a replacement are still to make.
struct Steps {
    /// Add the new node as a learner.
    add: bool,
    /// Remove the old node.
    remove: bool,
}

/// The steps of `nidctl cell replace-replica` against the leader at `leader`: `new` joins as a
/// learner, catches up to the leader's applied index of that moment, then `old` leaves and `new`
/// becomes a voter (skipping what `steps` says is done).
async fn replace_replica(
    cell_id: u64,
    leader: &str,
    old: u64,
    new: MembershipChange,
    steps: Steps,
    wait: Duration,
    output: Output,
) -> anyhow::Result<Vec<ReplicaInfo>> {
    let mut cell = CellClient::new(crate::dev::connect(leader, "cell").await?);
    let change = |changes: Vec<MembershipChange>| ChangeMembershipRequest { changes };
    if steps.add {
        cell.change_membership(change(vec![new.clone()])).await.map_err(grpc_error)?;
    }
    let applied = |s: &nid_proto::v1::CellStatus, id: u64| {
        s.replicas.iter().find(|r| r.node_id == id).map(|r| r.applied_index).unwrap_or(0)
    };
    let status = leader_status(&mut cell, leader, cell_id).await?;
    let leader_id = status.replicas.iter().find(|r| r.is_leader).map(|r| r.node_id).unwrap_or(0);
    let target = applied(&status, leader_id);
    eprintln!("nidctl: node {} is a learner of cell {cell_id}; catching up to index {target}", new.node_id);
    let started = std::time::Instant::now();
    loop {
        let status = leader_status(&mut cell, leader, cell_id).await?;
        let at = applied(&status, new.node_id);
        if at >= target {
            break;
        }
        if started.elapsed() > wait {
            anyhow::bail!(
                "node {} is at index {at} of {target} after {wait:?}: it stays a learner (harmless); \
                 check that it runs and reaches the leader, then run this again",
                new.node_id
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let caught_up = started.elapsed().as_secs_f64();
    // Two single changes, not one joint change: leaving a joint configuration needs a majority of
    // the old one too, which counts the lost replica; a second failure in that window would stall
    // the cell. Removing first leaves {leader, other} (the quorum the cell had anyway with the old
    // replica lost), then the promotion makes three voters again.
    let remove = MembershipChange { kind: Kind::Remove as i32, node_id: old, ..Default::default() };
    let promote = MembershipChange { kind: Kind::AddVoter as i32, ..new.clone() };
    if steps.remove {
        cell.change_membership(change(vec![remove])).await.map_err(grpc_error)?;
    }
    let done = cell.change_membership(change(vec![promote])).await.map_err(grpc_error)?.into_inner();
    match output {
        Output::Table => println!(
            "cell {cell_id}: node {} replaced node {old} (caught up in {caught_up:.1} s); voters {:?}",
            new.node_id, done.voters
        ),
        Output::Json => println!(
            "{}",
            serde_json::json!({"cell_id": cell_id, "old_node": old, "new_node": new.node_id,
                "caught_up_seconds": caught_up, "voters": done.voters, "learners": done.learners})
        ),
    }
    // The voters as the leader knows them (address book), for the registry.
    let status = leader_status(&mut cell, leader, cell_id).await?;
    let replicas: Vec<ReplicaInfo> = status
        .replicas
        .iter()
        .filter(|r| done.voters.contains(&r.node_id))
        .map(|r| ReplicaInfo { node_id: r.node_id, address: r.address.clone(), zone: r.zone.clone() })
        .collect();
    if replicas.len() != done.voters.len() {
        anyhow::bail!(
            "the leader of cell {cell_id} does not know the address of every voter {:?}; run this again",
            done.voters
        );
    }
    Ok(replicas)
}

/// `nidctl rebalance ...`.
pub async fn rebalance(
    command: RebalanceCommand,
    admin: &AdminArgs,
    router: Option<&str>,
    dir: &Path,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let (mut client, token) = admin_client(admin, router, dir).await?;
    let settings = match command {
        RebalanceCommand::Plan => {
            let s = match client.get_rebalance_status(GetRebalanceStatusRequest {}).await {
                Ok(s) => s.into_inner(),
                Err(e) => return failed("rebalance plan", e),
            };
            print_plan(&s, output);
            return Ok(ExitCode::SUCCESS);
        }
        RebalanceCommand::Status { watch } => return status(&mut client, watch, output).await,
        RebalanceCommand::Pause => SetRebalanceRequest { paused: Some(true), ..Default::default() },
        RebalanceCommand::Resume => SetRebalanceRequest { paused: Some(false), ..Default::default() },
        RebalanceCommand::Rate { mb_per_second } => {
            if !(mb_per_second >= 0.0 && mb_per_second.is_finite()) {
                anyhow::bail!("the rate must be a number of MB/s >= 0");
            }
            let bytes = (mb_per_second * 1e6) as u64;
            SetRebalanceRequest { rate_bytes_per_second: Some(bytes), ..Default::default() }
        }
        RebalanceCommand::Parallel { moves } => {
            SetRebalanceRequest { max_in_flight: Some(moves), ..Default::default() }
        }
    };
    match client.set_rebalance(with_bearer(settings, &token)?).await {
        Ok(s) => {
            let s = s.into_inner();
            match output {
                Output::Table => println!(
                    "rebalancer {}; rate {}; {} moves at once",
                    if s.paused { "paused" } else { "running" },
                    rate_text(s.rate_bytes_per_second),
                    if s.max_in_flight == 0 { 8 } else { s.max_in_flight }
                ),
                Output::Json => println!(
                    "{}",
                    serde_json::json!({"paused": s.paused, "rate_bytes_per_second": s.rate_bytes_per_second,
                        "max_in_flight": s.max_in_flight})
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => failed("rebalance", e),
    }
}

fn rate_text(bytes: u64) -> String {
    if bytes == 0 { "unlimited".into() } else { format!("{:.1} MB/s", bytes as f64 / 1e6) }
}

fn state_name(state: i32) -> &'static str {
    match CellState::try_from(state) {
        Ok(CellState::Joining) => "joining",
        Ok(CellState::Active) => "active",
        Ok(CellState::Draining) => "draining",
        _ => "unknown",
    }
}

/// Done with, one way or the other.
fn finished(m: &Migration) -> bool {
    m.phase == MigrationPhase::CleanedUp as i32 || m.phase == MigrationPhase::Aborted as i32
}

fn phase_name(m: &Migration) -> &'static str {
    match MigrationPhase::try_from(m.phase) {
        Ok(MigrationPhase::Planned) => "planned",
        Ok(MigrationPhase::Importing) => "importing",
        Ok(MigrationPhase::Copy) => "copy",
        Ok(MigrationPhase::CatchUp) => "catch-up",
        Ok(MigrationPhase::Frozen) => "frozen",
        Ok(MigrationPhase::Drained) => "drained",
        Ok(MigrationPhase::Committed) => "committed",
        Ok(MigrationPhase::CleanedUp) => "done",
        Ok(MigrationPhase::Aborted) => "aborted",
        Ok(MigrationPhase::Aborting) => "aborting",
        _ => "unknown",
    }
}

fn print_plan(s: &GetRebalanceStatusResponse, output: Output) {
    match output {
        Output::Table => {
            println!("{:>6} {:<9} {:>8} {:>8} {:>8}", "cell", "state", "owned", "desired", "change");
            for c in &s.cells {
                let change = i64::from(c.desired) - i64::from(c.owned);
                println!(
                    "{:>6} {:<9} {:>8} {:>8} {:>+8}",
                    c.cell_id,
                    state_name(c.state),
                    c.owned,
                    c.desired,
                    change
                );
            }
            println!("{} buckets to move (table version {})", s.buckets_misplaced, s.table_version);
        }
        Output::Json => {
            let cells: Vec<serde_json::Value> = s
                .cells
                .iter()
                .map(|c| {
                    serde_json::json!({"cell_id": c.cell_id, "state": state_name(c.state),
                    "owned": c.owned, "desired": c.desired})
                })
                .collect();
            println!(
                "{}",
                serde_json::json!({"table_version": s.table_version, "buckets_misplaced": s.buckets_misplaced,
                    "cells": cells})
            );
        }
    }
}

/// How many buckets a move carries.
fn size(m: &Migration) -> usize {
    m.buckets.len().max(1)
}

fn seconds(t: &Option<prost_types::Timestamp>) -> f64 {
    t.map(|t| t.seconds as f64 + f64::from(t.nanos) / 1e9).unwrap_or(0.0)
}

/// Buckets and bytes moved per second over the last minute of finished moves.
fn recent_rate(s: &GetRebalanceStatusResponse) -> (f64, f64) {
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs_f64();
    let recent: Vec<&Migration> = s
        .migrations
        .iter()
        .filter(|m| m.phase == MigrationPhase::CleanedUp as i32 && now - seconds(&m.updated_at) <= 60.0)
        .collect();
    if recent.is_empty() {
        return (0.0, 0.0);
    }
    let first = recent.iter().map(|m| seconds(&m.started_at)).fold(f64::MAX, f64::min);
    let span = (now - first).clamp(1.0, 60.0);
    let bytes: u64 = recent.iter().map(|m| m.bytes).sum();
    (recent.iter().map(|m| size(m)).sum::<usize>() as f64 / span, bytes as f64 / span)
}

async fn status(
    client: &mut nid_proto::v1::admin_client::AdminClient<tonic::transport::Channel>,
    watch: bool,
    output: Output,
) -> anyhow::Result<ExitCode> {
    let tty = std::io::stdout().is_terminal();
    let mut total: Option<u32> = None;
    loop {
        let s = match client.get_rebalance_status(GetRebalanceStatusRequest {}).await {
            Ok(s) => s.into_inner(),
            Err(e) => return failed("rebalance status", e),
        };
        let (buckets_per_s, bytes_per_s) = recent_rate(&s);
        let in_flight: Vec<&Migration> = s.migrations.iter().filter(|m| !finished(m)).collect();
        let moving: usize = in_flight.iter().map(|m| size(m)).sum();
        let eta = if buckets_per_s > 0.0 { f64::from(s.buckets_misplaced) / buckets_per_s } else { 0.0 };
        match output {
            Output::Json => {
                let moves: Vec<serde_json::Value> = in_flight
                    .iter()
                    .map(|m| {
                        serde_json::json!({"bucket": m.bucket, "buckets": size(m), "from": m.from_cell, "to": m.to_cell,
                        "phase": phase_name(m), "keys": m.keys, "bytes": m.bytes})
                    })
                    .collect();
                let cells: Vec<serde_json::Value> = s
                    .cells
                    .iter()
                    .map(|c| {
                        serde_json::json!({"cell_id": c.cell_id, "state": state_name(c.state),
                        "owned": c.owned, "desired": c.desired})
                    })
                    .collect();
                // Finished moves the control cell still remembers (the last 256): for figures.
                let finished: Vec<serde_json::Value> = s
                    .migrations
                    .iter()
                    .filter(|m| finished(m))
                    .map(|m| {
                        serde_json::json!({"bucket": m.bucket, "buckets": size(m), "from": m.from_cell, "to": m.to_cell,
                        "phase": phase_name(m), "keys": m.keys, "bytes": m.bytes, "freeze_ms": m.freeze_ms,
                        "abort_reason": m.abort_reason, "started_at": seconds(&m.started_at),
                        "updated_at": seconds(&m.updated_at)})
                    })
                    .collect();
                let settings = s.settings.unwrap_or_default();
                println!(
                    "{}",
                    serde_json::json!({"table_version": s.table_version, "buckets_misplaced": s.buckets_misplaced,
                        "paused": settings.paused, "rate_limit_bytes_per_second": settings.rate_bytes_per_second,
                        "buckets_per_second": buckets_per_s, "bytes_per_second": bytes_per_s,
                        "eta_seconds": eta, "cells": cells, "in_flight": moves, "finished": finished,
                        "aborted_recently": s.migrations.iter().filter(|m| m.phase == MigrationPhase::Aborted as i32).count()})
                );
            }
            Output::Table if watch && tty => {
                let all = *total.get_or_insert(s.buckets_misplaced.max(1));
                let done = all.saturating_sub(s.buckets_misplaced);
                let width = 40usize;
                let filled = (done as usize * width / all.max(1) as usize).min(width);
                let owned: Vec<String> =
                    s.cells.iter().map(|c| format!("{}:{}", c.cell_id, c.owned)).collect();
                print!(
                    "\r[{}{}] {done}/{all} buckets  {:.1} buckets/s  {:.2} MB/s  ETA {:.0}s  moving {}  [{}]   ",
                    "#".repeat(filled),
                    "-".repeat(width - filled),
                    buckets_per_s,
                    bytes_per_s / 1e6,
                    eta,
                    moving,
                    owned.join(" ")
                );
                use std::io::Write as _;
                let _ = std::io::stdout().flush();
            }
            Output::Table => {
                let settings = s.settings.unwrap_or_default();
                println!(
                    "table version {}; {} buckets misplaced; rebalancer {}, rate {}",
                    s.table_version,
                    s.buckets_misplaced,
                    if settings.paused { "paused" } else { "running" },
                    rate_text(settings.rate_bytes_per_second)
                );
                println!("{:>6} {:<9} {:>8} {:>8}", "cell", "state", "owned", "desired");
                for c in &s.cells {
                    println!("{:>6} {:<9} {:>8} {:>8}", c.cell_id, state_name(c.state), c.owned, c.desired);
                }
                println!(
                    "moving {:.1} buckets/s, {:.2} MB/s; ETA {:.0} s; {} buckets in {} moves in flight",
                    buckets_per_s,
                    bytes_per_s / 1e6,
                    eta,
                    moving,
                    in_flight.len()
                );
                for m in &in_flight {
                    println!(
                        "  buckets {:>5} (+{:<2}) {} -> {}  {:<9} {:>7} keys {:>10} bytes",
                        m.bucket,
                        size(m) - 1,
                        m.from_cell,
                        m.to_cell,
                        phase_name(m),
                        m.keys,
                        m.bytes
                    );
                }
            }
        }
        if !watch || (s.buckets_misplaced == 0 && in_flight.is_empty()) {
            if watch && tty && output == Output::Table {
                println!();
            }
            return Ok(ExitCode::SUCCESS);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
