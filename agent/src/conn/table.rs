//! The connection table: one entry per traced socket, keyed by (pid, fd).
//!
//! It owns what every connection carries whatever its protocol: the addresses, the two
//! stream cursors, whether the plaintext now comes from a TLS library, whether the
//! agent saw the connection start, and when it was last active. What a stage after it
//! keeps per connection (the protocol parser, the service) is the type parameter `T`.
//!
//! Entries end for a [`EndReason`], and every removal hands the entry back as an
//! [`Ended`], so that the caller can finish what was open on it: a close we saw, a
//! descriptor reused without a close we saw (a new tuple on the same fd), the process
//! exiting (its entries are one range of the ordered map), the table being full (the
//! least recently active eighth goes), or a connection idle past the timeout.
//!
//! The table also answers whether a socket with given addresses is traced, which tells
//! a server whether the local client at the other end of its connection is.

use std::{collections::BTreeMap, net::SocketAddr};

use agent_common::{Direction, SockTuple};

use super::{ConnInfo, EndReason};
use crate::{FastMap, reassembly::StreamCursor};

/// One connection.
#[derive(Debug)]
pub struct Conn<T> {
    pub info: ConnInfo,
    pub tuple: SockTuple,
    pub ingress: StreamCursor,
    pub egress: StreamCursor,
    /// Monotonic ns of the event that made the entry.
    pub first_ns: u64,
    /// Monotonic ns of the latest event.
    pub last_ns: u64,
    /// Plaintext from a TLS library was seen: bytes on the wire are ciphertext and
    /// ignored; the parser reads the plaintext stream.
    pub tls: bool,
    /// The connect or accept was seen, so the first bytes are the start of the stream;
    /// otherwise the connection predates the agent (or was forgotten) and the parser
    /// must look for a message boundary first.
    pub from_start: bool,
    /// Whether any bytes were given to the parser yet.
    pub fed: bool,
    /// What the later stages keep for this connection.
    pub state: T,
}

/// What a data event means for the connection, given where its bytes came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataSource {
    /// Parse the bytes.
    Parse,
    /// The first plaintext from a TLS library: the handshake went by as ciphertext, so
    /// the cursors started over; the caller must start its parser over too.
    SwitchedToTls,
    /// Ciphertext of a connection whose plaintext comes from the TLS library: ignore.
    Ignore,
}

impl<T> Conn<T> {
    pub fn new(tuple: &SockTuple, ts_ns: u64, state: T) -> Self {
        Conn {
            info: ConnInfo::from_tuple(tuple),
            tuple: *tuple,
            ingress: StreamCursor::new(),
            egress: StreamCursor::new(),
            first_ns: ts_ns,
            last_ns: ts_ns,
            tls: false,
            from_start: false,
            fed: false,
            state,
        }
    }

    /// Accounts for a data event at `ts_ns`, read from a TLS library (`tls`) or from a
    /// socket syscall.
    pub fn data_event(&mut self, tls: bool, ts_ns: u64) -> DataSource {
        self.last_ns = self.last_ns.max(ts_ns);
        match (tls, self.tls) {
            (true, false) => {
                self.tls = true;
                self.ingress = StreamCursor::new();
                self.egress = StreamCursor::new();
                self.fed = false;
                DataSource::SwitchedToTls
            }
            (false, true) => DataSource::Ignore,
            _ => DataSource::Parse,
        }
    }

    pub fn cursor(&self, dir: Direction) -> &StreamCursor {
        match dir {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    pub fn cursor_mut(&mut self, dir: Direction) -> &mut StreamCursor {
        match dir {
            Direction::Ingress => &mut self.ingress,
            Direction::Egress => &mut self.egress,
        }
    }
}

/// A connection that left the table, and why.
#[derive(Debug)]
pub struct Ended<T> {
    pub pid: u32,
    pub fd: u32,
    pub conn: Conn<T>,
    pub reason: EndReason,
}

/// The table. See the module documentation.
#[derive(Debug)]
pub struct ConnTable<T> {
    /// By (pid, fd), ordered so that a process's connections are one range.
    conns: BTreeMap<(u32, u32), Conn<T>>,
    /// How many entries have each (local, remote) pair; entries that carry no
    /// addresses (an all-zero tuple) are not counted.
    by_addrs: FastMap<(SocketAddr, SocketAddr), u32>,
    max_connections: usize,
}

impl<T> ConnTable<T> {
    /// A table of at most `max_connections` entries (at least one).
    pub fn new(max_connections: usize) -> Self {
        ConnTable {
            conns: BTreeMap::new(),
            by_addrs: FastMap::default(),
            max_connections: max_connections.max(1),
        }
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    pub fn get_mut(&mut self, pid: u32, fd: u32) -> Option<&mut Conn<T>> {
        self.conns.get_mut(&(pid, fd))
    }

    /// Whether a traced socket has these local and remote addresses.
    pub fn has_addrs(&self, local: SocketAddr, remote: SocketAddr) -> bool {
        self.by_addrs.contains_key(&(local, remote))
    }

    /// The connection on (`pid`, `fd`) for an event about `tuple` at `ts_ns`. An entry
    /// with another tuple is ended first (the descriptor was reused without a close we
    /// saw; an all-zero tuple, which events that could not read the socket carry,
    /// matches any); a missing entry is made by `make` once the table has room. The
    /// entries that ended on the way are appended to `ended`.
    pub fn lookup(
        &mut self,
        pid: u32,
        fd: u32,
        tuple: &SockTuple,
        ts_ns: u64,
        ended: &mut Vec<Ended<T>>,
        make: impl FnOnce(&ConnInfo) -> T,
    ) -> &mut Conn<T> {
        let key = (pid, fd);
        if self
            .conns
            .get(&key)
            .is_some_and(|c| c.tuple != *tuple && *tuple != SockTuple::default())
        {
            ended.extend(self.remove(pid, fd, EndReason::ConnectionClosed));
        }
        if !self.conns.contains_key(&key) && self.conns.len() >= self.max_connections {
            self.evict_oldest(ended);
        }
        let by_addrs = &mut self.by_addrs;
        self.conns.entry(key).or_insert_with(|| {
            let info = ConnInfo::from_tuple(tuple);
            if *tuple != SockTuple::default() {
                *by_addrs.entry((info.local, info.remote)).or_default() += 1;
            }
            Conn::new(tuple, ts_ns, make(&info))
        })
    }

    /// Ends the connection on (`pid`, `fd`), if there is one.
    pub fn remove(&mut self, pid: u32, fd: u32, reason: EndReason) -> Option<Ended<T>> {
        let conn = self.conns.remove(&(pid, fd))?;
        self.uncount(&conn);
        Some(Ended {
            pid,
            fd,
            conn,
            reason,
        })
    }

    fn uncount(&mut self, conn: &Conn<T>) {
        if conn.tuple == SockTuple::default() {
            return;
        }
        let key = (conn.info.local, conn.info.remote);
        if let Some(n) = self.by_addrs.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.by_addrs.remove(&key);
            }
        }
    }

    /// Ends every connection of process `pid` (it exited), in descriptor order.
    pub fn remove_process(&mut self, pid: u32) -> Vec<Ended<T>> {
        let fds: Vec<u32> = self
            .conns
            .range((pid, 0)..=(pid, u32::MAX))
            .map(|((_, fd), _)| *fd)
            .collect();
        fds.into_iter()
            .filter_map(|fd| self.remove(pid, fd, EndReason::ProcessExit))
            .collect()
    }

    /// Ends the connections with no event for `idle_ns` before `now_ns`.
    pub fn remove_idle(&mut self, now_ns: u64, idle_ns: u64) -> Vec<Ended<T>> {
        let idle: Vec<(u32, u32)> = self
            .conns
            .iter()
            .filter(|(_, c)| now_ns.saturating_sub(c.last_ns) >= idle_ns)
            .map(|(k, _)| *k)
            .collect();
        idle.into_iter()
            .filter_map(|(pid, fd)| self.remove(pid, fd, EndReason::Idle))
            .collect()
    }

    /// Ends every connection (the agent stops, the capture ends).
    pub fn remove_all(&mut self, reason: EndReason) -> Vec<Ended<T>> {
        self.by_addrs.clear();
        std::mem::take(&mut self.conns)
            .into_iter()
            .map(|((pid, fd), conn)| Ended {
                pid,
                fd,
                conn,
                reason,
            })
            .collect()
    }

    /// Makes room: the least recently active eighth of the table goes (at least one).
    fn evict_oldest(&mut self, ended: &mut Vec<Ended<T>>) {
        let n = (self.conns.len() / 8).max(1);
        let mut by_age: Vec<((u32, u32), u64)> =
            self.conns.iter().map(|(k, c)| (*k, c.last_ns)).collect();
        by_age.sort_by_key(|(_, t)| *t);
        for ((pid, fd), _) in by_age.into_iter().take(n) {
            ended.extend(self.remove(pid, fd, EndReason::Evicted));
        }
    }

    /// Processes with connections now, each once, in pid order.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self.conns.keys().map(|(pid, _)| *pid).collect();
        pids.dedup();
        pids
    }

    /// Every connection, in (pid, fd) order.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = ((u32, u32), &mut Conn<T>)> {
        self.conns.iter_mut().map(|(k, c)| (*k, c))
    }
}

#[cfg(test)]
mod tests {
    use agent_common::AF_INET;

    use super::*;

    fn tuple(sport: u16, dport: u16) -> SockTuple {
        let mut t = SockTuple {
            family: AF_INET,
            sport,
            dport,
            ..SockTuple::default()
        };
        t.saddr[..4].copy_from_slice(&[10, 0, 0, 1]);
        t.daddr[..4].copy_from_slice(&[10, 0, 0, 2]);
        t
    }

    /// A table whose per-connection state is a name, so tests can tell entries apart.
    fn table(max: usize) -> ConnTable<&'static str> {
        ConnTable::new(max)
    }

    fn reasons(ended: &[Ended<&'static str>]) -> Vec<(u32, u32, &'static str, EndReason)> {
        ended
            .iter()
            .map(|e| (e.pid, e.fd, e.conn.state, e.reason))
            .collect()
    }

    #[test]
    fn the_same_tuple_on_the_same_descriptor_is_the_same_connection() {
        let mut t = table(8);
        let mut ended = Vec::new();
        t.lookup(1, 3, &tuple(4000, 80), 10, &mut ended, |_| "first");
        let c = t.lookup(1, 3, &tuple(4000, 80), 20, &mut ended, |_| "second");
        assert_eq!(c.state, "first");
        assert_eq!(c.info.remote.to_string(), "10.0.0.2:80");
        // An event that could not read its socket carries a zero tuple: same connection.
        let c = t.lookup(1, 3, &SockTuple::default(), 30, &mut ended, |_| "third");
        assert_eq!(c.state, "first");
        assert!(ended.is_empty());
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn the_addresses_of_traced_sockets_are_known_until_the_last_one_goes() {
        let mut t = table(8);
        let mut ended = Vec::new();
        let (local, remote) = (
            "10.0.0.1:4000".parse().unwrap(),
            "10.0.0.2:80".parse().unwrap(),
        );
        assert!(!t.has_addrs(local, remote));
        // The same addresses in two processes (a socket shared across a fork).
        t.lookup(1, 3, &tuple(4000, 80), 10, &mut ended, |_| "parent");
        t.lookup(2, 3, &tuple(4000, 80), 10, &mut ended, |_| "child");
        t.lookup(
            1,
            4,
            &SockTuple::default(),
            10,
            &mut ended,
            |_| "no addresses",
        );
        assert!(t.has_addrs(local, remote));
        assert!(!t.has_addrs(remote, local));
        assert!(!t.has_addrs("0.0.0.0:0".parse().unwrap(), "0.0.0.0:0".parse().unwrap()));
        t.remove(1, 3, EndReason::ConnectionClosed);
        assert!(t.has_addrs(local, remote));
        // A reused descriptor ends the child's entry.
        t.lookup(2, 3, &tuple(4001, 80), 20, &mut ended, |_| "new");
        assert!(!t.has_addrs(local, remote));
        t.remove_all(EndReason::ConnectionClosed);
        assert!(!t.has_addrs("10.0.0.1:4001".parse().unwrap(), remote));
    }

    #[test]
    fn a_reused_descriptor_ends_the_old_connection() {
        let mut t = table(8);
        let mut ended = Vec::new();
        t.lookup(1, 3, &tuple(4000, 80), 10, &mut ended, |_| "old");
        let c = t.lookup(1, 3, &tuple(4001, 5672), 20, &mut ended, |_| "new");
        assert_eq!(c.state, "new");
        assert_eq!(c.info.remote.port(), 5672);
        assert_eq!(
            reasons(&ended),
            [(1, 3, "old", EndReason::ConnectionClosed)]
        );
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_process_exit_ends_its_connections_and_no_others() {
        let mut t = table(8);
        let mut ended = Vec::new();
        for (pid, fd, name) in [(1, 3, "a"), (2, 3, "b"), (2, 9, "c"), (3, 4, "d")] {
            t.lookup(
                pid,
                fd,
                &tuple(4000 + fd as u16, 80),
                10,
                &mut ended,
                |_| name,
            );
        }
        assert_eq!(
            reasons(&t.remove_process(2)),
            [
                (2, 3, "b", EndReason::ProcessExit),
                (2, 9, "c", EndReason::ProcessExit)
            ]
        );
        assert_eq!(t.pids(), [1, 3]);
        assert!(t.remove_process(2).is_empty());
    }

    #[test]
    fn a_full_table_evicts_the_least_recently_active() {
        let mut t = table(3);
        let mut ended = Vec::new();
        t.lookup(1, 1, &tuple(1, 80), 30, &mut ended, |_| "busy");
        t.lookup(1, 2, &tuple(2, 80), 10, &mut ended, |_| "quiet");
        t.lookup(1, 3, &tuple(3, 80), 20, &mut ended, |_| "middle");
        // Activity counts, not insertion order.
        t.get_mut(1, 2).unwrap().data_event(false, 40);
        t.lookup(1, 4, &tuple(4, 80), 50, &mut ended, |_| "newcomer");
        assert_eq!(reasons(&ended), [(1, 3, "middle", EndReason::Evicted)]);
        assert_eq!(t.len(), 3);
        assert_eq!(t.pids(), [1]);
    }

    #[test]
    fn idle_connections_end_and_active_ones_stay() {
        let mut t = table(8);
        let mut ended = Vec::new();
        t.lookup(1, 1, &tuple(1, 80), 100, &mut ended, |_| "idle");
        t.lookup(1, 2, &tuple(2, 80), 900, &mut ended, |_| "active");
        assert_eq!(
            reasons(&t.remove_idle(1000, 500)),
            [(1, 1, "idle", EndReason::Idle)]
        );
        assert_eq!(t.len(), 1);
        assert_eq!(
            reasons(&t.remove_all(EndReason::AgentStop)),
            [(1, 2, "active", EndReason::AgentStop)]
        );
        assert!(t.is_empty());
    }

    #[test]
    fn the_first_tls_plaintext_restarts_the_streams_and_ciphertext_is_ignored_after() {
        let mut t = table(8);
        let mut ended = Vec::new();
        let c = t.lookup(1, 3, &tuple(4000, 443), 10, &mut ended, |_| "conn");
        assert_eq!(c.data_event(false, 10), DataSource::Parse);
        c.egress.advance(0, 517, b"\x16\x03\x01");
        c.fed = true;
        assert_eq!(c.data_event(true, 20), DataSource::SwitchedToTls);
        assert!(c.tls);
        assert!(!c.fed);
        assert_eq!(c.cursor(Direction::Egress).next_offset(), 0);
        assert_eq!(c.data_event(false, 30), DataSource::Ignore);
        assert_eq!(c.data_event(true, 40), DataSource::Parse);
        assert_eq!(c.last_ns, 40);
    }
}
