//! `sonde replay`: the user-space pipeline over a pcap or pcapng capture instead of the
//! kernel, so that a tcpdump becomes spans and parsers are tested on real traffic.
//!
//! Each TCP connection in the capture is fed to the [`Pipeline`] as the two traced
//! processes on one node would have been: the client end as one process, the server end
//! as another, each with its own descriptor for the connection. Bytes the client sends
//! are a write (egress) of the client process and a read (ingress) of the server
//! process, and the other way round. Processes are synthetic: a server process per
//! listening address (`service.name` "10.0.0.5:8080"), a client process per client IP
//! address (`service.name` "10.0.0.7"), with pids numbered from 1 in order of
//! appearance; `host.name` is the endpoint's IP address. The socket tuples carry the real
//! addresses, so `server.address`, `client.address` and the peer attributes are those
//! of the capture.
//!
//! Connect and accept events are made from the SYN and the SYN-ACK; a connection already
//! open when the capture started gets none, and the pipeline looks for a message
//! boundary as it does for connections older than the agent. Its client is the end
//! whose address was seen accepting connections earlier in the capture, else the end
//! with the higher port. A close of both ends follows a RST, or the FINs of both
//! directions, or, at the end of the capture, a FIN of either.
//!
//! TCP reassembly is written here by hand because the pipeline's stream cursor expects
//! whole reads with stream offsets, not segments with sequence numbers: per direction,
//! segments are put in sequence order (holding out-of-order ones, at most
//! [`MAX_HELD_BYTES`] and [`MAX_HELD_SEGMENTS`]), bytes already delivered are dropped
//! (retransmissions, overlaps), and sequence numbers wrap. A hole is given up on when
//! the receiver acknowledges bytes past it (the capture missed a segment the receiver
//! got), when it has been open for [`HOLE_TIMEOUT_NS`] of capture time, when the held
//! segments exceed their bound, or at the connection's end: the next bytes then go to
//! the pipeline with an offset past the hole, which the pipeline's cursor turns into a
//! gap its parsers skip by length. Packets cut short by the capture's snapshot length
//! are data events whose captured prefix is shorter than their length, in the same way.
//!
//! The stages, one module each: [`capture`] reads the pcap or pcapng file into frames,
//! [`decode`] finds the TCP segment in a frame (link layer, IPv4/IPv6, TCP), [`flow`]
//! puts each direction's segments back in order, and [`driver`] makes the synthetic
//! processes and turns segments into the events the pipeline takes.

mod capture;
pub mod decode;
mod driver;
mod flow;

use std::{
    io,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Result;
use thiserror::Error;
use tracing::warn;

pub use flow::{HOLE_TIMEOUT_NS, MAX_HELD_BYTES, MAX_HELD_SEGMENTS};

use crate::{
    config::ReplayArgs,
    export,
    pipeline::{Pipeline, PipelineOptions, Sink},
    selection::ProcessRules,
    settings::Settings,
    telemetry::Metrics,
};
use capture::Capture;
use driver::Replayer;

/// What stopped a replay before the end of its capture.
#[derive(Debug, Error)]
pub enum ReplayError {
    #[error("cannot open capture {}: {error}", path.display())]
    Open { path: PathBuf, error: io::Error },
    #[error(
        "{} is not a pcap or pcapng capture ({reason}); write one with tcpdump -w, tshark -w or dumpcap",
        path.display()
    )]
    NotACapture { path: PathBuf, reason: String },
    #[error(
        "{}: packet {packet} is cut short: the file ends inside it (the capture was still \
         being written or was copied partly, or the packet's length field is corrupt); \
         the packets before it were replayed",
        path.display()
    )]
    Truncated { path: PathBuf, packet: u64 },
    #[error(
        "{}: packet {packet} is corrupt ({reason}); the packets before it were replayed",
        path.display()
    )]
    Corrupt {
        path: PathBuf,
        packet: u64,
        reason: String,
    },
    #[error("{}: cannot read packet {packet}: {error}", path.display())]
    Read {
        path: PathBuf,
        packet: u64,
        error: io::Error,
    },
}

/// What a replay went through.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Packets read from the capture.
    pub packets: u64,
    /// Packets that were not TCP over IPv4 or IPv6 (or fragments, or of a link type
    /// sonde cannot read), skipped.
    pub skipped: u64,
    /// TCP connections that carried a SYN or payload.
    pub connections: u64,
    /// Spans the pipeline produced.
    pub spans: u64,
    /// Bytes of TCP payload the capture missed (holes skipped).
    pub bytes_missing: u64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} packets ({} not TCP, skipped), {} TCP connections, {} spans",
            self.packets, self.skipped, self.connections, self.spans
        )?;
        if self.bytes_missing > 0 {
            write!(f, ", {} bytes missing from the capture", self.bytes_missing)?;
        }
        Ok(())
    }
}

/// The end of a replay: what was done, and the error that stopped it early, if any.
/// The spans built before an error have gone to the sink all the same.
#[derive(Debug)]
pub struct Outcome {
    pub summary: Summary,
    pub error: Option<ReplayError>,
}

/// `sonde replay`: replays `args.file` and exports its spans like `sonde run` would.
pub async fn run(args: ReplayArgs) -> Result<()> {
    let settings = Settings::load_optional(args.config.as_deref())?;
    let rules = Rules::from_settings(&settings);
    let metrics = Arc::new(Metrics::default());
    let output = args.out.resolve()?;
    let (exporter, export_task) = export::spawn(output, metrics.clone())?;
    // A capture is read much faster than spans are sent, and unlike the live agent a
    // replay can wait for room in the export queue instead of dropping.
    let sink: Sink = Box::new(move |span| exporter.export_waiting(span));
    let path = args.file.clone();
    let pipeline_metrics = metrics.clone();
    let outcome = tokio::task::spawn_blocking(move || match std::fs::File::open(&path) {
        Ok(file) => replay_with(&path, file, pipeline_metrics, sink, rules),
        Err(error) => Outcome {
            summary: Summary::default(),
            error: Some(ReplayError::Open { path, error }),
        },
    })
    .await?;
    export_task.shutdown(Duration::from_secs(30)).await;
    eprintln!("sonde replay: {}: {}", args.file.display(), outcome.summary);
    let dropped = metrics.spans_dropped.total();
    if dropped > 0 {
        warn!(dropped, "some spans could not be exported");
    }
    match outcome.error {
        Some(error) => Err(error.into()),
        None => Ok(()),
    }
}

/// Replays the capture at `path` through a new pipeline whose spans go to `sink`.
pub fn replay_file(path: &Path, metrics: Arc<Metrics>, sink: Sink) -> Outcome {
    match std::fs::File::open(path) {
        Ok(file) => replay_reader(path, file, metrics, sink),
        Err(error) => Outcome {
            summary: Summary::default(),
            error: Some(ReplayError::Open {
                path: path.to_owned(),
                error,
            }),
        },
    }
}

/// Replays the capture read from `reader` (named `path` in errors) through a new
/// pipeline whose spans go to `sink`.
pub fn replay_reader(
    path: &Path,
    reader: impl io::Read,
    metrics: Arc<Metrics>,
    sink: Sink,
) -> Outcome {
    replay_with(path, reader, metrics, sink, Rules::default())
}

/// The config file's rules a replay applies.
#[derive(Clone, Default)]
pub struct Rules {
    pub business: Arc<crate::business::Rules>,
    pub processes: Arc<ProcessRules>,
    pub sampling: crate::sampling::SamplingConfig,
}

impl Rules {
    pub fn from_settings(settings: &Settings) -> Self {
        Rules {
            business: Arc::new(
                crate::business::Rules::new(settings.business.clone())
                    .with_redaction(crate::business::Redactor::new(&settings.redaction)),
            ),
            processes: Arc::new(ProcessRules::new(
                &settings.selection,
                settings.identity.clone(),
            )),
            sampling: settings.sampling.clone(),
        }
    }
}

/// As [`replay_reader`], with the config file's rules.
pub fn replay_with(
    path: &Path,
    reader: impl io::Read,
    metrics: Arc<Metrics>,
    sink: Sink,
    rules: Rules,
) -> Outcome {
    let sink = crate::selection::drop_ports(rules.processes.ports.clone(), sink);
    let spans = Arc::new(AtomicU64::new(0));
    let counted = spans.clone();
    let mut sink = sink;
    let counting: Sink = Box::new(move |span| {
        counted.fetch_add(1, Ordering::Relaxed);
        sink(span);
    });
    let mut pipeline = Pipeline::new(
        PipelineOptions {
            exclude_own_sockets: false,
            link_remote_peers: true,
            business: rules.business,
            processes: rules.processes,
            sampling: rules.sampling,
            ..PipelineOptions::default()
        },
        metrics,
        counting,
    );
    // Capture times are Unix times already.
    pipeline.set_mono_to_unix(0);
    let mut replayer = Replayer::new(pipeline);
    let error = match Capture::open(path, reader) {
        Ok(mut capture) => loop {
            match capture.next_frame() {
                Ok(Some(frame)) => replayer.frame(&frame),
                Ok(None) => break None,
                Err(failure) => {
                    break Some(failure.into_error(path, replayer.summary.packets + 1));
                }
            }
        },
        Err(error) => Some(error),
    };
    replayer.finish();
    let mut summary = replayer.summary;
    summary.spans = spans.load(Ordering::Relaxed);
    Outcome { summary, error }
}
