//! `nid-cell`: one replica of a cell (a Raft group of three over RocksDB). See `nid_cell::server`.

/// The Rust side allocates through mimalloc (RocksDB's C++ keeps its own allocator): see
/// ARCHITECTURE.md, "Measured departures from the chosen dependencies".
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    nid_cell::server::main()
}
