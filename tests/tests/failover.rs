//! Faults under load, through the router, as a careful client sees them.
//!
//! - Leaders SIGKILLed while enrolments, versioned updates, status changes and VID creations are in
//!   flight: every answer a client got is true. No write that applied is answered with a definite
//!   failure, no write applies twice, no RID gets two UINs, no version is acknowledged twice.
//! - A leader paused with SIGSTOP: the cell takes writes again within about one election, and the
//!   old leader, resumed, neither serves a stale read nor applies a write.

use nid_proto::bucket::{KeyDomain, bucket_of_key};
use nid_proto::ids::{IdScheme, IdSchemeSeed};
use nid_proto::v1::cell_client::CellClient;
use nid_proto::v1::cell_request::Operation;
use nid_proto::v1::cell_response::Result as CellResult;
use nid_proto::v1::enrollment_client::EnrollmentClient;
use nid_proto::v1::{
    CellRequest, CreateVidRequest, Demographics, GetHistoryRequest, GetIdentityRequest, Identity,
    IdentityStatus, RevokeVidRequest, RouteHeader, SetStatusRequest, UpdateIdentityRequest, VidKind,
};
use nid_tests::{DevCluster, DevReplica, adopt_cell, enroll_request, leader_of};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::Code;
use tonic::transport::Channel;

/// The tests here each run a cluster under load on a small machine: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long a client waits for one call.
const CALL_TIMEOUT: Duration = Duration::from_secs(8);

type Client = EnrollmentClient<Channel>;

/// What one call told the client.
#[derive(Debug)]
enum Answer<T> {
    /// Applied (or read), with this result.
    Done(T),
    /// Definitely not applied: the model's refusals.
    Refused(tonic::Status),
    /// Unknown: the deadline passed or the cell was unreachable; the write may have applied.
    Unknown(tonic::Status),
}

/// Sorts an answer into the error model, recording any status outside it.
fn answer<T>(result: Result<tonic::Response<T>, tonic::Status>, log: &Log) -> Answer<T> {
    match result {
        Ok(r) => Answer::Done(r.into_inner()),
        Err(e) => match e.code() {
            Code::DeadlineExceeded | Code::Unavailable => {
                if e.code() == Code::DeadlineExceeded
                    && nid_proto::error::reason_of(&e).as_deref() != Some("TIMEOUT")
                {
                    log.violation(format!("DEADLINE_EXCEEDED without reason TIMEOUT: {e:?}"));
                }
                Answer::Unknown(e)
            }
            // This client's own timer (tonic enforces grpc-timeout locally too): the router was
            // late with its own answer, which comes a little before the deadline. Unknown.
            Code::Cancelled if e.message() == "Timeout expired" => Answer::Unknown(e),
            Code::Unknown | Code::Cancelled | Code::Internal => {
                log.violation(format!("a status outside the error model: {:?} {}", e.code(), e.message()));
                Answer::Unknown(e)
            }
            Code::ResourceExhausted if e.message().contains("h2") => {
                log.violation(format!("a raw h2 status: {}", e.message()));
                Answer::Unknown(e)
            }
            _ => Answer::Refused(e),
        },
    }
}

/// Violations and counts, shared by the workers.
#[derive(Default)]
struct Log {
    violations: Mutex<Vec<String>>,
    counts: Mutex<HashMap<&'static str, u64>>,
}

impl Log {
    fn violation(&self, what: String) {
        eprintln!("VIOLATION: {what}");
        if let Ok(mut v) = self.violations.lock() {
            v.push(what);
        }
    }

    fn count<T>(&self, op: &'static str, a: &Answer<T>) {
        let key: &'static str = match (op, a) {
            (_, Answer::Done(_)) => "done",
            (_, Answer::Refused(_)) => "refused",
            (_, Answer::Unknown(_)) => "unknown",
        };
        if let Ok(mut c) = self.counts.lock() {
            *c.entry(op).or_default() += 1;
            *c.entry(key).or_default() += 1;
        }
    }
}

async fn client(router: &str) -> Client {
    EnrollmentClient::new(nid_tests::connect(router).await)
}

fn timed<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.set_timeout(CALL_TIMEOUT);
    r
}

/// Reads an identity, retrying until it answers (the cell may be electing a leader).
async fn read(c: &mut Client, uin: &str) -> Identity {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match c.get_identity(timed(GetIdentityRequest { id: uin.to_owned() })).await {
            Ok(r) => return r.into_inner().identity.expect("identity"),
            Err(e) => {
                assert!(Instant::now() < deadline, "identity unreadable for a minute: {e:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Enrols `n` identities named by `prefix` (retrying until each is answered); their UINs.
async fn enroll_many(c: &mut Client, prefix: &str, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..n {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match c.enroll(timed(enroll_request(&format!("{prefix}-{i}"), "Failover Person"))).await {
                Ok(r) => {
                    out.push(r.into_inner().uin);
                    break;
                }
                Err(e) => assert!(Instant::now() < deadline, "enrolment kept failing: {e:?}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    out
}

struct Workers {
    stop: Arc<AtomicBool>,
    in_flight: Arc<AtomicUsize>,
    log: Arc<Log>,
}

/// Counts a call in flight while `f` runs.
async fn in_flight<T>(w: &AtomicUsize, f: impl std::future::Future<Output = T>) -> T {
    w.fetch_add(1, Ordering::SeqCst);
    let out = f.await;
    w.fetch_sub(1, Ordering::SeqCst);
    out
}

/// Enrols fresh RIDs; a first call answered created=false would claim someone else created it.
async fn enrol_worker(router: String, w: usize, ws: Arc<Workers>) -> HashMap<String, Answer<String>> {
    let mut c = client(&router).await;
    let mut out = HashMap::new();
    let mut k = 0;
    while !ws.stop.load(Ordering::SeqCst) {
        let rid = format!("FO-{w}-{k}");
        k += 1;
        let request = enroll_request(&rid, &format!("Enrolled Person {w} {k}"));
        let a = answer(in_flight(&ws.in_flight, c.enroll(timed(request))).await, &ws.log);
        ws.log.count("enroll", &a);
        let a = match a {
            Answer::Done(r) => {
                if !r.created {
                    ws.log.violation(format!("the first enrolment of {rid} answered created=false"));
                }
                Answer::Done(r.uin)
            }
            Answer::Refused(e) => Answer::Refused(e),
            Answer::Unknown(e) => Answer::Unknown(e),
        };
        out.insert(rid, a);
    }
    out
}

/// Versioned updates, each with content no other write uses, on identities only this worker
/// writes: a definite failure must leave the version where it was.
async fn update_worker(
    router: String,
    uins: Vec<String>,
    ws: Arc<Workers>,
) -> Vec<(String, u64, String, bool)> {
    let mut c = client(&router).await;
    // (uin, version, content, acknowledged) for acknowledged writes; (uin, 0, content, false) for
    // refused ones.
    let mut out = Vec::new();
    let mut k = 0u64;
    while !ws.stop.load(Ordering::SeqCst) {
        let uin = &uins[(k as usize) % uins.len()];
        k += 1;
        let before = read(&mut c, uin).await.version;
        let content = format!("Updated {uin} {k}");
        let request = UpdateIdentityRequest {
            uin: uin.clone(),
            expected_version: before,
            demographics: Some(Demographics {
                full_name: content.clone(),
                date_of_birth: "1970-01-01".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let a = answer(in_flight(&ws.in_flight, c.update_identity(timed(request))).await, &ws.log);
        ws.log.count("update", &a);
        match a {
            Answer::Done(r) => {
                if r.version != before + 1 {
                    ws.log.violation(format!("update from v{before} acknowledged as v{}", r.version));
                }
                out.push((uin.clone(), r.version, content, true));
            }
            Answer::Refused(e) => {
                let now = read(&mut c, uin).await.version;
                if now != before {
                    ws.log.violation(format!(
                        "update answered {:?} ({}) but applied: v{before} -> v{now}",
                        e.code(),
                        e.message()
                    ));
                }
                out.push((uin.clone(), 0, content, false));
            }
            Answer::Unknown(_) => {}
        }
    }
    out
}

/// Status changes (ACTIVATED <-> BLOCKED) on identities only this worker writes.
async fn status_worker(router: String, uins: Vec<String>, ws: Arc<Workers>) -> Vec<(String, u64)> {
    let mut c = client(&router).await;
    let mut acknowledged = Vec::new();
    let mut k = 0u64;
    while !ws.stop.load(Ordering::SeqCst) {
        let uin = &uins[(k as usize) % uins.len()];
        k += 1;
        let current = read(&mut c, uin).await;
        let to = if current.status == IdentityStatus::Activated as i32 {
            IdentityStatus::Blocked
        } else {
            IdentityStatus::Activated
        };
        let request = SetStatusRequest {
            uin: uin.clone(),
            status: to as i32,
            reason: format!("failover {k}"),
            ..Default::default()
        };
        let a = answer(in_flight(&ws.in_flight, c.set_status(timed(request))).await, &ws.log);
        ws.log.count("set_status", &a);
        let after = read(&mut c, uin).await;
        match a {
            Answer::Done(r) => {
                if r.version != current.version + 1 || after.version != r.version || after.status != to as i32
                {
                    ws.log.violation(format!(
                        "status change from v{} acknowledged as v{}, identity now v{} status {}",
                        current.version, r.version, after.version, after.status
                    ));
                }
                acknowledged.push((uin.clone(), r.version));
            }
            Answer::Refused(e) if after.version != current.version => ws.log.violation(format!(
                "status change answered {:?} ({}) but applied: v{} -> v{}",
                e.code(),
                e.message(),
                current.version,
                after.version
            )),
            _ => {}
        }
    }
    acknowledged
}

/// Temporary VIDs on identities only this worker writes: each call adds exactly one VID when it
/// succeeds, none when refused, at most one when its outcome is unknown. Each new VID is then
/// revoked (so the identity never runs out of room): an acknowledged revocation holds, a refused
/// one changed nothing.
async fn vid_worker(router: String, uins: Vec<String>, ws: Arc<Workers>) {
    let mut c = client(&router).await;
    let mut k = 0;
    while !ws.stop.load(Ordering::SeqCst) {
        let uin = &uins[k % uins.len()];
        k += 1;
        let before: HashSet<String> = read(&mut c, uin).await.vids.into_iter().map(|v| v.vid).collect();
        let expires = std::time::SystemTime::now() + Duration::from_secs(86_400);
        let expires = expires.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let request = CreateVidRequest {
            uin: uin.clone(),
            kind: VidKind::Temporary as i32,
            expires_at: Some(prost_types::Timestamp { seconds: expires.as_secs() as i64, nanos: 0 }),
            max_uses: 0,
            ..Default::default()
        };
        let a = answer(in_flight(&ws.in_flight, c.create_vid(timed(request))).await, &ws.log);
        ws.log.count("create_vid", &a);
        let added: Vec<String> =
            read(&mut c, uin).await.vids.into_iter().map(|v| v.vid).filter(|v| !before.contains(v)).collect();
        match a {
            Answer::Done(r) => {
                let vid = r.vid.map(|v| v.vid).unwrap_or_default();
                if added != [vid] {
                    ws.log.violation(format!("an acknowledged VID creation added {} VIDs", added.len()));
                }
            }
            Answer::Refused(e) if !added.is_empty() => ws.log.violation(format!(
                "VID creation answered {:?} ({}) but added {}",
                e.code(),
                e.message(),
                added.len()
            )),
            Answer::Unknown(_) if added.len() > 1 => {
                ws.log.violation(format!("one VID creation added {}", added.len()))
            }
            _ => {}
        }
        for vid in added {
            let request = RevokeVidRequest { vid: vid.clone(), ..Default::default() };
            let a = answer(in_flight(&ws.in_flight, c.revoke_vid(timed(request))).await, &ws.log);
            ws.log.count("revoke_vid", &a);
            let revoked = read(&mut c, uin).await.vids.iter().any(|v| v.vid == vid && v.revoked);
            match a {
                Answer::Done(_) if !revoked => {
                    ws.log.violation("an acknowledged revocation did not hold".into())
                }
                Answer::Refused(e) if revoked => ws.log.violation(format!(
                    "revocation answered {:?} ({}) but applied",
                    e.code(),
                    e.message()
                )),
                _ => {}
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_is_true_while_leaders_are_killed_under_writes() {
    let _serial = SERIAL.lock().await;
    const KILLS: usize = 20;
    let dev = DevCluster::start(2);
    let router = dev.router();
    let mut cells = [adopt_cell(&dev, 0), adopt_cell(&dev, 1)];

    let mut c = client(&router).await;
    let update_uins = [enroll_many(&mut c, "UPD-A", 8).await, enroll_many(&mut c, "UPD-B", 8).await];
    let status_uins = enroll_many(&mut c, "STATUS", 8).await;
    let vid_uins = enroll_many(&mut c, "VID", 8).await;

    let ws = Arc::new(Workers {
        stop: Arc::new(AtomicBool::new(false)),
        in_flight: Arc::new(AtomicUsize::new(0)),
        log: Arc::new(Log::default()),
    });
    let enrolls: Vec<_> = (0..2).map(|w| tokio::spawn(enrol_worker(router.clone(), w, ws.clone()))).collect();
    let updates: Vec<_> = update_uins
        .iter()
        .map(|u| tokio::spawn(update_worker(router.clone(), u.clone(), ws.clone())))
        .collect();
    let status = tokio::spawn(status_worker(router.clone(), status_uins.clone(), ws.clone()));
    let vids = tokio::spawn(vid_worker(router.clone(), vid_uins, ws.clone()));

    // Kill each cell's leader in turn, every time while calls are in flight; restart it on its data
    // and let it catch up before the next kill, so the cell never loses its quorum for long.
    let started = Instant::now();
    for kill in 0..KILLS {
        let cell = &mut cells[kill % 2];
        let leader = leader_of(cell, Duration::from_secs(20)).await.expect("a leader");
        let deadline = Instant::now() + Duration::from_secs(10);
        while ws.in_flight.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "no call in flight to kill under");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        cell[leader].kill9();
        tokio::time::sleep(Duration::from_millis(300)).await;
        cell[leader].restart();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = cell[leader].status(Duration::from_millis(500)).await
                && s.replicas.iter().any(|r| r.is_leader)
            {
                break;
            }
            assert!(Instant::now() < deadline, "the restarted replica never rejoined");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let fault_time = started.elapsed();
    ws.stop.store(true, Ordering::SeqCst);

    let mut enrolled = HashMap::new();
    for t in enrolls {
        enrolled.extend(t.await.expect("enrol worker"));
    }
    let mut updated = Vec::new();
    for t in updates {
        updated.extend(t.await.expect("update worker"));
    }
    let mut versions: Vec<(String, u64)> = status.await.expect("status worker");
    vids.await.expect("vid worker");

    // No RID with two UINs: enrolling each again answers the UIN the client was given (or, after an
    // unknown outcome, some UIN, consistently); a refused enrolment had not created anything.
    let mut c = client(&router).await;
    for (rid, a) in &enrolled {
        let (w, k) = rid.trim_start_matches("FO-").split_once('-').unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let again = loop {
            let request =
                enroll_request(rid, &format!("Enrolled Person {w} {}", k.parse::<u64>().unwrap() + 1));
            match c.enroll(timed(request)).await {
                Ok(r) => break r.into_inner(),
                Err(e) => assert!(Instant::now() < deadline, "re-enrolment kept failing: {e:?}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        match a {
            Answer::Done(uin) if *uin != again.uin || again.created => ws
                .log
                .violation(format!("{rid} was answered one UIN and now another (created={})", again.created)),
            Answer::Refused(e) if !again.created => {
                ws.log.violation(format!("{rid} was refused ({e:?}) yet existed"))
            }
            _ => {}
        }
    }

    // Every acknowledged update holds its content at its version; no refused content appears; no
    // version was acknowledged twice.
    let mut histories: HashMap<String, Vec<Identity>> = HashMap::new();
    for uin in update_uins.iter().flatten() {
        let r = c
            .get_history(timed(GetHistoryRequest { uin: uin.clone(), from_version: 1, limit: 500 }))
            .await
            .expect("history");
        histories.insert(uin.clone(), r.into_inner().versions);
    }
    for (uin, version, content, acknowledged) in &updated {
        let history = &histories[uin];
        if *acknowledged {
            versions.push((uin.clone(), *version));
            let at = history.iter().find(|v| v.version == *version);
            let name = at.and_then(|v| v.demographics.as_ref()).map(|d| d.full_name.as_str());
            if name != Some(content.as_str()) {
                ws.log.violation(format!("an acknowledged update is not at its version {version}"));
            }
        } else if history.iter().any(|v| v.demographics.as_ref().is_some_and(|d| d.full_name == *content)) {
            ws.log.violation("a refused update's content is in the history".into());
        }
    }
    let unique: HashSet<&(String, u64)> = versions.iter().collect();
    if unique.len() != versions.len() {
        ws.log.violation(format!("{} versions acknowledged twice", versions.len() - unique.len()));
    }

    let counts = ws.log.counts.lock().unwrap().clone();
    eprintln!("{KILLS} leader kills in {:.1} s; answers: {counts:?}", fault_time.as_secs_f64());
    let violations = ws.log.violations.lock().unwrap().clone();
    assert!(violations.is_empty(), "{} untrue answers:\n{}", violations.len(), violations.join("\n"));
    for op in ["enroll", "update", "set_status", "create_vid", "revoke_vid"] {
        assert!(
            counts.get(op).copied().unwrap_or(0) >= 20,
            "too few {op} calls to mean anything: {counts:?}"
        );
    }
}

/// Sends one operation straight to a replica (no router), the way a stale client could.
async fn direct(replica: &DevReplica, bucket: u16, op: Operation) -> Result<CellResult, tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", replica.address))
        .expect("address")
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(3))
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let request = CellRequest {
        route: Some(RouteHeader {
            bucket: u32::from(bucket),
            request_id: "stale-leader-probe".into(),
            ..Default::default()
        }),
        operation: Some(op),
    };
    let response = CellClient::new(channel).execute(request).await?.into_inner();
    response.result.ok_or_else(|| tonic::Status::internal("empty response"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_costs_about_one_election_and_serves_nothing_stale() {
    let _serial = SERIAL.lock().await;
    let dev = DevCluster::start(1);
    let router = dev.router();
    let cell = adopt_cell(&dev, 0);
    let seed = IdSchemeSeed::from_hex(dev.info["id_scheme_seed"].as_str().unwrap()).unwrap();
    let scheme = IdScheme::new(&seed);
    let mut c = client(&router).await;
    let uin = enroll_many(&mut c, "PAUSE-TARGET", 1).await.remove(0);
    let before = read(&mut c, &uin).await;

    // Writers: enrolments, each recording when it was sent and when it succeeded.
    let stop = Arc::new(AtomicBool::new(false));
    let successes: Arc<Mutex<Vec<(Instant, Instant)>>> = Arc::default();
    let outside: Arc<Mutex<Vec<String>>> = Arc::default();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (router, stop, successes, outside) =
                (router.clone(), stop.clone(), successes.clone(), outside.clone());
            tokio::spawn(async move {
                let mut c = client(&router).await;
                let mut k = 0;
                while !stop.load(Ordering::SeqCst) {
                    k += 1;
                    let sent = Instant::now();
                    let mut request =
                        tonic::Request::new(enroll_request(&format!("PAUSE-{w}-{k}"), "Paused"));
                    request.set_timeout(Duration::from_secs(10));
                    match c.enroll(request).await {
                        Ok(_) => successes.lock().unwrap().push((sent, Instant::now())),
                        Err(e) => {
                            let timeout = e.code() == Code::DeadlineExceeded
                                && nid_proto::error::reason_of(&e).as_deref() == Some("TIMEOUT");
                            if !timeout && e.code() != Code::Unavailable {
                                outside.lock().unwrap().push(format!("{:?} {}", e.code(), e.message()));
                            }
                        }
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;

    let leader = leader_of(&cell, Duration::from_secs(20)).await.expect("a leader");
    cell[leader].pause();
    let paused = Instant::now();
    // While it is paused, the identity moves on through the new leader.
    let mut c = client(&router).await;
    let request = UpdateIdentityRequest {
        uin: uin.clone(),
        expected_version: before.version,
        demographics: Some(Demographics {
            full_name: "Changed During The Pause".into(),
            date_of_birth: "1970-01-01".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let updated =
        c.update_identity(timed(request)).await.expect("update during the pause").into_inner().version;
    tokio::time::sleep(Duration::from_secs(6).saturating_sub(paused.elapsed())).await;

    // Resumed: straight away, a read of that identity and a write, sent directly to the old leader.
    let bucket = scheme.parse(&uin).expect("uin").bucket().get();
    let rid = "PAUSE-STALE-WRITE";
    let rid_bucket = bucket_of_key(KeyDomain::Rid, rid.as_bytes()).get();
    cell[leader].resume();
    let resumed = Instant::now();
    let old = &cell[leader];
    let (stale_read, stale_write) = tokio::join!(
        direct(old, bucket, Operation::GetIdentity(GetIdentityRequest { id: uin.clone() })),
        direct(old, rid_bucket, Operation::Enroll(enroll_request(rid, "Stale Leader Write"))),
    );
    // Writers keep going a while after the resume (where h2 errors used to surface).
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        let _ = w.await;
    }

    let successes = successes.lock().unwrap().clone();
    let first_after = successes
        .iter()
        .filter(|(sent, _)| *sent >= paused)
        .map(|(_, done)| done.duration_since(paused))
        .min()
        .expect("no write succeeded during the pause");
    let during = successes.iter().filter(|(_, done)| *done > paused && *done < resumed).count();
    eprintln!(
        "leader paused 6 s: first write sent after the pause succeeded {:.2} s after it began; \
         {during} writes succeeded while it was paused",
        first_after.as_secs_f64()
    );
    assert!(
        first_after <= Duration::from_millis(2500),
        "writes stalled {first_after:?} behind a paused leader"
    );
    let outside = outside.lock().unwrap().clone();
    assert!(outside.is_empty(), "answers outside the error model around the pause: {outside:?}");

    match stale_read {
        Ok(CellResult::GetIdentity(r)) => {
            let v = r.identity.map(|i| i.version).unwrap_or(0);
            assert!(v >= updated, "the resumed old leader served a stale read (v{v}, current v{updated})");
        }
        Ok(other) => panic!("unexpected answer {other:?}"),
        Err(e) => eprintln!("read at the resumed old leader: {:?} {}", e.code(), e.message()),
    }
    match stale_write {
        Ok(CellResult::Enroll(r)) => {
            // Accepted only once the old leader had learned the new term and led again: then the
            // write went through the current log and must be there for everyone.
            let mut c = client(&router).await;
            let again = c.enroll(timed(enroll_request(rid, "Stale Leader Write"))).await.expect("enrol");
            assert_eq!(
                again.into_inner().uin,
                r.uin,
                "an acknowledged write of the resumed replica is missing"
            );
        }
        Ok(other) => panic!("unexpected answer {other:?}"),
        Err(e) => {
            eprintln!("write at the resumed old leader: {:?} {}", e.code(), e.message());
            let reason = nid_proto::error::reason_of(&e);
            let definite = matches!(reason.as_deref(), Some("NOT_LEADER" | "RETRY_LATER" | "WRONG_OWNER"))
                || !matches!(e.code(), Code::DeadlineExceeded | Code::Unavailable);
            if definite {
                // A definite refusal: the enrolment must not exist.
                let mut c = client(&router).await;
                let again = c.enroll(timed(enroll_request(rid, "Stale Leader Write"))).await.expect("enrol");
                assert!(again.into_inner().created, "a write refused by the resumed old leader was applied");
            }
        }
    }
}

/// A cell that lost its quorum answers through its last replica "not the leader" (naming no
/// leader, or one that does not answer): the replica was reached, so past the deadline the
/// client hears DEADLINE_EXCEEDED / TIMEOUT, never "no replica of the owning cell is reachable".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cell_without_quorum_that_answers_not_leader_is_reported_as_a_timeout_not_unreachable() {
    let _serial = SERIAL.lock().await;
    let mut dev = DevCluster::start(1);
    let mut c = EnrollmentClient::new(nid_tests::connect(&dev.router()).await);
    let uin = c.enroll(enroll_request("RID-QUORUMLESS", "Quorumless Person")).await.unwrap().into_inner().uin;
    let replicas = adopt_cell(&dev, 0);
    let leader = leader_of(&replicas, Duration::from_secs(10)).await.expect("a leader");
    let follower = (leader + 1) % replicas.len();
    replicas[leader].pause();
    replicas[follower].pause();
    let get = |deadline_ms: u64| {
        let mut request = tonic::Request::new(GetIdentityRequest { id: uin.clone() });
        request.set_timeout(Duration::from_millis(deadline_ms));
        request
    };
    let metrics = dev.info["router"]["metrics"].as_str().unwrap_or_default().to_owned();
    let not_leader = || async {
        let text = nid_tests::http_get(&metrics, "/metrics").await.unwrap_or_default();
        text.lines()
            .find(|l| l.starts_with("nid_router_retries_total{") && l.contains("reason=\"not_leader\""))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let before = not_leader().await;
    // The first call finds the frozen replicas out (they time out and become suspects); the
    // calls right after reach mostly the live follower, which answers "not the leader" (once a
    // suspicion lapses a call may time out at a frozen replica again: also a timeout).
    let mut answers = vec![c.get_identity(get(3_000)).await.map(|_| ()).unwrap_err()];
    for _ in 0..4 {
        answers.push(c.get_identity(get(1_000)).await.map(|_| ()).unwrap_err());
    }
    let hints = not_leader().await - before;
    replicas[leader].resume();
    replicas[follower].resume();
    for e in &answers {
        assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
        assert_eq!(nid_proto::error::reason_of(e).as_deref(), Some("TIMEOUT"), "{e:?}");
    }
    assert!(hints > 0.0, "the live follower answered 'not the leader' (router retries counted {hints})");
    assert!(dev.stop(), "nidctl dev up stops cleanly");
}

/// A replica whose disk is lost comes back under a new node id with `nidctl cell
/// replace-replica`: it joins as a learner, catches up, and replaces the old id as a voter. The
/// cell then holds its quorum with the new replica: with the third one frozen, every earlier
/// identity reads and new enrolments commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_lost_its_disk_is_replaced_under_a_new_node_id_with_nidctl() {
    let _serial = SERIAL.lock().await;
    let mut dev = DevCluster::start(1);
    let dir = dev.dir.path().to_owned();
    let mut c = client(&dev.router()).await;
    let uins = enroll_many(&mut c, "RID-REPLACE", 40).await;
    let mut replicas = adopt_cell(&dev, 0);
    let leader = leader_of(&replicas, Duration::from_secs(10)).await.expect("a leader");
    let (victim, other) = ((leader + 1) % 3, (leader + 2) % 3);
    let old_id = replicas[victim].node_id;
    let new_id = 4;
    replicas[victim].kill9();
    std::fs::remove_dir_all(replicas[victim].data_dir().expect("a data directory")).unwrap();
    let mut fresh = replicas[victim].as_new_member(new_id);
    fresh.restart();

    // `nidctl cell replace-replica 1 --node OLD --new-node NEW`: (success, what it printed).
    let replace = |old: u64, new: u64| {
        let out = std::process::Command::new(nid_tests::binary("nidctl"))
            .args([
                "cell",
                "replace-replica",
                "1",
                "--node",
                &old.to_string(),
                "--new-node",
                &new.to_string(),
            ])
            .args(["--wait-secs", "60", "--dev-dir"])
            .arg(&dir)
            .output()
            .unwrap();
        let said =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.success(), said)
    };
    let (ok, said) = replace(old_id, new_id);
    assert!(ok, "{said}");
    assert!(said.contains(&format!("node 4 replaced node {old_id}")), "{said}");
    // The control cell's registry lists the replicas as they are now (what routers dial).
    let mut admin = nid_proto::v1::admin_client::AdminClient::new(nid_tests::connect(&dev.router()).await);
    let status =
        admin.get_cluster_status(nid_proto::v1::GetClusterStatusRequest {}).await.unwrap().into_inner();
    let listed: Vec<u64> =
        status.cells[0].cell.as_ref().unwrap().replicas.iter().map(|r| r.node_id).collect();
    assert!(listed.contains(&new_id) && !listed.contains(&old_id), "the registry lists {listed:?}");
    // A list that is not the cell's membership (the old replica back in it) is refused, naming it.
    let token = std::fs::read_to_string(dir.join("secrets/admin.token")).unwrap();
    let mut stale = status.cells[0].cell.as_ref().unwrap().replicas.clone();
    let gone = stale.iter().position(|r| r.node_id == new_id).unwrap();
    stale[gone].node_id = old_id;
    let mut request =
        tonic::Request::new(nid_proto::v1::UpdateCellReplicasRequest { cell_id: 1, replicas: stale });
    request.metadata_mut().insert("authorization", format!("Bearer {}", token.trim()).parse().unwrap());
    let err = admin.update_cell_replicas(request).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    let details = String::from_utf8_lossy(err.details()).into_owned();
    assert!(err.message().contains("replicas[") && details.contains("members"), "{err:?}");
    // The control cell's replacement is a compare-and-swap: replicas read before a change are
    // refused (ABORTED), and a cell it does not know is NOT_FOUND, never created.
    let current = status.cells[0].cell.as_ref().unwrap().replicas.clone();
    let mut before = current.clone();
    before.iter_mut().find(|r| r.node_id == new_id).unwrap().node_id = old_id;
    let control = dev.control();
    let on_leader = |cell_id: u64,
                     replicas: Vec<nid_proto::v1::ReplicaInfo>,
                     expected: Vec<nid_proto::v1::ReplicaInfo>| {
        let control = control.clone();
        async move {
            let request = nid_proto::v1::ReplaceCellReplicasRequest { cell_id, replicas, expected };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                for address in &control {
                    let ch = nid_tests::connect(address).await;
                    let r = nid_proto::v1::control_client::ControlClient::new(ch)
                        .replace_cell_replicas(request.clone())
                        .await;
                    match r {
                        Err(e) if e.code() == Code::Unavailable || e.message().contains("leader") => {}
                        other => return other.map(|r| r.into_inner()),
                    }
                }
                assert!(Instant::now() < deadline, "no control leader answered");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let mut moved = current.clone();
    moved[0].address = "127.0.0.1:1".into();
    let stale = on_leader(1, moved.clone(), before).await.unwrap_err();
    assert_eq!(stale.code(), Code::Aborted, "{stale:?}");
    let unknown = on_leader(77, moved, current.clone()).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    let same =
        on_leader(1, current.clone(), current.clone()).await.expect("the same replicas again change nothing");
    assert_eq!(same.table_version, status.table_version, "an unchanged list keeps the table version");
    // Run again, it finds the work done and changes nothing.
    let (ok, said) = replace(old_id, new_id);
    assert!(ok && said.contains("nothing to do"), "{said}");
    // A typo naming a live voter as the replacement is refused before any change.
    let (ok, said) = replace(new_id, replicas[leader].node_id);
    assert!(!ok && said.contains("already had"), "a live voter is no replacement: {said}");

    let status = replicas[leader].status(Duration::from_secs(2)).await.expect("the leader's status");
    let members: Vec<u64> = status.replicas.iter().filter(|r| r.healthy).map(|r| r.node_id).collect();
    assert!(members.contains(&new_id) && !members.contains(&old_id), "members {members:?}");
    // The quorum now counts on the new replica.
    replicas[other].pause();
    for uin in &uins {
        assert_eq!(&read(&mut c, uin).await.uin, uin);
    }
    enroll_many(&mut c, "RID-REPLACE-AFTER", 5).await;
    replicas[other].resume();
    drop(fresh);
    assert!(dev.stop(), "nidctl dev up stops cleanly");
}
