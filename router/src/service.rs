//! The public services the router serves: validation before routing (check digits, RIDs), the
//! bucket from the request alone, then forwarding to the owning cell. Errors keep the cell's
//! status (codes, reasons, field violations) so clients see one error model.

use crate::routing::Router;
use nid_proto::bucket::{KeyDomain, bucket_of_key};
use nid_proto::error::{invalid_field, status_with_reason};
use nid_proto::v1::cell_request::Operation;
use nid_proto::v1::cell_response::Result as CellResult;
use nid_proto::v1::enrollment_server::Enrollment;
use nid_proto::v1::*;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::{Code, Request, Response, Status};

/// Deadline for a request that brings none.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);

/// The public `Enrollment` service.
pub struct EnrollmentService(pub Arc<Router>);

fn deadline_of<T>(request: &Request<T>) -> Instant {
    let timeout = request
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .unwrap_or(DEFAULT_DEADLINE)
        .min(Duration::from_secs(60));
    Instant::now() + timeout
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

async fn observed<T>(
    router: &Router,
    method: &'static str,
    f: impl Future<Output = Result<T, Status>>,
) -> Result<Response<T>, Status> {
    nid_support::observed(
        method,
        |method, code, secs| {
            router.metrics.requests.with_label_values(&[method, code]).inc();
            router.metrics.latency.with_label_values(&[method]).observe(secs);
        },
        f,
    )
    .await
}

impl EnrollmentService {
    fn identifier_bucket(&self, field: &str, id: &str) -> Result<u16, Status> {
        let scheme = self.0.scheme()?;
        scheme.parse(id).map(|i| i.bucket().get()).map_err(|e| {
            status_with_reason(
                Code::InvalidArgument,
                format!("{field}: {e}"),
                ErrorReason::InvalidIdentifier,
                &[("field", field.to_owned())],
            )
        })
    }
}

fn unexpected() -> Status {
    Status::internal("the cell answered with another operation's result")
}

#[tonic::async_trait]
impl Enrollment for EnrollmentService {
    async fn enroll(&self, request: Request<EnrollRequest>) -> Result<Response<EnrollResponse>, Status> {
        let deadline = deadline_of(&request);
        let req = request.into_inner();
        observed(&self.0, "Enroll", async {
            if req.rid.is_empty()
                || req.rid.len() > 64
                || !req.rid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(invalid_field("rid", "must be 1..=64 characters of A-Z, a-z, 0-9, '_' and '-'"));
            }
            let bucket = bucket_of_key(KeyDomain::Rid, req.rid.as_bytes()).get();
            match self.0.forward(bucket, Operation::Enroll(req), deadline).await? {
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
        let req = request.into_inner();
        observed(&self.0, "GetIdentity", async {
            let bucket = self.identifier_bucket("id", &req.id)?;
            match self.0.forward(bucket, Operation::GetIdentity(req), deadline).await? {
                CellResult::GetIdentity(r) => Ok(r),
                _ => Err(unexpected()),
            }
        })
        .await
    }

    async fn update_identity(
        &self,
        _request: Request<UpdateIdentityRequest>,
    ) -> Result<Response<UpdateIdentityResponse>, Status> {
        Err(not_yet())
    }

    async fn set_status(
        &self,
        _request: Request<SetStatusRequest>,
    ) -> Result<Response<SetStatusResponse>, Status> {
        Err(not_yet())
    }

    async fn get_history(
        &self,
        _request: Request<GetHistoryRequest>,
    ) -> Result<Response<GetHistoryResponse>, Status> {
        Err(not_yet())
    }

    async fn create_vid(
        &self,
        _request: Request<CreateVidRequest>,
    ) -> Result<Response<CreateVidResponse>, Status> {
        Err(not_yet())
    }

    async fn revoke_vid(
        &self,
        _request: Request<RevokeVidRequest>,
    ) -> Result<Response<RevokeVidResponse>, Status> {
        Err(not_yet())
    }

    async fn lock_auth_types(
        &self,
        _request: Request<LockAuthTypesRequest>,
    ) -> Result<Response<LockAuthTypesResponse>, Status> {
        Err(not_yet())
    }
}

fn not_yet() -> Status {
    Status::unimplemented("this operation arrives with the identity domain (issue #5)")
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
