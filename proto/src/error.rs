//! The error model every nid service speaks: a small set of gRPC codes, each with rich details
//! (`google.rpc.ErrorInfo` in domain [`ERROR_DOMAIN`], `BadRequest` field violations, `RetryInfo`).
//!
//! | situation | code | ErrorInfo.reason | retry |
//! |---|---|---|---|
//! | bad field | INVALID_ARGUMENT | (INVALID_IDENTIFIER for ids) | no |
//! | replica is not leader | UNAVAILABLE | NOT_LEADER | yes, at the hinted leader |
//! | cell does not own bucket | UNAVAILABLE | WRONG_OWNER | yes, after a table refresh |
//! | bucket migrating, proposal discarded | UNAVAILABLE | RETRY_LATER + RetryInfo | yes, after the delay |
//! | proposal/read timed out | DEADLINE_EXCEEDED | TIMEOUT | writes: outcome unknown |
//! | expected version stale | ABORTED | VERSION_MISMATCH | re-read, then retry |
//! | RID reused with other data | ALREADY_EXISTS | RID_CONFLICT | no |
//!
//! Services keep their own error enums and convert to [`tonic::Status`] in one place through the
//! helpers here; routers read hints back with [`RoutingHint::from_status`].

use std::collections::HashMap;
use std::time::Duration;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::v1::ErrorReason;

/// The `ErrorInfo.domain` of every nid error.
pub const ERROR_DOMAIN: &str = "nid.v1";

/// A hint telling the caller where or when to retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RoutingHint {
    /// The replica is not the leader of its cell.
    NotLeader {
        /// The cell.
        cell_id: u64,
        /// The leader's node id and address, when the replica knows them.
        leader: Option<(u64, String)>,
    },
    /// The cell does not own the bucket.
    WrongOwner {
        /// The bucket.
        bucket: u16,
        /// The owner, when the cell knows it.
        owner_cell: Option<u64>,
        /// The routing-table version behind the cell's belief.
        table_version: u64,
    },
    /// Not applied, for now (a migrating bucket, a proposal a leader change discarded): retry
    /// after the delay.
    RetryLater {
        /// How long to wait.
        after: Duration,
    },
}

fn metadata(pairs: &[(&str, String)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect()
}

fn reason_name(reason: ErrorReason) -> &'static str {
    // as_str_name gives "ERROR_REASON_NOT_LEADER"; the wire carries the short form.
    reason.as_str_name().trim_start_matches("ERROR_REASON_")
}

/// Builds a status with an ErrorInfo of `reason`.
pub fn status_with_reason(
    code: Code,
    message: impl Into<String>,
    reason: ErrorReason,
    pairs: &[(&str, String)],
) -> Status {
    let mut details = ErrorDetails::new();
    details.set_error_info(reason_name(reason), ERROR_DOMAIN, metadata(pairs));
    Status::with_error_details(code, message, details)
}

impl RoutingHint {
    /// Encodes the hint as a status.
    pub fn into_status(self) -> Status {
        match self {
            RoutingHint::NotLeader { cell_id, leader } => {
                let mut pairs = vec![("cell_id", cell_id.to_string())];
                if let Some((node_id, address)) = leader {
                    pairs.push(("leader_node_id", node_id.to_string()));
                    pairs.push(("leader_address", address));
                }
                status_with_reason(Code::Unavailable, "not the cell leader", ErrorReason::NotLeader, &pairs)
            }
            RoutingHint::WrongOwner { bucket, owner_cell, table_version } => {
                let mut pairs =
                    vec![("bucket", bucket.to_string()), ("table_version", table_version.to_string())];
                if let Some(owner) = owner_cell {
                    pairs.push(("owner_cell", owner.to_string()));
                }
                status_with_reason(
                    Code::Unavailable,
                    "this cell does not own the bucket",
                    ErrorReason::WrongOwner,
                    &pairs,
                )
            }
            RoutingHint::RetryLater { after } => {
                let mut details = ErrorDetails::new();
                details.set_error_info(reason_name(ErrorReason::RetryLater), ERROR_DOMAIN, HashMap::new());
                details.set_retry_info(Some(after));
                Status::with_error_details(
                    Code::Unavailable,
                    "not applied (a bucket migrating, a leader change); retry after the delay",
                    details,
                )
            }
        }
    }

    /// Reads a routing hint back from a status, if it carries one.
    pub fn from_status(status: &Status) -> Option<RoutingHint> {
        let details = status.get_error_details();
        let info = details.error_info()?;
        if info.domain != ERROR_DOMAIN {
            return None;
        }
        let number = |key: &str| info.metadata.get(key).and_then(|v| v.parse::<u64>().ok());
        match info.reason.as_str() {
            r if r == reason_name(ErrorReason::NotLeader) => {
                let leader = match (number("leader_node_id"), info.metadata.get("leader_address")) {
                    (Some(id), Some(address)) => Some((id, address.clone())),
                    _ => None,
                };
                Some(RoutingHint::NotLeader { cell_id: number("cell_id")?, leader })
            }
            r if r == reason_name(ErrorReason::WrongOwner) => Some(RoutingHint::WrongOwner {
                bucket: u16::try_from(number("bucket")?).ok()?,
                owner_cell: number("owner_cell"),
                table_version: number("table_version")?,
            }),
            r if r == reason_name(ErrorReason::RetryLater) => {
                let after =
                    details.retry_info().and_then(|r| r.retry_delay).unwrap_or(Duration::from_millis(50));
                Some(RoutingHint::RetryLater { after })
            }
            _ => None,
        }
    }
}

/// Returns the ErrorInfo reason of a nid status (e.g. "NOT_LEADER"), if any.
pub fn reason_of(status: &Status) -> Option<String> {
    let details = status.get_error_details();
    let info = details.error_info()?;
    (info.domain == ERROR_DOMAIN).then(|| info.reason.clone())
}

/// Returns one ErrorInfo metadata entry of a nid status (e.g. "current_version"), if any.
pub fn metadata_of(status: &Status, key: &str) -> Option<String> {
    let details = status.get_error_details();
    let info = details.error_info()?;
    (info.domain == ERROR_DOMAIN).then(|| info.metadata.get(key).cloned()).flatten()
}

/// Collects field violations and turns them into one INVALID_ARGUMENT status.
///
/// Descriptions must not quote the offending value: values may be personal data.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FieldViolations {
    violations: Vec<(String, String)>,
}

impl FieldViolations {
    /// No violations yet.
    pub fn new() -> FieldViolations {
        FieldViolations::default()
    }

    /// Records that `field` (a dotted path such as `demographics.date_of_birth`) is bad.
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.violations.push((field.into(), description.into()));
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.violations.is_empty()
    }

    /// The violations recorded.
    pub fn violations(&self) -> &[(String, String)] {
        &self.violations
    }

    /// `Ok(())` when empty, otherwise the INVALID_ARGUMENT status naming every field.
    pub fn into_result(self) -> Result<(), Status> {
        if self.is_empty() {
            return Ok(());
        }
        let fields: Vec<&str> = self.violations.iter().map(|(f, _)| f.as_str()).collect();
        let message = format!("invalid argument: {}", fields.join(", "));
        let mut details = ErrorDetails::new();
        for (field, description) in &self.violations {
            details.add_bad_request_violation(field.clone(), description.clone());
        }
        Err(Status::with_error_details(Code::InvalidArgument, message, details))
    }

    /// Reads the violations back from a status (for clients and tests).
    pub fn from_status(status: &Status) -> FieldViolations {
        let details = status.get_error_details();
        let violations = details
            .bad_request()
            .map(|b| b.field_violations.iter().map(|v| (v.field.clone(), v.description.clone())).collect())
            .unwrap_or_default();
        FieldViolations { violations }
    }
}

/// RESOURCE_EXHAUSTED with reason OVERLOADED and a RetryInfo delay: the server or the caller's
/// quota sheds this request; retry after `retry_after`.
pub fn overloaded(message: impl Into<String>, retry_after: Duration) -> Status {
    let mut details = ErrorDetails::new();
    details.set_error_info(reason_name(ErrorReason::Overloaded), ERROR_DOMAIN, HashMap::new());
    details.set_retry_info(Some(retry_after));
    Status::with_error_details(Code::ResourceExhausted, message, details)
}

/// RESOURCE_EXHAUSTED with reason RATE_LIMITED and a RetryInfo delay: the calling partner is over
/// its rate limit (`limit_per_second` is what this router enforces); retry after `retry_after`.
pub fn rate_limited(limit_per_second: f64, retry_after: Duration) -> Status {
    let mut details = ErrorDetails::new();
    let pairs = [("limit_per_second", format!("{limit_per_second:.1}"))];
    details.set_error_info(reason_name(ErrorReason::RateLimited), ERROR_DOMAIN, metadata(&pairs));
    details.set_retry_info(Some(retry_after));
    Status::with_error_details(Code::ResourceExhausted, "the partner's rate limit is exceeded", details)
}

/// The RetryInfo delay a status carries, if any.
pub fn retry_delay(status: &Status) -> Option<Duration> {
    status.get_error_details().retry_info().and_then(|r| r.retry_delay)
}

/// INVALID_ARGUMENT with reason INVALID_IDENTIFIER for identifier field `field`.
pub fn invalid_identifier(field: &str, message: impl Into<String>) -> Status {
    status_with_reason(
        Code::InvalidArgument,
        message,
        ErrorReason::InvalidIdentifier,
        &[("field", field.to_owned())],
    )
}

/// One INVALID_ARGUMENT for a single bad field.
pub fn invalid_field(field: &str, description: impl Into<String>) -> Status {
    let mut violations = FieldViolations::new();
    violations.add(field, description);
    match violations.into_result() {
        Err(status) => status,
        Ok(()) => Status::invalid_argument(field.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_round_trip_through_status() {
        let hints = [
            RoutingHint::NotLeader { cell_id: 3, leader: Some((2, "127.0.0.1:4000".into())) },
            RoutingHint::NotLeader { cell_id: 3, leader: None },
            RoutingHint::WrongOwner { bucket: 777, owner_cell: Some(9), table_version: 12 },
            RoutingHint::WrongOwner { bucket: 16383, owner_cell: None, table_version: 1 },
            RoutingHint::RetryLater { after: Duration::from_millis(120) },
        ];
        for hint in hints {
            let status = hint.clone().into_status();
            assert_eq!(status.code(), Code::Unavailable);
            assert_eq!(RoutingHint::from_status(&status), Some(hint));
        }
    }

    #[test]
    fn statuses_without_hints_decode_to_none() {
        assert_eq!(RoutingHint::from_status(&Status::unavailable("plain")), None);
        let foreign = {
            let mut details = ErrorDetails::new();
            details.set_error_info("NOT_LEADER", "other.domain", HashMap::new());
            Status::with_error_details(Code::Unavailable, "x", details)
        };
        assert_eq!(RoutingHint::from_status(&foreign), None);
    }

    #[test]
    fn field_violations_name_every_field() {
        let mut violations = FieldViolations::new();
        violations.add("rid", "must be 1..=64 characters");
        violations.add("demographics.date_of_birth", "must be a real date YYYY-MM-DD");
        let status = violations.clone().into_result().unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("rid"));
        assert!(status.message().contains("demographics.date_of_birth"));
        assert_eq!(FieldViolations::from_status(&status), violations);
        assert!(FieldViolations::new().into_result().is_ok());
    }

    #[test]
    fn reasons_use_the_short_names() {
        let status = status_with_reason(Code::Aborted, "stale", ErrorReason::VersionMismatch, &[]);
        assert_eq!(reason_of(&status).as_deref(), Some("VERSION_MISMATCH"));
    }
}
