//! Forgetting replay markers once they can no longer matter.
//!
//! Every authentication leaves a marker under (partner, transaction, identity) holding its
//! decision, so a retry gets the same answer and a replay is refused. A replay is also refused, on
//! its own, once its request time is further than the allowed skew from the cell's clock. A marker
//! therefore matters only while a request with the same key could still be on time: for a request
//! decided at time t, until about t + 2 x skew. Past the replay window (twice the skew plus a
//! margin for leader clocks that disagree) the leader proposes [`Command::SweepTxnMarkers`], a span
//! of buckets at a time; every replica deletes the same markers at the same log index, so apply
//! stays deterministic. Without this the replay index would grow with every authentication forever.

use crate::command::{Command, CommandResult};
use crate::service::{CellContext, RAFT_TIMEOUT};
use nid_proto::bucket::BUCKETS;
use std::sync::Arc;
use std::time::Duration;
use tonic::Status;

/// Buckets one sweep command covers: 256 seeks, about half a millisecond of apply on this
/// project's 2-core test machine with nothing to delete (1,024 took 2 ms).
pub const SWEEP_SPAN: u16 = 256;
/// Markers one sweep command deletes at most.
pub const SWEEP_LIMIT: u32 = 5_000;
/// Added to twice the skew: leaders' clocks may disagree by this much.
pub const CLOCK_MARGIN_MS: u64 = 5 * 60 * 1000;

impl CellContext {
    /// How long a replay marker is kept: twice the allowed skew plus [`CLOCK_MARGIN_MS`].
    pub fn replay_window_ms(&self) -> u64 {
        self.auth_policy.skew_ms.saturating_mul(2).saturating_add(CLOCK_MARGIN_MS)
    }

    /// Proposes one sweep of the buckets from `first` (up to [`SWEEP_SPAN`] of them, at most
    /// `limit` markers). Returns the markers deleted and the bucket to continue from (0 after the
    /// last span).
    pub async fn sweep_replay_markers(&self, first: u16, limit: u32) -> Result<(u64, u16), Status> {
        let first = first % BUCKETS;
        let end = first.saturating_add(SWEEP_SPAN).min(BUCKETS);
        let before_ms = self.clock.now_ms().saturating_sub(self.replay_window_ms());
        let command = Command::SweepTxnMarkers { first, end, before_ms, limit };
        match self.peer.propose(command, RAFT_TIMEOUT).await.map_err(|e| self.peer_status(e))? {
            CommandResult::Swept { deleted, resume } => {
                self.metrics.replay_sweeps.inc();
                self.metrics.replay_markers_swept.inc_by(deleted);
                Ok((deleted, resume.unwrap_or(end % BUCKETS)))
            }
            CommandResult::Rejected(r) => Err(self.rejection_status(r)),
            _ => Err(Status::internal("unexpected result")),
        }
    }
}

/// Runs on every data replica; sweeps while this replica leads: one span every `every`, or at once
/// again while a span still has more than a command's worth. A full pass over 16384 buckets takes
/// 64 spans (about two minutes at the default two seconds).
pub async fn run(ctx: Arc<CellContext>, every: Duration) {
    let mut next = 0u16;
    loop {
        tokio::time::sleep(every).await;
        if ctx.peer.leader() != Some(ctx.node_id) {
            continue;
        }
        // Bounded: a span whose markers take more than a few commands continues next time.
        for _ in 0..8 {
            let from = next;
            match ctx.sweep_replay_markers(from, SWEEP_LIMIT).await {
                Ok((_, resume)) => {
                    next = resume;
                    // Moved on to the next span: done for this round.
                    if resume != from {
                        break;
                    }
                }
                Err(e) => {
                    tracing::debug!(code = ?e.code(), "replay-marker sweep not applied; retrying later");
                    break;
                }
            }
        }
    }
}
