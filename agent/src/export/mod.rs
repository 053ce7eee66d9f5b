//! Exporters: finished [`Span`]s out of the agent, to stdout, to an OTLP JSON file, or
//! over OTLP (gRPC or HTTP/protobuf) to a collector or Jaeger.
//!
//! The pipeline hands spans to an [`ExporterHandle`], which never blocks: spans go
//! into a bounded queue, and when it is full they are dropped and counted in
//! `spans_dropped`. One task drains the queue in batches (up to
//! `max_export_batch_size` spans, or whatever arrived within `scheduled_delay`),
//! turns each batch into one `ExportTraceServiceRequest` (see [`otlp`]) and sends it,
//! retrying transient failures with backoff. Every span ends up counted exactly once:
//! `spans_exported`, or `spans_dropped` (queue full, refused by the receiver, out of
//! retries, or still queued when shutdown ran out of time).

pub mod config;
pub mod otlp;
pub mod stdout;
#[cfg(test)]
mod tests;
mod transport;

use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, warn};

pub use config::{
    BatchConfig, OtlpConfig, OtlpOptions, Protocol, RetryConfig, endpoint_configured,
};

use crate::spans::Span;
use crate::telemetry::Metrics;
use transport::{SendError, Transport};

/// Where spans go.
#[derive(Clone, Debug)]
pub enum Output {
    /// One readable line per span (see [`stdout::format_line`]).
    Stdout,
    /// The OTLP file exporter's format: one JSON `ExportTraceServiceRequest` per line,
    /// appended to `path`.
    OtlpJson { path: PathBuf },
    /// OTLP over gRPC or HTTP/protobuf.
    Otlp(OtlpConfig),
}

/// What the user must fix for export to start.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(
        "OTLP endpoint {endpoint:?} is not usable: {reason}; give a URL such as \
         http://localhost:4318 or https://jaeger.example.com:4317"
    )]
    InvalidEndpoint { endpoint: String, reason: String },
    #[error("unknown OTLP protocol {0:?}: use grpc or http/protobuf")]
    UnknownProtocol(String),
    #[error("OTLP protocol {0:?} is not supported: use grpc or http/protobuf")]
    UnsupportedProtocol(String),
    #[error(
        "OTLP header {entry:?} is invalid ({reason}): write headers as key=value,key2=value2, \
         percent-encoding commas, '=' and spaces inside values"
    )]
    InvalidHeader { entry: String, reason: String },
    #[error("{name}={value:?} is invalid: expected {expected}")]
    InvalidSetting {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error(
        "cannot open output file {}: {error}; check that its directory exists and is writable",
        path.display()
    )]
    OpenFile { path: PathBuf, error: io::Error },
    #[error("cannot use CA file {}: {reason}; give a PEM file of CA certificates", path.display())]
    CaFile { path: PathBuf, reason: String },
    #[error("cannot set up TLS for OTLP export: {0}")]
    Tls(String),
    #[error("the exporter must be started from inside a tokio runtime")]
    NoRuntime,
}

/// Where the pipeline hands spans over. Cheap to clone; never blocks.
#[derive(Clone)]
pub struct ExporterHandle {
    queue: mpsc::Sender<Span>,
    accounting: Arc<Accounting>,
}

impl ExporterHandle {
    /// Queues `span` for export, or drops and counts it if the queue is full or the
    /// exporter has shut down.
    pub fn export(&self, span: Span) {
        // Counted before sending so the worker never un-counts a span not yet counted.
        self.accounting.pending.fetch_add(1, Ordering::Relaxed);
        if self.queue.try_send(span).is_err() {
            self.accounting.dropped(1);
        }
    }
}

/// The running export task; [`Exporter::shutdown`] flushes and stops it.
pub struct Exporter {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
    accounting: Arc<Accounting>,
}

impl Exporter {
    /// Stops taking spans, exports what is queued, and returns when done or when
    /// `deadline` has passed; spans still queued then are counted as dropped.
    pub async fn shutdown(mut self, deadline: Duration) {
        // The task may have ended on its own; then there is nobody to tell.
        let _ = self.stop.send(());
        if tokio::time::timeout(deadline, &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
            let lost = self.accounting.pending.swap(0, Ordering::Relaxed);
            Metrics::add(&self.accounting.metrics.spans_dropped, lost);
            warn!(
                lost,
                ?deadline,
                "export did not finish before the shutdown deadline"
            );
        }
    }
}

/// Starts the export task for `output`. Must be called inside a tokio runtime.
pub fn spawn(
    output: Output,
    metrics: Arc<Metrics>,
) -> Result<(ExporterHandle, Exporter), ExportError> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| ExportError::NoRuntime)?;
    let immediate = BatchConfig {
        scheduled_delay: Duration::ZERO,
        ..BatchConfig::default()
    };
    let (sink, batch) = match output {
        Output::Stdout => (Sink::Stdout, immediate),
        Output::OtlpJson { path } => {
            let file = File::options()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|error| ExportError::OpenFile { path, error })?;
            (Sink::JsonLines(Arc::new(file)), immediate)
        }
        Output::Otlp(config) => {
            let transport = Transport::new(&config)?;
            (
                Sink::Otlp {
                    transport: Box::new(transport),
                    retry: config.retry,
                },
                config.batch,
            )
        }
    };
    let accounting = Arc::new(Accounting {
        metrics,
        pending: AtomicU64::new(0),
    });
    let (queue, rx) = mpsc::channel(batch.max_queue_size.max(1));
    let (stop, stopped) = oneshot::channel();
    let worker = Worker {
        rx,
        sink,
        batch,
        accounting: Arc::clone(&accounting),
    };
    let task = runtime.spawn(worker.run(stopped));
    Ok((
        ExporterHandle {
            queue,
            accounting: Arc::clone(&accounting),
        },
        Exporter {
            stop,
            task,
            accounting,
        },
    ))
}

/// The counters, and how many spans are queued or in a batch and not yet counted
/// either way (what a shutdown that runs out of time loses).
struct Accounting {
    metrics: Arc<Metrics>,
    pending: AtomicU64,
}

impl Accounting {
    fn exported(&self, n: u64) {
        self.pending.fetch_sub(n, Ordering::Relaxed);
        Metrics::add(&self.metrics.spans_exported, n);
    }

    fn dropped(&self, n: u64) {
        self.pending.fetch_sub(n, Ordering::Relaxed);
        Metrics::add(&self.metrics.spans_dropped, n);
    }
}

enum Sink {
    Stdout,
    JsonLines(Arc<File>),
    Otlp {
        // Boxed: it dwarfs the other sinks.
        transport: Box<Transport>,
        retry: RetryConfig,
    },
}

struct Worker {
    rx: mpsc::Receiver<Span>,
    sink: Sink,
    batch: BatchConfig,
    accounting: Arc<Accounting>,
}

impl Worker {
    async fn run(mut self, mut stop: oneshot::Receiver<()>) {
        let max = self.batch.max_export_batch_size.max(1);
        let mut batch: Vec<Span> = Vec::with_capacity(max);
        let mut due: Option<Instant> = None;
        loop {
            tokio::select! {
                biased;
                // A dropped Exporter stops the task too.
                _ = &mut stop => break,
                received = self.rx.recv() => {
                    let Some(span) = received else { break };
                    batch.push(span);
                    while batch.len() < max {
                        match self.rx.try_recv() {
                            Ok(span) => batch.push(span),
                            Err(_) => break,
                        }
                    }
                    if batch.len() >= max || self.batch.scheduled_delay.is_zero() {
                        self.flush(std::mem::take(&mut batch)).await;
                        due = None;
                    } else if due.is_none() {
                        due = Some(Instant::now() + self.batch.scheduled_delay);
                    }
                }
                _ = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() => {
                    self.flush(std::mem::take(&mut batch)).await;
                    due = None;
                }
            }
        }
        // From here on export() finds the queue closed and counts its spans dropped.
        self.rx.close();
        while let Some(span) = self.rx.recv().await {
            batch.push(span);
            if batch.len() >= max {
                self.flush(std::mem::take(&mut batch)).await;
            }
        }
        self.flush(batch).await;
    }

    async fn flush(&mut self, spans: Vec<Span>) {
        if spans.is_empty() {
            return;
        }
        let n = spans.len() as u64;
        let metrics = &self.accounting.metrics;
        match &mut self.sink {
            Sink::Stdout => {
                let written = tokio::task::spawn_blocking(move || {
                    let mut out = io::stdout().lock();
                    for span in &spans {
                        writeln!(out, "{}", stdout::format_line(span))?;
                    }
                    out.flush()
                })
                .await;
                self.account_write(n, written);
            }
            Sink::JsonLines(file) => {
                let file = Arc::clone(file);
                let written = tokio::task::spawn_blocking(move || {
                    let mut line =
                        serde_json::to_vec(&otlp::to_request(&spans)).map_err(io::Error::from)?;
                    line.push(b'\n');
                    // One write per line, so concurrent readers never see half a line
                    // followed by another.
                    (&*file).write_all(&line)?;
                    (&*file).flush()
                })
                .await;
                self.account_write(n, written);
            }
            Sink::Otlp { transport, retry } => {
                let request = otlp::to_request(&spans);
                drop(spans);
                match send_with_retry(transport, retry, &request, metrics).await {
                    Ok(delivered) => {
                        let rejected = delivered.rejected.min(n);
                        if rejected > 0 {
                            warn!(rejected, reason = %delivered.message, "OTLP receiver refused some spans");
                        }
                        self.accounting.dropped(rejected);
                        self.accounting.exported(n - rejected);
                    }
                    Err(error) => {
                        warn!(spans = n, %error, "OTLP export failed; spans dropped");
                        self.accounting.dropped(n);
                    }
                }
            }
        }
    }

    fn account_write(&self, n: u64, written: Result<io::Result<()>, tokio::task::JoinError>) {
        match written {
            Ok(Ok(())) => self.accounting.exported(n),
            Ok(Err(error)) => {
                Metrics::inc(&self.accounting.metrics.export_failures);
                warn!(spans = n, %error, "writing spans failed; spans dropped");
                self.accounting.dropped(n);
            }
            Err(error) => {
                Metrics::inc(&self.accounting.metrics.export_failures);
                warn!(spans = n, %error, "span writer stopped; spans dropped");
                self.accounting.dropped(n);
            }
        }
    }
}

/// Sends `request`, retrying transient failures with exponential backoff and full
/// jitter between half and all of the current step (or the receiver's Retry-After,
/// capped). Every failed attempt counts in `export_failures`.
async fn send_with_retry(
    transport: &mut Transport,
    retry: &RetryConfig,
    request: &opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
    metrics: &Metrics,
) -> Result<transport::Delivered, SendError> {
    let mut step = retry.initial_backoff;
    let mut attempt = 1;
    loop {
        let error = match transport.send(request).await {
            Ok(delivered) => return Ok(delivered),
            Err(error) => error,
        };
        Metrics::inc(&metrics.export_failures);
        let retry_after = match &error {
            SendError::Transient { retry_after, .. } if attempt < retry.max_attempts => {
                *retry_after
            }
            _ => return Err(error),
        };
        let wait = retry_after
            .unwrap_or_else(|| {
                let millis = step.as_millis() as u64;
                Duration::from_millis(rand::random_range(millis / 2..=millis))
            })
            .min(retry.max_backoff);
        debug!(attempt, ?wait, %error, "OTLP export failed; retrying");
        tokio::time::sleep(wait).await;
        step = (step * 2).min(retry.max_backoff);
        attempt += 1;
    }
}
