//! The replication engine in an in-process cell of real replicas (real Raft loops, real RocksDB)
//! replicating the toy key-value machine: election, replication, group commit, partitions,
//! restarts, snapshots, membership, the ownership fence, reads, compaction, the transport's checks,
//! and what happens when a replica cannot go on.

use nid_engine::mailbox::{Client, Payload, ReplyTo};
use nid_engine::transport_service::RaftTransportService;
use nid_engine::{BucketState, EngineError, KvRead as _, Member, bucket_data};
use nid_proto::bucket::BucketId;
use nid_testkit::toy::{Toy, ToyCommand, toy_key};
use nid_testkit::{Cluster, DropTypes, WAIT};
use raft::prelude::{ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, MessageType};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn cell(n: u64) -> Cluster<Toy> {
    Cluster::new(n, |_| Toy::default())
}

fn conf_change(steps: &[(ConfChangeType, u64)], added: &[Member]) -> ConfChangeV2 {
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
    cc.context = nid_engine::peer::change_context(added).into();
    cc
}

fn member(id: u64) -> Member {
    Member { id, address: format!("in-process:{id}"), zone: format!("zone-{id}") }
}

fn value(c: &Cluster<Toy>, id: u64, bucket: u32, key: &str) -> Option<Vec<u8>> {
    c.node(id).view(|v| v.get(&toy_key(bucket, key.as_bytes()))).unwrap()
}

fn must_value(c: &Cluster<Toy>, id: u64, bucket: u32, key: &str, expect: &str) {
    let deadline = Instant::now() + WAIT;
    while value(c, id, bucket, key).as_deref() != Some(expect.as_bytes()) {
        assert!(Instant::now() < deadline, "node {id} never applied {key}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_elect_a_leader_and_replicate_writes() {
    let mut c = cell(3);
    c.start();
    let leader = tokio::task::block_in_place(|| c.must_leader());
    assert!((1..=3).contains(&leader));
    c.must_own_all_buckets().await;
    for i in 0..30 {
        let previous = c.must_propose(&ToyCommand::put(7, &format!("k{i}"), &format!("v{i}"))).await;
        assert_eq!(previous, None);
    }
    assert_eq!(c.must_propose(&ToyCommand::put(7, "k0", "again")).await, Some(b"v0".to_vec()));
    tokio::task::block_in_place(|| {
        for id in 1..=3 {
            must_value(&c, id, 7, "k29", "v29");
            must_value(&c, id, 7, "k0", "again");
        }
    });
    // Every replica applied the same log, so the bucket's bytes are identical everywhere.
    let bucket = BucketId::new(7).unwrap();
    let digests: Vec<_> =
        (1..=3).map(|id| c.node(id).view(|v| bucket_data::digest(v, bucket)).unwrap()).collect();
    assert_eq!(digests[0].0, 30);
    assert!(digests.iter().all(|d| *d == digests[0]), "replicas diverged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_entries_and_fsyncs() {
    let mut c = cell(3);
    c.start();
    c.must_own_all_buckets().await;
    let leader = tokio::task::block_in_place(|| c.must_leader());
    let node = c.node(leader);
    let m = node.metrics().clone();
    let (entries_before, commands_before) =
        (m.batch_commands.get_sample_count(), m.batch_commands.get_sample_sum());
    let proposals: Vec<_> = (0..400)
        .map(|i| {
            let node = node.clone();
            async move {
                node.propose(&ToyCommand::put(1, &format!("batch-{i}"), "x"), Duration::from_secs(10)).await
            }
        })
        .collect();
    let results = join_all(proposals).await;
    assert!(results.iter().all(|r| matches!(r, Ok(None))), "{:?}", results.iter().find(|r| r.is_err()));
    let entries = m.batch_commands.get_sample_count() - entries_before;
    let commands = m.batch_commands.get_sample_sum() - commands_before;
    assert_eq!(commands, 400.0);
    assert!(entries * 4 <= 400, "group commit: 400 commands took {entries} entries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_steps_down_and_the_majority_keeps_serving() {
    let mut c = cell(3);
    c.start();
    c.must_own_all_buckets().await;
    let old = tokio::task::block_in_place(|| c.must_leader());
    c.must_propose(&ToyCommand::put(2, "before", "1")).await;
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
    // The isolated replica refuses writes and reads instead of accepting what it cannot commit.
    let r = c.node(old).propose(&ToyCommand::put(2, "isolated", "1"), Duration::from_millis(500)).await;
    assert!(matches!(r, Err(EngineError::NotLeader { .. } | EngineError::Timeout)), "{r:?}");
    let r = c.node(old).read_barrier(Duration::from_millis(500)).await;
    assert!(r.is_err(), "no read from a deposed leader: {r:?}");
    c.node(new).propose(&ToyCommand::put(2, "during", "1"), Duration::from_secs(5)).await.unwrap();
    c.heal();
    tokio::task::block_in_place(|| {
        for id in 1..=3 {
            must_value(&c, id, 2, "before", "1");
            must_value(&c, id, 2, "during", "1");
        }
    });
    assert_eq!(value(&c, old, 2, "isolated"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_replica_catches_up_by_snapshot_after_compaction() {
    let mut c = cell(3);
    c.config.log_gc_threshold = 20;
    c.config.log_gc_keep = 5;
    c.start();
    c.must_own_all_buckets().await;
    let leader = tokio::task::block_in_place(|| c.must_leader());
    let lagging = (1..=3).find(|&id| id != leader).unwrap();
    c.must_propose(&ToyCommand::put(3, "early", "e")).await;
    c.stop_node(lagging);
    for i in 0..60 {
        c.must_propose(&ToyCommand::put(3, &format!("late-{i}"), "l")).await;
    }
    let leader = tokio::task::block_in_place(|| c.must_leader());
    let status = c.status(leader);
    assert!(status.first_index > 20, "leader compacted its log: {status:?}");
    c.run_node(lagging);
    tokio::task::block_in_place(|| {
        c.must_applied(lagging, status.applied);
        must_value(&c, lagging, 3, "early", "e");
        must_value(&c, lagging, 3, "late-59", "l");
    });
    let installed = c.node(lagging).metrics().snapshots.with_label_values(&["applied"]).get();
    assert!(installed >= 1, "the lagging replica caught up by snapshot");
    // Ownership travelled with the snapshot, and it survives another restart.
    assert_eq!(c.node(lagging).bucket(BucketId::new(3).unwrap()).state(), BucketState::Owned);
    c.stop_node(lagging);
    c.run_node(lagging);
    tokio::task::block_in_place(|| must_value(&c, lagging, 3, "early", "e"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_replica_is_replaced_through_joint_consensus_and_learns_every_address_from_its_snapshot() {
    let mut c = cell(3);
    c.start();
    c.must_own_all_buckets().await;
    c.must_propose(&ToyCommand::put(4, "keep", "k")).await;
    let leader = tokio::task::block_in_place(|| c.must_leader());
    let victim = (1..=3).find(|&id| id != leader).unwrap();
    // The members' addresses as a real cell records them (the flags of the initial members).
    let members: Vec<Member> = (1..=3).map(member).collect();
    let add_all = conf_change(&[(ConfChangeType::AddLearnerNode, 9)], &members);
    c.node(leader).change_membership(add_all, Duration::from_secs(5)).await.unwrap();
    let remove_9 = conf_change(&[(ConfChangeType::RemoveNode, 9)], &[]);
    c.node(leader).change_membership(remove_9, Duration::from_secs(5)).await.unwrap();
    c.stop_node(victim);
    c.wipe_node(victim);
    // The replacement starts empty and joins as a learner, catching up by snapshot.
    c.run_node(4);
    let h = c.node(leader);
    let cs = h
        .change_membership(
            conf_change(&[(ConfChangeType::AddLearnerNode, 4)], &[member(4)]),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert!(cs.learners.contains(&4));
    tokio::task::block_in_place(|| must_value(&c, 4, 4, "keep", "k"));
    // The snapshot carried the address book: the new member knows every peer, not only itself
    // (the book lands with the install's final batch, a moment after the data).
    let expected: Vec<u64> = (1..=3).filter(|&id| id != victim).chain([4]).collect();
    let deadline = Instant::now() + WAIT;
    loop {
        let known: Vec<u64> = c.node(4).book().members().iter().map(|m| m.id).collect();
        let by_snapshot = c.node(4).metrics().snapshots.with_label_values(&["applied"]).get() >= 1;
        if by_snapshot && expected.iter().all(|id| known.contains(id)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "peers unknown to the new replica: {known:?} (snapshot: {by_snapshot})"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Promote 4 and remove the dead replica in one joint change.
    let cs = h
        .change_membership(
            conf_change(&[(ConfChangeType::AddNode, 4), (ConfChangeType::RemoveNode, victim)], &[member(4)]),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert!(cs.voters.contains(&4) && !cs.voters.contains(&victim), "{cs:?}");
    let deadline = Instant::now() + WAIT;
    loop {
        let s = c.status(leader);
        if s.voters.contains(&4) && !s.voters.contains(&victim) && c.status(4).voters == s.voters {
            break;
        }
        assert!(Instant::now() < deadline, "membership never settled: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.must_propose(&ToyCommand::put(4, "after", "a")).await;
    tokio::task::block_in_place(|| must_value(&c, 4, 4, "after", "a"));
    // A second pending change is refused rather than silently dropped.
    let a = h.change_membership(
        conf_change(&[(ConfChangeType::AddLearnerNode, 7)], &[member(7)]),
        Duration::from_secs(5),
    );
    let b = h.change_membership(
        conf_change(&[(ConfChangeType::AddLearnerNode, 8)], &[member(8)]),
        Duration::from_secs(5),
    );
    let (a, b) = tokio::join!(a, b);
    assert!(a.is_ok(), "{a:?}");
    assert!(b.is_ok() || matches!(b, Err(EngineError::Invalid(_))), "never silently dropped: {b:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_replica_restarted_under_its_old_id_stops_and_says_why_instead_of_panicking() {
    let mut c = cell(3);
    c.start();
    c.must_own_all_buckets().await;
    for i in 0..20 {
        c.must_propose(&ToyCommand::put(4, &format!("k{i}"), "v")).await;
    }
    let leader = tokio::task::block_in_place(|| c.must_leader());
    let victim = (1..=3).find(|&id| id != leader).unwrap();
    tokio::task::block_in_place(|| must_value(&c, victim, 4, "k19", "v"));
    c.stop_node(victim);
    c.wipe_node(victim);
    // Restarted empty under the same id it bootstraps a fresh log; the leader's first heartbeat
    // carries a commit index beyond it (raft-rs would panic the Raft thread on it).
    c.run_node(victim);
    let node = c.node(victim);
    tokio::time::timeout(WAIT, node.stopped().cancelled()).await.expect("the wiped replica stops");
    let failure = node.failure().unwrap_or_default();
    assert!(failure.contains("data was lost") && failure.contains("new one"), "{failure}");
    let rejected = node.metrics().messages_rejected.with_label_values(&["log_lost"]).get();
    assert_eq!(rejected, 1, "counted once");
    // Restarted again it refuses to start at all: a leader elected later would heartbeat it with
    // commit 0 and never notice, and it has forgotten its votes.
    drop(node);
    c.stop_node(victim);
    let refused = c.try_run_node(victim).expect_err("a replica that lost its log never starts again");
    assert!(refused.contains("data was lost"), "{refused}");
    // The other two carry on.
    c.must_propose(&ToyCommand::put(4, "after", "a")).await;
    tokio::task::block_in_place(|| must_value(&c, leader, 4, "after", "a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_for_buckets_not_owned_are_fenced_and_ownership_survives_restart() {
    let mut c = cell(3);
    c.start();
    tokio::task::block_in_place(|| c.must_leader());
    let put = ToyCommand::put(11, "fenced", "x");
    let propose = |c: &Cluster<Toy>| {
        let leader = c.must_leader();
        let node = c.node(leader);
        let put = put.clone();
        async move { node.propose(&put, Duration::from_secs(3)).await }
    };
    let r = tokio::task::block_in_place(|| propose(&c)).await;
    assert_eq!(r, Err(EngineError::WrongOwner { bucket: 11, table_version: 0 }));
    c.must_set_buckets(vec![11], BucketState::Owned, 3).await;
    assert_eq!(tokio::task::block_in_place(|| propose(&c)).await, Ok(None));
    c.must_set_buckets(vec![11], BucketState::Frozen, 4).await;
    assert_eq!(
        tokio::task::block_in_place(|| propose(&c)).await,
        Err(EngineError::RetryLater { bucket: 11 })
    );
    c.must_set_buckets(vec![11], BucketState::NotOwned, 5).await;
    // A stale routing-table version cannot roll ownership back.
    let leader = tokio::task::block_in_place(|| c.must_leader());
    let stale = c.node(leader).set_buckets(vec![11], BucketState::Owned, 4, Duration::from_secs(3)).await;
    assert_eq!(stale, Err(EngineError::StaleTableVersion { current: 5 }));
    let out_of_range = ToyCommand::put(16384, "x", "y");
    let r = c.node(leader).propose(&out_of_range, Duration::from_secs(3)).await;
    assert!(matches!(r, Err(EngineError::Malformed(_))), "{r:?}");
    for id in 1..=3 {
        c.stop_node(id);
    }
    for id in 1..=3 {
        c.run_node(id);
    }
    let r = tokio::task::block_in_place(|| propose(&c)).await;
    assert_eq!(r, Err(EngineError::WrongOwner { bucket: 11, table_version: 5 }));
    for id in 1..=3 {
        assert_eq!(c.node(id).bucket(BucketId::new(11).unwrap()).state(), BucketState::NotOwned);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_linearizable_and_time_out_instead_of_hanging() {
    let mut c = cell(3);
    c.start();
    c.must_own_all_buckets().await;
    let leader = tokio::task::block_in_place(|| c.must_leader());
    c.must_propose(&ToyCommand::put(5, "read", "r")).await;
    c.node(leader).read_barrier(Duration::from_secs(5)).await.unwrap();
    assert_eq!(value(&c, leader, 5, "read").as_deref(), Some(b"r".as_slice()));
    // A follower sends reads to the leader instead of serving possibly stale state.
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let r = c.node(follower).read_barrier(Duration::from_secs(1)).await;
    assert_eq!(r, Err(EngineError::NotLeader { leader: Some(leader) }));
    // With heartbeats (and so ReadIndex confirmations) dropped, reads fail within their deadline.
    c.add_filter(Arc::new(DropTypes(vec![MessageType::MsgHeartbeat, MessageType::MsgHeartbeatResponse])));
    let started = Instant::now();
    let r = c.node(leader).read_barrier(Duration::from_millis(400)).await;
    assert!(r.is_err(), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    c.heal();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_restart_recovers_without_reapplying() {
    let mut c = cell(3);
    c.start();
    c.must_own_all_buckets().await;
    for i in 0..10 {
        c.must_propose(&ToyCommand::put(6, &format!("r{i}"), "1")).await;
    }
    let applied: Vec<u64> = (1..=3).map(|id| c.status(id).applied).collect();
    for id in 1..=3 {
        c.stop_node(id);
    }
    for id in 1..=3 {
        c.run_node(id);
        assert!(c.status(id).applied >= applied[(id - 1) as usize], "applied index survives restart");
    }
    // Each put sees its own earlier value once: nothing was applied twice or lost.
    for i in 0..10 {
        assert_eq!(c.must_propose(&ToyCommand::put(6, &format!("r{i}"), "2")).await, Some(b"1".to_vec()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_transport_refuses_malformed_or_misaddressed_raft_bytes() {
    use nid_proto::v1::RaftMessageBatch;
    use protobuf::Message as _;

    let mut c = cell(1);
    c.start();
    let node = c.node(1);
    let service = RaftTransportService {
        cell_id: 1,
        node_id: 1,
        book: Arc::new(nid_engine::address_book::AddressBook::new([member(1), member(2)])),
        inbox: node.inbox().clone(),
        metrics: node.metrics().clone(),
        snap_root: std::env::temp_dir().join("nid-unused-snap-root"),
        sender_of: None,
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
    // A batch claiming another sender than its connection's certificate is refused.
    assert_eq!(service.accept_from(Some(2), &batch(1, 2, 1, vec![good.clone()])).unwrap().len(), 1);
    assert_eq!(
        service.accept_from(Some(3), &batch(1, 2, 1, vec![good.clone()])).unwrap_err(),
        "sender_mismatch"
    );
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
    assert_eq!(tokio::task::block_in_place(|| c.must_leader()), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_raft_batches_are_refused_by_the_server() {
    use nid_proto::v1::RaftMessageBatch;
    use nid_proto::v1::raft_transport_client::RaftTransportClient;
    use nid_proto::v1::raft_transport_server::RaftTransportServer;

    let mut c = cell(1);
    c.start();
    let node = c.node(1);
    let service = RaftTransportService {
        cell_id: 1,
        node_id: 1,
        book: node.book().clone(),
        inbox: node.inbox().clone(),
        metrics: node.metrics().clone(),
        snap_root: std::env::temp_dir().join("nid-unused-snap-root"),
        sender_of: None,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                RaftTransportServer::new(service)
                    .max_decoding_message_size(nid_engine::transport::MAX_MESSAGE_BYTES),
            )
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let mut client = RaftTransportClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
        .max_encoding_message_size(64 << 20);
    let huge = RaftMessageBatch { cell_id: 1, from_node: 2, to_node: 1, messages: vec![vec![0u8; 20 << 20]] };
    let r = client.send_messages(tokio_stream::iter(vec![huge])).await;
    let err = r.expect_err("a 20 MiB batch is over the limit");
    assert!(
        matches!(
            err.code(),
            tonic::Code::ResourceExhausted | tonic::Code::OutOfRange | tonic::Code::Internal
        ),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_is_compacted_by_size_as_well_as_by_count() {
    let mut c = cell(3);
    c.config.log_gc_threshold = 1_000_000;
    c.config.log_gc_size = 16 << 10;
    c.config.log_gc_keep = 8;
    c.start();
    c.must_own_all_buckets().await;
    let big = "x".repeat(512);
    for i in 0..60 {
        c.must_propose(&ToyCommand::put(8, &format!("size-{i}"), &big)).await;
    }
    let leader = tokio::task::block_in_place(|| c.must_leader());
    let status = c.status(leader);
    assert!(status.first_index > 20, "size-based compaction ran: {status:?}");
    assert!(c.node(leader).metrics().log_compacted.get() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_soft_size_the_leader_keeps_only_entries_a_peer_still_lacks() {
    let mut c = cell(3);
    // The hard limits out of reach: only the soft size compacts.
    c.config.log_gc_threshold = 1_000_000;
    c.config.log_gc_size = 64 << 20;
    c.config.log_gc_soft_size = 8 << 10;
    c.start();
    c.must_own_all_buckets().await;
    let big = "x".repeat(512);
    for i in 0..60 {
        c.must_propose(&ToyCommand::put(8, &format!("soft-{i}"), &big)).await;
    }
    // Every peer holds the early entries, so they go. (A leader elected meanwhile compacts from
    // its next turns: a few more entries give it those.)
    let deadline = Instant::now() + WAIT;
    let leader = loop {
        let leader = tokio::task::block_in_place(|| c.must_leader());
        let status = c.status(leader);
        if status.first_index > 40 {
            break leader;
        }
        assert!(Instant::now() < deadline, "the early entries stayed: {status:?}");
        c.must_propose(&ToyCommand::put(8, "soft-more", &big)).await;
    };
    // A follower that stops answering holds the leader's log back to what it lacks.
    let down = (1..=3).find(|&id| id != leader).unwrap();
    c.stop_node(down);
    let held = c.status(leader).matched.iter().find(|(id, _)| *id == down).map(|(_, m)| *m).unwrap();
    for i in 0..60 {
        c.must_propose(&ToyCommand::put(8, &format!("later-{i}"), &big)).await;
    }
    let status = c.status(leader);
    assert!(status.first_index <= held + 1, "entries after {held} kept for the stopped follower: {status:?}");
    // So it catches up from the log, without a snapshot.
    c.run_node(down);
    tokio::task::block_in_place(|| {
        c.must_applied(down, status.applied);
        must_value(&c, down, 8, "later-59", &big);
    });
    assert_eq!(c.node(down).metrics().snapshots.with_label_values(&["applied"]).get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_are_bounded_in_bytes_as_well_as_in_commands() {
    let mut c = cell(3);
    c.config.max_entry_bytes = 4096;
    c.start();
    c.must_own_all_buckets().await;
    let leader = tokio::task::block_in_place(|| c.must_leader());
    let node = c.node(leader);
    let m = node.metrics().clone();
    let entries_before = m.batch_commands.get_sample_count();
    let payload = "p".repeat(200);
    let proposals: Vec<_> = (0..200)
        .map(|i| {
            let node = node.clone();
            let cmd = ToyCommand::put(9, &format!("bytes-{i}"), &payload);
            async move { node.propose(&cmd, Duration::from_secs(10)).await }
        })
        .collect();
    let results = join_all(proposals).await;
    assert!(results.iter().all(|r| matches!(r, Ok(None))));
    let entries = m.batch_commands.get_sample_count() - entries_before;
    assert!(entries as usize >= 200 * 210 / 4096, "40 KiB of commands fit in {entries} entries of 4 KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_cannot_apply_stops_and_says_why_instead_of_limping_on() {
    let mut c = cell(3);
    c.start();
    c.must_own_all_buckets().await;
    let leader = tokio::task::block_in_place(|| c.must_leader());
    let node = c.node(leader);
    let stopped = node.stopped();
    assert!(!stopped.is_cancelled());
    let halt = ToyCommand { bucket: 1, key: b"h".to_vec(), value: None, halt: true };
    // Every replica applies the committed command and every one halts: none skips it.
    let r = node.propose(&halt, Duration::from_secs(3)).await;
    assert!(matches!(r, Err(EngineError::Stopped | EngineError::Timeout)), "{r:?}");
    tokio::time::timeout(WAIT, stopped.cancelled()).await.expect("the loop stopped");
    assert!(node.failure().unwrap_or_default().contains("halt"), "{:?}", node.failure());
    assert_eq!(node.metrics().running.get(), 0);
    for id in 1..=3 {
        tokio::time::timeout(WAIT, c.node(id).stopped().cancelled()).await.expect("every replica stopped");
    }
    // A stopped replica refuses work at once.
    let r = node.propose(&ToyCommand::put(1, "k", "v"), Duration::from_secs(1)).await;
    assert_eq!(r, Err(EngineError::Stopped), "after the stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_flood_sheds_proposals_but_never_costs_the_leader_its_leadership() {
    let mut c = cell(3);
    c.config.client_queue = 64;
    c.config.client_per_turn = 16;
    c.start();
    c.must_own_all_buckets().await;
    let leader = tokio::task::block_in_place(|| c.must_leader());
    let node = c.node(leader);
    let term = c.status(leader).term;
    let changes_before = node.metrics().leader_changes.get();
    let (mut busy, mut ok) = (0u64, 0u64);
    let until = Instant::now() + Duration::from_secs(3);
    let mut waiting = Vec::new();
    while Instant::now() < until {
        // Far more proposals than the loop can take: the queue fills and refuses at once.
        for i in 0..200 {
            let (reply, rx) = tokio::sync::oneshot::channel();
            let payload =
                Payload::Machine(nid_proto::codec::encode(&ToyCommand::put(1, &format!("f{i}"), "v")));
            match node_submit(
                &node,
                Client::Propose {
                    payload,
                    reply: ReplyTo::Machine(reply),
                    deadline: Instant::now() + Duration::from_secs(5),
                },
            ) {
                Ok(()) => waiting.push(rx),
                Err(EngineError::Busy { .. }) => busy += 1,
                Err(e) => panic!("{e}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for rx in waiting {
        if matches!(rx.await, Ok(Ok(_))) {
            ok += 1;
        }
    }
    assert!(busy > 0, "the client queue refused work under overload");
    assert!(ok > 0, "and still applied what it took");
    assert_eq!(c.status(leader).term, term, "Raft traffic went first: no election under client load");
    assert_eq!(node.metrics().leader_changes.get(), changes_before);
}

fn node_submit(node: &nid_engine::Node<Toy>, message: Client<Option<Vec<u8>>>) -> Result<(), EngineError> {
    node.submit(message)
}

async fn join_all<F: std::future::Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let handles: Vec<_> = futures.into_iter().map(|f| Box::pin(f)).collect();
    let mut out = Vec::with_capacity(handles.len());
    let mut pending: Vec<_> = handles.into_iter().map(Some).collect();
    let mut results: Vec<Option<F::Output>> = (0..pending.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut left = false;
        for (i, slot) in pending.iter_mut().enumerate() {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        results[i] = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => left = true,
                }
            }
        }
        if left { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
    })
    .await;
    out.extend(results.into_iter().flatten());
    out
}

/// A toy bucket move between two in-process cells with the engine's primitives: the source
/// tracks changes, a full copy and then the changes since it reach the destination through its
/// log, the destination's digest equals the source's once frozen, and dropping a bucket removes
/// its range and markers (and is refused while the bucket is served).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_copies_then_catches_up_and_drops_through_the_log() {
    let t = Duration::from_secs(5);
    let (mut source, mut dest) = (cell(3), cell(3));
    source.start();
    dest.start();
    source.must_set_buckets(vec![5], BucketState::Owned, 1).await;
    for i in 0..50 {
        source.must_propose(&ToyCommand::put(5, &format!("k{i:02}"), "v1")).await;
    }
    let s = tokio::task::block_in_place(|| source.node(source.must_leader()));
    let d = tokio::task::block_in_place(|| dest.node(dest.must_leader()));
    let b5 = BucketId::new(5).unwrap();

    // Changes are not tracked until asked; then every write after the returned index is marked.
    assert!(s.view(|v| bucket_data::changes_since(v, b5, 0)).unwrap().is_empty());
    let tracked_at = s.track_buckets(vec![5], 1, t).await.unwrap();
    assert!(s.bucket(b5).tracking);
    let (copy_index, copy) = s.view(|v| (v.applied_index().unwrap(), bucket_data::export(v, b5).unwrap()));
    assert!(copy_index >= tracked_at);
    assert_eq!(copy.len(), 50);
    // Writes after the copy: an update, a new key and a deletion.
    source.must_propose(&ToyCommand::put(5, "k03", "v2")).await;
    source.must_propose(&ToyCommand::put(5, "new", "n")).await;
    source.must_propose(&ToyCommand { bucket: 5, key: b"k07".to_vec(), value: None, halt: false }).await;

    // The destination refuses data for a bucket it is not importing.
    let chunk = |reset: bool, pairs: Vec<bucket_data::Pair>| nid_engine::buckets::IngestBucket {
        bucket: 5,
        reset,
        keys: pairs.iter().map(|(k, _)| k.clone()).collect(),
        deleted: pairs.iter().map(|(_, v)| v.is_none()).collect(),
        values: pairs.into_iter().map(|(_, v)| v.unwrap_or_default()).collect(),
    };
    assert!(matches!(d.ingest(chunk(true, copy.clone()), t).await, Err(EngineError::Invalid(_))));
    dest.must_set_buckets(vec![5], BucketState::Importing, 1).await;
    // Leftovers of an earlier attempt are dropped by the reset chunk.
    d.ingest(chunk(false, vec![(toy_key(5, b"stale"), Some(b"old".to_vec()))]), t).await.unwrap();
    d.ingest(chunk(true, copy), t).await.unwrap();
    // A key outside the bucket is refused whole.
    let mut bad = chunk(false, vec![(toy_key(6, b"x"), Some(b"y".to_vec()))]);
    bad.bucket = 5;
    assert!(matches!(d.ingest(bad, t).await, Err(EngineError::Malformed(_))));

    // Freeze the source, send the changes since the copy, compare.
    let frozen_at = s.set_buckets(vec![5], BucketState::Frozen, 1, t).await.unwrap();
    let changes = s.view(|v| bucket_data::changes_since(v, b5, copy_index)).unwrap();
    assert_eq!(changes.len(), 3, "k03 updated, new added, k07 deleted");
    assert!(changes.iter().any(|(k, v)| k == &toy_key(5, b"k07") && v.is_none()));
    d.ingest(chunk(false, changes), t).await.unwrap();
    let at_source = s.view(|v| bucket_data::digest(v, b5)).unwrap();
    let read = d.read_barrier(t).await.unwrap();
    assert!(read > 0 && frozen_at > 0);
    let at_dest = d.view(|v| bucket_data::digest(v, b5)).unwrap();
    assert_eq!(at_source, at_dest);
    assert_eq!(at_source.0, 50, "50 copied + 1 new - 1 deleted");

    // A served bucket cannot be dropped; once not owned, its data and markers go.
    assert!(matches!(s.drop_buckets(&[5], t).await, Err(EngineError::Invalid(_))));
    s.set_buckets(vec![5], BucketState::NotOwned, 2, t).await.unwrap();
    s.drop_buckets(&[5], t).await.unwrap();
    assert_eq!(s.view(|v| bucket_data::digest(v, b5)).unwrap().0, 0);
    assert!(s.view(|v| bucket_data::changes_since(v, b5, 0)).unwrap().is_empty());
    // The destination's replicas all hold the copy.
    dest.must_set_buckets(vec![5], BucketState::Owned, 2).await;
    for id in 1..=3 {
        tokio::task::block_in_place(|| dest.must_applied(id, d.applied()));
        assert_eq!(dest.node(id).view(|v| bucket_data::digest(v, b5)).unwrap(), at_dest);
    }
}
