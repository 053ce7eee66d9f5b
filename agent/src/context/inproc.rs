//! Parents inside a service (DESIGN.md, rule 3): the incoming request or delivery a
//! process was handling when it made an outgoing call or started a program.
//!
//! Every incoming exchange of a process is kept from its start until a little after
//! its end, with the thread that read it and the order id it carried. An outgoing call
//! made at time `t` on thread `tid` looks for its parent among the incoming exchanges
//! of its process in flight at `t`, weighing the evidence in order:
//!
//! 1. the only one: exactly one was in flight in the process;
//! 2. the thread: exactly one of them was read on the thread that made the call, and
//!    its order id does not contradict the call's (thread-per-request servers; not used
//!    for runtimes whose threads do not follow requests, such as Go's goroutines). This
//!    is a claim to be confirmed ([`Found::ByThread`]): a pool that hands work between
//!    its threads makes calls for one request on a thread that read another. The claim
//!    holds when the request is answered by the thread that read it; when another
//!    thread answers, the process is known to hand work over, the claim is dropped,
//!    and its threads are no evidence from then on;
//! 3. the order id: exactly one carried the call's order id.
//!
//! Anything else with more than one in flight is ambiguous: no parent, counted. Never
//! a guess.

use crate::{FastMap, FastSet};
use std::collections::VecDeque;

use crate::spans::SpanId;

/// Most incoming exchanges remembered per process; beyond that the oldest go.
const MAX_PER_PROCESS: usize = 4096;

/// An incoming exchange of a process.
#[derive(Clone, Debug)]
struct Incoming {
    span_id: SpanId,
    /// The thread that read it (0: any thread of the process, e.g. a program's own
    /// process span).
    tid: u32,
    start_ns: u64,
    end_ns: Option<u64>,
    order_id: Option<String>,
}

/// What the evidence says about an outgoing call's parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    Parent(SpanId),
    /// Only the thread says so: to be confirmed by who answers that request.
    ByThread(SpanId),
    /// Nothing was in flight: the call starts its own trace.
    Nothing,
    /// Several were in flight and nothing tells them apart.
    Ambiguous,
}

/// See the module documentation.
pub struct InProcess {
    by_pid: FastMap<u32, VecDeque<Incoming>>,
    /// Processes seen answering a request on another thread than the one that read it.
    hands_off: FastSet<u32>,
    /// How long an ended exchange stays, for calls whose events arrive late.
    keep_ns: u64,
}

impl InProcess {
    pub fn new(keep_ns: u64) -> Self {
        InProcess {
            by_pid: FastMap::default(),
            hands_off: FastSet::default(),
            keep_ns,
        }
    }

    /// Process `pid` began handling an incoming exchange at `start_ns`, read by
    /// thread `tid`.
    pub fn begin(
        &mut self,
        pid: u32,
        tid: u32,
        span_id: SpanId,
        start_ns: u64,
        order_id: Option<String>,
    ) {
        let list = self.by_pid.entry(pid).or_default();
        if list.len() >= MAX_PER_PROCESS {
            list.pop_front();
        }
        list.push_back(Incoming {
            span_id,
            tid,
            start_ns,
            end_ns: None,
            order_id,
        });
    }

    /// The order id of an incoming exchange became known (from its body).
    pub fn set_order_id(&mut self, pid: u32, span_id: SpanId, order_id: String) {
        if let Some(e) = self.entry_mut(pid, span_id) {
            e.order_id = Some(order_id);
        }
    }

    /// The incoming exchange ended at `end_ns`, answered by thread `answered_by` (0:
    /// not known). Whether the thread that read it answered it (true when either is
    /// not known); when not, the process hands work between threads.
    pub fn end(&mut self, pid: u32, span_id: SpanId, end_ns: u64, answered_by: u32) -> bool {
        let Some(e) = self.entry_mut(pid, span_id) else {
            return true;
        };
        e.end_ns = Some(end_ns);
        let own = e.tid == 0 || answered_by == 0 || e.tid == answered_by;
        if !own {
            self.hands_off.insert(pid);
        }
        own
    }

    fn entry_mut(&mut self, pid: u32, span_id: SpanId) -> Option<&mut Incoming> {
        self.by_pid
            .get_mut(&pid)?
            .iter_mut()
            .rev()
            .find(|e| e.span_id == span_id)
    }

    /// The parent of a call process `pid` made at `at_ns` on thread `tid` (0: not
    /// known), carrying `order_id`. `threads`: the process's threads follow its
    /// requests (false for Go).
    pub fn find(
        &self,
        pid: u32,
        tid: u32,
        at_ns: u64,
        order_id: Option<&str>,
        threads: bool,
    ) -> Found {
        let Some(list) = self.by_pid.get(&pid) else {
            return Found::Nothing;
        };
        let in_flight: Vec<&Incoming> = list
            .iter()
            .filter(|e| e.start_ns <= at_ns && e.end_ns.is_none_or(|end| at_ns <= end))
            .collect();
        let only = |v: Vec<&Incoming>| (v.len() == 1).then(|| Found::Parent(v[0].span_id));
        match in_flight.len() {
            0 => return Found::Nothing,
            1 => return Found::Parent(in_flight[0].span_id),
            _ => {}
        }
        if threads && tid != 0 && !self.hands_off.contains(&pid) {
            let same: Vec<&Incoming> = in_flight.iter().copied().filter(|e| e.tid == tid).collect();
            if let [e] = same[..] {
                let contradicted =
                    matches!((order_id, e.order_id.as_deref()), (Some(a), Some(b)) if a != b);
                if !contradicted {
                    return Found::ByThread(e.span_id);
                }
            }
        }
        // A program's own span (any thread) holds everything it does; requests it
        // serves itself are more specific, so it only counts when alone.
        let specific: Vec<&Incoming> = in_flight.iter().copied().filter(|e| e.tid != 0).collect();
        if specific.len() == 1 {
            return Found::Parent(specific[0].span_id);
        }
        if let Some(id) = order_id {
            let same: Vec<&Incoming> = in_flight
                .iter()
                .copied()
                .filter(|e| e.order_id.as_deref() == Some(id))
                .collect();
            if let Some(f) = only(same) {
                return f;
            }
        }
        Found::Ambiguous
    }

    /// Forgets exchanges that ended more than the keep time before `now_ns`.
    pub fn expire(&mut self, now_ns: u64) {
        let keep = self.keep_ns;
        self.by_pid.retain(|_, list| {
            list.retain(|e| e.end_ns.is_none_or(|end| end.saturating_add(keep) > now_ns));
            !list.is_empty()
        });
    }

    /// The process exited.
    pub fn remove_process(&mut self, pid: u32) {
        self.by_pid.remove(&pid);
        self.hands_off.remove(&pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: SpanId = [1; 8];
    const B: SpanId = [2; 8];

    #[test]
    fn thread_per_request_finds_the_request_of_the_calling_thread() {
        let mut r = InProcess::new(1_000);
        r.begin(10, 101, A, 100, None);
        r.begin(10, 102, B, 110, None);
        assert_eq!(r.find(10, 102, 150, None, true), Found::ByThread(B));
        assert_eq!(r.find(10, 101, 150, None, true), Found::ByThread(A));
        // Without thread evidence (Go) the same is ambiguous.
        assert_eq!(r.find(10, 101, 150, None, false), Found::Ambiguous);
    }

    #[test]
    fn a_thread_is_no_evidence_against_the_calls_order_id() {
        let mut r = InProcess::new(1_000);
        r.begin(10, 101, A, 100, Some("o-1".into()));
        r.begin(10, 102, B, 110, Some("o-2".into()));
        // Thread 101 read o-1 but makes o-2's call: the order id decides.
        assert_eq!(r.find(10, 101, 150, Some("o-2"), true), Found::Parent(B));
        assert_eq!(r.find(10, 101, 150, Some("o-1"), true), Found::ByThread(A));
        assert_eq!(r.find(10, 101, 150, Some("o-3"), true), Found::Ambiguous);
    }

    #[test]
    fn a_process_seen_answering_on_another_thread_loses_its_thread_evidence() {
        let mut r = InProcess::new(1_000);
        r.begin(10, 101, A, 100, None);
        r.begin(10, 102, B, 110, None);
        assert_eq!(r.find(10, 101, 150, None, true), Found::ByThread(A));
        assert!(
            r.end(10, A, 200, 101),
            "answered by the thread that read it"
        );
        r.begin(10, 101, A, 300, None);
        assert!(
            !r.end(10, B, 310, 101),
            "B was read on 102, answered on 101"
        );
        r.begin(10, 102, B, 320, None);
        assert_eq!(r.find(10, 101, 350, None, true), Found::Ambiguous);
        // Another process keeps its own.
        r.begin(11, 101, A, 100, None);
        r.begin(11, 102, B, 110, None);
        assert_eq!(r.find(11, 101, 150, None, true), Found::ByThread(A));
        // Not known who answered: no conclusion.
        assert!(r.end(11, B, 200, 0));
        r.remove_process(10);
        r.begin(10, 101, A, 400, None);
        r.begin(10, 102, B, 410, None);
        assert_eq!(
            r.find(10, 101, 450, None, true),
            Found::ByThread(A),
            "a new process of that pid"
        );
    }

    #[test]
    fn one_in_flight_is_the_parent_whatever_the_thread() {
        let mut r = InProcess::new(1_000);
        r.begin(10, 101, A, 100, None);
        assert_eq!(r.find(10, 999, 150, None, true), Found::Parent(A));
        r.end(10, A, 200, 0);
        assert_eq!(r.find(10, 999, 250, None, true), Found::Nothing);
        assert_eq!(
            r.find(10, 999, 50, None, true),
            Found::Nothing,
            "before it began"
        );
        assert_eq!(
            r.find(11, 999, 150, None, true),
            Found::Nothing,
            "another process"
        );
    }

    #[test]
    fn an_event_loop_is_told_apart_only_by_order_id() {
        let mut r = InProcess::new(1_000);
        r.begin(10, 7, A, 100, Some("o-1".into()));
        r.begin(10, 7, B, 110, None);
        assert_eq!(r.find(10, 7, 150, None, true), Found::Ambiguous);
        assert_eq!(r.find(10, 7, 150, Some("o-2"), true), Found::Ambiguous);
        r.set_order_id(10, B, "o-2".into());
        assert_eq!(r.find(10, 7, 150, Some("o-2"), true), Found::Parent(B));
        assert_eq!(r.find(10, 7, 150, Some("o-1"), true), Found::Parent(A));
    }

    #[test]
    fn a_program_span_holds_what_the_program_does_unless_it_serves_requests() {
        let mut r = InProcess::new(1_000);
        r.begin(10, 0, A, 100, None);
        assert_eq!(r.find(10, 55, 150, None, true), Found::Parent(A));
        r.begin(10, 56, B, 120, None);
        assert_eq!(r.find(10, 57, 150, None, true), Found::Parent(B));
    }

    #[test]
    fn ended_exchanges_are_forgotten_after_the_keep_time() {
        let mut r = InProcess::new(100);
        r.begin(10, 1, A, 100, None);
        r.end(10, A, 200, 0);
        r.expire(250);
        assert_eq!(
            r.find(10, 1, 150, None, true),
            Found::Parent(A),
            "late event, kept"
        );
        r.expire(301);
        assert_eq!(r.find(10, 1, 150, None, true), Found::Nothing);
    }
}
