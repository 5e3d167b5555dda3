//! What every replica answers whatever it replicates (data or control): its view of the cell,
//! membership changes (validated, zones checked) and leadership transfer.

use crate::error::CellError;
use nid_engine::{Node, StateMachine, membership};
use nid_proto::v1::{
    CellInfo, CellState, CellStatus, ChangeMembershipRequest, ChangeMembershipResponse, ReplicaInfo,
    ReplicaStatus,
};
use std::time::Duration;

/// How long a membership change may wait for Raft.
const MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(10);

/// The replica operations of a cell, whatever its state machine.
#[tonic::async_trait]
pub trait Replica: Send + Sync + 'static {
    /// This replica's view of its cell.
    async fn status(&self) -> Result<CellStatus, CellError>;
    /// Changes the cell's membership (on the leader).
    async fn change_membership(
        &self,
        req: ChangeMembershipRequest,
    ) -> Result<ChangeMembershipResponse, CellError>;
    /// Asks the leader to hand leadership to `to` (0: the most up-to-date voter).
    fn transfer_leader(&self, to: u64) -> Result<(), CellError>;
}

/// [`Replica`] over an engine node.
pub struct ReplicaAdmin<SM: StateMachine> {
    /// The replica.
    pub node: Node<SM>,
    /// Whether voters may share a zone (development cells only).
    pub allow_same_zone: bool,
}

impl<SM: StateMachine> ReplicaAdmin<SM> {
    fn engine_error(&self, e: nid_engine::EngineError) -> CellError {
        CellError::from_engine(e, self.node.cell_id(), |id| self.node.book().address(id))
    }
}

#[tonic::async_trait]
impl<SM: StateMachine> Replica for ReplicaAdmin<SM> {
    async fn status(&self) -> Result<CellStatus, CellError> {
        let s = self.node.status().await.map_err(|e| self.engine_error(e))?;
        let members = self.node.book().members();
        let replicas = members
            .iter()
            .map(|m| ReplicaStatus {
                node_id: m.id,
                address: m.address.clone(),
                zone: m.zone.clone(),
                is_leader: s.leader_id == m.id,
                applied_index: if m.id == s.node_id {
                    s.applied
                } else {
                    s.matched.iter().find(|(id, _)| *id == m.id).map(|(_, i)| *i).unwrap_or(0)
                },
                healthy: s.voters.contains(&m.id) || s.learners.contains(&m.id),
            })
            .collect();
        let owned = self.node.bucket_counts().get("owned").copied().unwrap_or(0);
        Ok(CellStatus {
            cell: Some(CellInfo {
                cell_id: self.node.cell_id(),
                replicas: members
                    .iter()
                    .map(|m| ReplicaInfo { node_id: m.id, address: m.address.clone(), zone: m.zone.clone() })
                    .collect(),
                weight: 1,
                state: CellState::Active as i32,
            }),
            replicas,
            buckets_owned: owned as u32,
            term: s.term,
        })
    }

    async fn change_membership(
        &self,
        req: ChangeMembershipRequest,
    ) -> Result<ChangeMembershipResponse, CellError> {
        let voters = self.node.status().await.map_err(|e| self.engine_error(e))?.voters;
        let (cc, added) =
            membership::change(&req, &self.node.book().members(), &voters, self.allow_same_zone)?;
        let cs =
            self.node.change_membership(cc, MEMBERSHIP_TIMEOUT).await.map_err(|e| self.engine_error(e))?;
        tracing::info!(cell = self.node.cell_id(), added = added.len(), voters = ?cs.voters, "membership change applied");
        Ok(ChangeMembershipResponse { voters: cs.voters, learners: cs.learners })
    }

    fn transfer_leader(&self, to: u64) -> Result<(), CellError> {
        if !self.node.is_leader() {
            return Err(self.engine_error(nid_engine::EngineError::NotLeader { leader: self.node.leader() }));
        }
        self.node.transfer_leader(Some(to).filter(|&n| n != 0)).map_err(|e| self.engine_error(e))
    }
}
