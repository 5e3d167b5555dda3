//! Leader-side handlers of the identity operations after enrolment: validate the request (every
//! bad field named, no value quoted), seal what the command carries, propose it, and turn the
//! result into the public answer. Authentication decisions are signed here, after the decision and
//! its audit record have been applied.

use crate::command::{
    AuthAttempt, AuthPolicy, Command, CommandResult, HistoryEntry, IdentityCommand, IdentityOp,
    IdentityResult, LockEntry, Rejection, Target, VidEntry,
};
use crate::crypto;
use crate::enroll::{self, MAX_RECORD_BYTES};
use crate::fsm::op_aad;
use crate::service::{CellContext, RAFT_TIMEOUT, violations_status};
use nid_proto::bucket::BucketId;
use nid_proto::error::{FieldViolations, invalid_field, status_with_reason};
use nid_proto::ids::{IdKind, Identifier};
use nid_proto::v1::{
    AuthDecision, AuthLock, AuthRecord, AuthType, AuthenticateRequest, AuthenticateResponse,
    CreateVidRequest, CreateVidResponse, EnrollRequest, ErrorReason, GetAuthHistoryRequest,
    GetAuthHistoryResponse, GetHistoryRequest, GetHistoryResponse, GetIdentityRequest, GetIdentityResponse,
    GetSigningKeysResponse, Identity, IdentityStatus, LockAuthTypesRequest, LockAuthTypesResponse,
    RevokeVidRequest, RevokeVidResponse, RouteHeader, SetStatusRequest, SetStatusResponse, SigningKey,
    UpdateIdentityRequest, UpdateIdentityResponse, VerifyAuditChainRequest, VerifyAuditChainResponse,
    VidInfo, VidKind,
};
use prost::Message as _;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};
use tonic::{Code, Status};

/// Longest temporary VID lifetime.
pub const MAX_TEMPORARY_VID_MS: u64 = 30 * 24 * 3600 * 1000;
const MAX_PAGE: u32 = 500;
const DEFAULT_PAGE: u32 = 50;

/// The leader's clock. Tests shift it to cross a cool-down without waiting; production never does.
#[derive(Debug, Default)]
pub struct Clock {
    offset_ms: AtomicI64,
}

impl Clock {
    /// Unix milliseconds now, plus the test offset.
    pub fn now_ms(&self) -> u64 {
        let real = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
        real.saturating_add(self.offset_ms.load(Ordering::Relaxed)).max(0) as u64
    }

    /// Moves the clock forward by `ms` (tests only).
    pub fn advance(&self, ms: i64) {
        self.offset_ms.fetch_add(ms, Ordering::Relaxed);
    }
}

/// A protobuf timestamp of Unix milliseconds.
pub fn timestamp(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: (ms / 1000) as i64, nanos: ((ms % 1000) * 1_000_000) as i32 }
}

/// Unix milliseconds of a timestamp; None before 1970 or with out-of-range nanos.
pub fn millis(t: &prost_types::Timestamp) -> Option<u64> {
    if t.seconds < 0 || !(0..1_000_000_000).contains(&t.nanos) {
        return None;
    }
    (t.seconds as u64).checked_mul(1000)?.checked_add(t.nanos as u64 / 1_000_000)
}

fn auth_type_name(t: i32) -> Option<AuthType> {
    AuthType::try_from(t).ok().filter(|t| *t != AuthType::Unspecified)
}

fn vid_view(v: &VidEntry) -> VidInfo {
    VidInfo {
        vid: v.vid.clone(),
        kind: v.kind,
        created_at: Some(timestamp(v.created_ms)),
        expires_at: v.expires_ms.map(timestamp),
        uses_left: v.uses_left.unwrap_or(0),
        revoked: v.revoked,
    }
}

fn locks_view(locks: &[LockEntry]) -> Vec<AuthLock> {
    locks.iter().map(|l| AuthLock { auth_type: l.auth_type, until: l.until_ms.map(timestamp) }).collect()
}

/// The public view of one version of an identity.
pub fn identity_view(uin: &str, e: &HistoryEntry, now_ms: u64) -> Result<Identity, Status> {
    let req = EnrollRequest::decode(e.request.as_slice())
        .map_err(|_| Status::internal("stored record unreadable"))?;
    let locks: Vec<LockEntry> =
        e.locks.iter().filter(|l| l.until_ms.is_none_or(|u| now_ms < u)).copied().collect();
    Ok(Identity {
        uin: uin.to_owned(),
        rid: req.rid,
        status: e.status,
        version: e.version,
        created_at: Some(timestamp(e.created_ms)),
        updated_at: Some(timestamp(e.updated_ms)),
        demographics: req.demographics,
        biometrics: req.biometrics,
        vids: e.vids.iter().map(vid_view).collect(),
        auth_locks: locks_view(&locks),
        has_pin: e.has_pin,
        has_totp: e.has_totp,
    })
}

fn storage_error<E>(_: E) -> Status {
    Status::internal("storage error")
}

/// NOT_FOUND for an identifier no usable identity has.
pub(crate) fn not_found() -> Status {
    Status::not_found("no identity with this id")
}

impl CellContext {
    /// Parses an identifier of the given kinds; INVALID_ARGUMENT (reason INVALID_IDENTIFIER) names
    /// `field` otherwise.
    fn identifier(&self, field: &str, text: &str, kinds: &[IdKind]) -> Result<Identifier, Status> {
        let bad = |msg: String| {
            status_with_reason(
                Code::InvalidArgument,
                format!("{field}: {msg}"),
                ErrorReason::InvalidIdentifier,
                &[("field", field.to_owned())],
            )
        };
        let id = self.scheme.parse(text).map_err(|e| bad(e.to_string()))?;
        if !kinds.contains(&id.kind()) {
            let want = if kinds == [IdKind::Vid] { "a VID (16 digits)" } else { "a UIN (12 digits)" };
            return Err(bad(format!("must be {want}")));
        }
        Ok(id)
    }

    fn target_of(&self, id: &Identifier, text: &str) -> Target {
        self.fsm.target(id.kind() == IdKind::Vid, text)
    }

    /// Seals `op` and proposes it; returns the applied result or the mapped error.
    async fn propose_identity(
        &self,
        bucket: BucketId,
        target: Target,
        op: &IdentityOp,
    ) -> Result<IdentityResult, Status> {
        self.propose_identity_or_rejection(bucket, target, op).await?.map_err(|r| self.rejection_status(r))
    }

    /// Like [`CellContext::propose_identity`], but hands a rejection back unmapped.
    async fn propose_identity_or_rejection(
        &self,
        bucket: BucketId,
        target: Target,
        op: &IdentityOp,
    ) -> Result<Result<IdentityResult, Rejection>, Status> {
        let seed = crypto::random_bytes::<16>().map_err(|_| Status::internal("random source failed"))?;
        let nonce = crypto::random_nonce().map_err(|_| Status::internal("random source failed"))?;
        let sealed = self.keyring.seal(&op_aad(bucket.get(), &target), nonce, &crate::codec::encode(op));
        let cmd = IdentityCommand { bucket: bucket.get(), target, sealed, now_ms: self.clock.now_ms(), seed };
        match self
            .peer
            .propose(Command::Identity(cmd), RAFT_TIMEOUT)
            .await
            .map_err(|e| self.peer_status(e))?
        {
            CommandResult::Identity(r) => Ok(Ok(r)),
            CommandResult::Rejected(r) => Ok(Err(r)),
            _ => Err(Status::internal("unexpected result")),
        }
    }

    /// Reads an identity by UIN or VID (a VID resolves only while usable).
    pub async fn get_identity(&self, req: GetIdentityRequest) -> Result<GetIdentityResponse, Status> {
        let id = self.identifier("id", &req.id, &[IdKind::Uin, IdKind::Vid])?;
        self.read_fence(id.bucket()).await?;
        let now = self.clock.now_ms();
        let rec = self
            .fsm
            .lookup(id.bucket(), &self.target_of(&id, &req.id), now)
            .map_err(storage_error)?
            .ok_or_else(not_found)?;
        Ok(GetIdentityResponse {
            identity: Some(identity_view(&rec.uin, &rec.history_entry(), now)?),
            served_by: Some(self.served_by()),
        })
    }

    /// UpdateIdentity.
    pub async fn update_identity(
        &self,
        req: UpdateIdentityRequest,
    ) -> Result<UpdateIdentityResponse, Status> {
        let mut v = FieldViolations::new();
        let id = self.identifier("uin", &req.uin, &[IdKind::Uin]);
        if req.expected_version == 0 {
            v.add("expected_version", "must be the version read (>= 1)");
        }
        match &req.demographics {
            None => v.add("demographics", "is required (it replaces the stored demographics whole)"),
            Some(d) => enroll::validate_demographics(d, "demographics", &mut v),
        }
        enroll::validate_biometrics(&req.biometrics, "biometrics", &mut v);
        if v.is_empty() && req.encoded_len() > MAX_RECORD_BYTES {
            v.add("demographics", format!("the record may take at most {MAX_RECORD_BYTES} bytes"));
        }
        let id = id?;
        if !v.is_empty() {
            return Err(violations_status(v));
        }
        let op = IdentityOp::Update {
            expected_version: req.expected_version,
            demographics: req.demographics.unwrap_or_default().encode_to_vec(),
            biometrics: req.biometrics.iter().map(|b| b.encode_to_vec()).collect(),
        };
        match self.propose_identity(id.bucket(), self.target_of(&id, &req.uin), &op).await? {
            IdentityResult::Version(version) => Ok(UpdateIdentityResponse { version }),
            _ => Err(Status::internal("unexpected result")),
        }
    }

    /// SetStatus.
    pub async fn set_status(&self, req: SetStatusRequest) -> Result<SetStatusResponse, Status> {
        let id = self.identifier("uin", &req.uin, &[IdKind::Uin])?;
        let mut v = FieldViolations::new();
        if !matches!(
            IdentityStatus::try_from(req.status),
            Ok(IdentityStatus::Activated | IdentityStatus::Blocked | IdentityStatus::Deactivated)
        ) {
            v.add("status", "must be ACTIVATED, BLOCKED or DEACTIVATED");
        }
        let n = req.reason.chars().count();
        if n == 0 || n > 256 {
            v.add("reason", "must be 1..=256 characters");
        }
        if !v.is_empty() {
            return Err(violations_status(v));
        }
        let op = IdentityOp::SetStatus { status: req.status, reason: req.reason };
        match self.propose_identity(id.bucket(), self.target_of(&id, &req.uin), &op).await? {
            IdentityResult::Version(version) => Ok(SetStatusResponse { version }),
            _ => Err(Status::internal("unexpected result")),
        }
    }

    /// GetHistory.
    pub async fn get_history(&self, req: GetHistoryRequest) -> Result<GetHistoryResponse, Status> {
        let id = self.identifier("uin", &req.uin, &[IdKind::Uin])?;
        if req.limit > MAX_PAGE {
            return Err(invalid_field("limit", format!("at most {MAX_PAGE}")));
        }
        let limit = if req.limit == 0 { DEFAULT_PAGE } else { req.limit } as usize;
        self.read_fence(id.bucket()).await?;
        if self.fsm.get_identity(id.bucket(), &req.uin).map_err(storage_error)?.is_none() {
            return Err(not_found());
        }
        let now = self.clock.now_ms();
        let (entries, next) =
            self.fsm.history(id.bucket(), &req.uin, req.from_version.max(1), limit).map_err(storage_error)?;
        Ok(GetHistoryResponse {
            versions: entries.iter().map(|e| identity_view(&req.uin, e, now)).collect::<Result<_, _>>()?,
            next_version: next.unwrap_or(0),
        })
    }

    /// CreateVid.
    pub async fn create_vid(&self, req: CreateVidRequest) -> Result<CreateVidResponse, Status> {
        let id = self.identifier("uin", &req.uin, &[IdKind::Uin])?;
        let now = self.clock.now_ms();
        let mut v = FieldViolations::new();
        let mut expires_ms = None;
        let mut max_uses = None;
        match VidKind::try_from(req.kind) {
            Ok(VidKind::Perpetual) => {
                if req.expires_at.is_some() {
                    v.add("expires_at", "must be absent for a perpetual VID");
                }
                if req.max_uses != 0 {
                    v.add("max_uses", "must be 0 for a perpetual VID");
                }
            }
            Ok(VidKind::Temporary) => {
                match req.expires_at.as_ref().and_then(millis) {
                    Some(e) if e > now && e - now <= MAX_TEMPORARY_VID_MS => expires_ms = Some(e),
                    _ => v.add("expires_at", "must be in the future and at most 30 days away"),
                }
                if req.max_uses > 100 {
                    v.add("max_uses", "must be 0 (unlimited until expiry) or 1..=100");
                }
                max_uses = (req.max_uses > 0).then_some(req.max_uses);
            }
            _ => v.add("kind", "must be PERPETUAL or TEMPORARY"),
        }
        if !v.is_empty() {
            return Err(violations_status(v));
        }
        let target = self.target_of(&id, &req.uin);
        for _ in 0..3 {
            let mut random = enroll::seeded_random().map_err(|_| Status::internal("random source failed"))?;
            let mut candidates = Vec::with_capacity(2);
            for _ in 0..2 {
                let vid = self
                    .scheme
                    .generate(IdKind::Vid, id.bucket(), &mut random)
                    .map_err(|_| Status::internal("random source failed"))?;
                candidates.push(vid.to_digits());
            }
            let op = IdentityOp::CreateVid { kind: req.kind, expires_ms, max_uses, candidates };
            match self.propose_identity_or_rejection(id.bucket(), target, &op).await? {
                Ok(IdentityResult::Vid(vid)) => return Ok(CreateVidResponse { vid: Some(vid_view(&vid)) }),
                Ok(_) => return Err(Status::internal("unexpected result")),
                Err(Rejection::CandidatesTaken) => continue,
                Err(r) => return Err(self.rejection_status(r)),
            }
        }
        Err(Status::unavailable("vid candidates kept colliding; retry"))
    }

    /// RevokeVid.
    pub async fn revoke_vid(&self, req: RevokeVidRequest) -> Result<RevokeVidResponse, Status> {
        let id = self.identifier("vid", &req.vid, &[IdKind::Vid])?;
        match self
            .propose_identity(id.bucket(), self.target_of(&id, &req.vid), &IdentityOp::RevokeVid)
            .await?
        {
            IdentityResult::VidRevoked => Ok(RevokeVidResponse {}),
            _ => Err(Status::internal("unexpected result")),
        }
    }

    /// LockAuthTypes.
    pub async fn lock_auth_types(&self, req: LockAuthTypesRequest) -> Result<LockAuthTypesResponse, Status> {
        let id = self.identifier("id", &req.id, &[IdKind::Uin, IdKind::Vid])?;
        let now = self.clock.now_ms();
        let mut v = FieldViolations::new();
        if req.lock.is_empty() && req.unlock.is_empty() {
            v.add("lock", "lock or unlock at least one auth type");
        }
        let mut lock = Vec::new();
        for (i, l) in req.lock.iter().enumerate() {
            if auth_type_name(l.auth_type).is_none() {
                v.add(format!("lock[{i}].auth_type"), "must be DEMOGRAPHIC, PIN or TOTP");
            }
            let until_ms = match &l.until {
                None => None,
                Some(t) => match millis(t) {
                    Some(ms) if ms > now => Some(ms),
                    _ => {
                        v.add(format!("lock[{i}].until"), "must be in the future");
                        None
                    }
                },
            };
            lock.push(LockEntry { auth_type: l.auth_type, until_ms });
        }
        for (i, t) in req.unlock.iter().enumerate() {
            if auth_type_name(*t).is_none() {
                v.add(format!("unlock[{i}]"), "must be DEMOGRAPHIC, PIN or TOTP");
            } else if req.lock.iter().any(|l| l.auth_type == *t) {
                v.add(format!("unlock[{i}]"), "cannot lock and unlock the same auth type");
            }
        }
        if !v.is_empty() {
            return Err(violations_status(v));
        }
        let op = IdentityOp::LockAuthTypes { lock, unlock: req.unlock };
        match self.propose_identity(id.bucket(), self.target_of(&id, &req.id), &op).await? {
            IdentityResult::Locks(locks) => Ok(LockAuthTypesResponse { locks: locks_view(&locks) }),
            _ => Err(Status::internal("unexpected result")),
        }
    }

    /// Authenticate: decides, audits (one Raft write) and signs.
    pub async fn authenticate(
        &self,
        req: AuthenticateRequest,
        route: Option<&RouteHeader>,
        policy: AuthPolicy,
    ) -> Result<AuthenticateResponse, Status> {
        let partner_id = route.map(|r| r.partner_id.clone()).unwrap_or_default();
        if partner_id.is_empty() {
            return Err(status_with_reason(
                Code::Unauthenticated,
                "no authenticated partner on the request",
                ErrorReason::UnauthenticatedPartner,
                &[],
            ));
        }
        let id = self.identifier("id", &req.id, &[IdKind::Uin, IdKind::Vid]);
        let mut v = FieldViolations::new();
        let txn_ok = (1..=64).contains(&req.transaction_id.len())
            && req.transaction_id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
        if !txn_ok {
            v.add("transaction_id", "must be 1..=64 characters of A-Z, a-z, 0-9, '-', '_', '.', ':'");
        }
        let request_time_ms = req.request_time.as_ref().and_then(millis);
        if request_time_ms.is_none() {
            v.add("request_time", "is required (a time after 1970)");
        }
        let factors = req.factors.unwrap_or_default();
        let demographic = factors.demographic.as_ref();
        if demographic.is_none() && factors.pin.is_empty() && factors.totp.is_empty() {
            v.add("factors", "present at least one factor");
        }
        if let Some(d) = demographic {
            let any = !d.full_name.is_empty()
                || !d.date_of_birth.is_empty()
                || d.gender != 0
                || !d.phone.is_empty()
                || !d.email.is_empty();
            if !any {
                v.add("factors.demographic", "set at least one field to compare");
            }
            if d.full_name.chars().count() > 256 {
                v.add("factors.demographic.full_name", "at most 256 characters");
            }
            if !d.date_of_birth.is_empty() && !enroll::valid_date(&d.date_of_birth) {
                v.add("factors.demographic.date_of_birth", "must be a calendar date YYYY-MM-DD");
            }
            if nid_proto::v1::Gender::try_from(d.gender).is_err() {
                v.add("factors.demographic.gender", "must be one of the Gender values");
            }
            if !d.phone.is_empty() && !enroll::valid_phone(&d.phone) {
                v.add("factors.demographic.phone", "must be E.164: '+' then 8..=15 digits");
            }
            if !d.email.is_empty() && d.email.len() > 254 {
                v.add("factors.demographic.email", "at most 254 characters");
            }
            if nid_proto::v1::MatchMode::try_from(d.match_mode).is_err() {
                v.add("factors.demographic.match_mode", "must be EXACT or NORMALIZED");
            }
        }
        if !factors.pin.is_empty()
            && (!(4..=8).contains(&factors.pin.len()) || !factors.pin.bytes().all(|b| b.is_ascii_digit()))
        {
            v.add("factors.pin", "must be 4..=8 digits");
        }
        if !factors.totp.is_empty()
            && (factors.totp.len() != 6 || !factors.totp.bytes().all(|b| b.is_ascii_digit()))
        {
            v.add("factors.totp", "must be 6 digits");
        }
        let id = id?;
        if !v.is_empty() {
            return Err(violations_status(v));
        }
        let attempt = AuthAttempt {
            partner_id: partner_id.clone(),
            allowed: route.map(|r| r.partner_allowed.clone()).unwrap_or_default(),
            transaction_id: req.transaction_id.clone(),
            request_time_ms: request_time_ms.unwrap_or(0),
            demographic: demographic.map(|d| d.encode_to_vec()),
            pin: (!factors.pin.is_empty()).then_some(factors.pin),
            totp: (!factors.totp.is_empty()).then_some(factors.totp),
            policy,
        };
        let target = self.target_of(&id, &req.id);
        let outcome =
            match self.propose_identity(id.bucket(), target, &IdentityOp::Authenticate(attempt)).await? {
                IdentityResult::Auth(o) => o,
                _ => return Err(Status::internal("unexpected result")),
            };
        // A token only accompanies a yes: a "no" tells the partner nothing about the person.
        let partner_token = match (&outcome.uin, outcome.authenticated) {
            (Some(uin), true) => self.keyring.partner_token(&partner_id, uin),
            _ => String::new(),
        };
        let decision = AuthDecision {
            authenticated: outcome.authenticated,
            reasons: outcome.reasons,
            partner_token,
            transaction_id: req.transaction_id,
            partner_id,
            response_time: Some(timestamp(outcome.time_ms)),
        };
        let signed_decision = decision.encode_to_vec();
        let signature = self.keyring.sign(&signed_decision);
        if outcome.repeated {
            self.metrics.auth_repeated.inc();
        } else {
            self.metrics
                .auth_decisions
                .with_label_values(&[if decision.authenticated { "yes" } else { "no" }])
                .inc();
        }
        Ok(AuthenticateResponse {
            decision: Some(decision),
            signed_decision,
            signature,
            key_id: self.keyring.signing_key_id().to_owned(),
        })
    }

    /// GetAuthHistory: newest first; the page token is the sequence number to continue below.
    pub async fn get_auth_history(
        &self,
        req: GetAuthHistoryRequest,
    ) -> Result<GetAuthHistoryResponse, Status> {
        let id = self.identifier("id", &req.id, &[IdKind::Uin, IdKind::Vid])?;
        if req.limit > MAX_PAGE {
            return Err(invalid_field("limit", format!("at most {MAX_PAGE}")));
        }
        let before = if req.page_token.is_empty() {
            None
        } else {
            Some(
                u64::from_str_radix(&req.page_token, 16)
                    .ok()
                    .filter(|&s| s > 0)
                    .ok_or_else(|| invalid_field("page_token", "is not a token this service issued"))?,
            )
        };
        let limit = if req.limit == 0 { DEFAULT_PAGE } else { req.limit } as usize;
        self.read_fence(id.bucket()).await?;
        let rec = self
            .fsm
            .lookup(id.bucket(), &self.target_of(&id, &req.id), self.clock.now_ms())
            .map_err(storage_error)?
            .ok_or_else(not_found)?;
        let (records, next) =
            self.fsm.audit_page(id.bucket(), &rec.uin, before, limit).map_err(storage_error)?;
        Ok(GetAuthHistoryResponse {
            records: records
                .into_iter()
                .map(|r| AuthRecord {
                    time: Some(timestamp(r.time_ms)),
                    partner_id: r.partner_id,
                    transaction_id: r.transaction_id,
                    authenticated: r.authenticated,
                    reasons: r.reasons,
                    auth_types: r.auth_types,
                })
                .collect(),
            next_page_token: next.map(|s| format!("{s:x}")).unwrap_or_default(),
        })
    }

    /// VerifyAuditChain.
    pub async fn verify_audit_chain(
        &self,
        req: VerifyAuditChainRequest,
    ) -> Result<VerifyAuditChainResponse, Status> {
        let id = self.identifier("uin", &req.uin, &[IdKind::Uin])?;
        self.read_fence(id.bucket()).await?;
        let rec =
            self.fsm.get_identity(id.bucket(), &req.uin).map_err(storage_error)?.ok_or_else(not_found)?;
        let report = self.fsm.verify_audit_chain(id.bucket(), &rec).map_err(storage_error)?;
        if !report.intact {
            tracing::warn!(cell = self.cell_id, first_broken = report.first_broken, "audit chain broken");
        }
        Ok(VerifyAuditChainResponse {
            intact: report.intact,
            records: report.records,
            first_broken: report.first_broken,
        })
    }

    /// The published decision-signing keys.
    pub fn signing_keys(&self) -> GetSigningKeysResponse {
        GetSigningKeysResponse {
            keys: self
                .keyring
                .signing_public_keys()
                .into_iter()
                .map(|(key_id, public_key)| SigningKey {
                    key_id,
                    public_key,
                    not_before: None,
                    not_after: None,
                })
                .collect(),
        }
    }
}
