//! The leader's periodic sweeps: replay markers past the replay window and request-id records past
//! theirs are forgotten by [`SweepCommand`]s, a span of buckets at a time (see
//! `nid_identity::sweep`). A replay marker matters only while a request under its key could still
//! be on time: a request is refused as expired once its time is further than the allowed skew from
//! the cell's clock, so markers are kept twice the skew plus a margin for leaders' clocks that
//! disagree. Request ids are documented to be remembered for 24 hours.

use crate::identity_cell::{IdentityCell, RAFT_TIMEOUT};
use nid_domain::commands::{Command, SweepCommand, command};
use nid_domain::outcome::Swept;
use nid_proto::bucket::BUCKETS;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Buckets one sweep covers: 256 seeks, about half a millisecond of apply with nothing to delete.
pub const SWEEP_SPAN: u32 = 256;
/// Entries one sweep deletes at most.
pub const SWEEP_LIMIT: u32 = 5_000;
/// Added to twice the skew: leaders' clocks may disagree by this much.
pub const CLOCK_MARGIN_MS: u64 = 5 * 60 * 1000;
/// How long a request id is remembered.
pub const REQUEST_WINDOW_MS: u64 = 24 * 3600 * 1000;

impl IdentityCell {
    /// How long a replay marker is kept: twice the allowed skew plus [`CLOCK_MARGIN_MS`].
    pub fn replay_window_ms(&self) -> u64 {
        self.policy.skew_ms.saturating_mul(2).saturating_add(CLOCK_MARGIN_MS)
    }

    /// Proposes one sweep of the buckets from `first` (up to [`SWEEP_SPAN`] of them, at most
    /// `limit` entries). Returns the entries deleted and the bucket to continue from (0 after the
    /// last span).
    pub async fn sweep(&self, first: u32, limit: u32) -> Result<(u64, u32), crate::error::CellError> {
        let first = first % u32::from(BUCKETS);
        let end = first.saturating_add(SWEEP_SPAN).min(u32::from(BUCKETS));
        let now = self.clock.now_ms();
        let command = Command::new(command::Kind::Sweep(SweepCommand {
            first,
            end,
            txn_before_ms: now.saturating_sub(self.replay_window_ms()),
            request_before_ms: now.saturating_sub(REQUEST_WINDOW_MS),
            limit,
        }));
        let outcome = self.node.propose(&command, RAFT_TIMEOUT).await.map_err(|e| self.engine_error(e))??;
        match outcome {
            nid_domain::outcome::Outcome::Swept(Swept { deleted, resume }) => {
                self.metrics.sweeps.inc();
                self.metrics.swept.inc_by(deleted);
                Ok((deleted, resume.unwrap_or(end % u32::from(BUCKETS))))
            }
            _ => Err(crate::error::CellError::Internal("the outcome does not match the command".into())),
        }
    }
}

/// Sweeps while this replica leads: one span every `every`, or at once again while a span still
/// holds more than a command's worth. A full pass over 16384 buckets takes 64 spans.
pub async fn run(cell: std::sync::Arc<IdentityCell>, every: Duration, stop: CancellationToken) {
    let mut next = 0u32;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        if !cell.node.is_leader() {
            continue;
        }
        for _ in 0..8 {
            let from = next;
            match cell.sweep(from, SWEEP_LIMIT).await {
                Ok((_, resume)) => {
                    next = resume;
                    if resume != from {
                        break;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "sweep not applied; retrying later");
                    break;
                }
            }
        }
    }
}
