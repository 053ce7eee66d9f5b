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
use tracing::{info, warn};

use crate::{
    config::RunArgs,
    discovery::{Discovery, Found, Request, Roots},
    events::decode,
    export,
    pipeline::{MessageStart, MessageStartHook, Pipeline, PipelineOptions, monotonic_ns},
    probes::{NextMessageMap, ProbeOptions, Probes, select::KernelSelection, tls::TlsTarget},
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
    };
    let (mut probes, ring) = Probes::load(&opts)?;
    let roots = Roots {
        rules: process_rules.clone(),
        ..Roots::default()
    };
    let mut discovery =
        Discovery::spawn(roots, metrics.clone()).context("cannot start the discovery thread")?;
    let mut discovering = true;

    let sink_exporter = exporter.clone();
    let pipeline_opts = PipelineOptions {
        max_connections: args.max_connections,
        identify_off_thread: true,
        capture_cap: u64::from(args.payload_cap),
        stall_timeout: (!args.stall_timeout.is_zero()).then_some(args.stall_timeout),
        business: Arc::new(crate::business::Rules::new(settings.business)),
        processes: process_rules.clone(),
        ..Default::default()
    };
    let sink = crate::selection::drop_ports(
        process_rules.ports.clone(),
        Box::new(move |span| sink_exporter.export(span)),
    );
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
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                let more = drain(guard.get_inner_mut(), &mut pipeline, &metrics);
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
                Some(Found::Tls(target)) => attach_tls(&mut probes, target),
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
                while drain(ring.get_mut(), &mut pipeline, &metrics) {
                    tokio::task::yield_now().await;
                }
                pipeline.tick(monotonic_ns());
                ask_about_new_processes(&mut pipeline, &discovery);
                if last_rescan.elapsed() >= TLS_RESCAN_INTERVAL {
                    last_rescan = std::time::Instant::now();
                    discovery.send(Request::Rescan(pipeline.active_processes()));
                }
                probes.publish(&metrics);
            }
            _ = sigint.recv() => { info!("SIGINT: stopping"); break; }
            _ = sigterm.recv() => { info!("SIGTERM: stopping"); break; }
        }
    }

    metrics
        .ready
        .store(false, std::sync::atomic::Ordering::Relaxed);
    probes.publish(&metrics);
    let mut ring = ring.into_inner();
    probes.detach();
    while drain(&mut ring, &mut pipeline, &metrics) {
        tokio::task::yield_now().await;
    }
    // Names already read are used; the spans still waiting for one leave without it.
    while let Some(found) = discovery.try_next() {
        if let Found::Identity(answer) = found {
            pipeline.identified(answer);
        }
    }
    drop(discovery);
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
/// that the programs split the read that holds it there and copy a window from it.
fn announce_message_starts(mut map: NextMessageMap) -> MessageStartHook {
    Box::new(move |m: MessageStart| {
        let key = (u64::from(m.pid) << 32) | u64::from(m.fd);
        let mut next = map.get(&key, 0).unwrap_or_default();
        let slot = NextMessage::slot(m.direction, m.tls);
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

fn attach_tls(probes: &mut Probes, target: TlsTarget) {
    match probes.attach_tls(&target) {
        Ok(()) => info!(path = %target.path.display(), "TLS uprobes attached"),
        Err(e) => {
            warn!(path = %target.path.display(), error = %e, "TLS uprobes not attached; this library's traffic stays encrypted to sonde")
        }
    }
}

/// Events handled before the loop gives the exporter a turn (one thread runs both).
const DRAIN_BUDGET: usize = 2048;

/// Handles up to [`DRAIN_BUDGET`] events; true when more are waiting.
fn drain(ring: &mut RingBuf<MapData>, pipeline: &mut Pipeline, metrics: &Metrics) -> bool {
    for _ in 0..DRAIN_BUDGET {
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
