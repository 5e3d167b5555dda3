//! `nidctl`: the admin CLI of nid.
//!
//! This file only parses flags and dispatches; each command group lives in its own module.

mod config;
mod id;

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

/// Admin CLI for nid, the cell-based national-ID data service.
#[derive(Debug, Parser)]
#[command(name = "nidctl", version, about)]
struct Cli {
    /// Configuration file (TOML). Keys: id_scheme_seed.
    #[arg(long, global = true, env = "NIDCTL_CONFIG")]
    config: Option<PathBuf>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable text.
    Table,
    /// One JSON document per result.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate and generate identifiers (UINs and VIDs) offline.
    Id {
        #[command(subcommand)]
        command: id::IdCommand,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Id { command } => config::Config::load(cli.config.as_deref())
            .and_then(|config| id::run(command, &config, cli.output)),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("nidctl: {error:#}");
            ExitCode::from(2)
        }
    }
}
