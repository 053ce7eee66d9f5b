//! Drives the HTTP parser with arbitrary operations on both directions: feeds, skips,
//! resyncs, then a close. It must not panic, must never emit an exchange once it has
//! said the connection is not HTTP, and what it emits must be consistent.
//!
//! Input: a sequence of `[op, len, payload...]`. Bit 0 of `op` is the direction; bits
//! 1-2 choose feed (0, 1), skip of `len * 97` bytes (2) or resync (3). Feeds take the next
//! `len` bytes as payload.
#![no_main]

use agent_common::Direction;
use libfuzzer_sys::fuzz_target;
use sonde::protocols::http::{HttpExchange, HttpParser, MAX_BODY_CAPTURE};

fn check(p: &HttpParser, exchanges: &[HttpExchange]) {
    if !exchanges.is_empty() {
        assert_eq!(p.is_http(), Some(true));
        assert_eq!(Some(exchanges[0].role), p.role());
    }
    for ex in exchanges {
        assert!(ex.request_start_ns <= ex.request_end_ns);
        assert!(ex.request_body.len() <= MAX_BODY_CAPTURE);
        assert!(ex.request_body.len() as u64 <= ex.request_body_size);
        if ex.response.is_some() {
            assert!(ex.request_start_ns <= ex.response_start_ns);
            assert!(ex.response_start_ns <= ex.response_end_ns);
            assert!(ex.response_body.len() <= MAX_BODY_CAPTURE);
            assert!(ex.response_body.len() as u64 <= ex.response_body_size);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut p = HttpParser::new();
    let mut rest = data;
    let mut ts = 0;
    let mut said_not_http = false;
    while let [op, len, tail @ ..] = rest {
        ts += 1;
        let dir = if op & 1 == 0 {
            Direction::Ingress
        } else {
            Direction::Egress
        };
        rest = tail;
        match (op >> 1) & 3 {
            0 | 1 => {
                let n = usize::from(*len).min(tail.len());
                p.feed(dir, &tail[..n], ts);
                rest = &tail[n..];
            }
            2 => p.skip(dir, u64::from(*len) * 97, ts),
            _ => p.resync(dir),
        }
        let exchanges = p.take_exchanges();
        assert!(!(said_not_http && !exchanges.is_empty()));
        check(&p, &exchanges);
        said_not_http |= p.is_http() == Some(false);
    }
    p.close(ts + 1);
    let exchanges = p.take_exchanges();
    assert!(!(said_not_http && !exchanges.is_empty()));
    check(&p, &exchanges);
});
