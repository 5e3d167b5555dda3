//! `nidctl cluster init` (create a cluster described by a spec file, as compose and Kubernetes
//! deployments do) and `nidctl probe` (a gRPC health check for container health checks, which
//! need no shell).

use crate::dev::{CellEntry, ProcessInfo};
use anyhow::{Context as _, bail};
use nid_proto::ids::IdSchemeSeed;
use serde::Deserialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A cluster spec file (TOML).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Cluster name, for display.
    #[serde(default = "default_name")]
    pub name: String,
    /// The id-scheme seed, 64 hex characters (or give `id_scheme_seed_file`).
    pub id_scheme_seed: Option<String>,
    /// A file holding the id-scheme seed.
    pub id_scheme_seed_file: Option<PathBuf>,
    /// Addresses of the control cell's replicas.
    pub control: Vec<String>,
    /// The data cells.
    pub cells: Vec<SpecCell>,
}

fn default_name() -> String {
    "nid".into()
}

/// One data cell of a spec.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecCell {
    /// Cell id (> 0; 0 is the control cell).
    pub cell_id: u64,
    /// Its replicas.
    pub replicas: Vec<SpecReplica>,
}

/// One replica of a spec cell.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecReplica {
    /// Raft node id within the cell (> 0).
    pub node_id: u64,
    /// host:port of its gRPC server.
    pub address: String,
    /// Availability zone.
    pub zone: String,
}

impl Spec {
    /// Reads and checks a spec file; relative seed-file paths are relative to the spec.
    pub fn load(path: &Path) -> anyhow::Result<(Spec, IdSchemeSeed)> {
        let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
        let spec: Spec = toml::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
        let seed_text = match (&spec.id_scheme_seed, &spec.id_scheme_seed_file) {
            (Some(s), None) => s.clone(),
            (None, Some(file)) => {
                let file = path.parent().unwrap_or(Path::new(".")).join(file);
                std::fs::read_to_string(&file).with_context(|| format!("read {}", file.display()))?
            }
            _ => bail!("{}: set exactly one of id_scheme_seed and id_scheme_seed_file", path.display()),
        };
        let seed = IdSchemeSeed::from_hex(seed_text.trim())
            .map_err(|e| anyhow::anyhow!("{}: id-scheme seed: {e}", path.display()))?;
        spec.check()?;
        Ok((spec, seed))
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.control.is_empty() {
            bail!("control: at least one control replica address is required");
        }
        if self.cells.is_empty() {
            bail!("cells: at least one data cell is required");
        }
        let mut ids = HashSet::new();
        for (i, cell) in self.cells.iter().enumerate() {
            if cell.cell_id == 0 || !ids.insert(cell.cell_id) {
                bail!("cells[{i}].cell_id: must be > 0 and unique");
            }
            if cell.replicas.is_empty() {
                bail!("cells[{i}].replicas: at least one replica is required");
            }
            let mut nodes = HashSet::new();
            for (j, r) in cell.replicas.iter().enumerate() {
                if r.node_id == 0 || !nodes.insert(r.node_id) {
                    bail!("cells[{i}].replicas[{j}].node_id: must be > 0 and unique in the cell");
                }
                if r.address.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).is_none() {
                    bail!("cells[{i}].replicas[{j}].address: must be host:port");
                }
            }
        }
        Ok(())
    }

    fn entries(&self) -> (CellEntry, Vec<CellEntry>) {
        let process = |name: String, address: &str, zone: &str, node_id: u64| ProcessInfo {
            name,
            address: address.to_owned(),
            metrics: String::new(),
            zone: zone.to_owned(),
            pid: 0,
            node_id,
        };
        let control = CellEntry {
            cell_id: crate::dev::CONTROL_CELL_ID,
            replicas: self
                .control
                .iter()
                .enumerate()
                .map(|(i, a)| process(format!("control-{}", i + 1), a, "", i as u64 + 1))
                .collect(),
        };
        let cells = self
            .cells
            .iter()
            .map(|c| CellEntry {
                cell_id: c.cell_id,
                replicas: c
                    .replicas
                    .iter()
                    .map(|r| {
                        process(format!("cell-{}-{}", c.cell_id, r.node_id), &r.address, &r.zone, r.node_id)
                    })
                    .collect(),
            })
            .collect();
        (control, cells)
    }
}

/// `nidctl cluster init --spec FILE`: waits (up to `wait`) for every cell to elect a leader, then
/// initializes the cluster. Idempotent: running it against an initialized cluster with the same
/// spec changes nothing.
pub async fn init(spec_path: &Path, wait: Duration) -> anyhow::Result<()> {
    let (spec, seed) = Spec::load(spec_path)?;
    let (control, cells) = spec.entries();
    crate::dev::initialize(&control, &cells, &seed, &spec.name, Instant::now() + wait).await?;
    println!("cluster {} initialized: {} data cells", spec.name, cells.len());
    Ok(())
}

/// `nidctl probe ADDRESS [--service NAME]`: true when the server's gRPC health check answers
/// SERVING (for `service`, or the server as a whole when empty) within `timeout`.
pub async fn probe(
    address: &str,
    server: &'static str,
    service: &str,
    timeout: Duration,
) -> anyhow::Result<bool> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    let check = async {
        let endpoint = nid_support::tls::Dial::endpoint(address)?.connect_timeout(timeout).timeout(timeout);
        let channel = crate::tls::dial()
            .connect(endpoint, server)
            .await
            .with_context(|| format!("connect to {address}"))?;
        let response = HealthClient::new(channel)
            .check(HealthCheckRequest { service: service.to_owned() })
            .await
            .map_err(|e| anyhow::anyhow!("health check: {:?}: {}", e.code(), e.message()))?;
        anyhow::Ok(response.into_inner().status() == ServingStatus::Serving)
    };
    match tokio::time::timeout(timeout, check).await {
        Ok(result) => result,
        Err(_) => bail!("no health answer from {address} within {timeout:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> anyhow::Result<(Spec, IdSchemeSeed)> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spec.toml");
        std::fs::write(dir.path().join("seed"), format!("{}\n", "ab".repeat(32))).unwrap();
        std::fs::write(&path, text).unwrap();
        Spec::load(&path)
    }

    const CELL: &str =
        "[[cells]]\ncell_id = 1\nreplicas = [{ node_id = 1, address = \"a:1\", zone = \"z\" }]\n";

    #[test]
    fn a_spec_parses_with_a_seed_file_and_names_its_mistakes() {
        let (spec, seed) =
            load(&format!("id_scheme_seed_file = \"seed\"\ncontrol = [\"c:1\"]\n{CELL}")).unwrap();
        assert_eq!(seed.to_hex(), "ab".repeat(32));
        assert_eq!(spec.name, "nid");
        let (control, cells) = spec.entries();
        assert_eq!((control.cell_id, control.replicas.len(), cells.len()), (0, 1, 1));

        let err = |text: &str| format!("{:#}", load(text).unwrap_err());
        assert!(err(&format!("control = [\"c:1\"]\n{CELL}")).contains("exactly one"));
        assert!(err(&format!("id_scheme_seed_file = \"seed\"\ncontrol = []\n{CELL}")).contains("control"));
        assert!(
            err(&format!(
                "id_scheme_seed_file = \"seed\"\ncontrol = [\"c:1\"]\n{}",
                CELL.replace("a:1", "a")
            ))
            .contains("address")
        );
        assert!(
            err(&format!("id_scheme_seed_file = \"seed\"\ncontrol = [\"c:1\"]\nbogus = 1\n{CELL}"))
                .contains("bogus")
        );
        assert!(err(&format!("id_scheme_seed = \"12\"\ncontrol = [\"c:1\"]\n{CELL}")).contains("seed"));
    }
}
