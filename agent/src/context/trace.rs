//! Whole traces: the trace every span belongs to and its parent, decided as exchanges
//! start, so that the calls a service makes while it handles a request join that
//! request's trace, and a request that hangs can be shown in its trace while it hangs.
//!
//! Every exchange is a node, named by the span id it gets when it starts. A node's
//! parent is decided once, when the evidence comes in (the other end of the same
//! connection, the request its service was handling, a `traceparent`): another node,
//! a remote span, or none (a root, which starts a new trace). A node's trace is known
//! once its parent is decided and the parent's trace is known; a finished span waits
//! here until then. Waiting is bounded: a node left undecided past the decision
//! window becomes a root, and the number of nodes is capped (the oldest are decided
//! and forgotten first).
//!
//! A node that has finished and knows its trace leaves the graph for a compact record
//! (its trace and parent, 33 bytes), kept for `keep_ns` for children that start late: the
//! records are kept in generations, and the oldest generation is dropped whole, so
//! that the memory a finished node costs is taken once and used again, not allocated
//! and freed per node.
//!
//! A node still open after the stall timeout gives a stalled span, once: the same
//! operation in the same trace, with its own span id, marked `sonde.stalled`, ending
//! when it was noticed. The ordinary span follows when the exchange ends.

use crate::FastMap;
use std::collections::{BTreeSet, VecDeque};
use std::mem::size_of;

use crate::spans::{KeyValue, Span, SpanId, TraceId, new_span_id, new_trace_id};

/// sonde's attribute on a span exported while its exchange still hangs: `true`.
pub const STALLED: &str = "sonde.stalled";
/// Makes the span a node shows if it hangs: called only when it does (most exchanges
/// end in time, and building a span costs as much as the exchange's own).
pub type StallTemplate = Box<dyn FnOnce() -> Span + Send>;

/// How long the stalled exchange had waited when its stalled span was made, in ms.
pub const STALLED_FOR_MS: &str = "sonde.stalled.for_ms";

/// Who a node's span is the child of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parent {
    /// No one: the span starts a trace.
    Root,
    /// Another exchange seen by this agent.
    Node(SpanId),
    /// A span named by a `traceparent` (or a span another stage linked already).
    Remote { trace_id: TraceId, span_id: SpanId },
}

/// Limits and timings of the graph.
#[derive(Clone, Copy, Debug)]
pub struct GraphOptions {
    /// How long a finished node is kept, at least, for evidence that arrives late (at
    /// most a generation longer: `keep_ns / GENERATIONS`).
    pub keep_ns: u64,
    /// Most nodes at once that are open or wait for their trace. Finished ones are
    /// kept up to `max_nodes / GENERATIONS` per generation: past that, the oldest
    /// generation is dropped early.
    pub max_nodes: usize,
    /// An exchange open this long gives a stalled span; `None`: never.
    pub stall_ns: Option<u64>,
}

/// What the graph counted, taken by the pipeline for /metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraphCounts {
    /// Nodes whose parent was still undecided at the end of the window.
    pub undecided: u64,
    /// Nodes forgotten to stay under the cap while still open or waiting.
    pub evicted: u64,
    /// Parents refused because they would have made a cycle.
    pub cycles: u64,
    /// Stalled spans made.
    pub stalled: u64,
    /// Spans whose request carried a traceparent the kernel wrote, put under a parent
    /// in another trace than the one written (the receiving side continues that one).
    pub inject_conflicts: u64,
}

struct Node<T> {
    parent: Option<Parent>,
    trace: Option<TraceId>,
    parent_span: Option<SpanId>,
    /// Nodes whose parent this is, waiting for its trace.
    children: Vec<SpanId>,
    /// Finished (or stalled) spans waiting for the trace.
    waiting: Vec<(Span, T)>,
    open: bool,
    start_ns: u64,
    /// When the node becomes a root if nothing decided it: its entry in `made`.
    decide_by_ns: u64,
    /// What a stalled span of this node looks like, while it is open and not stalled.
    stall: Option<StallTemplate>,
    /// The trace this node starts when it is a root: the one the kernel wrote into its
    /// request (`--inject-traceparent`); a new one otherwise.
    root_trace: Option<TraceId>,
    /// The parent decided when no better evidence came before the deadline (a
    /// delivery's `traceparent`, when the publish is not seen here): Root otherwise.
    fallback: Option<Parent>,
}

/// See the module documentation. `T` travels with each span: what the pipeline does
/// with it once its trace is known.
pub struct TraceGraph<T> {
    opts: GraphOptions,
    /// Nodes open or waiting for their trace.
    nodes: FastMap<SpanId, Node<T>>,
    /// Finished nodes whose trace is known.
    settled: Settled,
    /// (deadline, node) of the decisions still to make.
    made: BTreeSet<(u64, SpanId)>,
    /// Every node in the order it was made, for the cap (trimmed of forgotten ones).
    age: VecDeque<SpanId>,
    /// (time, node) of nodes that ended before their trace was known and hold no span,
    /// to forget them after `keep_ns`.
    closed: VecDeque<(u64, SpanId)>,
    /// (time the stall is due, node), trimmed of the nodes that ended.
    stalls: VecDeque<(u64, SpanId)>,
    counts: GraphCounts,
    out: Vec<(Span, T)>,
    /// The nodes `resolve` has left to settle, kept for its next call.
    todo: Vec<SpanId>,
}

impl<T> TraceGraph<T> {
    pub fn new(opts: GraphOptions) -> Self {
        TraceGraph {
            opts,
            nodes: FastMap::default(),
            settled: Settled::new(opts.keep_ns, opts.max_nodes),
            made: BTreeSet::new(),
            age: VecDeque::new(),
            closed: VecDeque::new(),
            stalls: VecDeque::new(),
            counts: GraphCounts::default(),
            out: Vec::new(),
            todo: Vec::new(),
        }
    }

    /// Nodes open or waiting for their trace (finished ones with a trace aside).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// An exchange started at `start_ns`; undecided at `decide_by_ns`, it becomes a
    /// root. `stall` is its span as it would be shown if it hung.
    pub fn open(
        &mut self,
        id: SpanId,
        start_ns: u64,
        decide_by_ns: u64,
        stall: Option<StallTemplate>,
    ) {
        if self.nodes.contains_key(&id) {
            return;
        }
        while self.nodes.len() >= self.opts.max_nodes.max(1) {
            if !self.evict_oldest() {
                break;
            }
        }
        if let (Some(after), Some(_)) = (self.opts.stall_ns, stall.as_ref()) {
            // The stalls of nodes that ended stay queued until due; once they are most of
            // the queue, it is trimmed (amortised: it has doubled since the last time).
            if self.stalls.len() >= 2 * self.nodes.len() + TRIM_SLACK {
                let nodes = &self.nodes;
                self.stalls
                    .retain(|(_, id)| nodes.get(id).is_some_and(|n| n.stall.is_some()));
            }
            self.stalls.push_back((start_ns.saturating_add(after), id));
        }
        self.nodes.insert(
            id,
            Node {
                parent: None,
                trace: None,
                parent_span: None,
                children: Vec::new(),
                waiting: Vec::new(),
                open: true,
                start_ns,
                decide_by_ns,
                stall,
                root_trace: None,
                fallback: None,
            },
        );
        self.made.insert((decide_by_ns, id));
        if self.age.len() >= 2 * self.nodes.len() + TRIM_SLACK {
            let nodes = &self.nodes;
            self.age.retain(|id| nodes.contains_key(id));
        }
        self.age.push_back(id);
    }

    /// The node's request carried `trace` to the other side (the kernel wrote it): as
    /// a root, it starts that trace.
    pub fn set_root_trace(&mut self, id: SpanId, trace: TraceId) {
        if let Some(node) = self.nodes.get_mut(&id) {
            node.root_trace = Some(trace);
        }
    }

    /// The parent the node gets at its deadline if nothing decided it before.
    pub fn set_fallback(&mut self, id: SpanId, parent: Parent) {
        if let Some(node) = self.nodes.get_mut(&id) {
            node.fallback = Some(parent);
        }
    }

    /// Whether the node exists and its parent is still undecided.
    pub fn undecided(&self, id: &SpanId) -> bool {
        self.nodes.get(id).is_some_and(|n| n.parent.is_none())
    }

    /// The trace of a node, once known.
    pub fn trace_of(&self, id: &SpanId) -> Option<TraceId> {
        match self.nodes.get(id) {
            Some(n) => n.trace,
            None => self.settled.get(id).map(|r| r.trace),
        }
    }

    /// Decides a node's parent. The first decision stands; a parent that is unknown
    /// or would make a cycle makes the node a root.
    pub fn decide(&mut self, id: SpanId, parent: Parent) {
        let Some(node) = self.nodes.get(&id) else {
            return;
        };
        if node.parent.is_some() {
            return;
        }
        let decide_by_ns = node.decide_by_ns;
        self.made.remove(&(decide_by_ns, id));
        let parent = match parent {
            Parent::Node(p)
                if p == id || !self.nodes.contains_key(&p) && self.settled.get(&p).is_none() =>
            {
                Parent::Root
            }
            Parent::Node(p) if self.reaches(p, id) => {
                self.counts.cycles += 1;
                Parent::Root
            }
            other => other,
        };
        if let Some(node) = self.nodes.get_mut(&id) {
            node.parent = Some(parent);
        }
        self.resolve(id);
    }

    /// Whether following parents up from `from` reaches `to`. A settled node's
    /// ancestors all know their trace, so they cannot reach an undecided one.
    fn reaches(&self, from: SpanId, to: SpanId) -> bool {
        let mut at = from;
        for _ in 0..64 {
            if at == to {
                return true;
            }
            match self.nodes.get(&at).and_then(|n| n.parent) {
                Some(Parent::Node(p)) => at = p,
                _ => return false,
            }
        }
        true
    }

    /// A span finished; its span id names its node. A span with no node (made by a
    /// stage that does not start nodes) goes out as it is.
    pub fn finish(&mut self, span: Span, then: T, now_ns: u64) {
        self.settled.advance(now_ns);
        let id = span.span_id;
        let Some(node) = self.nodes.get_mut(&id) else {
            let span = match self.settled.get(&id) {
                Some(r) => fill(span, r.trace, r.parent_span),
                None => span,
            };
            self.out.push((span, then));
            return;
        };
        node.stall = None;
        node.open = false;
        match node.trace {
            Some(trace) => {
                let parent = node.parent_span;
                self.out.push((fill(span, trace, parent), then));
                self.settle(id);
            }
            None => node.waiting.push((span, then)),
        }
    }

    /// An exchange that will never finish as a span (its connection ended without it).
    pub fn abandon(&mut self, id: SpanId, now_ns: u64) {
        self.settled.advance(now_ns);
        if let Some(node) = self.nodes.get_mut(&id)
            && node.open
        {
            node.open = false;
            node.stall = None;
            if node.trace.is_some() {
                self.settle(id);
            } else if node.waiting.is_empty() {
                self.closed.push_back((now_ns, id));
            }
        }
    }

    /// A finished node whose trace is known leaves for its compact record.
    fn settle(&mut self, id: SpanId) {
        if let Some(node) = self.nodes.remove(&id)
            && let Some(trace) = node.trace
        {
            self.settled.insert(
                id,
                Record {
                    trace,
                    parent_span: node.parent_span,
                },
            );
        }
    }

    /// Spans whose trace is now known, in the order they became ready.
    pub fn take(&mut self) -> Vec<(Span, T)> {
        std::mem::take(&mut self.out)
    }

    /// As [`TraceGraph::take`], appended to `ready`: the graph keeps its buffer.
    pub fn take_into(&mut self, ready: &mut Vec<(Span, T)>) {
        ready.append(&mut self.out);
    }

    /// What was counted since the last call.
    pub fn take_counts(&mut self) -> GraphCounts {
        std::mem::take(&mut self.counts)
    }

    /// Time passes: undecided nodes past their window become roots, stalls are
    /// noticed, finished nodes are forgotten. `make_stalled` turns a node's stall
    /// template into what travels with the stalled span.
    pub fn tick(&mut self, now_ns: u64, mut make_stalled: impl FnMut(&Span) -> T) {
        self.settled.advance(now_ns);
        while let Some(&(deadline, id)) = self.made.first() {
            if deadline > now_ns {
                break;
            }
            self.made.pop_first();
            if self.undecided(&id) {
                match self.nodes.get_mut(&id).and_then(|n| n.fallback.take()) {
                    Some(parent) => self.decide(id, parent),
                    None => {
                        self.counts.undecided += 1;
                        self.decide(id, Parent::Root);
                    }
                }
            }
        }
        while let Some(&(due, id)) = self.stalls.front() {
            if due > now_ns {
                break;
            }
            self.stalls.pop_front();
            let Some(node) = self.nodes.get_mut(&id) else {
                continue;
            };
            let Some(template) = node.stall.take().filter(|_| node.open) else {
                continue;
            };
            let waited_ns = now_ns.saturating_sub(node.start_ns);
            let mut span = template();
            span.span_id = new_span_id();
            span.end_unix_nanos = span.start_unix_nanos.saturating_add(waited_ns);
            span.attributes.push(KeyValue::new(STALLED, true));
            span.attributes
                .push(KeyValue::new(STALLED_FOR_MS, waited_ns / 1_000_000));
            let then = make_stalled(&span);
            self.counts.stalled += 1;
            match node.trace {
                Some(trace) => {
                    let parent = node.parent_span;
                    self.out.push((fill(span, trace, parent), then));
                }
                None => node.waiting.push((span, then)),
            }
        }
        while let Some(&(at, id)) = self.closed.front() {
            if at.saturating_add(self.opts.keep_ns) > now_ns {
                break;
            }
            self.closed.pop_front();
            if self
                .nodes
                .get(&id)
                .is_some_and(|n| !n.open && n.waiting.is_empty() && n.children.is_empty())
            {
                self.nodes.remove(&id);
            }
        }
        while self
            .age
            .front()
            .is_some_and(|id| !self.nodes.contains_key(id))
        {
            self.age.pop_front();
        }
    }

    /// Everything out at shutdown: undecided nodes become roots.
    pub fn drain(&mut self) -> Vec<(Span, T)> {
        let ids: Vec<SpanId> = std::mem::take(&mut self.made)
            .into_iter()
            .map(|(_, id)| id)
            .collect();
        for id in ids {
            if self.undecided(&id) {
                self.decide(id, Parent::Root);
            }
        }
        self.nodes.clear();
        self.settled.clear();
        self.age.clear();
        self.closed.clear();
        self.stalls.clear();
        self.take()
    }

    /// Decides and forgets the oldest node to make room; false when there is none.
    fn evict_oldest(&mut self) -> bool {
        while let Some(id) = self.age.pop_front() {
            let Some(node) = self.nodes.get_mut(&id) else {
                continue;
            };
            if node.open || !node.waiting.is_empty() || node.trace.is_none() {
                self.counts.evicted += 1;
            }
            let decide_by_ns = node.decide_by_ns;
            self.made.remove(&(decide_by_ns, id));
            if node.trace.is_none() {
                // Its parent's trace is not known yet: it starts one, so that what
                // waits on it goes out.
                node.parent = Some(Parent::Root);
                self.resolve(id);
            }
            self.nodes.remove(&id);
            return true;
        }
        false
    }

    /// A node's parent was decided or its parent's trace became known: settle the
    /// trace of it and of everything waiting below it.
    fn resolve(&mut self, id: SpanId) {
        let mut todo = std::mem::take(&mut self.todo);
        todo.push(id);
        while let Some(id) = todo.pop() {
            let Some(node) = self.nodes.get(&id) else {
                continue;
            };
            if node.trace.is_some() {
                continue;
            }
            let root_trace = node.root_trace;
            let (trace, parent_span) = match node.parent {
                None => continue,
                Some(Parent::Root) => (root_trace.unwrap_or_else(new_trace_id), None),
                Some(Parent::Remote { trace_id, span_id }) => (trace_id, Some(span_id)),
                Some(Parent::Node(p)) => match self.nodes.get_mut(&p) {
                    Some(parent) => match parent.trace {
                        Some(t) => (t, Some(p)),
                        None => {
                            if !parent.children.contains(&id) {
                                parent.children.push(id);
                            }
                            continue;
                        }
                    },
                    None => match self.settled.get(&p) {
                        Some(r) => (r.trace, Some(p)),
                        // The parent was forgotten before its trace was known: it was
                        // decided first, so this cannot happen; start a trace.
                        None => (new_trace_id(), None),
                    },
                },
            };
            if root_trace.is_some_and(|t| t != trace) {
                self.counts.inject_conflicts += 1;
            }
            let node = self.nodes.get_mut(&id).expect("looked up above");
            node.trace = Some(trace);
            node.parent_span = parent_span;
            for (span, then) in node.waiting.drain(..) {
                self.out.push((fill(span, trace, parent_span), then));
            }
            todo.append(&mut node.children);
            if !node.open {
                self.settle(id);
            }
        }
        self.todo = todo;
    }
}

/// How much longer than their keep the `age` and `stalls` queues may grow before they
/// are trimmed of the nodes that are gone.
const TRIM_SLACK: usize = 1024;

/// Generations of settled nodes: a record lives `keep_ns` to `keep_ns · (1 + 1 /
/// GENERATIONS)`.
pub const GENERATIONS: usize = 4;

/// What a finished node whose trace is known leaves: all that a child starting later,
/// or a late span of its own, needs.
#[derive(Clone, Copy, Debug)]
struct Record {
    trace: TraceId,
    parent_span: Option<SpanId>,
}

/// The memory one finished node costs in the graph once settled, its hash table's
/// control byte aside: 33 bytes.
pub const SETTLED_NODE_BYTES: usize = size_of::<(SpanId, Record)>();

/// Finished nodes' records, in `GENERATIONS + 1` maps: the newest takes the nodes that
/// settle during one `keep_ns / GENERATIONS`, and the oldest is emptied, its memory
/// kept for the next generation, once all it holds is older than `keep_ns`. A generation
/// is started early when the newest is full (`max_nodes / GENERATIONS`), so that a
/// burst is kept for less than `keep_ns` rather than without bound.
struct Settled {
    /// The newest generation first.
    generations: VecDeque<FastMap<SpanId, Record>>,
    /// When the newest generation started; `None` before the first time is known.
    newest_since_ns: Option<u64>,
    generation_ns: u64,
    max_per_generation: usize,
    last_ns: u64,
}

impl Settled {
    fn new(keep_ns: u64, max_nodes: usize) -> Self {
        Settled {
            generations: (0..=GENERATIONS).map(|_| FastMap::default()).collect(),
            newest_since_ns: None,
            generation_ns: (keep_ns / GENERATIONS as u64).max(1),
            max_per_generation: (max_nodes / GENERATIONS).max(1),
            last_ns: 0,
        }
    }

    fn get(&self, id: &SpanId) -> Option<Record> {
        self.generations.iter().find_map(|g| g.get(id)).copied()
    }

    fn insert(&mut self, id: SpanId, record: Record) {
        if self.generations[0].len() >= self.max_per_generation {
            self.rotate();
            self.newest_since_ns = Some(self.last_ns);
        }
        self.generations[0].insert(id, record);
    }

    /// Time passes (monotonic; earlier times are ignored): generations older than the
    /// keep are dropped.
    fn advance(&mut self, now_ns: u64) {
        self.last_ns = self.last_ns.max(now_ns);
        let Some(since) = self.newest_since_ns else {
            self.newest_since_ns = Some(now_ns);
            return;
        };
        let mut since = since;
        let mut rotated = 0;
        while now_ns.saturating_sub(since) >= self.generation_ns {
            self.rotate();
            since += self.generation_ns;
            rotated += 1;
            if rotated > GENERATIONS {
                // All of them were older than the keep.
                since = now_ns;
                break;
            }
        }
        self.newest_since_ns = Some(since);
    }

    /// The oldest generation is dropped and becomes the newest.
    fn rotate(&mut self) {
        if let Some(mut oldest) = self.generations.pop_back() {
            oldest.clear();
            self.generations.push_front(oldest);
        }
    }

    fn clear(&mut self) {
        for g in &mut self.generations {
            g.clear();
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.generations.iter().map(|g| g.len()).sum()
    }
}

fn fill(mut span: Span, trace: TraceId, parent: Option<SpanId>) -> Span {
    span.trace_id = trace;
    span.parent_span_id = parent;
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(id: SpanId) -> Span {
        crate::spans::test_span([9; 16], id, 1, 2)
    }

    fn graph() -> TraceGraph<()> {
        TraceGraph::new(GraphOptions {
            keep_ns: 100,
            max_nodes: 100,
            stall_ns: Some(1_000),
        })
    }

    const A: SpanId = [1; 8];
    const B: SpanId = [2; 8];
    const C: SpanId = [3; 8];

    #[test]
    fn a_root_with_an_injected_trace_starts_that_trace_and_a_conflict_is_counted() {
        let injected: TraceId = [7; 16];
        let mut g = graph();
        // A client span whose request carried `injected`, with no parent here.
        g.open(A, 0, 500, None);
        g.set_root_trace(A, injected);
        g.decide(A, Parent::Root);
        g.finish(span(A), (), 10);
        let out = g.take();
        assert_eq!(
            (out[0].0.trace_id, out[0].0.parent_span_id),
            (injected, None)
        );
        // One under a local parent in another trace: that parent wins, and it counts.
        g.open(B, 20, 500, None);
        g.decide(
            B,
            Parent::Remote {
                trace_id: [8; 16],
                span_id: [8; 8],
            },
        );
        g.open(C, 30, 500, None);
        g.set_root_trace(C, injected);
        g.decide(C, Parent::Node(B));
        g.finish(span(C), (), 40);
        assert_eq!(g.take()[0].0.trace_id, [8; 16]);
        assert_eq!(g.take_counts().inject_conflicts, 1);
    }

    #[test]
    fn children_wait_for_the_trace_of_their_root_and_share_it() {
        let mut g = graph();
        g.open(A, 0, 500, None);
        g.open(B, 10, 10, None);
        g.open(C, 20, 20, None);
        g.decide(B, Parent::Node(A));
        g.decide(C, Parent::Node(B));
        g.finish(span(C), (), 30);
        g.finish(span(B), (), 40);
        assert!(g.take().is_empty(), "A's parent is not decided yet");
        g.decide(A, Parent::Root);
        let out = g.take();
        assert_eq!(out.len(), 2);
        let trace = g.trace_of(&A).unwrap();
        let c = out.iter().find(|(s, _)| s.span_id == C).unwrap();
        let b = out.iter().find(|(s, _)| s.span_id == B).unwrap();
        assert_eq!((c.0.trace_id, c.0.parent_span_id), (trace, Some(B)));
        assert_eq!((b.0.trace_id, b.0.parent_span_id), (trace, Some(A)));
        g.finish(span(A), (), 50);
        let a = g.take();
        assert_eq!((a[0].0.trace_id, a[0].0.parent_span_id), (trace, None));
    }

    #[test]
    fn an_undecided_node_becomes_a_root_after_its_window_and_the_first_decision_stands() {
        let mut g = graph();
        g.open(A, 0, 100, None);
        g.finish(span(A), (), 10);
        g.tick(99, |_| ());
        assert!(g.take().is_empty());
        g.tick(100, |_| ());
        let out = g.take();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0.parent_span_id, None);
        assert_eq!(g.take_counts().undecided, 1);
        let remote = [7; 8];
        g.decide(
            A,
            Parent::Remote {
                trace_id: [5; 16],
                span_id: remote,
            },
        );
        assert_ne!(g.trace_of(&A), Some([5; 16]));
    }

    #[test]
    fn a_remote_parent_gives_its_trace_and_a_cycle_is_refused() {
        let mut g = graph();
        g.open(A, 0, 100, None);
        g.open(B, 0, 100, None);
        g.decide(B, Parent::Node(A));
        g.decide(A, Parent::Node(B));
        assert_eq!(g.take_counts().cycles, 1);
        assert!(g.trace_of(&A).is_some() && g.trace_of(&A) == g.trace_of(&B));
        g.open(C, 0, 100, None);
        g.decide(
            C,
            Parent::Remote {
                trace_id: [5; 16],
                span_id: [6; 8],
            },
        );
        g.finish(span(C), (), 1);
        let out = g.take();
        assert_eq!(
            (out[0].0.trace_id, out[0].0.parent_span_id),
            ([5; 16], Some([6; 8]))
        );
    }

    #[test]
    fn an_open_node_past_the_stall_timeout_gives_one_stalled_span_in_its_trace() {
        let mut g = graph();
        g.open(A, 0, 0, None);
        g.decide(A, Parent::Root);
        g.open(B, 100, 100, Some(Box::new(|| span(B))));
        g.decide(B, Parent::Node(A));
        g.tick(1_099, |_| ());
        assert!(g.take().is_empty());
        g.tick(1_100, |_| ());
        g.tick(5_000, |_| ());
        let out = g.take();
        assert_eq!(out.len(), 1, "one stalled span");
        let s = &out[0].0;
        assert_ne!(s.span_id, B);
        assert_eq!(
            (s.trace_id, s.parent_span_id),
            (g.trace_of(&A).unwrap(), Some(A))
        );
        assert_eq!(s.attribute(STALLED), Some(&crate::spans::Value::Bool(true)));
        g.finish(span(B), (), 6_000);
        assert_eq!(g.take()[0].0.span_id, B);
    }

    #[test]
    fn the_number_of_nodes_is_bounded_and_what_waits_goes_out() {
        let mut g = TraceGraph::new(GraphOptions {
            keep_ns: 100,
            max_nodes: 2,
            stall_ns: None,
        });
        g.open(A, 0, 1_000, None);
        g.finish(span(A), (), 1);
        g.open(B, 0, 1_000, None);
        g.open(C, 0, 1_000, None);
        assert_eq!(g.len(), 2);
        assert_eq!(g.take().len(), 1, "A went out when it was forgotten");
        assert_eq!(g.take_counts().evicted, 1);
    }

    #[test]
    fn a_child_that_starts_after_its_parent_finished_gets_its_trace_within_the_keep() {
        // keep_ns 100: generations of 25.
        let mut g = graph();
        g.open(A, 0, 500, None);
        g.decide(A, Parent::Root);
        g.finish(span(A), (), 10);
        let trace = g.take()[0].0.trace_id;
        assert_eq!(
            g.len(),
            0,
            "a finished node with its trace leaves for its record"
        );
        assert_eq!(g.settled.len(), 1);
        // Within the keep: the child is under A, in A's trace.
        g.tick(109, |_| ());
        g.open(B, 109, 500, None);
        g.decide(B, Parent::Node(A));
        g.finish(span(B), (), 109);
        let b = g.take();
        assert_eq!((b[0].0.trace_id, b[0].0.parent_span_id), (trace, Some(A)));
        // A generation past the keep, A is forgotten: the child starts a trace of its
        // own, as one whose parent was never seen, and nothing is counted.
        g.tick(10 + 100 + 25, |_| ());
        assert_eq!(g.trace_of(&A), None);
        g.open(C, 135, 500, None);
        g.decide(C, Parent::Node(A));
        g.finish(span(C), (), 135);
        let c = g.take();
        assert_eq!(c[0].0.parent_span_id, None);
        assert_ne!(c[0].0.trace_id, trace);
        assert_eq!(g.take_counts(), GraphCounts::default());
    }

    #[test]
    fn a_node_that_finished_before_its_trace_was_known_settles_when_it_is() {
        let mut g = graph();
        g.open(A, 0, 500, None);
        g.finish(span(A), (), 10);
        assert_eq!((g.len(), g.settled.len()), (1, 0), "A waits for its trace");
        g.decide(A, Parent::Root);
        assert_eq!((g.len(), g.settled.len()), (0, 1));
        let trace = g.take()[0].0.trace_id;
        g.open(B, 20, 500, None);
        g.decide(B, Parent::Node(A));
        assert_eq!(g.trace_of(&B), Some(trace));
    }

    #[test]
    fn finished_nodes_are_bounded_by_generation_and_the_newest_are_kept() {
        let mut g = TraceGraph::new(GraphOptions {
            keep_ns: 1_000,
            max_nodes: 8,
            stall_ns: None,
        });
        for i in 0..100u64 {
            let id = (i + 1).to_le_bytes();
            g.open(id, i, i, None);
            g.decide(id, Parent::Root);
            g.finish(span(id), (), i);
        }
        assert_eq!(g.take().len(), 100);
        assert!(g.settled.len() <= 10, "{} records", g.settled.len());
        assert!(g.trace_of(&100u64.to_le_bytes()).is_some());
        assert_eq!(g.trace_of(&1u64.to_le_bytes()), None);
    }

    #[test]
    fn what_is_kept_per_exchange_does_not_grow_with_the_exchanges_that_ended() {
        let mut g = graph();
        for i in 0..10_000u64 {
            let id = (i + 1).to_le_bytes();
            g.open(id, i, i + 50, Some(Box::new(move || span(id))));
            g.decide(id, Parent::Root);
            g.finish(span(id), (), i);
            if i % 100 == 0 {
                g.tick(i, |_| ());
            }
        }
        assert_eq!(g.take().len(), 10_000);
        assert_eq!(g.len(), 0);
        assert!(g.made.is_empty(), "decided nodes leave the deadlines");
        assert!(g.age.len() <= 2 * TRIM_SLACK && g.stalls.len() <= 2 * TRIM_SLACK);
        // keep_ns 100 at one exchange per ns: at most the keep and a generation.
        assert!(g.settled.len() <= 125, "{} records", g.settled.len());
    }

    #[test]
    fn a_finished_node_costs_33_bytes() {
        assert_eq!(SETTLED_NODE_BYTES, 33);
        // What it cost while it was kept whole, its Vecs' and stall template's heap aside.
        assert!(size_of::<(SpanId, Node<()>)>() >= 5 * SETTLED_NODE_BYTES);
    }
}
