//! The ids the kernel wrote into outgoing requests (`--inject-traceparent`), waiting
//! for the client exchange they belong to, so that its span gets exactly those ids:
//! the receiving agent makes its server span the child of that span id, in that
//! trace.
//!
//! The injector numbers the requests of each connection from 0 as it sees them, as
//! the HTTP parser numbers its exchanges; the two are joined on (connection, number).
//! On an AMQP connection it numbers the basic.publish frames the client sends, as the
//! AMQP parser does ([`Publish::number`](crate::protocols::amqp::Publish)), and the
//! join checks the channel too (0 for HTTP).
//! The injector reports before the write that carries the request returns, so the
//! ids are here before the request's bytes reach the parser.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
};

use crate::spans::{SpanId, TraceId};

/// The ids of one injected request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Injected {
    pub trace_id: TraceId,
    pub span_id: SpanId,
}

struct Entry {
    seq: u64,
    channel: u32,
    ids: Injected,
    at_ns: u64,
}

/// See the module documentation. Bounded in entries and in time.
pub struct Injections {
    by_conn: HashMap<(SocketAddr, SocketAddr), VecDeque<Entry>>,
    /// (time, connection) of every entry, oldest first, to expire them.
    order: VecDeque<(u64, (SocketAddr, SocketAddr))>,
    len: usize,
    max: usize,
    keep_ns: u64,
    /// Ids no exchange took (expired, pushed out, or passed over).
    unmatched: u64,
}

impl Injections {
    pub fn new(max: usize, keep_ns: u64) -> Self {
        Injections {
            by_conn: HashMap::new(),
            order: VecDeque::new(),
            len: 0,
            max: max.max(1),
            keep_ns,
            unmatched: 0,
        }
    }

    /// The kernel wrote `ids` into request (or publish) `seq` of the connection (local,
    /// remote), on AMQP `channel` (0 for HTTP).
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &mut self,
        local: SocketAddr,
        remote: SocketAddr,
        seq: u64,
        channel: u32,
        ids: Injected,
        now_ns: u64,
    ) {
        while self.len >= self.max {
            if !self.drop_oldest() {
                break;
            }
        }
        self.by_conn
            .entry((local, remote))
            .or_default()
            .push_back(Entry {
                seq,
                channel,
                ids,
                at_ns: now_ns,
            });
        self.order.push_back((now_ns, (local, remote)));
        self.len += 1;
    }

    /// The ids written into request (or publish) `seq` on `channel` of the connection,
    /// if the kernel wrote any. An entry of that number on another channel is not taken
    /// (the numbering went astray): it is counted as unmatched.
    pub fn take(
        &mut self,
        local: SocketAddr,
        remote: SocketAddr,
        seq: u64,
        channel: u32,
    ) -> Option<Injected> {
        let queue = self.by_conn.get_mut(&(local, remote))?;
        let mut found = None;
        while let Some(front) = queue.front() {
            if front.seq > seq {
                break;
            }
            let entry = queue.pop_front().expect("looked at above");
            self.len -= 1;
            if entry.seq == seq && entry.channel == channel {
                found = Some(entry.ids);
                break;
            }
            self.unmatched += 1;
        }
        if queue.is_empty() {
            self.by_conn.remove(&(local, remote));
        }
        found
    }

    /// Forgets ids older than the keep time.
    pub fn expire(&mut self, now_ns: u64) {
        while let Some(&(at, _)) = self.order.front() {
            if at.saturating_add(self.keep_ns) > now_ns {
                break;
            }
            self.drop_oldest();
        }
    }

    /// Ids that no exchange took, since the last call.
    pub fn take_unmatched(&mut self) -> u64 {
        std::mem::take(&mut self.unmatched)
    }

    fn drop_oldest(&mut self) -> bool {
        let Some((at, key)) = self.order.pop_front() else {
            return false;
        };
        if let Some(queue) = self.by_conn.get_mut(&key) {
            // The entry this names may have been taken already; drop it only if it is
            // still the oldest of its connection.
            if queue.front().is_some_and(|e| e.at_ns <= at) {
                queue.pop_front();
                self.len -= 1;
                self.unmatched += 1;
            }
            if queue.is_empty() {
                self.by_conn.remove(&key);
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: u8) -> Injected {
        Injected {
            trace_id: [n; 16],
            span_id: [n; 8],
        }
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn joins_on_connection_and_request_number() {
        let mut inj = Injections::new(16, 1_000);
        inj.record(addr(1), addr(80), 0, 0, ids(1), 0);
        inj.record(addr(1), addr(80), 2, 0, ids(3), 0);
        inj.record(addr(2), addr(80), 0, 0, ids(9), 0);
        assert_eq!(inj.take(addr(1), addr(80), 0, 0), Some(ids(1)));
        // Request 1 carried its own traceparent: nothing was written into it.
        assert_eq!(inj.take(addr(1), addr(80), 1, 0), None);
        assert_eq!(inj.take(addr(1), addr(80), 2, 0), Some(ids(3)));
        assert_eq!(inj.take(addr(2), addr(81), 0, 0), None);
        assert_eq!(inj.take(addr(2), addr(80), 0, 0), Some(ids(9)));
        assert_eq!(inj.take_unmatched(), 0);
    }

    #[test]
    fn ids_passed_over_or_too_old_are_counted() {
        let mut inj = Injections::new(16, 1_000);
        inj.record(addr(1), addr(80), 0, 0, ids(1), 0);
        inj.record(addr(1), addr(80), 1, 0, ids(2), 0);
        assert_eq!(inj.take(addr(1), addr(80), 1, 0), Some(ids(2)));
        assert_eq!(inj.take_unmatched(), 1);
        inj.record(addr(1), addr(80), 2, 0, ids(3), 10);
        inj.expire(2_000);
        assert_eq!(inj.take(addr(1), addr(80), 2, 0), None);
        assert_eq!(inj.take_unmatched(), 1);
    }

    #[test]
    fn an_amqp_publish_joins_only_on_its_channel() {
        let mut inj = Injections::new(16, 1_000);
        inj.record(addr(1), addr(5672), 0, 1, ids(1), 0);
        inj.record(addr(1), addr(5672), 1, 2, ids(2), 0);
        assert_eq!(inj.take(addr(1), addr(5672), 0, 1), Some(ids(1)));
        // Publish 1 was seen on channel 3 here: not the one the kernel wrote into.
        assert_eq!(inj.take(addr(1), addr(5672), 1, 3), None);
        assert_eq!(inj.take_unmatched(), 1);
    }

    #[test]
    fn bounded() {
        let mut inj = Injections::new(2, 1_000_000);
        for seq in 0..5 {
            inj.record(addr(1), addr(80), seq, 0, ids(seq as u8), seq);
        }
        assert_eq!(inj.take_unmatched(), 3);
        assert_eq!(inj.take(addr(1), addr(80), 4, 0), Some(ids(4)));
    }
}
