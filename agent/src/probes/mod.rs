//! Loading and attaching the eBPF programs, and choosing the backend for socket capture.
//!
//! Two backends carry the same programs: syscall tracepoints, which every kernel with
//! tracefs has, and kprobes on the syscall wrappers, where the kernel has kprobes. The
//! registry below says which program needs which hook, so that a missing kernel feature
//! is reported by name.

pub mod btf;
pub mod inject;
pub mod select;
pub mod tls;

use std::{
    ffi::CString,
    fmt,
    path::{Path, PathBuf},
};

use agent_common::{KernelOffsets, MAX_PAYLOAD, NextMessage, ProbeConfig, counter, lost, maps};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{KProbe, TracePoint, UProbe, uprobe::UProbeAttachLocation, uprobe::UProbeScope},
};
use thiserror::Error;
use tracing::{debug, info, warn};

/// The eBPF object built by build.rs (aya-build) and embedded here, in one place.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sonde-ebpf"));

const TRACEFS: &str = "/sys/kernel/tracing";

/// How socket syscalls are hooked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// kprobes where the kernel can attach them, syscall tracepoints otherwise.
    Auto,
    /// kprobes/kretprobes on the syscall entry points (needs CONFIG_KPROBES).
    Kprobe,
    /// syscalls/sys_enter_* and sys_exit_* tracepoints (needs CONFIG_FTRACE_SYSCALLS).
    Tracepoint,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Auto => "auto",
            Backend::Kprobe => "kprobe",
            Backend::Tracepoint => "tracepoint",
        })
    }
}

#[derive(Debug, Error)]
pub enum ProbeError {
    #[error(
        "sonde needs root, or the capabilities CAP_BPF and CAP_PERFMON, to load its eBPF \
         programs, and this process lacks {missing} (effective uid {uid}); run it with sudo, \
         or give the container CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN (TLS capture), \
         CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH as deploy/kubernetes/sonde-daemonset.yaml \
         does (README, \"Security\")"
    )]
    NotPrivileged { uid: u32, missing: &'static str },
    #[error(
        "the kernel has no tracefs at {TRACEFS} and mounting it failed ({0}); sonde needs \
         CONFIG_TRACING and permission to mount tracefs (or mount it yourself: \
         mount -t tracefs tracefs {TRACEFS})"
    )]
    Tracefs(std::io::Error),
    #[error(
        "--probe-backend kprobe was asked for, but this kernel cannot attach kprobes \
         ({0}); it needs CONFIG_KPROBES and CONFIG_KPROBE_EVENTS. Use --probe-backend \
         tracepoint (or auto) instead"
    )]
    NoKprobes(String),
    #[error(
        "the syscall tracepoint syscalls/{0} is missing; the tracepoint backend needs \
         CONFIG_FTRACE_SYSCALLS (or use --probe-backend kprobe on a kernel with kprobes)"
    )]
    NoSyscallTracepoint(String),
    #[error("reading kernel structure offsets from BTF failed: {0}")]
    Btf(#[from] btf::BtfError),
    #[error(
        "loading the eBPF programs failed: {0}. sonde needs Linux 5.8 or newer (BPF ring \
         buffer) with BTF (CONFIG_DEBUG_INFO_BTF=y)"
    )]
    Load(#[source] aya::EbpfError),
    #[error("the kernel refused eBPF program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("attaching {program} to {hook} failed: {source}")]
    Attach {
        program: &'static str,
        hook: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error(
        "this sonde binary was built without its eBPF programs (AYA_BUILD_SKIP was set); \
         rebuild it without AYA_BUILD_SKIP"
    )]
    NoObject,
    #[error("the eBPF object lacks {0} (a build mismatch between agent and agent-ebpf)")]
    MissingMap(&'static str),
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("--payload-cap must be between 0 and {MAX_PAYLOAD} bytes, not {0}")]
    PayloadCap(u32),
    #[error("--cgroup {}: {why}", path.display())]
    Cgroup { path: PathBuf, why: String },
    #[error("cannot read the tracepoint format {}: {why}", path.display())]
    TracepointFormat { path: PathBuf, why: String },
}

/// Settings for loading.
#[derive(Clone, Debug)]
pub struct ProbeOptions {
    pub backend: Backend,
    pub payload_cap: u32,
    pub ring_buffer_bytes: u32,
    pub wakeup_bytes: u64,
    /// Which processes the kernel leaves alone.
    pub selection: select::KernelSelection,
    /// `--follow-goroutines`: the kernel marks Go goroutines (the uprobes that do it
    /// are attached by [`Probes::attach_tls`] only when the target has them).
    pub follow_goroutines: bool,
}

/// What a socket hook is, for each backend.
struct SyscallHook {
    /// Tracepoint program name.
    tp_program: &'static str,
    /// Tracepoints (in syscalls/) it attaches to.
    tracepoints: &'static [&'static str],
    /// Kprobe program name.
    kp_program: &'static str,
    /// Syscalls (without the arch prefix) it attaches to.
    syscalls: &'static [&'static str],
    /// Entry (kprobe) or return (kretprobe) hook.
    on_return: bool,
}

macro_rules! io_hooks {
    ($($name:literal, $tp_suffix:literal, $sys:literal;)*) => {
        &[$(
            SyscallHook {
                tp_program: concat!("sys_", $name, "_enter"),
                tracepoints: &[concat!("sys_enter_", $tp_suffix)],
                kp_program: concat!("kp_", $name, "_enter"),
                syscalls: &[$sys],
                on_return: false,
            },
            SyscallHook {
                tp_program: concat!("sys_", $name, "_exit"),
                tracepoints: &[concat!("sys_exit_", $tp_suffix)],
                kp_program: concat!("kp_", $name, "_exit"),
                syscalls: &[$sys],
                on_return: true,
            },
        )*]
    };
}

const IO_HOOKS: &[SyscallHook] = io_hooks! {
    "read", "read", "read";
    "write", "write", "write";
    "readv", "readv", "readv";
    "writev", "writev", "writev";
    "recvfrom", "recvfrom", "recvfrom";
    "sendto", "sendto", "sendto";
    "recvmsg", "recvmsg", "recvmsg";
    "sendmsg", "sendmsg", "sendmsg";
    "sendfile", "sendfile64", "sendfile64";
    "connect", "connect", "connect";
};

const OTHER_HOOKS: &[SyscallHook] = &[
    SyscallHook {
        tp_program: "sys_accept_exit",
        tracepoints: &["sys_exit_accept", "sys_exit_accept4"],
        kp_program: "kp_accept_exit",
        syscalls: &["accept", "accept4"],
        on_return: true,
    },
    SyscallHook {
        tp_program: "sys_close_enter",
        tracepoints: &["sys_enter_close"],
        kp_program: "kp_close_enter",
        syscalls: &["close"],
        on_return: false,
    },
    SyscallHook {
        tp_program: "sys_dup_enter",
        tracepoints: &["sys_enter_dup2", "sys_enter_dup3"],
        kp_program: "kp_dup_enter",
        syscalls: &["dup2", "dup3"],
        on_return: false,
    },
];

/// Loaded and attached programs. Dropping it detaches everything.
pub struct Probes {
    ebpf: Ebpf,
    pub backend: Backend,
    lost: PerCpuArray<MapData, u64>,
    counters: PerCpuArray<MapData, u64>,
    /// Processes the kernel leaves alone, when user space may add to them.
    excluded: Option<BpfHashMap<MapData, u32, u8>>,
}

/// Where user space announces the start of the next message of each stream (the
/// programs split a syscall's bytes there and copy a prefix from it).
pub type NextMessageMap = BpfHashMap<MapData, u64, NextMessage>;

impl Probes {
    /// Checks privileges and kernel features, loads the programs with this kernel's
    /// structure offsets, and attaches them. Returns the probes and the ring buffer.
    pub fn load(opts: &ProbeOptions) -> Result<(Probes, RingBuf<MapData>), ProbeError> {
        if opts.payload_cap as usize > MAX_PAYLOAD {
            return Err(ProbeError::PayloadCap(opts.payload_cap));
        }
        if EBPF_OBJECT.is_empty() {
            return Err(ProbeError::NoObject);
        }
        check_privileges()?;
        raise_memlock_limit();
        ensure_tracefs()?;

        // Read and dropped at once: the kernel's BTF parsed is several MiB.
        let offsets: KernelOffsets = btf::kernel_offsets(&btf::Btf::from_kernel()?)?;
        debug!(?offsets, "kernel structure offsets");

        let backend = choose_backend(opts.backend)?;
        let (select, fork_child_pid_offset) = select::settings(&opts.selection)?;
        let config = ProbeConfig {
            offsets,
            payload_cap: opts.payload_cap,
            agent_tgid: std::process::id(),
            wakeup_bytes: opts.wakeup_bytes,
            select,
            fork_child_pid_offset,
            // The injector's own; the main object does not read it.
            sample_below: 0,
            follow_goroutines: u32::from(opts.follow_goroutines),
            _pad: 0,
        };
        let kernel_btf = kernel_btf_for(EBPF_OBJECT);
        let mut ebpf = EbpfLoader::new()
            .btf(kernel_btf.as_ref())
            .override_global(agent_common::globals::CONFIG, &config, true)
            .map_max_entries(maps::EVENTS, opts.ring_buffer_bytes)
            .load(EBPF_OBJECT)
            .map_err(ProbeError::Load)?;

        let excluded = select::load(&mut ebpf, &opts.selection)?;
        attach_process_hooks(&mut ebpf)?;
        for program in TLS_PROGRAMS {
            program_as::<UProbe>(&mut ebpf, program)?
                .load()
                .map_err(|source| ProbeError::Program { program, source })?;
        }
        let backend = match backend {
            Backend::Kprobe => match attach_kprobes(&mut ebpf) {
                Ok(()) => Backend::Kprobe,
                // Asked for auto: a kernel that lists kprobes but refuses these (a
                // hardened kernel, another syscall wrapper naming) still gets traced.
                Err(e) if opts.backend == Backend::Auto => {
                    warn!(error = %e, "kprobes did not attach; using syscall tracepoints");
                    unload_kprobes(&mut ebpf);
                    attach_tracepoints(&mut ebpf)?;
                    Backend::Tracepoint
                }
                Err(e) => return Err(e),
            },
            _ => {
                attach_tracepoints(&mut ebpf)?;
                Backend::Tracepoint
            }
        };
        info!(backend = %backend, payload_cap = opts.payload_cap, "probes attached");

        let events = ebpf
            .take_map(maps::EVENTS)
            .ok_or(ProbeError::MissingMap(maps::EVENTS))?;
        let events = RingBuf::try_from(events).map_err(|source| ProbeError::Map {
            name: maps::EVENTS,
            source,
        })?;
        let lost = per_cpu_counters(&mut ebpf, maps::LOST)?;
        let counters = per_cpu_counters(&mut ebpf, maps::COUNTERS)?;
        Ok((
            Probes {
                ebpf,
                backend,
                lost,
                counters,
                excluded,
            },
            events,
        ))
    }

    /// Events the programs dropped so far, by cause (`agent_common::lost`), summed over CPUs.
    pub fn lost_by_cause(&self) -> [u64; lost::COUNT as usize] {
        sum_per_cpu(&self.lost)
    }

    /// The programs' other counters (`agent_common::counter`), summed over CPUs.
    pub fn counters(&self) -> [u64; counter::COUNT as usize] {
        sum_per_cpu(&self.counters)
    }

    /// Copies the programs' counters into the agent's metrics.
    pub fn publish(&self, metrics: &crate::telemetry::Metrics) {
        use std::sync::atomic::Ordering::Relaxed;
        let lost = self.lost_by_cause();
        for (slot, value) in metrics.events_lost_by_cause.iter().zip(lost) {
            slot.store(value, Relaxed);
        }
        metrics.events_lost.store(lost.iter().sum(), Relaxed);
        for (slot, value) in metrics.kernel_counters.iter().zip(self.counters()) {
            slot.store(value, Relaxed);
        }
    }

    /// Run time and count of each loaded program (see [`program_times`]).
    pub fn program_times(&self) -> Vec<crate::telemetry::ProgramTime> {
        program_times(&self.ebpf)
    }

    /// Leaves process `pid` alone from now on (a config file rule excludes it).
    pub fn exclude(&mut self, pid: u32) {
        if let Some(map) = &mut self.excluded
            && let Err(e) = map.insert(pid, 1, 0)
        {
            warn!(pid, error = %e, "an excluded process could not be told to the kernel; it stays traced");
        }
    }

    /// The map of announced message starts, for the pipeline to write (taken once).
    pub fn take_next_message_map(&mut self) -> Result<NextMessageMap, ProbeError> {
        let map = self
            .ebpf
            .take_map(maps::NEXT_MESSAGE)
            .ok_or(ProbeError::MissingMap(maps::NEXT_MESSAGE))?;
        BpfHashMap::try_from(map).map_err(|source| ProbeError::Map {
            name: maps::NEXT_MESSAGE,
            source,
        })
    }

    /// Puts the TLS uprobes on one library or executable (all processes that map it).
    pub fn attach_tls(&mut self, target: &tls::TlsTarget) -> Result<(), ProbeError> {
        let s = &target.symbols;
        let points = [
            ("ssl_read_enter", s.ssl_read),
            ("ssl_write_enter", s.ssl_write),
            ("ssl_read_ex_enter", s.ssl_read_ex),
            ("ssl_write_ex_enter", s.ssl_write_ex),
            ("ssl_do_handshake_enter", s.ssl_do_handshake),
        ];
        let mut hooks: Vec<(&'static str, u64)> = Vec::new();
        for (program, offset) in points {
            if let Some(offset) = offset {
                hooks.push((program, offset));
                hooks.push(("ssl_ret", offset));
            }
        }
        // Entry only: neither needs its return.
        hooks.extend(s.ssl_free.map(|o| ("ssl_free_enter", o)));
        hooks.extend(s.bio_write.map(|o| ("bio_write_enter", o)));
        if let Some(go) = &s.go {
            hooks.push(("go_tls_read_enter", go.read));
            hooks.push(("go_tls_write_enter", go.write));
            hooks.extend(go.returns.iter().map(|r| ("go_tls_ret", *r)));
        }
        if let Some(g) = &s.goroutines {
            hooks.push(("go_fd_read_enter", g.fd_read));
            hooks.push(("go_fd_write_enter", g.fd_write));
            hooks.extend(g.round_trip.map(|o| ("go_round_trip_enter", o)));
            hooks.extend(g.request_write.map(|o| ("go_request_write_enter", o)));
            for (enter, ret, at) in [
                ("go_serve_enter", "go_serve_ret", &g.serve),
                ("go_newproc_enter", "go_newproc_ret", &g.newproc),
            ] {
                if let Some((entry, returns)) = at {
                    hooks.push((enter, *entry));
                    hooks.extend(returns.iter().map(|r| (ret, *r)));
                }
            }
        }
        for (program, offset) in hooks {
            let probe = program_as::<UProbe>(&mut self.ebpf, program)?;
            probe
                .attach(
                    UProbeAttachLocation::AbsoluteOffset(offset),
                    &target.path,
                    UProbeScope::AllProcesses,
                )
                .map_err(|source| ProbeError::Attach {
                    program,
                    hook: format!("uprobe {}+{offset:#x}", target.path.display()),
                    source,
                })?;
        }
        Ok(())
    }

    /// Detaches every program (also done on drop).
    pub fn detach(self) {
        drop(self.ebpf);
    }
}

fn per_cpu_counters(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<PerCpuArray<MapData, u64>, ProbeError> {
    let map = ebpf.take_map(name).ok_or(ProbeError::MissingMap(name))?;
    PerCpuArray::try_from(map).map_err(|source| ProbeError::Map { name, source })
}

fn sum_per_cpu<const N: usize>(array: &PerCpuArray<MapData, u64>) -> [u64; N] {
    let mut sums = [0; N];
    for (i, sum) in sums.iter_mut().enumerate() {
        if let Ok(per_cpu) = array.get(&(i as u32), 0) {
            *sum = per_cpu.iter().sum();
        }
    }
    sums
}

/// Fails naming the capability without which nothing loads; says which features are
/// off for the other missing ones.
fn check_privileges() -> Result<(), ProbeError> {
    let caps = crate::privileges::Caps::current();
    if let Some(missing) = caps.missing_for_loading() {
        // SAFETY: geteuid takes no arguments, touches no memory and cannot fail.
        let uid = unsafe { libc::geteuid() };
        return Err(ProbeError::NotPrivileged {
            uid,
            missing: missing.name(),
        });
    }
    caps.report();
    Ok(())
}

fn raise_memlock_limit() {
    // Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; newer ones ignore it.
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: `unlimited` is a valid rlimit that outlives the call, which only reads it.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        debug!("could not raise RLIMIT_MEMLOCK; fine on Linux 5.11 and newer");
    }
}

/// Mounts tracefs when it is missing: tracepoints are found through it.
fn ensure_tracefs() -> Result<(), ProbeError> {
    if Path::new(TRACEFS).join("events").exists()
        || Path::new("/sys/kernel/debug/tracing/events").exists()
    {
        return Ok(());
    }
    let src = CString::new("tracefs").expect("no NUL");
    let target = CString::new(TRACEFS).expect("no NUL");
    // SAFETY: the source, target and type are NUL-terminated CStrings alive for the
    // call; tracefs takes no mount data, so a null data pointer is allowed.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            src.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(ProbeError::Tracefs(std::io::Error::last_os_error()));
    }
    info!(path = TRACEFS, "mounted tracefs");
    Ok(())
}

/// Whether this kernel can create kprobes through perf events.
fn kprobes_available() -> Result<(), String> {
    if !cfg!(target_arch = "x86_64") {
        return Err(
            "the kprobe backend reads x86-64 syscall registers; this is another architecture"
                .into(),
        );
    }
    if !Path::new("/sys/bus/event_source/devices/kprobe/type").exists() {
        return Err("/sys/bus/event_source/devices/kprobe is missing".into());
    }
    Ok(())
}

fn choose_backend(requested: Backend) -> Result<Backend, ProbeError> {
    match requested {
        Backend::Tracepoint => Ok(Backend::Tracepoint),
        Backend::Kprobe => {
            kprobes_available().map_err(ProbeError::NoKprobes)?;
            Ok(Backend::Kprobe)
        }
        Backend::Auto => match kprobes_available() {
            Ok(()) => Ok(Backend::Kprobe),
            Err(why) => {
                info!(reason = %why, "kprobes unavailable; using syscall tracepoints");
                Ok(Backend::Tracepoint)
            }
        },
    }
}

/// The program `name` of the object, as the program type `P` it must be.
/// Run time and count the kernel keeps for each loaded program of `ebpf`: they grow
/// only while `kernel.bpf_stats_enabled` is 1. Programs not loaded (the backend not
/// chosen) are left out.
pub fn program_times(ebpf: &Ebpf) -> Vec<crate::telemetry::ProgramTime> {
    ebpf.programs()
        .filter_map(|(name, program)| {
            let info = program.info().ok()?;
            Some(crate::telemetry::ProgramTime {
                name: name.to_owned(),
                run_ns: info.run_time().as_nanos() as u64,
                runs: info.run_count(),
            })
        })
        .collect()
}

/// `kernel.bpf_stats_enabled`, if it can be read.
pub fn bpf_stats_enabled() -> Option<bool> {
    let v = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").ok()?;
    Some(v.trim() != "0")
}

fn program_as<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, ProbeError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(ProbeError::MissingMap(name))?;
    program.try_into().map_err(|source| ProbeError::Program {
        program: name,
        source,
    })
}

const TLS_PROGRAMS: [&str; 19] = [
    "ssl_read_enter",
    "ssl_write_enter",
    "ssl_read_ex_enter",
    "ssl_write_ex_enter",
    "ssl_do_handshake_enter",
    "ssl_ret",
    "ssl_free_enter",
    "bio_write_enter",
    "go_tls_read_enter",
    "go_tls_write_enter",
    "go_tls_ret",
    "go_fd_read_enter",
    "go_fd_write_enter",
    "go_round_trip_enter",
    "go_request_write_enter",
    "go_serve_enter",
    "go_serve_ret",
    "go_newproc_enter",
    "go_newproc_ret",
];

fn attach_tp(
    ebpf: &mut Ebpf,
    program: &'static str,
    category: &str,
    names: &[&str],
) -> Result<(), ProbeError> {
    let tp = program_as::<TracePoint>(ebpf, program)?;
    tp.load()
        .map_err(|source| ProbeError::Program { program, source })?;
    for name in names {
        if category == "syscalls" && !tracepoint_exists(category, name) {
            return Err(ProbeError::NoSyscallTracepoint((*name).to_owned()));
        }
        tp.attach(category, name)
            .map_err(|source| ProbeError::Attach {
                program,
                hook: format!("tracepoint {category}/{name}"),
                source,
            })?;
    }
    Ok(())
}

fn tracepoint_exists(category: &str, name: &str) -> bool {
    [TRACEFS, "/sys/kernel/debug/tracing"].iter().any(|root| {
        Path::new(root)
            .join("events")
            .join(category)
            .join(name)
            .exists()
    })
}

fn attach_process_hooks(ebpf: &mut Ebpf) -> Result<(), ProbeError> {
    attach_tp(ebpf, "sched_exec", "sched", &["sched_process_exec"])?;
    attach_tp(ebpf, "sched_exit", "sched", &["sched_process_exit"])?;
    Ok(())
}

fn attach_tracepoints(ebpf: &mut Ebpf) -> Result<(), ProbeError> {
    for hook in IO_HOOKS.iter().chain(OTHER_HOOKS) {
        attach_tp(ebpf, hook.tp_program, "syscalls", hook.tracepoints)?;
    }
    Ok(())
}

/// Detaches and unloads whatever kprobes did attach, so that no syscall is seen twice.
fn unload_kprobes(ebpf: &mut Ebpf) {
    for hook in IO_HOOKS.iter().chain(OTHER_HOOKS) {
        if let Ok(kp) = program_as::<KProbe>(ebpf, hook.kp_program) {
            let _ = kp.unload();
        }
    }
}

fn attach_kprobes(ebpf: &mut Ebpf) -> Result<(), ProbeError> {
    // Load every program first, so that the verifier's verdict on all of them comes
    // before any attaches.
    for hook in IO_HOOKS.iter().chain(OTHER_HOOKS) {
        program_as::<KProbe>(ebpf, hook.kp_program)?
            .load()
            .map_err(|source| ProbeError::Program {
                program: hook.kp_program,
                source,
            })?;
    }
    for hook in IO_HOOKS.iter().chain(OTHER_HOOKS) {
        let program = hook.kp_program;
        let kp = program_as::<KProbe>(ebpf, program)?;
        for sys in hook.syscalls {
            let symbol = format!("__x64_sys_{sys}");
            let kind = if hook.on_return {
                "kretprobe"
            } else {
                "kprobe"
            };
            kp.attach(&symbol, 0).map_err(|source| ProbeError::Attach {
                program,
                hook: format!("{kind} {symbol}"),
                source,
            })?;
        }
    }
    Ok(())
}

/// The kernel's BTF as aya parses it, for an object with CO-RE relocations (which aya
/// rewrites against it); `None` for one without. aya parses it by default for every
/// object, and that parse was the largest part of the agent's start-up memory peak,
/// although neither of sonde's objects has a CO-RE relocation: their kernel offsets
/// come from [`btf::kernel_offsets`] in their config.
pub(crate) fn kernel_btf_for(object: &[u8]) -> Option<aya::Btf> {
    has_core_relocations(object).then(|| aya::Btf::from_sys_fs().ok())?
}

/// Whether an eBPF object's `.BTF.ext` lists CO-RE relocations (its header's
/// `core_relo_len`, at byte 28 of a header 32 bytes or longer). An object that cannot
/// be read counts as having some.
fn has_core_relocations(object: &[u8]) -> bool {
    use object::{Object, ObjectSection};
    let Ok(elf) = object::File::parse(object) else {
        return true;
    };
    let Some(ext) = elf.section_by_name(".BTF.ext").and_then(|s| s.data().ok()) else {
        return false;
    };
    let word = |at: usize| {
        ext.get(at..at + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    match word(4) {
        Some(header) if header >= 32 => word(28).is_none_or(|len| len > 0),
        Some(_) => false,
        None => true,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn neither_object_needs_the_kernel_btf_parsed_by_aya() {
        // If one ever gets CO-RE relocations, kernel_btf_for gives aya the BTF again,
        // and the start-up memory it costs is back.
        assert!(!super::has_core_relocations(super::EBPF_OBJECT));
        assert!(!super::has_core_relocations(super::inject::INJECT_OBJECT));
        assert!(super::has_core_relocations(b"not an ELF object"));
    }
}
