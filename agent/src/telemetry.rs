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
    /// Events that arrived malformed and were dropped.
    pub events_malformed: AtomicU64,
    /// Spans built by the span builders.
    pub spans_built: AtomicU64,
    /// Spans an exporter delivered.
    pub spans_exported: AtomicU64,
    /// Spans dropped because the export queue was full.
    pub spans_dropped: AtomicU64,
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
    /// Spans held by the linkers for their other end (a gauge).
    pub spans_waiting: AtomicU64,
    /// True once every probe is attached.
    pub ready: AtomicBool,
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}
