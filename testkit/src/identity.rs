//! An in-process data cell: [`Cluster`] replicas of the identity state machine, each with the
//! services `nid-cell` serves (minus the network), a shared movable clock, and helpers that drive
//! the `Cell` service the way the router does.

use crate::cluster::{Cluster, WAIT};
use nid_cell::cell_service::CellService;
use nid_cell::error::CellError;
use nid_cell::identity_cell::IdentityCell;
use nid_cell::key_rotation::VoterKeys;
use nid_cell::metrics::CellMetrics;
use nid_cell::replica::ReplicaAdmin;
use nid_domain::commands::AuthPolicy;
use nid_domain::keyring::Keyring;
use nid_domain::time::Clock;
use nid_identity::{CellKeys, IdentityMachine};
use nid_proto::ids::IdScheme;
use nid_proto::v1::cell_request::Operation;
use nid_proto::v1::cell_response::Result as CellResult;
use nid_proto::v1::cell_server::Cell as _;
use nid_proto::v1::{CellRequest, EnrollRequest, KeyGeneration, KeyGenerations, RouteHeader};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type Keys = Arc<Mutex<HashMap<u64, Arc<CellKeys>>>>;
type KeyringFactory = Arc<dyn Fn(u64) -> Keyring + Send + Sync>;

/// An in-process data cell.
pub struct IdentityCluster {
    /// The replicas.
    pub cluster: Cluster<IdentityMachine>,
    keys: Keys,
    keyrings: Arc<Mutex<KeyringFactory>>,
    /// The clock every replica's service stamps commands with; tests move it.
    pub clock: Arc<Clock>,
    /// Authentication policy of the services.
    pub policy: AuthPolicy,
    scheme: IdScheme,
    metrics: Mutex<HashMap<u64, CellMetrics>>,
}

/// [`VoterKeys`] answered from the in-process replicas' keyrings.
struct InProcessVoterKeys(Keys);

#[tonic::async_trait]
impl VoterKeys for InProcessVoterKeys {
    async fn generations(&self, node_id: u64, _address: &str) -> Result<KeyGenerations, CellError> {
        let keys = self.0.lock().ok().and_then(|k| k.get(&node_id).cloned());
        let keys = keys.ok_or_else(|| CellError::NotAllowed(format!("voter {node_id} did not answer")))?;
        let keyring = keys.keyring();
        Ok(KeyGenerations {
            held: keyring
                .generation_ids()
                .into_iter()
                .filter_map(|id| {
                    keyring.fingerprint(id).map(|f| KeyGeneration { id, fingerprint: f.to_vec() })
                })
                .collect(),
            active: keys.active_generation(),
            node_id,
        })
    }
}

impl IdentityCluster {
    /// A cell of `n` initial voters with the development keyring, not started yet.
    pub fn new(n: u64) -> IdentityCluster {
        let keys: Keys = Arc::default();
        let keyrings: Arc<Mutex<KeyringFactory>> = Arc::new(Mutex::new(Arc::new(|_| Keyring::dev())));
        let (k, r) = (keys.clone(), keyrings.clone());
        let cluster = Cluster::new(n, move |id| {
            let factory = r.lock().map(|f| f.clone()).unwrap_or_else(|p| p.into_inner().clone());
            let cell_keys = Arc::new(CellKeys::new(factory(id)));
            if let Ok(mut m) = k.lock() {
                m.insert(id, cell_keys.clone());
            }
            IdentityMachine::new(cell_keys)
        });
        IdentityCluster {
            cluster,
            keys,
            keyrings,
            clock: Arc::new(Clock::default()),
            policy: AuthPolicy::standard(),
            scheme: IdScheme::dev(),
            metrics: Mutex::default(),
        }
    }

    /// Replicas started (or restarted) from now on load their keyring from `factory(node id)`.
    pub fn set_keyrings(&self, factory: impl Fn(u64) -> Keyring + Send + Sync + 'static) {
        if let Ok(mut f) = self.keyrings.lock() {
            *f = Arc::new(factory);
        }
    }

    /// Starts every replica.
    pub fn start(&mut self) {
        self.cluster.start();
    }

    /// The keys of running replica `id`.
    pub fn keys(&self, id: u64) -> Arc<CellKeys> {
        self.keys
            .lock()
            .ok()
            .and_then(|k| k.get(&id).cloned())
            .unwrap_or_else(|| panic!("node {id} has no keys"))
    }

    /// The identity side of running replica `id`, as `nid-cell` runs it.
    pub fn cell(&self, id: u64) -> Arc<IdentityCell> {
        let metrics = {
            let mut m = self.metrics.lock().unwrap_or_else(|p| p.into_inner());
            m.entry(id)
                .or_insert_with(|| {
                    CellMetrics::new(&prometheus::Registry::new()).unwrap_or_else(|e| panic!("metrics: {e}"))
                })
                .clone()
        };
        Arc::new(IdentityCell {
            cell_id: 1,
            node: self.cluster.node(id),
            keys: self.keys(id),
            scheme: self.scheme.clone(),
            clock: self.clock.clone(),
            policy: self.policy,
            metrics,
        })
    }

    /// The identity metrics of replica `id`.
    pub fn metrics(&self, id: u64) -> CellMetrics {
        let _ = self.cell(id);
        self.metrics.lock().map(|m| m[&id].clone()).unwrap_or_else(|p| p.into_inner()[&id].clone())
    }

    /// The `Cell` service of running replica `id`.
    pub fn service(&self, id: u64) -> CellService {
        CellService {
            replica: Arc::new(ReplicaAdmin { node: self.cluster.node(id), allow_same_zone: true }),
            identity: Some(self.cell(id)),
            voter_keys: Arc::new(InProcessVoterKeys(self.keys.clone())),
        }
    }

    /// Executes `operation` through the `Cell` service of the current leader, as the router would
    /// (with `partner` authenticated for `allowed` auth types), retrying routing hints.
    pub async fn execute(
        &self,
        operation: Operation,
        partner: Option<(&str, &[i32])>,
    ) -> Result<CellResult, tonic::Status> {
        self.execute_routed(operation, partner, None).await
    }

    /// [`IdentityCluster::execute`] with the request id a router assigns to the client call
    /// (`RouteHeader.request_id`).
    pub async fn execute_routed(
        &self,
        operation: Operation,
        partner: Option<(&str, &[i32])>,
        route_request_id: Option<&str>,
    ) -> Result<CellResult, tonic::Status> {
        let deadline = Instant::now() + WAIT;
        loop {
            let leader = tokio::task::block_in_place(|| self.cluster.must_leader());
            let routed = partner.is_some() || route_request_id.is_some();
            let (partner_id, allowed) = partner.unwrap_or(("", &[]));
            let request = CellRequest {
                route: routed.then(|| RouteHeader {
                    bucket: bucket_of(&operation, &self.scheme),
                    table_version: 1,
                    partner_id: partner_id.to_owned(),
                    partner_allowed: allowed.to_vec(),
                    caller: String::new(),
                    request_id: route_request_id.unwrap_or_default().to_owned(),
                }),
                operation: Some(operation.clone()),
            };
            match self.service(leader).execute(tonic::Request::new(request)).await {
                Ok(r) => return r.into_inner().result.ok_or_else(|| tonic::Status::internal("empty result")),
                Err(e)
                    if nid_proto::error::RoutingHint::from_status(&e).is_some()
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Enrols `request` through the leader; returns its UIN.
    pub async fn must_enroll_request(&self, request: EnrollRequest) -> String {
        match self.execute(Operation::Enroll(request), None).await {
            Ok(CellResult::Enroll(r)) => r.uin,
            other => panic!("enrol failed: {other:?}"),
        }
    }

    /// Enrols the sample person of `rid`; returns the UIN.
    pub async fn must_enroll(&self, rid: &str) -> String {
        self.must_enroll_request(sample_request(rid)).await
    }

    /// Waits until replica `id` holds identity `uin` in its applied state.
    pub fn must_have_identity(&self, id: u64, uin: &str) {
        let parsed = self.scheme.parse(uin).unwrap_or_else(|e| panic!("{e}"));
        let deadline = Instant::now() + WAIT;
        loop {
            let keyring = self.keys(id).keyring();
            let found = self
                .cluster
                .node(id)
                .view(|v| nid_identity::queries::identity(v, &keyring, &parsed, self.clock.now_ms()))
                .ok()
                .flatten();
            if let Some(l) = found {
                assert_eq!(l.cold.uin, uin);
                return;
            }
            assert!(Instant::now() < deadline, "node {id} never applied the identity");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn bucket_of(operation: &Operation, scheme: &IdScheme) -> u32 {
    let id = |text: &str| scheme.parse(text).map(|i| u32::from(i.bucket().get())).unwrap_or(0);
    match operation {
        Operation::Enroll(r) => u32::from(nid_domain::prepare::bucket_of_rid(&r.rid).get()),
        Operation::GetIdentity(r) => id(&r.id),
        Operation::UpdateIdentity(r) => id(&r.uin),
        Operation::SetStatus(r) => id(&r.uin),
        Operation::GetHistory(r) => id(&r.uin),
        Operation::CreateVid(r) => id(&r.uin),
        Operation::RevokeVid(r) => id(&r.vid),
        Operation::LockAuthTypes(r) => id(&r.id),
        Operation::Authenticate(r) => id(&r.id),
        Operation::GetAuthHistory(r) => id(&r.id),
        Operation::VerifyAuditChain(r) => id(&r.uin),
    }
}

/// A valid enrolment request for `rid`.
pub fn sample_request(rid: &str) -> EnrollRequest {
    EnrollRequest {
        rid: rid.to_owned(),
        demographics: Some(nid_proto::v1::Demographics {
            full_name: "Asha Example".into(),
            date_of_birth: "1988-07-14".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}
