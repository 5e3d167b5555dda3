//! Keeps ARCHITECTURE.md's invariants true: the crate layering and the `//!` header on every file.

use serde_json::Value;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The clone under test. Cargo sets CARGO_MANIFEST_DIR when it runs a test, and that is the one to
/// trust: the compile-time value names whichever clone built this binary, and clones on one machine
/// share the target directory (a fresh clone with the same sources reuses the binary).
fn workspace_root() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir.parent().expect("tests/ sits in the workspace").to_path_buf()
}

/// The host target triple, so `cargo metadata` resolves only what links on this machine (and so
/// needs no download of, say, Windows-only crates when run offline).
fn host_triple() -> String {
    let output = Command::new("rustc").arg("-vV").output().expect("rustc -vV runs");
    let text = String::from_utf8(output.stdout).expect("utf-8");
    text.lines().find_map(|l| l.strip_prefix("host: ")).expect("rustc -vV names the host").to_owned()
}

fn metadata() -> Value {
    let output = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--locked", "--offline", "--filter-platform"])
        .arg(host_triple())
        .arg("--manifest-path")
        .arg(workspace_root().join("Cargo.toml"))
        .output()
        .expect("cargo metadata runs");
    assert!(output.status.success(), "cargo metadata failed: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("cargo metadata prints JSON")
}

/// Package names reachable from `root` through normal (linked) dependencies.
fn linked_closure(metadata: &Value, root: &str) -> BTreeSet<String> {
    let packages: HashMap<&str, &str> = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    let nodes: HashMap<&str, &Value> = metadata["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["id"].as_str().unwrap(), n))
        .collect();
    let root_id = packages.iter().find(|(_, name)| **name == root).map(|(id, _)| *id).expect("root package");
    let mut seen = BTreeSet::new();
    let mut queue = VecDeque::from([root_id]);
    while let Some(id) = queue.pop_front() {
        for dep in nodes[id]["deps"].as_array().unwrap() {
            let normal = dep["dep_kinds"].as_array().unwrap().iter().any(|k| k["kind"].is_null());
            let dep_id = dep["pkg"].as_str().unwrap();
            if normal && seen.insert(packages[dep_id].to_owned()) {
                queue.push_back(dep_id);
            }
        }
    }
    seen
}

#[test]
fn proto_is_a_leaf_and_only_the_cell_links_storage_and_raft() {
    let metadata = metadata();
    let members = ["nid-proto", "nid-support", "nid-cell", "nid-router", "nidctl", "nid-loadtest"];
    let forbidden_outside_cell = ["rocksdb", "librocksdb-sys", "raft", "raft-proto"];

    let proto = linked_closure(&metadata, "nid-proto");
    for member in members {
        assert!(!proto.contains(member), "nid-proto must not depend on {member}");
    }
    for forbidden in forbidden_outside_cell {
        assert!(!proto.contains(forbidden), "nid-proto links {forbidden}");
    }
    // nid-support (process plumbing) is a leaf as well, free of storage and raft.
    let support = linked_closure(&metadata, "nid-support");
    for member in members.iter().chain(forbidden_outside_cell.iter()) {
        assert!(!support.contains(*member), "nid-support must not depend on {member}");
    }
    for crate_name in ["nid-router", "nidctl", "nid-loadtest"] {
        let closure = linked_closure(&metadata, crate_name);
        for forbidden in forbidden_outside_cell {
            assert!(!closure.contains(forbidden), "{crate_name} links {forbidden}");
        }
        assert!(!closure.contains("nid-cell"), "{crate_name} depends on nid-cell");
        assert!(closure.contains("nid-proto"), "{crate_name} should reach cells only through nid-proto");
    }
    let cell = linked_closure(&metadata, "nid-cell");
    assert!(cell.contains("rocksdb") && cell.contains("raft"), "the cell is where storage and raft live");
    for other in ["nid-router", "nidctl", "nid-loadtest"] {
        assert!(!cell.contains(other), "nid-cell depends on {other}");
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if path.is_dir() {
            if !name.starts_with('.') && name != "target" {
                rust_files(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_rust_file_opens_with_a_module_doc_comment() {
    let root = workspace_root();
    let mut files = Vec::new();
    for dir in ["proto", "cell", "router", "ctl", "loadtest", "tests"] {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(files.len() > 10, "found only {} files", files.len());
    let missing: Vec<_> = files
        .iter()
        .filter(|path| {
            let text = std::fs::read_to_string(path).unwrap();
            !text.trim_start().starts_with("//!")
        })
        .map(|path| path.strip_prefix(&root).unwrap().display().to_string())
        .collect();
    assert!(missing.is_empty(), "files without a //! header: {missing:?}");
}
