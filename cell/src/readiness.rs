//! Readiness as health: a replica's client-facing services report SERVING only while it knows its
//! cell's leader and has applied nearly everything it knows committed, so a probe (Kubernetes
//! readiness, a load balancer) sends no traffic to a replica that is electing or catching up. The
//! server as a whole (`""`, liveness) and the Raft transport stay SERVING: peers must reach a
//! catching-up replica.

use nid_engine::{Node, StateMachine};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A replica at most this many entries behind its commit index is ready.
pub const READY_LAG: u64 = 64;

/// Keeps `services`' health in step with the replica's readiness until `stop`.
pub async fn watch<SM: StateMachine>(
    node: Node<SM>,
    health: tonic_health::server::HealthReporter,
    services: Vec<&'static str>,
    stop: CancellationToken,
) {
    let mut last = None;
    loop {
        let ready = match node.status().await {
            Ok(s) => s.leader_id != 0 && s.commit.saturating_sub(s.applied) <= READY_LAG,
            Err(_) => false,
        };
        if last != Some(ready) {
            let status = if ready {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            for service in &services {
                health.set_service_status(*service, status).await;
            }
            tracing::info!(ready, "readiness changed");
            last = Some(ready);
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}
