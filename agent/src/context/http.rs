//! Context linker: joins the two ends of one HTTP exchange seen on the same node.
//!
//! When both the client process and the server process of a TCP connection run on this
//! node, sonde sees the same exchange twice: as the client's span and as the server's.
//! The server span becomes the client span's child (DESIGN.md, rule 2), unless the
//! request carried a valid `traceparent`, which wins (rule 1; the span builder already
//! took it). The two ends finish in either order, so spans wait here for a short while
//! (`hold`) before they go on to the exporter, paired or not. Memory is bounded: past
//! `max_pending` spans the oldest leave unpaired.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    time::Duration,
};

use crate::{
    conn::Role,
    spans::{Span, SpanKind},
};

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
    span: Span,
    /// Method and request-target, to pair the right exchange on a keep-alive connection.
    request: (String, String),
    deadline_ns: u64,
    /// Sequence number of arrival, to release in order.
    seq: u64,
}

pub struct Linker {
    hold_ns: u64,
    max_pending: usize,
    by_conn: HashMap<ConnKey, VecDeque<u64>>,
    pending: std::collections::BTreeMap<u64, (ConnKey, Pending)>,
    next_seq: u64,
}

impl Linker {
    pub fn new(hold: Duration, max_pending: usize) -> Self {
        Linker {
            hold_ns: hold.as_nanos() as u64,
            max_pending,
            by_conn: HashMap::new(),
            pending: Default::default(),
            next_seq: 0,
        }
    }

    /// Offers a finished HTTP span. It either pairs with a waiting span of the other end
    /// (both are returned, linked) or waits.
    pub fn offer(
        &mut self,
        span: Span,
        key: ConnKey,
        method: &str,
        target: &str,
        now_ns: u64,
    ) -> Vec<Span> {
        let request = (method.to_owned(), target.to_owned());
        let other_kind = match span.kind {
            SpanKind::Client => SpanKind::Server,
            SpanKind::Server => SpanKind::Client,
            _ => return vec![span],
        };
        if let Some(queue) = self.by_conn.get_mut(&key) {
            let found = queue.iter().position(|seq| {
                self.pending
                    .get(seq)
                    .is_some_and(|(_, p)| p.span.kind == other_kind && p.request == request)
            });
            if let Some(i) = found {
                let seq = queue.remove(i).expect("index from position");
                if queue.is_empty() {
                    self.by_conn.remove(&key);
                }
                let (_, other) = self.pending.remove(&seq).expect("queued seqs are pending");
                let (mut client, mut server) = match span.kind {
                    SpanKind::Client => (span, other.span),
                    _ => (other.span, span),
                };
                link(&mut client, &mut server);
                return vec![client, server];
            }
        }
        let mut out = Vec::new();
        if self.pending.len() >= self.max_pending {
            out.extend(self.release_oldest());
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.by_conn.entry(key.clone()).or_default().push_back(seq);
        self.pending.insert(
            seq,
            (
                key,
                Pending {
                    span,
                    request,
                    deadline_ns: now_ns.saturating_add(self.hold_ns),
                    seq,
                },
            ),
        );
        out
    }

    /// Spans whose wait is over.
    pub fn expire(&mut self, now_ns: u64) -> Vec<Span> {
        let mut out = Vec::new();
        while let Some((_, (_, p))) = self.pending.first_key_value() {
            if p.deadline_ns > now_ns {
                break;
            }
            out.extend(self.release_oldest());
        }
        out
    }

    /// Everything still waiting (at shutdown).
    pub fn drain(&mut self) -> Vec<Span> {
        let mut out = Vec::new();
        while !self.pending.is_empty() {
            out.extend(self.release_oldest());
        }
        out
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    fn release_oldest(&mut self) -> Option<Span> {
        let (_, (key, p)) = self.pending.pop_first()?;
        if let Some(queue) = self.by_conn.get_mut(&key) {
            queue.retain(|s| *s != p.seq);
            if queue.is_empty() {
                self.by_conn.remove(&key);
            }
        }
        Some(p.span)
    }
}

/// Makes `server` the child of `client`, unless the server already has a parent from a
/// propagated `traceparent`.
fn link(client: &mut Span, server: &mut Span) {
    if server.parent_span_id.is_none() {
        server.trace_id = client.trace_id;
        server.parent_span_id = Some(client.span_id);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::spans::{Resource, Status, new_span_id, new_trace_id};

    fn span(kind: SpanKind) -> Span {
        Span {
            trace_id: new_trace_id(),
            span_id: new_span_id(),
            parent_span_id: None,
            name: "GET /".into(),
            kind,
            start_unix_nanos: 1,
            end_unix_nanos: 2,
            attributes: vec![],
            status: Status::Unset,
            resource: Arc::new(Resource {
                service_name: "s".into(),
                pid: 1,
                executable_name: "s".into(),
                host_name: "h".into(),
                attributes: vec![],
            }),
        }
    }

    fn key() -> ConnKey {
        ConnKey::new(
            Role::Client,
            "127.0.0.1:40000".parse().unwrap(),
            "127.0.0.1:8080".parse().unwrap(),
        )
    }

    #[test]
    fn server_span_becomes_child_of_client_span_in_either_order() {
        for server_first in [true, false] {
            let mut l = Linker::new(Duration::from_secs(1), 100);
            let (c, s) = (span(SpanKind::Client), span(SpanKind::Server));
            let client_id = (c.trace_id, c.span_id);
            let server_key = ConnKey::new(
                Role::Server,
                "127.0.0.1:8080".parse().unwrap(),
                "127.0.0.1:40000".parse().unwrap(),
            );
            assert_eq!(server_key, key());
            let out = if server_first {
                assert!(l.offer(s, server_key, "GET", "/", 0).is_empty());
                l.offer(c, key(), "GET", "/", 10)
            } else {
                assert!(l.offer(c, key(), "GET", "/", 0).is_empty());
                l.offer(s, server_key, "GET", "/", 10)
            };
            assert_eq!(out.len(), 2);
            let server = out.iter().find(|s| s.kind == SpanKind::Server).unwrap();
            assert_eq!(server.trace_id, client_id.0);
            assert_eq!(server.parent_span_id, Some(client_id.1));
            assert!(l.is_empty());
        }
    }

    #[test]
    fn propagated_parent_wins_and_unpaired_spans_leave_after_hold() {
        let mut l = Linker::new(Duration::from_nanos(100), 100);
        let mut s = span(SpanKind::Server);
        let propagated = (s.trace_id, new_span_id());
        s.parent_span_id = Some(propagated.1);
        assert!(l.offer(s, key(), "GET", "/a", 0).is_empty());
        assert!(
            l.offer(span(SpanKind::Client), key(), "GET", "/b", 0)
                .is_empty()
        );
        assert!(l.expire(50).is_empty());
        let out = l.offer(span(SpanKind::Client), key(), "GET", "/a", 60);
        let server = out.iter().find(|s| s.kind == SpanKind::Server).unwrap();
        assert_eq!(
            (server.trace_id, server.parent_span_id),
            (propagated.0, Some(propagated.1))
        );
        assert_eq!(l.expire(1000).len(), 1);
        assert!(l.is_empty());
    }

    /// Found by the capture_packet fuzz target: a capture whose timestamps are near
    /// the end of time overflowed the deadline.
    #[test]
    fn a_span_offered_at_the_end_of_time_waits_and_leaves() {
        let mut l = Linker::new(Duration::from_secs(1), 100);
        assert!(
            l.offer(span(SpanKind::Client), key(), "GET", "/", u64::MAX - 10)
                .is_empty()
        );
        assert!(l.expire(u64::MAX - 1).is_empty());
        assert_eq!(l.expire(u64::MAX).len(), 1);
    }

    #[test]
    fn pending_spans_are_bounded() {
        let mut l = Linker::new(Duration::from_secs(60), 3);
        let mut released = 0;
        for i in 0..10 {
            released += l
                .offer(span(SpanKind::Client), key(), "GET", &format!("/{i}"), 0)
                .len();
        }
        assert_eq!(l.len(), 3);
        assert_eq!(released, 7);
    }
}
