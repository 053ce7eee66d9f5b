//! Context linker: joins the two ends of one HTTP exchange seen on the same node.
//!
//! When both the client process and the server process of a TCP connection run on this
//! node, sonde sees the same exchange twice: as the client's span and as the server's.
//! The server span becomes the client span's child (DESIGN.md, rule 2), unless the
//! request carried a valid `traceparent`, which wins (rule 1). The ends are joined when
//! their requests start, so that what the server does while it handles the request is
//! in the client's trace from the start (and a request that hangs can be shown there).
//! The two starts arrive in either order: each waits here for a short while (`hold`)
//! for the other, matched by connection, method and request-target, first in first
//! out (keep-alive, pipelining). Memory is bounded: past `max_pending` the oldest go.

use crate::FastMap;
use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    time::Duration,
};

use crate::{conn::Role, spans::SpanId};

/// What identifies one exchange on one connection, from either end.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub client: SocketAddr,
    pub server: SocketAddr,
}

impl ConnKey {
    /// The key of a connection seen by a process in `role` with these addresses.
    pub fn new(role: Role, local: SocketAddr, remote: SocketAddr) -> Self {
        match role {
            Role::Client => ConnKey {
                client: local,
                server: remote,
            },
            Role::Server => ConnKey {
                client: remote,
                server: local,
            },
        }
    }
}

struct Pending {
    role: Role,
    span_id: SpanId,
    /// Method and request-target, to pair the right exchange on a keep-alive connection.
    request: (String, String),
    deadline_ns: u64,
}

/// See the module documentation.
pub struct Linker {
    hold_ns: u64,
    max_pending: usize,
    /// The waiting starts of each connection, oldest first, apart by the role that
    /// made them: a start looks only among the other end's. When only one end is
    /// traced (a client outside the traced cgroup, on this node), its starts pile up
    /// until their hold ends, and are never searched.
    by_conn: FastMap<ConnKey, [VecDeque<u64>; 2]>,
    pending: BTreeMap<u64, (ConnKey, Pending)>,
    next_seq: u64,
}

/// Two ends joined: the server's span is the client's child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Joined {
    pub client: SpanId,
    pub server: SpanId,
}

impl Linker {
    pub fn new(hold: Duration, max_pending: usize) -> Self {
        Linker {
            hold_ns: hold.as_nanos() as u64,
            max_pending: max_pending.max(1),
            by_conn: FastMap::default(),
            pending: BTreeMap::new(),
            next_seq: 0,
        }
    }

    /// The request of one end started (its span id is `span_id`). Returns the two
    /// ends when the other end's start was waiting; otherwise this one waits.
    pub fn offer(
        &mut self,
        role: Role,
        span_id: SpanId,
        key: ConnKey,
        method: &str,
        target: &str,
        now_ns: u64,
    ) -> Option<Joined> {
        self.expire(now_ns);
        if let Some(queues) = self.by_conn.get_mut(&key) {
            let queue = &mut queues[side(other(role))];
            let found = queue.iter().position(|seq| {
                self.pending
                    .get(seq)
                    .is_some_and(|(_, p)| p.request.0 == method && p.request.1 == target)
            });
            if let Some(i) = found {
                let seq = queue.remove(i).expect("index from position");
                if queues.iter().all(VecDeque::is_empty) {
                    self.by_conn.remove(&key);
                }
                let (_, other) = self.pending.remove(&seq).expect("queued seqs are pending");
                return Some(match role {
                    Role::Client => Joined {
                        client: span_id,
                        server: other.span_id,
                    },
                    Role::Server => Joined {
                        client: other.span_id,
                        server: span_id,
                    },
                });
            }
        }
        if self.pending.len() >= self.max_pending {
            self.release_oldest();
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.by_conn.entry(key.clone()).or_default()[side(role)].push_back(seq);
        self.pending.insert(
            seq,
            (
                key,
                Pending {
                    role,
                    span_id,
                    request: (method.to_owned(), target.to_owned()),
                    deadline_ns: now_ns.saturating_add(self.hold_ns),
                },
            ),
        );
        None
    }

    /// Forgets starts whose wait is over.
    pub fn expire(&mut self, now_ns: u64) {
        while let Some((_, (_, p))) = self.pending.first_key_value() {
            if p.deadline_ns > now_ns {
                break;
            }
            self.release_oldest();
        }
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    fn release_oldest(&mut self) {
        let Some((seq, (key, p))) = self.pending.pop_first() else {
            return;
        };
        if let Some(queues) = self.by_conn.get_mut(&key) {
            // The oldest pending start is the oldest of its queue.
            let queue = &mut queues[side(p.role)];
            if queue.front() == Some(&seq) {
                queue.pop_front();
            } else {
                queue.retain(|s| *s != seq);
            }
            if queues.iter().all(VecDeque::is_empty) {
                self.by_conn.remove(&key);
            }
        }
    }
}

fn side(role: Role) -> usize {
    match role {
        Role::Client => 0,
        Role::Server => 1,
    }
}

fn other(role: Role) -> Role {
    match role {
        Role::Client => Role::Server,
        Role::Server => Role::Client,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ConnKey {
        ConnKey::new(
            Role::Client,
            "127.0.0.1:40000".parse().unwrap(),
            "127.0.0.1:8080".parse().unwrap(),
        )
    }

    const C: SpanId = [1; 8];
    const S: SpanId = [2; 8];

    #[test]
    fn starts_of_one_end_pile_up_apart_and_the_other_end_joins_the_oldest() {
        // The server is traced, its client (on this node) is not: the server's starts
        // wait on the connection until their hold ends, never joined with each other.
        let mut l = Linker::new(Duration::from_secs(2), 100_000);
        for i in 0..10_000u64 {
            let id = i.to_be_bytes();
            assert_eq!(
                l.offer(Role::Server, id, key(), "GET", "/orders/1", i * 100),
                None
            );
        }
        assert_eq!(l.len(), 10_000);
        // A client start of the same request joins the oldest one still waiting.
        let joined = l.offer(Role::Client, C, key(), "GET", "/orders/1", 1_000_000);
        assert_eq!(
            joined,
            Some(Joined {
                client: C,
                server: 0u64.to_be_bytes()
            })
        );
        // Past the hold, all are forgotten, and the connection with them.
        l.expire(10_000_000_000);
        assert!(l.is_empty());
        assert!(l.by_conn.is_empty());
    }

    #[test]
    fn the_two_starts_join_in_either_order() {
        let server_key = ConnKey::new(
            Role::Server,
            "127.0.0.1:8080".parse().unwrap(),
            "127.0.0.1:40000".parse().unwrap(),
        );
        assert_eq!(server_key, key());
        let joined = Joined {
            client: C,
            server: S,
        };
        let mut l = Linker::new(Duration::from_secs(1), 100);
        assert_eq!(
            l.offer(Role::Server, S, server_key.clone(), "GET", "/", 0),
            None
        );
        assert_eq!(
            l.offer(Role::Client, C, key(), "GET", "/", 10),
            Some(joined)
        );
        assert!(l.is_empty());
        assert_eq!(l.offer(Role::Client, C, key(), "GET", "/", 0), None);
        assert_eq!(
            l.offer(Role::Server, S, server_key, "GET", "/", 10),
            Some(joined)
        );
        assert!(l.is_empty());
    }

    #[test]
    fn only_the_same_request_joins_and_a_start_waits_only_for_the_hold() {
        let mut l = Linker::new(Duration::from_nanos(100), 100);
        assert_eq!(l.offer(Role::Server, S, key(), "GET", "/a", 0), None);
        assert_eq!(l.offer(Role::Client, C, key(), "GET", "/b", 0), None);
        assert_eq!(
            l.offer(Role::Server, S, key(), "GET", "/a", 10),
            None,
            "same end"
        );
        assert_eq!(l.len(), 3);
        assert_eq!(
            l.offer(Role::Client, C, key(), "GET", "/a", 60),
            Some(Joined {
                client: C,
                server: S
            })
        );
        l.expire(1000);
        assert!(l.is_empty());
    }

    /// Found by the capture_packet fuzz target: a capture whose timestamps are near
    /// the end of time overflowed the deadline.
    #[test]
    fn a_start_offered_at_the_end_of_time_waits_and_leaves() {
        let mut l = Linker::new(Duration::from_secs(1), 100);
        assert_eq!(
            l.offer(Role::Client, C, key(), "GET", "/", u64::MAX - 10),
            None
        );
        l.expire(u64::MAX - 1);
        assert_eq!(l.len(), 1);
        l.expire(u64::MAX);
        assert!(l.is_empty());
    }

    #[test]
    fn waiting_starts_are_bounded() {
        let mut l = Linker::new(Duration::from_secs(60), 3);
        for i in 0..10 {
            assert_eq!(
                l.offer(Role::Client, C, key(), "GET", &format!("/{i}"), 0),
                None
            );
        }
        assert_eq!(l.len(), 3);
    }
}
