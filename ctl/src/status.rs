//! `nidctl status`: cells, replicas, zones, leader, applied index, buckets owned and health, as the
//! router sees them.

use crate::Output;
use crate::dev;
use nid_proto::v1::GetClusterStatusRequest;
use nid_proto::v1::admin_client::AdminClient;
use std::path::Path;
use std::process::ExitCode;

/// Prints the cluster status.
pub async fn run(router: Option<&str>, dir: &Path, output: Output) -> anyhow::Result<ExitCode> {
    let address = dev::router_address(router, dir)?;
    let channel = dev::channel(&address).await?;
    let status = match AdminClient::new(channel).get_cluster_status(GetClusterStatusRequest {}).await {
        Ok(s) => s.into_inner(),
        Err(e) => {
            eprintln!("nidctl: status failed: {:?}: {}", e.code(), e.message());
            return Ok(ExitCode::from(1));
        }
    };
    match output {
        Output::Table => {
            println!("routing table version {}", status.table_version);
            println!(
                "{:>5} {:>5} {:<22} {:<8} {:<7} {:>9} {:>8} {:<8}",
                "cell", "node", "address", "zone", "leader", "applied", "buckets", "health"
            );
            for cell in &status.cells {
                let id = cell.cell.as_ref().map(|c| c.cell_id).unwrap_or(0);
                for r in &cell.replicas {
                    println!(
                        "{:>5} {:>5} {:<22} {:<8} {:<7} {:>9} {:>8} {:<8}",
                        id,
                        r.node_id,
                        r.address,
                        r.zone,
                        if r.is_leader { "*" } else { "" },
                        r.applied_index,
                        cell.buckets_owned,
                        if r.healthy { "up" } else { "DOWN" }
                    );
                }
            }
        }
        Output::Json => {
            let cells: Vec<serde_json::Value> = status
                .cells
                .iter()
                .map(|c| {
                    serde_json::json!({
                        "cell_id": c.cell.as_ref().map(|x| x.cell_id).unwrap_or(0),
                        "buckets_owned": c.buckets_owned,
                        "term": c.term,
                        "replicas": c.replicas.iter().map(|r| serde_json::json!({
                            "node_id": r.node_id, "address": r.address, "zone": r.zone,
                            "leader": r.is_leader, "applied_index": r.applied_index, "healthy": r.healthy,
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            println!("{}", serde_json::json!({"table_version": status.table_version, "cells": cells}));
        }
    }
    Ok(ExitCode::SUCCESS)
}
