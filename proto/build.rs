//! Compiles the project's .proto files with protox (pure Rust), so a build needs no protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "tern/identity/v1/identity.proto",
        "tern/testing/v1/echo.proto",
    ];
    for file in files {
        println!("cargo:rerun-if-changed=proto/{file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
