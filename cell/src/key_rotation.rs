//! Key rotation through the log: a new generation is added to every replica's keyring first (a
//! rolling restart, or a reload), then activated by one Raft command that the leader proposes only
//! after every voter confirmed it holds the generation under the same fingerprint. From that index
//! on every replica seals with it; older generations keep opening what they sealed.

use crate::error::CellError;
use crate::identity_cell::{IdentityCell, RAFT_TIMEOUT};
use nid_domain::commands::{ActivateKeysCommand, Command, command};
use nid_domain::outcome::KeysActivated;
use nid_proto::v1::cell_client::CellClient;
use nid_proto::v1::{GetKeyGenerationsRequest, KeyGeneration, KeyGenerations};

/// Asks another replica which key generations it holds.
#[tonic::async_trait]
pub trait VoterKeys: Send + Sync + 'static {
    /// The generations voter `node_id` at `address` holds.
    async fn generations(&self, node_id: u64, address: &str) -> Result<KeyGenerations, CellError>;
}

/// [`VoterKeys`] over gRPC.
pub struct GrpcVoterKeys(pub std::sync::Arc<dyn nid_engine::transport::Dialer>);

#[tonic::async_trait]
impl VoterKeys for GrpcVoterKeys {
    async fn generations(&self, node_id: u64, address: &str) -> Result<KeyGenerations, CellError> {
        let unreachable =
            |_| CellError::NotAllowed(format!("voter {node_id} did not answer; it must hold the generation"));
        let endpoint = self
            .0
            .endpoint(address)
            .map_err(|_| CellError::Internal("bad member address".into()))?
            .connect_timeout(std::time::Duration::from_secs(2))
            .timeout(RAFT_TIMEOUT);
        let channel = self.0.connect(endpoint).await.map_err(unreachable)?;
        let answer = CellClient::new(channel).get_key_generations(GetKeyGenerationsRequest {}).await;
        answer
            .map(|r| r.into_inner())
            .map_err(|_| CellError::NotAllowed(format!("voter {node_id} did not answer")))
    }
}

impl IdentityCell {
    /// This replica's key generations.
    pub fn key_generations(&self) -> KeyGenerations {
        let keyring = self.keys.keyring();
        KeyGenerations {
            held: keyring
                .generation_ids()
                .into_iter()
                .filter_map(|id| {
                    keyring.fingerprint(id).map(|f| KeyGeneration { id, fingerprint: f.to_vec() })
                })
                .collect(),
            active: self.keys.active_generation(),
            node_id: self.node.node_id(),
        }
    }

    /// Activates generation `id` once every voter holds it; returns the applied index.
    pub async fn activate_key_generation(
        &self,
        id: u32,
        voters_keys: &dyn VoterKeys,
    ) -> Result<u64, CellError> {
        if !self.node.is_leader() {
            return Err(self.engine_error(nid_engine::EngineError::NotLeader { leader: self.node.leader() }));
        }
        let fingerprint = self.keys.keyring().fingerprint(id).ok_or_else(|| {
            CellError::NotAllowed(format!("the leader's keyring does not hold generation {id}"))
        })?;
        let status = self.node.status().await.map_err(|e| self.engine_error(e))?;
        for voter in status.voters.iter().filter(|&&v| v != self.node.node_id()) {
            let address = self
                .node
                .book()
                .address(*voter)
                .ok_or_else(|| CellError::NotAllowed(format!("voter {voter} has no address")))?;
            let held = voters_keys.generations(*voter, &address).await?;
            let same = held.held.iter().any(|g| g.id == id && g.fingerprint == fingerprint);
            if !same {
                return Err(CellError::NotAllowed(format!(
                    "voter {voter} does not hold generation {id} (or holds another secret under it); \
                     add it to every replica's keyring first"
                )));
            }
        }
        let command = Command::new(command::Kind::ActivateKeys(ActivateKeysCommand {
            id,
            fingerprint: fingerprint.to_vec(),
        }));
        let outcome = self.node.propose(&command, RAFT_TIMEOUT).await.map_err(|e| self.engine_error(e))??;
        match outcome {
            nid_domain::outcome::Outcome::KeysActivated(KeysActivated(active)) if active == id => {
                Ok(self.node.applied())
            }
            _ => Err(CellError::Internal("the outcome does not match the command".into())),
        }
    }
}
