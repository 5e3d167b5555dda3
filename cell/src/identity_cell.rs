//! A data cell's identity operations on its leader: validate (the domain's rules, the same the
//! router ran), prepare the command (`nid_domain::prepare`), propose it, and answer from its typed
//! outcome; reads wait for a linearizable read barrier and answer from one consistent view.
//! Authentication decisions are signed here, after the decision and its audit record applied.

use crate::error::CellError;
use crate::metrics::CellMetrics;
use nid_domain::commands::{AuthPolicy, Command, IdentityOp, command};
use nid_domain::keyring::Keyring;
use nid_domain::outcome::{
    AuthOutcome, Enrolled, Expect, LocksInForce, NewVersion, Outcome, Rejection, VidRevoked,
};
use nid_domain::prepare::{self, Sealer};
use nid_domain::random::Stream;
use nid_domain::records::VidEntry;
use nid_domain::time::Clock;
use nid_domain::{validate, views};
use nid_engine::{EngineError, Node, buckets};
use nid_identity::queries::{self, Loaded};
use nid_identity::store::ReadError;
use nid_identity::{CellKeys, IdentityMachine};
use nid_proto::bucket::BucketId;
use nid_proto::ids::{IdKind, IdScheme, Identifier};
use nid_proto::v1::*;
use std::sync::Arc;
use std::time::Duration;

/// How long a write or read may wait for Raft.
pub const RAFT_TIMEOUT: Duration = Duration::from_secs(5);

/// A data cell's identity side, on one replica.
pub struct IdentityCell {
    /// The cell.
    pub cell_id: u64,
    /// The replica.
    pub node: Node<IdentityMachine>,
    /// The keys it seals and signs with.
    pub keys: Arc<CellKeys>,
    /// The cluster's identifier scheme.
    pub scheme: IdScheme,
    /// The clock commands are stamped with.
    pub clock: Arc<Clock>,
    /// Lockout and skew policy of authentication.
    pub policy: AuthPolicy,
    /// Metrics.
    pub metrics: CellMetrics,
}

fn read_error(e: ReadError) -> CellError {
    tracing::error!(error = %e, "stored value unreadable");
    CellError::Internal("storage error".into())
}

fn random() -> Result<Stream, CellError> {
    Stream::new().map_err(|_| CellError::Internal("random source failed".into()))
}

impl IdentityCell {
    /// The engine error as a cell error (with the leader's address).
    pub fn engine_error(&self, e: EngineError) -> CellError {
        CellError::from_engine(e, self.cell_id, |id| self.node.book().address(id))
    }

    fn sealer<'k>(&self, keyring: &'k Keyring) -> Sealer<'k> {
        Sealer { keyring, generation: self.keys.active_generation() }
    }

    /// Proposes `command` and returns its outcome or its rejection unconverted.
    async fn propose_raw(&self, command: &Command) -> Result<Result<Outcome, Rejection>, CellError> {
        self.node.propose(command, RAFT_TIMEOUT).await.map_err(|e| self.engine_error(e))
    }

    /// Proposes `command` and returns the outcome it produces, typed.
    async fn propose<T: Expect>(&self, command: &Command) -> Result<T, CellError> {
        let outcome = self.propose_raw(command).await??;
        T::from_outcome(outcome)
            .ok_or_else(|| CellError::Internal("the outcome does not match the command".into()))
    }

    /// A linearizable read barrier followed by the ownership check of `bucket`.
    pub async fn read_fence(&self, bucket: BucketId) -> Result<(), CellError> {
        self.node.read_barrier(RAFT_TIMEOUT).await.map_err(|e| self.engine_error(e))?;
        buckets::read_fence(bucket, self.node.bucket(bucket)).map_err(|e| self.engine_error(e))
    }

    fn check_route(route: Option<&RouteHeader>, bucket: BucketId) -> Result<(), CellError> {
        match route {
            Some(r) if r.bucket != u32::from(bucket.get()) => {
                Err(CellError::field("route.bucket", "does not match the bucket of the request"))
            }
            _ => Ok(()),
        }
    }

    /// Enroll: one UIN candidate per attempt; a taken candidate is retried with a fresh one.
    pub async fn enroll(
        &self,
        req: EnrollRequest,
        route: Option<&RouteHeader>,
    ) -> Result<EnrollResponse, CellError> {
        let now = self.clock.now_ms();
        validate::enroll(&req, now)?;
        Self::check_route(route, prepare::bucket_of_rid(&req.rid))?;
        let keyring = self.keys.keyring();
        let creator = match route {
            Some(r) => prepare::call_key(&keyring, &r.caller, &r.request_id),
            None => Vec::new(),
        };
        let mut rng = random()?;
        for _ in 0..3 {
            let prepared = prepare::enroll(
                &req,
                &creator,
                actor(route),
                &self.sealer(&keyring),
                &self.scheme,
                now,
                &mut rng,
            )
            .map_err(|e| CellError::Internal(e.to_string()))?;
            let command = Command::new(command::Kind::Enroll(prepared.command));
            match self.propose_raw(&command).await? {
                Ok(outcome) => {
                    let e = Enrolled::from_outcome(outcome).ok_or_else(|| {
                        CellError::Internal("the outcome does not match the command".into())
                    })?;
                    // An empty UIN: this command created it; otherwise the existing identity answers
                    // (created again when this is a retry of the call that created it).
                    let (uin, totp_secret) = if e.uin.is_empty() {
                        (prepared.uin, prepared.totp_secret)
                    } else {
                        (e.uin, e.totp_secret)
                    };
                    return Ok(EnrollResponse {
                        uin,
                        created: e.created,
                        totp_secret,
                        served_by: Some(self.served_by()),
                    });
                }
                Err(Rejection::CandidatesTaken) => continue,
                Err(r) => return Err(r.into()),
            }
        }
        Err(CellError::RetryLater { after: Duration::from_millis(10) })
    }

    /// Which replica answers.
    pub fn served_by(&self) -> ServedBy {
        ServedBy { cell_id: self.cell_id, node_id: self.node.node_id(), table_version: 0 }
    }

    async fn load(&self, id: &Identifier) -> Result<Loaded, CellError> {
        self.read_fence(id.bucket()).await?;
        let keyring = self.keys.keyring();
        let now = self.clock.now_ms();
        self.node
            .view(|v| queries::identity(v, &keyring, id, now))
            .map_err(read_error)?
            .ok_or(CellError::NotFound)
    }

    /// GetIdentity (a VID resolves only while usable).
    pub async fn get_identity(
        &self,
        req: GetIdentityRequest,
        route: Option<&RouteHeader>,
    ) -> Result<GetIdentityResponse, CellError> {
        let id = validate::get_identity(&self.scheme, &req)?;
        Self::check_route(route, id.bucket())?;
        let l = self.load(&id).await?;
        Ok(GetIdentityResponse {
            identity: Some(views::identity(&l.cold, &l.profile, &l.state, self.clock.now_ms())),
            served_by: Some(self.served_by()),
        })
    }

    /// Proposes an identity operation on `id`, with the request id of `caller` when given.
    async fn operate<T: Expect>(
        &self,
        id: &Identifier,
        op: IdentityOp,
        request_id: &str,
        route: Option<&RouteHeader>,
    ) -> Result<T, CellError> {
        Self::check_route(route, id.bucket())?;
        let keyring = self.keys.keyring();
        let request_id = effective_request_id(request_id, route);
        let request = (!request_id.is_empty()).then(|| {
            let caller = route.map(|r| r.caller.as_str()).unwrap_or("");
            prepare::request_key(&keyring, caller, request_id, &prepare::op_content(id, &op))
        });
        let mut rng = random()?;
        let cmd = prepare::identity_command(
            &self.sealer(&keyring),
            id,
            &op,
            self.clock.now_ms(),
            request,
            actor(route),
            &mut rng,
        )
        .map_err(|e| CellError::Internal(e.to_string()))?;
        self.propose(&Command::new(command::Kind::Identity(cmd))).await
    }

    /// UpdateIdentity.
    pub async fn update_identity(
        &self,
        req: UpdateIdentityRequest,
        route: Option<&RouteHeader>,
    ) -> Result<UpdateIdentityResponse, CellError> {
        let id = validate::update(&self.scheme, &req, self.clock.now_ms())?;
        let op = prepare::update_op(
            &self.keys.keyring(),
            req.expected_version,
            &req.demographics.clone().unwrap_or_default(),
            &req.biometrics,
        );
        let NewVersion(version) = self.operate(&id, op, &req.request_id, route).await?;
        Ok(UpdateIdentityResponse { version })
    }

    /// SetStatus.
    pub async fn set_status(
        &self,
        req: SetStatusRequest,
        route: Option<&RouteHeader>,
    ) -> Result<SetStatusResponse, CellError> {
        let id = validate::set_status(&self.scheme, &req)?;
        let NewVersion(version) = self
            .operate(&id, prepare::set_status_op(req.status, &req.reason), &req.request_id, route)
            .await?;
        Ok(SetStatusResponse { version })
    }

    /// CreateVid: a taken candidate is retried with a fresh one.
    pub async fn create_vid(
        &self,
        req: CreateVidRequest,
        route: Option<&RouteHeader>,
    ) -> Result<CreateVidResponse, CellError> {
        let v = validate::create_vid(&self.scheme, &req, self.clock.now_ms())?;
        let keyring = self.keys.keyring();
        let mut rng = random()?;
        for _ in 0..3 {
            let op = prepare::create_vid_op(
                &keyring,
                &self.scheme,
                &v.uin,
                req.kind,
                v.expires_ms,
                v.max_uses,
                &mut rng,
            )
            .map_err(|e| CellError::Internal(e.to_string()))?;
            // The request id covers what the client asked, not the candidate the leader drew.
            let content_op = prepare::create_vid_op_content(req.kind, v.expires_ms, v.max_uses);
            match self.operate_with_content::<VidEntry>(&v.uin, op, content_op, &req.request_id, route).await
            {
                Ok(vid) => return Ok(CreateVidResponse { vid: Some(views::vid(&vid, 0)) }),
                Err(Retry::Candidate) => continue,
                Err(Retry::Error(e)) => return Err(e),
            }
        }
        Err(CellError::RetryLater { after: Duration::from_millis(10) })
    }

    async fn operate_with_content<T: Expect>(
        &self,
        id: &Identifier,
        op: IdentityOp,
        content: Vec<u8>,
        request_id: &str,
        route: Option<&RouteHeader>,
    ) -> Result<T, Retry> {
        Self::check_route(route, id.bucket())?;
        let keyring = self.keys.keyring();
        let request_id = effective_request_id(request_id, route);
        let request = (!request_id.is_empty()).then(|| {
            let caller = route.map(|r| r.caller.as_str()).unwrap_or("");
            let mut c = id.to_digits().into_bytes();
            c.push(0);
            c.extend_from_slice(&content);
            prepare::request_key(&keyring, caller, request_id, &c)
        });
        let mut rng = random()?;
        let cmd = prepare::identity_command(
            &self.sealer(&keyring),
            id,
            &op,
            self.clock.now_ms(),
            request,
            actor(route),
            &mut rng,
        )
        .map_err(|e| CellError::Internal(e.to_string()))?;
        match self.propose_raw(&Command::new(command::Kind::Identity(cmd))).await? {
            Ok(outcome) => T::from_outcome(outcome)
                .ok_or(Retry::Error(CellError::Internal("the outcome does not match the command".into()))),
            Err(Rejection::CandidatesTaken) => Err(Retry::Candidate),
            Err(r) => Err(Retry::Error(r.into())),
        }
    }

    /// RevokeVid.
    pub async fn revoke_vid(
        &self,
        req: RevokeVidRequest,
        route: Option<&RouteHeader>,
    ) -> Result<RevokeVidResponse, CellError> {
        let id = validate::revoke_vid(&self.scheme, &req)?;
        let VidRevoked = self.operate(&id, prepare::revoke_vid_op(), &req.request_id, route).await?;
        Ok(RevokeVidResponse {})
    }

    /// LockAuthTypes.
    pub async fn lock_auth_types(
        &self,
        req: LockAuthTypesRequest,
        route: Option<&RouteHeader>,
    ) -> Result<LockAuthTypesResponse, CellError> {
        let now = self.clock.now_ms();
        let l = validate::lock_auth_types(&self.scheme, &req, now)?;
        let LocksInForce(locks) =
            self.operate(&l.id, prepare::lock_op(&l.lock, &l.unlock), &req.request_id, route).await?;
        Ok(LockAuthTypesResponse { locks: views::locks(&locks, now) })
    }

    /// GetHistory.
    pub async fn get_history(
        &self,
        req: GetHistoryRequest,
        route: Option<&RouteHeader>,
    ) -> Result<GetHistoryResponse, CellError> {
        let (id, limit) = validate::get_history(&self.scheme, &req)?;
        Self::check_route(route, id.bucket())?;
        self.read_fence(id.bucket()).await?;
        let keyring = self.keys.keyring();
        let now = self.clock.now_ms();
        let (versions, next) = self
            .node
            .view(|v| -> Result<_, ReadError> {
                let Some(l) = queries::identity(v, &keyring, &id, now)? else { return Ok(None) };
                let (entries, next) =
                    queries::history(v, &keyring, &id, &l.found.uin_hash, req.from_version, limit as usize)?;
                let views = entries
                    .iter()
                    .map(|e| views::history(&l.cold, &l.profile, &l.state, e, now))
                    .collect::<Vec<_>>();
                Ok(Some((views, next)))
            })
            .map_err(read_error)?
            .ok_or(CellError::NotFound)?;
        Ok(GetHistoryResponse { versions, next_version: next.unwrap_or(0) })
    }

    /// GetAuthHistory: newest first; the page token is the sequence number to continue below.
    pub async fn get_auth_history(
        &self,
        req: GetAuthHistoryRequest,
        route: Option<&RouteHeader>,
    ) -> Result<GetAuthHistoryResponse, CellError> {
        let (id, before, limit) = validate::get_auth_history(&self.scheme, &req)?;
        Self::check_route(route, id.bucket())?;
        self.read_fence(id.bucket()).await?;
        let keyring = self.keys.keyring();
        let now = self.clock.now_ms();
        let (records, next) = self
            .node
            .view(|v| -> Result<_, ReadError> {
                let Some(l) = queries::identity(v, &keyring, &id, now)? else { return Ok(None) };
                Ok(Some(queries::audit_page(v, &keyring, &id, &l.found.uin_hash, before, limit as usize)?))
            })
            .map_err(read_error)?
            .ok_or(CellError::NotFound)?;
        Ok(GetAuthHistoryResponse {
            records: records.into_iter().map(views::auth_record).collect(),
            next_page_token: next.map(|s| format!("{s:x}")).unwrap_or_default(),
        })
    }

    /// VerifyAuditChain: the chain and the head it must end at, read from one view.
    pub async fn verify_audit_chain(
        &self,
        req: VerifyAuditChainRequest,
        route: Option<&RouteHeader>,
    ) -> Result<VerifyAuditChainResponse, CellError> {
        let id = validate::verify_audit_chain(&self.scheme, &req)?;
        Self::check_route(route, id.bucket())?;
        self.read_fence(id.bucket()).await?;
        let keyring = self.keys.keyring();
        let uin_hash = queries::uin_target(&keyring, &id).ok_or(CellError::NotFound)?;
        let report = self
            .node
            .view(|v| -> Result<_, ReadError> {
                if !queries::exists(v, &keyring, &id)? {
                    return Ok(None);
                }
                Ok(Some(queries::verify_audit_chain(v, &keyring, &id, &uin_hash)?))
            })
            .map_err(read_error)?
            .ok_or(CellError::NotFound)?;
        if !report.intact {
            tracing::warn!(cell = self.cell_id, first_broken = report.first_broken, "audit chain broken");
        }
        Ok(VerifyAuditChainResponse {
            intact: report.intact,
            records: report.records,
            first_broken: report.first_broken,
        })
    }

    /// Authenticate: decides, audits (one Raft write) and signs. An identifier no identity has
    /// costs no Raft write: the leader checks its applied state (after a read barrier, so an
    /// identity enrolled under another leader is seen) and answers a signed "no".
    pub async fn authenticate(
        &self,
        req: AuthenticateRequest,
        route: Option<&RouteHeader>,
    ) -> Result<AuthenticateResponse, CellError> {
        let partner_id = route.map(|r| r.partner_id.clone()).unwrap_or_default();
        if partner_id.is_empty() {
            return Err(CellError::Unauthenticated {
                message: "no authenticated partner on the request".into(),
                reason: ErrorReason::UnauthenticatedPartner,
            });
        }
        let a = validate::authenticate(&self.scheme, &req)?;
        Self::check_route(route, a.id.bucket())?;
        let allowed = route.map(|r| r.partner_allowed.clone()).unwrap_or_default();
        let keyring = self.keys.keyring();
        let op = prepare::auth_op(&keyring, &req, a.request_time_ms, &partner_id, &allowed, self.policy);
        let outcome = if self.known(&a.id, &keyring).await? {
            let mut rng = random()?;
            let now = self.clock.now_ms();
            let cmd = prepare::identity_command(&self.sealer(&keyring), &a.id, &op, now, None, "", &mut rng)
                .map_err(|e| CellError::Internal(e.to_string()))?;
            self.propose::<AuthOutcome>(&Command::new(command::Kind::Identity(cmd))).await?
        } else {
            self.unknown_identity(&op, &partner_id)
        };
        let uin = outcome.uin.clone().or_else(|| (a.id.kind() == IdKind::Uin).then(|| req.id.clone()));
        let outcome = AuthOutcome { uin, ..outcome };
        let response = views::signed_decision(
            &keyring,
            self.keys.active_generation(),
            &outcome,
            &partner_id,
            &req.transaction_id,
        )
        .ok_or_else(|| CellError::Internal("the active key generation cannot sign".into()))?;
        if outcome.repeated {
            self.metrics.auth_repeated.inc();
        } else {
            let result = if outcome.authenticated { "yes" } else { "no" };
            self.metrics.auth_decisions.with_label_values(&[result, reason_label(&outcome.reasons)]).inc();
        }
        Ok(response)
    }

    /// Whether the identity exists: first in the applied state as it is, then (if not) after a
    /// read barrier, so only a truly unknown identifier is answered without the log.
    async fn known(&self, id: &Identifier, keyring: &Keyring) -> Result<bool, CellError> {
        let exists =
            |node: &Node<IdentityMachine>| node.view(|v| queries::exists(v, keyring, id)).map_err(read_error);
        if exists(&self.node)? {
            return Ok(true);
        }
        self.read_fence(id.bucket()).await?;
        exists(&self.node)
    }

    /// The decision for an unknown identifier: a signed "no", recorded only in metrics per partner
    /// (the partners' failed attempts matter for abuse detection; there is no identity whose
    /// audit trail could hold it). Not idempotent like recorded decisions: a retry is decided anew.
    fn unknown_identity(&self, op: &IdentityOp, partner_id: &str) -> AuthOutcome {
        let allowed = match &op.op {
            Some(nid_domain::commands::identity_op::Op::Authenticate(a)) => {
                nid_domain::authenticate::factors_allowed(a)
            }
            _ => true,
        };
        let reason = if allowed { AuthReason::UnknownId } else { AuthReason::FactorNotAllowed };
        self.metrics.auth_unknown.with_label_values(&[partner_id]).inc();
        AuthOutcome {
            authenticated: false,
            reasons: vec![reason as i32],
            uin: None,
            time_ms: self.clock.now_ms(),
            repeated: false,
        }
    }

    /// The published decision-signing keys.
    pub fn signing_keys(&self) -> GetSigningKeysResponse {
        views::signing_keys(&self.keys.keyring())
    }
}

/// Who asks, as the router authenticated the caller (its certificate name); empty without a route
/// or on a plaintext cluster.
fn actor(route: Option<&RouteHeader>) -> &str {
    route.map(|r| r.caller.as_str()).unwrap_or("")
}

/// The request id a write is keyed by: its own, or the one its route carries for the call.
fn effective_request_id<'a>(own: &'a str, route: Option<&'a RouteHeader>) -> &'a str {
    if own.is_empty() { route.map(|r| r.request_id.as_str()).unwrap_or("") } else { own }
}

/// The metric label of a decision's first reason (a bounded set: the `AuthReason` names).
fn reason_label(reasons: &[i32]) -> &'static str {
    match reasons.first().and_then(|r| AuthReason::try_from(*r).ok()) {
        None => "none",
        Some(r) => r.as_str_name().trim_start_matches("AUTH_REASON_"),
    }
}

/// A candidate collision to retry, or a final error.
enum Retry {
    Candidate,
    Error(CellError),
}

impl From<CellError> for Retry {
    fn from(e: CellError) -> Retry {
        Retry::Error(e)
    }
}
