//! The one error type of a replica's services, and the one place it becomes a gRPC status with
//! rich details (`google.rpc.ErrorInfo` reasons, BadRequest field violations, RetryInfo). Handlers
//! return [`CellError`]; engine, state-machine and validation failures convert into it.
//!
//! Messages never quote identifiers or personal data.

use nid_control::ControlRejection;
use nid_domain::outcome::Rejection;
use nid_domain::validate::Invalid;
use nid_engine::EngineError;
use nid_proto::error::{FieldViolations, RoutingHint, status_with_reason};
use nid_proto::v1::ErrorReason;
use std::time::Duration;
use tonic::{Code, Status};

/// Why a request to a replica failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CellError {
    /// Bad fields (INVALID_ARGUMENT with a violation per field).
    #[error("invalid request")]
    Invalid(FieldViolations),
    /// A bad identifier field (INVALID_ARGUMENT, reason INVALID_IDENTIFIER).
    #[error("{message}")]
    InvalidIdentifier {
        /// The field.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// No identity has the identifier.
    #[error("no identity with this id")]
    NotFound,
    /// This replica does not lead its cell (UNAVAILABLE, reason NOT_LEADER with the leader).
    #[error("not the cell leader")]
    NotLeader {
        /// The cell.
        cell_id: u64,
        /// The leader's node id and address, when known.
        leader: Option<(u64, String)>,
    },
    /// The cell does not own the bucket (UNAVAILABLE, reason WRONG_OWNER).
    #[error("this cell does not own the bucket")]
    WrongOwner {
        /// The bucket.
        bucket: u16,
        /// The table version behind the cell's belief.
        table_version: u64,
    },
    /// Retry after a delay (a migrating bucket, a dropped proposal).
    #[error("retry shortly")]
    RetryLater {
        /// The delay.
        after: Duration,
    },
    /// A Raft proposal or read did not complete in time; a write's outcome is unknown.
    #[error("the cell did not answer in time; the outcome of a write is unknown")]
    Timeout,
    /// The replica sheds load (RESOURCE_EXHAUSTED, reason OVERLOADED, RetryInfo).
    #[error("the replica is overloaded; retry with backoff")]
    Overloaded {
        /// A suggested wait.
        retry_after: Duration,
    },
    /// The replica is stopping or stopped.
    #[error("the replica is stopping")]
    Stopped,
    /// ABORTED, reason VERSION_MISMATCH.
    #[error("expected_version is stale; the current version is {current}")]
    VersionMismatch {
        /// The current version.
        current: u64,
    },
    /// ALREADY_EXISTS, reason RID_CONFLICT.
    #[error("the rid was enrolled with a different payload")]
    RidConflict,
    /// ALREADY_EXISTS, reason REQUEST_ID_REUSED.
    #[error("the request id was already used for a different request")]
    RequestIdReused,
    /// FAILED_PRECONDITION: the change is not allowed in the current state.
    #[error("{0}")]
    NotAllowed(String),
    /// ALREADY_EXISTS.
    #[error("{0}")]
    AlreadyExists(String),
    /// ABORTED: a compare-and-swap lost.
    #[error("{0}")]
    Aborted(String),
    /// UNAUTHENTICATED.
    #[error("{message}")]
    Unauthenticated {
        /// What is missing.
        message: String,
        /// The reason.
        reason: ErrorReason,
    },
    /// An internal failure (storage, an invariant); the message names no data.
    #[error("{0}")]
    Internal(String),
}

impl From<Invalid> for CellError {
    fn from(i: Invalid) -> CellError {
        match i {
            Invalid::Fields(v) => CellError::Invalid(v),
            Invalid::Identifier { field, message } => CellError::InvalidIdentifier { field, message },
        }
    }
}

impl From<FieldViolations> for CellError {
    fn from(v: FieldViolations) -> CellError {
        CellError::Invalid(v)
    }
}

impl CellError {
    /// One bad field.
    pub fn field(field: &str, description: impl Into<String>) -> CellError {
        let mut v = FieldViolations::new();
        v.add(field, description);
        CellError::Invalid(v)
    }

    /// An engine failure of cell `cell_id`, with the leader's address from `address_of`.
    pub fn from_engine(
        e: EngineError,
        cell_id: u64,
        address_of: impl Fn(u64) -> Option<String>,
    ) -> CellError {
        match e {
            EngineError::NotLeader { leader } => CellError::NotLeader {
                cell_id,
                leader: leader.and_then(|id| address_of(id).map(|a| (id, a))),
            },
            EngineError::WrongOwner { bucket, table_version } => {
                CellError::WrongOwner { bucket, table_version }
            }
            EngineError::RetryLater { .. } => CellError::RetryLater { after: Duration::from_millis(100) },
            EngineError::Timeout => CellError::Timeout,
            EngineError::Dropped => CellError::RetryLater { after: Duration::from_millis(50) },
            EngineError::Busy { retry_after } => CellError::Overloaded { retry_after },
            EngineError::Stopped => CellError::Stopped,
            EngineError::Malformed(_) => CellError::Internal("the command could not be applied".into()),
            EngineError::StaleTableVersion { current } => {
                CellError::NotAllowed(format!("routing-table version is older than the recorded {current}"))
            }
            EngineError::Invalid(m) => CellError::NotAllowed(m),
        }
    }
}

impl From<Rejection> for CellError {
    fn from(r: Rejection) -> CellError {
        match r {
            Rejection::RidConflict => CellError::RidConflict,
            Rejection::NotFound => CellError::NotFound,
            Rejection::VersionMismatch { current } => CellError::VersionMismatch { current },
            Rejection::NotAllowed(refusal) => CellError::NotAllowed(refusal.to_string()),
            Rejection::CandidatesTaken => CellError::RetryLater { after: Duration::from_millis(10) },
            Rejection::RequestIdReused => CellError::RequestIdReused,
            Rejection::Malformed(_) => CellError::Internal("the command could not be applied".into()),
        }
    }
}

impl From<ControlRejection> for CellError {
    fn from(r: ControlRejection) -> CellError {
        match r {
            ControlRejection::Malformed(_) | ControlRejection::Exhausted => {
                CellError::NotAllowed(r.to_string())
            }
            ControlRejection::ClusterExists | ControlRejection::PartnerExists => {
                CellError::AlreadyExists(r.to_string())
            }
            ControlRejection::NoCluster => CellError::NotAllowed(r.to_string()),
            ControlRejection::MoveConflict
            | ControlRejection::MigrationConflict(_)
            | ControlRejection::RegistryChanged => CellError::Aborted(r.to_string()),
            ControlRejection::NoSuchCell => CellError::NotFound,
            ControlRejection::CellBusy(_) => CellError::NotAllowed(r.to_string()),
        }
    }
}

impl From<CellError> for Status {
    fn from(e: CellError) -> Status {
        let message = e.to_string();
        match e {
            CellError::Invalid(v) => {
                v.into_result().err().unwrap_or_else(|| Status::invalid_argument("invalid request"))
            }
            CellError::InvalidIdentifier { field, .. } => {
                nid_proto::error::invalid_identifier(&field, message)
            }
            CellError::NotFound => Status::not_found(message),
            CellError::NotLeader { cell_id, leader } => {
                RoutingHint::NotLeader { cell_id, leader }.into_status()
            }
            CellError::WrongOwner { bucket, table_version } => {
                RoutingHint::WrongOwner { bucket, owner_cell: None, table_version }.into_status()
            }
            CellError::RetryLater { after } => RoutingHint::RetryLater { after }.into_status(),
            CellError::Timeout => {
                status_with_reason(Code::DeadlineExceeded, message, ErrorReason::Timeout, &[])
            }
            CellError::Overloaded { retry_after } => nid_proto::error::overloaded(message, retry_after),
            CellError::Stopped => Status::unavailable(message),
            CellError::VersionMismatch { current } => status_with_reason(
                Code::Aborted,
                message,
                ErrorReason::VersionMismatch,
                &[("current_version", current.to_string())],
            ),
            CellError::RidConflict => {
                status_with_reason(Code::AlreadyExists, message, ErrorReason::RidConflict, &[])
            }
            CellError::RequestIdReused => {
                status_with_reason(Code::AlreadyExists, message, ErrorReason::RequestIdReused, &[])
            }
            CellError::NotAllowed(_) => Status::failed_precondition(message),
            CellError::AlreadyExists(_) => Status::already_exists(message),
            CellError::Aborted(_) => Status::aborted(message),
            CellError::Unauthenticated { reason, .. } => {
                status_with_reason(Code::Unauthenticated, message, reason, &[])
            }
            CellError::Internal(_) => Status::internal(message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nid_proto::error::reason_of;

    #[test]
    fn every_error_maps_to_its_code_and_reason() {
        let cases: Vec<(CellError, Code, Option<&str>)> = vec![
            (CellError::field("rid", "bad"), Code::InvalidArgument, None),
            (
                CellError::InvalidIdentifier { field: "id".into(), message: "id: bad".into() },
                Code::InvalidArgument,
                Some("INVALID_IDENTIFIER"),
            ),
            (CellError::NotFound, Code::NotFound, None),
            (CellError::NotLeader { cell_id: 1, leader: None }, Code::Unavailable, Some("NOT_LEADER")),
            (CellError::WrongOwner { bucket: 3, table_version: 2 }, Code::Unavailable, Some("WRONG_OWNER")),
            (
                CellError::RetryLater { after: Duration::from_millis(5) },
                Code::Unavailable,
                Some("RETRY_LATER"),
            ),
            (CellError::Timeout, Code::DeadlineExceeded, Some("TIMEOUT")),
            (
                CellError::Overloaded { retry_after: Duration::from_millis(5) },
                Code::ResourceExhausted,
                Some("OVERLOADED"),
            ),
            (CellError::VersionMismatch { current: 4 }, Code::Aborted, Some("VERSION_MISMATCH")),
            (CellError::RidConflict, Code::AlreadyExists, Some("RID_CONFLICT")),
            (CellError::RequestIdReused, Code::AlreadyExists, Some("REQUEST_ID_REUSED")),
            (CellError::NotAllowed("no".into()), Code::FailedPrecondition, None),
            (CellError::Internal("x".into()), Code::Internal, None),
        ];
        for (error, code, reason) in cases {
            let status = Status::from(error.clone());
            assert_eq!(status.code(), code, "{error:?}");
            assert_eq!(reason_of(&status).as_deref(), reason, "{error:?}");
        }
        let from_engine =
            CellError::from_engine(EngineError::NotLeader { leader: Some(2) }, 7, |_| Some("h:2".into()));
        assert_eq!(from_engine, CellError::NotLeader { cell_id: 7, leader: Some((2, "h:2".into())) });
    }
}
