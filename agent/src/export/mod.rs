//! Exporters: finished [`Span`]s out of the agent, to stdout, to an OTLP JSON file, or
//! over OTLP (gRPC or HTTP/protobuf) to a collector or Jaeger.
//!
//! The pipeline hands spans to an [`ExporterHandle`], which never blocks: each span is
//! put in the form its sink takes (a text line for stdout, its protobuf bytes for
//! OTLP, the decoded OTLP message for the JSON file) and goes into the export
//! [`queue`], bounded by its encoded size, by age and, when `OTEL_BSP_MAX_QUEUE_SIZE`
//! asks, by count. One task drains the queue in batches (up
//! to `max_export_batch_size` spans, or whatever arrived within `scheduled_delay`).
//! Over OTLP a batch is one `ExportTraceServiceRequest` put together from the encoded
//! spans (see [`otlp`]), sent and,
//! while the receiver is down, overloaded or unreachable, retried with capped
//! exponential backoff (see [`deliver`]) until it is delivered or its spans are too
//! old. Every span is counted exactly once: `spans_exported`, or `spans_dropped` with
//! its reason (queue full, expired, rejected by the receiver, write failed, or still
//! queued when shutdown ran out of time).
//!
//! With a tee file ([`Output::tee`]) every span is also written there as OTLP JSON
//! lines, through a second queue and task of its own with its own counters
//! ([`Metrics::tee`]): a copy of what went to the collector, for a script to read.

pub mod config;
mod deliver;
pub mod otlp;
mod queue;
pub mod stdout;
#[cfg(test)]
mod tests;
pub mod tls;
mod transport;
pub(crate) use tls::root_store;

use std::fs::File;
use std::future::Future;
use std::io::{self, Write};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry_proto::tonic::trace::v1::Span as ProtoSpan;
use prost::Message;
use tokio::task::JoinHandle;
use tracing::warn;

pub use config::{
    BatchConfig, OtlpConfig, OtlpOptions, Protocol, QueueConfig, RetryConfig, endpoint_configured,
};

use crate::spans::{Resource, Span};
use crate::telemetry::{DropReason, Metrics};
use queue::{Entry, Outcome, Queue};
use transport::Transport;

/// Where spans go, and how much may wait on the way.
#[derive(Clone, Debug)]
pub struct Output {
    pub destination: Destination,
    pub queue: QueueConfig,
    /// Also write every span to this file, as for [`Destination::OtlpJson`].
    pub tee: Option<PathBuf>,
}

/// Where spans go.
#[derive(Clone, Debug)]
pub enum Destination {
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
    #[error(
        "mutual TLS needs a client certificate and its key, and {0} is missing: set both \
         --otlp-client-cert and --otlp-client-key (or OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE \
         and OTEL_EXPORTER_OTLP_CLIENT_KEY)"
    )]
    ClientAuthHalf(&'static str),
    #[error(
        "{setting} is set for OTLP export, but the endpoint {endpoint} is not https: use an \
         https:// endpoint for TLS"
    )]
    TlsWithoutHttps {
        endpoint: String,
        setting: &'static str,
    },
    #[error(
        "cannot use the client certificate {} and key {}: {reason}",
        cert.display(),
        key.display()
    )]
    ClientCert {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("the exporter must be started from inside a tokio runtime")]
    NoRuntime,
}

/// Where the pipeline hands spans over. Cheap to clone.
#[derive(Clone)]
pub struct ExporterHandle {
    intake: Arc<dyn Intake>,
}

impl ExporterHandle {
    /// Queues `span` for export, or drops and counts it if the queue is full or the
    /// exporter has shut down. Never blocks.
    pub fn export(&self, span: Span) {
        self.intake.offer(span, false);
    }

    /// Queues `span`, waiting while the queue is full rather than dropping it: for a
    /// producer that can wait (a replay reads a capture faster than spans are sent).
    /// Blocks the calling thread, so call it only from a thread of its own. Room comes
    /// as spans are delivered, refused, or expire; a span larger than the whole queue,
    /// or one offered after shutdown, is dropped and counted at once.
    pub fn export_waiting(&self, span: Span) {
        self.intake.offer(span, true);
    }
}

/// The running export task; [`Exporter::shutdown`] flushes and stops it. Dropped
/// without a shutdown, it closes the queue and lets the task finish on its own.
pub struct Exporter {
    tasks: Vec<JoinHandle<()>>,
    intake: Arc<dyn Intake>,
}

impl Exporter {
    /// Stops taking spans, exports what is queued (retrying as usual), and returns
    /// when done or when `deadline` has passed; spans still queued or being sent then
    /// are counted as dropped (`shutdown`).
    pub async fn shutdown(mut self, deadline: Duration) {
        self.intake.close();
        let tasks = &mut self.tasks;
        let all = async move {
            for task in tasks.iter_mut() {
                let _ = task.await;
            }
        };
        if tokio::time::timeout(deadline, all).await.is_err() {
            for task in &self.tasks {
                task.abort();
            }
            let lost = self.intake.abandon();
            warn!(
                lost,
                ?deadline,
                "export did not finish before the shutdown deadline; spans dropped"
            );
        }
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        self.intake.close();
    }
}

/// Waits between retries: `tokio::time::sleep`, or a recorder in tests.
type Pause = Arc<dyn Fn(Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Starts the export task for `output`. Must be called inside a tokio runtime.
pub fn spawn(
    output: Output,
    metrics: Arc<Metrics>,
) -> Result<(ExporterHandle, Exporter), ExportError> {
    spawn_pausing_with(
        output,
        metrics,
        Arc::new(|wait| Box::pin(tokio::time::sleep(wait))),
    )
}

fn spawn_pausing_with(
    output: Output,
    metrics: Arc<Metrics>,
    pause: Pause,
) -> Result<(ExporterHandle, Exporter), ExportError> {
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| ExportError::NoRuntime)?;
    let immediate = BatchConfig::default().max_export_batch_size;
    let limits = output.queue;
    // The copy's queue is opened first: a tee file that cannot be opened stops the
    // agent before anything else starts.
    let tee = match output.tee {
        Some(path) => {
            let own = Arc::new(Metrics::default());
            let _ = metrics.tee.set(Arc::clone(&own));
            Some(json_file(&runtime, path, limits.clone(), immediate, own)?)
        }
        None => None,
    };
    let (intake, task): (Arc<dyn Intake>, _) = match output.destination {
        Destination::Stdout => {
            let queue = Arc::new(Queue::<Line>::new(limits, immediate, metrics));
            let task = runtime.spawn(write_lines(Arc::clone(&queue)));
            (queue, task)
        }
        Destination::OtlpJson { path } => json_file(&runtime, path, limits, immediate, metrics)?,
        Destination::Otlp(config) => {
            let transport = Transport::new(&config)?;
            let max_age = limits.max_age;
            let queue = Arc::new(Queue::<EncodedSpan>::new(
                limits,
                config.batch.max_export_batch_size,
                Arc::clone(&metrics),
            ));
            let task = runtime.spawn(deliver::run(deliver::Delivery {
                queue: Arc::clone(&queue),
                transport,
                retry: config.retry,
                delay: config.batch.scheduled_delay,
                max_age,
                metrics,
                pause,
            }));
            (queue, task)
        }
    };
    let mut tasks = vec![task];
    let intake = match tee {
        Some((copy, copy_task)) => {
            tasks.push(copy_task);
            Arc::new(Tee { main: intake, copy }) as Arc<dyn Intake>
        }
        None => intake,
    };
    Ok((
        ExporterHandle {
            intake: Arc::clone(&intake),
        },
        Exporter { tasks, intake },
    ))
}

/// An OTLP JSON lines file and the task that writes its queue.
fn json_file(
    runtime: &tokio::runtime::Handle,
    path: PathBuf,
    limits: QueueConfig,
    immediate: usize,
    metrics: Arc<Metrics>,
) -> Result<(Arc<dyn Intake>, JoinHandle<()>), ExportError> {
    let file = File::options()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|error| ExportError::OpenFile { path, error })?;
    let queue = Arc::new(Queue::<OtlpItem>::new(limits, immediate, metrics));
    let task = runtime.spawn(write_json(Arc::clone(&queue), Arc::new(file)));
    Ok((queue, task))
}

/// Every span to the main output and a copy to the tee file, each with its own queue.
struct Tee {
    main: Arc<dyn Intake>,
    copy: Arc<dyn Intake>,
}

impl Intake for Tee {
    fn offer(&self, span: Span, wait: bool) {
        self.copy.offer(span.clone(), wait);
        self.main.offer(span, wait);
    }

    fn close(&self) {
        self.main.close();
        self.copy.close();
    }

    fn abandon(&self) -> u64 {
        self.main.abandon() + self.copy.abandon()
    }
}

/// The queue as the handle sees it, whatever form its sink sends spans in.
trait Intake: Send + Sync {
    fn offer(&self, span: Span, wait: bool);
    fn close(&self);
    fn abandon(&self) -> u64;
}

/// A span in the form a sink sends it, and that form's size in bytes.
trait Item: Sized + Send + 'static {
    fn prepare(span: Span) -> (Self, usize);
}

impl<T: Item> Intake for Queue<T> {
    fn offer(&self, span: Span, wait: bool) {
        let (item, size) = T::prepare(span);
        if wait {
            self.offer_waiting(item, size);
        } else {
            Queue::offer(self, item, size);
        }
    }

    fn close(&self) {
        Queue::close(self);
    }

    fn abandon(&self) -> u64 {
        Queue::abandon(self)
    }
}

/// A span as its stdout line, newline included.
struct Line(String);

impl Item for Line {
    fn prepare(span: Span) -> (Self, usize) {
        let mut line = stdout::format_line(&span);
        line.push('\n');
        let size = line.len();
        (Line(line), size)
    }
}

/// A span in its OTLP form, for the JSON file; the size is its protobuf encoding's.
struct OtlpItem {
    resource: Arc<Resource>,
    span: ProtoSpan,
}

impl Item for OtlpItem {
    fn prepare(span: Span) -> (Self, usize) {
        let (resource, span) = otlp::to_proto(span);
        let size = span.encoded_len();
        (OtlpItem { resource, span }, size)
    }
}

/// A span as the protobuf bytes OTLP sends, for the OTLP exporter: held encoded, the
/// queue's memory is close to its byte bound (decoded, a span takes about 3 times its
/// encoded size), and a retried batch is sent again without encoding it again.
struct EncodedSpan {
    resource: Arc<Resource>,
    bytes: Vec<u8>,
}

impl Item for EncodedSpan {
    fn prepare(span: Span) -> (Self, usize) {
        let (resource, span) = otlp::to_proto(span);
        let bytes = span.encode_to_vec();
        let size = bytes.len();
        (EncodedSpan { resource, bytes }, size)
    }
}

fn totals<T>(batch: &[Entry<T>]) -> (usize, usize) {
    (batch.len(), batch.iter().map(|e| e.size).sum())
}

async fn write_lines(queue: Arc<Queue<Line>>) {
    while let Some(batch) = queue.next_batch(Duration::ZERO).await {
        let (spans, bytes) = totals(&batch);
        let written = tokio::task::spawn_blocking(move || {
            let mut out = io::stdout().lock();
            for entry in &batch {
                out.write_all(entry.item.0.as_bytes())?;
            }
            out.flush()
        })
        .await;
        queue.settle(write_outcome(&queue, spans, written), spans, bytes);
    }
}

async fn write_json(queue: Arc<Queue<OtlpItem>>, file: Arc<File>) {
    while let Some(batch) = queue.next_batch(Duration::ZERO).await {
        let (spans, bytes) = totals(&batch);
        let file = Arc::clone(&file);
        let written = tokio::task::spawn_blocking(move || {
            let request =
                otlp::to_request(batch.into_iter().map(|e| (e.item.resource, e.item.span)));
            let mut line = serde_json::to_vec(&request).map_err(io::Error::from)?;
            line.push(b'\n');
            // One write per line, so concurrent readers never see half a line
            // followed by another.
            (&*file).write_all(&line)?;
            (&*file).flush()
        })
        .await;
        queue.settle(write_outcome(&queue, spans, written), spans, bytes);
    }
}

fn write_outcome<T>(
    queue: &Queue<T>,
    spans: usize,
    written: Result<io::Result<()>, tokio::task::JoinError>,
) -> Outcome {
    let error = match written {
        Ok(Ok(())) => return Outcome::Exported,
        Ok(Err(error)) => error.to_string(),
        Err(error) => format!("span writer stopped: {error}"),
    };
    Metrics::inc(&queue.metrics().export_failures);
    warn!(spans, %error, "writing spans failed; spans dropped");
    Outcome::Dropped(DropReason::WriteFailed)
}
