//! The identity domain through the `Cell` service of a real 3-replica in-process cell (real Raft,
//! real RocksDB): enrolment idempotency under concurrency, versioned updates and history, status,
//! VIDs, locks, authentication (order of checks, replay, TOTP reuse, lockout with a moved clock,
//! signatures, partner tokens), the audit chain and its tamper detection, field-named errors, and
//! no plaintext in any file after a flush and a full compaction; and the regressions of the cell's
//! rebuild (canonical enrolment digests, consistent audit reads, cheap unknown identifiers).

use nid_domain::keys::Table;
use nid_domain::totp::code as totp_code;
use nid_proto::error::{FieldViolations, reason_of};
use nid_proto::v1::cell_request::Operation;
use nid_proto::v1::cell_response::Result as CellResult;
use nid_proto::v1::*;
use nid_testkit::identity::{IdentityCluster as Cluster, sample_request};
use prost::Message as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tonic::Code;

const ALL: &[i32] = &[1, 2, 3];

async fn cell() -> Cluster {
    let mut c = Cluster::new(3);
    c.start();
    c.cluster.must_own_all_buckets().await;
    c
}

/// The partner's idea of now (the cell's clock may have been moved forward by a test).
fn now(c: &Cluster) -> prost_types::Timestamp {
    let _ = c;
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
    prost_types::Timestamp { seconds: (ms / 1000) as i64, nanos: 0 }
}

fn shifted(c: &Cluster, by: Duration) -> prost_types::Timestamp {
    let mut t = now(c);
    t.seconds += by.as_secs() as i64;
    t
}

async fn enroll(c: &Cluster, req: EnrollRequest) -> EnrollResponse {
    match c.execute(Operation::Enroll(req), None).await.expect("enrol") {
        CellResult::Enroll(r) => r,
        other => panic!("{other:?}"),
    }
}

async fn enroll_full(c: &Cluster, rid: &str) -> (String, Vec<u8>) {
    let mut req = sample_request(rid);
    req.pin = "2468".into();
    req.provision_totp = true;
    let r = enroll(c, req).await;
    (r.uin, r.totp_secret)
}

fn auth_request(id: &str, txn: &str, time: prost_types::Timestamp, factors: AuthFactors) -> Operation {
    Operation::Authenticate(AuthenticateRequest {
        id: id.into(),
        transaction_id: txn.into(),
        request_time: Some(time),
        factors: Some(factors),
    })
}

fn pin(p: &str) -> AuthFactors {
    AuthFactors { pin: p.into(), ..Default::default() }
}

async fn authenticate(c: &Cluster, partner: &str, op: Operation) -> AuthenticateResponse {
    match c.execute(op, Some((partner, ALL))).await.expect("authenticate") {
        CellResult::Authenticate(r) => r,
        other => panic!("{other:?}"),
    }
}

fn reasons(r: &AuthenticateResponse) -> Vec<AuthReason> {
    r.decision.as_ref().unwrap().reasons.iter().map(|&x| AuthReason::try_from(x).unwrap()).collect()
}

fn fields(status: &tonic::Status) -> Vec<String> {
    FieldViolations::from_status(status).violations().iter().map(|(f, _)| f.clone()).collect()
}

async fn get(c: &Cluster, id: &str) -> Result<Identity, tonic::Status> {
    match c.execute(Operation::GetIdentity(GetIdentityRequest { id: id.into() }), None).await? {
        CellResult::GetIdentity(r) => Ok(r.identity.unwrap()),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rid_retried_ten_times_concurrently_yields_one_uin() {
    let c = cell().await;
    let mut req = sample_request("RID-CONCURRENT");
    req.provision_totp = true;
    let results = futures_join_all((0..10).map(|_| enroll(&c, req.clone()))).await;
    let uins: std::collections::HashSet<_> = results.iter().map(|r| r.uin.clone()).collect();
    assert_eq!(uins.len(), 1, "one RID, one UIN");
    assert_eq!(results.iter().filter(|r| r.created).count(), 1, "exactly one call created it");
    assert!(results.iter().all(|r| r.totp_secret == results[0].totp_secret), "every retry gets the secret");
    let mut other = req.clone();
    other.demographics.as_mut().unwrap().full_name = "Someone Else".into();
    let err = c.execute(Operation::Enroll(other), None).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(reason_of(&err).as_deref(), Some("RID_CONFLICT"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_retrying_the_creating_call_still_hears_created() {
    let c = cell().await;
    let req = sample_request("RID-ROUTED");
    let routed = |id: &'static str| {
        let op = Operation::Enroll(req.clone());
        let c = &c;
        async move {
            match c.execute_routed(op, None, Some(id)).await.expect("enrol") {
                CellResult::Enroll(r) => r,
                other => panic!("{other:?}"),
            }
        }
    };
    let first = routed("call-1").await;
    assert!(first.created);
    // The router's retry of that same call (same route id): created, same UIN.
    let retry = routed("call-1").await;
    assert!(retry.created, "a retry of the creating call is told it created the identity");
    assert_eq!(retry.uin, first.uin);
    // Another call (another id, or none): not created, same UIN.
    let other = routed("call-2").await;
    assert!(!other.created);
    assert_eq!(other.uin, first.uin);
    let bare = enroll(&c, req.clone()).await;
    assert!(!bare.created);
    assert_eq!(bare.uin, first.uin);
}

/// Runs the futures concurrently on this task and collects their outputs in order.
async fn futures_join_all<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut pinned: Vec<_> = futures.map(Box::pin).collect();
    let mut done: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in pinned.iter_mut().enumerate() {
            if done[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => done[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
    })
    .await;
    done.into_iter().map(|d| d.unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_need_the_current_version_and_every_version_is_kept() {
    let c = cell().await;
    let uin = enroll(&c, sample_request("RID-UPD")).await.uin;
    let update = |expected: u64, name: &str| {
        let mut d = sample_request("x").demographics.unwrap();
        d.full_name = name.into();
        Operation::UpdateIdentity(UpdateIdentityRequest {
            uin: uin.clone(),
            expected_version: expected,
            demographics: Some(d),
            biometrics: vec![],
            request_id: String::new(),
        })
    };
    match c.execute(update(1, "Asha Renamed"), None).await.unwrap() {
        CellResult::UpdateIdentity(r) => assert_eq!(r.version, 2),
        other => panic!("{other:?}"),
    }
    let stale = c.execute(update(1, "Lost Update"), None).await.unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);
    assert_eq!(reason_of(&stale).as_deref(), Some("VERSION_MISMATCH"));
    assert!(stale.message().contains("current version is 2"));
    let current = get(&c, &uin).await.unwrap();
    assert_eq!(current.version, 2);
    assert_eq!(current.demographics.unwrap().full_name, "Asha Renamed");

    let set = Operation::SetStatus(SetStatusRequest {
        uin: uin.clone(),
        status: IdentityStatus::Blocked as i32,
        reason: "court order".into(),
        request_id: String::new(),
    });
    match c.execute(set, None).await.unwrap() {
        CellResult::SetStatus(r) => assert_eq!(r.version, 3),
        other => panic!("{other:?}"),
    }
    let history = |from: u64, limit: u32| {
        Operation::GetHistory(GetHistoryRequest { uin: uin.clone(), from_version: from, limit })
    };
    let CellResult::GetHistory(page) = c.execute(history(0, 2), None).await.unwrap() else { panic!() };
    let names: Vec<_> =
        page.versions.iter().map(|v| v.demographics.as_ref().unwrap().full_name.clone()).collect();
    assert_eq!(names, vec!["Asha Example", "Asha Renamed"]);
    assert_eq!(page.next_version, 3);
    let CellResult::GetHistory(rest) = c.execute(history(3, 2), None).await.unwrap() else { panic!() };
    assert_eq!(rest.versions.len(), 1);
    assert_eq!(rest.versions[0].status, IdentityStatus::Blocked as i32);
    assert_eq!(rest.next_version, 0);

    // DEACTIVATED is final.
    for (status, ok) in [(IdentityStatus::Deactivated, true), (IdentityStatus::Activated, false)] {
        let op = Operation::SetStatus(SetStatusRequest {
            uin: uin.clone(),
            status: status as i32,
            reason: "r".into(),
            request_id: String::new(),
        });
        let r = c.execute(op, None).await;
        assert_eq!(r.is_ok(), ok, "{status:?}: {r:?}");
        if let Err(e) = r {
            assert_eq!(e.code(), Code::FailedPrecondition);
        }
    }
    let e = c.execute(update(4, "After Death"), None).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vids_resolve_while_usable_and_one_perpetual_is_active() {
    let c = cell().await;
    let uin = enroll(&c, sample_request("RID-VID")).await.uin;
    let create = |kind: VidKind, expires: Option<prost_types::Timestamp>, max_uses: u32| {
        Operation::CreateVid(CreateVidRequest {
            uin: uin.clone(),
            kind: kind as i32,
            expires_at: expires,
            max_uses,
            request_id: String::new(),
        })
    };
    let CellResult::CreateVid(first) = c.execute(create(VidKind::Perpetual, None, 0), None).await.unwrap()
    else {
        panic!()
    };
    let first = first.vid.unwrap().vid;
    assert_eq!(first.len(), 16);
    assert_eq!(get(&c, &first).await.unwrap().uin, uin, "a VID reads its identity");
    let CellResult::CreateVid(second) = c.execute(create(VidKind::Perpetual, None, 0), None).await.unwrap()
    else {
        panic!()
    };
    let second = second.vid.unwrap().vid;
    assert_eq!(get(&c, &first).await.unwrap_err().code(), Code::NotFound, "replaced perpetual VID stops");
    assert_eq!(get(&c, &second).await.unwrap().uin, uin);
    c.execute(
        Operation::RevokeVid(RevokeVidRequest { vid: second.clone(), request_id: String::new() }),
        None,
    )
    .await
    .unwrap();
    assert_eq!(get(&c, &second).await.unwrap_err().code(), Code::NotFound, "revoked VID stops at once");
    let vids = get(&c, &uin).await.unwrap().vids;
    assert_eq!(vids.len(), 2);
    assert!(vids.iter().all(|v| v.revoked));

    // A temporary VID with one use: the first authentication spends it.
    let one_use = create(VidKind::Temporary, Some(shifted(&c, Duration::from_secs(3600))), 1);
    let CellResult::CreateVid(temp) = c.execute(one_use, None).await.unwrap() else { panic!() };
    let temp = temp.vid.unwrap();
    assert_eq!(temp.uses_left, 1);
    let demo = AuthFactors {
        demographic: Some(DemographicFactor { full_name: "Asha Example".into(), ..Default::default() }),
        ..Default::default()
    };
    let t1 = now(&c);
    let yes = authenticate(&c, "bank-a", auth_request(&temp.vid, "T-1", t1, demo.clone())).await;
    assert!(yes.decision.as_ref().unwrap().authenticated, "{:?}", reasons(&yes));
    let retry = authenticate(&c, "bank-a", auth_request(&temp.vid, "T-1", t1, demo.clone())).await;
    assert_eq!(retry, yes, "a retry gets its answer even though the one use is spent");
    // The same transaction through another VID of the same person, or through the UIN, is not
    // the same request.
    let another = create(VidKind::Temporary, Some(shifted(&c, Duration::from_secs(3600))), 0);
    let CellResult::CreateVid(other) = c.execute(another, None).await.unwrap() else { panic!() };
    let other = other.vid.unwrap().vid;
    for id in [&other, &uin] {
        let replay = authenticate(&c, "bank-a", auth_request(id, "T-1", t1, demo.clone())).await;
        assert_eq!(reasons(&replay), vec![AuthReason::ReplayedTransaction], "{id}");
    }
    let no = authenticate(&c, "bank-a", auth_request(&temp.vid, "T-2", now(&c), demo)).await;
    assert_eq!(reasons(&no), vec![AuthReason::VidUnusable]);

    let too_far = create(VidKind::Temporary, Some(shifted(&c, Duration::from_secs(31 * 86400))), 0);
    assert_eq!(fields(&c.execute(too_far, None).await.unwrap_err()), vec!["expires_at"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_checks_status_locks_replay_skew_and_factors() {
    let c = cell().await;
    let (uin, totp_secret) = enroll_full(&c, "RID-AUTH").await;
    let t = now(&c);

    let yes = authenticate(&c, "bank-a", auth_request(&uin, "A-1", t, pin("2468"))).await;
    assert!(yes.decision.as_ref().unwrap().authenticated);
    // A retry of the very same request gets the very same signed answer, not a second decision.
    let retry = authenticate(&c, "bank-a", auth_request(&uin, "A-1", t, pin("2468"))).await;
    assert_eq!(retry, yes, "a retry is answered with the stored decision, byte for byte");
    // The same transaction id with anything else is a replay.
    let replay = authenticate(&c, "bank-a", auth_request(&uin, "A-1", t, pin("1357"))).await;
    assert_eq!(reasons(&replay), vec![AuthReason::ReplayedTransaction]);
    let later = shifted(&c, Duration::from_secs(1));
    let replay = authenticate(&c, "bank-a", auth_request(&uin, "A-1", later, pin("2468"))).await;
    assert_eq!(
        reasons(&replay),
        vec![AuthReason::ReplayedTransaction],
        "another request time is another request"
    );
    let other_partner = authenticate(&c, "bank-b", auth_request(&uin, "A-1", t, pin("2468"))).await;
    assert!(other_partner.decision.as_ref().unwrap().authenticated, "transaction ids are per partner");

    let expired = authenticate(
        &c,
        "bank-a",
        auth_request(&uin, "A-2", shifted(&c, Duration::from_secs(600)), pin("2468")),
    )
    .await;
    assert_eq!(reasons(&expired), vec![AuthReason::RequestExpired]);

    // TOTP: a fresh code is accepted once, never twice.
    let step = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() / 30;
    let code = format!("{:06}", totp_code(&totp_secret, step));
    let totp = AuthFactors { totp: code.clone(), ..Default::default() };
    let ok = authenticate(&c, "bank-a", auth_request(&uin, "A-3", now(&c), totp.clone())).await;
    assert!(ok.decision.as_ref().unwrap().authenticated, "{:?}", reasons(&ok));
    let reused = authenticate(&c, "bank-a", auth_request(&uin, "A-4", now(&c), totp)).await;
    assert_eq!(reasons(&reused), vec![AuthReason::TotpMismatch]);

    // Demographics: EXACT vs NORMALIZED, and several bad factors reported together.
    let demo = |name: &str, mode: MatchMode| AuthFactors {
        demographic: Some(DemographicFactor {
            full_name: name.into(),
            date_of_birth: "1988-07-14".into(),
            match_mode: mode as i32,
            ..Default::default()
        }),
        ..Default::default()
    };
    let exact = authenticate(
        &c,
        "bank-a",
        auth_request(&uin, "A-5", now(&c), demo(" ASHA  example", MatchMode::Exact)),
    )
    .await;
    assert_eq!(reasons(&exact), vec![AuthReason::DemographicMismatch]);
    let normalized = authenticate(
        &c,
        "bank-a",
        auth_request(&uin, "A-6", now(&c), demo(" ASHA  example", MatchMode::Normalized)),
    )
    .await;
    assert!(normalized.decision.as_ref().unwrap().authenticated);
    let mut both = demo("Nobody", MatchMode::Exact);
    both.pin = "1111".into();
    let two = authenticate(&c, "bank-a", auth_request(&uin, "A-7", now(&c), both)).await;
    assert_eq!(reasons(&two), vec![AuthReason::DemographicMismatch, AuthReason::PinMismatch]);

    // A partner may only use its granted factors.
    let limited = match c
        .execute(auth_request(&uin, "A-8", now(&c), pin("2468")), Some(("kiosk", &[1])))
        .await
        .unwrap()
    {
        CellResult::Authenticate(r) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!(reasons(&limited), vec![AuthReason::FactorNotAllowed]);

    // Locked auth type, then unlocked.
    let lock = Operation::LockAuthTypes(LockAuthTypesRequest {
        id: uin.clone(),
        lock: vec![AuthLock { auth_type: AuthType::Pin as i32, until: None }],
        unlock: vec![],
        request_id: String::new(),
    });
    c.execute(lock, None).await.unwrap();
    let locked = authenticate(&c, "bank-a", auth_request(&uin, "A-9", now(&c), pin("2468"))).await;
    assert_eq!(reasons(&locked), vec![AuthReason::AuthTypeLocked]);
    let unlock = Operation::LockAuthTypes(LockAuthTypesRequest {
        id: uin.clone(),
        lock: vec![],
        unlock: vec![2],
        request_id: String::new(),
    });
    let CellResult::LockAuthTypes(l) = c.execute(unlock, None).await.unwrap() else { panic!() };
    assert!(l.locks.is_empty());

    // Blocked identities cannot authenticate; unknown ids get a signed no.
    let block = Operation::SetStatus(SetStatusRequest {
        uin: uin.clone(),
        status: IdentityStatus::Blocked as i32,
        reason: "investigation".into(),
        request_id: String::new(),
    });
    c.execute(block, None).await.unwrap();
    let blocked = authenticate(&c, "bank-a", auth_request(&uin, "A-10", now(&c), pin("2468"))).await;
    assert_eq!(reasons(&blocked), vec![AuthReason::IdentityBlocked]);
    let gone =
        authenticate(&c, "bank-a", auth_request(&uin_not_enrolled(&c).await, "A-11", now(&c), pin("2468")))
            .await;
    assert_eq!(reasons(&gone), vec![AuthReason::UnknownId]);
}

async fn uin_not_enrolled(c: &Cluster) -> String {
    let scheme = nid_proto::ids::IdScheme::dev();
    let bucket = nid_proto::bucket::BucketId::new(4242).unwrap();
    let mut n = 7u64;
    let uin = scheme
        .generate(nid_proto::ids::IdKind::Uin, bucket, &mut || {
            n = n.wrapping_mul(6364136223846793005).wrapping_add(1);
            Ok(n)
        })
        .unwrap()
        .to_digits();
    assert_eq!(get(c, &uin).await.unwrap_err().code(), Code::NotFound);
    uin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consecutive_failures_lock_auth_until_the_cooldown_passes() {
    let mut c = Cluster::new(3);
    c.policy.max_failures = 3;
    c.policy.cooldown_ms = 10 * 60 * 1000;
    c.start();
    c.cluster.must_own_all_buckets().await;
    let (uin, _) = enroll_full(&c, "RID-LOCKOUT").await;
    for i in 0..3 {
        let r = authenticate(&c, "bank-a", auth_request(&uin, &format!("L-{i}"), now(&c), pin("0000"))).await;
        assert_eq!(reasons(&r), vec![AuthReason::PinMismatch]);
    }
    let locked = authenticate(&c, "bank-a", auth_request(&uin, "L-ok", now(&c), pin("2468"))).await;
    assert_eq!(reasons(&locked), vec![AuthReason::TooManyFailures], "the right PIN is refused while locked");
    c.clock.advance(9 * 60 * 1000);
    let still = authenticate(
        &c,
        "bank-a",
        auth_request(&uin, "L-ok2", shifted(&c, Duration::from_secs(540)), pin("2468")),
    )
    .await;
    assert_eq!(reasons(&still), vec![AuthReason::TooManyFailures]);
    c.clock.advance(2 * 60 * 1000);
    let released = authenticate(
        &c,
        "bank-a",
        auth_request(&uin, "L-ok3", shifted(&c, Duration::from_secs(660)), pin("2468")),
    )
    .await;
    assert!(released.decision.as_ref().unwrap().authenticated, "{:?}", reasons(&released));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_are_signed_tokens_are_per_partner_and_the_audit_chain_detects_tampering() {
    use ring::signature::{ED25519, UnparsedPublicKey};
    let c = cell().await;
    let (uin, _) = enroll_full(&c, "RID-SIGN").await;
    let a1 = authenticate(&c, "bank-a", auth_request(&uin, "S-1", now(&c), pin("2468"))).await;
    let a2 = authenticate(&c, "bank-a", auth_request(&uin, "S-2", now(&c), pin("2468"))).await;
    let b1 = authenticate(&c, "bank-b", auth_request(&uin, "S-1", now(&c), pin("2468"))).await;
    let no = authenticate(&c, "bank-a", auth_request(&uin, "S-3", now(&c), pin("9999"))).await;

    // Signature: verifies with the published key, fails after one byte changes.
    let keys = c.cell(1).signing_keys();
    let key = keys.keys.iter().find(|k| k.key_id == a1.key_id).expect("published key");
    let public = UnparsedPublicKey::new(&ED25519, key.public_key.clone());
    for r in [&a1, &a2, &b1, &no] {
        public.verify(&r.signed_decision, &r.signature).expect("signature verifies");
        let decoded = AuthDecision::decode(r.signed_decision.as_slice()).unwrap();
        assert_eq!(Some(&decoded), r.decision.as_ref(), "the signed bytes are the decision");
        let mut changed = r.signed_decision.clone();
        changed[3] ^= 1;
        assert!(public.verify(&changed, &r.signature).is_err());
    }
    let token = |r: &AuthenticateResponse| r.decision.as_ref().unwrap().partner_token.clone();
    assert_eq!(token(&a1), token(&a2), "stable per partner");
    assert_ne!(token(&a1), token(&b1), "two partners get unrelated tokens");
    assert!(!token(&a1).contains(&uin));
    assert_eq!(token(&no), "", "a no carries no token");

    // History: newest first, paged.
    let hist = |page_token: String| {
        Operation::GetAuthHistory(GetAuthHistoryRequest { id: uin.clone(), page_token, limit: 3 })
    };
    let CellResult::GetAuthHistory(p1) = c.execute(hist(String::new()), None).await.unwrap() else {
        panic!()
    };
    let txns: Vec<_> =
        p1.records.iter().map(|r| (r.partner_id.as_str(), r.transaction_id.as_str())).collect();
    assert_eq!(txns, vec![("bank-a", "S-3"), ("bank-b", "S-1"), ("bank-a", "S-2")]);
    assert!(!p1.records[0].authenticated);
    let CellResult::GetAuthHistory(p2) = c.execute(hist(p1.next_page_token.clone()), None).await.unwrap()
    else {
        panic!()
    };
    assert_eq!(p2.records.len(), 1);
    assert_eq!(p2.next_page_token, "");

    let verify = || Operation::VerifyAuditChain(VerifyAuditChainRequest { uin: uin.clone() });
    let CellResult::VerifyAuditChain(ok) = c.execute(verify(), None).await.unwrap() else { panic!() };
    assert_eq!((ok.intact, ok.records, ok.first_broken), (true, 4, 0));

    // Tamper: flip one byte of the 2nd audit record as stored on every replica.
    for id in c.cluster.running_ids() {
        let db = c.cluster.node(id).db().clone();
        let data = db.cf_handle("data").unwrap();
        let audit: Vec<_> = db
            .iterator_cf(data, rocksdb::IteratorMode::Start)
            .map(|kv| kv.unwrap())
            .filter(|(k, _)| k.len() == 43 && k[2] == 5)
            .collect();
        assert_eq!(audit.len(), 4);
        let (key, value) = &audit[1];
        let mut bad = value.to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        db.put_cf(data, key, bad).unwrap();
    }
    let CellResult::VerifyAuditChain(broken) = c.execute(verify(), None).await.unwrap() else { panic!() };
    assert_eq!((broken.intact, broken.first_broken), (false, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_malformed_request_gets_invalid_argument_naming_the_field() {
    let c = cell().await;
    let uin = enroll(&c, sample_request("RID-BAD")).await.uin;
    let cases: Vec<(Operation, Vec<&str>)> = vec![
        (Operation::GetIdentity(GetIdentityRequest { id: "12345".into() }), vec![]),
        (
            Operation::UpdateIdentity(UpdateIdentityRequest {
                uin: uin.clone(),
                expected_version: 0,
                demographics: Some(Demographics {
                    full_name: String::new(),
                    date_of_birth: "2001-02-29".into(),
                    gender: 9,
                    phone: "555".into(),
                    email: "no-at-sign".into(),
                    ..Default::default()
                }),
                biometrics: vec![BiometricReference {
                    modality: 0,
                    template_digest: vec![1; 3],
                    ..Default::default()
                }],
                request_id: String::new(),
            }),
            vec![
                "expected_version",
                "demographics.full_name",
                "demographics.date_of_birth",
                "demographics.gender",
                "demographics.phone",
                "demographics.email",
                "biometrics[0].modality",
                "biometrics[0].template_digest",
            ],
        ),
        (
            Operation::SetStatus(SetStatusRequest {
                uin: uin.clone(),
                status: 0,
                reason: String::new(),
                request_id: String::new(),
            }),
            vec!["status", "reason"],
        ),
        (
            Operation::CreateVid(CreateVidRequest {
                uin: uin.clone(),
                kind: 0,
                expires_at: None,
                max_uses: 0,
                request_id: String::new(),
            }),
            vec!["kind"],
        ),
        (
            Operation::CreateVid(CreateVidRequest {
                uin: uin.clone(),
                kind: VidKind::Temporary as i32,
                expires_at: None,
                max_uses: 101,
                request_id: String::new(),
            }),
            vec!["expires_at", "max_uses"],
        ),
        (Operation::RevokeVid(RevokeVidRequest { vid: uin.clone(), request_id: String::new() }), vec![]),
        (
            Operation::LockAuthTypes(LockAuthTypesRequest {
                id: uin.clone(),
                lock: vec![AuthLock {
                    auth_type: 7,
                    until: Some(prost_types::Timestamp { seconds: 5, nanos: 0 }),
                }],
                unlock: vec![0],
                request_id: String::new(),
            }),
            vec!["lock[0].auth_type", "lock[0].until", "unlock[0]"],
        ),
        (
            Operation::GetHistory(GetHistoryRequest { uin: uin.clone(), from_version: 0, limit: 501 }),
            vec!["limit"],
        ),
        (
            Operation::GetAuthHistory(GetAuthHistoryRequest {
                id: uin.clone(),
                page_token: "zz".into(),
                limit: 0,
            }),
            vec!["page_token"],
        ),
    ];
    for (op, want) in cases {
        let err = c.execute(op.clone(), None).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{op:?}");
        if want.is_empty() {
            assert_eq!(reason_of(&err).as_deref(), Some("INVALID_IDENTIFIER"), "{op:?}");
        } else {
            assert_eq!(fields(&err), want, "{op:?}");
        }
        assert!(!err.message().contains(&uin), "errors never quote identifiers");
    }
    let bad_auth = Operation::Authenticate(AuthenticateRequest {
        id: uin.clone(),
        transaction_id: "has space".into(),
        request_time: None,
        factors: Some(AuthFactors {
            demographic: Some(DemographicFactor { date_of_birth: "1999-13-01".into(), ..Default::default() }),
            pin: "12".into(),
            totp: "abcdef".into(),
        }),
    });
    let err = c.execute(bad_auth, Some(("bank-a", ALL))).await.unwrap_err();
    assert_eq!(
        fields(&err),
        vec![
            "transaction_id",
            "request_time",
            "factors.demographic.date_of_birth",
            "factors.pin",
            "factors.totp"
        ]
    );
    let no_partner = c.execute(auth_request(&uin, "X", now(&c), pin("2468")), None).await.unwrap_err();
    assert_eq!(no_partner.code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_flush_and_compaction_no_file_holds_a_name_identifier_or_secret() {
    // As long as PINs go, and found only standing alone (see `plaintext::contains`).
    const PIN: &str = "86420975";
    let c = cell().await;
    let mut needles: Vec<Vec<u8>> = Vec::new();
    for i in 0..20 {
        let name = format!("Tlalocan Vwxyzabcdef{i:02}");
        let rid = format!("RID-COMPACT-{i:03}");
        let mut req = sample_request(&rid);
        req.demographics.as_mut().unwrap().full_name = name.clone();
        req.demographics.as_mut().unwrap().email = "tlaloc@example.net".into();
        req.pin = PIN.into();
        let uin = enroll(&c, req).await.uin;
        let op = Operation::CreateVid(CreateVidRequest {
            uin: uin.clone(),
            kind: VidKind::Perpetual as i32,
            expires_at: None,
            max_uses: 0,
            request_id: String::new(),
        });
        let CellResult::CreateVid(v) = c.execute(op, None).await.unwrap() else { panic!() };
        let demo = AuthFactors {
            demographic: Some(DemographicFactor { full_name: name.clone(), ..Default::default() }),
            pin: PIN.into(),
            ..Default::default()
        };
        let r = authenticate(&c, "bank-a", auth_request(&uin, &format!("P-{i}"), now(&c), demo)).await;
        assert!(r.decision.unwrap().authenticated);
        needles.extend([
            name.into_bytes(),
            rid.into_bytes(),
            uin.into_bytes(),
            v.vid.unwrap().vid.into_bytes(),
        ]);
    }
    needles.extend([b"tlaloc@example.net".to_vec(), PIN.as_bytes().to_vec(), b"1988-07-14".to_vec()]);
    for id in c.cluster.running_ids() {
        let db = c.cluster.node(id).db().clone();
        for name in ["raft", "meta", "data"] {
            let cf = db.cf_handle(name).unwrap();
            db.flush_cf(cf).unwrap();
            db.compact_range_cf(cf, None::<&[u8]>, None::<&[u8]>);
        }
    }
    let (files, hits) = nid_support::plaintext::scan(c.cluster.data_root(), &needles);
    assert!(files > 10, "the scan reads the replicas' files");
    assert!(hits.is_empty(), "plaintext at rest:\n{}", hits.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_see_every_acknowledged_change_across_a_leader_change() {
    let mut c = cell().await;
    let (uin, _) = enroll_full(&c, "RID-LINEAR").await;
    let bad = |txn: &str| {
        let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        auth_request(&uin, txn, prost_types::Timestamp { seconds: t as i64, nanos: 0 }, pin("0000"))
    };
    let first = bad("F-0");
    let first_answer = authenticate(&c, "bank-a", first.clone()).await;
    for i in 1..4 {
        authenticate(&c, "bank-a", bad(&format!("F-{i}"))).await;
    }
    let lock = Operation::LockAuthTypes(LockAuthTypesRequest {
        id: uin.clone(),
        lock: vec![AuthLock { auth_type: AuthType::Demographic as i32, until: None }],
        unlock: vec![],
        request_id: String::new(),
    });
    c.execute(lock, None).await.unwrap();
    let old = tokio::task::block_in_place(|| c.cluster.must_leader());
    c.cluster.stop_node(old);
    // The new leader knows the lock, the failure count (one more failure locks) and the seen
    // transaction ids: nothing acknowledged by the old leader is lost or stale.
    let demo = AuthFactors {
        demographic: Some(DemographicFactor { full_name: "Asha Example".into(), ..Default::default() }),
        ..Default::default()
    };
    let locked = authenticate(&c, "bank-a", auth_request(&uin, "N-1", now(&c), demo)).await;
    assert_eq!(reasons(&locked), vec![AuthReason::AuthTypeLocked]);
    let replay = authenticate(&c, "bank-a", auth_request(&uin, "F-0", now(&c), pin("1111"))).await;
    assert_eq!(reasons(&replay), vec![AuthReason::ReplayedTransaction]);
    // A client retrying the old leader's decision through the new one gets that decision again: no
    // second audit entry, and it does not count as a fifth failure.
    let retried = authenticate(&c, "bank-a", first).await;
    assert_eq!(retried, first_answer, "the stored decision survives the leader change");
    authenticate(&c, "bank-a", bad("F-4")).await;
    let lockout = authenticate(&c, "bank-a", auth_request(&uin, "N-2", now(&c), pin("2468"))).await;
    assert_eq!(reasons(&lockout), vec![AuthReason::TooManyFailures], "the fifth failure counted");
    let CellResult::GetAuthHistory(h) = c
        .execute(
            Operation::GetAuthHistory(GetAuthHistoryRequest {
                id: uin.clone(),
                page_token: String::new(),
                limit: 0,
            }),
            None,
        )
        .await
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(h.records.len(), 8, "every decision, on both leaders, is in the trail, and retries are not");
    let CellResult::VerifyAuditChain(v) = c
        .execute(Operation::VerifyAuditChain(VerifyAuditChainRequest { uin: uin.clone() }), None)
        .await
        .unwrap()
    else {
        panic!()
    };
    assert!(v.intact);
    c.cluster.run_node(old);
}

/// One full pass of replay-marker sweeps over every bucket through the current leader, `limit`
/// markers per command; the markers deleted.
async fn sweep_pass(c: &Cluster, limit: u32) -> u64 {
    let (mut first, mut total) = (0u32, 0u64);
    loop {
        let cell = c.cell(tokio::task::block_in_place(|| c.cluster.must_leader()));
        let (deleted, next) = cell.sweep(first, limit).await.expect("sweep");
        total += deleted;
        if next < first {
            return total;
        }
        first = next;
    }
}

/// Every key and value of a replica's `data` CF once it has applied what the leader has.
fn data_of(c: &Cluster, id: u64) -> Vec<(Vec<u8>, Vec<u8>)> {
    let leader = c.cluster.must_leader();
    tokio::task::block_in_place(|| c.cluster.must_applied(id, c.cluster.status(leader).applied));
    let db = c.cluster.node(id).db().clone();
    let cf = db.cf_handle(nid_engine::keys::CF_DATA).unwrap();
    db.iterator_cf(cf, rocksdb::IteratorMode::Start)
        .map(|kv| kv.unwrap())
        .map(|(k, v)| (k.to_vec(), v.to_vec()))
        .collect()
}

fn count_table(data: &[(Vec<u8>, Vec<u8>)], table: Table) -> usize {
    data.iter().filter(|(k, _)| k.len() > 2 && k[2] == table as u8 && k[0] < 0x40).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_markers_are_swept_past_the_replay_window_and_kept_inside_it() {
    let c = cell().await;
    let (uin, _) = enroll_full(&c, "RID-SWEEP").await;
    let t = now(&c);
    let mut first_answer = None;
    for i in 0..5 {
        let r = authenticate(&c, "bank-a", auth_request(&uin, &format!("S-{i}"), t, pin("2468"))).await;
        assert!(r.decision.as_ref().unwrap().authenticated);
        first_answer.get_or_insert(r);
    }
    let leader = c.cluster.must_leader();
    let data = data_of(&c, leader);
    assert_eq!((count_table(&data, Table::Txn), count_table(&data, Table::TxnByTime)), (5, 5));

    // Inside the window nothing goes, and a retry still gets its answer.
    assert_eq!(sweep_pass(&c, 2).await, 0);
    let retry = authenticate(&c, "bank-a", auth_request(&uin, "S-0", t, pin("2468"))).await;
    assert_eq!(Some(retry), first_answer, "a retry inside the window gets the stored answer");

    // Past the window: a marker made just now stays, the five old ones go, two per command.
    let window = c.cell(leader).replay_window_ms();
    c.clock.advance(window as i64 + 1_000);
    let later = shifted(&c, Duration::from_millis(window + 1_000));
    let young = authenticate(&c, "bank-a", auth_request(&uin, "S-young", later, pin("2468"))).await;
    assert!(young.decision.as_ref().unwrap().authenticated);
    assert_eq!(sweep_pass(&c, 2).await, 5);
    assert_eq!(sweep_pass(&c, 2).await, 0, "a second pass finds nothing");
    let again = authenticate(&c, "bank-a", auth_request(&uin, "S-young", later, pin("2468"))).await;
    assert_eq!(again, young, "the young marker survived the sweep");
    let leader = c.cluster.must_leader();
    let data = data_of(&c, leader);
    assert_eq!((count_table(&data, Table::Txn), count_table(&data, Table::TxnByTime)), (1, 1));
    // Every replica forgot exactly the same markers.
    for id in c.cluster.running_ids() {
        assert!(data_of(&c, id) == data, "replica {id} differs from the leader after the sweep");
    }
    // Once forgotten, the transaction id may be used again (an old request with it is expired).
    let reused = authenticate(&c, "bank-a", auth_request(&uin, "S-0", later, pin("2468"))).await;
    assert!(reused.decision.as_ref().unwrap().authenticated, "{:?}", reasons(&reused));
    let replayed = authenticate(&c, "bank-a", auth_request(&uin, "S-1", t, pin("2468"))).await;
    assert_eq!(reasons(&replayed), vec![AuthReason::RequestExpired]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrolment_with_extension_attributes_retried_is_the_same_enrolment() {
    // The idempotency digest is taken over a canonical encoding: a retry whose extension map
    // iterates in another order (every HashMap has its own) is the same payload, not a conflict.
    let c = cell().await;
    let request = |rotation: usize| {
        let mut names: Vec<String> = (0..8).map(|i| format!("attr_{i}")).collect();
        names.rotate_left(rotation % 8);
        let mut req = sample_request("RID-EXTENSIONS");
        req.demographics.as_mut().unwrap().extensions =
            names.into_iter().map(|n| (n.clone(), n.repeat(2))).collect::<std::collections::HashMap<_, _>>();
        req
    };
    let first = enroll(&c, request(0)).await;
    assert!(first.created);
    for rotation in 1..24 {
        let again = enroll(&c, request(rotation)).await;
        assert_eq!((again.uin.as_str(), again.created), (first.uin.as_str(), false), "retry {rotation}");
    }
    let mut other = request(0);
    other.demographics.as_mut().unwrap().extensions.insert("attr_0".into(), "changed".into());
    let err = c.execute(Operation::Enroll(other), None).await.unwrap_err();
    assert_eq!(reason_of(&err).as_deref(), Some("RID_CONFLICT"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_chain_verifies_intact_while_authentications_run() {
    // The chain and the head it must end at are read from one view: a verification racing
    // authentications never sees a record without its head or a head without its record.
    let c = cell().await;
    let (uin, _) = enroll_full(&c, "RID-AUDIT-RACE").await;
    let auths = async {
        for i in 0..120 {
            authenticate(&c, "bank-a", auth_request(&uin, &format!("R-{i}"), now(&c), pin("2468"))).await;
        }
    };
    let verifies = async {
        let mut checked = 0;
        for _ in 0..120 {
            let op = Operation::VerifyAuditChain(VerifyAuditChainRequest { uin: uin.clone() });
            let CellResult::VerifyAuditChain(v) = c.execute(op, None).await.unwrap() else { panic!() };
            assert!(v.intact, "an intact chain was reported broken at {}", v.first_broken);
            checked += 1;
            tokio::task::yield_now().await;
        }
        checked
    };
    let ((), checked) = tokio::join!(auths, verifies);
    assert_eq!(checked, 120);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_identifier_is_answered_no_without_a_raft_write() {
    let c = cell().await;
    let unknown = uin_not_enrolled(&c).await;
    let leader = tokio::task::block_in_place(|| c.cluster.must_leader());
    let applied = c.cluster.status(leader).applied;
    let committed = c.cluster.node(leader).metrics().proposals_committed.get();
    let r = authenticate(&c, "bank-a", auth_request(&unknown, "U-1", now(&c), pin("2468"))).await;
    assert_eq!(reasons(&r), vec![AuthReason::UnknownId]);
    assert!(!r.decision.as_ref().unwrap().authenticated);
    let leader_now = tokio::task::block_in_place(|| c.cluster.must_leader());
    assert_eq!(leader_now, leader);
    assert_eq!(c.cluster.status(leader).applied, applied, "no entry was written for it");
    assert_eq!(c.cluster.node(leader).metrics().proposals_committed.get(), committed);
    assert_eq!(c.metrics(leader).auth_unknown.with_label_values(&["bank-a"]).get(), 1, "counted per partner");
    // Still a signed answer.
    use ring::signature::{ED25519, UnparsedPublicKey};
    let keys = c.cell(leader).signing_keys();
    let key = keys.keys.iter().find(|k| k.key_id == r.key_id).unwrap();
    UnparsedPublicKey::new(&ED25519, key.public_key.clone())
        .verify(&r.signed_decision, &r.signature)
        .unwrap();
    // A partner not allowed the factor is told so, unknown identity or not.
    let limited =
        match c.execute(auth_request(&unknown, "U-2", now(&c), pin("2468")), Some(("kiosk", &[1]))).await {
            Ok(CellResult::Authenticate(r)) => r,
            other => panic!("{other:?}"),
        };
    assert_eq!(reasons(&limited), vec![AuthReason::FactorNotAllowed]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_uin_never_names_two_people() {
    use nid_domain::commands::{Command, command};
    use nid_domain::outcome::Rejection;
    use nid_domain::prepare::{self, Sealer};
    let c = cell().await;
    let first = c.must_enroll("RID-FIRST").await;
    // A second person whose leader-drawn UIN collides with the first (forced here): the command is
    // refused and nothing of it is written; the leader would draw again.
    let same_bucket_rid = (0..)
        .map(|i| format!("RID-SAME-BUCKET-{i}"))
        .find(|r| prepare::bucket_of_rid(r) == prepare::bucket_of_rid("RID-FIRST"))
        .unwrap();
    let keyring = nid_domain::keyring::Keyring::dev();
    let sealer = Sealer { keyring: &keyring, generation: 0 };
    let mut rng = nid_domain::random::Stream::new().unwrap();
    let mut prepared = prepare::enroll(
        &sample_request(&same_bucket_rid),
        &[],
        "",
        &sealer,
        &nid_proto::ids::IdScheme::dev(),
        c.clock.now_ms(),
        &mut rng,
    )
    .unwrap();
    prepared.command.uin_hash = keyring.index_hash(nid_domain::keys::UIN_DOMAIN, first.as_bytes()).to_vec();
    let collision = Command::new(command::Kind::Enroll(prepared.command));
    assert_eq!(c.cluster.must_propose(&collision).await, Err(Rejection::CandidatesTaken));
    // The RID was not taken by the refused command: enrolling it for real works.
    let second = c.must_enroll(&same_bucket_rid).await;
    assert_ne!(second, first);
    let CellResult::GetIdentity(r) =
        c.execute(Operation::GetIdentity(GetIdentityRequest { id: first.clone() }), None).await.unwrap()
    else {
        panic!()
    };
    assert_eq!(r.identity.unwrap().rid, "RID-FIRST", "the first person's record is untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_applies_once_and_its_retry_gets_the_original_answer() {
    let c = cell().await;
    let uin = enroll(&c, sample_request("RID-REQID")).await.uin;
    let update = |name: &str, request_id: &str| {
        let mut d = sample_request("x").demographics.unwrap();
        d.full_name = name.into();
        Operation::UpdateIdentity(UpdateIdentityRequest {
            uin: uin.clone(),
            expected_version: 1,
            demographics: Some(d),
            biometrics: vec![],
            request_id: request_id.into(),
        })
    };
    let first = c.execute(update("Asha Updated", "req-1"), None).await.unwrap();
    let CellResult::UpdateIdentity(r) = &first else { panic!() };
    assert_eq!(r.version, 2);
    // The same request again (as after an ambiguous failure): the original answer, not a
    // VERSION_MISMATCH for the version the first attempt created.
    assert_eq!(c.execute(update("Asha Updated", "req-1"), None).await.unwrap(), first);
    assert_eq!(get(&c, &uin).await.unwrap().version, 2, "applied once");
    // Another request under the same id is refused; a new id is a new request.
    let reused = c.execute(update("Someone Else", "req-1"), None).await.unwrap_err();
    assert_eq!(reused.code(), Code::AlreadyExists);
    assert_eq!(reason_of(&reused).as_deref(), Some("REQUEST_ID_REUSED"));
    let stale = c.execute(update("Asha Again", "req-2"), None).await.unwrap_err();
    assert_eq!(reason_of(&stale).as_deref(), Some("VERSION_MISMATCH"));
    // A refusal is an answer too: its retry gets the same refusal.
    let again = c.execute(update("Asha Again", "req-2"), None).await.unwrap_err();
    assert_eq!((again.code(), again.message()), (stale.code(), stale.message()));
    // VIDs: the retry returns the VID the first attempt created, not a second one.
    let create = Operation::CreateVid(CreateVidRequest {
        uin: uin.clone(),
        kind: VidKind::Perpetual as i32,
        expires_at: None,
        max_uses: 0,
        request_id: "req-vid".into(),
    });
    let a = c.execute(create.clone(), None).await.unwrap();
    let b = c.execute(create, None).await.unwrap();
    assert_eq!(a, b);
    assert_eq!(get(&c, &uin).await.unwrap().vids.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_generation_seals_only_once_every_voter_holds_it_and_a_replica_without_it_stops() {
    use nid_domain::keyring::{Keyring, sealed_generation};
    let g1 = (1u32, vec![1u8; 32]);
    let g2 = (2u32, vec![2u8; 32]);
    let mut c = Cluster::new(3);
    let (only_g1, both) = (vec![g1.clone()], vec![g1.clone(), g2.clone()]);
    c.set_keyrings(move |_| Keyring::from_generations(&only_g1).unwrap());
    c.start();
    c.cluster.must_own_all_buckets().await;
    let old: Vec<String> =
        futures_join_all((0..5).map(|i| c.must_enroll_request(sample_request(&format!("RID-OLD-{i}")))))
            .await;
    let leader = tokio::task::block_in_place(|| c.cluster.must_leader());
    let refused = activate(&c, 2).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "no replica holds generation 2 yet");
    // A rolling restart gives every replica generation 2; the leader last.
    let order: Vec<u64> = (1..=3).filter(|&id| id != leader).chain([leader]).collect();
    let both_keys = both.clone();
    c.set_keyrings(move |_| Keyring::from_generations(&both_keys).unwrap());
    for (n, id) in order.iter().enumerate() {
        c.cluster.stop_node(*id);
        c.cluster.run_node(*id);
        if n < 2 {
            // Mid-rotation a voter still lacks it: activation is refused.
            let r = activate(&c, 2).await;
            assert!(r.is_err() || n == 2, "activated before every voter held the generation");
        }
        tokio::task::block_in_place(|| c.cluster.must_leader());
    }
    activate(&c, 2).await.expect("every voter holds generation 2");
    let new: Vec<String> =
        futures_join_all((0..5).map(|i| c.must_enroll_request(sample_request(&format!("RID-NEW-{i}")))))
            .await;
    for uin in old.iter().chain(new.iter()) {
        assert_eq!(get(&c, uin).await.unwrap().uin, *uin, "old and new data readable");
    }
    let leader = tokio::task::block_in_place(|| c.cluster.must_leader());
    tokio::task::block_in_place(|| {
        for id in 1..=3 {
            c.cluster.must_applied(id, c.cluster.status(leader).applied);
        }
    });
    // Every replica holds the same bytes; new profiles are sealed with generation 2.
    let data: Vec<Vec<(Vec<u8>, Vec<u8>)>> = (1..=3).map(|id| data_of(&c, id)).collect();
    assert!(data.iter().all(|d| *d == data[0]), "replicas diverged across the rotation");
    let generations: std::collections::BTreeSet<u32> = data[0]
        .iter()
        .filter(|(k, _)| k.len() == 35 && k[2] == Table::Profile as u8)
        .map(|(_, v)| sealed_generation(v).unwrap())
        .collect();
    assert_eq!(generations, [1u32, 2].into(), "profiles sealed before and after the activation");
    // A replica restarted without generation 2 stops instead of diverging or skipping.
    let victim = (1..=3).find(|&id| id != leader).unwrap();
    c.cluster.stop_node(victim);
    let only = vec![g1.clone()];
    c.set_keyrings(move |_| Keyring::from_generations(&only).unwrap());
    let refused =
        c.cluster.try_run_node(victim).expect_err("a replica lacking the active generation refuses to start");
    assert!(refused.contains("generation 2"), "{refused}");
    // The others keep serving.
    c.must_enroll("RID-AFTER").await;
}

async fn activate(
    c: &Cluster,
    id: u32,
) -> Result<tonic::Response<ActivateKeyGenerationResponse>, tonic::Status> {
    use nid_proto::v1::cell_server::Cell as _;
    let service = c.service(tokio::task::block_in_place(|| c.cluster.must_leader()));
    service.activate_key_generation(tonic::Request::new(ActivateKeyGenerationRequest { id })).await
}
