//! Types shared by the eBPF programs and the user-space agent.
//!
//! Every type is `#[repr(C)]`, `Copy`, has no implicit padding and a compile-time size
//! check, because both sides read the same bytes: the kernel writes them into the ring
//! buffer and user space reinterprets them.
#![no_std]

/// Largest payload prefix a data event can carry; the runtime cap is at most this.
pub const MAX_PAYLOAD: usize = 16 * 1024;
/// Payload prefix copied per data event unless configured otherwise.
pub const DEFAULT_PAYLOAD_CAP: u32 = 4096;
/// Most iovec entries of one readv/writev/recvmsg/sendmsg that are looked at (grpcio
/// writes a frame over 25); bytes in later ones go up uncaptured, as a gap.
pub const MAX_IOVECS: usize = 64;

/// Map names, shared so that user space finds what the programs declare.
pub mod maps {
    pub const EVENTS: &str = "EVENTS";
    pub const LOST: &str = "LOST";
    pub const EXCLUDED_TGIDS: &str = "EXCLUDED_TGIDS";
    pub const EXCLUDED_COMMS: &str = "EXCLUDED_COMMS";
    pub const CGROUPS: &str = "CGROUPS";
    pub const SOCKETS: &str = "SOCKETS";
    pub const PENDING: &str = "PENDING";
    pub const COUNTERS: &str = "COUNTERS";
    pub const NEXT_MESSAGE: &str = "NEXT_MESSAGE";
    pub const INJECT_SOCKETS: &str = "INJECT_SOCKETS";
    pub const INJECT_STATE: &str = "INJECT_STATE";
    pub const INJECT_COUNTS: &str = "INJECT_COUNTS";
    pub const INJECT_EVENTS: &str = "INJECT_EVENTS";
}

/// Global variables the loader sets before the programs are loaded.
pub mod globals {
    pub const CONFIG: &str = "CONFIG";
}

/// Stable numeric ids of event kinds. Never renumber: recorded captures depend on them.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// Bytes read from or written to a socket ([`DataEvent`] + payload).
    Data = 1,
    /// A connect() on a TCP socket succeeded or is in progress ([`ConnEvent`]).
    Connect = 2,
    /// accept()/accept4() returned a new TCP socket ([`ConnEvent`]).
    Accept = 3,
    /// close() of a socket the programs had seen ([`ConnEvent`]).
    Close = 4,
    /// A process called execve ([`ProcEvent`]).
    Exec = 5,
    /// A process (thread group) exited ([`ProcEvent`]).
    Exit = 6,
    /// The agent itself connected a TCP socket (its exports): the local port is
    /// excluded from tracing on the receiving end ([`ConnEvent`]).
    OwnConnect = 7,
    /// The agent closed one of its own TCP sockets ([`ConnEvent`]).
    OwnClose = 8,
    /// The sk_msg program wrote a `traceparent` into a request ([`InjectEvent`]).
    Inject = 9,
}

impl EventKind {
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::Data,
            2 => Self::Connect,
            3 => Self::Accept,
            4 => Self::Close,
            5 => Self::Exec,
            6 => Self::Exit,
            7 => Self::OwnConnect,
            8 => Self::OwnClose,
            9 => Self::Inject,
            _ => return None,
        })
    }
}

/// Which way bytes moved, seen from the traced process.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// The process received them (read, recv*).
    Ingress = 0,
    /// The process sent them (write, send*, sendfile).
    Egress = 1,
}

impl Direction {
    /// 0 or 1, to index per-direction state.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The other way.
    pub const fn opposite(self) -> Direction {
        match self {
            Direction::Ingress => Direction::Egress,
            Direction::Egress => Direction::Ingress,
        }
    }
}

/// The syscall that produced a data event, for diagnostics and metrics.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyscallId {
    Read = 0,
    Write = 1,
    Readv = 2,
    Writev = 3,
    Recvfrom = 4,
    Sendto = 5,
    Recvmsg = 6,
    Sendmsg = 7,
    Sendfile = 8,
    /// Plaintext returned by a TLS library's read (SSL_read, SSL_read_ex).
    TlsRead = 9,
    /// Plaintext handed to a TLS library's write (SSL_write, SSL_write_ex).
    TlsWrite = 10,
}

impl SyscallId {
    /// Whether the event carries TLS plaintext rather than bytes on the wire.
    pub fn is_tls(v: u32) -> bool {
        v == SyscallId::TlsRead as u32 || v == SyscallId::TlsWrite as u32
    }
}

impl SyscallId {
    pub fn name(v: u32) -> &'static str {
        match v {
            0 => "read",
            1 => "write",
            2 => "readv",
            3 => "writev",
            4 => "recvfrom",
            5 => "sendto",
            6 => "recvmsg",
            7 => "sendmsg",
            8 => "sendfile",
            9 => "tls_read",
            10 => "tls_write",
            _ => "unknown",
        }
    }
}

/// Who opened the connection, as far as the kernel side knows.
pub mod role {
    /// Neither accept nor connect was seen (the connection predates the agent).
    pub const UNKNOWN: u32 = 0;
    /// The process connect()ed.
    pub const CLIENT: u32 = 1;
    /// The process accept()ed.
    pub const SERVER: u32 = 2;
}

/// Start of every event in the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EventHeader {
    /// An [`EventKind`] value.
    pub kind: u32,
    /// Process id (thread group id).
    pub tgid: u32,
    /// Thread id; in a Go program, the goroutine's identity instead where the probes
    /// know it ([`is_goroutine_id`]).
    pub tid: u32,
    /// The file descriptor the event is about (or 0 for process events).
    pub fd: u32,
    /// CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns) when the event happened.
    pub ts_ns: u64,
}

/// Whether an [`EventHeader::tid`] is a Go goroutine's identity, which the probes put
/// there instead of the thread id when they know which goroutine a Go program's I/O is
/// for (thread ids are below 2^22; these have the top bit set).
pub const fn is_goroutine_id(tid: u32) -> bool {
    tid & 0x8000_0000 != 0
}

/// Addresses of a TCP socket, as the owning process sees it: `s*` local, `d*` remote.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockTuple {
    /// AF_INET (2) or AF_INET6 (10).
    pub family: u16,
    /// Local port, host byte order.
    pub sport: u16,
    /// Remote port, host byte order.
    pub dport: u16,
    pub _pad: u16,
    /// Local address: 4 bytes for IPv4, 16 for IPv6, network order.
    pub saddr: [u8; 16],
    /// Remote address, same layout.
    pub daddr: [u8; 16],
}

/// What the programs remember about one (process, descriptor) they looked at.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SockInfo {
    pub tuple: SockTuple,
    /// 1 when the descriptor is a TCP socket, 0 when it is anything else (negative cache).
    pub is_tcp: u32,
    /// A [`role`] value.
    pub role: u32,
    /// Bytes received so far on this descriptor (the next ingress stream offset).
    pub ingress_bytes: u64,
    /// Bytes sent so far (the next egress stream offset).
    pub egress_bytes: u64,
    /// 1 once a TLS library was seen using this socket: its bytes on the wire are
    /// ciphertext and are no longer sent up; the plaintext comes from the uprobes.
    pub is_tls: u32,
    pub _pad: u32,
    /// Plaintext bytes received / sent through the TLS library (stream offsets).
    pub tls_ingress_bytes: u64,
    pub tls_egress_bytes: u64,
}

/// Header of a data event; `captured` payload bytes follow it in the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DataEvent {
    pub header: EventHeader,
    pub tuple: SockTuple,
    /// Offset of the first byte of this event within its direction's stream, counted
    /// since the programs first saw the descriptor. A jump means bytes were lost.
    pub offset: u64,
    /// Bytes the syscall really moved.
    pub len: u64,
    /// Bytes copied after this header (at most the payload cap, at most `len`).
    pub captured: u32,
    /// A [`Direction`] value.
    pub direction: u32,
    /// A [`SyscallId`] value.
    pub syscall: u32,
    /// A [`role`] value, as known when the event was made.
    pub role: u32,
}

/// Connect, accept and close of a TCP socket.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ConnEvent {
    pub header: EventHeader,
    pub tuple: SockTuple,
    /// A [`role`] value.
    pub role: u32,
    /// For connect: the syscall's return value (0 or -EINPROGRESS); else 0.
    pub ret: i32,
}

/// A `traceparent` the sk_msg program wrote into an outgoing request: the ids it
/// drew, which the client span of that request takes.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct InjectEvent {
    /// `tgid`/`tid` of the writer; `fd` is 0 (sk_msg does not know it).
    pub header: EventHeader,
    /// The connection, as the writer sees it (local = `s*`).
    pub tuple: SockTuple,
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// HTTP: the request's number on its connection, counted from 0 since it was
    /// established (every request head the program saw, injected or not). AMQP: the
    /// basic.publish's number on its connection, counted the same way.
    pub seq: u64,
    /// An [`inject::PROTO_HTTP`] or [`inject::PROTO_AMQP`] value.
    pub protocol: u32,
    /// AMQP: the channel of the publish (0 for HTTP).
    pub channel: u32,
}

/// traceparent injection (sock_ops + sk_msg).
pub mod inject {
    /// Plaintext HTTP/1.x requests.
    pub const PROTO_HTTP: u32 = 1;
    /// AMQP 0-9-1 basic.publish.
    pub const PROTO_AMQP: u32 = 2;

    /// Length of the header line written: `traceparent: 00-<32>-<16>-01\r\n`.
    pub const HEADER_LEN: u32 = 70;
    /// Length of the headers-table entry written into an AMQP content header:
    /// shortstr `traceparent`, type `S`, long string `00-<32>-<16>-01`.
    pub const AMQP_ENTRY_LEN: u32 = 72;
    /// Most bytes of a request head the program reads; a longer head is left alone.
    pub const MAX_HEAD: usize = 2048;

    /// Outcome counters (per-CPU array `INJECT_COUNTS`), one slot each.
    pub const INJECTED: u32 = 0;
    /// The request carried a `traceparent` already: left as it is.
    pub const ALREADY_PRESENT: u32 = 1;
    /// The request head did not end in the write that started it: left alone, and
    /// the connection is not rewritten any more (its request boundaries are unknown).
    pub const SPLIT_HEAD: u32 = 2;
    /// The connection's first bytes were a TLS record: never rewritten.
    pub const TLS: u32 = 3;
    /// The connection's first bytes were neither an HTTP/1.x request nor TLS.
    pub const NOT_DETECTED: u32 = 4;
    /// A chunked (or otherwise unsized) request body: this request was rewritten,
    /// but where the next one starts is unknown, so the connection is left alone.
    pub const UNSIZED_BODY: u32 = 5;
    /// A request head longer than [`MAX_HEAD`].
    pub const HEAD_TOO_LONG: u32 = 6;
    /// Bytes where a request head had to start but none did (the connection is left
    /// alone from there).
    pub const LOST_SYNC: u32 = 7;
    /// The kernel refused to make room for the header (bpf_msg_push_data failed).
    pub const PUSH_FAILED: u32 = 8;
    /// An AMQP publish left alone: a content header the injector does not rewrite
    /// (continued property flags, lengths that do not add up), a publish whose content
    /// header did not come before the next publish, or a protocol header other than
    /// 0-9-1's (then the whole connection).
    pub const AMQP_UNSUPPORTED: u32 = 9;
    /// Connections established in the traced cgroups that the sockhash had no room for.
    pub const SOCKHASH_FULL: u32 = 10;
    /// A header was written but its ids could not be reported (`INJECT_EVENTS` full):
    /// the other side continues a trace whose client span this agent lacks.
    pub const EVENT_LOST: u32 = 11;
    pub const COUNT: u32 = 12;

    /// `reason` label of each slot of `sonde_inject_skipped_total`, by index
    /// (slot 0 is `sonde_inject_injected_total`).
    pub const NAMES: [&str; COUNT as usize] = [
        "injected",
        "already_present",
        "split_head",
        "tls",
        "not_detected",
        "unsized_body",
        "head_too_long",
        "lost_sync",
        "push_failed",
        "amqp_unsupported",
        "sockhash_full",
        "event_lost",
    ];
}

/// Bytes of a new program's command line carried by an exec event.
pub const MAX_ARGS: usize = 256;
/// Bytes of a new program's environment carried by an exec event (OTEL_SERVICE_NAME
/// is read from it when the process is gone before user space looks at /proc).
pub const MAX_ENV: usize = 4096;

/// Exec and exit of a process. The exec event carries the program's name and command
/// line, so that a process that has exited by the time user space looks (curl, a
/// one-shot script) is still named right.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcEvent {
    pub header: EventHeader,
    /// Exit code for [`EventKind::Exit`], 0 otherwise.
    pub exit_code: i32,
    /// Bytes of `args` that are valid (NUL-separated arguments).
    pub args_len: u32,
    /// The task's comm, NUL-padded.
    pub comm: [u8; 16],
    /// Bytes of `env` that are valid (NUL-separated NAME=value strings).
    pub env_len: u32,
    /// For [`EventKind::Exec`]: the process and thread that forked this one
    /// (task_struct->real_parent), so that a program a service runs is put under
    /// the request that thread was handling; 0 when unknown.
    pub parent_tgid: u32,
    pub parent_tid: u32,
    pub _pad: u32,
    pub args: [u8; MAX_ARGS],
    pub env: [u8; MAX_ENV],
}

/// Offsets into kernel structures, read by user space from the running kernel's BTF
/// and handed to the programs, because Rust eBPF programs get no CO-RE relocations.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelOffsets {
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdtable_max_fds: u32,
    pub fdtable_fd: u32,
    pub file_private_data: u32,
    pub file_f_inode: u32,
    pub inode_i_mode: u32,
    pub socket_type: u32,
    pub socket_file: u32,
    pub socket_sk: u32,
    pub sk_family: u32,
    pub sk_daddr: u32,
    pub sk_rcv_saddr: u32,
    pub sk_dport: u32,
    pub sk_num: u32,
    pub sk_v6_daddr: u32,
    pub sk_v6_rcv_saddr: u32,
    pub sk_protocol: u32,
    pub task_exit_code: u32,
    pub task_mm: u32,
    pub mm_arg_start: u32,
    pub mm_arg_end: u32,
    pub mm_env_start: u32,
    pub mm_env_end: u32,
    pub task_real_parent: u32,
    pub task_pid: u32,
    pub task_tgid: u32,
    pub _pad: u32,
}

/// Settings of the programs, fixed at load time.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ProbeConfig {
    pub offsets: KernelOffsets,
    /// Payload prefix copied per data event, at most [`MAX_PAYLOAD`].
    pub payload_cap: u32,
    /// The agent's own process id, never traced.
    pub agent_tgid: u32,
    /// Ring buffer fill (bytes) above which a submit wakes the reader at once; below it
    /// the reader picks events up on its own timer, which saves wake-ups under load.
    pub wakeup_bytes: u64,
    /// Which process filters are on (`select::*` bits): with none, no filter costs
    /// anything.
    pub select: u32,
    /// Offset of `child_pid` in the sched/sched_process_fork record (its tracefs
    /// `format` file; the layout changed in Linux 6.x).
    pub fork_child_pid_offset: u32,
    /// The injector's sampled flag: a traceparent it writes says sampled (`-01`) when
    /// the 56 random bits of its trace id (the last 7 bytes, big-endian) are below
    /// this, as the agent's sampling ratio decides a trace without an order id; `-00`
    /// otherwise. `1 << 56` for a ratio of 1.
    pub sample_below: u64,
    /// 1 with `--follow-goroutines`: the Go probes mark which goroutine does each Go
    /// socket's I/O and data events carry it; 0: neither (no map lookup per event).
    pub follow_goroutines: u32,
    pub _pad: u32,
}

/// Process filters of [`ProbeConfig::select`].
pub mod select {
    /// Processes in `EXCLUDED_TGIDS` are not traced (command names, config rules).
    pub const EXCLUDED: u32 = 1;
    /// Only processes in one of the `CGROUPS` (or below) are traced.
    pub const CGROUPS: u32 = 2;
    /// Programs whose command name is in `EXCLUDED_COMMS` are put into `EXCLUDED_TGIDS`
    /// when they start.
    pub const COMMS: u32 = 4;
    /// Deepest cgroup level looked at for an ancestor in `CGROUPS`.
    pub const MAX_CGROUP_DEPTH: u32 = 16;
}

/// Counters of events the programs had to drop, one slot each (per-CPU array).
/// Every path that gives up on an event counts here.
pub mod lost {
    /// The ring buffer was full.
    pub const RINGBUF_FULL: u32 = 0;
    /// A kernel read of a structure failed (offsets, races with close).
    pub const KERNEL_READ: u32 = 1;
    /// A user-space buffer could not be read.
    pub const USER_READ: u32 = 2;
    /// The per-CPU scratch buffer could not be had.
    pub const NO_SCRATCH: u32 = 3;
    /// An event came out larger than the scratch buffer (cannot happen with a valid
    /// payload cap; counted so that a bug shows).
    pub const OVERSIZE: u32 = 4;
    /// A map that carries a call from its entry to its exit was full: the call's
    /// bytes are lost (the stream offsets stay right only for what was counted).
    pub const MAP_FULL: u32 = 5;
    /// TLS plaintext whose socket could not be told at all.
    pub const TLS_NO_SOCKET: u32 = 6;
    pub const COUNT: u32 = 7;

    /// Metric label of each cause, by index.
    pub const NAMES: [&str; COUNT as usize] = [
        "ringbuf_full",
        "kernel_read",
        "user_read",
        "no_scratch",
        "oversize",
        "map_full",
        "tls_no_socket",
    ];
}

/// Counters of things the programs did that are not losses (per-CPU array `COUNTERS`).
pub mod counter {
    /// TLS plaintext sent up on a socket guessed from the thread's last socket read,
    /// because the library uses memory BIOs and the association was not confirmed yet.
    pub const TLS_GUESSED: u32 = 0;
    /// A memory-BIO TLS session's socket confirmed by the TLS record written right
    /// after the library call.
    pub const TLS_CONFIRMED: u32 = 1;
    /// A guessed association replaced by a confirmed one (the guess was wrong).
    pub const TLS_CORRECTED: u32 = 2;
    /// A syscall's bytes split at the start of the next message that user space
    /// announced, with a window copied from there.
    pub const MESSAGE_WINDOWS: u32 = 3;
    pub const COUNT: u32 = 4;

    /// Metric name of each counter, by index.
    pub const NAMES: [&str; COUNT as usize] = [
        "sonde_tls_sockets_guessed_total",
        "sonde_tls_sockets_confirmed_total",
        "sonde_tls_sockets_corrected_total",
        "sonde_message_windows_total",
    ];
}

/// Where the next message (or frame) starts in each stream of one descriptor, as user
/// space announced it (map `NEXT_MESSAGE`, keyed like `SOCKETS`). A syscall whose
/// bytes cross that offset beyond the copied prefix is split there, and a prefix is
/// copied from the new message's first byte as well.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextMessage {
    /// Stream offset per stream, by [`NextMessage::slot`]; 0 when unknown.
    pub offset: [u64; 4],
    /// A [`framing`] value per stream: whether the programs may follow the frames
    /// from that offset on by themselves.
    pub framing: [u32; 4],
}

impl NextMessage {
    /// The slot of a stream: wire bytes or TLS plaintext, each way.
    pub const fn slot(direction: Direction, tls: bool) -> usize {
        direction.index() + if tls { 2 } else { 0 }
    }
}

/// How the programs may follow messages past the announced offset.
pub mod framing {
    /// Only the announced offset is known.
    pub const NONE: u32 = 0;
    /// AMQP 0-9-1 frames: type (1), channel (2), size (4, big endian), payload,
    /// end octet. The programs read each frame header they copy and move the offset
    /// to the next frame.
    pub const AMQP: u32 = 1;
}

/// The sock_common / socket type values the programs test for.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const SOCK_STREAM: u16 = 1;
pub const IPPROTO_TCP: u16 = 6;
pub const S_IFMT: u16 = 0o170000;
pub const S_IFSOCK: u16 = 0o140000;

const _: () = assert!(core::mem::size_of::<EventHeader>() == 24);
const _: () = assert!(core::mem::size_of::<SockTuple>() == 40);
const _: () = assert!(core::mem::size_of::<SockInfo>() == 88);
const _: () = assert!(core::mem::size_of::<DataEvent>() == 96);
const _: () = assert!(core::mem::size_of::<ConnEvent>() == 72);
const _: () = assert!(core::mem::size_of::<InjectEvent>() == 104);
const _: () = assert!(core::mem::size_of::<ProcEvent>() == 64 + MAX_ARGS + MAX_ENV);
const _: () = assert!(core::mem::size_of::<KernelOffsets>() == 112);
const _: () = assert!(core::mem::size_of::<ProbeConfig>() == 152);
const _: () = assert!(core::mem::size_of::<NextMessage>() == 48);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: each type is #[repr(C)], Copy, made of integers and arrays of integers
    // with explicit padding (checked by the size assertions above), so every bit
    // pattern is a valid value and none has uninitialised bytes.
    unsafe impl aya::Pod for SockTuple {}
    unsafe impl aya::Pod for SockInfo {}
    unsafe impl aya::Pod for KernelOffsets {}
    unsafe impl aya::Pod for ProbeConfig {}
    unsafe impl aya::Pod for NextMessage {}
    unsafe impl aya::Pod for InjectEvent {}
}
