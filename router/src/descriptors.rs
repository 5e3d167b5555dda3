//! What the router's reflection describes: its public services and exactly the types they use,
//! in the files that define them. The cells' internal services (`Cell`, `Control`,
//! `BucketAdmin`, `RaftTransport`) and every message only they use are left out, so neither a
//! listing nor a symbol lookup shows them.

use prost::Message as _;
use prost_types::{DescriptorProto, FileDescriptorProto, FileDescriptorSet};
use std::collections::{HashMap, HashSet};

/// The subset of the encoded set `encoded` that serves `public` (fully qualified service names).
pub fn public_descriptors(encoded: &[u8], public: &[&str]) -> Result<FileDescriptorSet, prost::DecodeError> {
    let all = FileDescriptorSet::decode(encoded)?;
    // Every message and enum by its full name (".pkg.Outer.Inner"), with the fields' type names.
    let mut uses: HashMap<String, Vec<String>> = HashMap::new();
    fn index(prefix: &str, m: &DescriptorProto, uses: &mut HashMap<String, Vec<String>>) {
        let name = format!("{prefix}.{}", m.name());
        for e in &m.enum_type {
            uses.insert(format!("{name}.{}", e.name()), Vec::new());
        }
        for n in &m.nested_type {
            index(&name, n, uses);
        }
        let fields = m.field.iter().filter(|f| !f.type_name().is_empty()).map(|f| f.type_name().to_owned());
        // A nested type is kept with its parent, so the parent is kept for its nested types.
        uses.insert(name, fields.collect());
    }
    for f in &all.file {
        let prefix = if f.package().is_empty() { String::new() } else { format!(".{}", f.package()) };
        for m in &f.message_type {
            index(&prefix, m, &mut uses);
        }
        for e in &f.enum_type {
            uses.insert(format!("{prefix}.{}", e.name()), Vec::new());
        }
    }
    let is_public = |f: &FileDescriptorProto, service: &str| {
        public.contains(&format!("{}.{service}", f.package()).as_str())
    };
    // The types the public methods reach, transitively.
    let mut todo: Vec<String> = all
        .file
        .iter()
        .flat_map(|f| f.service.iter().filter(|s| is_public(f, s.name())))
        .flat_map(|s| s.method.iter().flat_map(|m| [m.input_type().to_owned(), m.output_type().to_owned()]))
        .collect();
    let mut used: HashSet<String> = HashSet::new();
    while let Some(t) = todo.pop() {
        if used.insert(t.clone())
            && let Some(fields) = uses.get(&t)
        {
            todo.extend(fields.iter().cloned());
        }
    }
    // Keep, per file, the public services and the top-level types in use (a nested type in use
    // keeps its parent); drop files left empty, and imports of dropped files.
    let mut file: Vec<FileDescriptorProto> = Vec::new();
    for f in &all.file {
        let prefix = if f.package().is_empty() { String::new() } else { format!(".{}", f.package()) };
        let reached = |name: &str| {
            let full = format!("{prefix}.{name}");
            used.iter().any(|u| *u == full || u.starts_with(&format!("{full}.")))
        };
        let mut f = f.clone();
        f.service.retain(|s| {
            public.contains(&format!("{}.{}", f.package.as_deref().unwrap_or(""), s.name()).as_str())
        });
        f.message_type.retain(|m| reached(m.name()));
        f.enum_type.retain(|e| reached(e.name()));
        if !(f.service.is_empty() && f.message_type.is_empty() && f.enum_type.is_empty()) {
            file.push(f);
        }
    }
    let kept: HashSet<String> = file.iter().map(|f| f.name().to_owned()).collect();
    for f in &mut file {
        f.dependency.retain(|d| kept.contains(d));
        // Indexes into the dependency list no longer hold after pruning it.
        f.public_dependency.clear();
        f.weak_dependency.clear();
    }
    Ok(FileDescriptorSet { file })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PUBLIC: &[&str] =
        &["nid.v1.Enrollment", "nid.v1.Authentication", "nid.v1.Admin", "nid.v1.Diagnostics"];

    fn services(set: &FileDescriptorSet) -> Vec<String> {
        set.file
            .iter()
            .flat_map(|f| f.service.iter().map(|s| format!("{}.{}", f.package(), s.name())))
            .collect()
    }

    #[test]
    fn only_the_public_services_remain_and_every_type_they_use_resolves() {
        let set = public_descriptors(nid_proto::FILE_DESCRIPTOR_SET, PUBLIC).unwrap();
        let mut listed = services(&set);
        listed.sort();
        let mut want: Vec<String> = PUBLIC.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(listed, want);
        // The full set does carry the internal ones: the filter is what removes them.
        let full = FileDescriptorSet::decode(nid_proto::FILE_DESCRIPTOR_SET).unwrap();
        assert!(services(&full).iter().any(|s| s == "nid.v1.Cell"));

        let mut defined: HashSet<String> = HashSet::new();
        fn walk(prefix: &str, m: &prost_types::DescriptorProto, out: &mut HashSet<String>) {
            let name = format!("{prefix}.{}", m.name());
            for e in &m.enum_type {
                out.insert(format!("{name}.{}", e.name()));
            }
            for n in &m.nested_type {
                walk(&name, n, out);
            }
            out.insert(name);
        }
        for f in &set.file {
            let prefix = format!(".{}", f.package());
            for m in &f.message_type {
                walk(&prefix, m, &mut defined);
            }
            for e in &f.enum_type {
                defined.insert(format!("{prefix}.{}", e.name()));
            }
        }
        let mut used: Vec<String> = Vec::new();
        fn fields(m: &prost_types::DescriptorProto, out: &mut Vec<String>) {
            out.extend(
                m.field.iter().filter(|f| !f.type_name().is_empty()).map(|f| f.type_name().to_owned()),
            );
            for n in &m.nested_type {
                fields(n, out);
            }
        }
        for f in &set.file {
            for m in &f.message_type {
                fields(m, &mut used);
            }
            for s in &f.service {
                for m in &s.method {
                    used.push(m.input_type().to_owned());
                    used.push(m.output_type().to_owned());
                }
            }
        }
        let missing: Vec<&String> = used.iter().filter(|t| !defined.contains(*t)).collect();
        assert!(missing.is_empty(), "types used but not described: {missing:?}");
        // Types only internal services use are not described at all.
        for internal in [".nid.v1.CellRequest", ".nid.v1.RoutingTable", ".nid.v1.RaftMessageBatch"] {
            assert!(!defined.contains(internal), "{internal} is described");
        }
        // Every import names a file in the set.
        let files: HashSet<&str> = set.file.iter().map(|f| f.name()).collect();
        for f in &set.file {
            for d in &f.dependency {
                assert!(files.contains(d.as_str()), "{} imports {d}, which is not in the set", f.name());
            }
        }
    }
}
