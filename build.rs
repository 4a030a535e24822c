//! Compiles `proto/` without a system `protoc`: protox parses the protos in pure Rust and
//! tonic-prost-build generates the code from the descriptor set. The descriptor set is also
//! written to `OUT_DIR` so the server can offer gRPC reflection.

use std::{env, fs, path::PathBuf};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/fraudgate/v1/fraudgate.proto",
        "proto/fraudgate/v1/cluster.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(protos, ["proto"])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("fraudgate_descriptor.bin"),
        fds.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
