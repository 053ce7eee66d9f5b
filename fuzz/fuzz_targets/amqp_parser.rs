//! Drives the AMQP 0-9-1 parser with arbitrary operations on both directions: feeds,
//! skips, resyncs, ticks, then a close, and builds spans from what it emits. It must not
//! panic, must never emit an operation once it has said the connection is not AMQP, and
//! what it emits must be consistent.
//!
//! Input: a first octet whose bit 0 starts the client direction with the protocol
//! header (so that later bytes are read in sync rather than scanned), then a sequence
//! of `[op, len, payload...]`. Bit 0 of `op` is the direction; bits 1-3 choose feed
//! (0-4), skip of `len * 61` bytes (5), resync (6) or a tick (7). Feeds take the next
//! `len` bytes as payload.
#![no_main]

use std::sync::Arc;

use agent_common::Direction;
use libfuzzer_sys::fuzz_target;
use sonde::{
    conn::ConnInfo,
    protocols::amqp::{AmqpOperation, AmqpParser, MAX_BODY_CAPTURE, Message},
    spans::{Resource, amqp::amqp_span},
};

fn check_message(m: &Message) {
    assert!(m.body.len() <= MAX_BODY_CAPTURE);
    assert!(m.body.len() as u64 <= m.body_size);
}

fn check(p: &AmqpParser, ops: &[AmqpOperation]) {
    if !ops.is_empty() {
        assert_eq!(p.is_amqp(), Some(true));
    }
    let conn = ConnInfo {
        local: "127.0.0.1:40000".parse().unwrap(),
        remote: "127.0.0.1:5672".parse().unwrap(),
    };
    let resource = Arc::new(Resource {
        service_name: "fuzz".into(),
        pid: 1,
        executable_name: "fuzz".into(),
        host_name: "fuzz".into(),
        attributes: vec![],
        generic_name: false,
    });
    for op in ops {
        match op {
            AmqpOperation::Publish(p) => {
                assert!(p.start_ns <= p.end_ns);
                check_message(&p.message);
            }
            AmqpOperation::Delivery(d) => {
                assert!(d.start_ns <= d.end_ns);
                check_message(&d.message);
            }
            _ => {}
        }
        let _ = op.to_string();
        let _ = amqp_span(op, &conn, resource.clone(), 0);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((first, mut rest)) = data.split_first() else {
        return;
    };
    let mut p = AmqpParser::new();
    let mut ts = 1;
    if first & 1 == 1 {
        p.feed(Direction::Egress, b"AMQP\x00\x00\x09\x01", ts);
    }
    let mut said_not_amqp = false;
    while let [op, len, tail @ ..] = rest {
        ts += 1;
        let dir = if op & 1 == 0 {
            Direction::Ingress
        } else {
            Direction::Egress
        };
        rest = tail;
        match (op >> 1) & 7 {
            0..=4 => {
                let n = usize::from(*len).min(tail.len());
                p.feed(dir, &tail[..n], ts);
                rest = &tail[n..];
            }
            5 => p.skip(dir, u64::from(*len) * 61, ts),
            6 => p.resync(dir),
            _ => p.tick(ts * 1_000_000_000),
        }
        let ops = p.take_operations();
        assert!(!(said_not_amqp && !ops.is_empty()));
        check(&p, &ops);
        said_not_amqp |= p.is_amqp() == Some(false);
    }
    p.close(ts * 1_000_000_000 + 1);
    let ops = p.take_operations();
    assert!(!(said_not_amqp && !ops.is_empty()));
    check(&p, &ops);
});
