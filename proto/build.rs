//! Compiles the Raft transport and admin API with a vendored protoc, so a fresh
//! machine needs nothing but cargo.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build reads PROTOC; the build script is single-threaded here.
    std::env::set_var("PROTOC", protoc);
    tonic_prost_build::configure().compile_protos(&["proto/raft.proto", "proto/admin.proto"], &["proto"])?;
    Ok(())
}
