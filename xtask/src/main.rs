//! `cargo xtask`: sonde's build, run and test entry points.
//!
//! ```text
//! cargo xtask build-ebpf          the eBPF object alone (pinned nightly, bpf-linker)
//! cargo xtask build               release build of the agent (embeds the eBPF object)
//! cargo xtask run -- <args>       setup, build, then `sonde run <args>` as root
//! cargo xtask lint                cargo fmt --check and clippy -D warnings, agent-ebpf and fuzz/ included
//! cargo xtask fuzz [-s N] [T...]  build every fuzz target in fuzz/, run each (or T) N s (30)
//! cargo xtask test [--vm]         setup, lint, unit tests, fuzzing, release build, pytest on tests/ (and vm-test --ci)
//! cargo xtask vm-test [--ci] [--kernel K] [--backend B] [-- pytest args]
//!                                 a subset of tests/ on Debian's 6.1 and 6.12 kernels in QEMU (see vm.rs)
//! cargo xtask bench [--skip-setup] [-- --quick --json PATH ...]
//!                                 setup, build, then bench/bench.py (untraced against traced, ratios)
//! cargo xtask demo [--orders N] [--summary PATH] [--spans PATH]
//!                                 setup, build, then the order-system demo (deploy/demo/demo.py)
//! ```
//!
//! `test` is what `scripts/test.sh` and CI (`.ci/run`) run; any step that fails makes
//! it fail, after the later steps have run and shown their own results.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod vm;

/// The nightly whose rustc is on LLVM 22, the LLVM that bpf-linker is built against.
const EBPF_TOOLCHAIN: &str = "nightly-2026-05-20";
const EBPF_TARGET: &str = "bpfel-unknown-none";
/// How long `test` runs each fuzz target.
const FUZZ_SECONDS: u64 = 30;

#[derive(Parser)]
#[command(name = "xtask", about = "sonde's build, run and test tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the eBPF programs (agent-ebpf) on their own, into target/ebpf.
    BuildEbpf,
    /// Release build of the agent (target/release/sonde).
    Build,
    /// Set up the machine, build, and run the agent as root: `cargo xtask run -- [sonde run flags]`.
    Run {
        /// Skip scripts/setup.sh.
        #[arg(long)]
        skip_setup: bool,
        /// Arguments for `sonde run` (or a full sonde command line when the first one is
        /// a subcommand, not a flag).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// `cargo fmt --check` (workspace, agent-ebpf, xtask, fuzz) and `cargo clippy -D warnings`
    /// (workspace with all targets, and agent-ebpf for its BPF target on the pinned nightly).
    Lint,
    /// Build every fuzz target of fuzz/Cargo.toml (cargo-fuzz, pinned nightly), then run
    /// each for a while; a crash, a failed assertion or a hang fails the run, and the
    /// input is saved under fuzz/artifacts/<target>/.
    Fuzz {
        /// Seconds per target.
        #[arg(short, long, default_value_t = FUZZ_SECONDS)]
        seconds: u64,
        /// Targets to run (default: all).
        targets: Vec<String>,
    },
    /// Set up, lint, unit tests, fuzzing, release build, the privileged pytest suite,
    /// and, with --vm, its VM subset on Debian's kernels (vm-test).
    Test(TestArgs),
    /// Boot Debian's 6.1 and 6.12 kernels in QEMU (virtme-ng, TCG) over this machine's
    /// root filesystem and run a subset of the privileged suite in each, with the `auto`
    /// backend (which must attach kprobes there) and with syscall tracepoints.
    VmTest(vm::VmArgs),
    /// The demo: install what it needs (scripts/setup-demo.sh), build, then run a small
    /// 3D-printing order system traced by sonde into a local Jaeger, sending orders
    /// until Ctrl-C, or N of them with --orders (deploy/demo/demo.py).
    Demo(DemoArgs),
    /// Install what it needs, release build, then bench/bench.py: every workload
    /// untraced and traced by turns, a Markdown table, JSON with `-- --json PATH`,
    /// about 4 minutes with `-- --quick` (see `bench/bench.py --help`).
    Bench {
        /// Do not run the setup scripts (everything is installed already).
        #[arg(long)]
        skip_setup: bool,
        #[arg(last = true)]
        args: Vec<String>,
    },
}

#[derive(clap::Args)]
struct DemoArgs {
    /// Skip the setup scripts (scripts/setup.sh, Jaeger, scripts/setup-demo.sh).
    #[arg(long)]
    skip_setup: bool,
    /// Skip the release build of the agent.
    #[arg(long)]
    no_build: bool,
    /// Send this many orders, print the report, stop everything and exit (default:
    /// send orders until Ctrl-C).
    #[arg(long)]
    orders: Option<u32>,
    /// Write the report as JSON (one object per order) to this file.
    #[arg(long)]
    summary: Option<PathBuf>,
    /// Also write every span sonde exported to this file, as OTLP JSON lines.
    #[arg(long)]
    spans: Option<PathBuf>,
    /// More arguments for deploy/demo/demo.py (--data-dir, --jaeger-port, --keep-work).
    #[arg(last = true)]
    rest: Vec<OsString>,
}

#[derive(clap::Args)]
struct TestArgs {
    /// Skip scripts/setup.sh, scripts/setup-tests.sh and scripts/setup-clients.sh.
    #[arg(long)]
    skip_setup: bool,
    /// Skip every step before the privileged suite (lint, `cargo test`, fuzzing): for
    /// running a part of the suite, e.g. `--skip-setup --no-unit -- -k tls -x`.
    #[arg(long)]
    no_unit: bool,
    /// Skip `cargo fmt --check` and clippy.
    #[arg(long)]
    no_lint: bool,
    /// Skip building and running the fuzz targets.
    #[arg(long)]
    no_fuzz: bool,
    /// Skip the release build (pytest then uses the existing binary, or SONDE_BIN).
    #[arg(long)]
    no_build: bool,
    /// Skip the privileged pytest suite (and vm-test).
    #[arg(long)]
    no_integration: bool,
    /// Also run the CI subset of vm-test (`cargo xtask vm-test --ci`: a part of the
    /// suite on Debian's 6.1 and 6.12 kernels in QEMU, with each backend) after the
    /// privileged suite. scripts/test.sh (and so CI) passes it unless SONDE_SKIP_VM=1.
    #[arg(long)]
    vm: bool,
    /// Extra arguments for pytest (e.g. `-- -k keepalive -x`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pytest_args: Vec<OsString>,
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    match cli.cmd {
        Cmd::BuildEbpf => build_ebpf(&root),
        Cmd::Build => build(&root),
        Cmd::Run { skip_setup, args } => {
            if !skip_setup {
                setup(&root)?;
            }
            build(&root)?;
            run_agent(&root, args)
        }
        Cmd::Lint => lint(&root),
        Cmd::Fuzz { seconds, targets } => fuzz(&root, seconds, &targets),
        Cmd::Test(t) => test(&root, &t),
        Cmd::VmTest(a) => vm::vm_test(&root, &a),
        Cmd::Demo(d) => demo(&root, d),
        Cmd::Bench { skip_setup, args } => {
            if !skip_setup {
                setup(&root)?;
                // setup-tests.sh runs scripts/setup-bench.sh (vegeta) too.
                setup_tests(&root)?;
            }
            build(&root)?;
            bench(&root, &args)
        }
    }
}

/// bench/bench.py in the tests' venv (it starts RabbitMQ the way the tests do).
fn bench(root: &Path, args: &[String]) -> Result<()> {
    step("bench/bench.py");
    let python = root.join("tests/.venv/bin/python");
    if !python.exists() {
        bail!(
            "{} is missing: run without --skip-setup (scripts/setup-tests.sh makes it)",
            python.display()
        );
    }
    let mut cmd = as_root(python);
    cmd.arg(root.join("bench/bench.py"))
        .args(args)
        .env("SONDE_BIN", target_dir(root).join("release/sonde"))
        .current_dir(root);
    run(&mut cmd)
}

fn workspace_root() -> Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Ok(dir
        .parent()
        .context("xtask lives in the workspace")?
        .to_path_buf())
}

/// cargo's target directory: CARGO_TARGET_DIR when set (relative to the workspace), else target/.
fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if !d.is_empty() => root.join(d),
        _ => root.join("target"),
    }
}

fn sonde_bin(root: &Path) -> PathBuf {
    target_dir(root).join("release/sonde")
}

/// Prints a step's heading with the space left on the disk: a run that fills the disk
/// (CI's machine may have little) shows where it did.
fn step(what: &str) {
    match free_gib() {
        Some(free) => eprintln!("\n==> xtask: {what} ({free:.1} GiB free)"),
        None => eprintln!("\n==> xtask: {what}"),
    }
}

/// Free space on the working directory's file system, from `df` (no libc dependency).
fn free_gib() -> Option<f64> {
    let out = Command::new("df").args(["-Pk", "."]).output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let kib: f64 = text
        .lines()
        .nth(1)?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()?;
    Some(kib / (1024.0 * 1024.0))
}

/// In CI (`SONDE_CI=1`, set by .ci/run) a build tree no later step uses is removed as
/// soon as its step is done: a fresh machine may not have room for all of them at once.
fn drop_when_ci(dir: &Path) {
    if std::env::var_os("SONDE_CI").is_some_and(|v| v == "1") && dir.exists() {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => eprintln!(
                "xtask: SONDE_CI=1: removed {} (no later step uses it)",
                dir.display()
            ),
            Err(e) => eprintln!("xtask: SONDE_CI=1: could not remove {}: {e}", dir.display()),
        }
    }
}

fn is_root() -> bool {
    // No libc dependency: the effective uid is the second field of Uid: in /proc/self/status.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A command that runs as root: itself when we are root, else under `sudo -E`.
fn as_root(program: impl AsRef<std::ffi::OsStr>) -> Command {
    if is_root() {
        Command::new(program)
    } else {
        let mut c = Command::new("sudo");
        c.arg("-E")
            .arg("env")
            .arg(format!("PATH={}", path_env()))
            .arg(program);
        c
    }
}

fn path_env() -> String {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let cur = std::env::var("PATH").unwrap_or_default();
    format!("{home}/.cargo/bin:/usr/local/go/bin:{cur}")
}

fn cargo(root: &Path) -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root);
    c
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = status_of(cmd)?;
    if !status.success() {
        bail!("{} failed with {status}", describe(cmd));
    }
    Ok(())
}

fn status_of(cmd: &mut Command) -> Result<ExitStatus> {
    cmd.status()
        .with_context(|| format!("could not start {}", describe(cmd)))
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn setup(root: &Path) -> Result<()> {
    step("scripts/setup.sh");
    run(as_root(root.join("scripts/setup.sh")).current_dir(root))
}

/// What the privileged suite needs beyond setup.sh: the Python venv, Jaeger, the clients,
/// the demo.
fn setup_tests(root: &Path) -> Result<()> {
    step("scripts/setup-tests.sh (Python venv, Jaeger)");
    run(as_root(root.join("scripts/setup-tests.sh")).current_dir(root))?;
    step("scripts/setup-clients.sh (pika, amqplib, Go test clients)");
    run(as_root(root.join("scripts/setup-clients.sh")).current_dir(root))?;
    step("scripts/setup-demo.sh (what tests/test_demo.py runs: the demo's services and programs)");
    run(as_root(root.join("scripts/setup-demo.sh")).current_dir(root))
}

/// `cargo <subcommand>` on agent-ebpf with the pinned nightly, for the BPF target, with
/// the flags aya-build passes when the agent's build.rs builds the programs.
fn ebpf_cargo(root: &Path, subcommand: &str) -> Command {
    let arch = std::env::consts::ARCH;
    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
    ]
    .join("\x1f");
    let mut c = nightly_cargo(root);
    c.env("CARGO_ENCODED_RUSTFLAGS", rustflags)
        .args([subcommand, "--package", "agent-ebpf", "--release"])
        .args(["--target", EBPF_TARGET, "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(target_dir(root).join("ebpf"));
    c
}

/// cargo of the pinned nightly, not the one that runs xtask.
fn nightly_cargo(root: &Path) -> Command {
    let mut c = Command::new("rustup");
    c.current_dir(root)
        .env("PATH", path_env())
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO")
        .args(["run", EBPF_TOOLCHAIN, "cargo"]);
    c
}

fn build_ebpf(root: &Path) -> Result<()> {
    step(&format!("eBPF programs ({EBPF_TOOLCHAIN}, {EBPF_TARGET})"));
    run(&mut ebpf_cargo(root, "build"))?;
    eprintln!(
        "xtask: eBPF object at {}",
        target_dir(root)
            .join("ebpf")
            .join(EBPF_TARGET)
            .join("release/sonde-ebpf")
            .display()
    );
    Ok(())
}

/// Every check, even after one failed, so that one run shows all that is wrong.
fn lint(root: &Path) -> Result<()> {
    let fuzz_manifest = root.join("fuzz/Cargo.toml");
    let mut checks: Vec<(&str, Command)> = Vec::new();
    let mut fmt = cargo(root);
    fmt.args(["fmt", "--all", "--check"]);
    checks.push((
        "cargo fmt --check (workspace: agent, agent-common, agent-ebpf, xtask)",
        fmt,
    ));
    // Without --all: that would format the agent again, a path dependency of fuzz/.
    let mut fmt_fuzz = cargo(root);
    fmt_fuzz
        .args(["fmt", "--check", "--manifest-path"])
        .arg(&fuzz_manifest);
    checks.push(("cargo fmt --check (fuzz)", fmt_fuzz));
    let mut clippy = cargo(root);
    clippy
        .env("PATH", path_env())
        .args([
            "clippy",
            "--workspace",
            "--exclude",
            "agent-ebpf",
            "--all-targets",
        ])
        .args(["--", "-D", "warnings"]);
    checks.push(("cargo clippy --all-targets -D warnings (workspace)", clippy));
    let mut clippy_ebpf = ebpf_cargo(root, "clippy");
    clippy_ebpf.args(["--", "-D", "warnings"]);
    checks.push((
        "cargo clippy -D warnings (agent-ebpf, pinned nightly, BPF target)",
        clippy_ebpf,
    ));
    let mut failed = Vec::new();
    for (what, mut cmd) in checks {
        step(what);
        if let Err(e) = run(&mut cmd) {
            failed.push(format!("{what}: {e:#}"));
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        bail!("{}", failed.join("; "))
    }
}

/// `cargo fuzz <subcommand>` on fuzz/ with the pinned nightly. Debug assertions and
/// overflow checks are on, so that an overflow is a finding rather than a wrong number.
/// The eBPF object is not built: no target loads it.
fn cargo_fuzz(root: &Path, subcommand: &str) -> Command {
    let mut c = nightly_cargo(root);
    c.env("AYA_BUILD_SKIP", "1")
        .args(["fuzz", subcommand, "--fuzz-dir"])
        .arg(root.join("fuzz"));
    if subcommand != "list" {
        c.arg("--debug-assertions")
            .arg("--target-dir")
            .arg(target_dir(root).join("fuzz"));
    }
    c
}

fn fuzz(root: &Path, seconds: u64, only: &[String]) -> Result<()> {
    let listed = cargo_fuzz(root, "list")
        .output()
        .context("could not run cargo fuzz list: is cargo-fuzz installed (scripts/setup.sh)?")?;
    if !listed.status.success() {
        bail!(
            "cargo fuzz list failed: {}",
            String::from_utf8_lossy(&listed.stderr)
        );
    }
    let all: Vec<String> = String::from_utf8(listed.stdout)
        .context("cargo fuzz list printed non-UTF-8")?
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    if all.is_empty() {
        bail!("fuzz/Cargo.toml lists no fuzz targets");
    }
    if let Some(unknown) = only.iter().find(|t| !all.contains(t)) {
        bail!("no fuzz target {unknown:?}; fuzz/Cargo.toml has {all:?}");
    }
    let targets = if only.is_empty() { &all[..] } else { only };
    step(&format!(
        "fuzz targets: cargo fuzz build ({EBPF_TOOLCHAIN})"
    ));
    run(&mut cargo_fuzz(root, "build"))?;
    let mut failed = Vec::new();
    for target in targets {
        step(&format!("fuzz {target} for {seconds} s"));
        // The corpus grows across local runs in the target directory, out of the tree.
        let corpus = target_dir(root).join("fuzz/corpus").join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("could not create {}", corpus.display()))?;
        let mut cmd = cargo_fuzz(root, "run");
        cmd.arg(target)
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            // One input running this long is a hang, and a finding.
            .arg("-timeout=10");
        if let Err(e) = run(&mut cmd) {
            failed.push(format!("{target}: {e:#}"));
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        bail!(
            "fuzzing found failures (inputs in fuzz/artifacts/): {}",
            failed.join("; ")
        )
    }
}

fn build(root: &Path) -> Result<()> {
    step("release build of the agent");
    run(cargo(root)
        .env("PATH", path_env())
        .args(["build", "--release", "--package", "sonde"]))
}

/// Setup (what a fresh machine lacks, cached), the release build, then the demo
/// driver in place of this process, so that Ctrl-C reaches it alone and it stops
/// everything it started.
fn demo(root: &Path, d: DemoArgs) -> Result<()> {
    if !d.skip_setup {
        step("scripts/setup.sh (build tools, RabbitMQ)");
        run(as_root(root.join("scripts/setup.sh"))
            .env("SONDE_SETUP_TEST_PEERS", "1")
            .current_dir(root))?;
        step("scripts/build-jaeger.sh");
        run(as_root(root.join("scripts/build-jaeger.sh")).current_dir(root))?;
        step("scripts/setup-demo.sh (admesh, prusa-slicer, versitygw, the MES, the Shop's venv)");
        run(as_root(root.join("scripts/setup-demo.sh")).current_dir(root))?;
    }
    if !d.no_build {
        build(root)?;
    }
    let mut cmd = as_root("python3");
    cmd.arg(root.join("deploy/demo/demo.py"))
        .arg("--sonde")
        .arg(sonde_bin(root))
        .current_dir(root);
    if let Some(n) = d.orders {
        cmd.arg("--orders").arg(n.to_string());
    }
    if let Some(p) = &d.summary {
        cmd.arg("--summary").arg(p);
    }
    if let Some(p) = &d.spans {
        cmd.arg("--spans").arg(p);
    }
    cmd.args(&d.rest);
    step(&describe(&cmd));
    use std::os::unix::process::CommandExt;
    let error = cmd.exec();
    bail!("could not start {}: {error}", describe(&cmd))
}

fn run_agent(root: &Path, args: Vec<OsString>) -> Result<()> {
    let bin = sonde_bin(root);
    let mut full: Vec<OsString> = Vec::new();
    let first_is_flag = args
        .first()
        .is_none_or(|a| a.to_string_lossy().starts_with('-'));
    if first_is_flag {
        full.push("run".into());
    }
    full.extend(args);
    step(&format!(
        "{} {}",
        bin.display(),
        full.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    ));
    let status = status_of(as_root(&bin).args(&full).current_dir(root))?;
    // Interrupted with Ctrl-C: the agent flushes and exits 0; a signal exit is no error either.
    if !status.success() && status.code().is_some() {
        bail!("sonde exited with {status}");
    }
    Ok(())
}

fn test(root: &Path, t: &TestArgs) -> Result<()> {
    if !t.skip_setup {
        setup(root)?;
        setup_tests(root)?;
        if !t.no_integration && t.vm {
            vm::setup_vm(root, vm::KERNELS)?;
        }
    }
    // A failing step does not stop the later ones (a lint error does not hide a failing
    // test): every summary is shown, and the run fails at the end.
    let mut failed: Vec<String> = Vec::new();
    if !t.no_unit
        && !t.no_lint
        && let Err(e) = lint(root)
    {
        failed.push(format!("lint: {e:#}"));
    }
    if !t.no_unit {
        step("unit tests: cargo test --workspace");
        if let Err(e) = run(cargo(root).env("PATH", path_env()).args([
            "test",
            "--workspace",
            "--exclude",
            "agent-ebpf",
        ])) {
            failed.push(format!("unit tests: {e:#}"));
        }
        // Lint and unit tests were the debug tree's only users.
        drop_when_ci(&target_dir(root).join("debug"));
    }
    if !t.no_unit
        && !t.no_fuzz
        && let Err(e) = fuzz(root, FUZZ_SECONDS, &[])
    {
        failed.push(format!("fuzz: {e:#}"));
    }
    // The sanitized fuzz builds are the largest tree; the release build comes next.
    drop_when_ci(&target_dir(root).join("fuzz"));
    if !t.no_integration {
        if !t.no_build {
            build(root)?;
        }
        if let Err(e) = pytest(root, t) {
            failed.push(format!("{e:#}"));
        }
        if t.vm
            && let Err(e) = vm::run_guests(root, vm::KERNELS, vm::BACKENDS, &vm::CI, &[])
        {
            failed.push(format!("{e:#}"));
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        bail!("{}", failed.join("; "))
    }
}

fn pytest(root: &Path, t: &TestArgs) -> Result<()> {
    step("integration and end-to-end tests: pytest tests/");
    let py = root.join("tests/.venv/bin/python");
    if !py.exists() {
        bail!("{} is missing: run scripts/setup-tests.sh", py.display());
    }
    let status = status_of(
        as_root(&py)
            .current_dir(root)
            .env(
                "SONDE_BIN",
                std::env::var_os("SONDE_BIN").unwrap_or_else(|| sonde_bin(root).into()),
            )
            .args(["-m", "pytest", "tests/", "-v"])
            .args(&t.pytest_args),
    )?;
    match status.code() {
        Some(0) => Ok(()),
        Some(5) => bail!("pytest collected no tests (exit 5): that is a failure, not a pass"),
        _ => bail!("pytest failed with {status}"),
    }
}
