//! What the pipeline holds in memory under a steady load: keep-alive HTTP exchanges at
//! 10,000 a second for 15 s (longer than every wait and keep of the trace graph and the
//! order-id hold), counted by an allocator that tracks the bytes in use.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use agent_common::{Direction, EventKind};
use sonde::{
    events::Event,
    pipeline::{Pipeline, PipelineOptions, Sink},
    settings::Settings,
    telemetry::Metrics,
};

/// The system allocator, counting the bytes in use and their peak.
struct Counting;

static IN_USE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    let now = IN_USE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        IN_USE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            IN_USE.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

mod support;
use support::keepalive::{REQUEST, RESPONSE, data, header, tuple};

const CONNS: u32 = 64;

#[test]
fn the_pipeline_holds_a_bounded_memory_per_request_under_a_steady_load() {
    const PER_SECOND: u64 = 10_000;
    const SECONDS: u64 = 15;
    let settings = Settings::default();
    let spans_out = Arc::new(AtomicU64::new(0));
    let counted = spans_out.clone();
    let sink: Sink = Box::new(move |span| {
        drop(span);
        counted.fetch_add(1, Ordering::Relaxed);
    });
    let opts = PipelineOptions {
        exclude_own_sockets: false,
        business: Arc::new(
            sonde::business::Rules::new(settings.business)
                .with_redaction(sonde::business::Redactor::new(&settings.redaction)),
        ),
        ..PipelineOptions::default()
    };
    let before = IN_USE.load(Ordering::Relaxed);
    let mut p = Pipeline::new(opts, Arc::new(Metrics::default()), sink);
    p.set_mono_to_unix(1_800_000_000_000_000_000);
    let mut ts = 1_000_000_000u64;
    for fd in 0..CONNS {
        p.handle(Event::Accept {
            header: header(EventKind::Accept, 100 + fd, ts),
            tuple: tuple(40000 + (100 + fd) as u16),
        });
    }
    let mut offsets = vec![(0u64, 0u64); CONNS as usize];
    let step = 1_000_000_000 / PER_SECOND;
    PEAK.store(IN_USE.load(Ordering::Relaxed), Ordering::Relaxed);
    let allocations = ALLOCATIONS.load(Ordering::Relaxed);
    let n = PER_SECOND * SECONDS;
    for i in 0..n {
        let c = (i % u64::from(CONNS)) as usize;
        let fd = 100 + c as u32;
        let (inbound, outbound) = offsets[c];
        data(&mut p, fd, Direction::Ingress, inbound, REQUEST, ts);
        data(
            &mut p,
            fd,
            Direction::Egress,
            outbound,
            RESPONSE,
            ts + 15_000,
        );
        offsets[c] = (
            inbound + REQUEST.len() as u64,
            outbound + RESPONSE.len() as u64,
        );
        ts += step;
        // The live agent ticks every few milliseconds.
        if i % 50 == 0 {
            p.tick(ts);
        }
    }
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(before);
    let end = IN_USE.load(Ordering::Relaxed).saturating_sub(before);
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - allocations;
    p.tick(ts + 60_000_000_000);
    assert_eq!(
        spans_out.load(Ordering::Relaxed),
        n,
        "spans out, for exchanges in"
    );
    eprintln!(
        "{n} exchanges at {PER_SECOND}/s: heap in use at the end {:.1} MiB, peak {:.1} MiB ({} bytes per request a second); {:.1} allocations (or reallocations) per exchange",
        end as f64 / 1048576.0,
        peak as f64 / 1048576.0,
        peak as u64 / PER_SECOND,
        allocations as f64 / n as f64
    );
    // The spans of the last second wait for their order id (about 1.5 KB each); a
    // finished exchange's record in the trace graph is 33 bytes.
    assert!(
        peak < 32 << 20,
        "peak {peak} bytes in use for {PER_SECOND} requests a second"
    );
}
