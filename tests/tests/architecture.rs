//! Keeps ARCHITECTURE.md's invariants true: the crate layering (each crate's role decides what it
//! may link), no import cycles between the modules of a crate, and the `//!` header on every file.

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
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

/// Package names reachable from `root` through linked dependencies (normal and build); with
/// `with_dev`, the root's own dev-dependencies count too (what `cargo test -p root` builds).
fn closure(metadata: &Value, root: &str, with_dev: bool) -> BTreeSet<String> {
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
    let mut queue = VecDeque::from([(root_id, true)]);
    while let Some((id, is_root)) = queue.pop_front() {
        for dep in nodes[id]["deps"].as_array().unwrap() {
            let counts = dep["dep_kinds"].as_array().unwrap().iter().any(|k| {
                k["kind"].is_null() || k["kind"] == "build" || (with_dev && is_root && k["kind"] == "dev")
            });
            let dep_id = dep["pkg"].as_str().unwrap();
            if counts && seen.insert(packages[dep_id].to_owned()) {
                queue.push_back((dep_id, false));
            }
        }
    }
    seen
}

const STORAGE_AND_RAFT: [&str; 4] = ["rocksdb", "librocksdb-sys", "raft", "raft-proto"];
const MEMBERS: [&str; 12] = [
    "nid-proto",
    "nid-support",
    "nid-domain",
    "nid-engine",
    "nid-identity",
    "nid-control",
    "nid-cell",
    "nid-testkit",
    "nid-router",
    "nidctl",
    "nid-loadtest",
    "nid-tests",
];

/// What each crate may link among the workspace's crates (normal dependencies), by role.
fn allowed() -> BTreeMap<&'static str, Vec<&'static str>> {
    BTreeMap::from([
        ("nid-proto", vec![]),
        ("nid-support", vec![]),
        ("nid-domain", vec!["nid-proto"]),
        ("nid-engine", vec!["nid-proto"]),
        ("nid-identity", vec!["nid-proto", "nid-domain", "nid-engine"]),
        ("nid-control", vec!["nid-proto", "nid-engine"]),
        (
            "nid-cell",
            vec!["nid-proto", "nid-support", "nid-domain", "nid-engine", "nid-identity", "nid-control"],
        ),
        ("nid-router", vec!["nid-proto", "nid-support", "nid-domain"]),
        ("nidctl", vec!["nid-proto", "nid-support"]),
        ("nid-loadtest", vec!["nid-proto", "nid-support"]),
    ])
}

#[test]
fn each_crate_links_only_what_its_role_allows() {
    let metadata = metadata();
    for (krate, may) in allowed() {
        let linked = closure(&metadata, krate, false);
        for member in MEMBERS {
            if member != krate {
                assert_eq!(linked.contains(member), may.contains(&member), "{krate} -> {member}");
            }
        }
        let storage_allowed = ["nid-engine", "nid-identity", "nid-control", "nid-cell"].contains(&krate);
        for forbidden in STORAGE_AND_RAFT {
            assert_eq!(linked.contains(forbidden), storage_allowed, "{krate} and {forbidden}");
        }
    }
    // The domain and the proto build without RocksDB or Raft even for their own tests.
    for pure in ["nid-proto", "nid-domain"] {
        let built = closure(&metadata, pure, true);
        for forbidden in STORAGE_AND_RAFT {
            assert!(!built.contains(forbidden), "`cargo test -p {pure}` builds {forbidden}");
        }
        assert!(
            !built.contains("tonic-health") && !built.contains("tonic-reflection"),
            "{pure} serves nothing"
        );
    }
    // The engine knows no identities, and the in-process test cell stays out of production.
    let engine = closure(&metadata, "nid-engine", false);
    assert!(!engine.contains("nid-domain") && !engine.contains("nid-identity"));
    for krate in allowed().keys() {
        assert!(!closure(&metadata, krate, false).contains("nid-testkit"), "{krate} links the test kit");
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

const CRATE_DIRS: [&str; 12] = [
    "proto", "support", "domain", "engine", "identity", "control", "cell", "testkit", "router", "ctl",
    "loadtest", "tests",
];

#[test]
fn every_rust_file_opens_with_a_module_doc_comment() {
    let root = workspace_root();
    let mut files = Vec::new();
    for dir in CRATE_DIRS {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(files.len() > 50, "found only {} files", files.len());
    let missing: Vec<_> = files
        .iter()
        .filter(|path| !std::fs::read_to_string(path).unwrap().trim_start().starts_with("//!"))
        .map(|path| path.strip_prefix(&root).unwrap().display().to_string())
        .collect();
    assert!(missing.is_empty(), "files without a //! header: {missing:?}");
}

/// The import graph between the top-level modules of the crate in `src` (a module's own files and
/// its submodules count as the module): module -> modules it names with `crate::`.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let module_of = |path: &Path| -> Option<String> {
        let rel = path.strip_prefix(src).ok()?;
        let first = rel.components().next()?.as_os_str().to_string_lossy().to_string();
        let name = first.trim_end_matches(".rs").to_owned();
        (name != "lib" && name != "main").then_some(name)
    };
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(f)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> =
        modules.iter().map(|m| (m.clone(), BTreeSet::new())).collect();
    for file in &files {
        let Some(from) = module_of(file) else { continue };
        // Code only: a comment's link to another module is not an import.
        let text: String = std::fs::read_to_string(file)
            .unwrap()
            .lines()
            .filter(|l| !l.trim_start().starts_with("//"))
            .collect::<Vec<_>>()
            .join("\n");
        for (i, _) in text.match_indices("crate::") {
            let rest = &text[i + "crate::".len()..];
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            let group = rest.strip_prefix('{').map(|g| g.split('}').next().unwrap_or(""));
            let mut named: Vec<String> = vec![name];
            if let Some(g) = group {
                named.extend(g.split(',').map(|p| {
                    p.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>()
                }));
            }
            for to in named {
                if to != from && modules.contains(&to) {
                    graph.get_mut(&from).unwrap().insert(to);
                }
            }
        }
    }
    graph
}

/// A cycle in `graph`, if any.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|n| n == node) {
            let mut cycle = stack[i..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        stack.push(node.to_owned());
        for next in &graph[node] {
            if let Some(c) = visit(next, graph, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph.keys().find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

#[test]
fn no_two_modules_of_a_crate_import_each_other() {
    let root = workspace_root();
    let mut cycles = Vec::new();
    for dir in CRATE_DIRS {
        let src = root.join(dir).join("src");
        if src.exists()
            && let Some(cycle) = find_cycle(&module_graph(&src))
        {
            cycles.push(format!("{dir}: {}", cycle.join(" -> ")));
        }
    }
    assert!(cycles.is_empty(), "module import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn the_cycle_finder_finds_a_planted_cycle() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::write(src.join("lib.rs"), "//! x\npub mod a;\npub mod b;\npub mod c;\n").unwrap();
    std::fs::write(src.join("a.rs"), "//! a\nuse crate::b::B;\n").unwrap();
    std::fs::write(src.join("b.rs"), "//! b\nuse crate::{c::C, x};\n").unwrap();
    std::fs::write(src.join("c.rs"), "//! c\nfn f() { crate::a::g() }\n").unwrap();
    let cycle = find_cycle(&module_graph(src)).expect("a -> b -> c -> a");
    assert_eq!(cycle.len(), 4);
    std::fs::write(src.join("c.rs"), "//! c\n").unwrap();
    assert_eq!(find_cycle(&module_graph(src)), None);
}
