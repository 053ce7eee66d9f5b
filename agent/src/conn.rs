//! Connections: what is known about each (process, descriptor) socket. [`table`] keeps
//! them; [`ConnInfo`] is what the span builders get, [`Role`] which end the traced
//! process is, and [`EndReason`] why a connection left the table.

pub mod table;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use agent_common::{AF_INET, SockTuple};

/// Which end of the TCP connection the traced process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// It connect()ed: it sends requests.
    Client,
    /// It accept()ed: it serves requests.
    Server,
}

/// Addresses of one connection, from the traced process's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnInfo {
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

impl ConnInfo {
    pub fn from_tuple(t: &SockTuple) -> Self {
        let addr = |bytes: &[u8; 16]| -> IpAddr {
            if t.family == AF_INET {
                IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
            } else {
                let v6 = Ipv6Addr::from(*bytes);
                match v6.to_ipv4_mapped() {
                    Some(v4) => IpAddr::V4(v4),
                    None => IpAddr::V6(v6),
                }
            }
        };
        ConnInfo {
            local: SocketAddr::new(addr(&t.saddr), t.sport),
            remote: SocketAddr::new(addr(&t.daddr), t.dport),
        }
    }
}

/// Why a connection left the connection table. What was still open on it is finished
/// then, and an exchange cut short says why (`sonde.incomplete.reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EndReason {
    /// A close we saw, or a new connection on the same descriptor.
    ConnectionClosed,
    /// The process exited.
    ProcessExit,
    /// The table was full and this connection was among the least recently active.
    Evicted,
    /// No traffic for the idle timeout.
    Idle,
    /// A replayed capture ended.
    CaptureEnd,
    /// The agent stopped.
    AgentStop,
    /// HTTP/2: the stream was reset (RST_STREAM) before it ended; the connection goes on.
    StreamReset,
}

impl EndReason {
    /// The value of `sonde.incomplete.reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::ConnectionClosed => "connection_closed",
            EndReason::ProcessExit => "process_exit",
            EndReason::Evicted => "evicted",
            EndReason::Idle => "idle",
            EndReason::CaptureEnd => "capture_end",
            EndReason::AgentStop => "agent_stop",
            EndReason::StreamReset => "stream_reset",
        }
    }

    /// Whether the socket really closed, so that a body delimited by the close ended.
    pub fn socket_closed(self) -> bool {
        matches!(self, EndReason::ConnectionClosed | EndReason::ProcessExit)
    }
}
