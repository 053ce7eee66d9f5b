//! `cargo xtask vm-test`: a subset of the privileged suite on Debian's own kernels.
//!
//! Each kernel boots in QEMU (TCG: nested KVM hangs on this project's machines) through
//! virtme-ng, over this machine's root filesystem read-only, so the checkout, the built
//! agent, tests/.venv and the test clients are there as they are here. Inside,
//! scripts/vm-guest.sh runs [`TESTS`] once per backend and leaves pytest's output,
//! JUnit XML and exit code per kernel and backend in a directory shared with the host
//! (`<target>/vm-test/<kernel>/`), which is read back here.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::{describe, run, sonde_bin, status_of, step, target_dir};

/// Kernel series that vm-test boots, as scripts/setup-vm.sh names them.
pub const KERNELS: &[&str] = &["6.1", "6.12"];
/// Socket backends run on every kernel. `auto` must come out as kprobes there.
pub const BACKENDS: &[&str] = &["auto", "tracepoint"];

/// The part of tests/ that runs in each VM: HTTP keep-alive, pipelining and sendfile;
/// HTTPS through OpenSSL (shared libssl), Node.js (static OpenSSL) and Go (crypto/tls);
/// RabbitMQ with pika; and the start-up refusals, which choose their own backends
/// (the guest runs them with the first backend only).
pub const TESTS: &[&str] = &[
    "tests/test_agent_cli.py",
    "tests/test_http_integration.py::test_keepalive_curl_nginx",
    "tests/test_http_integration.py::test_keepalive_pyclient_app",
    "tests/test_http_integration.py::test_pipelining_nginx",
    "tests/test_http_integration.py::test_nginx_sendfile_static_then_next_request",
    "tests/test_http_integration.py::test_nginx_sendfile_pipelined",
    "tests/test_tls_integration.py::test_curl_nginx_keepalive",
    "tests/test_tls_integration.py::test_python_server_python_client_keepalive",
    "tests/test_tls_integration.py::test_node_server_node_client_keepalive",
    "tests/test_tls_integration.py::test_go_server_go_client_keepalive",
    "tests/test_amqp_integration.py::test_python_direct_confirms_manual_ack",
];

/// Longest a guest may run, boot to power-off, before it is stopped as hung.
const GUEST_TIMEOUT_SECONDS: u32 = 1800;
/// vCPUs and memory of each guest.
const GUEST_CPUS: &str = "2";
const GUEST_MEMORY: &str = "4G";

#[derive(clap::Args)]
pub struct VmArgs {
    /// Kernel to boot: 6.1, 6.12 or all.
    #[arg(long, default_value = "all", value_parser = ["6.1", "6.12", "all"])]
    kernel: String,
    /// Socket backend: auto (which must attach kprobes), tracepoint, or all.
    #[arg(long, default_value = "all", value_parser = ["auto", "tracepoint", "all"])]
    backend: String,
    /// Skip the setup scripts (setup.sh, setup-tests.sh, setup-clients.sh, setup-vm.sh).
    #[arg(long)]
    skip_setup: bool,
    /// Skip the release build (the guest runs the existing binary, or SONDE_BIN).
    #[arg(long)]
    no_build: bool,
    /// Instead of the tests, measure what a syscall costs with each backend, and empty
    /// kprobe, tracepoint and fentry programs (bench/syscall_cost.py --hooks; bpftrace).
    #[arg(long)]
    bench: bool,
    /// Extra arguments for pytest in the guest (e.g. `-- -k keepalive -x`).
    #[arg(last = true)]
    pytest_args: Vec<OsString>,
}

fn choice<'a>(value: &'a str, all: &[&'a str]) -> Vec<&'a str> {
    if value == "all" {
        all.to_vec()
    } else {
        vec![value]
    }
}

pub fn vm_test(root: &Path, a: &VmArgs) -> Result<()> {
    let kernels = choice(&a.kernel, KERNELS);
    let backends = if a.bench {
        vec!["bench"]
    } else {
        choice(&a.backend, BACKENDS)
    };
    if !a.skip_setup {
        crate::setup(root)?;
        crate::setup_tests(root)?;
        setup_vm(root, &kernels)?;
    }
    if !a.no_build {
        crate::build(root)?;
    }
    run_guests(root, &kernels, &backends, &a.pytest_args)
}

/// scripts/setup-vm.sh: QEMU, virtme-ng and the kernels.
pub fn setup_vm(root: &Path, kernels: &[&str]) -> Result<()> {
    step("scripts/setup-vm.sh (QEMU, virtme-ng, Debian kernels)");
    run(crate::as_root(root.join("scripts/setup-vm.sh"))
        .args(kernels)
        .current_dir(root))
}

/// Boots each kernel in turn and runs the subset with each backend in it. Every kernel
/// and backend runs even after one failed; the error lists each that failed.
pub fn run_guests(
    root: &Path,
    kernels: &[&str],
    backends: &[&str],
    pytest_args: &[OsString],
) -> Result<()> {
    let bin = std::env::var_os("SONDE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| sonde_bin(root));
    let bin = std::path::absolute(&bin)
        .with_context(|| format!("agent binary path {}", bin.display()))?;
    let mut failed = Vec::new();
    let mut summary = Vec::new();
    for kernel in kernels {
        let results = target_dir(root).join("vm-test").join(kernel);
        let _ = std::fs::remove_dir_all(&results);
        std::fs::create_dir_all(&results)
            .with_context(|| format!("could not create {}", results.display()))?;
        let (image, package) = kernel_image(root, kernel)?;
        step(&format!(
            "vm-test: Linux {kernel} ({package}), backends {}",
            backends.join(", ")
        ));
        let started = Instant::now();
        let mut cmd = guest_command(root, &image, &results, kernel, backends, &bin, pytest_args);
        let booted = status_of(&mut cmd);
        let wall = started.elapsed().as_secs();
        for backend in backends {
            let name = format!("{kernel}-{backend}");
            let outcome = read_outcome(&results, &name);
            let line = match &outcome {
                Ok(seconds) => format!("Linux {kernel}, backend {backend}: passed ({seconds} s)"),
                Err(why) => format!("Linux {kernel}, backend {backend}: FAILED: {why}"),
            };
            if outcome.is_err() {
                failed.push(line.clone());
            }
            summary.push(line);
        }
        summary.push(format!(
            "Linux {kernel}: guest ran {wall} s, boot to power-off"
        ));
        if let Err(e) = booted {
            failed.push(format!("Linux {kernel}: {e:#}"));
        }
    }
    step("vm-test summary");
    for line in &summary {
        eprintln!("  {line}");
    }
    if failed.is_empty() {
        Ok(())
    } else {
        bail!("vm-test: {}", failed.join("; "))
    }
}

/// The kernel image setup-vm.sh unpacked for `kernel`, and the package it came from.
fn kernel_image(root: &Path, kernel: &str) -> Result<(PathBuf, String)> {
    let dir = root.join(".tools/kernels").join(kernel);
    let package = std::fs::read_to_string(dir.join("package"))
        .with_context(|| {
            format!(
                "kernel {kernel} is not unpacked in {}: run scripts/setup-vm.sh {kernel}",
                dir.display()
            )
        })?
        .trim()
        .to_owned();
    let boot = dir.join("boot");
    let image = std::fs::read_dir(&boot)
        .with_context(|| format!("could not read {}", boot.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("no vmlinuz-* in {}", boot.display()))?;
    Ok((image, package))
}

/// `vng --disable-kvm --run IMAGE ... --exec 'scripts/vm-guest.sh ...'`, under a timeout.
fn guest_command(
    root: &Path,
    image: &Path,
    results: &Path,
    kernel: &str,
    backends: &[&str],
    bin: &Path,
    pytest_args: &[OsString],
) -> Command {
    let venv = root.join(".tools/virtme-ng/bin");
    let mut words: Vec<String> = vec![
        "env".into(),
        format!("SONDE_BIN={}", bin.display()),
        root.join("scripts/vm-guest.sh").display().to_string(),
        kernel.into(),
        results.display().to_string(),
        backends.join(","),
        "--".into(),
    ];
    if backends != ["bench"] {
        words.extend(TESTS.iter().map(|t| t.to_string()));
    }
    words.extend(pytest_args.iter().map(|a| a.to_string_lossy().into_owned()));
    let script = words
        .iter()
        .map(|w| shell_quote(w))
        .collect::<Vec<_>>()
        .join(" ");
    // virtme-ng runs its helpers (virtme-run) from PATH.
    let path = format!(
        "{}:{}",
        venv.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = crate::as_root("timeout");
    cmd.current_dir(root)
        .arg(GUEST_TIMEOUT_SECONDS.to_string())
        .arg("env")
        .arg(format!("PATH={path}"))
        .arg(venv.join("vng"))
        .arg("--disable-kvm")
        .arg("--run")
        .arg(image)
        .args(["--cpus", GUEST_CPUS, "--memory", GUEST_MEMORY])
        .arg("--rwdir")
        .arg(results)
        .arg("--exec")
        .arg(script);
    eprintln!("xtask: {}", describe(&cmd));
    cmd
}

/// What the guest left for one kernel and backend: the seconds pytest took, or why it
/// failed (pytest's short summary of failures, or that no result came back).
fn read_outcome(results: &Path, name: &str) -> Result<u64, String> {
    let rc = std::fs::read_to_string(results.join(format!("{name}.rc")))
        .map_err(|_| "no result: the guest did not run it to the end (see its output above)")?;
    let seconds = std::fs::read_to_string(results.join(format!("{name}.seconds")))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    match rc.trim() {
        "0" => Ok(seconds),
        code => {
            let log =
                std::fs::read_to_string(results.join(format!("{name}.log"))).unwrap_or_default();
            let failures: Vec<&str> = log
                .lines()
                .filter(|l| l.starts_with("FAILED ") || l.starts_with("ERROR "))
                .collect();
            let detail = if failures.is_empty() {
                String::new()
            } else {
                format!(": {}", failures.join(", "))
            };
            Err(format!(
                "pytest exit {code}{detail} (log: {})",
                results.join(format!("{name}.log")).display()
            ))
        }
    }
}

/// One word for the guest's sh, quoted.
fn shell_quote(word: &str) -> String {
    let plain = word
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./:=,+@%".contains(c));
    if plain && !word.is_empty() {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}
