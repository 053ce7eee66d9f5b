//! The user-space pipeline: decoded events in, finished spans out.
//!
//! events -> process registry -> connection table ([`crate::conn::table`]) -> stream
//! cursors -> protocol parser -> span builder -> context (linkers, trace graph, order
//! ids) -> sink. This module only orchestrates: it routes each event to its
//! connection, hands the bytes to the parser, gives each exchange that starts its span
//! id and its place in the trace graph ([`crate::context::trace`]), and turns what the
//! parser finished into spans, also when a connection ends with exchanges still open.
//! Programs a traced service runs while it handles a request become spans too
//! ([`process_spans`]). The same pipeline serves the live kernel and replays of
//! captures.

mod process_spans;

use crate::{FastMap, FastSet};
use std::{collections::VecDeque, net::IpAddr, sync::Arc, time::Duration};

use agent_common::{DataEvent, Direction, SockTuple, SyscallId};
use tracing::debug;

use crate::{
    conn::{
        ConnInfo, EndReason, Role,
        table::{self, ConnTable, DataSource, Ended},
    },
    context::{
        ConnKey, Linker, MessageKey, MessageLinker,
        injected::{Injected, Injections},
        inproc::{Found, InProcess},
        order::{OrderFill, order_id_of},
        trace::{GraphOptions, Parent, StallTemplate, TraceGraph},
        w3c::parse_traceparent,
    },
    events::{Event, direction},
    process::{Identified, ProcessQuery, ProcessRegistry},
    protocols::{
        Parsed, Started,
        amqp::AmqpOperation,
        detect::{ConnParser, Verdict},
        http::HttpExchange,
    },
    reassembly::Piece,
    sampling::Sampler,
    spans::{Resource, Span, SpanId, SpanKind, amqp::amqp_span, http::http_span, new_span_id},
    telemetry::Metrics,
};

/// Limits and timings of the pipeline.
#[derive(Clone, Debug)]
pub struct PipelineOptions {
    /// Most connections tracked at once; the least recently active go first (what is
    /// open on them becomes spans marked incomplete, `evicted`).
    pub max_connections: usize,
    /// A connection with no traffic for this long is forgotten (what is open on it
    /// becomes spans marked incomplete, `idle`).
    pub idle_timeout: Duration,
    /// How long a span waits for the other end of its connection.
    pub link_hold: Duration,
    /// Most spans waiting for their other end.
    pub max_pending_spans: usize,
    /// How long a RabbitMQ delivery waits for the publish that carried its message.
    pub message_hold: Duration,
    /// How long a publish is remembered for later deliveries (fan-out, redelivery).
    pub message_memory: Duration,
    /// Leave alone connections whose other end is one of this process's own sockets
    /// (the live agent's exports to a collector on the same node). Off for replays.
    pub exclude_own_sockets: bool,
    /// Hold every HTTP span for its other end, not only those whose peer is an address
    /// of this node: a replayed capture holds both ends of connections between
    /// any hosts.
    pub link_remote_peers: bool,
    /// Leave /proc to the discovery thread ([`ProcessRegistry::off_thread`]): new
    /// processes are queued in [`Pipeline::take_process_queries`] and named by
    /// [`Pipeline::identified`]. Off: /proc is read on the pipeline's thread (replays,
    /// tests).
    pub identify_off_thread: bool,
    /// Payload bytes the kernel copies per event: a message that starts further than
    /// this beyond the bytes seen would be missed without a window there.
    pub capture_cap: u64,
    /// A request still unanswered, a delivery still unacknowledged or a program still
    /// running after this long is shown while it hangs (a stalled span); `None`: never.
    pub stall_timeout: Option<Duration>,
    /// How long a span whose trace is known waits for the trace's order id.
    pub order_hold: Duration,
    /// Most bytes the spans waiting for their trace's order id may take
    /// ([`Span::held_bytes`]); the oldest leave early past it, counted.
    pub order_hold_max_bytes: usize,
    /// Business attribute rules (the config file's, then the defaults).
    pub business: Arc<crate::business::Rules>,
    /// Identity rules for naming processes (the config file's).
    pub processes: Arc<crate::selection::ProcessRules>,
    /// Which orders leave the node (the config file's `sampling:`, `--sample-ratio`).
    pub sampling: crate::sampling::SamplingConfig,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions {
            max_connections: 65536,
            idle_timeout: Duration::from_secs(600),
            link_hold: Duration::from_millis(1500),
            max_pending_spans: 100_000,
            message_hold: Duration::from_secs(3),
            message_memory: Duration::from_secs(120),
            exclude_own_sockets: true,
            link_remote_peers: false,
            identify_off_thread: false,
            capture_cap: agent_common::MAX_PAYLOAD as u64,
            stall_timeout: Some(Duration::from_secs(30)),
            order_hold: Duration::from_secs(1),
            order_hold_max_bytes: 32 << 20,
            business: Arc::default(),
            processes: Arc::default(),
            sampling: Default::default(),
        }
    }
}

/// Where finished spans go.
pub type Sink = Box<dyn FnMut(Span) + Send>;

/// `sink` behind the redactor: every span leaves the pipeline through it, whichever
/// exporter takes it.
fn redacting(redactor: crate::business::Redactor, metrics: Arc<Metrics>, mut sink: Sink) -> Sink {
    if !redactor.enabled() {
        return sink;
    }
    Box::new(move |mut span| {
        let changed = redactor.span(&mut span);
        if changed > 0 {
            Metrics::add(&metrics.values_redacted, changed);
        }
        sink(span);
    })
}

/// Where the next message of a connection's direction starts, when that lies more than
/// the capture cap beyond the bytes seen. The kernel then copies a window from there too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MessageStart {
    pub pid: u32,
    pub fd: u32,
    pub direction: Direction,
    /// The stream is a TLS library's plaintext.
    pub tls: bool,
    /// Stream offset of the message's (or frame's) first byte.
    pub offset: u64,
    /// The stream is AMQP 0-9-1 frames, which the kernel can follow on its own.
    pub amqp_frames: bool,
}

/// Told each new [`MessageStart`].
pub type MessageStartHook = Box<dyn FnMut(MessageStart) + Send>;

/// What the pipeline keeps per connection, beside what the connection table keeps.
struct Tracked {
    resource: Arc<Resource>,
    /// `None` once the connection is known to be none of ours or no parser's.
    parser: Option<ConnParser>,
    /// No parser understood the bytes (counted when the connection goes).
    unparsed: bool,
    /// Per direction, the stream offset last given to the message-start hook.
    announced: [Option<u64>; 2],
    /// Names the exchanges open on this connection in [`Pipeline::open`].
    uid: u64,
}

/// A call whose parent only its thread names (see [`Pipeline::claim`]).
struct Claim {
    child: SpanId,
    pid: u32,
    at_ns: u64,
    order_id: Option<String>,
}

/// Exchanges started on one connection and not finished yet: their span ids.
#[derive(Default)]
struct OpenExchanges {
    /// HTTP exchanges by their number on the connection.
    http: VecDeque<(u64, SpanId)>,
    /// Deliveries by (channel, delivery tag).
    deliveries: VecDeque<((u16, u64), SpanId)>,
    /// (time, thread) of the last writes, to tell which thread published a message.
    writers: VecDeque<(u64, u32)>,
}

/// Most exchanges remembered open per connection; beyond that the oldest are
/// abandoned (lost to a gap, they would never finish).
const MAX_OPEN_PER_CONN: usize = 256;
/// How long from a server connection's first event the client at its other end may
/// still turn out to be traced when no traced socket has its addresses: the client's
/// write can return, and its event reach the ring, after the server read the bytes.
const UNTRACED_PEER_GRACE_NS: u64 = 200_000_000;

/// What the pipeline does with a span once its trace is known.
#[derive(Debug)]
enum Then {
    /// Out (after the order-id hold).
    Out,
    /// A producer span: to the message linker, which links deliveries to it.
    Publish(MessageKey),
}

/// Who made an exchange's events: the process, the thread of the event, the connection.
#[derive(Clone, Copy)]
struct Origin<'a> {
    pid: u32,
    tid: u32,
    uid: u64,
    info: &'a ConnInfo,
    tls: bool,
    /// When the connection entry was made (its first event seen).
    since_ns: u64,
}

type Conn = table::Conn<Tracked>;

pub struct Pipeline {
    opts: PipelineOptions,
    registry: ProcessRegistry,
    conns: ConnTable<Tracked>,
    linker: Linker,
    messages: MessageLinker,
    graph: TraceGraph<Then>,
    /// Spans the graph gave, on their way (kept for the next time).
    ready: Vec<(Span, Then)>,
    inproc: InProcess,
    /// Calls whose parent only the thread names, by that parent: decided when it is
    /// answered (see context/inproc.rs).
    claims: FastMap<SpanId, Vec<Claim>>,
    orders: OrderFill<()>,
    /// `None` when everything is kept.
    sampler: Option<Sampler>,
    /// Exchanges open per connection uid.
    open: FastMap<u64, OpenExchanges>,
    next_uid: u64,
    /// Deliveries whose publish was not seen when they started: (key, span id, until).
    unlinked_deliveries: VecDeque<(MessageKey, SpanId, u64)>,
    /// Processes whose threads do not follow requests (Go): no thread evidence.
    goroutines: FastSet<u32>,
    programs: process_spans::Programs,
    own: OwnSockets,
    local_addrs: LocalAddrs,
    metrics: Arc<Metrics>,
    /// Add to a CLOCK_MONOTONIC time to get Unix time (both in ns).
    mono_to_unix_ns: i128,
    sink: Sink,
    last_ns: u64,
    last_conn_tick_ns: u64,
    on_message_start: Option<MessageStartHook>,
    /// Ids the kernel wrote into requests, for their client spans.
    injections: Injections,
}

impl Pipeline {
    pub fn new(opts: PipelineOptions, metrics: Arc<Metrics>, sink: Sink) -> Self {
        let sink = redacting(opts.business.redactor().clone(), metrics.clone(), sink);
        let (mut registry, sink) = if opts.identify_off_thread {
            ProcessRegistry::off_thread(sink, metrics.clone())
        } else {
            (ProcessRegistry::new(), sink)
        };
        registry.set_process_rules(opts.processes.clone());
        Pipeline {
            linker: Linker::new(opts.link_hold, opts.max_pending_spans),
            messages: MessageLinker::new(
                opts.message_hold,
                opts.message_memory,
                opts.max_pending_spans,
            ),
            conns: ConnTable::new(opts.max_connections),
            graph: TraceGraph::new(GraphOptions {
                keep_ns: 10_000_000_000,
                max_nodes: opts.max_pending_spans,
                stall_ns: opts.stall_timeout.map(|d| d.as_nanos() as u64),
            }),
            ready: Vec::new(),
            inproc: InProcess::new(2_000_000_000),
            claims: FastMap::default(),
            orders: OrderFill::new(
                opts.order_hold.as_nanos() as u64,
                opts.max_pending_spans,
                opts.order_hold_max_bytes,
            ),
            sampler: (!opts.sampling.keeps_all()).then(|| {
                Sampler::new(
                    &opts.sampling,
                    opts.stall_timeout,
                    opts.max_pending_spans,
                    metrics.clone(),
                )
            }),
            open: FastMap::default(),
            next_uid: 0,
            unlinked_deliveries: VecDeque::new(),
            goroutines: FastSet::default(),
            programs: process_spans::Programs::default(),
            opts,
            registry,
            own: OwnSockets::default(),
            local_addrs: LocalAddrs::read(),
            metrics,
            mono_to_unix_ns: mono_to_unix_offset(),
            sink,
            last_ns: 0,
            last_conn_tick_ns: 0,
            on_message_start: None,
            injections: Injections::new(65536, 30_000_000_000),
        }
    }

    /// Calls `hook` whenever a connection's next message starts further than the capture
    /// cap beyond the bytes seen (see [`MessageStartHook`]).
    pub fn set_message_start_hook(&mut self, hook: MessageStartHook) {
        self.on_message_start = Some(hook);
    }

    /// Handles one event.
    pub fn handle(&mut self, event: Event<'_>) {
        Metrics::inc(&self.metrics.events_seen);
        let h = *event.header();
        self.last_ns = self.last_ns.max(h.ts_ns);
        match event {
            Event::Data { data, payload, .. } => {
                Metrics::add(&self.metrics.bytes_seen, data.len);
                let tls = SyscallId::is_tls(data.syscall);
                let metrics = Arc::clone(&self.metrics);
                let (hooked, cap) = (self.on_message_start.is_some(), self.opts.capture_cap);
                let conn = self.conn(h.tgid, h.fd, &data.tuple, h.ts_ns);
                match conn.data_event(tls, h.ts_ns) {
                    DataSource::Ignore => return,
                    DataSource::SwitchedToTls => {
                        conn.state.parser = Some(ConnParser::new());
                        conn.state.announced = [None; 2];
                    }
                    DataSource::Parse => {}
                }
                let dir = direction(data.direction);
                let uid = conn.state.uid;
                Self::feed(conn, dir, &data, payload, &metrics);
                let start = hooked
                    .then(|| Self::next_message_start(conn, dir, cap))
                    .flatten();
                if let (Some((tls, offset, amqp_frames)), Some(hook)) =
                    (start, self.on_message_start.as_mut())
                {
                    hook(MessageStart {
                        pid: h.tgid,
                        fd: h.fd,
                        direction: dir,
                        tls,
                        offset,
                        amqp_frames,
                    });
                }
                if dir == Direction::Egress {
                    let w = &mut self.open.entry(uid).or_default().writers;
                    if w.len() >= 32 {
                        w.pop_front();
                    }
                    w.push_back((h.ts_ns, h.tid));
                }
                self.after_parse(h.tgid, h.tid, h.fd, h.ts_ns);
            }
            Event::Connect { tuple, .. } | Event::Accept { tuple, .. } => {
                // A new connection on this descriptor: whatever was there is over.
                self.close(h.tgid, h.fd, h.ts_ns);
                self.conn(h.tgid, h.fd, &tuple, h.ts_ns).from_start = true;
            }
            Event::Close { .. } => self.close(h.tgid, h.fd, h.ts_ns),
            Event::OwnConnect { tuple, .. } => self.own_connect(&tuple),
            Event::OwnClose { tuple, .. } => self.own.closed(tuple.sport),
            Event::Exec {
                comm,
                args,
                env,
                parent_tgid,
                parent_tid,
                ..
            } => {
                self.registry.exec(h.tgid, &comm, &args, &env);
                self.program_started(h.tgid, h.ts_ns, &comm, &args, (parent_tgid, parent_tid));
            }
            Event::Inject {
                tuple,
                seq,
                channel,
                trace_id,
                span_id,
                ..
            } => {
                let info = ConnInfo::from_tuple(&tuple);
                let ids = Injected { trace_id, span_id };
                self.injections
                    .record(info.local, info.remote, seq, channel, ids, h.ts_ns);
            }
            Event::Exit { exit_code, .. } => {
                for ended in self.conns.remove_process(h.tgid) {
                    self.end(ended, h.ts_ns);
                }
                self.program_ended(h.tgid, h.ts_ns, exit_code);
                self.inproc.remove_process(h.tgid);
                self.goroutines.remove(&h.tgid);
                self.registry.exit(h.tgid);
            }
        }
    }

    /// Hands one data event's bytes to the connection's parser, in stream order.
    fn feed(conn: &mut Conn, dir: Direction, data: &DataEvent, payload: &[u8], metrics: &Metrics) {
        let Some(parser) = conn.state.parser.as_mut() else {
            return;
        };
        if !conn.fed {
            conn.fed = true;
            if !conn.from_start {
                parser.resync(Direction::Ingress);
                parser.resync(Direction::Egress);
            }
        }
        let cursor = match dir {
            Direction::Ingress => &mut conn.ingress,
            Direction::Egress => &mut conn.egress,
        };
        // Stream offset of the next piece.
        let mut at = cursor.next_offset();
        for piece in cursor.advance(data.offset, data.len, payload).pieces() {
            match piece {
                Piece::Data(bytes) => {
                    parser.feed(dir, bytes, data.header.ts_ns);
                    at = at.saturating_add(bytes.len() as u64);
                }
                Piece::Gap(n) => {
                    Metrics::add(&metrics.bytes_skipped, n);
                    let expected = parser.next_message_in(dir).map(|m| at.saturating_add(m));
                    let was_in_sync = parser.in_sync(dir);
                    parser.skip(dir, n, data.header.ts_ns);
                    if expected.is_some_and(|x| x >= at && x < at.saturating_add(n))
                        && was_in_sync
                        && !parser.in_sync(dir)
                    {
                        // A message started inside the bytes that were not captured.
                        Metrics::inc(&metrics.message_starts_missed);
                    }
                    at = at.saturating_add(n);
                }
                Piece::Resync => {
                    parser.resync(dir);
                    at = data.offset;
                }
            }
        }
    }

    /// Where the next message of `dir` starts (whether the stream is TLS plaintext, and
    /// the stream offset), when the parser knows, it lies beyond what the kernel copies
    /// anyway, and it was not told before.
    fn next_message_start(
        conn: &mut Conn,
        dir: Direction,
        capture_cap: u64,
    ) -> Option<(bool, u64, bool)> {
        let parser = conn.state.parser.as_ref()?;
        let ahead = parser.next_message_in(dir)?;
        let amqp_frames = parser.kernel_follows_frames();
        let offset = conn.cursor(dir).next_offset().saturating_add(ahead);
        let announced = &mut conn.state.announced[dir.index()];
        if ahead <= capture_cap || *announced == Some(offset) {
            return None;
        }
        *announced = Some(offset);
        Some((conn.tls, offset, amqp_frames))
    }

    /// The agent connected a socket of its own: a connection on this node whose peer
    /// it is, accepted before this event arrived, stops being traced.
    fn own_connect(&mut self, tuple: &SockTuple) {
        self.own.opened(tuple.sport);
        if !self.opts.exclude_own_sockets {
            return;
        }
        let own = ConnInfo::from_tuple(tuple);
        for (_, conn) in self.conns.iter_mut() {
            if conn.info.remote == own.local && conn.info.local == own.remote {
                debug!(peer = %conn.info.remote, "connection from the agent itself; no longer traced");
                conn.state.parser = None;
            }
        }
    }

    /// Sets the clock offset added to event times to get Unix times; replays of
    /// captures, whose times are Unix times already, set 0.
    pub fn set_mono_to_unix(&mut self, offset_ns: i128) {
        self.mono_to_unix_ns = offset_ns;
    }

    /// Names a process that has no /proc entry to read (replayed captures).
    pub fn register_process(&mut self, pid: u32, resource: Resource) {
        self.registry.insert(pid, resource);
    }

    /// Processes to name from /proc (new ones, and those that started a new program)
    /// since the last call, for the discovery thread.
    pub fn take_process_queries(&mut self) -> Vec<ProcessQuery> {
        self.registry.take_queries()
    }

    /// The discovery thread named a process.
    pub fn identified(&mut self, answer: Identified) {
        self.registry.identified(answer);
    }

    /// Processes with connections now.
    pub fn active_processes(&self) -> Vec<u32> {
        self.conns.pids()
    }

    /// Periodic work: release spans that waited long enough, forget idle connections.
    /// `now_ns` is CLOCK_MONOTONIC.
    pub fn tick(&mut self, now_ns: u64) {
        self.registry.tick();
        self.linker.expire(now_ns);
        for span in self.messages.expire(now_ns) {
            self.leaving_messages(span, now_ns);
        }
        while self
            .unlinked_deliveries
            .front()
            .is_some_and(|(_, _, until)| *until <= now_ns)
        {
            self.unlinked_deliveries.pop_front();
        }
        let metrics = Arc::clone(&self.metrics);
        self.graph.tick(now_ns, |_| {
            Metrics::inc(&metrics.spans_stalled);
            Then::Out
        });
        let counts = self.graph.take_counts();
        Metrics::add(
            &self.metrics.parent_undecided,
            counts.undecided + counts.evicted + counts.cycles,
        );
        Metrics::add(&self.metrics.inject_conflicts, counts.inject_conflicts);
        self.injections.expire(now_ns);
        Metrics::add(
            &self.metrics.inject_unmatched,
            self.injections.take_unmatched(),
        );
        self.inproc.expire(now_ns);
        if !self.claims.is_empty() {
            let graph = &self.graph;
            self.claims.retain(|_, claims| {
                claims.retain(|c| graph.undecided(&c.child));
                !claims.is_empty()
            });
        }
        self.pump(now_ns);
        let mut out = Vec::new();
        self.orders.release(now_ns, &mut out);
        Metrics::add(&self.metrics.order_holds_cut, self.orders.take_cut());
        if let Some(sampler) = &mut self.sampler {
            sampler.expire(now_ns);
        }
        self.leave(out, now_ns);
        // Parsers that wait for time (AMQP publishes waiting for a possible
        // basic.return) finish on idle connections; once a second is plenty.
        if now_ns.saturating_sub(self.last_conn_tick_ns) >= 1_000_000_000 {
            self.last_conn_tick_ns = now_ns;
            let mut finished = Vec::new();
            for (key, conn) in self.conns.iter_mut() {
                if let Some(p) = conn.state.parser.as_mut() {
                    p.tick(now_ns);
                    let parsed = p.take();
                    if !parsed.is_empty() {
                        finished.push((key, parsed));
                    }
                }
            }
            for ((tgid, fd), parsed) in finished {
                if let Some(conn) = self.conns.get_mut(tgid, fd) {
                    let (info, resource, tls) = (conn.info, conn.state.resource.clone(), conn.tls);
                    let origin = Origin {
                        pid: tgid,
                        tid: 0,
                        uid: conn.state.uid,
                        info: &info,
                        tls,
                        since_ns: conn.first_ns,
                    };
                    self.emit_parsed(parsed, origin, &resource, now_ns);
                }
            }
        }
        let idle = self
            .conns
            .remove_idle(now_ns, self.opts.idle_timeout.as_nanos() as u64);
        if !idle.is_empty() {
            debug!(forgotten = idle.len(), "idle connections forgotten");
        }
        for ended in idle {
            self.end(ended, now_ns);
        }
        self.metrics.connections_tracked.store(
            self.conns.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        self.metrics.spans_waiting.store(
            (self.linker.len()
                + self.messages.waiting_len()
                + self.graph.len()
                + self.orders.len()
                + self.sampler.as_ref().map_or(0, Sampler::len)) as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// Ends everything at shutdown: open exchanges become spans marked incomplete
    /// (`agent_stop`), waiting spans go out.
    pub fn finish(&mut self) {
        self.finish_for(EndReason::AgentStop);
    }

    /// As [`Pipeline::finish`], at the end of a replayed capture (`capture_end`).
    pub fn finish_capture(&mut self) {
        self.finish_for(EndReason::CaptureEnd);
    }

    fn finish_for(&mut self, reason: EndReason) {
        let now = self.last_ns;
        for ended in self.conns.remove_all(reason) {
            self.end(ended, now);
        }
        self.programs_end_all(now);
        for span in self.messages.drain() {
            self.leaving_messages(span, now);
        }
        for (span, then) in self.graph.drain() {
            self.route(span, then, now);
        }
        for span in self.messages.drain() {
            self.leaving_messages(span, now);
        }
        for (span, then) in self.graph.drain() {
            self.route(span, then, now);
        }
        let mut out = Vec::new();
        self.orders.drain(&mut out);
        self.leave(out, now);
        if let Some(sampler) = &mut self.sampler {
            sampler.drain();
        }
        self.registry.finish();
    }

    /// The connection on (`tgid`, `fd`) for an event about `tuple`, made if new;
    /// connections that had to go to make room or whose descriptor was reused end.
    fn conn(&mut self, tgid: u32, fd: u32, tuple: &SockTuple, ts_ns: u64) -> &mut Conn {
        let mut ended = Vec::new();
        let before = self.conns.len();
        let (own, local_addrs, registry) =
            (&mut self.own, &mut self.local_addrs, &mut self.registry);
        let exclude_own = self.opts.exclude_own_sockets;
        let next_uid = &mut self.next_uid;
        self.conns.lookup(tgid, fd, tuple, ts_ns, &mut ended, |info| {
            let ours = exclude_own && local_addrs.peer_is_local(info) && own.is_ours(info);
            if ours {
                debug!(pid = tgid, fd, peer = %info.remote, "connection from the agent itself; not traced");
            }
            Tracked {
                resource: registry.resource(tgid),
                parser: (!ours).then(ConnParser::new),
                unparsed: false,
                announced: [None; 2],
                uid: {
                    *next_uid += 1;
                    *next_uid
                },
            }
        });
        let grew = self.conns.len() != before || !ended.is_empty();
        for e in ended {
            self.end(e, ts_ns);
        }
        if grew {
            self.metrics.connections_tracked.store(
                self.conns.len() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        self.conns
            .get_mut(tgid, fd)
            .expect("the lookup above made it and ending others leaves it")
    }

    fn close(&mut self, tgid: u32, fd: u32, ts_ns: u64) {
        if let Some(ended) = self.conns.remove(tgid, fd, EndReason::ConnectionClosed) {
            self.end(ended, ts_ns);
        }
    }

    /// A connection left the table at `ts_ns`: what its parser still holds becomes
    /// spans, and what started on it but will never finish is abandoned. If no parser
    /// understood it and it was not TLS (whose handshake goes by as ciphertext before
    /// the plaintext comes), it counts as a parse failure; counted at the end so that
    /// HTTPS does not count.
    fn end(&mut self, ended: Ended<Tracked>, ts_ns: u64) {
        let table::Ended {
            mut conn,
            reason,
            pid,
            ..
        } = ended;
        if reason == EndReason::Evicted {
            Metrics::inc(&self.metrics.connections_evicted);
        }
        if let Some(parser) = conn.state.parser.as_mut() {
            parser.close(ts_ns, reason);
            let parsed = parser.take();
            if !parsed.is_empty() {
                let origin = Origin {
                    pid,
                    tid: 0,
                    uid: conn.state.uid,
                    info: &conn.info,
                    tls: conn.tls,
                    since_ns: conn.first_ns,
                };
                let resource = conn.state.resource.clone();
                self.emit_parsed(parsed, origin, &resource, ts_ns);
            }
        }
        if let Some(open) = self.open.remove(&conn.state.uid) {
            let ids = open.http.into_iter().map(|(_, id)| id);
            for id in ids.chain(open.deliveries.into_iter().map(|(_, id)| id)) {
                self.graph.abandon(id, ts_ns);
                self.ended_incoming(pid, id, ts_ns, 0);
            }
        }
        if conn.state.unparsed && !conn.tls {
            Metrics::inc(&self.metrics.parse_failures);
        }
    }

    /// Turns what the parser finished into spans; gives up on connections that no
    /// parser understands.
    fn after_parse(&mut self, tgid: u32, tid: u32, fd: u32, now_ns: u64) {
        let Some(conn) = self.conns.get_mut(tgid, fd) else {
            return;
        };
        let Some(parser) = conn.state.parser.as_mut() else {
            return;
        };
        let parsed = parser.take();
        if parser.verdict() == Verdict::Unknown {
            debug!(pid = tgid, fd, peer = %conn.info.remote, "connection is neither HTTP/1.x, HTTP/2 nor AMQP 0-9-1; ignored");
            conn.state.unparsed = true;
            conn.state.parser = None;
        }
        if parsed.is_empty() {
            return;
        }
        let info = conn.info;
        let resource = conn.state.resource.clone();
        let origin = Origin {
            pid: tgid,
            tid,
            uid: conn.state.uid,
            info: &info,
            tls: conn.tls,
            since_ns: conn.first_ns,
        };
        self.emit_parsed(parsed, origin, &resource, now_ns);
    }

    fn emit_parsed(
        &mut self,
        parsed: Vec<Parsed>,
        origin: Origin<'_>,
        resource: &Arc<Resource>,
        now_ns: u64,
    ) {
        for item in parsed {
            match item {
                Parsed::Started(Started::Http {
                    seq,
                    role,
                    request,
                    body,
                    start_ns,
                }) => {
                    let ex = HttpExchange::started(role, seq, request, start_ns);
                    self.http_started(ex, &body, origin, resource.clone(), now_ns);
                }
                Parsed::Started(Started::Delivery { delivery, settled }) => {
                    self.delivery_started(*delivery, settled, origin, resource.clone(), now_ns)
                }
                Parsed::Http(ex) => self.emit_http(&ex, origin, resource.clone(), now_ns),
                Parsed::Amqp(op) => self.emit_amqp(&op, origin, resource.clone(), now_ns),
            }
        }
        self.pump(now_ns);
    }

    /// Whether the threads of process `pid` follow its requests (not Go's).
    fn threads(&mut self, pid: u32) -> bool {
        if self.goroutines.contains(&pid) {
            return false;
        }
        let go = self.registry.resource(pid).attributes.iter().any(|kv| {
            kv.key == crate::process::RUNTIME_NAME
                && kv.value == crate::spans::Value::Str("go".into())
        });
        if go {
            self.goroutines.insert(pid);
        }
        !go
    }

    /// Marks process `pid` as one whose threads do not follow its requests (a Go
    /// program: goroutines move between threads), so that threads are no evidence.
    pub fn set_goroutines(&mut self, pid: u32) {
        self.goroutines.insert(pid);
    }

    /// The in-process parent of a call `pid` made at `at_ns` on `tid`, counted when
    /// ambiguous.
    fn in_process_parent(
        &mut self,
        pid: u32,
        tid: u32,
        at_ns: u64,
        order_id: Option<&str>,
    ) -> Found {
        // In a Go program the probes put the goroutine where the thread id would be
        // (when they could follow it): that is evidence as a thread is elsewhere.
        let threads = self.threads(pid) || agent_common::is_goroutine_id(tid);
        self.inproc.find(pid, tid, at_ns, order_id, threads)
    }

    /// Decides a call's parent from the in-process evidence, for good: ambiguous
    /// evidence leaves it a root, counted.
    fn decide_in_process(&mut self, id: SpanId, found: Found) {
        let parent = match found {
            Found::Parent(p) | Found::ByThread(p) => Parent::Node(p),
            Found::Nothing => Parent::Root,
            Found::Ambiguous => {
                Metrics::inc(&self.metrics.parent_ambiguous);
                Parent::Root
            }
        };
        self.graph.decide(id, parent);
    }

    /// Call `child` (made by `pid` at `at_ns`) has `parent` only by its thread: decided
    /// when `parent` is answered; should that not happen within the decision window,
    /// the thread stands.
    fn claim(
        &mut self,
        parent: SpanId,
        child: SpanId,
        pid: u32,
        at_ns: u64,
        order_id: Option<String>,
    ) {
        let claims = self.claims.entry(parent).or_default();
        if claims.iter().any(|c| c.child == child) {
            return;
        }
        claims.push(Claim {
            child,
            pid,
            at_ns,
            order_id,
        });
        self.graph.set_fallback(child, Parent::Node(parent));
    }

    /// Incoming exchange `id` of `pid` ended, answered by thread `answered_by` (0: not
    /// known): the calls its thread claimed for it are decided.
    fn ended_incoming(&mut self, pid: u32, id: SpanId, end_ns: u64, answered_by: u32) {
        let own = self.inproc.end(pid, id, end_ns, answered_by);
        let Some(claims) = self.claims.remove(&id) else {
            return;
        };
        for c in claims {
            if own {
                self.graph.decide(c.child, Parent::Node(id));
            } else {
                // Another thread answered: the thread that made the call was working
                // for some other request. What else is there decides.
                let found = self
                    .inproc
                    .find(c.pid, 0, c.at_ns, c.order_id.as_deref(), false);
                self.decide_in_process(c.child, found);
            }
        }
    }

    /// An HTTP request was read (server) or written (client) whole: its span id, its
    /// node in the trace graph, and what decides its parent.
    fn http_started(
        &mut self,
        ex: HttpExchange,
        body: &[u8],
        origin: Origin<'_>,
        resource: Arc<Resource>,
        now_ns: u64,
    ) {
        // A request the kernel wrote a traceparent into: its span has those ids.
        let injected = (ex.role == Role::Client)
            .then(|| {
                self.injections
                    .take(origin.info.local, origin.info.remote, ex.seq, 0)
            })
            .flatten();
        let id = injected.map_or_else(new_span_id, |i| i.span_id);
        let open = self.open.entry(origin.uid).or_default();
        if open.http.len() >= MAX_OPEN_PER_CONN
            && let Some((_, old)) = open.http.pop_front()
        {
            self.graph.abandon(old, now_ns);
        }
        open.http.push_back((ex.seq, id));
        let order_id = order_id_of(&ex.request, body);
        let traceparent = ex.request.header("traceparent").and_then(parse_traceparent);
        let request = Arc::clone(&ex.request);
        let (role, start_ns) = (ex.role, ex.request_start_ns);
        let stall = self.opts.stall_timeout.is_some().then(|| {
            // Built only if the exchange hangs; with the business attributes the request
            // has shown so far (its order id), so that a hanging order is found by its id
            // while it hangs.
            // The exchange as it started is not needed past this point: moved, not copied.
            let mut head = ex;
            if head.request_body.is_empty() {
                head.request_body = body.to_vec();
            }
            let (info, tls, mono) = (*origin.info, origin.tls, self.mono_to_unix_ns);
            let rules = Arc::clone(&self.opts.business);
            Box::new(move || {
                let mut span = http_span(&head, &info, resource, mono, tls);
                crate::business::annotate_http(&rules, &head, &mut span);
                span
            }) as StallTemplate
        });
        let hold_ns = self.opts.link_hold.as_nanos() as u64;
        let mut peer_here =
            self.opts.link_remote_peers || self.local_addrs.peer_is_local(origin.info);
        // A server whose client end is no socket traced here (a local client outside
        // the traced cgroup or excluded, a load balancer on the node) will never see
        // that end's start: past the connection's first moments (when the client's
        // first event may still be on its way), its spans do not wait for it. Holding
        // each for the whole hold cost memory and CPU in proportion to the rate.
        let mut server_hold_ns = hold_ns;
        if peer_here
            && role == Role::Server
            && !self.conns.has_addrs(origin.info.remote, origin.info.local)
        {
            let grace_end = origin.since_ns.saturating_add(UNTRACED_PEER_GRACE_NS);
            if now_ns >= grace_end {
                peer_here = false;
            } else {
                server_hold_ns = server_hold_ns.min(grace_end - now_ns);
            }
        }
        // A call whose parent only its finished request can tell (an order id in a body
        // not fully seen yet) may wait for it as long as a stall would take.
        let client_wait = self
            .opts
            .stall_timeout
            .unwrap_or(Duration::from_secs(30))
            .as_nanos() as u64;
        let decide_by = match role {
            Role::Server => now_ns.saturating_add(server_hold_ns),
            Role::Client => now_ns.saturating_add(client_wait),
        };
        self.graph.open(id, start_ns, decide_by, stall);
        if let Some(i) = injected {
            self.graph.set_root_trace(id, i.trace_id);
        }
        if let Some((trace_id, span_id, flags)) = traceparent {
            self.graph.decide(id, Parent::Remote { trace_id, span_id });
            if let Some(sampler) = &mut self.sampler {
                sampler.parent_flags(trace_id, flags);
            }
        }
        let key = ConnKey::new(role, origin.info.local, origin.info.remote);
        match role {
            Role::Server => {
                self.inproc
                    .begin(origin.pid, origin.tid, id, start_ns, order_id);
                if !peer_here {
                    self.graph.decide(id, Parent::Root);
                } else if let Some(j) =
                    self.linker
                        .offer(role, id, key, &request.method, &request.target, now_ns)
                {
                    self.graph.decide(j.server, Parent::Node(j.client));
                }
            }
            Role::Client => {
                match self.in_process_parent(origin.pid, origin.tid, start_ns, order_id.as_deref())
                {
                    Found::Parent(p) => self.graph.decide(id, Parent::Node(p)),
                    Found::ByThread(p) => self.claim(p, id, origin.pid, start_ns, order_id),
                    Found::Nothing => self.graph.decide(id, Parent::Root),
                    // Decided when the exchange finishes, with what it carried by then.
                    Found::Ambiguous => {}
                }
                if peer_here
                    && let Some(j) =
                        self.linker
                            .offer(role, id, key, &request.method, &request.target, now_ns)
                {
                    self.graph.decide(j.server, Parent::Node(j.client));
                }
            }
        }
    }

    /// A consumer received a delivery: its span id, its node, and its parent when the
    /// publish is known already.
    fn delivery_started(
        &mut self,
        delivery: crate::protocols::amqp::Delivery,
        settled: bool,
        origin: Origin<'_>,
        resource: Arc<Resource>,
        now_ns: u64,
    ) {
        let id = new_span_id();
        let open = self.open.entry(origin.uid).or_default();
        if open.deliveries.len() >= MAX_OPEN_PER_CONN
            && let Some((_, old)) = open.deliveries.pop_front()
        {
            self.graph.abandon(old, now_ns);
        }
        open.deliveries
            .push_back(((delivery.channel, delivery.delivery_tag), id));
        let start_ns = delivery.start_ns;
        let order_id = crate::context::order::order_id_of_json(&delivery.message.body);
        let traceparent = delivery
            .message
            .properties
            .header("traceparent")
            .and_then(parse_traceparent);
        if let Some(sampler) = &mut self.sampler
            && let Some((trace_id, _, flags)) = traceparent
        {
            sampler.parent_flags(trace_id, flags);
        }
        let op = AmqpOperation::Delivery(delivery);
        let key = MessageKey::of(&op);
        let stall = self.opts.stall_timeout.and_then(|_| {
            let mut span = amqp_span(&op, origin.info, resource, self.mono_to_unix_ns)?;
            crate::business::annotate_amqp(&self.opts.business, &op, &mut span);
            Some(Box::new(move || span) as StallTemplate)
        });
        let hold_ns = self.opts.message_hold.as_nanos() as u64;
        self.graph
            .open(id, start_ns, now_ns.saturating_add(hold_ns), stall);
        // Its processing lasts until the ack; with no ack to wait for, it is not known
        // (no calls are put under it).
        self.inproc
            .begin(origin.pid, origin.tid, id, start_ns, order_id);
        if settled {
            self.ended_incoming(origin.pid, id, start_ns, 0);
        }
        match key.as_ref().and_then(|k| self.messages.peek_producer(k)) {
            Some((trace_id, span_id)) => {
                self.graph.decide(id, Parent::Remote { trace_id, span_id })
            }
            None => {
                // A publish from another node is never seen here: unless it is seen
                // before the hold ends, the message's traceparent (the producer span
                // the other node's agent wrote, or the publisher's own) is the parent.
                if let Some((trace_id, span_id, _)) = traceparent {
                    self.graph
                        .set_fallback(id, Parent::Remote { trace_id, span_id });
                }
                if let Some(k) = key {
                    if self.unlinked_deliveries.len() >= self.opts.max_pending_spans {
                        self.unlinked_deliveries.pop_front();
                    }
                    self.unlinked_deliveries
                        .push_back((k, id, now_ns.saturating_add(hold_ns)));
                }
            }
        }
    }

    fn emit_http(
        &mut self,
        ex: &HttpExchange,
        origin: Origin<'_>,
        resource: Arc<Resource>,
        now_ns: u64,
    ) {
        let mut span = http_span(ex, origin.info, resource, self.mono_to_unix_ns, origin.tls);
        crate::business::annotate_http(&self.opts.business, ex, &mut span);
        Metrics::inc(&self.metrics.spans_built);
        let open = self.open.entry(origin.uid).or_default();
        let id = open
            .http
            .iter()
            .position(|(seq, _)| *seq == ex.seq)
            .and_then(|i| open.http.remove(i))
            .map(|(_, id)| id);
        if let Some(id) = id {
            span.span_id = id;
            match ex.role {
                Role::Server => {
                    let (end, answered_by) = if ex.response.is_some() {
                        let by = self.writer_at(origin.uid, ex.response_start_ns);
                        (ex.response_end_ns, by)
                    } else {
                        (ex.request_end_ns, 0)
                    };
                    self.ended_incoming(origin.pid, id, end, answered_by);
                }
                Role::Client if self.graph.undecided(&id) => {
                    let order_id = order_id_of(&ex.request, &ex.request_body);
                    let tid = self.writer_at(origin.uid, ex.request_start_ns);
                    let found = self.in_process_parent(
                        origin.pid,
                        tid,
                        ex.request_start_ns,
                        order_id.as_deref(),
                    );
                    match found {
                        Found::ByThread(p) => {
                            self.claim(p, id, origin.pid, ex.request_start_ns, order_id)
                        }
                        found => self.decide_in_process(id, found),
                    }
                }
                Role::Client => {}
            }
        }
        self.graph.finish(span, Then::Out, now_ns);
    }

    /// The thread that wrote on connection `uid` at (or last before) `at_ns`; 0 when
    /// not known.
    fn writer_at(&self, uid: u64, at_ns: u64) -> u32 {
        self.open
            .get(&uid)
            .and_then(|o| o.writers.iter().rev().find(|(ts, _)| *ts <= at_ns))
            .map_or(0, |(_, tid)| *tid)
    }

    fn emit_amqp(
        &mut self,
        op: &AmqpOperation,
        origin: Origin<'_>,
        resource: Arc<Resource>,
        now_ns: u64,
    ) {
        if let AmqpOperation::Dispatch(d) = op {
            // The broker sent a delivery: counted on its broker span, makes none itself.
            if let Some(key) = MessageKey::of(op) {
                let sent = (i128::from(d.end_ns) + self.mono_to_unix_ns)
                    .clamp(0, i128::from(u64::MAX)) as u64;
                self.messages.offer_dispatch(key, sent, now_ns);
            }
            return;
        }
        let Some(mut span) = amqp_span(op, origin.info, resource, self.mono_to_unix_ns) else {
            return;
        };
        crate::business::annotate_amqp(&self.opts.business, op, &mut span);
        Metrics::inc(&self.metrics.spans_built);
        let key = MessageKey::of(op);
        match op {
            AmqpOperation::Publish(p) if p.role == Role::Client => {
                // A publish the kernel wrote a traceparent into: its span has those ids.
                let injected = self.injections.take(
                    origin.info.local,
                    origin.info.remote,
                    p.number,
                    p.channel as u32,
                );
                if let Some(i) = injected {
                    span.span_id = i.span_id;
                }
                // A publish: under what its process was handling when it was written.
                let id = span.span_id;
                self.graph.open(id, p.start_ns, now_ns, None);
                if let Some(i) = injected {
                    self.graph.set_root_trace(id, i.trace_id);
                }
                if let Some(span_id) = span.parent_span_id {
                    let trace_id = span.trace_id;
                    self.graph.decide(id, Parent::Remote { trace_id, span_id });
                }
                let tid = self.writer_at(origin.uid, p.start_ns);
                let order_id = crate::context::order::order_id_of_json(&p.message.body);
                let found =
                    self.in_process_parent(origin.pid, tid, p.start_ns, order_id.as_deref());
                self.decide_in_process(id, found);
                let then = key.map_or(Then::Out, Then::Publish);
                self.graph.finish(span, then, now_ns);
            }
            AmqpOperation::Delivery(d) if d.role == Role::Client => {
                let open = self.open.entry(origin.uid).or_default();
                let tag = (d.channel, d.delivery_tag);
                if let Some(i) = open.deliveries.iter().position(|(k, _)| *k == tag) {
                    let (_, id) = open.deliveries.remove(i).expect("found");
                    span.span_id = id;
                    self.ended_incoming(origin.pid, id, d.end_ns, 0);
                }
                match key {
                    Some(key) => {
                        for s in self.messages.offer(span, key, now_ns) {
                            self.leaving_messages(s, now_ns);
                        }
                    }
                    None => self.leaving_messages(span, now_ns),
                }
            }
            _ => match key {
                Some(key) => {
                    for s in self.messages.offer(span, key, now_ns) {
                        self.leaving_messages(s, now_ns);
                    }
                }
                None => self.hold(span, now_ns),
            },
        }
    }

    /// A span leaves the message linker: a consumer span goes to its node (its parent
    /// decided by the link, unless decided when it started), anything else out.
    fn leaving_messages(&mut self, span: Span, now_ns: u64) {
        if span.kind == SpanKind::Consumer && self.graph.undecided(&span.span_id) {
            let parent = match span.parent_span_id {
                Some(span_id) => Parent::Remote {
                    trace_id: span.trace_id,
                    span_id,
                },
                None => Parent::Root,
            };
            self.graph.decide(span.span_id, parent);
        }
        if span.kind == SpanKind::Consumer {
            self.graph.finish(span, Then::Out, now_ns);
        } else {
            self.hold(span, now_ns);
        }
    }

    /// Spans whose trace the graph now knows, on their way.
    fn pump(&mut self, now_ns: u64) {
        let mut ready = std::mem::take(&mut self.ready);
        loop {
            self.graph.take_into(&mut ready);
            if ready.is_empty() {
                break;
            }
            for (span, then) in ready.drain(..) {
                self.route(span, then, now_ns);
            }
        }
        self.ready = ready;
    }

    fn route(&mut self, span: Span, then: Then, now_ns: u64) {
        match then {
            Then::Out => self.hold(span, now_ns),
            Then::Publish(key) => {
                // Deliveries that started before this publish was seen: now linked.
                let (trace_id, span_id) = (span.trace_id, span.span_id);
                let mut linked = Vec::new();
                self.unlinked_deliveries.retain(|(k, id, _)| {
                    let same = k.same_message(&key);
                    if same {
                        linked.push(*id);
                    }
                    !same
                });
                for id in linked {
                    self.graph.decide(id, Parent::Remote { trace_id, span_id });
                }
                for s in self.messages.offer(span, key, now_ns) {
                    self.leaving_messages(s, now_ns);
                }
            }
        }
    }

    /// The last stages before the sink: the order-id hold, then sampling.
    fn hold(&mut self, span: Span, now_ns: u64) {
        let mut out = Vec::new();
        self.orders.push(span, (), now_ns, &mut out);
        self.leave(out, now_ns);
    }

    /// Spans past the order-id hold: through the sampler, if any, to the sink.
    fn leave(&mut self, spans: Vec<(Span, ())>, now_ns: u64) {
        let Some(sampler) = &mut self.sampler else {
            for (span, ()) in spans {
                (self.sink)(span);
            }
            return;
        };
        let mut out = Vec::new();
        for (span, ()) in spans {
            sampler.push(span, now_ns, &mut out);
        }
        for span in out {
            (self.sink)(span);
        }
    }
}

/// The difference between the Unix clock and CLOCK_MONOTONIC, which eBPF timestamps use.
pub fn mono_to_unix_offset() -> i128 {
    fn now(clock: libc::clockid_t) -> i128 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec for the call to write; the clock ids used
        // exist on every Linux.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
    }
    now(libc::CLOCK_REALTIME) - now(libc::CLOCK_MONOTONIC)
}

/// CLOCK_MONOTONIC now, in ns.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to write; CLOCK_MONOTONIC exists on
    // every Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The agent's own TCP sockets, so that a process on this node that the agent talks to
/// (a local collector or Jaeger receiving the agent's exports) is not traced for it:
/// tracing those exchanges would make spans about exporting spans, without end. The
/// programs report the agent's own connects and closes; their local ports are kept
/// here (a port counted twice while two of the agent's sockets share it).
#[derive(Default)]
struct OwnSockets {
    local_ports: FastMap<u16, u32>,
}

impl OwnSockets {
    fn opened(&mut self, port: u16) {
        *self.local_ports.entry(port).or_default() += 1;
    }

    fn closed(&mut self, port: u16) {
        if let Some(n) = self.local_ports.get_mut(&port) {
            *n -= 1;
            if *n == 0 {
                self.local_ports.remove(&port);
            }
        }
    }

    /// Whether the peer of `info`, already known to be on this node, is one of the
    /// agent's own sockets.
    fn is_ours(&self, info: &ConnInfo) -> bool {
        self.local_ports.contains_key(&info.remote.port())
    }
}

/// This node's IP addresses, re-read now and then (interfaces come and go with pods).
/// Only connections to one of them can have their other end traced here too.
struct LocalAddrs {
    addrs: FastSet<IpAddr>,
    read_at: std::time::Instant,
}

impl LocalAddrs {
    const REFRESH: Duration = Duration::from_secs(10);

    fn read() -> Self {
        let mut addrs = FastSet::default();
        let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
        // SAFETY: getifaddrs fills `list` with a linked list freed by freeifaddrs; the
        // sockaddr pointers are read according to their family.
        unsafe {
            if libc::getifaddrs(&mut list) == 0 {
                let mut cur = list;
                while !cur.is_null() {
                    let sa = (*cur).ifa_addr;
                    if !sa.is_null() {
                        match i32::from((*sa).sa_family) {
                            libc::AF_INET => {
                                let sin = &*(sa as *const libc::sockaddr_in);
                                addrs.insert(IpAddr::from(
                                    u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                                ));
                            }
                            libc::AF_INET6 => {
                                let sin6 = &*(sa as *const libc::sockaddr_in6);
                                addrs.insert(IpAddr::from(sin6.sin6_addr.s6_addr));
                            }
                            _ => {}
                        }
                    }
                    cur = (*cur).ifa_next;
                }
                libc::freeifaddrs(list);
            }
        }
        LocalAddrs {
            addrs,
            read_at: std::time::Instant::now(),
        }
    }

    /// Whether the other end of `info` is on this node: loopback, the connection's own
    /// local address, or any address of this node.
    fn peer_is_local(&mut self, info: &ConnInfo) -> bool {
        info.remote.ip() == info.local.ip() || self.is_local(info.remote.ip())
    }

    fn is_local(&mut self, ip: IpAddr) -> bool {
        if ip.is_loopback() || self.addrs.contains(&ip) {
            return true;
        }
        if self.read_at.elapsed() > Self::REFRESH {
            *self = Self::read();
            return self.addrs.contains(&ip);
        }
        false
    }
}

#[cfg(test)]
mod tests;
