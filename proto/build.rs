//! Compiles `proto/taskd/v1/*.proto` with protox (pure Rust, no system `protoc`) and generates
//! the tonic clients and servers. The encoded descriptor set is written to `OUT_DIR` for gRPC
//! server reflection, which tonic-prost-build does not do in this mode.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    let files = [root.join("taskd/v1/taskd.proto")];
    // tonic-prost-build emits no rerun-if-changed of its own.
    println!("cargo:rerun-if-changed={}", root.display());

    let fds = protox::compile(&files, [&root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("taskd_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
