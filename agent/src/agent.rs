//! `sonde run`: load the probes, drain the ring buffer into the pipeline, export, and
//! shut down cleanly on SIGINT/SIGTERM.
//!
//! One thread runs the event loop: the ring buffer, the pipeline, the exporter and
//! attaching uprobes. Everything that reads files to find things out (naming new
//! processes from /proc, looking for TLS code in what they run) is on the discovery
//! thread ([`crate::discovery`]): the loop sends it requests and takes its findings
//! as they come. The agent is ready (`/readyz`) once the TLS code of the processes
//! running at start-up is probed.

use std::{sync::Arc, time::Duration};

use agent_common::{NextMessage, framing};
use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind};
use tracing::{error, info, warn};

use crate::{
    config::RunArgs,
    discovery::{Discovery, Found, Request, Roots},
    events::decode,
    export,
    pipeline::{MessageStart, MessageStartHook, Pipeline, PipelineOptions, monotonic_ns},
    probes::{
        NextMessageMap, ProbeOptions, Probes, inject::Injector, select::KernelSelection,
        tls::TlsTarget,
    },
    selection::{ProcessRules, read_facts},
    settings::Settings,
    telemetry::Metrics,
};

/// How often the ring buffer is drained when the kernel did not wake us: programs wake
/// the reader only past `WAKEUP_BYTES`, to save wake-ups under load.
const DRAIN_INTERVAL: Duration = Duration::from_millis(50);
const WAKEUP_BYTES: u64 = 1024 * 1024;
/// How often processes with connections are looked at again for TLS libraries they
/// loaded since (Python loads libssl on `import ssl`).
const TLS_RESCAN_INTERVAL: Duration = Duration::from_secs(2);

pub async fn run(args: RunArgs) -> Result<()> {
    // The config file first: a broken one stops the agent before anything is attached.
    let settings = Settings::load_optional(args.config.as_deref())?;
    let process_rules = Arc::new(ProcessRules::new(
        &settings.selection,
        settings.identity.clone(),
    ));
    let selection = kernel_selection(&args, &settings, &process_rules)?;
    let mut sampling = settings.sampling.clone();
    if let Some(ratio) = args.sample_ratio {
        sampling.ratio = ratio;
    }
    if !sampling.keeps_all() {
        info!(
            ratio = sampling.ratio,
            slow = ?sampling.slow,
            limit = ?sampling.limit,
            "sampling by order: orders with an error or a stall are kept whatever the ratio"
        );
    }
    let inject_cgroups = selection.cgroups.clone();
    // Every traceparent the kernel writes carries the ratio's decision for its trace id.
    let inject_sample_below = crate::sampling::threshold(sampling.ratio);
    let metrics = Arc::new(Metrics::default());
    let output = args.out.resolve()?;

    if let Some(addr) = args.admin_addr {
        let listener = crate::admin::bind(addr)
            .await
            .with_context(|| format!("cannot serve the admin endpoint on {addr} (--admin-addr)"))?;
        let m = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::admin::serve_on(listener, m).await {
                warn!(error = %e, "admin endpoint stopped");
            }
        });
        info!(%addr, "admin endpoint: /healthz /readyz /metrics");
    }

    let (exporter, export_task) = export::spawn(output, metrics.clone())?;

    let opts = ProbeOptions {
        backend: args.probe_backend,
        payload_cap: args.payload_cap,
        ring_buffer_bytes: args.ring_buffer_bytes(),
        wakeup_bytes: WAKEUP_BYTES,
        selection,
        follow_goroutines: args.follow_goroutines,
    };
    let (mut probes, ring) = Probes::load(&opts)?;
    let mut injector = args
        .inject_traceparent
        .then(|| start_injector(&inject_cgroups, inject_sample_below, &metrics))
        .flatten();
    let roots = Roots {
        rules: process_rules.clone(),
        ..Roots::default()
    };
    let mut discovery =
        Discovery::spawn(roots, metrics.clone()).context("cannot start the discovery thread")?;
    let mut discovering = true;
    let mut tls_refused = false;

    let sink_exporter = exporter.clone();
    let pipeline_opts = PipelineOptions {
        max_connections: args.max_connections,
        identify_off_thread: true,
        capture_cap: u64::from(args.payload_cap),
        stall_timeout: (!args.stall_timeout.is_zero()).then_some(args.stall_timeout),
        business: Arc::new(
            crate::business::Rules::new(settings.business)
                .with_redaction(crate::business::Redactor::new(&settings.redaction)),
        ),
        processes: process_rules.clone(),
        sampling,
        ..Default::default()
    };
    let observed = metrics.clone();
    let exported: crate::pipeline::Sink = Box::new(move |span| {
        observed.business.observe(&span);
        sink_exporter.export(span)
    });
    // Pod metadata before the RED metrics see the span: service.name may change.
    let exported = match crate::kubernetes::start(&settings.kubernetes, metrics.clone()) {
        Some(enricher) => enricher.sink(exported),
        None => exported,
    };
    let sink = crate::selection::drop_ports(process_rules.ports.clone(), exported);
    let mut pipeline = Pipeline::new(pipeline_opts, metrics.clone(), sink);
    match probes.take_next_message_map() {
        Ok(map) => pipeline.set_message_start_hook(announce_message_starts(map)),
        Err(e) => {
            warn!(error = %e, "message starts cannot be told to the kernel: a message that starts past the copied bytes of a read is missed (counted in sonde_message_starts_missed_total)")
        }
    }

    // SAFETY: the descriptor is the ring buffer map's, owned by `ring` itself, so it
    // stays open and the same for as long as the AsyncFd holds it.
    let mut ring = unsafe { AsyncFd::register(ring) }
        .map_err(|e| anyhow::anyhow!("cannot poll the ring buffer: {}", e.into_parts().1))?;
    let mut sigint = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut tick = tokio::time::interval(DRAIN_INTERVAL);
    let mut last_rescan = std::time::Instant::now();
    let mut last_program_times = std::time::Instant::now();
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                let more = drain(guard.get_inner_mut(), &mut injector, &mut pipeline, &metrics);
                // New programs: their names and their TLS code, before they get far.
                ask_about_new_processes(&mut pipeline, &discovery);
                if more {
                    // More is waiting: let the exporter run before reading on.
                    drop(guard);
                    tokio::task::yield_now().await;
                } else {
                    guard.clear_ready();
                }
            }
            found = discovery.next(), if discovering => match found {
                Some(Found::Identity(answer)) => pipeline.identified(answer),
                Some(Found::Tls(mut target)) => {
                    if !args.follow_goroutines {
                        target.symbols.goroutines = None;
                    }
                    attach_tls(&mut probes, target, &mut tls_refused)
                }
                Some(Found::Excluded(pid)) => probes.exclude(pid),
                Some(Found::StartupScanned) => {
                    metrics.ready.store(true, std::sync::atomic::Ordering::Relaxed);
                    info!(backend = %probes.backend, "sonde is tracing; Ctrl-C to stop");
                }
                None => {
                    // Only a panic ends the thread while the loop runs.
                    warn!("the discovery thread stopped: new processes are named by their exec events and their TLS code is not probed");
                    discovering = false;
                }
            },
            _ = tick.tick() => {
                while drain(ring.get_mut(), &mut injector, &mut pipeline, &metrics) {
                    tokio::task::yield_now().await;
                }
                pipeline.tick(monotonic_ns());
                ask_about_new_processes(&mut pipeline, &discovery);
                if last_rescan.elapsed() >= TLS_RESCAN_INTERVAL {
                    last_rescan = std::time::Instant::now();
                    discovery.send(Request::Rescan(pipeline.active_processes()));
                }
                probes.publish(&metrics);
                publish_injector(injector.as_ref(), &metrics);
                if last_program_times.elapsed() >= PROGRAM_TIMES_INTERVAL {
                    last_program_times = std::time::Instant::now();
                    publish_program_times(&probes, injector.as_ref(), &metrics);
                }
            }
            _ = sigint.recv() => { info!("SIGINT: stopping"); break; }
            _ = sigterm.recv() => { info!("SIGTERM: stopping"); break; }
        }
    }

    metrics
        .ready
        .store(false, std::sync::atomic::Ordering::Relaxed);
    probes.publish(&metrics);
    publish_injector(injector.as_ref(), &metrics);
    publish_program_times(&probes, injector.as_ref(), &metrics);
    let mut ring = ring.into_inner();
    probes.detach();
    while drain(&mut ring, &mut injector, &mut pipeline, &metrics) {
        tokio::task::yield_now().await;
    }
    // Names already read are used; the spans still waiting for one leave without it.
    while let Some(found) = discovery.try_next() {
        if let Found::Identity(answer) = found {
            pipeline.identified(answer);
        }
    }
    drop(discovery);
    drop(injector);
    pipeline.finish();
    drop(pipeline);
    drop(exporter);
    export_task.shutdown(Duration::from_secs(10)).await;
    info!("stopped");
    Ok(())
}

/// What the kernel is to filter: the flags' and the file's command names and cgroups,
/// and the processes running now that either excludes.
fn kernel_selection(
    args: &RunArgs,
    settings: &Settings,
    rules: &ProcessRules,
) -> Result<KernelSelection> {
    let mut selection = KernelSelection {
        exclude_comms: args.exclude_comm.clone(),
        cgroups: args.cgroups.clone(),
        excluded_pids: Vec::new(),
        user_rules: !rules.exclude.is_empty(),
    };
    selection
        .exclude_comms
        .extend(settings.selection.exclude_comm.iter().cloned());
    selection
        .cgroups
        .extend(settings.selection.cgroups.iter().cloned());
    for path in &selection.cgroups {
        crate::probes::select::cgroup_id(path)?;
    }
    if selection.exclude_comms.is_empty() && !selection.user_rules {
        return Ok(selection);
    }
    let comms: Vec<[u8; 16]> = selection
        .exclude_comms
        .iter()
        .map(|c| crate::probes::select::comm_key(c))
        .collect();
    let proc_root = std::path::Path::new("/proc");
    let own = std::process::id();
    for entry in std::fs::read_dir(proc_root)
        .context("cannot list /proc")?
        .flatten()
    {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == own {
            continue;
        }
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        let by_comm = comms.contains(&crate::probes::select::comm_key(comm.trim_end()));
        let by_rule =
            selection.user_rules && read_facts(proc_root, pid).is_some_and(|f| rules.excludes(&f));
        if by_comm || by_rule {
            selection.excluded_pids.push(pid);
        }
    }
    info!(
        comms = selection.exclude_comms.len(),
        cgroups = selection.cgroups.len(),
        excluded_now = selection.excluded_pids.len(),
        "process selection"
    );
    Ok(selection)
}

fn ask_about_new_processes(pipeline: &mut Pipeline, discovery: &Discovery) {
    for query in pipeline.take_process_queries() {
        discovery.send(Request::Process(query));
    }
}

/// Writes each message start the pipeline finds into the kernel's NEXT_MESSAGE map, so
/// that the programs split the read that holds it there and copy a window from it. A
/// start is only ever moved forward: the programs may be ahead of user space.
fn announce_message_starts(mut map: NextMessageMap) -> MessageStartHook {
    Box::new(move |m: MessageStart| {
        let key = (u64::from(m.pid) << 32) | u64::from(m.fd);
        let mut next = map.get(&key, 0).unwrap_or_default();
        let slot = NextMessage::slot(m.direction, m.tls);
        if next.offset[slot] >= m.offset {
            // The programs found this start, or one past it, in the heads they copy
            // (HTTP) or the frames they follow (AMQP) before this one was told.
            return;
        }
        next.offset[slot] = m.offset;
        next.framing[slot] = if m.amqp_frames {
            framing::AMQP
        } else {
            framing::NONE
        };
        if let Err(e) = map.insert(key, next, 0) {
            tracing::debug!(pid = m.pid, fd = m.fd, error = %e, "message start not told to the kernel");
        }
    })
}

/// Attaches the TLS uprobes to `target`. Once the kernel has refused a uprobe for want
/// of CAP_SYS_ADMIN, TLS capture is off: said once, not tried again for every library.
fn attach_tls(probes: &mut Probes, target: TlsTarget, refused: &mut bool) {
    use crate::privileges::{Cap, Caps};
    if *refused {
        return;
    }
    match probes.attach_tls(&target) {
        Ok(()) => info!(
            path = %target.path.display(),
            goroutines = target.symbols.goroutines.is_some(),
            "TLS uprobes attached"
        ),
        Err(e)
            if !Caps::current().has(Cap::SysAdmin) && e.to_string().contains("perf_event_open") =>
        {
            *refused = true;
            error!(
                capability = "CAP_SYS_ADMIN",
                path = %target.path.display(),
                error = %e,
                "TLS capture is off: the kernel refused a uprobe and sonde lacks CAP_SYS_ADMIN, which this kernel requires for uprobes; HTTPS traffic stays encrypted to sonde (give the agent CAP_SYS_ADMIN to capture it)"
            );
        }
        Err(e) => {
            warn!(path = %target.path.display(), error = %e, "TLS uprobes not attached; this library's traffic stays encrypted to sonde")
        }
    }
}

/// Attaches traceparent injection; on failure says why once, and tracing goes on.
fn start_injector(
    cgroups: &[std::path::PathBuf],
    sample_below: u64,
    metrics: &Metrics,
) -> Option<Injector> {
    match Injector::start(cgroups, sample_below) {
        Ok(injector) => {
            metrics
                .inject_active
                .store(true, std::sync::atomic::Ordering::Relaxed);
            info!(cgroups = ?injector.cgroups, "traceparent injection attached (HTTP/1.x requests, AMQP 0-9-1 publishes)");
            Some(injector)
        }
        Err(e) => {
            // The whole chain: the kernel's own reason is the last link.
            let mut error = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                error.push_str(&format!(": {s}"));
                source = s.source();
            }
            warn!(%error, "traceparent injection is off; tracing goes on without it");
            None
        }
    }
}

/// How often the programs' run times are read (one system call per program).
const PROGRAM_TIMES_INTERVAL: Duration = Duration::from_secs(1);

fn publish_program_times(probes: &Probes, injector: Option<&Injector>, metrics: &Metrics) {
    let mut programs = probes.program_times();
    if let Some(injector) = injector {
        programs.extend(injector.program_times());
    }
    let stats_enabled = crate::probes::bpf_stats_enabled();
    let mut slot = metrics
        .bpf_programs
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    *slot = crate::telemetry::BpfPrograms {
        stats_enabled,
        programs,
    };
}

fn publish_injector(injector: Option<&Injector>, metrics: &Metrics) {
    if let Some(injector) = injector {
        for (slot, value) in metrics.inject_counts.iter().zip(injector.counts()) {
            slot.store(value, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Events handled before the loop gives the exporter a turn (one thread runs both).
const DRAIN_BUDGET: usize = 2048;

/// Handles up to [`DRAIN_BUDGET`] events; true when more are waiting. The injector's
/// reports go first, before each event: one is committed before the write that
/// carries its request returns, so it is visible by the time that write's event is.
fn drain(
    ring: &mut RingBuf<MapData>,
    injector: &mut Option<Injector>,
    pipeline: &mut Pipeline,
    metrics: &Metrics,
) -> bool {
    for _ in 0..DRAIN_BUDGET {
        if let Some(injector) = injector.as_mut() {
            let malformed = injector.drain(|event| pipeline.handle(event));
            Metrics::add(&metrics.events_malformed, malformed);
        }
        let Some(record) = ring.next() else {
            return false;
        };
        match decode(&record) {
            Ok(event) => pipeline.handle(event),
            Err(e) => {
                Metrics::inc(&metrics.events_malformed);
                tracing::debug!(error = %e, "malformed event dropped");
            }
        }
    }
    true
}
