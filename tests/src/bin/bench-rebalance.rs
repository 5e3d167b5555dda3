//! `make bench-rebalance`: section 6 of `make bench` alone. A cluster of `--cells` data cells
//! (default 4) holding `--identities` (default 200,000) gains one cell under mixed authentication
//! and enrolment at half of the cluster's maximum; prints one Markdown row.
//!
//! Usage: bench-rebalance [--cells 4] [--identities 200000] [--results .nid/bench]

use nid_tests::rebalance_bench::{RebalanceBench, RebalanceFigures, arg};
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let bench = RebalanceBench {
        cells: arg("--cells")?.unwrap_or(4),
        identities: arg("--identities")?.unwrap_or(200_000),
        results: arg::<PathBuf>("--results")?.unwrap_or_else(|| PathBuf::from(".nid/bench")),
        concurrency: 64,
    };
    println!("== rebalance: {} -> {} cells", bench.cells, bench.cells + 1);
    let figures = bench.run()?;
    println!("{}\n{}", RebalanceFigures::header(), figures.markdown());
    println!("{figures:#?}");
    Ok(())
}
