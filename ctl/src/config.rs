//! nidctl's configuration: a TOML file, then environment, then flags (flags win).

use anyhow::{Context, bail};
use nid_proto::ids::IdSchemeSeed;
use serde::Deserialize;
use std::path::Path;

/// The environment variable that carries the id-scheme seed (64 hex characters).
pub const SEED_ENV: &str = "NID_ID_SCHEME_SEED";

/// Contents of the configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The cluster's id-scheme seed, 64 hex characters.
    pub id_scheme_seed: Option<String>,
}

impl Config {
    /// Reads `path` when given; an absent path means an empty config.
    pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
        let Some(path) = path else {
            return Ok(Config::default());
        };
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// Resolves the seed: the flag, else the environment, else the file, else the dev seed
    /// (announced on stderr so nobody mistakes it for a production cluster's).
    pub fn id_scheme_seed(&self, flag: Option<&str>) -> anyhow::Result<IdSchemeSeed> {
        let env = std::env::var(SEED_ENV).ok();
        let (source, text) = match (flag, env.as_deref(), self.id_scheme_seed.as_deref()) {
            (Some(text), _, _) => ("--seed", text),
            (None, Some(text), _) => (SEED_ENV, text),
            (None, None, Some(text)) => ("config file id_scheme_seed", text),
            (None, None, None) => {
                eprintln!("nidctl: no id-scheme seed configured; using the development seed");
                return Ok(IdSchemeSeed::dev());
            }
        };
        match IdSchemeSeed::from_hex(text) {
            Ok(seed) => Ok(seed),
            Err(error) => bail!("{source}: {error}"),
        }
    }
}
