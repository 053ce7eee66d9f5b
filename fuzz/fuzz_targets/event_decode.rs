//! Arbitrary bytes as ring-buffer records, decoded with `sonde::events::decode` the way
//! the agent's drain loop does, and every decoded event fed to a `Pipeline`. Decoding
//! must reject what does not fit its layout (and say why), never panic, and never hand
//! out a payload other than the one the record says it carries; the pipeline must not
//! panic on any sequence of events and, once finished, must have handed every span it
//! built to its sink, each on a process that sent events.
//!
//! Input: a sequence of records, each `[len_lo, len_hi, bytes...]` (a little-endian
//! `u16` length, then that many bytes, or fewer at the end of the input).
//!
//! Two fields of a decoded header are narrowed before the pipeline sees the event, so
//! that the run never depends on the host: the process id is mapped to one of four
//! above Linux's PID_MAX_LIMIT (2^22), which no process can have, so the process
//! registry finds nothing of this machine's in /proc; and the time to 2^40 ns (18
//! minutes), as a CLOCK_MONOTONIC reading near 2^64 cannot happen. The descriptor is
//! narrowed to four values so that events meet on the same connections.
#![no_main]

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
};

use agent_common::{DataEvent, EventHeader, EventKind};
use libfuzzer_sys::fuzz_target;
use sonde::{
    events::{DecodeError, Event, decode},
    pipeline::{Pipeline, PipelineOptions},
    spans::Span,
    telemetry::Metrics,
};

/// Linux's PID_MAX_LIMIT on 64-bit: pids are below it.
const NO_SUCH_PID: u32 = 1 << 22;

/// Checks what `decode` said about `record`, and returns its event, narrowed.
fn decoded(record: &[u8]) -> Option<Event<'_>> {
    let event = match decode(record) {
        Ok(event) => event,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            if record.len() < size_of::<EventHeader>() {
                assert_eq!(e, DecodeError::Short(record.len()));
            }
            return None;
        }
    };
    let raw_kind = u32::from_ne_bytes(record[..4].try_into().unwrap());
    let kind = match &event {
        Event::Data { data, payload, .. } => {
            assert_eq!(payload.len(), data.captured as usize);
            assert!(u64::from(data.captured) <= data.len);
            let start = size_of::<DataEvent>();
            assert_eq!(*payload, &record[start..start + payload.len()]);
            EventKind::Data
        }
        Event::Connect { .. } => EventKind::Connect,
        Event::Accept { .. } => EventKind::Accept,
        Event::Close { .. } => EventKind::Close,
        Event::OwnConnect { .. } => EventKind::OwnConnect,
        Event::OwnClose { .. } => EventKind::OwnClose,
        Event::Exec { env, .. } => {
            assert!(env.iter().all(|v| v.starts_with("OTEL_")));
            EventKind::Exec
        }
        Event::Exit { .. } => EventKind::Exit,
        Event::Inject { .. } => EventKind::Inject,
    };
    assert_eq!(raw_kind, kind as u32);
    Some(narrowed(event))
}

fn narrowed(mut event: Event<'_>) -> Event<'_> {
    let header = match &mut event {
        Event::Data { header, data, .. } => {
            data.header.tgid = NO_SUCH_PID + data.header.tgid % 4;
            data.header.fd %= 4;
            data.header.ts_ns %= 1 << 40;
            header
        }
        Event::Connect { header, .. }
        | Event::Accept { header, .. }
        | Event::Close { header, .. }
        | Event::OwnConnect { header, .. }
        | Event::OwnClose { header, .. }
        | Event::Exec { header, .. }
        | Event::Exit { header, .. }
        | Event::Inject { header, .. } => header,
    };
    header.tgid = NO_SUCH_PID + header.tgid % 4;
    header.fd %= 4;
    header.ts_ns %= 1 << 40;
    event
}

fuzz_target!(|data: &[u8]| {
    let metrics = Arc::new(Metrics::default());
    let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
    let into = Arc::clone(&spans);
    let opts = PipelineOptions {
        // The agent's own sockets are this fuzzer's: nothing to exclude.
        exclude_own_sockets: false,
        ..PipelineOptions::default()
    };
    let mut pipeline = Pipeline::new(
        opts,
        Arc::clone(&metrics),
        Box::new(move |span| into.lock().unwrap().push(span)),
    );
    pipeline.set_mono_to_unix(0);
    let mut handled = 0u64;
    let mut pids = HashSet::new();
    let mut now = 0;
    let mut rest = data;
    while !rest.is_empty() {
        let (len, tail) = match rest {
            [lo, hi, tail @ ..] => (usize::from(u16::from_le_bytes([*lo, *hi])), tail),
            _ => (rest.len(), &[][..]),
        };
        let (record, tail) = tail.split_at(len.min(tail.len()));
        rest = tail;
        if let Some(event) = decoded(record) {
            let header = *event.header();
            pids.insert(header.tgid);
            now = now.max(header.ts_ns);
            pipeline.handle(event);
            handled += 1;
            pipeline.tick(now);
        }
    }
    pipeline.finish();
    let events_seen = metrics
        .events_seen
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(events_seen, handled);
    let spans = spans.lock().unwrap();
    let built = metrics
        .spans_built
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        spans.len() as u64,
        built,
        "spans built but never handed to the sink"
    );
    for span in spans.iter() {
        assert!(
            pids.contains(&span.resource.pid),
            "span on a process that sent no event: {span:?}"
        );
        assert_ne!(span.span_id, [0; 8]);
        assert_ne!(span.trace_id, [0; 16]);
    }
});
