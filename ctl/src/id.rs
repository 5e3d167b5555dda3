//! `nidctl id check` and `nidctl id gen`: offline identifier tools over the cluster's id scheme.

use crate::Output;
use crate::config::Config;
use anyhow::bail;
use clap::{Subcommand, ValueEnum};
use nid_proto::bucket::{BUCKETS, BucketId};
use nid_proto::ids::{IdError, IdKind, IdScheme, system_random_u64};
use std::collections::HashSet;
use std::io::Write;
use std::process::ExitCode;

/// The most identifiers one `gen` call prints.
const MAX_GEN_COUNT: u32 = 1_000_000;

/// Identifier kind as a flag value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KindArg {
    /// 12-digit UIN.
    Uin,
    /// 16-digit VID.
    Vid,
}

impl From<KindArg> for IdKind {
    fn from(kind: KindArg) -> IdKind {
        match kind {
            KindArg::Uin => IdKind::Uin,
            KindArg::Vid => IdKind::Vid,
        }
    }
}

/// Identifier subcommands.
#[derive(Debug, Subcommand)]
pub enum IdCommand {
    /// Check an identifier: valid or not, which check failed, and its bucket. Exits 0 only when valid.
    Check {
        /// The UIN (12 digits) or VID (16 digits).
        id: String,
        /// Require this kind instead of inferring it from the length.
        #[arg(long, value_enum)]
        kind: Option<KindArg>,
        /// The cluster's id-scheme seed (64 hex characters); see `--config` and NID_ID_SCHEME_SEED.
        #[arg(long)]
        seed: Option<String>,
    },
    /// Generate distinct random identifiers inside one bucket, one per line.
    Gen {
        /// The bucket, 0..=16383.
        #[arg(long)]
        bucket: u32,
        /// How many, 1..=1000000.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Kind of identifier.
        #[arg(long, value_enum, default_value_t = KindArg::Uin)]
        kind: KindArg,
        /// The cluster's id-scheme seed (64 hex characters); see `--config` and NID_ID_SCHEME_SEED.
        #[arg(long)]
        seed: Option<String>,
    },
}

/// Runs an id subcommand.
pub fn run(command: IdCommand, config: &Config, output: Output) -> anyhow::Result<ExitCode> {
    match command {
        IdCommand::Check { id, kind, seed } => {
            let scheme = IdScheme::new(&config.id_scheme_seed(seed.as_deref())?);
            Ok(check(&scheme, &id, kind.map(IdKind::from), output))
        }
        IdCommand::Gen { bucket, count, kind, seed } => {
            let Some(bucket) = BucketId::new(bucket) else {
                bail!("--bucket must be below {BUCKETS}");
            };
            if count == 0 || count > MAX_GEN_COUNT {
                bail!("--count must be 1..={MAX_GEN_COUNT}");
            }
            let scheme = IdScheme::new(&config.id_scheme_seed(seed.as_deref())?);
            generate(&scheme, bucket, count, kind.into(), output)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A short, stable code for each failed check, for scripts.
fn reason_code(error: &IdError) -> &'static str {
    match error {
        IdError::Empty => "empty",
        IdError::NotDigits { .. } => "not_digits",
        IdError::WrongLength { .. } => "wrong_length",
        IdError::CheckDigit => "check_digit",
        IdError::OutOfScheme => "out_of_scheme",
        IdError::Filter(_) => "filter",
    }
}

fn check(scheme: &IdScheme, text: &str, kind: Option<IdKind>, output: Output) -> ExitCode {
    let result = match kind {
        Some(kind) => scheme.parse_kind(text, kind),
        None => scheme.parse(text),
    };
    match (result, output) {
        (Ok(id), Output::Table) => {
            println!("valid {} bucket {}", id.kind().name(), id.bucket());
            ExitCode::SUCCESS
        }
        (Ok(id), Output::Json) => {
            let json =
                serde_json::json!({"valid": true, "kind": id.kind().name(), "bucket": id.bucket().get()});
            println!("{json}");
            ExitCode::SUCCESS
        }
        (Err(error), Output::Table) => {
            println!("invalid ({}): {error}", reason_code(&error));
            ExitCode::FAILURE
        }
        (Err(error), Output::Json) => {
            let json = serde_json::json!({"valid": false, "reason": reason_code(&error), "message": error.to_string()});
            println!("{json}");
            ExitCode::FAILURE
        }
    }
}

fn generate(
    scheme: &IdScheme,
    bucket: BucketId,
    count: u32,
    kind: IdKind,
    output: Output,
) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut seen = HashSet::with_capacity(count as usize);
    // Random ranks can repeat (birthday bound: ~8% for 1000 UINs in one bucket), so draw until
    // `count` distinct identifiers exist.
    while seen.len() < count as usize {
        let id = scheme.generate(kind, bucket, &mut system_random_u64)?;
        if !seen.insert(id.value()) {
            continue;
        }
        match output {
            Output::Table => writeln!(out, "{}", id.to_digits())?,
            Output::Json => writeln!(
                out,
                "{}",
                serde_json::json!({"id": id.to_digits(), "kind": kind.name(), "bucket": bucket.get()})
            )?,
        }
    }
    out.flush()?;
    Ok(())
}
