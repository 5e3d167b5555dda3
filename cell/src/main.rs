//! `nid-cell`: one replica of a cell (a Raft group of three over RocksDB). See `nid_cell::server`.

fn main() -> std::process::ExitCode {
    nid_cell::server::main()
}
