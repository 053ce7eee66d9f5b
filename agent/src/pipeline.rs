//! The user-space pipeline: decoded events in, finished spans out.
//!
//! events -> process registry -> connection table ([`crate::conn::table`]) -> stream
//! cursors -> protocol parser -> span builder -> context linker -> sink. This module
//! only orchestrates: it routes each event to its connection, hands the bytes to the
//! parser, and turns what the parser finished into spans, also when a connection ends
//! with exchanges still open. The same pipeline serves the live kernel and replays of
//! captures.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use agent_common::{DataEvent, Direction, SockTuple, SyscallId};
use tracing::debug;

use crate::{
    conn::{
        ConnInfo, EndReason,
        table::{self, ConnTable, DataSource, Ended},
    },
    context::{ConnKey, Linker, MessageKey, MessageLinker},
    events::{Event, direction},
    process::{Identified, ProcessQuery, ProcessRegistry},
    protocols::{
        Parsed,
        amqp::AmqpOperation,
        detect::{ConnParser, Verdict},
        http::HttpExchange,
    },
    reassembly::Piece,
    spans::{Resource, Span, amqp::amqp_span, http::http_span},
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
    /// Business attribute rules (the config file's, then the defaults).
    pub business: Arc<crate::business::Rules>,
    /// Identity rules for naming processes (the config file's).
    pub processes: Arc<crate::selection::ProcessRules>,
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
            business: Arc::default(),
            processes: Arc::default(),
        }
    }
}

/// Where finished spans go.
pub type Sink = Box<dyn FnMut(Span) + Send>;

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
}

type Conn = table::Conn<Tracked>;

pub struct Pipeline {
    opts: PipelineOptions,
    registry: ProcessRegistry,
    conns: ConnTable<Tracked>,
    linker: Linker,
    messages: MessageLinker,
    own: OwnSockets,
    local_addrs: LocalAddrs,
    metrics: Arc<Metrics>,
    /// Add to a CLOCK_MONOTONIC time to get Unix time (both in ns).
    mono_to_unix_ns: i128,
    sink: Sink,
    last_ns: u64,
    last_conn_tick_ns: u64,
    on_message_start: Option<MessageStartHook>,
}

impl Pipeline {
    pub fn new(opts: PipelineOptions, metrics: Arc<Metrics>, sink: Sink) -> Self {
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
                self.after_parse(h.tgid, h.fd, h.ts_ns);
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
                comm, args, env, ..
            } => {
                self.registry.exec(h.tgid, &comm, &args, &env);
            }
            Event::Exit { .. } => {
                for ended in self.conns.remove_process(h.tgid) {
                    self.end(ended, h.ts_ns);
                }
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
        for span in self.linker.expire(now_ns) {
            (self.sink)(span);
        }
        for span in self.messages.expire(now_ns) {
            (self.sink)(span);
        }
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
                    self.emit_parsed(parsed, &info, &resource, tls, now_ns);
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
            (self.linker.len() + self.messages.waiting_len()) as u64,
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
        for span in self.linker.drain() {
            (self.sink)(span);
        }
        for span in self.messages.drain() {
            (self.sink)(span);
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
    /// spans. If no parser understood it and it was not TLS (whose handshake goes by as
    /// ciphertext before the plaintext comes), it counts as a parse failure; counted at
    /// the end so that HTTPS does not count.
    fn end(&mut self, ended: Ended<Tracked>, ts_ns: u64) {
        let table::Ended {
            mut conn, reason, ..
        } = ended;
        if reason == EndReason::Evicted {
            Metrics::inc(&self.metrics.connections_evicted);
        }
        if let Some(parser) = conn.state.parser.as_mut() {
            parser.close(ts_ns, reason);
            let parsed = parser.take();
            self.emit(&conn, parsed, ts_ns);
        }
        if conn.state.unparsed && !conn.tls {
            Metrics::inc(&self.metrics.parse_failures);
        }
    }

    /// Turns what the parser finished into spans; gives up on connections that no
    /// parser understands.
    fn after_parse(&mut self, tgid: u32, fd: u32, now_ns: u64) {
        let Some(conn) = self.conns.get_mut(tgid, fd) else {
            return;
        };
        let Some(parser) = conn.state.parser.as_mut() else {
            return;
        };
        let parsed = parser.take();
        if parser.verdict() == Verdict::Unknown {
            debug!(pid = tgid, fd, peer = %conn.info.remote, "connection is neither HTTP/1.x nor AMQP 0-9-1; ignored");
            conn.state.unparsed = true;
            conn.state.parser = None;
        }
        if parsed.is_empty() {
            return;
        }
        let info = conn.info;
        let resource = conn.state.resource.clone();
        let tls = conn.tls;
        self.emit_parsed(parsed, &info, &resource, tls, now_ns);
    }

    fn emit(&mut self, conn: &Conn, parsed: Vec<Parsed>, now_ns: u64) {
        if !parsed.is_empty() {
            self.emit_parsed(parsed, &conn.info, &conn.state.resource, conn.tls, now_ns);
        }
    }

    fn emit_parsed(
        &mut self,
        parsed: Vec<Parsed>,
        info: &ConnInfo,
        resource: &Arc<Resource>,
        tls: bool,
        now_ns: u64,
    ) {
        for item in parsed {
            match item {
                Parsed::Http(ex) => self.emit_http(&ex, info, resource.clone(), tls, now_ns),
                Parsed::Amqp(op) => self.emit_amqp(&op, info, resource.clone(), now_ns),
            }
        }
    }

    fn emit_http(
        &mut self,
        ex: &HttpExchange,
        info: &ConnInfo,
        resource: Arc<Resource>,
        tls: bool,
        now_ns: u64,
    ) {
        let mut span = http_span(ex, info, resource, self.mono_to_unix_ns, tls);
        crate::business::annotate_http(&self.opts.business, ex, &mut span);
        Metrics::inc(&self.metrics.spans_built);
        if !self.opts.link_remote_peers && !self.local_addrs.peer_is_local(info) {
            // The other end is on another node: no span of ours will pair with it.
            (self.sink)(span);
            return;
        }
        let key = ConnKey::new(ex.role, info.local, info.remote);
        for span in self
            .linker
            .offer(span, key, &ex.request.method, &ex.request.target, now_ns)
        {
            (self.sink)(span);
        }
    }

    fn emit_amqp(
        &mut self,
        op: &AmqpOperation,
        info: &ConnInfo,
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
        let Some(mut span) = amqp_span(op, info, resource, self.mono_to_unix_ns) else {
            return;
        };
        crate::business::annotate_amqp(&self.opts.business, op, &mut span);
        Metrics::inc(&self.metrics.spans_built);
        let out = match MessageKey::of(op) {
            Some(key) => self.messages.offer(span, key, now_ns),
            None => vec![span],
        };
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
    local_ports: HashMap<u16, u32>,
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
    addrs: HashSet<IpAddr>,
    read_at: std::time::Instant,
}

impl LocalAddrs {
    const REFRESH: Duration = Duration::from_secs(10);

    fn read() -> Self {
        let mut addrs = HashSet::new();
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
