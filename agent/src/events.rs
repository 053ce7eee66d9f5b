//! Decoding ring buffer records into typed events. A record that is too short or of an
//! unknown kind is rejected with a reason (and counted by the caller), never guessed at.

use agent_common::{
    ConnEvent, DataEvent, Direction, EventHeader, EventKind, InjectEvent, ProcEvent, SockTuple,
    role,
};
use thiserror::Error;

use crate::conn::Role;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes is shorter than an event header")]
    Short(usize),
    #[error("unknown event kind {0}")]
    UnknownKind(u32),
    #[error("{kind:?} record of {len} bytes is shorter than its {need}-byte layout")]
    Truncated {
        kind: EventKind,
        len: usize,
        need: usize,
    },
    #[error("data record says {captured} payload bytes but carries {carried}")]
    PayloadMismatch { captured: u32, carried: usize },
}

/// A decoded event, borrowing its payload from the ring buffer record.
#[derive(Debug)]
pub enum Event<'a> {
    Data {
        header: EventHeader,
        data: DataEvent,
        payload: &'a [u8],
    },
    Connect {
        header: EventHeader,
        tuple: SockTuple,
        ret: i32,
    },
    Accept {
        header: EventHeader,
        tuple: SockTuple,
    },
    Close {
        header: EventHeader,
        tuple: SockTuple,
    },
    /// The agent connected one of its own sockets (exports); `tuple` as the agent sees it.
    OwnConnect {
        header: EventHeader,
        tuple: SockTuple,
    },
    /// The agent closed one of its own sockets.
    OwnClose {
        header: EventHeader,
        tuple: SockTuple,
    },
    /// `comm` is the program's name; `args` its command line (a prefix); `env` the
    /// OTEL_* variables of its environment (from a prefix of it).
    Exec {
        header: EventHeader,
        comm: String,
        args: Vec<String>,
        env: Vec<String>,
        /// The process and thread that forked this one (0 when unknown).
        parent_tgid: u32,
        parent_tid: u32,
    },
    Exit {
        header: EventHeader,
        exit_code: i32,
    },
    /// The injector wrote a `traceparent` with these ids into request `seq` (HTTP) or
    /// basic.publish `seq` on `channel` (AMQP) of the connection `tuple` (as the
    /// writer sees it).
    Inject {
        header: EventHeader,
        tuple: SockTuple,
        seq: u64,
        /// An `agent_common::inject::PROTO_*` value.
        protocol: u32,
        channel: u32,
        trace_id: [u8; 16],
        span_id: [u8; 8],
    },
}

impl Event<'_> {
    pub fn header(&self) -> &EventHeader {
        match self {
            Event::Data { header, .. }
            | Event::Connect { header, .. }
            | Event::Accept { header, .. }
            | Event::Close { header, .. }
            | Event::OwnConnect { header, .. }
            | Event::OwnClose { header, .. }
            | Event::Exec { header, .. }
            | Event::Exit { header, .. }
            | Event::Inject { header, .. } => header,
        }
    }
}

fn read<T: Copy>(bytes: &[u8], kind: EventKind) -> Result<T, DecodeError> {
    let need = std::mem::size_of::<T>();
    if bytes.len() < need {
        return Err(DecodeError::Truncated {
            kind,
            len: bytes.len(),
            need,
        });
    }
    // SAFETY: the length is checked; T is a #[repr(C)] plain-data type from agent-common
    // for which every bit pattern is valid; read_unaligned copes with any alignment.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

pub fn decode(bytes: &[u8]) -> Result<Event<'_>, DecodeError> {
    if bytes.len() < std::mem::size_of::<EventHeader>() {
        return Err(DecodeError::Short(bytes.len()));
    }
    let raw_kind = u32::from_ne_bytes(bytes[..4].try_into().expect("4 bytes"));
    let kind = EventKind::from_u32(raw_kind).ok_or(DecodeError::UnknownKind(raw_kind))?;
    match kind {
        EventKind::Data => {
            let data: DataEvent = read(bytes, kind)?;
            let start = std::mem::size_of::<DataEvent>();
            let end = start + data.captured as usize;
            if data.captured as u64 > data.len || bytes.len() < end {
                return Err(DecodeError::PayloadMismatch {
                    captured: data.captured,
                    carried: bytes.len() - start,
                });
            }
            Ok(Event::Data {
                header: data.header,
                data,
                payload: &bytes[start..end],
            })
        }
        EventKind::Connect
        | EventKind::Accept
        | EventKind::Close
        | EventKind::OwnConnect
        | EventKind::OwnClose => {
            let c: ConnEvent = read(bytes, kind)?;
            Ok(match kind {
                EventKind::Connect => Event::Connect {
                    header: c.header,
                    tuple: c.tuple,
                    ret: c.ret,
                },
                EventKind::Accept => Event::Accept {
                    header: c.header,
                    tuple: c.tuple,
                },
                EventKind::OwnConnect => Event::OwnConnect {
                    header: c.header,
                    tuple: c.tuple,
                },
                EventKind::OwnClose => Event::OwnClose {
                    header: c.header,
                    tuple: c.tuple,
                },
                _ => Event::Close {
                    header: c.header,
                    tuple: c.tuple,
                },
            })
        }
        EventKind::Inject => {
            let i: InjectEvent = read(bytes, kind)?;
            Ok(Event::Inject {
                header: i.header,
                tuple: i.tuple,
                seq: i.seq,
                protocol: i.protocol,
                channel: i.channel,
                trace_id: i.trace_id,
                span_id: i.span_id,
            })
        }
        EventKind::Exec | EventKind::Exit => {
            let p: ProcEvent = read(bytes, kind)?;
            Ok(match kind {
                EventKind::Exec => {
                    let comm_len = p.comm.iter().position(|&c| c == 0).unwrap_or(p.comm.len());
                    let args_len = (p.args_len as usize).min(p.args.len());
                    let env_len = (p.env_len as usize).min(p.env.len());
                    Event::Exec {
                        header: p.header,
                        comm: String::from_utf8_lossy(&p.comm[..comm_len]).into_owned(),
                        args: nul_separated(&p.args[..args_len]),
                        env: nul_separated(&p.env[..env_len])
                            .into_iter()
                            .filter(|v| v.starts_with("OTEL_"))
                            .collect(),
                        parent_tgid: p.parent_tgid,
                        parent_tid: p.parent_tid,
                    }
                }
                _ => Event::Exit {
                    header: p.header,
                    exit_code: p.exit_code,
                },
            })
        }
    }
}

fn nul_separated(bytes: &[u8]) -> Vec<String> {
    bytes
        .split(|&c| c == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

pub fn direction(raw: u32) -> Direction {
    if raw == Direction::Egress as u32 {
        Direction::Egress
    } else {
        Direction::Ingress
    }
}

pub fn role_of(raw: u32) -> Option<Role> {
    match raw {
        role::CLIENT => Some(Role::Client),
        role::SERVER => Some(Role::Server),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of<T>(v: &T) -> Vec<u8> {
        let p = (v as *const T).cast::<u8>();
        // SAFETY: `p` points to a live `T` borrowed for this call, readable for its whole
        // size; the test types are #[repr(C)] with explicit padding, so every byte is
        // initialised.
        unsafe { std::slice::from_raw_parts(p, std::mem::size_of::<T>()) }.to_vec()
    }

    fn header(kind: EventKind) -> EventHeader {
        EventHeader {
            kind: kind as u32,
            tgid: 10,
            tid: 11,
            fd: 3,
            ts_ns: 99,
        }
    }

    #[test]
    fn data_event_with_payload() {
        let ev = DataEvent {
            header: header(EventKind::Data),
            tuple: SockTuple::default(),
            offset: 5,
            len: 100,
            captured: 4,
            direction: 1,
            syscall: 1,
            role: 0,
        };
        let mut b = bytes_of(&ev);
        b.extend_from_slice(b"GET ");
        match decode(&b).unwrap() {
            Event::Data { data, payload, .. } => {
                assert_eq!(payload, b"GET ");
                assert_eq!(data.len, 100);
                assert_eq!(data.offset, 5);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rejects_short_unknown_and_lying_records() {
        assert_eq!(decode(&[0; 3]).unwrap_err(), DecodeError::Short(3));
        let mut h = bytes_of(&header(EventKind::Data));
        h[0] = 77;
        assert_eq!(decode(&h).unwrap_err(), DecodeError::UnknownKind(77));
        let ev = DataEvent {
            header: header(EventKind::Data),
            tuple: SockTuple::default(),
            offset: 0,
            len: 10,
            captured: 8,
            direction: 0,
            syscall: 0,
            role: 0,
        };
        let b = bytes_of(&ev);
        assert!(matches!(
            decode(&b).unwrap_err(),
            DecodeError::PayloadMismatch { .. }
        ));
        let c = bytes_of(&header(EventKind::Connect));
        assert!(matches!(
            decode(&c).unwrap_err(),
            DecodeError::Truncated { .. }
        ));
    }

    #[test]
    fn the_agents_own_connects_and_closes_are_told_apart() {
        let mut tuple = SockTuple {
            family: 2,
            sport: 40000,
            dport: 4317,
            ..SockTuple::default()
        };
        tuple.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
        for kind in [
            EventKind::OwnConnect,
            EventKind::OwnClose,
            EventKind::Connect,
        ] {
            let ev = ConnEvent {
                header: header(kind),
                tuple,
                role: role::CLIENT,
                ret: 0,
            };
            let bytes = bytes_of(&ev);
            let decoded = decode(&bytes).unwrap();
            match (kind, decoded) {
                (EventKind::OwnConnect, Event::OwnConnect { tuple: t, .. })
                | (EventKind::OwnClose, Event::OwnClose { tuple: t, .. })
                | (EventKind::Connect, Event::Connect { tuple: t, .. }) => {
                    assert_eq!(t.sport, 40000, "{kind:?}")
                }
                (kind, other) => panic!("{kind:?} decoded as {other:?}"),
            }
        }
    }
}
