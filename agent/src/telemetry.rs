//! The agent's own health: counters every stage bumps, and the admin endpoint that
//! serves them (/healthz, /readyz, /metrics in Prometheus text format).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// Counters shared by all stages. Plain atomics: bumping one costs a few nanoseconds.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Ring buffer events decoded, of any kind.
    pub events_seen: AtomicU64,
    /// Payload bytes the syscalls moved on traced sockets (captured or not).
    pub bytes_seen: AtomicU64,
    /// Events the kernel side could not deliver (ring buffer full, failed reads),
    /// as last read from the programs' counters.
    pub events_lost: AtomicU64,
    /// The same, by cause (`agent_common::lost`).
    pub events_lost_by_cause: [AtomicU64; agent_common::lost::COUNT as usize],
    /// The programs' other counters (`agent_common::counter`), as last read.
    pub kernel_counters: [AtomicU64; agent_common::counter::COUNT as usize],
    /// Events that arrived malformed and were dropped.
    pub events_malformed: AtomicU64,
    /// Spans built by the span builders.
    pub spans_built: AtomicU64,
    /// Spans an exporter delivered.
    pub spans_exported: AtomicU64,
    /// Spans dropped before delivery, by reason.
    pub spans_dropped: SpansDropped,
    /// Failed export attempts (each retry counts).
    pub export_failures: AtomicU64,
    /// Of those, the ones whose TLS handshake failed, by cause
    /// ([`crate::export::tls::TlsFailure`]).
    pub export_tls_failures: [AtomicU64; crate::export::tls::TlsFailure::ALL.len()],
    /// Connections whose bytes could not be parsed by any protocol parser.
    pub parse_failures: AtomicU64,
    /// Connections in the connection table now (a gauge).
    pub connections_tracked: AtomicU64,
    /// Connections dropped from the table because it was full.
    pub connections_evicted: AtomicU64,
    /// Stream gaps: bytes that passed without being captured, in total.
    pub bytes_skipped: AtomicU64,
    /// Messages (or AMQP frames) that started inside bytes the kernel did not copy, so
    /// that the parser lost the stream and had to look for the next one.
    pub message_starts_missed: AtomicU64,
    /// Spans held by the linkers for their other end (a gauge).
    pub spans_waiting: AtomicU64,
    /// Requests to the discovery thread (name a process, look for TLS code) dropped
    /// because its queue was full.
    pub discovery_requests_dropped: AtomicU64,
    /// Spans that left before /proc named their process, with the name from its exec
    /// event (or its pid).
    pub spans_identity_unconfirmed: AtomicU64,
    /// Calls and programs left without a parent because several requests of their
    /// process were in flight and nothing told them apart.
    pub parent_ambiguous: AtomicU64,
    /// Exchanges whose parent was still undecided at the end of the decision window
    /// (or that had to be forgotten to bound memory): they started a trace of their own.
    pub parent_undecided: AtomicU64,
    /// Spans exported while their exchange hung past the stall timeout.
    pub spans_stalled: AtomicU64,
    /// Spans that left the wait for their trace's order id early because too many
    /// spans, or too many bytes of them, waited: an id found later is not on them.
    pub order_holds_cut: AtomicU64,
    /// Programs a traced service ran, made into spans.
    pub process_spans: AtomicU64,
    /// Attribute values (or parts of them) replaced because they held a secret or a
    /// card number.
    pub values_redacted: AtomicU64,
    /// The injector's outcomes (`agent_common::inject`), as last read from the kernel.
    pub inject_counts: [AtomicU64; agent_common::inject::COUNT as usize],
    /// Ids the kernel wrote into a request that no client span took.
    pub inject_unmatched: AtomicU64,
    /// Client spans with injected ids put under a local parent in another trace.
    pub inject_conflicts: AtomicU64,
    /// True while traceparent injection is attached.
    pub inject_active: AtomicBool,
    /// True once every probe is attached.
    pub ready: AtomicBool,
    /// The agent's eBPF programs' run time and run count, as last read from the kernel
    /// (it counts them only while `kernel.bpf_stats_enabled` is 1).
    pub bpf_programs: std::sync::Mutex<BpfPrograms>,
    /// Sampling decisions and the spans they dropped (`crate::sampling`).
    pub sampling: Sampling,
    /// Spans in the export queue or in a batch being sent (a gauge).
    pub export_queue_spans: AtomicU64,
    /// Their protobuf-encoded size in bytes, what the queue is bounded by (a gauge).
    pub export_queue_bytes: AtomicU64,
    /// The copy of every span written with `--tee-file`: its own queue's counters
    /// (`spans_exported`: written to the file; `spans_dropped`), so that the main
    /// output's counters still count each span once. Set when the copy is on.
    pub tee: OnceLock<Arc<Metrics>>,
    /// Request rate, errors and durations per service, route, destination and order
    /// stage, from the spans exported.
    pub business: crate::business_metrics::BusinessMetrics,
    /// Reads of the node's pods and spans that left without their pod's metadata
    /// (`crate::kubernetes`).
    pub kubernetes: crate::kubernetes::K8sMetrics,
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Why a span was dropped before delivery: the `reason` label of
/// `sonde_spans_dropped_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The export queue was at its byte (or span) bound when the span came.
    QueueFull,
    /// The span waited longer than the queue's age bound (the receiver was down).
    Expired,
    /// The receiver refused it for good (a permanent error, or partial success).
    Rejected,
    /// Writing it to stdout or the output file failed.
    WriteFailed,
    /// The agent stopped before it could be delivered.
    Shutdown,
}

impl DropReason {
    pub const ALL: [DropReason; 5] = [
        DropReason::QueueFull,
        DropReason::Expired,
        DropReason::Rejected,
        DropReason::WriteFailed,
        DropReason::Shutdown,
    ];

    pub fn label(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::Expired => "expired",
            DropReason::Rejected => "rejected",
            DropReason::WriteFailed => "write_failed",
            DropReason::Shutdown => "shutdown",
        }
    }
}

/// One counter per [`DropReason`].
#[derive(Debug, Default)]
pub struct SpansDropped([AtomicU64; DropReason::ALL.len()]);

impl SpansDropped {
    pub fn add(&self, reason: DropReason, n: u64) {
        self.0[reason as usize].fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self, reason: DropReason) -> u64 {
        self.0[reason as usize].load(Ordering::Relaxed)
    }

    /// Dropped for any reason.
    pub fn total(&self) -> u64 {
        DropReason::ALL.iter().map(|&r| self.get(r)).sum()
    }
}

/// What a sampling decision was about: an order (by its id), or a trace with no order id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecisionKind {
    Order,
    Trace,
}

impl DecisionKind {
    pub const ALL: [DecisionKind; 2] = [DecisionKind::Order, DecisionKind::Trace];

    pub fn label(self) -> &'static str {
        match self {
            DecisionKind::Order => "order",
            DecisionKind::Trace => "trace",
        }
    }
}

/// Why an order or trace was kept or dropped: the `reason` label of the sampling counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SampleWhy {
    /// Its id's hash fell under the ratio (kept) or not (dropped).
    Ratio,
    /// An incoming traceparent's sampled flag said so (traces with no order id).
    Parent,
    /// One of its spans is an error.
    Error,
    /// One of its spans is stalled.
    Stalled,
    /// Its end-to-end time went over the slow threshold.
    Slow,
    /// The ratio kept it but the spans-per-second limit was spent.
    Limit,
}

impl SampleWhy {
    pub const ALL: [SampleWhy; 6] = [
        SampleWhy::Ratio,
        SampleWhy::Parent,
        SampleWhy::Error,
        SampleWhy::Stalled,
        SampleWhy::Slow,
        SampleWhy::Limit,
    ];

    pub fn label(self) -> &'static str {
        match self {
            SampleWhy::Ratio => "ratio",
            SampleWhy::Parent => "parent",
            SampleWhy::Error => "error",
            SampleWhy::Stalled => "stalled",
            SampleWhy::Slow => "slow",
            SampleWhy::Limit => "limit",
        }
    }
}

const WHYS: usize = SampleWhy::ALL.len();

/// Sampling counters: decisions by kind and reason, and the spans dropped by them.
#[derive(Debug, Default)]
pub struct Sampling {
    kept: [[AtomicU64; WHYS]; 2],
    dropped: [[AtomicU64; WHYS]; 2],
    /// Kept for a reason that came after the hold had dropped some of its spans.
    kept_late: [[AtomicU64; WHYS]; 2],
    spans_dropped: AtomicU64,
    /// Holds ended early because too many spans waited.
    hold_full: AtomicU64,
}

impl Sampling {
    pub fn kept(&self, kind: DecisionKind, why: SampleWhy) {
        Metrics::inc(&self.kept[kind as usize][why as usize]);
    }

    pub fn dropped(&self, kind: DecisionKind, why: SampleWhy) {
        Metrics::inc(&self.dropped[kind as usize][why as usize]);
    }

    pub fn kept_late(&self, kind: DecisionKind, why: SampleWhy) {
        Metrics::inc(&self.kept_late[kind as usize][why as usize]);
    }

    pub fn spans_dropped(&self, n: u64) {
        Metrics::add(&self.spans_dropped, n);
    }

    pub fn hold_full(&self) {
        Metrics::inc(&self.hold_full);
    }

    /// (kept, dropped, kept late) for one kind and reason.
    pub fn get(&self, kind: DecisionKind, why: SampleWhy) -> (u64, u64, u64) {
        let (k, w) = (kind as usize, why as usize);
        (
            self.kept[k][w].load(Ordering::Relaxed),
            self.dropped[k][w].load(Ordering::Relaxed),
            self.kept_late[k][w].load(Ordering::Relaxed),
        )
    }

    pub fn spans_dropped_total(&self) -> u64 {
        self.spans_dropped.load(Ordering::Relaxed)
    }

    pub fn hold_full_total(&self) -> u64 {
        self.hold_full.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_drop_reason_has_its_own_counter() {
        for (i, reason) in DropReason::ALL.into_iter().enumerate() {
            assert_eq!(reason as usize, i, "ALL must list the reasons in order");
        }
        let dropped = SpansDropped::default();
        for (n, reason) in (1..).zip(DropReason::ALL) {
            dropped.add(reason, n);
        }
        for (n, reason) in (1..).zip(DropReason::ALL) {
            assert_eq!(dropped.get(reason), n, "{}", reason.label());
        }
        assert_eq!(dropped.total(), 15);
    }
}

/// What the kernel says of the agent's eBPF programs.
#[derive(Debug, Default, Clone)]
pub struct BpfPrograms {
    /// `kernel.bpf_stats_enabled` when last read (None: not readable).
    pub stats_enabled: Option<bool>,
    pub programs: Vec<ProgramTime>,
}

/// One program's totals since it was loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramTime {
    pub name: String,
    pub run_ns: u64,
    pub runs: u64,
}
