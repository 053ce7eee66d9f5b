//! `sonde run`: load the probes, drain the ring buffer into the pipeline, export, and
//! shut down cleanly on SIGINT/SIGTERM.

use std::{sync::Arc, time::Duration};

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, signal::unix::SignalKind};
use tracing::{info, warn};

use crate::{
    config::RunArgs,
    events::decode,
    export,
    pipeline::{Pipeline, PipelineOptions, monotonic_ns},
    probes::{ProbeOptions, Probes},
    telemetry::Metrics,
    tls::{TlsDiscovery, TlsTarget},
};

/// How often the ring buffer is drained when the kernel did not wake us: programs wake
/// the reader only past `WAKEUP_BYTES`, to save wake-ups under load.
const DRAIN_INTERVAL: Duration = Duration::from_millis(50);
const WAKEUP_BYTES: u64 = 1024 * 1024;
/// How often processes with connections are looked at again for TLS libraries they
/// loaded since (Python loads libssl on `import ssl`).
const TLS_RESCAN_INTERVAL: Duration = Duration::from_secs(2);

pub async fn run(args: RunArgs) -> Result<()> {
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
    };
    let (mut probes, ring) = Probes::load(&opts)?;
    let mut tls = TlsDiscovery::default();
    let mut targets = tls.scan_library_dirs();
    targets.extend(tls.scan_all_processes());
    attach_tls(&mut probes, targets);
    metrics
        .ready
        .store(true, std::sync::atomic::Ordering::Relaxed);
    info!(backend = %probes.backend, "sonde is tracing; Ctrl-C to stop");

    let sink_exporter = exporter.clone();
    let pipeline_opts = PipelineOptions {
        max_connections: args.max_connections,
        ..Default::default()
    };
    let mut pipeline = Pipeline::new(
        pipeline_opts,
        metrics.clone(),
        Box::new(move |span| sink_exporter.export(span)),
    );

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
                // A new program may carry TLS code: probe it before it gets far.
                attach_tls(&mut probes, new_process_targets(&mut pipeline, &mut tls));
                if more {
                    // More is waiting: let the exporter run before reading on.
                    drop(guard);
                    tokio::task::yield_now().await;
                } else {
                    guard.clear_ready();
                }
            }
            _ = tick.tick() => {
                while drain(ring.get_mut(), &mut pipeline, &metrics) {
                    tokio::task::yield_now().await;
                }
                pipeline.tick(monotonic_ns());
                let mut targets = new_process_targets(&mut pipeline, &mut tls);
                if last_rescan.elapsed() >= TLS_RESCAN_INTERVAL {
                    last_rescan = std::time::Instant::now();
                    targets.extend(pipeline.active_processes().into_iter().flat_map(|pid| tls.scan_process(pid)));
                }
                attach_tls(&mut probes, targets);
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
    pipeline.finish();
    drop(pipeline);
    drop(exporter);
    export_task.shutdown(Duration::from_secs(10)).await;
    info!("stopped");
    Ok(())
}

fn new_process_targets(pipeline: &mut Pipeline, tls: &mut TlsDiscovery) -> Vec<TlsTarget> {
    pipeline
        .take_new_processes()
        .into_iter()
        .flat_map(|pid| tls.scan_process(pid))
        .collect()
}

fn attach_tls(probes: &mut Probes, targets: Vec<TlsTarget>) {
    for target in targets {
        match probes.attach_tls(&target) {
            Ok(()) => info!(path = %target.path.display(), "TLS uprobes attached"),
            Err(e) => {
                warn!(path = %target.path.display(), error = %e, "TLS uprobes not attached; this library's traffic stays encrypted to sonde")
            }
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
