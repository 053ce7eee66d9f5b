//! Builds the eBPF programs (agent-ebpf) with the pinned nightly and bpf-linker, so that
//! a plain `cargo build` of the agent embeds them. `AYA_BUILD_SKIP=1` skips it (for
//! tools that only need the user-space code to type-check).

fn main() -> anyhow::Result<()> {
    let toolchain = std::env::var("SONDE_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly-2026-05-20".into());
    println!("cargo:rerun-if-env-changed=SONDE_EBPF_TOOLCHAIN");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent-ebpf");
    let root = root.to_str().expect("the workspace path is UTF-8");
    aya_build::build_ebpf(
        [aya_build::Package { name: "agent-ebpf", root_dir: root, ..Default::default() }],
        aya_build::Toolchain::Custom(&toolchain),
    )
}
