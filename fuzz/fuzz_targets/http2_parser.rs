//! Drives the HTTP/2 parser with arbitrary operations on both directions: feeds, skips,
//! resyncs, then a close. It must not panic, must never emit an exchange once it has
//! said the connection is not HTTP/2, and what it emits must be consistent and bounded.
//!
//! Input: the first byte chooses how the connection starts (bit 0: the client preface
//! is fed first on egress, so that the rest is read as frames; bit 1: both directions
//! are resynchronised first, as for a connection that predates the agent). Then a
//! sequence of `[op, len, payload...]`: bit 0 of `op` is the direction; bits 1-2 choose
//! feed (0, 1), skip of `len * 97` bytes (2) or resync (3). Feeds take the next `len`
//! bytes as payload.
#![no_main]

use agent_common::Direction;
use libfuzzer_sys::fuzz_target;
use sonde::conn::EndReason;
use sonde::protocols::{
    Parsed, ProtocolParser,
    http::{MAX_BODY_CAPTURE, MAX_KEPT_HEADERS},
    http2::{Http2Parser, PREFACE},
};

fn check(p: &mut Http2Parser, said_not_h2: bool) {
    let mut out = Vec::new();
    p.take(&mut out);
    assert!(!(said_not_h2 && !out.is_empty()));
    for item in out {
        let Parsed::Http(ex) = item else {
            continue;
        };
        assert_eq!(p.detect(), Some(true));
        assert_eq!(ex.request.version, 2);
        assert!(ex.request.headers.len() <= MAX_KEPT_HEADERS);
        assert!(ex.request_body.len() <= MAX_BODY_CAPTURE);
        assert!(ex.request_body.len() as u64 <= ex.request_body_size);
        assert!(ex.response_body.len() <= MAX_BODY_CAPTURE);
        assert!(ex.response_body.len() as u64 <= ex.response_body_size);
        assert!(ex.seq <= 0x7fff_ffff);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let mut p = Http2Parser::new();
    if mode & 2 != 0 {
        p.resync(Direction::Ingress);
        p.resync(Direction::Egress);
    } else if mode & 1 != 0 {
        p.feed(Direction::Egress, PREFACE, 0);
    }
    let mut ts = 0;
    let mut said_not_h2 = false;
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
        check(&mut p, said_not_h2);
        said_not_h2 |= p.detect() == Some(false);
    }
    p.close(ts + 1, EndReason::ConnectionClosed);
    check(&mut p, said_not_h2);
});
