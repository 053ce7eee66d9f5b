//! Synthetic kernel events for one traced server's keep-alive HTTP exchanges, shared by
//! the benchmarks (`benches/hot_paths.rs`) and the memory test (`tests/memory.rs`),
//! which include this file by path.
#![allow(dead_code)]

use agent_common::{AF_INET, DataEvent, Direction, EventHeader, EventKind, SockTuple, SyscallId};
use sonde::{events::Event, pipeline::Pipeline};

pub const PID: u32 = 4242;

pub const REQUEST: &[u8] = b"GET /orders/ord-20261202-0042 HTTP/1.1\r\nHost: crm.internal:8080\r\n\
User-Agent: shop/2.3 (python-requests)\r\nAccept: application/json\r\n\
traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\r\n";

pub const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nServer: nginx/1.26.3\r\n\
Content-Type: application/json\r\nContent-Length: 58\r\nConnection: keep-alive\r\n\r\n\
{\"order_id\":\"ord-20261202-0042\",\"status\":\"printing\",\"n\":3}";

pub fn tuple(sport: u16) -> SockTuple {
    let mut t = SockTuple {
        family: AF_INET,
        sport: 8080,
        dport: sport,
        ..SockTuple::default()
    };
    t.saddr[..4].copy_from_slice(&[10, 0, 0, 2]);
    t.daddr[..4].copy_from_slice(&[10, 0, 0, 3]);
    t
}

pub fn header(kind: EventKind, fd: u32, ts_ns: u64) -> EventHeader {
    EventHeader {
        kind: kind as u32,
        tgid: PID,
        tid: PID,
        fd,
        ts_ns,
    }
}

/// A server's read or write of `payload` at stream `offset`.
pub fn data(p: &mut Pipeline, fd: u32, dir: Direction, offset: u64, payload: &[u8], ts_ns: u64) {
    let h = header(EventKind::Data, fd, ts_ns);
    p.handle(Event::Data {
        header: h,
        data: DataEvent {
            header: h,
            tuple: tuple(40000 + fd as u16),
            offset,
            len: payload.len() as u64,
            captured: payload.len() as u32,
            direction: dir as u32,
            syscall: match dir {
                Direction::Ingress => SyscallId::Read,
                Direction::Egress => SyscallId::Write,
            } as u32,
            role: agent_common::role::SERVER,
        },
        payload,
    });
}
