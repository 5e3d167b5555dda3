//! An in-process cell (real RocksDB, real Raft loops, filtered in-memory network): election,
//! replication, group commit, partitions, restarts, snapshots, membership and the ownership fence.

use nid_cell::command::{BucketState, Command, CommandResult, Rejection};
use nid_cell::peer::{PeerError, PeerMsg};
use nid_cell::testkit::{Cluster, DropTypes, WAIT, sample_request};
use prost::Message as _;
use raft::prelude::{ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, MessageType};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn conf_change(steps: &[(ConfChangeType, u64)]) -> ConfChangeV2 {
    let mut cc = ConfChangeV2::default();
    let changes: Vec<ConfChangeSingle> = steps
        .iter()
        .map(|(t, id)| {
            let mut s = ConfChangeSingle::default();
            s.set_change_type(*t);
            s.node_id = *id;
            s
        })
        .collect();
    cc.set_changes(changes.into());
    if steps.len() > 1 {
        cc.set_transition(ConfChangeTransition::Auto);
    }
    cc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_elect_a_leader_and_replicate_writes() {
    let mut c = Cluster::new(3);
    c.start();
    let leader = tokio::task::block_in_place(|| c.must_leader());
    assert!((1..=3).contains(&leader));
    c.must_own_all_buckets().await;
    let mut enrolled = Vec::new();
    for i in 0..30 {
        let rid = format!("RID-{i}");
        let uin = c.must_enroll(&rid).await;
        enrolled.push((rid, uin));
    }
    for id in 1..=3 {
        for (rid, uin) in &enrolled {
            tokio::task::block_in_place(|| c.must_have_identity(id, rid, uin));
        }
    }
    // Every replica applied the same log, so every bucket's bytes are identical everywhere.
    let bucket = nid_cell::enroll::bucket_of_rid("RID-0");
    let digests: Vec<_> = (1..=3).map(|id| c.fsm(id).bucket_digest(bucket).unwrap()).collect();
    assert!(digests.iter().all(|d| *d == digests[0]), "replicas diverged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrolment_is_idempotent_by_rid_and_conflicts_on_a_different_payload() {
    let mut c = Cluster::new(3);
    c.start();
    c.must_own_all_buckets().await;
    let first = c.must_enroll("RID-SAME").await;
    match c.must_propose(c.enroll_command("RID-SAME")).await {
        CommandResult::Enrolled { uin, created, .. } => {
            assert_eq!(uin, first, "one RID never yields two UINs");
            assert!(!created);
        }
        other => panic!("{other:?}"),
    }
    let mut different = sample_request("RID-SAME");
    different.demographics.as_mut().unwrap().full_name = "Someone Else".into();
    assert_eq!(
        c.must_propose(c.enroll_command_for(&different)).await,
        CommandResult::Rejected(Rejection::RidConflict)
    );
    // Two enrolments of one new RID in the same entry batch: the second sees the first.
    let leader = tokio::task::block_in_place(|| c.must_leader());
    let h = c.handle(leader);
    let (a, b) = tokio::join!(
        h.propose(c.enroll_command("RID-TWICE"), Duration::from_secs(5)),
        h.propose(c.enroll_command("RID-TWICE"), Duration::from_secs(5))
    );
    let uin = |r: Result<CommandResult, PeerError>| match r {
        Ok(CommandResult::Enrolled { uin, .. }) => uin,
        other => panic!("{other:?}"),
    };
    assert_eq!(uin(a), uin(b));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_entries_and_fsyncs() {
    let mut c = Cluster::new(3);
    c.start();
    c.must_own_all_buckets().await;
    let leader = tokio::task::block_in_place(|| c.must_leader());
    let h = c.handle(leader);
    let m = c.metrics(leader);
    let (entries_before, commands_before) =
        (m.batch_commands.get_sample_count(), m.batch_commands.get_sample_sum());
    // 400 clients' commands arrive while the loop is busy: they must share entries (and fsyncs).
    let commands: Vec<_> = (0..400).map(|i| c.enroll_command(&format!("RID-BATCH-{i}"))).collect();
    let mut replies = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    for command in commands {
        let (reply, rx) = tokio::sync::oneshot::channel();
        h.send(PeerMsg::Propose { command, reply, deadline }).unwrap();
        replies.push(rx);
    }
    for rx in replies {
        assert!(matches!(rx.await.unwrap(), Ok(CommandResult::Enrolled { created: true, .. })));
    }
    let entries = m.batch_commands.get_sample_count() - entries_before;
    let commands = m.batch_commands.get_sample_sum() - commands_before;
    assert_eq!(commands, 400.0);
    assert!(entries * 4 <= 400, "group commit: 400 commands took {entries} entries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_steps_down_and_the_majority_keeps_serving() {
    let mut c = Cluster::new(3);
    c.start();
    c.must_own_all_buckets().await;
    let old = tokio::task::block_in_place(|| c.must_leader());
    let before = c.must_enroll("RID-BEFORE").await;
    c.isolate(old);
    let rest: Vec<u64> = (1..=3).filter(|&id| id != old).collect();
    let new = tokio::task::block_in_place(|| c.must_leader_among(&rest));
    assert_ne!(new, old);
    // check_quorum: the isolated leader notices it lost its quorum and steps down.
    let deadline = Instant::now() + WAIT;
    while c.status(old).role == "Leader" {
        assert!(Instant::now() < deadline, "isolated leader never stepped down");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The isolated replica refuses writes instead of accepting what it cannot commit.
    let r = c.handle(old).propose(c.enroll_command("RID-ISOLATED"), Duration::from_millis(500)).await;
    assert!(matches!(r, Err(PeerError::NotLeader { .. } | PeerError::Timeout)), "{r:?}");
    let during = {
        let r = c.handle(new).propose(c.enroll_command("RID-DURING"), Duration::from_secs(5)).await;
        match r {
            Ok(CommandResult::Enrolled { uin, .. }) => uin,
            other => panic!("{other:?}"),
        }
    };
    c.heal();
    for id in 1..=3 {
        tokio::task::block_in_place(|| {
            c.must_have_identity(id, "RID-BEFORE", &before);
            c.must_have_identity(id, "RID-DURING", &during);
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_replica_catches_up_by_snapshot_after_compaction() {
    let mut c = Cluster::new(3);
    c.config.log_gc_threshold = 20;
    c.config.log_gc_keep = 5;
    c.start();
    c.must_own_all_buckets().await;
    tokio::task::block_in_place(|| c.must_leader());
    let lagging = c.running_ids().into_iter().find(|&id| id != c.must_leader()).unwrap();
    let early = c.must_enroll("RID-EARLY").await;
    c.stop_node(lagging);
    let mut late = Vec::new();
    for i in 0..60 {
        let rid = format!("RID-LATE-{i}");
        late.push((rid.clone(), c.must_enroll(&rid).await));
    }
    let leader = tokio::task::block_in_place(|| c.must_leader());
    let status = c.status(leader);
    assert!(status.first_index > 20, "leader compacted its log: {status:?}");
    c.run_node(lagging);
    tokio::task::block_in_place(|| {
        c.must_applied(lagging, status.applied);
        c.must_have_identity(lagging, "RID-EARLY", &early);
        for (rid, uin) in &late {
            c.must_have_identity(lagging, rid, uin);
        }
    });
    let installed = c.metrics(lagging).snapshots.with_label_values(&["applied"]).get();
    assert!(installed >= 1, "the lagging replica caught up by snapshot");
    // And it survives another restart on its installed state.
    c.stop_node(lagging);
    c.run_node(lagging);
    tokio::task::block_in_place(|| c.must_have_identity(lagging, "RID-EARLY", &early));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_replica_is_replaced_by_a_new_member_through_joint_consensus() {
    let mut c = Cluster::new(3);
    c.start();
    c.must_own_all_buckets().await;
    let uin = c.must_enroll("RID-KEEP").await;
    let leader = tokio::task::block_in_place(|| c.must_leader());
    let victim = (1..=3).find(|&id| id != leader).unwrap();
    c.stop_node(victim);
    c.wipe_node(victim);
    // The replacement starts empty and joins as a learner, catching up by snapshot.
    c.run_node(4);
    let h = c.handle(leader);
    let cs = h
        .change_membership(conf_change(&[(ConfChangeType::AddLearnerNode, 4)]), Duration::from_secs(5))
        .await
        .unwrap();
    assert!(cs.learners.contains(&4));
    tokio::task::block_in_place(|| c.must_have_identity(4, "RID-KEEP", &uin));
    // Promote 4 and remove the dead replica in one joint change.
    let cs = h
        .change_membership(
            conf_change(&[(ConfChangeType::AddNode, 4), (ConfChangeType::RemoveNode, victim)]),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert!(cs.voters.contains(&4) && !cs.voters.contains(&victim), "{cs:?}");
    // Leaving the joint state is automatic: wait until the outgoing config is gone everywhere.
    let deadline = Instant::now() + WAIT;
    loop {
        let s = c.status(leader);
        if s.voters.contains(&4) && !s.voters.contains(&victim) && c.status(4).voters == s.voters {
            break;
        }
        assert!(Instant::now() < deadline, "membership never settled: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = c.must_enroll("RID-AFTER-REPLACE").await;
    tokio::task::block_in_place(|| c.must_have_identity(4, "RID-AFTER-REPLACE", &after));
    // A second pending change is refused rather than silently dropped.
    let a = h.change_membership(conf_change(&[(ConfChangeType::AddLearnerNode, 7)]), Duration::from_secs(5));
    let b = h.change_membership(conf_change(&[(ConfChangeType::AddLearnerNode, 8)]), Duration::from_secs(5));
    let (a, b) = tokio::join!(a, b);
    assert!(a.is_ok(), "{a:?}");
    assert!(b.is_ok() || matches!(b, Err(PeerError::Invalid(_))), "never silently dropped: {b:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_for_buckets_not_owned_are_fenced_and_ownership_survives_restart() {
    let mut c = Cluster::new(3);
    c.start();
    tokio::task::block_in_place(|| c.must_leader());
    let cmd = c.enroll_command("RID-FENCED");
    let Command::Enroll(e) = &cmd else { unreachable!() };
    let bucket = e.bucket;
    assert_eq!(
        c.must_propose(cmd.clone()).await,
        CommandResult::Rejected(Rejection::WrongOwner { bucket, table_version: 0 })
    );
    let own = |state, v| Command::SetBuckets { buckets: vec![bucket], state, table_version: v };
    assert_eq!(c.must_propose(own(BucketState::Owned, 3)).await, CommandResult::BucketsSet);
    assert!(matches!(c.must_propose(cmd.clone()).await, CommandResult::Enrolled { created: true, .. }));
    assert_eq!(c.must_propose(own(BucketState::Frozen, 4)).await, CommandResult::BucketsSet);
    assert_eq!(
        c.must_propose(c.enroll_command("RID-FENCED")).await,
        CommandResult::Rejected(Rejection::RetryLater { bucket })
    );
    assert_eq!(c.must_propose(own(BucketState::NotOwned, 5)).await, CommandResult::BucketsSet);
    // A stale routing-table version cannot roll ownership back.
    assert_eq!(
        c.must_propose(own(BucketState::Owned, 4)).await,
        CommandResult::Rejected(Rejection::StaleTableVersion { current: 5 })
    );
    for id in 1..=3 {
        c.stop_node(id);
    }
    for id in 1..=3 {
        c.run_node(id);
    }
    assert_eq!(
        c.must_propose(c.enroll_command("RID-FENCED")).await,
        CommandResult::Rejected(Rejection::WrongOwner { bucket, table_version: 5 })
    );
    for id in 1..=3 {
        assert_eq!(c.fsm(id).bucket_record(bucket).unwrap().state, BucketState::NotOwned);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_linearizable_and_time_out_instead_of_hanging() {
    let mut c = Cluster::new(3);
    c.start();
    c.must_own_all_buckets().await;
    let leader = tokio::task::block_in_place(|| c.must_leader());
    let uin = c.must_enroll("RID-READ").await;
    c.handle(leader).read_barrier(Duration::from_secs(5)).await.unwrap();
    let bucket = nid_cell::enroll::bucket_of_rid("RID-READ");
    assert!(c.fsm(leader).get_identity(bucket, &uin).unwrap().is_some());
    // A follower sends reads to the leader instead of serving possibly stale state.
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let r = c.handle(follower).read_barrier(Duration::from_secs(1)).await;
    assert_eq!(r, Err(PeerError::NotLeader { leader: Some(leader) }));
    // With heartbeats (and so ReadIndex confirmations) dropped, reads fail within their deadline.
    c.add_filter(Arc::new(DropTypes(vec![MessageType::MsgHeartbeat, MessageType::MsgHeartbeatResponse])));
    let started = Instant::now();
    let r = c.handle(leader).read_barrier(Duration::from_millis(400)).await;
    assert!(r.is_err(), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    c.heal();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_restart_recovers_without_reapplying() {
    let mut c = Cluster::new(3);
    c.start();
    c.must_own_all_buckets().await;
    let mut enrolled = Vec::new();
    for i in 0..10 {
        let rid = format!("RID-R-{i}");
        enrolled.push((rid.clone(), c.must_enroll(&rid).await));
    }
    let applied: Vec<u64> = (1..=3).map(|id| c.status(id).applied).collect();
    for id in 1..=3 {
        c.stop_node(id);
    }
    for id in 1..=3 {
        c.run_node(id);
        assert!(c.status(id).applied >= applied[(id - 1) as usize], "applied index survives restart");
    }
    // Re-enrolling returns the same UINs: nothing was applied twice or lost.
    for (rid, uin) in &enrolled {
        match c.must_propose(c.enroll_command(rid)).await {
            CommandResult::Enrolled { uin: again, created, .. } => {
                assert_eq!(&again, uin);
                assert!(!created);
            }
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_transport_refuses_malformed_or_misaddressed_raft_bytes() {
    use nid_cell::metrics::CellMetrics;
    use nid_cell::transport::{AddressBook, Member, RaftTransportService};
    use nid_proto::v1::RaftMessageBatch;
    use protobuf::Message as _;

    let mut c = Cluster::new(1);
    c.start();
    let member = |id| Member { id, address: format!("127.0.0.1:{}", 1000 + id), zone: format!("z{id}") };
    let service = RaftTransportService {
        cell_id: 1,
        node_id: 1,
        book: Arc::new(AddressBook::new([member(1), member(2)])),
        peer: c.handle(1),
        metrics: Arc::new(CellMetrics::new()),
        snap_root: std::env::temp_dir().join("nid-unused-snap-root"),
    };
    let mut m = raft::prelude::Message { from: 2, to: 1, ..Default::default() };
    m.set_msg_type(MessageType::MsgHeartbeat);
    let good = m.write_to_bytes().unwrap();
    let batch = |cell_id, from_node, to_node, messages: Vec<Vec<u8>>| RaftMessageBatch {
        cell_id,
        from_node,
        to_node,
        messages,
    };
    assert_eq!(service.accept(&batch(1, 2, 1, vec![good.clone()])).unwrap().len(), 1);
    assert_eq!(service.accept(&batch(9, 2, 1, vec![good.clone()])).unwrap_err(), "wrong_cell");
    assert_eq!(service.accept(&batch(1, 2, 3, vec![good.clone()])).unwrap_err(), "wrong_node");
    assert_eq!(service.accept(&batch(1, 5, 1, vec![good.clone()])).unwrap_err(), "unknown_peer");
    assert_eq!(service.accept(&batch(1, 1, 1, vec![good.clone()])).unwrap_err(), "mismatched_from_to");
    for garbage in
        [vec![0xff; 7], vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f], b"not a raft message at all".to_vec()]
    {
        assert_eq!(service.accept(&batch(1, 2, 1, vec![good.clone(), garbage])).unwrap_err(), "malformed");
    }
    // Random bytes never panic the parser or the checks.
    let mut state = 0x1234_5678_u64;
    for _ in 0..2000 {
        let len = (state % 64) as usize;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (state >> 56) as u8
            })
            .collect();
        let _ = service.accept(&batch(1, 2, 1, vec![bytes]));
    }
    // The replica is still alive and leading.
    assert_eq!(tokio::task::block_in_place(|| c.must_leader()), 1);
    assert_eq!(c.status(1).role, "Leader");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_is_compacted_by_size_as_well_as_by_count() {
    let mut c = Cluster::new(3);
    c.config.log_gc_threshold = 1_000_000;
    c.config.log_gc_size = 16 << 10;
    c.config.log_gc_keep = 8;
    c.start();
    c.must_own_all_buckets().await;
    for i in 0..60 {
        c.must_enroll(&format!("RID-SIZE-{i}")).await;
    }
    let leader = tokio::task::block_in_place(|| c.must_leader());
    let status = c.status(leader);
    assert!(status.first_index > 20, "size-based compaction ran: {status:?}");
    assert!(c.metrics(leader).log_compacted.get() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_uin_never_names_two_people() {
    use nid_cell::codec;
    use nid_cell::command::EnrollSecret;
    use nid_cell::crypto::Keyring;

    let mut c = Cluster::new(3);
    c.start();
    c.must_own_all_buckets().await;
    let first = c.must_enroll("RID-FIRST").await;
    // A second person whose leader-chosen candidates collide with the first UIN (forced here).
    let keyring = Keyring::dev();
    let retarget = |rid: &str, candidates: Vec<String>| {
        let Command::Enroll(mut cmd) = c.enroll_command(rid) else { unreachable!() };
        let mut secret: EnrollSecret =
            codec::decode(&keyring.open(&cmd.rid_hash, &cmd.sealed).unwrap()).unwrap();
        secret.candidates = candidates;
        cmd.sealed =
            keyring.seal(&cmd.rid_hash, nid_cell::crypto::random_nonce().unwrap(), &codec::encode(&secret));
        Command::Enroll(cmd)
    };
    // Same bucket is needed for a real collision: the first UIN lives in RID-FIRST's bucket.
    let same_bucket_rid = (0..)
        .map(|i| format!("RID-SAME-BUCKET-{i}"))
        .find(|r| nid_cell::enroll::bucket_of_rid(r) == nid_cell::enroll::bucket_of_rid("RID-FIRST"))
        .unwrap();
    assert_eq!(
        c.must_propose(retarget(&same_bucket_rid, vec![first.clone()])).await,
        CommandResult::Rejected(Rejection::CandidatesTaken)
    );
    // With a free candidate behind the taken one, the free one is used.
    let Command::Enroll(fresh) = c.enroll_command(&same_bucket_rid) else { unreachable!() };
    let secret: EnrollSecret = codec::decode(&keyring.open(&fresh.rid_hash, &fresh.sealed).unwrap()).unwrap();
    let free = secret.candidates[0].clone();
    match c.must_propose(retarget(&same_bucket_rid, vec![first.clone(), free.clone()])).await {
        CommandResult::Enrolled { uin, created: true, .. } => assert_eq!(uin, free),
        other => panic!("{other:?}"),
    }
    // The first person's record is untouched.
    let record =
        c.fsm(1).get_identity(nid_cell::enroll::bucket_of_rid("RID-FIRST"), &first).unwrap().unwrap();
    assert_eq!(record.uin, first);
    let request = nid_proto::v1::EnrollRequest::decode(record.request.as_slice()).unwrap();
    assert_eq!(request.rid, "RID-FIRST");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_are_bounded_in_bytes_as_well_as_in_commands() {
    let mut c = Cluster::new(3);
    c.config.max_entry_bytes = 4096;
    c.start();
    c.must_own_all_buckets().await;
    let leader = tokio::task::block_in_place(|| c.must_leader());
    let h = c.handle(leader);
    let m = c.metrics(leader);
    let entries_before = m.batch_commands.get_sample_count();
    let commands: Vec<_> = (0..200).map(|i| c.enroll_command(&format!("RID-BYTES-{i}"))).collect();
    let total: usize = commands.iter().map(|cmd| cmd.approx_len()).sum();
    let mut replies = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    for command in commands {
        let (reply, rx) = tokio::sync::oneshot::channel();
        h.send(PeerMsg::Propose { command, reply, deadline }).unwrap();
        replies.push(rx);
    }
    for rx in replies {
        assert!(matches!(rx.await.unwrap(), Ok(CommandResult::Enrolled { created: true, .. })));
    }
    let entries = m.batch_commands.get_sample_count() - entries_before;
    assert!(entries as usize >= total / 4096, "{total} bytes of commands fit in {entries} entries of 4 KiB");
}
