//! The agent's own health: counters every stage bumps, and the admin endpoint that
//! serves them (/healthz, /readyz, /metrics in Prometheus text format).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

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
    /// Programs a traced service ran, made into spans.
    pub process_spans: AtomicU64,
    /// True once every probe is attached.
    pub ready: AtomicBool,
    /// Spans in the export queue or in a batch being sent (a gauge).
    pub export_queue_spans: AtomicU64,
    /// Their protobuf-encoded size in bytes, what the queue is bounded by (a gauge).
    pub export_queue_bytes: AtomicU64,
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
