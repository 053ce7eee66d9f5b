//! Drives `sonde replay`'s capture parsing with arbitrary bytes, three ways:
//!
//! 1. the input as one frame of each link type replay reads, through the link-layer,
//!    IP and TCP decoder: it must not panic, and a segment's captured payload is never
//!    longer than the length its headers give;
//! 2. the input as a whole capture file through replay (pcap or pcapng, as its first
//!    bytes say): it must not panic, and the summary must add up;
//! 3. the input as the packets of a well-formed pcap file (so that the fuzzer reaches
//!    TCP reassembly and the pipeline without first finding the file format): byte 0
//!    picks the link type, then each packet is `[len, ts_step, bytes...]`.
#![no_main]

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use libfuzzer_sys::fuzz_target;
use sonde::{
    replay::{
        Outcome,
        decode::{LINK_TYPES, ip_of, tcp_segment},
        replay_reader,
    },
    telemetry::Metrics,
};

fn replay(name: &str, file: &[u8]) -> Outcome {
    let spans = Arc::new(AtomicU64::new(0));
    let counted = spans.clone();
    let outcome = replay_reader(
        Path::new(name),
        file,
        Arc::new(Metrics::default()),
        Box::new(move |_span| {
            counted.fetch_add(1, Ordering::Relaxed);
        }),
    );
    let s = outcome.summary;
    assert!(s.skipped <= s.packets, "{s:?}");
    assert_eq!(s.spans, spans.load(Ordering::Relaxed), "{s:?}");
    outcome
}

/// A pcap file (microsecond timestamps, little-endian) of `link` frames cut from `rest`.
fn pcap_of(link: u32, mut rest: &[u8]) -> (Vec<u8>, u64) {
    let mut file = Vec::with_capacity(24 + rest.len() * 2);
    file.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    file.extend_from_slice(&2u16.to_le_bytes());
    file.extend_from_slice(&4u16.to_le_bytes());
    file.extend_from_slice(&0i32.to_le_bytes());
    file.extend_from_slice(&0u32.to_le_bytes());
    file.extend_from_slice(&65535u32.to_le_bytes());
    file.extend_from_slice(&link.to_le_bytes());
    let (mut packets, mut ts_us) = (0u64, 0u32);
    while let [len, ts_step, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (frame, after) = tail.split_at(n);
        // Steps up to ~6.5 s apart, so that reassembly's hole timeout is reached.
        ts_us = ts_us.wrapping_add(u32::from(*ts_step) * 25_600);
        file.extend_from_slice(&(ts_us / 1_000_000).to_le_bytes());
        file.extend_from_slice(&(ts_us % 1_000_000).to_le_bytes());
        file.extend_from_slice(&(n as u32).to_le_bytes());
        file.extend_from_slice(&(n as u32).to_le_bytes());
        file.extend_from_slice(frame);
        packets += 1;
        rest = after;
    }
    (file, packets)
}

fuzz_target!(|data: &[u8]| {
    for &link in LINK_TYPES {
        let Some(ip) = ip_of(link, data) else {
            continue;
        };
        assert!(ip.len() <= data.len());
        if let Some(seg) = tcp_segment(ip) {
            assert!(seg.payload.len() as u64 <= seg.len, "{link:?}: {seg:?}");
        }
    }

    replay("fuzz-input", data);

    if let [pick, rest @ ..] = data {
        let link = LINK_TYPES[usize::from(*pick) % LINK_TYPES.len()];
        let (file, packets) = pcap_of(u32::from(link), rest);
        let outcome = replay("fuzz-packets.pcap", &file);
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        assert_eq!(outcome.summary.packets, packets);
    }
});
