//! Builds the eBPF programs (agent-ebpf) with the pinned nightly and bpf-linker, so that
//! a plain `cargo build` of the agent embeds them. `AYA_BUILD_SKIP=1` skips that (for
//! unit tests of the user-space code): the agent then carries an empty object and
//! `sonde run` says so.

fn main() -> anyhow::Result<()> {
    let toolchain =
        std::env::var("SONDE_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly-2026-05-20".into());
    println!("cargo:rerun-if-env-changed=SONDE_EBPF_TOOLCHAIN");
    // Read at run time, not baked in with env!: cargo shares a build script's binary
    // between checkouts of the same workspace (it hashes path packages by their place
    // in the workspace), and a baked path would build another checkout's programs.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest_dir).join("../agent-ebpf");
    let root = root.to_str().expect("the workspace path is UTF-8");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "agent-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let skipped =
        std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skipped {
        // The main object and the injector's (`--inject-traceparent`).
        for object in ["sonde-ebpf", "sonde-inject"] {
            std::fs::write(out_dir.join(object), [])?;
        }
    }
    Ok(())
}
