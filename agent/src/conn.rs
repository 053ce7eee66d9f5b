//! Connection table: what is known about each (process, descriptor) socket.
//! (Filled in by the pipeline; see `ConnInfo` for what the span builders get.)

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
