//! `cargo xtask vm-test`: a subset of the privileged suite on Debian's own kernels.
//!
//! Each kernel boots in QEMU (TCG: nested KVM hangs on this project's machines) through
//! virtme-ng, over this machine's root filesystem read-only, so the checkout, the built
//! agent, tests/.venv and the test clients are there as they are here. Inside,
//! scripts/vm-guest.sh runs [`TESTS`] once per backend and leaves pytest's output,
//! JUnit XML and exit code per kernel and backend in a directory shared with the host
//! (`<target>/vm-test/<kernel>/`), which is read back here.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{describe, run, sonde_bin, step, target_dir};

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

/// The CI subset (`--ci`, and `cargo xtask test --vm`, which CI runs): with each backend,
/// the agent loading every program it loads at start (the verifier's verdict is what a
/// kernel difference breaks first), exact spans of HTTP keep-alive and pipelining
/// (curl and a Python client against nginx) and of HTTPS through OpenSSL (curl against
/// nginx), and one start-up refusal (without root: it names the capabilities the kernel
/// wants), which runs once per kernel. The refusals that load programs first (forced
/// kprobes that cannot attach) take as long as an agent's start under emulation, about
/// 3 minutes on a shared machine: they are in the full subset.
pub const CI_TESTS: &[&str] = &[
    "tests/test_agent_cli.py::test_without_privileges_it_says_what_is_missing",
    "tests/test_http_integration.py::test_keepalive_curl_nginx",
    "tests/test_http_integration.py::test_pipelining_nginx",
    "tests/test_tls_integration.py::test_curl_nginx_keepalive",
];

/// Longest a guest may run, boot to power-off, before it is stopped as hung.
const GUEST_TIMEOUT_SECONDS: u64 = 1800;
/// The same for the CI subset: about twice what it took on a machine that other builds
/// kept at a load average of 10-14 (810 s).
const CI_GUEST_TIMEOUT_SECONDS: u64 = 1500;
/// How long an agent of the CI subset may take to be ready: loading its programs took
/// 101-292 s under emulation on a shared machine (6.12's verifier is the slower).
const CI_READY_TIMEOUT_SECONDS: u64 = 600;
/// pytest-timeout's limit per test in the CI subset (fixtures included: the agent's
/// start, then the test).
const CI_PYTEST_TIMEOUT_SECONDS: u64 = 900;
/// vCPUs and memory of each guest (`SONDE_VM_CPUS` chooses the vCPUs).
const GUEST_CPUS: &str = "2";
const GUEST_MEMORY: &str = "4G";
/// Modules of Debian's kernels that udev would load at boot for QEMU's emulated hardware
/// (disk and CD-ROM controller, watchdogs, SMBus, PC speaker, mouse, KVM, cpufreq, AES
/// and GHASH accelerators) and that no test needs: under TCG each costs seconds, KVM's
/// half a minute on 6.1 (without them the guests reached their script in 46-50 s
/// instead of 79-94 s, on a shared machine). The virtio, 9p and
/// overlay modules virtme-ng needs come from its initramfs.
const UNNEEDED_MODULES: &[&str] = &[
    "ahci",
    "libahci",
    "sr_mod",
    "cdrom",
    "sg",
    "iTCO_wdt",
    "iTCO_vendor_support",
    "i6300esb",
    "lpc_ich",
    "i2c_i801",
    "pcspkr",
    "psmouse",
    "kvm",
    "kvm_amd",
    "kvm_intel",
    "powernow_k8",
    "acpi_cpufreq",
    "aesni_intel",
    "ghash_clmulni_intel",
];
/// Lines of a failed guest's console shown again in the summary.
const CONSOLE_TAIL_LINES: usize = 60;

#[derive(clap::Args)]
pub struct VmArgs {
    /// Kernel to boot: 6.1, 6.12 or all.
    #[arg(long, default_value = "all", value_parser = ["6.1", "6.12", "all"])]
    kernel: String,
    /// Socket backend: auto (which must attach kprobes), tracepoint, or all.
    #[arg(long, default_value = "all", value_parser = ["auto", "tracepoint", "all"])]
    backend: String,
    /// Run the CI subset (what `cargo xtask test --vm` and CI run) instead of the full
    /// one; the kernels boot at the same time.
    #[arg(long, conflicts_with = "bench")]
    ci: bool,
    /// Boot the kernels at the same time rather than one after the other (--ci does).
    #[arg(long)]
    parallel: bool,
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

/// Which tests a guest runs, and how long it may take.
pub struct Subset {
    name: &'static str,
    tests: &'static [&'static str],
    guest_timeout: u64,
    /// pytest-timeout's limit per test (None: the guest script's default).
    pytest_timeout: Option<u64>,
    /// SONDE_READY_TIMEOUT in the guest (None: the guest script's default).
    ready_timeout: Option<u64>,
    parallel: bool,
    /// Every backend in one pytest session in the guest (one Python start).
    one_session: bool,
}

/// The CI subset, both kernels at the same time.
pub const CI: Subset = Subset {
    name: "CI subset",
    tests: CI_TESTS,
    guest_timeout: CI_GUEST_TIMEOUT_SECONDS,
    pytest_timeout: Some(CI_PYTEST_TIMEOUT_SECONDS),
    ready_timeout: Some(CI_READY_TIMEOUT_SECONDS),
    parallel: true,
    one_session: true,
};

/// The full subset, one kernel after the other.
pub const FULL: Subset = Subset {
    name: "full subset",
    tests: TESTS,
    guest_timeout: GUEST_TIMEOUT_SECONDS,
    pytest_timeout: None,
    ready_timeout: None,
    parallel: false,
    one_session: false,
};

/// The syscall cost benchmark (no tests).
const BENCH: Subset = Subset {
    name: "benchmark",
    tests: &[],
    guest_timeout: GUEST_TIMEOUT_SECONDS,
    pytest_timeout: None,
    ready_timeout: None,
    parallel: false,
    one_session: false,
};

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
    let base = if a.bench {
        BENCH
    } else if a.ci {
        CI
    } else {
        FULL
    };
    let subset = Subset {
        parallel: base.parallel || a.parallel,
        ..base
    };
    run_guests(root, &kernels, &backends, &subset, &a.pytest_args)
}

/// scripts/setup-vm.sh: QEMU, virtme-ng and the kernels.
pub fn setup_vm(root: &Path, kernels: &[&str]) -> Result<()> {
    step("scripts/setup-vm.sh (QEMU, virtme-ng, Debian kernels)");
    run(crate::as_root(root.join("scripts/setup-vm.sh"))
        .args(kernels)
        .current_dir(root))
}

/// A guest started: its kernel, its results directory and its process.
struct Guest {
    kernel: String,
    results: PathBuf,
    started: Instant,
    child: Child,
    console: std::thread::JoinHandle<()>,
}

/// Boots each kernel (one after the other, or all at once) and runs the subset with each
/// backend in it. Every kernel and backend runs even after one failed; the error lists
/// each that failed, and the summary shows the end of each failed guest's console.
pub fn run_guests(
    root: &Path,
    kernels: &[&str],
    backends: &[&str],
    subset: &Subset,
    pytest_args: &[OsString],
) -> Result<()> {
    let bin = std::env::var_os("SONDE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| sonde_bin(root));
    let bin = std::path::absolute(&bin)
        .with_context(|| format!("agent binary path {}", bin.display()))?;
    if !bin.is_file() {
        bail!(
            "vm-test: agent binary {} not found: build it with `cargo xtask build` (or set SONDE_BIN)",
            bin.display()
        );
    }
    step(&format!(
        "vm-test ({}): Linux {}, backends {}, {}",
        subset.name,
        kernels.join(" and "),
        backends.join(", "),
        if subset.parallel && kernels.len() > 1 {
            "kernels at the same time"
        } else {
            "one kernel after the other"
        }
    ));
    let all_started = Instant::now();
    let mut failed = Vec::new();
    let mut summary = Vec::new();
    let mut running: Vec<Guest> = Vec::new();
    for kernel in kernels {
        match start_guest(root, kernel, backends, &bin, subset, pytest_args) {
            Ok(guest) => running.push(guest),
            Err(e) => {
                let line = format!("Linux {kernel}: FAILED: {e:#}");
                failed.push(line.clone());
                summary.push(line);
            }
        }
        if !subset.parallel {
            for guest in running.drain(..) {
                finish_guest(guest, backends, subset, &mut summary, &mut failed);
            }
        }
    }
    for guest in running.drain(..) {
        finish_guest(guest, backends, subset, &mut summary, &mut failed);
    }
    step(&format!(
        "vm-test summary ({}, {} s in all)",
        subset.name,
        all_started.elapsed().as_secs()
    ));
    for line in &summary {
        eprintln!("  {line}");
    }
    if failed.is_empty() {
        Ok(())
    } else {
        bail!("vm-test: {}", failed.join("; "))
    }
}

fn start_guest(
    root: &Path,
    kernel: &str,
    backends: &[&str],
    bin: &Path,
    subset: &Subset,
    pytest_args: &[OsString],
) -> Result<Guest> {
    let results = target_dir(root).join("vm-test").join(kernel);
    let _ = std::fs::remove_dir_all(&results);
    std::fs::create_dir_all(&results)
        .with_context(|| format!("could not create {}", results.display()))?;
    let (image, package) = kernel_image(root, kernel)?;
    eprintln!("xtask: vm-test: Linux {kernel} from {package}");
    let mut cmd = guest_command(
        root,
        &image,
        &results,
        kernel,
        backends,
        bin,
        subset,
        pytest_args,
    );
    // The guest's console (stdout and stderr) goes to console.log and, each line marked
    // with its kernel, to this terminal.
    let (reader, writer) =
        std::io::pipe().context("could not make a pipe for the guest's console")?;
    cmd.stdout(writer.try_clone().context("pipe")?)
        .stderr(writer)
        .stdin(Stdio::null())
        // Its own process group, so that a hung guest's QEMU is stopped with it.
        .process_group(0);
    let child = cmd
        .spawn()
        .with_context(|| format!("could not start {}", describe(&cmd)))?;
    // The pipe's write ends now live in the child alone: the reader sees EOF when it ends.
    drop(cmd);
    let log_path = results.join("console.log");
    let mut log = std::fs::File::create(&log_path)
        .with_context(|| format!("could not create {}", log_path.display()))?;
    let prefix = format!("[{kernel}] ");
    let console = std::thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            let _ = writeln!(log, "{line}");
            eprintln!("{prefix}{line}");
        }
    });
    Ok(Guest {
        kernel: kernel.to_owned(),
        results,
        started: Instant::now(),
        child,
        console,
    })
}

/// Waits for a guest (stopping it at its time limit), then reads what each backend left.
fn finish_guest(
    mut guest: Guest,
    backends: &[&str],
    subset: &Subset,
    summary: &mut Vec<String>,
    failed: &mut Vec<String>,
) {
    let kernel = guest.kernel.clone();
    let deadline = Duration::from_secs(subset.guest_timeout);
    let exited = loop {
        match guest.child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if guest.started.elapsed() >= deadline => {
                stop_group(&mut guest.child);
                break Err(format!(
                    "the guest did not power off within {} s and was stopped (hung at boot, or a test past its limit)",
                    subset.guest_timeout
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(500)),
            Err(e) => break Err(format!("could not wait for the guest: {e}")),
        }
    };
    let _ = guest.console.join();
    let wall = guest.started.elapsed().as_secs();
    let mut this_failed = false;
    for backend in backends {
        let outcome = if subset.one_session {
            read_session_outcome(&guest.results, &kernel, backend)
        } else {
            read_outcome(&guest.results, &format!("{kernel}-{backend}"))
        };
        let line = match outcome {
            Ok(seconds) => {
                format!("Linux {kernel}, backend {backend}: passed (pytest {seconds} s)")
            }
            Err(why) => {
                this_failed = true;
                let line = format!("Linux {kernel}, backend {backend}: FAILED: {why}");
                failed.push(line.clone());
                line
            }
        };
        summary.push(line);
    }
    let boot = std::fs::read_to_string(guest.results.join("boot.seconds"))
        .map(|s| format!(", booted in {} s", s.trim()))
        .unwrap_or_else(|_| ", never reached the test script".into());
    summary.push(format!(
        "Linux {kernel}: the guest ran {wall} s, start to power-off{boot}"
    ));
    match exited {
        Ok(status) if status.success() => {}
        Ok(status) => {
            this_failed = true;
            failed.push(format!("Linux {kernel}: the guest exited with {status}"));
        }
        Err(why) => {
            this_failed = true;
            failed.push(format!("Linux {kernel}: {why}"));
        }
    }
    if this_failed {
        let log = guest.results.join("console.log");
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(CONSOLE_TAIL_LINES)..];
        summary.push(format!(
            "Linux {kernel}: the end of its console ({}):",
            log.display()
        ));
        summary.extend(tail.iter().map(|l| format!("    [{kernel}] {l}")));
    }
}

/// SIGTERM to the guest's process group (vng and its QEMU), SIGKILL if it lingers.
fn stop_group(child: &mut Child) {
    let group = format!("-{}", child.id());
    let _ = crate::as_root("kill")
        .args(["-TERM", "--", &group])
        .stderr(Stdio::null())
        .status();
    for _ in 0..20 {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = crate::as_root("kill")
        .args(["-KILL", "--", &group])
        .stderr(Stdio::null())
        .status();
    let _ = child.wait();
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

/// `vng --disable-kvm --run IMAGE ... --exec 'scripts/vm-guest.sh ...'`.
#[allow(clippy::too_many_arguments)]
fn guest_command(
    root: &Path,
    image: &Path,
    results: &Path,
    kernel: &str,
    backends: &[&str],
    bin: &Path,
    subset: &Subset,
    pytest_args: &[OsString],
) -> Command {
    let venv = root.join(".tools/virtme-ng/bin");
    let mut words: Vec<String> = vec!["env".into(), format!("SONDE_BIN={}", bin.display())];
    if let Some(t) = subset.pytest_timeout {
        words.push(format!("SONDE_VM_PYTEST_TIMEOUT={t}"));
    }
    if let Some(t) = subset.ready_timeout {
        words.push(format!("SONDE_READY_TIMEOUT={t}"));
    }
    if subset.one_session {
        words.push("SONDE_VM_ONE_SESSION=1".into());
    }
    words.extend([
        root.join("scripts/vm-guest.sh").display().to_string(),
        kernel.into(),
        results.display().to_string(),
        backends.join(","),
        "--".into(),
    ]);
    words.extend(subset.tests.iter().map(|t| t.to_string()));
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
    let cpus = std::env::var("SONDE_VM_CPUS").unwrap_or_else(|_| GUEST_CPUS.into());
    let mut cmd = crate::as_root("env");
    cmd.current_dir(root)
        .arg(format!("PATH={path}"))
        .arg(venv.join("vng"))
        .arg("--disable-kvm")
        .arg("--run")
        .arg(image)
        .args(["--cpus", &cpus, "--memory", GUEST_MEMORY])
        .arg("--rwdir")
        .arg(results)
        .arg("--append")
        .arg(format!("modprobe.blacklist={}", UNNEEDED_MODULES.join(",")))
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

/// What one pytest session of every backend (`one_session`) left for `backend`: its
/// tests are the ones whose id ends in `[backend]` (and those of no backend, run once).
/// Passed when at least one test of this backend passed and none of them (nor a test of
/// no backend) failed.
fn read_session_outcome(results: &Path, kernel: &str, backend: &str) -> Result<u64, String> {
    let log_path = results.join(format!("{kernel}.log"));
    let rc = std::fs::read_to_string(results.join(format!("{kernel}.rc")))
        .map_err(|_| "no result: the guest did not run pytest to the end (see its console)")?;
    let seconds = std::fs::read_to_string(results.join(format!("{kernel}.seconds")))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let tag = format!("[{backend}]");
    let passed = log
        .lines()
        .filter(|l| l.contains(&format!("{tag} PASSED")))
        .count();
    let ours = |l: &&str| l.contains(&tag) || !l.contains('[');
    let failures: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("FAILED ") || l.starts_with("ERROR "))
        .filter(ours)
        .collect();
    let code = rc.trim();
    // A failure of the other backend's tests alone fails the run (the guest's exit
    // code says so), not this backend.
    if passed > 0 && (code == "0" || failures.is_empty()) {
        return Ok(seconds);
    }
    let why = if code == "0" {
        "no test ran with this backend".to_owned()
    } else if failures.is_empty() {
        format!("pytest exit {code}, and no test of this backend passed")
    } else {
        format!("pytest exit {code}: {}", failures.join(", "))
    };
    Err(format!("{why} (log: {})", log_path.display()))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A results directory as the guest leaves it for one pytest session of both backends.
    fn session(name: &str, rc: &str, log: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("sonde-vm-outcome-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("6.12.rc"), rc).unwrap();
        std::fs::write(dir.join("6.12.seconds"), "714\n").unwrap();
        std::fs::write(dir.join("6.12.log"), log).unwrap();
        dir
    }

    const PASSED: &str = "\
tests/test_agent_cli.py::test_without_privileges_it_says_what_is_missing PASSED [ 14%]
tests/test_http_integration.py::test_keepalive_curl_nginx[auto] PASSED   [ 28%]
tests/test_http_integration.py::test_keepalive_curl_nginx[tracepoint] PASSED [ 71%]
";

    #[test]
    fn both_backends_passed() {
        let dir = session("passed", "0\n", PASSED);
        assert_eq!(read_session_outcome(&dir, "6.12", "auto"), Ok(714));
        assert_eq!(read_session_outcome(&dir, "6.12", "tracepoint"), Ok(714));
    }

    #[test]
    fn a_failure_is_laid_to_its_own_backend() {
        let log = "\
tests/test_http_integration.py::test_keepalive_curl_nginx[auto] ERROR    [ 28%]
tests/test_http_integration.py::test_keepalive_curl_nginx[tracepoint] PASSED [ 71%]
ERROR tests/test_http_integration.py::test_keepalive_curl_nginx[auto] - Failed: agent not ready
";
        let dir = session("auto-failed", "1\n", log);
        let why = read_session_outcome(&dir, "6.12", "auto").unwrap_err();
        assert!(why.contains("test_keepalive_curl_nginx[auto]"), "{why}");
        assert!(why.contains("pytest exit 1"), "{why}");
        assert_eq!(read_session_outcome(&dir, "6.12", "tracepoint"), Ok(714));
    }

    #[test]
    fn a_failure_of_no_backend_fails_both() {
        let log = format!(
            "{PASSED}FAILED tests/test_agent_cli.py::test_without_privileges_it_says_what_is_missing - AssertionError\n"
        );
        let dir = session("refusal-failed", "1\n", &log);
        for backend in BACKENDS {
            let why = read_session_outcome(&dir, "6.12", backend).unwrap_err();
            assert!(why.contains("test_without_privileges"), "{why}");
        }
    }

    #[test]
    fn a_backend_with_no_test_is_no_pass() {
        let log = "tests/test_http_integration.py::test_keepalive_curl_nginx[auto] PASSED [ 50%]\n";
        let dir = session("one-backend", "0\n", log);
        let why = read_session_outcome(&dir, "6.12", "tracepoint").unwrap_err();
        assert!(why.contains("no test ran with this backend"), "{why}");
    }

    #[test]
    fn a_guest_that_left_nothing_failed() {
        let dir = session("nothing", "0\n", PASSED);
        std::fs::remove_file(dir.join("6.12.rc")).unwrap();
        let why = read_session_outcome(&dir, "6.12", "auto").unwrap_err();
        assert!(why.contains("no result"), "{why}");
    }
}
