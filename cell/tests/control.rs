//! The control state machine in an in-process control cell: cluster creation once, partners
//! created once with only their verifier stored, apply that stays total at the edges (a version
//! or epoch at its maximum is refused on every replica, never a panic), and the rules of bucket
//! moves (records only go forward, one move per bucket, a batch commits whole or not at all,
//! cells leave only when empty).

use nid_control::commands::{CommitMove, Init, PutPartner, SetCellState, control_command};
use nid_control::{Changed, ControlCommand, ControlMachine, ControlRejection, store};
use nid_engine::KvRead as _;
use nid_proto::v1::{
    CellInfo, CellState, ClusterConfig, Migration, MigrationPhase, Partner, PartnerRecord, ReplicaInfo,
    RoutingTable,
};
use nid_testkit::Cluster;
use std::sync::Arc;

fn control(n: u64) -> Cluster<ControlMachine> {
    Cluster::new(n, |_| ControlMachine::new(Arc::new(tokio::sync::watch::channel(0).0)))
}

fn cell_info(id: u64) -> CellInfo {
    CellInfo {
        cell_id: id,
        replicas: vec![ReplicaInfo { node_id: 1, address: "h:1".into(), zone: "a".into() }],
        weight: 1,
        state: 2,
    }
}

fn init(version: u64) -> ControlCommand {
    let n = usize::from(nid_proto::bucket::BUCKETS);
    ControlCommand::new(control_command::Kind::Init(Init {
        config: Some(ClusterConfig { buckets: n as u32, id_scheme_seed: vec![7; 32], name: "t".into() }),
        table: Some(RoutingTable {
            version,
            owner: vec![1; n],
            epoch: vec![0; n],
            cells: vec![cell_info(1)],
        }),
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_cell_creates_a_partner_once_and_stores_only_its_verifier() {
    let mut c = control(3);
    c.start();
    assert_eq!(c.must_propose(&init(1)).await, Ok(Changed { changed: true, version: 1 }));
    assert_eq!(c.must_propose(&init(1)).await, Ok(Changed { changed: false, version: 1 }), "idempotent");
    let record = |name: &str, revoked: bool| PartnerRecord {
        partner: Some(Partner {
            partner_id: "bank-a".into(),
            name: name.into(),
            revoked,
            ..Default::default()
        }),
        secret_digest: vec![7; 32],
    };
    let put = |r: PartnerRecord, create_only: bool| {
        ControlCommand::new(control_command::Kind::PutPartner(PutPartner { partner: Some(r), create_only }))
    };
    assert_eq!(
        c.must_propose(&put(record("A", false), true)).await,
        Ok(Changed { changed: true, version: 1 })
    );
    assert_eq!(
        c.must_propose(&put(record("Impostor", false), true)).await,
        Err(ControlRejection::PartnerExists),
        "two concurrent adds cannot overwrite each other"
    );
    assert_eq!(
        c.must_propose(&put(record("A", true), false)).await,
        Ok(Changed { changed: true, version: 2 })
    );
    let leader = tokio::task::block_in_place(|| c.must_leader());
    let list = c.node(leader).view(|v| store::partners(v)).unwrap();
    assert_eq!(list.partners_version, 2);
    assert_eq!(list.partners, vec![record("A", true)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_and_epochs_at_their_limit_are_refused_on_every_replica_never_a_panic() {
    let mut c = control(3);
    c.start();
    // A cluster can only be created at version 1 with every epoch 0 (InitCluster used to take
    // any version, and the next registration then overflowed inside apply on every replica).
    assert!(matches!(c.must_propose(&init(u64::MAX)).await, Err(ControlRejection::Malformed(_))));
    assert_eq!(c.must_propose(&init(1)).await, Ok(Changed { changed: true, version: 1 }));
    let leader = tokio::task::block_in_place(|| c.must_leader());
    let applied = c.status(leader).applied;
    for id in 1..=3 {
        tokio::task::block_in_place(|| c.must_applied(id, applied));
    }
    // Whatever is on disk, apply stays total: a table at the last version refuses to grow.
    let n = usize::from(nid_proto::bucket::BUCKETS);
    let mut exhausted = RoutingTable {
        version: u64::MAX,
        owner: vec![1; n],
        epoch: vec![0; n],
        cells: vec![cell_info(1), cell_info(2)],
    };
    exhausted.epoch[5] = u64::MAX;
    for id in 1..=3 {
        let db = c.node(id).db().clone();
        let data = db.cf_handle(nid_engine::keys::CF_DATA).unwrap();
        db.put_cf(data, store::TABLE, nid_proto::codec::encode(&exhausted)).unwrap();
    }
    let register = ControlCommand::new(control_command::Kind::RegisterCell(cell_info(3)));
    assert_eq!(c.must_propose(&register).await, Err(ControlRejection::Exhausted));
    let moved = ControlCommand::new(control_command::Kind::CommitMove(CommitMove {
        bucket: 5,
        from: 1,
        to: 2,
        expected_epoch: u64::MAX,
        buckets: Vec::new(),
        expected_epochs: Vec::new(),
    }));
    assert_eq!(c.must_propose(&moved).await, Err(ControlRejection::Exhausted));
    // Every replica is alive, agrees and still holds the table unchanged.
    let leader = tokio::task::block_in_place(|| c.must_leader());
    let applied = c.status(leader).applied;
    for id in 1..=3 {
        tokio::task::block_in_place(|| c.must_applied(id, applied));
        assert!(!c.node(id).stopped().is_cancelled(), "replica {id} stopped");
        let table = c.node(id).view(|v| store::table(v)).unwrap().unwrap();
        assert_eq!(table.version, u64::MAX);
        assert!(c.node(id).view(|v| v.get(store::CONFIG)).unwrap().is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bucket_moves_follow_their_rules_and_a_batch_commits_whole_or_not_at_all() {
    use ControlRejection::{CellBusy, MigrationConflict, MoveConflict};
    let mut c = control(3);
    c.start();
    assert!(c.must_propose(&init(1)).await.is_ok());
    let register = |id: u64, state: CellState| {
        let mut info = cell_info(id);
        info.state = state as i32;
        ControlCommand::new(control_command::Kind::RegisterCell(info))
    };
    assert!(c.must_propose(&register(2, CellState::Joining)).await.is_ok());
    let record = |buckets: &[u32], from: u64, to: u64, phase: MigrationPhase| {
        ControlCommand::new(control_command::Kind::RecordMigration(Migration {
            bucket: buckets[0],
            buckets: buckets.to_vec(),
            from_cell: from,
            to_cell: to,
            phase: phase as i32,
            ..Default::default()
        }))
    };
    let commit = |buckets: &[u32], epochs: &[u64]| {
        ControlCommand::new(control_command::Kind::CommitMove(CommitMove {
            bucket: buckets[0],
            from: 1,
            to: 2,
            expected_epoch: epochs[0],
            buckets: buckets.to_vec(),
            expected_epochs: epochs.to_vec(),
        }))
    };
    let conflict = |r: Result<Changed, ControlRejection>| matches!(r, Err(MigrationConflict(_)));
    // A move starts PLANNED, from the owner, to a cell that takes buckets.
    assert!(conflict(c.must_propose(&record(&[10, 11], 1, 2, MigrationPhase::Copy)).await));
    assert!(conflict(c.must_propose(&record(&[10, 11], 2, 1, MigrationPhase::Planned)).await));
    assert!(c.must_propose(&record(&[10, 11], 1, 2, MigrationPhase::Planned)).await.is_ok());
    // A bucket a move drives commits only as that move, once it has copied.
    assert!(conflict(c.must_propose(&commit(&[10, 11], &[0, 0])).await), "nothing copied yet");
    // One move per bucket.
    assert!(conflict(c.must_propose(&record(&[11, 12], 1, 2, MigrationPhase::Planned)).await));
    // Forward only; COMMITTED only through the commit.
    assert!(c.must_propose(&record(&[10, 11], 1, 2, MigrationPhase::CatchUp)).await.is_ok());
    assert!(conflict(c.must_propose(&record(&[10, 11], 1, 2, MigrationPhase::Copy)).await));
    assert!(conflict(c.must_propose(&record(&[10, 11], 1, 2, MigrationPhase::Committed)).await));
    assert!(conflict(c.must_propose(&commit(&[10], &[0])).await), "part of a batch never commits alone");
    // A batch with one stale epoch moves nothing.
    assert_eq!(c.must_propose(&commit(&[10, 11], &[0, 1])).await, Err(MoveConflict));
    let leader = tokio::task::block_in_place(|| c.must_leader());
    let table = c.node(leader).view(|v| store::table(v)).unwrap().unwrap();
    assert_eq!((table.owner[10], table.owner[11]), (1, 1));
    // The whole batch moves, and its record says so in the same command.
    let moved = c.must_propose(&commit(&[10, 11], &[0, 0])).await.unwrap();
    let table = c.node(leader).view(|v| store::table(v)).unwrap().unwrap();
    assert_eq!((table.owner[10], table.owner[11], table.epoch[10], table.epoch[11]), (2, 2, 1, 1));
    let log = c.node(leader).view(|v| store::migrations(v)).unwrap();
    assert_eq!(log.active[0].phase, MigrationPhase::Committed as i32);
    assert_eq!(log.active[0].table_version, moved.version);
    // After the commit there is no way back; cleaned up, the move joins the history, and a late
    // record of it changes nothing.
    assert!(conflict(c.must_propose(&record(&[10, 11], 1, 2, MigrationPhase::Aborted)).await));
    assert!(conflict(c.must_propose(&record(&[10, 11], 1, 2, MigrationPhase::CatchUp)).await));
    assert!(conflict(c.must_propose(&record(&[10, 11], 1, 2, MigrationPhase::Aborting)).await));
    assert!(c.must_propose(&record(&[10, 11], 1, 2, MigrationPhase::CleanedUp)).await.is_ok());
    let log = c.node(leader).view(|v| store::migrations(v)).unwrap();
    assert!(log.active.is_empty());
    assert_eq!(log.finished.len(), 1);
    assert_eq!(
        c.must_propose(&record(&[10, 11], 1, 2, MigrationPhase::CleanedUp)).await.map(|r| r.changed),
        Ok(false)
    );
    // A stale coordinator's other record of the finished move is refused, and so is its commit.
    assert!(conflict(c.must_propose(&record(&[10, 11], 1, 2, MigrationPhase::CatchUp)).await));
    assert!(conflict(c.must_propose(&record(&[10, 11], 1, 2, MigrationPhase::Aborting)).await));
    // A cell leaves only when it owns nothing and no move involves it; the last cell that takes
    // buckets cannot drain.
    let remove = |id: u64| ControlCommand::new(control_command::Kind::RemoveCell(id));
    assert!(matches!(c.must_propose(&remove(2)).await, Err(CellBusy(_))));
    let drain = |id: u64| {
        ControlCommand::new(control_command::Kind::SetCellState(SetCellState {
            cell_id: id,
            state: CellState::Draining as i32,
        }))
    };
    assert!(c.must_propose(&drain(1)).await.is_ok());
    assert!(matches!(c.must_propose(&drain(2)).await, Err(CellBusy(_))));
    assert!(c.must_propose(&record(&[12], 1, 2, MigrationPhase::Planned)).await.is_ok());
    let mut all: Vec<u32> =
        (0..u32::from(nid_proto::bucket::BUCKETS)).filter(|&b| b != 10 && b != 11).collect();
    assert!(matches!(c.must_propose(&remove(1)).await, Err(CellBusy(_))), "a move involves it");
    // Giving up is decided in the log first: once ABORTING is recorded the commit cannot apply,
    // and the move only goes on to ABORTED.
    assert!(c.must_propose(&record(&[12], 1, 2, MigrationPhase::CatchUp)).await.is_ok());
    assert!(conflict(c.must_propose(&record(&[12], 1, 2, MigrationPhase::Aborted)).await), "ABORTING first");
    assert!(c.must_propose(&record(&[12], 1, 2, MigrationPhase::Aborting)).await.is_ok());
    assert!(conflict(c.must_propose(&commit(&[12], &[0])).await), "no commit after ABORTING");
    assert!(conflict(c.must_propose(&record(&[12], 1, 2, MigrationPhase::CatchUp)).await));
    assert!(c.must_propose(&record(&[12], 1, 2, MigrationPhase::Aborting)).await.is_ok(), "idempotent");
    assert!(c.must_propose(&record(&[12], 1, 2, MigrationPhase::Aborted)).await.is_ok());
    // After the abort, a stale coordinator's commit of the batch finds no move and is refused.
    assert!(conflict(c.must_propose(&commit(&[12], &[0])).await), "no commit without its move");
    all.sort_unstable();
    let epochs = vec![0; all.len()];
    assert!(c.must_propose(&record(&all, 1, 2, MigrationPhase::Planned)).await.is_ok());
    assert!(c.must_propose(&record(&all, 1, 2, MigrationPhase::CatchUp)).await.is_ok());
    assert!(c.must_propose(&commit(&all, &epochs)).await.is_ok());
    assert!(c.must_propose(&record(&all, 1, 2, MigrationPhase::CleanedUp)).await.is_ok());
    assert!(c.must_propose(&remove(1)).await.is_ok());
    let table = c.node(leader).view(|v| store::table(v)).unwrap().unwrap();
    assert_eq!(table.cells.iter().map(|x| x.cell_id).collect::<Vec<_>>(), vec![2]);
}
