//! The public services the router serves: the domain's validation before routing (every field, the
//! same rules the cells apply, so a malformed request never costs a hop), the bucket from the
//! request alone, then forwarding to the owning cell. Errors keep the cell's
//! status (codes, reasons, field violations) so clients see one error model.

use crate::partners::Partners;
use crate::routing::{Authenticated, Router};
use nid_domain::validate::{self, Invalid};
use nid_proto::bucket::{KeyDomain, bucket_of_key};
use nid_proto::error::{invalid_field, invalid_identifier};
use nid_proto::ids::{IdScheme, Identifier};
use nid_proto::v1::authentication_server::Authentication;
use nid_proto::v1::cell_client::CellClient;
use nid_proto::v1::cell_request::Operation;
use nid_proto::v1::cell_response::Result as CellResult;
use nid_proto::v1::diagnostics_server::Diagnostics;
use nid_proto::v1::enrollment_server::Enrollment;
use nid_proto::v1::*;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status};

/// Deadline for a request that brings none.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);

/// The public `Enrollment` service.
pub struct EnrollmentService(pub Arc<Router>);

/// When the router gives up on a request: a little before the client's `grpc-timeout` (a tenth of
/// it, at least 50 ms and at most 250 ms, never more than half), so that the answer is the model's
/// DEADLINE_EXCEEDED (reason TIMEOUT) and not the CANCELLED "Timeout expired" the gRPC server
/// answers once the header's time is up.
fn deadline_of<T>(request: &Request<T>) -> Instant {
    let timeout = request
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .unwrap_or(DEFAULT_DEADLINE)
        .min(Duration::from_secs(60));
    let margin = (timeout / 10).clamp(Duration::from_millis(50), Duration::from_millis(250)).min(timeout / 2);
    Instant::now() + timeout - margin
}

/// Parses a `grpc-timeout` header (up to 8 digits and a unit); anything else is ignored.
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if !v.is_ascii() || v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (n, unit) = v.split_at(v.len() - 1);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Who calls, by the name in the verified client certificate (empty on a plaintext listener): the
/// cells key request ids by it and record it as the author of each change.
pub fn caller_of<T>(request: &Request<T>) -> String {
    nid_support::tls::peer_of(request.extensions()).map(|p| p.name()).unwrap_or_default()
}

/// Wraps a handler's result in a response (the gRPC metrics layer records every call).
pub async fn respond<T>(body: impl Future<Output = Result<T, Status>>) -> Result<Response<T>, Status> {
    body.await.map(Response::new)
}

fn unexpected() -> Status {
    Status::internal("the cell answered with another operation's result")
}

#[tonic::async_trait]
impl Enrollment for EnrollmentService {
    async fn enroll(&self, request: Request<EnrollRequest>) -> Result<Response<EnrollResponse>, Status> {
        let deadline = deadline_of(&request);
        let caller = caller_of(&request);
        let req = request.into_inner();
        respond(async {
            validate::enroll(&req, now_ms()).map_err(invalid)?;
            let bucket = bucket_of_key(KeyDomain::Rid, req.rid.as_bytes()).get();
            match self.0.forward(bucket, Operation::Enroll(req), deadline, &caller).await? {
                CellResult::Enroll(r) => Ok(r),
                _ => Err(unexpected()),
            }
        })
        .await
    }

    async fn get_identity(
        &self,
        request: Request<GetIdentityRequest>,
    ) -> Result<Response<GetIdentityResponse>, Status> {
        let deadline = deadline_of(&request);
        let caller = caller_of(&request);
        let req = request.into_inner();
        respond(async {
            let bucket = checked(&self.0, |scheme| validate::get_identity(scheme, &req))?.bucket().get();
            match self.0.forward(bucket, Operation::GetIdentity(req), deadline, &caller).await? {
                CellResult::GetIdentity(r) => Ok(r),
                _ => Err(unexpected()),
            }
        })
        .await
    }

    async fn update_identity(
        &self,
        request: Request<UpdateIdentityRequest>,
    ) -> Result<Response<UpdateIdentityResponse>, Status> {
        let deadline = deadline_of(&request);
        let caller = caller_of(&request);
        let req = request.into_inner();
        let bucket = checked(&self.0, |scheme| validate::update(scheme, &req, now_ms()));
        by_bucket(&self.0, bucket, Operation::UpdateIdentity(req), deadline, None, &caller, |r| match r {
            CellResult::UpdateIdentity(r) => Some(r),
            _ => None,
        })
        .await
    }

    async fn set_status(
        &self,
        request: Request<SetStatusRequest>,
    ) -> Result<Response<SetStatusResponse>, Status> {
        let deadline = deadline_of(&request);
        let caller = caller_of(&request);
        let req = request.into_inner();
        let bucket = checked(&self.0, |scheme| validate::set_status(scheme, &req));
        by_bucket(&self.0, bucket, Operation::SetStatus(req), deadline, None, &caller, |r| match r {
            CellResult::SetStatus(r) => Some(r),
            _ => None,
        })
        .await
    }

    async fn get_history(
        &self,
        request: Request<GetHistoryRequest>,
    ) -> Result<Response<GetHistoryResponse>, Status> {
        let deadline = deadline_of(&request);
        let caller = caller_of(&request);
        let req = request.into_inner();
        let bucket = checked(&self.0, |scheme| validate::get_history(scheme, &req).map(|(id, _)| id));
        by_bucket(&self.0, bucket, Operation::GetHistory(req), deadline, None, &caller, |r| match r {
            CellResult::GetHistory(r) => Some(r),
            _ => None,
        })
        .await
    }

    async fn create_vid(
        &self,
        request: Request<CreateVidRequest>,
    ) -> Result<Response<CreateVidResponse>, Status> {
        let deadline = deadline_of(&request);
        let caller = caller_of(&request);
        let req = request.into_inner();
        let bucket = checked(&self.0, |scheme| validate::create_vid(scheme, &req, now_ms()).map(|v| v.uin));
        by_bucket(&self.0, bucket, Operation::CreateVid(req), deadline, None, &caller, |r| match r {
            CellResult::CreateVid(r) => Some(r),
            _ => None,
        })
        .await
    }

    async fn revoke_vid(
        &self,
        request: Request<RevokeVidRequest>,
    ) -> Result<Response<RevokeVidResponse>, Status> {
        let deadline = deadline_of(&request);
        let caller = caller_of(&request);
        let req = request.into_inner();
        let bucket = checked(&self.0, |scheme| validate::revoke_vid(scheme, &req));
        by_bucket(&self.0, bucket, Operation::RevokeVid(req), deadline, None, &caller, |r| match r {
            CellResult::RevokeVid(r) => Some(r),
            _ => None,
        })
        .await
    }

    async fn lock_auth_types(
        &self,
        request: Request<LockAuthTypesRequest>,
    ) -> Result<Response<LockAuthTypesResponse>, Status> {
        let deadline = deadline_of(&request);
        let caller = caller_of(&request);
        let req = request.into_inner();
        let bucket =
            checked(&self.0, |scheme| validate::lock_auth_types(scheme, &req, now_ms()).map(|l| l.id));
        by_bucket(&self.0, bucket, Operation::LockAuthTypes(req), deadline, None, &caller, |r| match r {
            CellResult::LockAuthTypes(r) => Some(r),
            _ => None,
        })
        .await
    }
}

/// Routes a validated request (its identifier, or why it is invalid) by its bucket and unwraps the
/// matching result.
#[allow(clippy::too_many_arguments)]
pub async fn by_bucket<T>(
    router: &Router,
    id: Result<Identifier, Status>,
    operation: Operation,
    deadline: Instant,
    partner: Option<&Authenticated>,
    caller: &str,
    extract: impl FnOnce(CellResult) -> Option<T>,
) -> Result<Response<T>, Status> {
    respond(async {
        let bucket = id?.bucket().get();
        let result = router.forward_as(bucket, operation, deadline, partner, caller).await?;
        extract(result).ok_or_else(unexpected)
    })
    .await
}

/// Runs the domain's validation of a request with the cluster's identifier scheme.
pub fn checked<T>(router: &Router, f: impl FnOnce(&IdScheme) -> Result<T, Invalid>) -> Result<T, Status> {
    let scheme = router.scheme()?;
    f(&scheme).map_err(invalid)
}

/// The status of an invalid request: the same model the cells answer with.
fn invalid(i: Invalid) -> Status {
    match i {
        Invalid::Identifier { field, message } => invalid_identifier(&field, message),
        Invalid::Fields(v) => {
            v.into_result().err().unwrap_or_else(|| Status::invalid_argument("invalid request"))
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The public `Authentication` service: partners authenticate with their API key; decisions are
/// made, audited and signed by the owning cell.
pub struct AuthenticationService {
    /// Routing.
    pub router: Arc<Router>,
    /// Partner credentials.
    pub partners: Arc<Partners>,
    /// Signing keys fetched from a cell, cached.
    pub keys: tokio::sync::RwLock<Option<(Instant, GetSigningKeysResponse)>>,
}

#[tonic::async_trait]
impl Authentication for AuthenticationService {
    async fn authenticate(
        &self,
        request: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        let deadline = deadline_of(&request);
        let caller = caller_of(&request);
        let peer = nid_support::tls::peer_of(request.extensions());
        let partner = self.partners.authenticate(&self.router, request.metadata()).await;
        let req = request.into_inner();
        let partner = match partner {
            Ok(p) => p,
            Err(e) => return respond(async { Err(e) }).await,
        };
        // Over TLS the API key must be the certificate holder's own: a leaked key is useless
        // without the partner's certificate, and the reverse.
        if let Some(nid_support::tls::Peer::Partner(id)) = &peer
            && *id != partner.partner_id
        {
            return respond(async {
                Err(nid_proto::error::status_with_reason(
                    tonic::Code::PermissionDenied,
                    "the API key belongs to another partner than the client certificate",
                    ErrorReason::UnauthenticatedPartner,
                    &[],
                ))
            })
            .await;
        }
        let bucket = checked(&self.router, |scheme| validate::authenticate(scheme, &req).map(|a| a.id));
        by_bucket(
            &self.router,
            bucket,
            Operation::Authenticate(req),
            deadline,
            Some(&partner),
            &caller,
            |r| match r {
                CellResult::Authenticate(r) => Some(r),
                _ => None,
            },
        )
        .await
    }

    async fn get_signing_keys(
        &self,
        _request: Request<GetSigningKeysRequest>,
    ) -> Result<Response<GetSigningKeysResponse>, Status> {
        respond(async {
            if let Some((at, keys)) = self.keys.read().await.as_ref()
                && at.elapsed() < Duration::from_secs(60)
            {
                return Ok(keys.clone());
            }
            let mut last = Status::unavailable("no cell is reachable");
            for address in self.router.any_replicas() {
                let mut req = Request::new(GetSigningKeysRequest {});
                req.set_timeout(Duration::from_secs(1));
                match CellClient::new(self.router.channel(&address)?).get_signing_keys(req).await {
                    Ok(r) => {
                        let keys = r.into_inner();
                        *self.keys.write().await = Some((Instant::now(), keys.clone()));
                        return Ok(keys);
                    }
                    Err(e) => last = e,
                }
            }
            Err(last)
        })
        .await
    }

    async fn get_auth_history(
        &self,
        request: Request<GetAuthHistoryRequest>,
    ) -> Result<Response<GetAuthHistoryResponse>, Status> {
        let deadline = deadline_of(&request);
        let caller = caller_of(&request);
        let req = request.into_inner();
        let bucket =
            checked(&self.router, |scheme| validate::get_auth_history(scheme, &req).map(|(id, _, _)| id));
        by_bucket(
            &self.router,
            bucket,
            Operation::GetAuthHistory(req),
            deadline,
            None,
            &caller,
            |r| match r {
                CellResult::GetAuthHistory(r) => Some(r),
                _ => None,
            },
        )
        .await
    }
}

/// Largest echo payload.
pub const MAX_ECHO_PAYLOAD: usize = 64 << 10;

/// The public `Diagnostics` service: an echo through the owning cell's leader, without Raft or disk.
pub struct DiagnosticsService(pub Arc<Router>);

#[tonic::async_trait]
impl Diagnostics for DiagnosticsService {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoResponse>, Status> {
        let deadline = deadline_of(&request);
        let req = request.into_inner();
        respond(async {
            if req.payload.len() > MAX_ECHO_PAYLOAD {
                return Err(invalid_field("payload", "must be at most 64 KiB"));
            }
            let bucket = nid_proto::bucket::BucketId::new(req.bucket)
                .ok_or_else(|| invalid_field("bucket", "must be 0..=16383"))?
                .get();
            let payload = self.0.echo(bucket, req.payload, deadline).await?;
            Ok(EchoResponse { payload })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_and_hostile_headers_are_ignored() {
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("3S"), Some(Duration::from_secs(3)));
        assert_eq!(parse_grpc_timeout("99999999H"), Some(Duration::from_secs(99_999_999 * 3600)));
        for bad in ["", "m", "12", "-5S", "1x", "123456789S", "1é", "18446744073709551615H"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }
}
