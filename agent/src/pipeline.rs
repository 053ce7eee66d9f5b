//! The user-space pipeline: decoded events in, finished spans out.
//!
//! events -> process registry -> connection table -> stream cursors -> HTTP parser ->
//! span builder -> context linker -> sink. The same pipeline serves the live kernel and
//! tests that feed it recorded events.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use agent_common::{Direction, SockTuple, SyscallId};
use tracing::debug;

use crate::{
    conn::ConnInfo,
    context::{ConnKey, Linker},
    context_amqp::{MessageKey, MessageLinker},
    events::{Event, direction},
    process::ProcessRegistry,
    protocols::{
        amqp::AmqpOperation,
        detect::{ConnParser, Parsed, Verdict},
        http::HttpExchange,
    },
    reassembly::{Piece, StreamCursor},
    spans::{Resource, Span, amqp::amqp_span, http::http_span},
    telemetry::Metrics,
};

/// Limits and timings of the pipeline.
#[derive(Clone, Debug)]
pub struct PipelineOptions {
    /// Most connections tracked at once; the least recently active go first.
    pub max_connections: usize,
    /// A connection with no traffic for this long is forgotten.
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
        }
    }
}

/// Where finished spans go.
pub type Sink = Box<dyn FnMut(Span) + Send>;

struct Conn {
    info: ConnInfo,
    tuple: SockTuple,
    resource: Arc<Resource>,
    parser: Option<ConnParser>,
    ingress: StreamCursor,
    egress: StreamCursor,
    last_ns: u64,
    /// Plaintext from a TLS library was seen: bytes on the wire are ciphertext and
    /// ignored; the parser reads the plaintext stream.
    tls: bool,
    /// The connect or accept was seen, so the first bytes are the start of the stream;
    /// otherwise the connection predates the agent (or was forgotten) and the parser
    /// must look for a message boundary first.
    from_start: bool,
    /// Whether any bytes were given to the parser yet.
    fed: bool,
    /// No parser understood the bytes (counted when the connection goes).
    unparsed: bool,
}

pub struct Pipeline {
    opts: PipelineOptions,
    registry: ProcessRegistry,
    /// By (pid, fd), ordered so that a process's connections are one range.
    conns: BTreeMap<(u32, u32), Conn>,
    linker: Linker,
    messages: MessageLinker,
    own: OwnSockets,
    local_addrs: LocalAddrs,
    metrics: Arc<Metrics>,
    /// Add to a CLOCK_MONOTONIC time to get Unix time (both in ns).
    mono_to_unix_ns: i128,
    sink: Sink,
    last_ns: u64,
    /// Processes that exec'd since the last `take_new_processes`.
    new_processes: Vec<u32>,
    last_conn_tick_ns: u64,
}

impl Pipeline {
    pub fn new(opts: PipelineOptions, metrics: Arc<Metrics>, sink: Sink) -> Self {
        Pipeline {
            linker: Linker::new(opts.link_hold, opts.max_pending_spans),
            messages: MessageLinker::new(
                opts.message_hold,
                opts.message_memory,
                opts.max_pending_spans,
            ),
            opts,
            registry: ProcessRegistry::new(),
            conns: BTreeMap::new(),
            own: OwnSockets::default(),
            local_addrs: LocalAddrs::read(),
            metrics,
            mono_to_unix_ns: mono_to_unix_offset(),
            sink,
            last_ns: 0,
            new_processes: Vec::new(),
            last_conn_tick_ns: 0,
        }
    }

    /// Handles one event.
    pub fn handle(&mut self, event: Event<'_>) {
        Metrics::inc(&self.metrics.events_seen);
        let h = *event.header();
        self.last_ns = self.last_ns.max(h.ts_ns);
        match event {
            Event::Data { data, payload, .. } => {
                let metrics = Arc::clone(&self.metrics);
                Metrics::add(&metrics.bytes_seen, data.len);
                let dir = direction(data.direction);
                let conn = self.conn(h.tgid, h.fd, &data.tuple, h.ts_ns);
                let Some(conn) = conn else { return };
                conn.last_ns = h.ts_ns;
                let tls = SyscallId::is_tls(data.syscall);
                if tls && !conn.tls {
                    // The handshake went by as ciphertext; start over on the plaintext.
                    conn.tls = true;
                    conn.parser = Some(ConnParser::new());
                    conn.ingress = StreamCursor::new();
                    conn.egress = StreamCursor::new();
                    conn.fed = false;
                } else if !tls && conn.tls {
                    return;
                }
                let Some(parser) = conn.parser.as_mut() else {
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
                for piece in cursor.advance(data.offset, data.len, payload).pieces() {
                    match piece {
                        Piece::Data(bytes) => parser.feed(dir, bytes, h.ts_ns),
                        Piece::Gap(n) => {
                            Metrics::add(&metrics.bytes_skipped, n);
                            parser.skip(dir, n, h.ts_ns);
                        }
                        Piece::Resync => parser.resync(dir),
                    }
                }
                self.after_parse(h.tgid, h.fd, h.ts_ns);
            }
            Event::Connect { tuple, .. } | Event::Accept { tuple, .. } => {
                // A new connection on this descriptor: whatever was there is over.
                self.close(h.tgid, h.fd, h.ts_ns);
                if let Some(conn) = self.conn(h.tgid, h.fd, &tuple, h.ts_ns) {
                    conn.from_start = true;
                }
            }
            Event::Close { .. } => self.close(h.tgid, h.fd, h.ts_ns),
            Event::OwnConnect { tuple, .. } => self.own_connect(&tuple),
            Event::OwnClose { tuple, .. } => self.own.closed(tuple.sport),
            Event::Exec {
                comm, args, env, ..
            } => {
                self.registry.exec(h.tgid, &comm, &args, &env);
                if self.new_processes.len() < 4096 {
                    self.new_processes.push(h.tgid);
                }
            }
            Event::Exit { .. } => {
                let fds: Vec<u32> = self
                    .conns
                    .range((h.tgid, 0)..=(h.tgid, u32::MAX))
                    .map(|((_, fd), _)| *fd)
                    .collect();
                for fd in fds {
                    self.close(h.tgid, fd, h.ts_ns);
                }
                self.registry.exit(h.tgid);
            }
        }
    }

    /// The agent connected a socket of its own: a connection on this node whose peer
    /// it is, accepted before this event arrived, stops being traced.
    fn own_connect(&mut self, tuple: &SockTuple) {
        self.own.opened(tuple.sport);
        if !self.opts.exclude_own_sockets {
            return;
        }
        let own = ConnInfo::from_tuple(tuple);
        for conn in self.conns.values_mut() {
            if conn.info.remote == own.local && conn.info.local == own.remote {
                debug!(peer = %conn.info.remote, "connection from the agent itself; no longer traced");
                conn.parser = None;
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

    /// Processes that started a new program since the last call (for TLS discovery).
    pub fn take_new_processes(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.new_processes)
    }

    /// Processes with connections now.
    pub fn active_processes(&self) -> Vec<u32> {
        // Keys are ordered by pid: equal pids are adjacent.
        let mut pids: Vec<u32> = self.conns.keys().map(|(pid, _)| *pid).collect();
        pids.dedup();
        pids
    }

    /// Periodic work: release spans that waited long enough, forget idle connections.
    /// `now_ns` is CLOCK_MONOTONIC.
    pub fn tick(&mut self, now_ns: u64) {
        for span in self.linker.expire(now_ns) {
            (self.sink)(span);
        }
        for span in self.messages.expire(now_ns) {
            (self.sink)(span);
        }
        // AMQP publishes waiting for a possible basic.return finish on idle
        // connections; once a second is plenty.
        if now_ns.saturating_sub(self.last_conn_tick_ns) >= 1_000_000_000 {
            self.last_conn_tick_ns = now_ns;
            let amqp: Vec<(u32, u32)> = self
                .conns
                .iter()
                .filter(|(_, c)| matches!(c.parser, Some(ConnParser::Amqp(_))))
                .map(|(k, _)| *k)
                .collect();
            for (tgid, fd) in amqp {
                if let Some(p) = self
                    .conns
                    .get_mut(&(tgid, fd))
                    .and_then(|c| c.parser.as_mut())
                {
                    p.tick(now_ns);
                }
                self.after_parse(tgid, fd, now_ns);
            }
        }
        let idle = self.opts.idle_timeout.as_nanos() as u64;
        let before = self.conns.len();
        let metrics = &self.metrics;
        self.conns.retain(|_, c| {
            let keep = now_ns.saturating_sub(c.last_ns) < idle;
            if !keep && c.unparsed && !c.tls {
                Metrics::inc(&metrics.parse_failures);
            }
            keep
        });
        if self.conns.len() != before {
            debug!(
                forgotten = before - self.conns.len(),
                "idle connections forgotten"
            );
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

    /// Ends everything: open exchanges, waiting spans (at shutdown).
    pub fn finish(&mut self) {
        let keys: Vec<(u32, u32)> = self.conns.keys().copied().collect();
        let now = self.last_ns;
        for (tgid, fd) in keys {
            self.flush_conn(tgid, fd, now, false);
        }
        for span in self.linker.drain() {
            (self.sink)(span);
        }
        for span in self.messages.drain() {
            (self.sink)(span);
        }
    }

    fn conn(&mut self, tgid: u32, fd: u32, tuple: &SockTuple, ts_ns: u64) -> Option<&mut Conn> {
        let key = (tgid, fd);
        if let Some(c) = self.conns.get(&key)
            && c.tuple != *tuple
            && *tuple != SockTuple::default()
        {
            // The descriptor was reused without a close we saw.
            self.close(tgid, fd, ts_ns);
        }
        if !self.conns.contains_key(&key) {
            if self.conns.len() >= self.opts.max_connections {
                self.evict_oldest();
            }
            let info = ConnInfo::from_tuple(tuple);
            let ours = self.opts.exclude_own_sockets
                && self.local_addrs.peer_is_local(&info)
                && self.own.is_ours(&info);
            if ours {
                debug!(pid = tgid, fd, peer = %info.remote, "connection from the agent itself; not traced");
            }
            let resource = self.registry.resource(tgid);
            self.conns.insert(
                key,
                Conn {
                    info,
                    tuple: *tuple,
                    resource,
                    parser: (!ours).then(ConnParser::new),
                    ingress: StreamCursor::new(),
                    egress: StreamCursor::new(),
                    last_ns: ts_ns,
                    tls: false,
                    from_start: false,
                    fed: false,
                    unparsed: false,
                },
            );
            self.metrics.connections_tracked.store(
                self.conns.len() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        self.conns.get_mut(&key)
    }

    fn evict_oldest(&mut self) {
        let n = (self.conns.len() / 8).max(1);
        let mut by_age: Vec<((u32, u32), u64)> =
            self.conns.iter().map(|(k, c)| (*k, c.last_ns)).collect();
        by_age.sort_by_key(|(_, t)| *t);
        for (k, _) in by_age.into_iter().take(n) {
            if let Some(conn) = self.conns.remove(&k) {
                self.count_unparsed(&conn);
            }
            Metrics::inc(&self.metrics.connections_evicted);
        }
    }

    fn close(&mut self, tgid: u32, fd: u32, ts_ns: u64) {
        self.flush_conn(tgid, fd, ts_ns, true);
    }

    fn flush_conn(&mut self, tgid: u32, fd: u32, ts_ns: u64, closed: bool) {
        if let Some(conn) = self.conns.get_mut(&(tgid, fd)) {
            if let Some(p) = conn.parser.as_mut()
                && closed
            {
                p.close(ts_ns);
            }
            self.after_parse(tgid, fd, ts_ns);
        }
        if let Some(conn) = self.conns.remove(&(tgid, fd)) {
            self.count_unparsed(&conn);
        }
    }

    /// A connection leaves the table: if no parser understood it and it was not TLS
    /// (whose handshake goes by as ciphertext before the plaintext comes), it counts as
    /// a parse failure. Counted at the end so that HTTPS does not count.
    fn count_unparsed(&self, conn: &Conn) {
        if conn.unparsed && !conn.tls {
            Metrics::inc(&self.metrics.parse_failures);
        }
    }

    /// Turns what the parser finished into spans; gives up on connections that no
    /// parser understands.
    fn after_parse(&mut self, tgid: u32, fd: u32, now_ns: u64) {
        let Some(conn) = self.conns.get_mut(&(tgid, fd)) else {
            return;
        };
        let Some(parser) = conn.parser.as_mut() else {
            return;
        };
        let parsed = parser.take();
        if parser.verdict() == Verdict::Unknown {
            debug!(pid = tgid, fd, peer = %conn.info.remote, "connection is neither HTTP/1.x nor AMQP 0-9-1; ignored");
            conn.unparsed = true;
            conn.parser = None;
        }
        if parsed.is_empty() {
            return;
        }
        let info = conn.info;
        let resource = conn.resource.clone();
        let tls = conn.tls;
        for item in parsed {
            match item {
                Parsed::Http(ex) => self.emit_http(&ex, &info, resource.clone(), tls, now_ns),
                Parsed::Amqp(op) => self.emit_amqp(&op, &info, resource.clone(), now_ns),
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
        let span = http_span(ex, info, resource, self.mono_to_unix_ns, tls);
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
        let Some(span) = amqp_span(op, info, resource, self.mono_to_unix_ns) else {
            return;
        };
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
