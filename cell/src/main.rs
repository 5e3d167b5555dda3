//! `nid-cell`: one replica of a cell (a Raft group of three over RocksDB). Not built yet (issue #3).

fn main() {
    eprintln!("nid-cell: the cell replica is not implemented yet (issue #3)");
    std::process::exit(2);
}
