//! Compiles `proto/` with a vendored `protoc`, so a fresh machine needs no
//! system protobuf compiler.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // Messages that carry a PAN, CVV or key share get a hand-written, redacting Debug
    // (src/grpc/redact.rs) instead of prost's, which would print the value.
    let secret_messages = [
        "cardvault.v1.TokenizeRequest",
        "cardvault.v1.TokenizeBatchItem",
        "cardvault.v1.TokenizeBatchRequest",
        "cardvault.v1.DetokenizeResponse",
        "cardvault.v1.DetokenizeBatchResult",
        "cardvault.v1.DetokenizeBatchResponse",
        // Key shares.
        "cardvault.v1.InitResponse",
        "cardvault.v1.UnsealRequest",
        "cardvault.v1.SubmitRekeyShareRequest",
    ];
    config.skip_debug(secret_messages);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("cardvault_descriptor.bin"))
        .compile_with_config(
            config,
            &[
                "proto/cardvault/v1/token.proto",
                "proto/cardvault/v1/audit.proto",
                "proto/cardvault/v1/keys.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
