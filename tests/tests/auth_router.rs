//! Authentication and the identity lifecycle through the router of a `nidctl dev up` cluster (real
//! processes): partner API keys (missing, wrong, limited, revoked), signed decisions checked against
//! the keys the router publishes, unlinkable partner tokens, the admin credential, `nidctl partner`,
//! `nidctl auth` and `nidctl audit verify`, and every Enrollment RPC forwarded to the owning cell.

use nid_proto::error::reason_of;
use nid_proto::v1::admin_client::AdminClient;
use nid_proto::v1::authentication_client::AuthenticationClient;
use nid_proto::v1::enrollment_client::EnrollmentClient;
use nid_proto::v1::*;
use nid_tests::{DevCluster, binary, enroll_request};
use prost::Message as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tonic::Code;

/// Each test runs its own dev cluster; more than one at a time overloads a small machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn bearer<T>(message: T, key: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
    r
}

fn request(id: &str, txn: &str, factors: AuthFactors) -> AuthenticateRequest {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    AuthenticateRequest {
        id: id.into(),
        transaction_id: txn.into(),
        request_time: Some(prost_types::Timestamp { seconds: now.as_secs() as i64, nanos: 0 }),
        factors: Some(factors),
    }
}

fn pin(p: &str) -> AuthFactors {
    AuthFactors { pin: p.into(), ..Default::default() }
}

fn nidctl(dir: &Path, args: &[&str]) -> (i32, String) {
    let out =
        Command::new(binary("nidctl")).args(args).arg("--dev-dir").arg(dir).output().expect("run nidctl");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partners_authenticate_through_the_router_and_decisions_verify() {
    let _serial = SERIAL.lock().await;
    let cluster = DevCluster::start(1);
    let dir = cluster.dir.path();
    let router = cluster.router();
    let ch = nid_tests::connect(&router).await;
    let mut enrol = EnrollmentClient::new(ch.clone());
    let mut auth = AuthenticationClient::new(ch.clone());
    let mut admin = AdminClient::new(ch.clone());

    let mut person = enroll_request("RID-ROUTER-AUTH", "Router Auth");
    person.pin = "8642".into();
    let uin = enrol.enroll(person).await.unwrap().into_inner().uin;

    // No key, a wrong key: refused before any cell sees the request.
    let err = auth.authenticate(request(&uin, "T-0", pin("8642"))).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(reason_of(&err).as_deref(), Some("UNAUTHENTICATED_PARTNER"));
    let err =
        auth.authenticate(bearer(request(&uin, "T-0", pin("8642")), "dev-partner.00ff")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(!err.message().contains("00ff"), "errors never echo the credential");

    // The dev partner (all factors), created by `nidctl dev up`.
    let dev_key = std::fs::read_to_string(dir.join("secrets/dev-partner.apikey")).unwrap().trim().to_owned();
    let yes =
        auth.authenticate(bearer(request(&uin, "T-1", pin("8642")), &dev_key)).await.unwrap().into_inner();
    assert!(yes.decision.as_ref().unwrap().authenticated);
    let keys = auth.get_signing_keys(GetSigningKeysRequest {}).await.unwrap().into_inner();
    let key = keys.keys.iter().find(|k| k.key_id == yes.key_id).expect("the signing key is published");
    let public = ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key.public_key.clone());
    public.verify(&yes.signed_decision, &yes.signature).expect("signature verifies with the published key");
    let mut forged = AuthDecision::decode(yes.signed_decision.as_slice()).unwrap();
    forged.partner_id = "someone-else".into();
    assert!(public.verify(&forged.encode_to_vec(), &yes.signature).is_err());

    // Admin calls need the admin token.
    let err = admin.list_partners(ListPartnersRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(reason_of(&err).as_deref(), Some("ADMIN_REQUIRED"));

    // A partner limited to demographics, added with nidctl.
    let (code, kiosk_key) = nidctl(dir, &["partner", "add", "kiosk-1", "--allow", "demographic"]);
    assert_eq!(code, 0);
    assert!(kiosk_key.starts_with("kiosk-1."));
    let (code, _) = nidctl(dir, &["partner", "add", "kiosk-1", "--allow", "pin"]);
    assert_eq!(code, 1, "an existing partner id is refused, not overwritten");
    let no =
        auth.authenticate(bearer(request(&uin, "K-1", pin("8642")), &kiosk_key)).await.unwrap().into_inner();
    assert_eq!(no.decision.unwrap().reasons, vec![AuthReason::FactorNotAllowed as i32]);
    let demo = AuthFactors {
        demographic: Some(DemographicFactor {
            full_name: "router auth".into(),
            match_mode: 2,
            ..Default::default()
        }),
        ..Default::default()
    };
    let kiosk_yes =
        auth.authenticate(bearer(request(&uin, "K-2", demo.clone()), &kiosk_key)).await.unwrap().into_inner();
    assert!(kiosk_yes.decision.as_ref().unwrap().authenticated);
    let dev_yes =
        auth.authenticate(bearer(request(&uin, "K-2", demo.clone()), &dev_key)).await.unwrap().into_inner();
    let token = |r: &AuthenticateResponse| r.decision.as_ref().unwrap().partner_token.clone();
    assert_ne!(token(&kiosk_yes), token(&dev_yes), "partners cannot correlate a person");
    assert_eq!(token(&dev_yes), token(&yes), "a partner's token is stable");

    // nidctl auth and audit verify.
    let (code, out) = nidctl(dir, &["auth", &uin, "--pin", "8642"]);
    assert_eq!((code, out.starts_with("YES")), (0, true), "{out}");
    let (code, out) = nidctl(dir, &["auth", &uin, "--pin", "0000"]);
    assert_eq!((code, out.as_str()), (4, "NO PIN_MISMATCH"));
    let (code, out) = nidctl(dir, &["audit", "verify", &uin]);
    assert_eq!((code, out.as_str()), (0, "intact: 6 records"));
    let history = auth
        .get_auth_history(GetAuthHistoryRequest { id: uin.clone(), page_token: String::new(), limit: 0 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(history.records.len(), 6);
    assert_eq!(history.records[0].reasons, vec![AuthReason::PinMismatch as i32], "newest first");

    // Revocation reaches the router within its refresh period.
    let (code, _) = nidctl(dir, &["partner", "revoke", "kiosk-1"]);
    assert_eq!(code, 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match auth.authenticate(bearer(request(&uin, "K-3", demo.clone()), &kiosk_key)).await {
            Err(e) if e.code() == Code::Unauthenticated => break,
            other => assert!(Instant::now() < deadline, "revoked partner still accepted: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, listed) = nidctl(dir, &["partner", "list"]);
    assert!(listed.lines().any(|l| l.starts_with("kiosk-1") && l.contains("revoked")), "{listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_enrollment_rpc_reaches_the_owning_cell_through_the_router() {
    let _serial = SERIAL.lock().await;
    let cluster = DevCluster::start(2);
    let mut c = EnrollmentClient::new(nid_tests::connect(&cluster.router()).await);
    let uin = c.enroll(enroll_request("RID-ROUTER-LIFE", "Router Life")).await.unwrap().into_inner().uin;
    let mut d = enroll_request("x", "Router Life Renamed").demographics.unwrap();
    d.phone = "+15550009999".into();
    let v = c
        .update_identity(UpdateIdentityRequest {
            request_id: String::new(),
            uin: uin.clone(),
            expected_version: 1,
            demographics: Some(d),
            biometrics: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .version;
    assert_eq!(v, 2);
    let stale = c
        .update_identity(UpdateIdentityRequest {
            request_id: String::new(),
            uin: uin.clone(),
            expected_version: 1,
            demographics: enroll_request("x", "Late").demographics,
            biometrics: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);
    let vid = c
        .create_vid(CreateVidRequest {
            request_id: String::new(),
            uin: uin.clone(),
            kind: VidKind::Perpetual as i32,
            expires_at: None,
            max_uses: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .vid
        .unwrap()
        .vid;
    let by_vid =
        c.get_identity(GetIdentityRequest { id: vid.clone() }).await.unwrap().into_inner().identity.unwrap();
    assert_eq!(by_vid.uin, uin);
    assert_eq!(by_vid.demographics.unwrap().full_name, "Router Life Renamed");
    let locks = c
        .lock_auth_types(LockAuthTypesRequest {
            request_id: String::new(),
            id: vid.clone(),
            lock: vec![AuthLock { auth_type: AuthType::Totp as i32, until: None }],
            unlock: vec![],
        })
        .await
        .unwrap()
        .into_inner()
        .locks;
    assert_eq!(locks.len(), 1);
    c.revoke_vid(RevokeVidRequest { vid: vid.clone(), request_id: String::new() }).await.unwrap();
    assert_eq!(c.get_identity(GetIdentityRequest { id: vid }).await.unwrap_err().code(), Code::NotFound);
    c.set_status(SetStatusRequest {
        request_id: String::new(),
        uin: uin.clone(),
        status: IdentityStatus::Blocked as i32,
        reason: "test".into(),
    })
    .await
    .unwrap();
    let history = c
        .get_history(GetHistoryRequest { uin: uin.clone(), from_version: 0, limit: 0 })
        .await
        .unwrap()
        .into_inner();
    let versions: Vec<u64> = history.versions.iter().map(|v| v.version).collect();
    assert_eq!(versions, vec![1, 2, 3, 4, 5, 6]);
    let bad =
        c.get_history(GetHistoryRequest { uin: "123".into(), from_version: 0, limit: 0 }).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert_eq!(reason_of(&bad).as_deref(), Some("INVALID_IDENTIFIER"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_over_its_rate_limit_is_told_when_to_retry_and_others_are_not_slowed() {
    let _serial = SERIAL.lock().await;
    let cluster = DevCluster::start(1);
    let dir = cluster.dir.path();
    let router = cluster.router();
    let ch = nid_tests::connect(&router).await;
    let mut enrol = EnrollmentClient::new(ch.clone());
    let mut auth = AuthenticationClient::new(ch.clone());
    let mut person = enroll_request("RID-ROUTER-QUOTA", "Router Quota");
    person.pin = "8642".into();
    let uin = enrol.enroll(person).await.unwrap().into_inner().uin;

    let (code, key) =
        nidctl(dir, &["partner", "add", "bank-q", "--allow", "pin", "--rate", "2/s", "--burst", "3"]);
    assert_eq!(code, 0);
    let (_, listed) = nidctl(dir, &["partner", "list"]);
    assert!(listed.lines().any(|l| l.starts_with("bank-q") && l.contains("2/s burst 3")), "{listed}");
    let dev_key = std::fs::read_to_string(dir.join("secrets/dev-partner.apikey")).unwrap().trim().to_owned();

    // 12 at once: the burst of 3 passes (at most one more token can drip in meanwhile), the rest
    // are refused before any cell sees them, with a delay to retry after.
    let started = Instant::now();
    let mut admitted = 0;
    let mut refused = Vec::new();
    let calls: Vec<_> = (0..12)
        .map(|k| {
            let (mut auth, uin, key) = (auth.clone(), uin.clone(), key.clone());
            tokio::spawn(async move {
                auth.authenticate(bearer(request(&uin, &format!("Q-{k}"), pin("8642")), &key)).await
            })
        })
        .collect();
    for call in calls {
        match call.await.unwrap() {
            Ok(r) => {
                assert!(r.into_inner().decision.unwrap().authenticated);
                admitted += 1;
            }
            Err(e) => refused.push(e),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert!(
        admitted >= 3 && admitted as f64 <= 3.0 + 2.0 * elapsed + 1.0,
        "{admitted} admitted in {elapsed:.2} s"
    );
    let e = refused.first().expect("some were refused");
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert_eq!(reason_of(e).as_deref(), Some("RATE_LIMITED"));
    let wait = nid_proto::error::retry_delay(e).expect("a RetryInfo delay");
    assert!(wait > Duration::ZERO && wait <= Duration::from_millis(500), "{wait:?}");
    // Only authenticated callers spend a partner's tokens; the dev partner has no limit.
    for k in 0..12 {
        let r = auth.authenticate(bearer(request(&uin, &format!("D-{k}"), pin("8642")), &dev_key)).await;
        assert!(r.is_ok(), "a partner without a limit is never refused: {r:?}");
    }
    // The refused ones applied nothing: the audit trail holds only the admitted and the dev
    // partner's authentications.
    let (code, out) = nidctl(dir, &["audit", "verify", &uin]);
    assert_eq!((code, out), (0, format!("intact: {} records", admitted + 12)));

    // Waiting the hinted delay is enough for the next one.
    tokio::time::sleep(wait).await;
    auth.authenticate(bearer(request(&uin, "Q-after-wait", pin("8642")), &key))
        .await
        .expect("after the delay");

    // Raising the limit takes effect within the routers' refresh (about a second).
    let (code, out) = nidctl(dir, &["partner", "update", "bank-q", "--rate", "0"]);
    assert_eq!(code, 0, "{out}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut k = 0;
    loop {
        k += 1;
        let burst: Vec<_> = (0..6)
            .map(|j| {
                let (mut auth, uin, key) = (auth.clone(), uin.clone(), key.clone());
                tokio::spawn(async move {
                    auth.authenticate(bearer(request(&uin, &format!("W-{k}-{j}"), pin("8642")), &key))
                        .await
                        .is_ok()
                })
            })
            .collect();
        let mut all = true;
        for b in burst {
            all &= b.await.unwrap();
        }
        if all {
            break;
        }
        assert!(Instant::now() < deadline, "the raised limit never reached the router");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for k in 0..12 {
        let r = auth.authenticate(bearer(request(&uin, &format!("U-{k}"), pin("8642")), &key)).await;
        assert!(r.is_ok(), "no limit any more: {r:?}");
    }
    let (code, _) = nidctl(dir, &["partner", "update", "bank-q", "--rate", "2000000"]);
    assert_eq!(code, 1, "an absurd rate is refused");
}
