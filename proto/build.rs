//! Generates the v1 gRPC contract (client and server stubs) and a file descriptor set for reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/nid/v1/common.proto",
        "proto/nid/v1/enrollment.proto",
        "proto/nid/v1/authentication.proto",
        "proto/nid/v1/admin.proto",
        "proto/nid/v1/diagnostics.proto",
        "proto/nid/v1/control.proto",
        "proto/nid/v1/cell.proto",
    ];
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("nid_v1_descriptor.bin"))
        .compile_protos(&files, &["proto"])?;
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    Ok(())
}
