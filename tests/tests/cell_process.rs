//! Real `nid-cell` processes on 127.0.0.1: a 3-replica cell survives SIGKILL of its leader under
//! continuous writes without losing an acknowledged write or minting a second UIN for a RID; a
//! SIGTERM hands leadership over before exiting; bad configurations are refused.

use nid_proto::error::RoutingHint;
use nid_proto::v1::bucket_admin_client::BucketAdminClient;
use nid_proto::v1::cell_request::Operation;
use nid_proto::v1::cell_response::Result as CellResult;
use nid_proto::v1::{
    AuthFactors, AuthenticateRequest, BucketState, CellRequest, CreateVidRequest, DemographicFactor,
    Demographics, EnrollRequest, GetCellStatusRequest, GetIdentityRequest, RouteHeader,
    SetBucketStateRequest, UpdateIdentityRequest, VidKind,
};
use nid_support::plaintext::scan;
use nid_tests::{ProcessCell, binary, enroll_request, http_get};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(30);

fn enroll(rid: &str) -> CellRequest {
    CellRequest { route: None, operation: Some(Operation::Enroll(enroll_request(rid, "Process Test"))) }
}

/// Finds the leader by asking every running replica.
async fn leader(cell: &ProcessCell) -> u64 {
    let deadline = Instant::now() + WAIT;
    loop {
        for node in cell.nodes.iter().filter(|n| n.is_running()) {
            let Some(mut client) = node.try_client(WAIT).await else { continue };
            if let Ok(status) = client.get_cell_status(GetCellStatusRequest {}).await {
                let status = status.into_inner();
                if let Some(r) = status.replicas.iter().find(|r| r.is_leader)
                    && cell.nodes[(r.node_id - 1) as usize].is_running()
                {
                    return r.node_id;
                }
            }
        }
        assert!(Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `request` to the leader, following not-leader hints and retrying transient errors.
/// Returns the response, or the last error once `budget` runs out.
async fn execute(
    cell: &ProcessCell,
    request: CellRequest,
    budget: Duration,
) -> Result<CellResult, tonic::Status> {
    execute_tracked(cell, request, budget).await.map(|(result, _)| result)
}

/// Like [`execute`], and also says whether an earlier attempt ended ambiguously (timeout or lost
/// connection), in which case that attempt may have committed and the answer may be a replay.
async fn execute_tracked(
    cell: &ProcessCell,
    request: CellRequest,
    budget: Duration,
) -> Result<(CellResult, bool), tonic::Status> {
    let deadline = Instant::now() + budget;
    let mut target = leader(cell).await;
    let mut ambiguous = false;
    loop {
        let Some(mut client) = cell.nodes[(target - 1) as usize].try_client(WAIT).await else {
            target = leader(cell).await;
            continue;
        };
        let err = match client.execute(request.clone()).await {
            Ok(r) => return Ok((r.into_inner().result.expect("result"), ambiguous)),
            Err(e) => e,
        };
        if Instant::now() > deadline {
            return Err(err);
        }
        match RoutingHint::from_status(&err) {
            Some(RoutingHint::NotLeader { leader: Some((id, _)), .. })
                if cell.nodes[(id - 1) as usize].is_running() =>
            {
                target = id
            }
            _ if matches!(err.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Unknown) => {
                ambiguous = true;
                tokio::time::sleep(Duration::from_millis(50)).await;
                target = leader(cell).await;
            }
            _ => return Err(err),
        }
    }
}

async fn own_all_buckets(cell: &ProcessCell) {
    let deadline = Instant::now() + WAIT;
    loop {
        let l = leader(cell).await;
        let node = &cell.nodes[(l - 1) as usize];
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", node.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let r = BucketAdminClient::new(channel)
            .set_bucket_state(SetBucketStateRequest {
                buckets: (0..16384).collect(),
                state: BucketState::Owned as i32,
                table_version: 1,
                track_changes: false,
            })
            .await;
        if r.is_ok() {
            return;
        }
        assert!(Instant::now() < deadline, "could not assign buckets: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn uin_of(r: CellResult) -> (String, bool) {
    match r {
        CellResult::Enroll(e) => (e.uin, e.created),
        other => panic!("unexpected {other:?}"),
    }
}

/// Enrols `n` fresh RIDs `RID-<tag>-<k>` one after another; returns the acknowledged (rid, uin)
/// pairs and the RIDs whose outcome is unknown (timeouts across a leader change).
async fn write_many(cell: &ProcessCell, tag: &str, n: usize) -> (Vec<(String, String)>, Vec<String>) {
    let mut acked = Vec::new();
    let mut unknown = Vec::new();
    for k in 0..n {
        let rid = format!("RID-{tag}-{k}");
        match execute_tracked(cell, enroll(&rid), Duration::from_secs(20)).await {
            Ok((r, ambiguous)) => {
                let (uin, created) = uin_of(r);
                // A replay answer is only legitimate when an earlier attempt may have committed.
                assert!(created || ambiguous, "a fresh RID creates an identity");
                acked.push((rid, uin));
            }
            Err(e) => {
                assert!(
                    matches!(e.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Unknown),
                    "{e:?}"
                );
                unknown.push(rid);
            }
        }
    }
    (acked, unknown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_under_writes_loses_no_acknowledged_write() {
    // Replay-marker sweeps every second ride along in the log, across the leader change.
    let mut cell = ProcessCell::start(3, &["--txn-sweep-secs", "1"]);
    own_all_buckets(&cell).await;
    let (mut acked, mut unknown) = write_many(&cell, "BEFORE", 40).await;
    let old = leader(&cell).await;
    // SIGKILL the leader while a writer is mid-stream.
    let ((during, lost), ()) = tokio::join!(write_many(&cell, "DURING", 80), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cell.nodes[(old - 1) as usize].sigkill();
    });
    acked.extend(during);
    unknown.extend(lost);
    let (after, lost) = write_many(&cell, "AFTER", 40).await;
    acked.extend(after);
    unknown.extend(lost);
    let acked: HashMap<String, String> = acked.into_iter().collect();
    let new = leader(&cell).await;
    assert_ne!(new, old);
    cell.node(old).spawn();

    // Every acknowledged write is readable through the (possibly new) leader.
    for (rid, uin) in &acked {
        let read = CellRequest {
            route: None,
            operation: Some(Operation::GetIdentity(GetIdentityRequest { id: uin.clone() })),
        };
        match execute(&cell, read, WAIT).await {
            Ok(CellResult::GetIdentity(r)) => assert_eq!(&r.identity.unwrap().rid, rid),
            other => panic!("acknowledged write lost: {other:?}"),
        }
    }
    // Retrying any RID, acknowledged or not, never mints a second UIN.
    for rid in acked.keys().take(40).chain(unknown.iter()) {
        let (uin, created) = uin_of(execute(&cell, enroll(rid), WAIT).await.expect("retry"));
        if let Some(first) = acked.get(rid) {
            assert_eq!(&uin, first, "one RID never yields two UINs");
            assert!(!created);
        }
    }
    // The restarted replica catches up with the leader's applied index.
    let deadline = Instant::now() + WAIT;
    loop {
        let l = leader(&cell).await;
        let mut lc = cell.nodes[(l - 1) as usize].client(WAIT).await;
        let status = lc.get_cell_status(GetCellStatusRequest {}).await.unwrap().into_inner();
        let leader_applied = status.replicas.iter().find(|r| r.node_id == l).unwrap().applied_index;
        let mut oc = cell.nodes[(old - 1) as usize].client(WAIT).await;
        let old_status = oc.get_cell_status(GetCellStatusRequest {}).await.unwrap().into_inner();
        let old_applied = old_status.replicas.iter().find(|r| r.node_id == old).unwrap().applied_index;
        if old_applied + 2 >= leader_applied {
            break;
        }
        assert!(Instant::now() < deadline, "restarted replica stuck at {old_applied} < {leader_applied}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The new leader runs the sweeper.
    let l = leader(&cell).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let metrics =
            http_get(&cell.nodes[(l - 1) as usize].metrics_addr, "/metrics").await.unwrap_or_default();
        let sweeps = metrics
            .lines()
            .find_map(|line| line.strip_prefix("nid_sweeps_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        if sweeps > 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the leader never swept replay markers");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_leadership_over_before_exiting() {
    let mut cell = ProcessCell::start(3, &["--shutdown-grace-secs", "5"]);
    own_all_buckets(&cell).await;
    let (uin, _) = uin_of(execute(&cell, enroll("RID-TERM"), WAIT).await.unwrap());
    let old = leader(&cell).await;
    let started = Instant::now();
    assert!(cell.node(old).terminate(Duration::from_secs(15)), "clean exit on SIGTERM");
    let new = leader(&cell).await;
    assert_ne!(new, old);
    assert!(started.elapsed() < Duration::from_secs(10));
    let log = cell.node(old).log();
    assert!(log.contains("leadership handed over"), "the leader transferred before exiting:\n{log}");
    let read =
        CellRequest { route: None, operation: Some(Operation::GetIdentity(GetIdentityRequest { id: uin })) };
    assert!(execute(&cell, read, WAIT).await.is_ok());
}

#[test]
fn replicas_sharing_a_zone_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(binary("nid-cell"))
        .args(["--cell-id", "1", "--node-id", "1", "--zone", "a", "--listen", "127.0.0.1:0", "--insecure"])
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--peers", "1=127.0.0.1:1@a,2=127.0.0.1:2@a,3=127.0.0.1:3@b"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("distinct zones"), "{err}");
}

#[test]
fn unknown_config_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cell.toml");
    std::fs::write(&cfg, "cell_id = 1\nnode_id = 1\nzone = \"a\"\nlisten = \"127.0.0.1:0\"\nzone_typo = 3\n")
        .unwrap();
    let out = std::process::Command::new(binary("nid-cell")).arg("--config").arg(&cfg).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("zone_typo"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_while_catching_up_by_snapshot_recovers_complete() {
    // A tiny log-GC threshold forces catch-up by snapshot.
    let mut cell = ProcessCell::start(3, &["--log-gc-threshold", "20", "--log-gc-keep", "5"]);
    own_all_buckets(&cell).await;
    let l = leader(&cell).await;
    let lagging = (1..=3).find(|&id| id != l).unwrap();
    cell.node(lagging).kill9();
    let (acked, _) = write_many(&cell, "SNAP", 120).await;
    assert!(acked.len() >= 100);
    // The leader compacts its log on its own schedule: wait until it has, so that the lagging
    // replica can only catch up by snapshot.
    let l = leader(&cell).await;
    let metrics = cell.nodes[(l - 1) as usize].metrics_addr.clone();
    let deadline = Instant::now() + WAIT;
    loop {
        let text = nid_tests::http_get(&metrics, "/metrics").await.unwrap_or_default();
        let entries = text
            .lines()
            .find_map(|line| line.strip_prefix("nid_raft_log_entries "))
            .and_then(|v| v.trim().parse::<f64>().ok());
        if entries.is_some_and(|n| n < 100.0) {
            break;
        }
        assert!(Instant::now() < deadline, "the leader never compacted its log: {entries:?} entries");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Kill it again and again while it restarts and installs the snapshot.
    for delay_ms in [80, 200, 350, 600] {
        cell.node(lagging).spawn();
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        cell.node(lagging).kill9();
    }
    cell.node(lagging).spawn();
    // Make the recovered replica the leader and read everything through it.
    let deadline = Instant::now() + WAIT;
    loop {
        let l = leader(&cell).await;
        if l == lagging {
            break;
        }
        let mut client = cell.nodes[(l - 1) as usize].client(WAIT).await;
        let _ = client.transfer_leader(nid_proto::v1::TransferLeaderRequest { to_node: lagging }).await;
        assert!(Instant::now() < deadline, "leadership never moved to the recovered replica");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut client = cell.nodes[(lagging - 1) as usize].client(WAIT).await;
    for (rid, uin) in &acked {
        let read = CellRequest {
            route: None,
            operation: Some(Operation::GetIdentity(GetIdentityRequest { id: uin.clone() })),
        };
        let r =
            client.execute(read).await.unwrap_or_else(|e| panic!("read through the recovered leader: {e:?}"));
        match r.into_inner().result {
            Some(CellResult::GetIdentity(g)) => assert_eq!(&g.identity.unwrap().rid, rid),
            other => panic!("{other:?}"),
        }
    }
    // Caught up by snapshot: installed, or (killed mid-install) redone from the marker on restart.
    let log = cell.nodes[(lagging - 1) as usize].log();
    assert!(
        log.contains("installed snapshot") || log.contains("redoing an interrupted snapshot install"),
        "caught up by snapshot:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_plaintext_identifier_or_personal_data_reaches_disk_or_logs() {
    // Small log-GC limits so snapshots (SST files) are written and shipped too.
    let mut cell = ProcessCell::start(3, &["--log-gc-threshold", "10", "--log-gc-keep", "2"]);
    own_all_buckets(&cell).await;
    let l = leader(&cell).await;
    let lagging = (1..=3).find(|&id| id != l).unwrap();
    cell.node(lagging).kill9();
    let mut needles: Vec<Vec<u8>> = Vec::new();
    // As long as PINs go, and found only standing alone (see `plaintext::contains`).
    const PIN: &str = "86420975";
    for i in 0..30 {
        let name = format!("Quetzalcoatl Zyxwvutsrq{i:02}");
        let rid = format!("RID-PRIVACY-{i:04}");
        let request = CellRequest {
            route: None,
            operation: Some(Operation::Enroll(EnrollRequest {
                rid: rid.clone(),
                demographics: Some(Demographics {
                    full_name: name.clone(),
                    date_of_birth: "1931-12-25".into(),
                    phone: "+15550001234".into(),
                    email: "quetzal@example.org".into(),
                    ..Default::default()
                }),
                pin: PIN.into(),
                ..Default::default()
            })),
        };
        let (uin, _) = uin_of(execute(&cell, request, WAIT).await.unwrap());
        if i % 3 == 0 {
            // The rest of the lifecycle writes personal data too: an update, a VID, authentications
            // (whose factors ride in the Raft log), their audit records.
            let renamed = format!("Xochiquetzal Qwertyuiop{i:02}");
            let update = Operation::UpdateIdentity(UpdateIdentityRequest {
                request_id: String::new(),
                uin: uin.clone(),
                expected_version: 1,
                demographics: Some(Demographics {
                    full_name: renamed.clone(),
                    date_of_birth: "1931-12-25".into(),
                    ..Default::default()
                }),
                biometrics: vec![],
            });
            execute(&cell, CellRequest { route: None, operation: Some(update) }, WAIT).await.unwrap();
            let vid = Operation::CreateVid(CreateVidRequest {
                request_id: String::new(),
                uin: uin.clone(),
                kind: VidKind::Perpetual as i32,
                expires_at: None,
                max_uses: 0,
            });
            match execute(&cell, CellRequest { route: None, operation: Some(vid) }, WAIT).await.unwrap() {
                CellResult::CreateVid(v) => needles.push(v.vid.unwrap().vid.into_bytes()),
                other => panic!("{other:?}"),
            }
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
            let auth = Operation::Authenticate(AuthenticateRequest {
                id: uin.clone(),
                transaction_id: format!("TXN-{i}"),
                request_time: Some(prost_types::Timestamp { seconds: now.as_secs() as i64, nanos: 0 }),
                factors: Some(AuthFactors {
                    demographic: Some(DemographicFactor { full_name: renamed.clone(), ..Default::default() }),
                    pin: PIN.into(),
                    totp: String::new(),
                }),
            });
            let route = RouteHeader {
                bucket: u32::from(nid_proto::ids::IdScheme::dev().parse(&uin).unwrap().bucket().get()),
                partner_id: "bank-a".into(),
                partner_allowed: vec![1, 2, 3],
                ..Default::default()
            };
            match execute(&cell, CellRequest { route: Some(route), operation: Some(auth) }, WAIT)
                .await
                .unwrap()
            {
                CellResult::Authenticate(a) => assert!(a.decision.unwrap().authenticated),
                other => panic!("{other:?}"),
            }
            needles.push(renamed.into_bytes());
        }
        needles.push(uin.into_bytes());
        needles.push(name.into_bytes());
        needles.push(rid.into_bytes());
    }
    for fixed in ["1931-12-25", "+15550001234", "quetzal@example.org", PIN] {
        needles.push(fixed.as_bytes().to_vec());
    }
    // The lagging replica catches up by snapshot, so SST snapshot files exist too.
    cell.node(lagging).spawn();
    let deadline = Instant::now() + WAIT;
    while !cell.nodes[(lagging - 1) as usize].log().contains("installed snapshot") {
        assert!(Instant::now() < deadline, "no snapshot installed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for id in 1..=3 {
        assert!(cell.node(id).terminate(Duration::from_secs(15)));
    }
    let root = cell.nodes[0].data_dir.parent().unwrap().to_path_buf();
    // The scan does read every file: it finds what the logs do say.
    assert!(!scan(&root, &[b"serving".to_vec()]).1.is_empty());
    let (_, hits) = scan(&root, &needles);
    assert!(hits.is_empty(), "plaintext found at rest:\n{}", hits.join("\n"));
}

fn keyring_file(dir: &std::path::Path, name: &str, generations: &[(u32, u8)]) -> String {
    let path = dir.join(name);
    let text: String =
        generations.iter().map(|(id, byte)| format!("{id}:{}\n", format!("{byte:02x}").repeat(32))).collect();
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

async fn client_of(cell: &ProcessCell, id: u64) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{}", cell.nodes[(id - 1) as usize].addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_other_root_keys_stops_serving_and_exits_non_zero() {
    // A replica that cannot apply what the others applied (here: its keyring's root differs, an
    // operator's mistake) must not limp on answering health SERVING, nor diverge: it stops, says
    // why, and exits non-zero so a supervisor notices.
    let keys = tempfile::tempdir().unwrap();
    let right = keyring_file(keys.path(), "right", &[(1, 0x11)]);
    let wrong = keyring_file(keys.path(), "wrong", &[(1, 0x22)]);
    let mut cell = ProcessCell::start(3, &["--keyring-file", &right, "--txn-sweep-secs", "0"]);
    own_all_buckets(&cell).await;
    write_many(&cell, "KEYS-BEFORE", 3).await;
    let l = leader(&cell).await;
    let victim = (1..=3).find(|&id| id != l).unwrap();
    cell.node(victim).kill9();
    cell.node(victim).set_flag("--keyring-file", &wrong);
    cell.node(victim).spawn();
    let (acked, _) = write_many(&cell, "KEYS-AFTER", 3).await;
    assert_eq!(acked.len(), 3, "the other two keep serving");
    let code = tokio::task::block_in_place(|| cell.node(victim).wait_exit(WAIT));
    assert_eq!(
        code,
        Some(Some(3)),
        "exit status 3: the replica stopped on a failure; log:\n{}",
        cell.node(victim).log()
    );
    let log = cell.node(victim).log();
    assert!(log.contains("fingerprint"), "it says why: {log}");
    assert!(!log.contains("RID-KEYS"), "no identifier in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_key_rotation_under_load_keeps_every_replica_identical_and_old_data_readable() {
    use nid_proto::v1::cell_client::CellClient;
    use nid_proto::v1::{ActivateKeyGenerationRequest, ChecksumBucketRequest};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let keys = tempfile::tempdir().unwrap();
    let file = keyring_file(keys.path(), "keyring", &[(1, 0x31)]);
    let cell = Arc::new(tokio::sync::RwLock::new(ProcessCell::start(3, &["--keyring-file", &file])));
    own_all_buckets(&*cell.read().await).await;
    let (old, _) = write_many(&*cell.read().await, "ROT-OLD", 20).await;

    // Load through the whole rotation: enrolments, one after another, retried across restarts.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (cell, stop) = (cell.clone(), stop.clone());
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut k = 0;
            while !stop.load(Ordering::Relaxed) {
                let rid = format!("RID-ROT-LOAD-{k}");
                k += 1;
                let cell = cell.read().await;
                if let Ok(r) = execute(&cell, enroll(&rid), Duration::from_secs(20)).await {
                    acked.push((rid, uin_of(r).0));
                }
            }
            acked
        })
    };
    // Every replica gets generation 2, one restart at a time, the leader last.
    keyring_file(keys.path(), "keyring", &[(1, 0x31), (2, 0x32)]);
    let l = leader(&*cell.read().await).await;
    for id in (1..=3).filter(|&id| id != l).chain([l]) {
        let mut c = cell.write().await;
        assert!(c.node(id).terminate(Duration::from_secs(15)), "node {id} stops cleanly");
        c.node(id).spawn();
        drop(c);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let c = cell.read().await;
        leader(&c).await;
    }
    // Activate it on the leader (it asks every voter first).
    let deadline = Instant::now() + WAIT;
    loop {
        let c = cell.read().await;
        let l = leader(&c).await;
        let r = CellClient::new(client_of(&c, l).await)
            .activate_key_generation(ActivateKeyGenerationRequest { id: 2 })
            .await;
        match r {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "activation kept failing: {e:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let loaded = load.await.unwrap();
    assert!(loaded.len() > 5, "load ran through the rotation: {} enrolments", loaded.len());

    let c = cell.read().await;
    let (after, _) = write_many(&c, "ROT-NEW", 5).await;
    // Old and new data readable through the leader.
    for (_, uin) in old.iter().chain(loaded.iter()).chain(after.iter()) {
        let get = CellRequest {
            route: None,
            operation: Some(Operation::GetIdentity(GetIdentityRequest { id: uin.clone() })),
        };
        assert!(matches!(execute(&c, get, WAIT).await, Ok(CellResult::GetIdentity(_))), "{uin} unreadable");
    }
    // Once every replica applied the same index, every bucket that holds data is byte-identical.
    let l = leader(&c).await;
    let target = CellClient::new(client_of(&c, l).await)
        .get_cell_status(GetCellStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let want = target.replicas.iter().map(|r| r.applied_index).max().unwrap();
    let buckets: std::collections::BTreeSet<u32> = old
        .iter()
        .chain(loaded.iter())
        .chain(after.iter())
        .map(|(rid, _)| {
            u32::from(
                nid_proto::bucket::bucket_of_key(nid_proto::bucket::KeyDomain::Rid, rid.as_bytes()).get(),
            )
        })
        .collect();
    let deadline = Instant::now() + WAIT;
    let digests = loop {
        let mut per_replica = Vec::new();
        for id in 1..=3u64 {
            let mut admin = BucketAdminClient::new(client_of(&c, id).await);
            let mut digest = Vec::new();
            let mut applied = Vec::new();
            for &b in &buckets {
                let r = admin
                    .checksum_bucket(ChecksumBucketRequest { bucket: b, local: true, buckets: Vec::new() })
                    .await
                    .unwrap()
                    .into_inner();
                applied.push(r.applied_index);
                digest.push((b, r.records, r.sha256));
            }
            per_replica.push((applied, digest));
        }
        let settled = per_replica.iter().all(|(a, _)| a.iter().all(|&i| i >= want));
        if settled && per_replica.iter().all(|(a, _)| *a == per_replica[0].0) {
            break per_replica;
        }
        assert!(Instant::now() < deadline, "replicas never reached the same applied index");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(digests.iter().all(|(_, d)| *d == digests[0].1), "replicas diverged across the rotation");
    assert!(digests[0].1.iter().all(|(_, records, _)| *records > 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_is_ready_only_while_it_knows_a_leader_and_is_live_all_along() {
    let mut cell = ProcessCell::start(3, &[]);
    // Alone, a replica cannot elect a leader: live, not ready.
    cell.node(2).kill9();
    cell.node(3).kill9();
    let addr = cell.nodes[0].addr.clone();
    wait_health(&addr, "", ServingStatus::Serving).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    wait_health(&addr, "nid.v1.Cell", ServingStatus::NotServing).await;
    cell.node(2).spawn();
    cell.node(3).spawn();
    wait_health(&addr, "nid.v1.Cell", ServingStatus::Serving).await;
    wait_health(&addr, "nid.v1.BucketAdmin", ServingStatus::Serving).await;
}

use tonic_health::pb::health_check_response::ServingStatus;

/// Waits until `service`'s health on `addr` is `want`.
async fn wait_health(addr: &str, service: &str, want: ServingStatus) {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let deadline = Instant::now() + WAIT;
    loop {
        let got = match tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
        {
            Ok(channel) => HealthClient::new(channel)
                .check(HealthCheckRequest { service: service.into() })
                .await
                .ok()
                .map(|r| r.into_inner().status()),
            Err(_) => None,
        };
        if got == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "{service} on {addr} stayed {got:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
