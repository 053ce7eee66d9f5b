//! The replay's driver: synthetic processes for the ends of each TCP connection,
//! roles from the handshake (or guessed), and the connect, accept, data and close
//! events a traced process would have made, fed to the pipeline (see the
//! [module docs](super)).

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
};

use agent_common::{
    AF_INET, AF_INET6, DataEvent, Direction, EventHeader, EventKind, SockTuple, SyscallId, role,
};

use super::{
    Summary,
    capture::Frame,
    decode::{Segment, ip_of, tcp_segment},
    flow::{Delivery, Flow},
};
use crate::{events::Event, pipeline::Pipeline, spans::Resource};

/// How often (capture time) the pipeline's timers run.
const TICK_NS: u64 = 50_000_000;
/// Most connections reassembled at once; the least recently active go first.
const MAX_CONNECTIONS: usize = 65536;
/// A connection silent for this long (capture time) is forgotten, as the pipeline does.
const IDLE_NS: u64 = 600_000_000_000;
/// One end of a connection, as a traced process would be.
#[derive(Clone, Copy)]
struct End {
    addr: SocketAddr,
    pid: u32,
    fd: u32,
}

struct Conn {
    client: End,
    server: End,
    /// Roles known from the handshake (else guessed).
    from_handshake: bool,
    /// Client ISN, to tell a retransmitted SYN from a new connection on the same ports.
    client_isn: Option<u32>,
    to_server: Flow,
    to_client: Flow,
    client_opened: bool,
    server_opened: bool,
    last_ns: u64,
    /// Order of creation, for a deterministic end.
    id: u64,
}

impl Conn {
    fn tuple(from: &End, to: &End) -> SockTuple {
        let mut t = SockTuple {
            family: AF_INET,
            sport: from.addr.port(),
            dport: to.addr.port(),
            _pad: 0,
            saddr: [0; 16],
            daddr: [0; 16],
        };
        for (bytes, ip) in [(&mut t.saddr, from.addr.ip()), (&mut t.daddr, to.addr.ip())] {
            match ip {
                IpAddr::V4(v4) => bytes[..4].copy_from_slice(&v4.octets()),
                IpAddr::V6(v6) => {
                    t.family = AF_INET6;
                    *bytes = v6.octets();
                }
            }
        }
        if t.family == AF_INET6 {
            // Both addresses in one family: IPv4 ones as IPv4-mapped.
            for (bytes, ip) in [(&mut t.saddr, from.addr.ip()), (&mut t.daddr, to.addr.ip())] {
                if let IpAddr::V4(v4) = ip {
                    *bytes = v4.to_ipv6_mapped().octets();
                }
            }
        }
        t
    }

    fn role_of(&self, client_side: bool) -> u32 {
        match (self.from_handshake, client_side) {
            (false, _) => role::UNKNOWN,
            (true, true) => role::CLIENT,
            (true, false) => role::SERVER,
        }
    }
}

fn header(kind: EventKind, end: &End, ts_ns: u64) -> EventHeader {
    EventHeader {
        kind: kind as u32,
        tgid: end.pid,
        tid: end.pid,
        fd: end.fd,
        ts_ns,
    }
}

/// Tells the pipeline about one side's connect or accept.
fn open_side(pipeline: &mut Pipeline, conn: &mut Conn, client_side: bool, ts_ns: u64) {
    if client_side && !conn.client_opened {
        conn.client_opened = true;
        let tuple = Conn::tuple(&conn.client, &conn.server);
        pipeline.handle(Event::Connect {
            header: header(EventKind::Connect, &conn.client, ts_ns),
            tuple,
            ret: 0,
        });
    }
    if !client_side && !conn.server_opened {
        conn.server_opened = true;
        let tuple = Conn::tuple(&conn.server, &conn.client);
        pipeline.handle(Event::Accept {
            header: header(EventKind::Accept, &conn.server, ts_ns),
            tuple,
        });
    }
}

/// Hands bytes one end sent to the pipeline: a write of the sender, a read of the
/// receiver.
fn deliver(
    pipeline: &mut Pipeline,
    conn: &mut Conn,
    from_client: bool,
    deliveries: &[Delivery<'_>],
    ts_ns: u64,
) {
    if deliveries.is_empty() {
        return;
    }
    if conn.from_handshake {
        open_side(pipeline, conn, true, ts_ns);
        open_side(pipeline, conn, false, ts_ns);
    }
    let (sender, receiver) = if from_client {
        (conn.client, conn.server)
    } else {
        (conn.server, conn.client)
    };
    let sides = [
        (
            sender,
            receiver,
            Direction::Egress,
            SyscallId::Write,
            conn.role_of(from_client),
        ),
        (
            receiver,
            sender,
            Direction::Ingress,
            SyscallId::Read,
            conn.role_of(!from_client),
        ),
    ];
    for d in deliveries {
        for (me, peer, direction, syscall, role) in sides {
            let h = header(EventKind::Data, &me, ts_ns);
            let data = DataEvent {
                header: h,
                tuple: Conn::tuple(&me, &peer),
                offset: d.offset,
                len: d.len,
                captured: d.data.len() as u32,
                direction: direction as u32,
                syscall: syscall as u32,
                role,
            };
            pipeline.handle(Event::Data {
                header: h,
                data,
                payload: &d.data,
            });
        }
    }
}

fn close_both(pipeline: &mut Pipeline, conn: &Conn, ts_ns: u64) {
    for (me, peer) in [(conn.client, conn.server), (conn.server, conn.client)] {
        pipeline.handle(Event::Close {
            header: header(EventKind::Close, &me, ts_ns),
            tuple: Conn::tuple(&me, &peer),
        });
    }
}

/// Connections by their two addresses, smaller first.
type ConnKey = (SocketAddr, SocketAddr);

fn key_of(a: SocketAddr, b: SocketAddr) -> ConnKey {
    if a <= b { (a, b) } else { (b, a) }
}

pub(super) struct Replayer {
    pipeline: Pipeline,
    conns: HashMap<ConnKey, Conn>,
    /// Addresses seen accepting connections.
    listeners: HashSet<SocketAddr>,
    /// Synthetic processes by service name.
    pids: HashMap<String, u32>,
    /// The last descriptor given out, per synthetic process.
    fds: HashMap<u32, u32>,
    next_conn_id: u64,
    last_ns: u64,
    last_tick_ns: u64,
    pub summary: Summary,
}

impl Replayer {
    pub(super) fn new(pipeline: Pipeline) -> Self {
        Replayer {
            pipeline,
            conns: HashMap::new(),
            listeners: HashSet::new(),
            pids: HashMap::new(),
            fds: HashMap::new(),
            next_conn_id: 0,
            last_ns: 0,
            last_tick_ns: 0,
            summary: Summary::default(),
        }
    }

    pub(super) fn frame(&mut self, frame: &Frame<'_>) {
        self.summary.packets += 1;
        // Capture clocks can step back a little (packets timestamped on several CPUs);
        // the pipeline's times only move forward.
        let now = self.last_ns.max(frame.ts_ns);
        self.last_ns = now;
        if now.saturating_sub(self.last_tick_ns) >= TICK_NS {
            self.last_tick_ns = now;
            self.pipeline.tick(now);
            self.conns
                .retain(|_, c| now.saturating_sub(c.last_ns) < IDLE_NS);
        }
        match ip_of(frame.link, frame.data).and_then(tcp_segment) {
            Some(segment) => self.segment(&segment, now),
            None => self.summary.skipped += 1,
        }
    }

    fn segment(&mut self, seg: &Segment<'_>, now: u64) {
        let key = key_of(seg.src, seg.dst);
        if seg.syn {
            self.handshake(key, seg, now);
        }
        if !self.conns.contains_key(&key) {
            if seg.len == 0 {
                // A bare ACK, FIN or RST of a connection with nothing to show.
                return;
            }
            let (client, server) = self.guess_roles(seg.src, seg.dst);
            self.new_conn(key, client, server, false, now);
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        conn.last_ns = now;
        let from_client = seg.src == conn.client.addr;
        let (flow, reverse) = if from_client {
            (&mut conn.to_server, &mut conn.to_client)
        } else {
            (&mut conn.to_client, &mut conn.to_server)
        };
        let mut out = Vec::new();
        let mut back = Vec::new();
        if !seg.syn {
            flow.segment(seg.seq, seg.len, seg.payload, now, &mut out);
        } else if seg.len > 0 {
            // Data on a SYN (TCP Fast Open) comes after the SYN's own sequence number.
            flow.segment(seg.seq.wrapping_add(1), seg.len, seg.payload, now, &mut out);
        }
        if seg.fin {
            flow.start_at(seg.seq);
            let fin = flow.offset_of(seg.seq) + i128::from(seg.len);
            flow.fin = Some(u64::try_from(fin).unwrap_or(0));
        }
        if let Some(ack) = seg.ack {
            reverse.acknowledged(ack, now, &mut back);
        }
        if seg.rst {
            flow.flush(now, &mut out);
            reverse.flush(now, &mut back);
        }
        let over = seg.rst || (conn.to_server.finished() && conn.to_client.finished());
        deliver(&mut self.pipeline, conn, from_client, &out, now);
        deliver(&mut self.pipeline, conn, !from_client, &back, now);
        if over {
            self.end_conn(key, true, now);
        }
    }

    /// A SYN or SYN-ACK: a new connection, or a retransmission of one known.
    fn handshake(&mut self, key: ConnKey, seg: &Segment<'_>, now: u64) {
        let syn_ack = seg.ack.is_some();
        let (client, server) = if syn_ack {
            (seg.dst, seg.src)
        } else {
            (seg.src, seg.dst)
        };
        if let Some(conn) = self.conns.get(&key) {
            let same = conn.client.addr == client
                && (syn_ack || conn.client_isn.is_none_or(|isn| isn == seg.seq))
                && conn.from_handshake;
            if same {
                if syn_ack {
                    let conn = self.conns.get_mut(&key).expect("checked");
                    conn.to_client.start_at(seg.seq.wrapping_add(1));
                    open_side(&mut self.pipeline, conn, false, now);
                }
                return;
            }
            // The ports are reused by a new connection.
            self.end_conn(key, true, now);
        }
        self.listeners.insert(server);
        self.new_conn(key, client, server, true, now);
        let conn = self.conns.get_mut(&key).expect("just made");
        if syn_ack {
            // The SYN was not captured; the ACK number tells where the client starts.
            conn.to_client.start_at(seg.seq.wrapping_add(1));
            if let Some(ack) = seg.ack {
                conn.to_server.start_at(ack);
            }
            open_side(&mut self.pipeline, conn, true, now);
            open_side(&mut self.pipeline, conn, false, now);
        } else {
            conn.client_isn = Some(seg.seq);
            conn.to_server.start_at(seg.seq.wrapping_add(1));
            open_side(&mut self.pipeline, conn, true, now);
        }
    }

    /// Which end of a connection first seen mid-stream is the client.
    fn guess_roles(&self, a: SocketAddr, b: SocketAddr) -> (SocketAddr, SocketAddr) {
        if self.listeners.contains(&a) && !self.listeners.contains(&b) {
            return (b, a);
        }
        if self.listeners.contains(&b) && !self.listeners.contains(&a) {
            return (a, b);
        }
        if (a.port(), a.ip()) > (b.port(), b.ip()) {
            (a, b)
        } else {
            (b, a)
        }
    }

    fn new_conn(
        &mut self,
        key: ConnKey,
        client: SocketAddr,
        server: SocketAddr,
        from_handshake: bool,
        now: u64,
    ) {
        if self.conns.len() >= MAX_CONNECTIONS {
            let oldest = self
                .conns
                .iter()
                .min_by_key(|(_, c)| c.last_ns)
                .map(|(k, _)| *k);
            if let Some(oldest) = oldest {
                self.end_conn(oldest, false, now);
            }
        }
        let client = End {
            addr: client,
            pid: self.process(client.ip().to_string(), client.ip()),
            fd: 0,
        };
        let server = End {
            addr: server,
            pid: self.process(endpoint_name(server), server.ip()),
            fd: 0,
        };
        let conn = Conn {
            client: End {
                fd: self.new_fd(client.pid),
                ..client
            },
            server: End {
                fd: self.new_fd(server.pid),
                ..server
            },
            from_handshake,
            client_isn: None,
            to_server: Flow::default(),
            to_client: Flow::default(),
            client_opened: false,
            server_opened: false,
            last_ns: now,
            id: self.next_conn_id,
        };
        self.next_conn_id += 1;
        self.summary.connections += 1;
        self.conns.insert(key, conn);
    }

    /// Delivers what a connection still holds and forgets it; `close` tells the
    /// pipeline both ends closed.
    fn end_conn(&mut self, key: ConnKey, close: bool, now: u64) {
        let Some(mut conn) = self.conns.remove(&key) else {
            return;
        };
        let (mut up, mut down) = (Vec::new(), Vec::new());
        conn.to_server.flush(now, &mut up);
        conn.to_client.flush(now, &mut down);
        deliver(&mut self.pipeline, &mut conn, true, &up, now);
        deliver(&mut self.pipeline, &mut conn, false, &down, now);
        self.summary.bytes_missing += conn.to_server.missing + conn.to_client.missing;
        if close {
            close_both(&mut self.pipeline, &conn, now);
        }
    }

    /// The end of the capture: connections a FIN or RST had begun to close are closed,
    /// the others are left open, as a live agent stopping would leave them.
    pub(super) fn finish(&mut self) {
        let mut open: Vec<(u64, ConnKey, bool)> = self
            .conns
            .iter()
            .map(|(k, c)| {
                (
                    c.id,
                    *k,
                    c.to_server.fin.is_some() || c.to_client.fin.is_some(),
                )
            })
            .collect();
        open.sort_unstable();
        for (_, key, closing) in open {
            self.end_conn(key, closing, self.last_ns);
        }
        self.pipeline.finish_capture();
    }

    /// The pid of the synthetic process named `service`, registered on first use.
    fn process(&mut self, service: String, ip: IpAddr) -> u32 {
        if let Some(&pid) = self.pids.get(&service) {
            return pid;
        }
        let pid = self.pids.len() as u32 + 1;
        self.pipeline.register_process(
            pid,
            Resource {
                service_name: service.clone(),
                pid,
                executable_name: String::new(),
                host_name: ip.to_string(),
                attributes: Vec::new(),
                generic_name: false,
            },
        );
        self.pids.insert(service, pid);
        pid
    }

    fn new_fd(&mut self, pid: u32) -> u32 {
        let fd = self.fds.entry(pid).or_insert(2);
        *fd += 1;
        *fd
    }
}

/// "10.0.0.5:8080", "[::1]:8080".
fn endpoint_name(addr: SocketAddr) -> String {
    addr.to_string()
}
