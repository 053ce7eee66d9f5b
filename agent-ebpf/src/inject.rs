//! sonde's second eBPF object, loaded only with `--inject-traceparent`, so that an
//! agent without it (or without CAP_NET_ADMIN, which a sockhash needs) never creates
//! the sockhash.
//!
//! traceparent injection: a cgroup sock_ops program puts each
//! TCP connection a traced process opens into a sockhash, and the sk_msg program
//! attached to that sockhash sees every `sendmsg` on it before TCP does. Into each
//! plaintext HTTP/1.x request head that has no `traceparent`, it inserts one line
//! after the request line, with ids it draws, and reports them (`InjectEvent`) so
//! that the agent's client span for that request gets exactly those ids.
//!
//! It never guesses. It rewrites only a head that lies whole in the bytes of the
//! message it is given, and follows request boundaries with `bpf_msg_apply_bytes`
//! (head plus Content-Length body: the program does not run again until the next
//! request, in the same write or a later one). A connection whose boundaries it
//! loses (a head split over writes, a chunked body, bytes that do not start a
//! request) is left alone from then on, and every case is counted in `INJECT_COUNTS`.

#![no_std]
#![no_main]
// For `opaque`, a one-instruction inline assembly block.
#![feature(asm_experimental_arch)]

#[path = "branchless.rs"]
mod branchless;
#[path = "config.rs"]
mod config;

use agent_common::{
    AF_INET6, EventHeader, EventKind, InjectEvent, SockTuple,
    inject::{self, AMQP_ENTRY_LEN, HEADER_LEN, MAX_HEAD},
};
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, sk_action::SK_PASS, sk_msg_md},
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_ktime_get_ns,
        generated::{bpf_loop, bpf_msg_apply_bytes, bpf_msg_pull_data, bpf_probe_read_kernel},
    },
    macros::{map, sk_msg, sock_ops, stream_verdict},
    maps::{LruHashMap, PerCpuArray, RingBuf, SockHash},
    programs::{SkBuffContext, SkMsgContext, SockOpsContext},
};

use crate::{
    branchless::{below, in_range, is_zero, masked, name_at, pick},
    config::setting,
};

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects any path that could get here.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// The ids of each header written, to user space (its own ring buffer: this object
/// shares no map with the main one). Read before each event of the main ring buffer,
/// since every injection is committed before the write that carries it returns.
#[map(name = "INJECT_EVENTS")]
pub static INJECT_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Connections traced processes opened (local/remote as they see it), put here by
/// the sock_ops program so that the sk_msg program attached to this map sees what
/// they send (`--inject-traceparent`). The kernel removes a socket when it closes.
#[map(name = "INJECT_SOCKETS")]
pub static INJECT_SOCKETS: SockHash<SockTuple> = SockHash::with_max_entries(65536, 0);

/// Per connection of `INJECT_SOCKETS`: where the injector stands.
#[map(name = "INJECT_STATE")]
pub static INJECT_STATE: LruHashMap<SockTuple, InjectState> =
    LruHashMap::with_max_entries(65536, 0);

/// Outcomes of the injector, by `agent_common::inject` slot.
#[map(name = "INJECT_COUNTS")]
pub static INJECT_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(inject::COUNT, 0);

/// Where the injector copies the start of a message to read its head.
#[map(name = "INJECT_SCRATCH")]
pub static INJECT_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// The head (or content header frame) being read.
#[repr(C)]
pub struct Scratch {
    pub buf: [u8; MAX_HEAD],
    /// The report of a header written, and the header (off the 512-byte stack).
    pub event: InjectEvent,
    pub line: [u8; HEADER_LEN as usize],
    /// The AMQP headers-table entry, after the 4-byte length of a new table.
    pub entry: [u8; 4 + AMQP_ENTRY_LEN as usize],
}

/// What the injector knows of one connection.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct InjectState {
    /// Requests (HTTP) or basic.publish frames (AMQP) seen so far: the number of the
    /// next one.
    pub seq: u64,
    /// AMQP: the number of the publish whose content header is awaited.
    pub pending_seq: u64,
    /// A [`mode`] value.
    pub mode: u32,
    /// AMQP: 1 + the channel of the publish whose content header is awaited; 0 when
    /// none is.
    pub pending: u32,
}

/// What the program knows of a connection's protocol ([`InjectState::mode`]).
pub mod mode {
    /// Nothing sent yet.
    pub const NEW: u32 = 0;
    /// HTTP/1.x requests, followed request by request.
    pub const HTTP: u32 = 1;
    /// Left alone for good.
    pub const LEFT: u32 = 2;
    /// AMQP 0-9-1, followed frame by frame.
    pub const AMQP: u32 = 3;
}

#[inline(always)]
fn bump(what: u32) {
    if let Some(p) = INJECT_COUNTS.get_ptr_mut(what) {
        // SAFETY: this CPU's slot of a per-CPU array; programs do not migrate mid-run.
        unsafe { *p += 1 };
    }
}

/// One field of the context, loaded whole at its own offset from the context pointer
/// (the verifier refuses a load through a pointer computed from it).
macro_rules! ctx_field {
    ($msg:expr, $($field:tt)+) => {
        // SAFETY: the kernel's context for this run; the field is read once, whole.
        unsafe { core::ptr::read_volatile(&raw const (*$msg).$($field)+) }
    };
}

/// The socket's tuple, as the SOCKETS map keys it, from a context that has the
/// addresses and ports (`bpf_sock_ops` and `sk_msg_md` name them alike). A macro, not
/// a function: each context type must be read at constant offsets of its own.
macro_rules! ctx_tuple {
    ($ctx:expr) => {{
        let family = ctx_field!($ctx, family);
        let local_port = ctx_field!($ctx, local_port);
        let remote_port_raw = ctx_field!($ctx, remote_port);
        let mut key = SockTuple {
            family: family as u16,
            sport: local_port as u16,
            dport: remote_port(remote_port_raw),
            ..SockTuple::default()
        };
        if family == AF_INET6 as u32 {
            key.saddr = ip6_bytes([
                ctx_field!($ctx, local_ip6[0]),
                ctx_field!($ctx, local_ip6[1]),
                ctx_field!($ctx, local_ip6[2]),
                ctx_field!($ctx, local_ip6[3]),
            ]);
            key.daddr = ip6_bytes([
                ctx_field!($ctx, remote_ip6[0]),
                ctx_field!($ctx, remote_ip6[1]),
                ctx_field!($ctx, remote_ip6[2]),
                ctx_field!($ctx, remote_ip6[3]),
            ]);
        } else {
            let local = ctx_field!($ctx, local_ip4);
            let remote = ctx_field!($ctx, remote_ip4);
            key.saddr[..4].copy_from_slice(&local.to_ne_bytes());
            key.daddr[..4].copy_from_slice(&remote.to_ne_bytes());
        }
        key
    }};
}

/// sock_ops, attached to the traced cgroups: `struct bpf_sock_ops`. On
/// BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB (a connect() completed) the socket goes into
/// the sockhash, whose sk_msg program then sees what it sends.
#[sock_ops]
pub fn inject_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        return 1;
    }
    let ops = ctx.ops;
    let key = ctx_tuple!(ops);
    if INJECT_STATE
        .insert(key, InjectState::default(), BPF_ANY as u64)
        .is_err()
    {
        bump(inject::SOCKHASH_FULL);
        return 1;
    }
    // SAFETY: the context pointer is the kernel's bpf_sock_ops for this run.
    let ops = unsafe { &mut *ctx.ops };
    if INJECT_SOCKETS.update(key, ops, BPF_ANY as u64).is_err() {
        bump(inject::SOCKHASH_FULL);
        let _ = INJECT_STATE.remove(key);
    }
    1
}

/// The remote port of sock_ops and sk_msg contexts is in network order, in the upper
/// 16 bits on some kernels and the lower on others.
#[inline(always)]
fn remote_port(raw: u32) -> u16 {
    let be = if raw > 0xffff { raw >> 16 } else { raw };
    u16::from_be(be as u16)
}

#[inline(always)]
fn ip6_bytes(words: [u32; 4]) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (i, w) in words.iter().enumerate() {
        out[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    out
}

/// sk_skb stream verdict, attached to `INJECT_SOCKETS`: passes every received byte on
/// to the socket, unchanged. Without it, on this kernel (6.18, and others: see
/// grafana/beyla#2941) FIONREAD on a socket in a sockhash answers 0 while data waits,
/// because the sockhash's ioctl counts only what went through its own receive queue;
/// with it, the bytes do, and FIONREAD counts them.
#[stream_verdict]
pub fn inject_rx(_ctx: SkBuffContext) -> u32 {
    SK_PASS
}

/// sk_msg, attached to `INJECT_SOCKETS`: `struct sk_msg_md` of one sendmsg (or of a
/// part of it, after an apply_bytes verdict ran out). Always passes the bytes on.
#[sk_msg]
pub fn inject_msg(ctx: SkMsgContext) -> u32 {
    let _ = try_inject_msg(&ctx);
    SK_PASS
}

#[inline(always)]
fn msg_key(msg: *const sk_msg_md) -> SockTuple {
    ctx_tuple!(msg)
}

/// Copies the first `len` bytes (1 to MAX_HEAD) of the message at `data` into `buf`.
/// The size is masked where the verifier sees it: the optimiser keeps the bound its
/// caller checked on another register than the one the helper is given.
#[inline(always)]
fn copy_in(buf: &mut [u8; MAX_HEAD], data: usize, len: usize) -> Result<(), ()> {
    if len == 0 {
        return Err(());
    }
    let n = byte_at(len - 1) + 1;
    // SAFETY: `buf` holds MAX_HEAD bytes and `n` is at most that.
    let r = unsafe {
        bpf_probe_read_kernel(
            buf.as_mut_ptr() as *mut core::ffi::c_void,
            n as u32,
            data as *const core::ffi::c_void,
        )
    };
    if r == 0 { Ok(()) } else { Err(()) }
}

/// What a request head says, read from the scratch copy.
struct Head {
    /// Bytes of the head, the blank line included; 0 when it does not end in the copy.
    len: u32,
    /// Where the request line ends (after its CRLF): the new header goes there.
    first_line_end: u32,
    has_traceparent: bool,
    /// Content-Length, when the head gives one.
    content_length: u64,
    /// Transfer-Encoding was given: the body's end is not known from the head.
    body_unsized: bool,
    /// More header lines than are looked at.
    too_long: bool,
}

const MASK: usize = MAX_HEAD - 1;

/// Most header lines looked at; a head with more is left alone.
const MAX_LINES: usize = 63;

#[inline(always)]
fn byte_at(i: usize) -> usize {
    masked::<MAX_HEAD>(i)
}

/// The decimal number at `at` (after optional blanks), read without branches on the
/// bytes; `None` when there is none or it has more than 18 digits.
#[inline(always)]
fn parse_decimal(buf: &[u8; MAX_HEAD], at: usize, len: usize) -> Option<u64> {
    let mut value = 0u64;
    let mut digits = 0u64;
    let mut done = 0u64;
    let mut bad = 0u64;
    let mut j = 0usize;
    while j < 24 {
        let b = buf[byte_at(at + j)] as u64;
        let open = (1 ^ done) & below((at + j) as u64, len as u64);
        let digit = b.wrapping_sub(b'0' as u64);
        let is_digit = in_range(b, b'0' as u64, b'9' as u64) & open;
        let blank = (is_zero(b ^ b' ' as u64) | is_zero(b ^ b'\t' as u64)) & open;
        value = pick(is_digit, value.wrapping_mul(10).wrapping_add(digit), value);
        digits += is_digit;
        // Blanks before the digits are skipped; anything else ends the number.
        done |= open & (1 ^ is_digit) & (1 ^ (blank & is_zero(digits)));
        done |= 1 ^ below((at + j) as u64, len as u64);
        j += 1;
    }
    bad |= is_zero(digits) | (1 ^ below(digits, 19));
    (bad == 0).then_some(value)
}

/// Reads the head at the start of `buf[..len]`: one bpf_loop over its bytes, which
/// stops at the blank line (the verifier checks the callback once, whatever the
/// length, and the program runs over the head only, not its whole window).
#[inline(always)]
fn read_head(buf: &[u8; MAX_HEAD], len: usize) -> Head {
    let mut scan = HeadScan {
        window: 0,
        first_line_end: 0,
        head_end: 0,
        lines: 0,
        content_length_at: 0,
        found: 0,
    };
    // SAFETY: the callback reads only the scratch copy; `scan` outlives the call.
    unsafe {
        bpf_loop(
            len as u32,
            scan_head_byte as *mut core::ffi::c_void,
            &raw mut scan as *mut core::ffi::c_void,
            0,
        )
    };
    let mut head = Head {
        len: scan.head_end,
        first_line_end: scan.first_line_end,
        has_traceparent: scan.found & FOUND_TRACEPARENT != 0,
        content_length: 0,
        body_unsized: scan.found & FOUND_TRANSFER_ENCODING != 0,
        too_long: false,
    };
    if scan.lines as usize >= MAX_LINES {
        // Lines beyond those looked at could say anything.
        head.len = 0;
        head.too_long = true;
    }
    if scan.content_length_at != 0 {
        match parse_decimal(buf, scan.content_length_at as usize, len) {
            Some(v) => head.content_length = v,
            None => head.body_unsized = true,
        }
    }
    head
}

/// [`HeadScan::found`] bits.
const FOUND_TRACEPARENT: u32 = 1;
const FOUND_TRANSFER_ENCODING: u32 = 2;

/// The state of [`scan_head_byte`].
#[repr(C)]
struct HeadScan {
    /// The last four bytes, the newest lowest.
    window: u32,
    /// Where the request line ends (after its CRLF).
    first_line_end: u32,
    /// Bytes of the head, the blank line included; 0 while not found.
    head_end: u32,
    /// Header lines seen.
    lines: u32,
    /// Where the value of Content-Length starts, if a line names it.
    content_length_at: u32,
    /// `FOUND_*` bits.
    found: u32,
}

/// bpf_loop callback, byte `i` of the head: at each line's start, looks at the header
/// name; stops at the blank line, or when there are more lines than are looked at.
extern "C" fn scan_head_byte(i: u32, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: bpf_loop passes the `HeadScan` it was given.
    let scan = unsafe { &mut *(ctx as *mut HeadScan) };
    let Some(scratch) = INJECT_SCRATCH.get_ptr(0) else {
        return 1;
    };
    // SAFETY: this CPU's scratch value, read only here.
    let buf = unsafe { &(*scratch).buf };
    let b = buf[(i as usize) & MASK];
    scan.window = (scan.window << 8) | b as u32;
    if scan.window & 0xffff != 0x0d0a {
        return 0;
    }
    let next = i + 1;
    if scan.window == 0x0d0a_0d0a {
        scan.head_end = next;
        return 1;
    }
    if scan.first_line_end == 0 {
        // The request line's end: what follows is the first header line.
        scan.first_line_end = next;
        return 0;
    }
    scan.lines += 1;
    if scan.lines as usize >= MAX_LINES {
        return 1;
    }
    let at = next as usize;
    match buf[at & MASK] | 0x20 {
        b't' => {
            if name_at(buf, at, b"traceparent:") != 0 {
                scan.found |= FOUND_TRACEPARENT;
            } else if name_at(buf, at, b"transfer-encoding:") != 0 {
                scan.found |= FOUND_TRANSFER_ENCODING;
            }
        }
        b'c' if name_at(buf, at, b"content-length:") != 0 => {
            scan.content_length_at = next + 15;
        }
        _ => {}
    }
    0
}

/// Whether the bytes start an HTTP/1.x request line: 3 to 15 upper-case letters (the
/// method) and a space. Read without branches on the bytes.
#[inline(always)]
fn starts_request(buf: &[u8; MAX_HEAD], len: usize) -> bool {
    let mut letters = 0u64;
    let mut space_at = 0u64;
    let mut open = 1u64;
    let mut i = 0usize;
    while i < 16 {
        let b = buf[i] as u64;
        let here = open & below(i as u64, len as u64);
        let upper = in_range(b, b'A' as u64, b'Z' as u64) & here;
        let space = is_zero(b ^ b' ' as u64) & here;
        letters += upper;
        space_at = pick(space, i as u64, space_at);
        open = upper;
        i += 1;
    }
    space_at >= 3 && letters == space_at
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn try_inject_msg(ctx: &SkMsgContext) -> Result<(), ()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if tgid == setting!(agent_tgid) {
        return Ok(());
    }
    let scratch = INJECT_SCRATCH.get_ptr_mut(0).ok_or(())?;
    // SAFETY: this CPU's scratch value, which nothing else uses during this run.
    let Scratch {
        buf,
        event,
        line,
        entry,
    } = unsafe { &mut *scratch };
    // The key is put together where the report needs it, off the stack.
    event.tuple = msg_key(ctx.msg);
    // By reference: a copy would go on the stack, which is nearly full.
    #[allow(clippy::needless_borrows_for_generic_args)]
    let state = INJECT_STATE.get_ptr_mut(&event.tuple).ok_or(())?;
    // SAFETY: a value of the hash map, valid for this run; one program run per
    // socket at a time (sendmsg holds the socket lock).
    let state = unsafe { &mut *state };
    if state.mode == mode::LEFT {
        return Ok(());
    }
    let size = ctx.size();
    if size == 0 {
        return Ok(());
    }
    // A frame is known from its first 11 bytes (header, class and method).
    let most = if state.mode == mode::AMQP {
        AMQP_PEEK
    } else {
        MAX_HEAD as u32
    };
    let want = if size > most { most } else { size };
    // SAFETY: helper on this run's context.
    if unsafe { bpf_msg_pull_data(ctx.msg, 0, want, 0) } != 0 {
        return Err(());
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    let len = end.saturating_sub(data);
    if len == 0 || len > MAX_HEAD {
        return Err(());
    }
    // SAFETY: `buf` holds MAX_HEAD bytes; `len` is at most that.
    copy_in(buf, data, len)?;

    if state.mode == mode::AMQP {
        return amqp_frame(ctx, state, buf, len, size, pid_tgid, event, entry);
    }
    if state.mode == mode::NEW {
        if len >= 2 && buf[0] == 0x16 && buf[1] == 0x03 {
            return leave(state, inject::TLS);
        }
        if len >= 8 && &buf[..8] == AMQP_HEADER {
            state.mode = mode::AMQP;
            // SAFETY: helper on this run's context.
            unsafe { bpf_msg_apply_bytes(ctx.msg, AMQP_HEADER.len() as u32) };
            return Ok(());
        }
        if len >= 4 && &buf[..4] == b"AMQP" {
            return leave(state, inject::AMQP_UNSUPPORTED);
        }
        // The HTTP/2 preface (PRI * HTTP/2.0) looks like a request line: a header
        // written into it would break the connection.
        if len >= 4 && &buf[..4] == b"PRI " {
            return leave(state, inject::NOT_DETECTED);
        }
        if !starts_request(buf, len) {
            return leave(state, inject::NOT_DETECTED);
        }
        state.mode = mode::HTTP;
    } else if !starts_request(buf, len) {
        return leave(state, inject::LOST_SYNC);
    }

    let head = read_head(buf, len);
    if head.len == 0 {
        let why = if len == MAX_HEAD || head.too_long {
            inject::HEAD_TOO_LONG
        } else {
            inject::SPLIT_HEAD
        };
        return leave(state, why);
    }
    let seq = state.seq;
    state.seq += 1;
    let added = if head.has_traceparent {
        bump(inject::ALREADY_PRESENT);
        0
    } else {
        if !write_traceparent(ctx, &head, pid_tgid, seq, event, line) {
            // Whether the kernel made the room or not, the bytes are no longer known.
            return leave(state, inject::PUSH_FAILED);
        }
        HEADER_LEN
    };
    if head.body_unsized {
        return leave(state, inject::UNSIZED_BODY);
    }
    let request = head.len as u64 + added as u64 + head.content_length;
    if request > u32::MAX as u64 {
        return leave(state, inject::UNSIZED_BODY);
    }
    // SAFETY: helper on this run's context.
    unsafe { bpf_msg_apply_bytes(ctx.msg, request as u32) };
    Ok(())
}

#[inline(always)]
fn leave(state: &mut InjectState, why: u32) -> Result<(), ()> {
    state.mode = mode::LEFT;
    bump(why);
    Ok(())
}

/// Makes room after the request line and writes the header there; reports the ids.
/// False when the kernel refused (counted by the caller).
#[inline(always)]
fn write_traceparent(
    ctx: &SkMsgContext,
    head: &Head,
    pid_tgid: u64,
    seq: u64,
    event: &mut InjectEvent,
    line: &mut [u8; HEADER_LEN as usize],
) -> bool {
    draw_ids(event, pid_tgid, seq, inject::PROTO_HTTP, 0);
    line[..13].copy_from_slice(b"traceparent: ");
    write_value(event, line, 13);
    line[68..].copy_from_slice(b"\r\n");

    let at = head.first_line_end;
    if ctx.push_data(at, HEADER_LEN, 0).is_err() {
        return false;
    }
    // SAFETY: helper on this run's context.
    if unsafe { bpf_msg_pull_data(ctx.msg, at, at + HEADER_LEN, 0) } != 0 {
        return false;
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + HEADER_LEN as usize > end {
        return false;
    }
    let dst = data as *mut u8;
    for (i, b) in line.iter().enumerate() {
        // SAFETY: `data..data + HEADER_LEN` was checked against data_end above.
        unsafe { *dst.add(i) = *b };
    }
    bump(inject::INJECTED);
    if INJECT_EVENTS.output::<InjectEvent>(event, 0).is_err() {
        // The header is written, but the client span will not carry its ids.
        bump(inject::EVENT_LOST);
    }
    true
}

/// Draws the ids of one injection into the report.
#[inline(always)]
fn draw_ids(event: &mut InjectEvent, pid_tgid: u64, seq: u64, protocol: u32, channel: u32) {
    event.header = EventHeader {
        kind: EventKind::Inject as u32,
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        fd: 0,
        ts_ns: unsafe { bpf_ktime_get_ns() },
    };
    event.seq = seq;
    event.protocol = protocol;
    event.channel = channel;
    for chunk in event.trace_id.chunks_mut(4) {
        chunk.copy_from_slice(&unsafe { bpf_get_prandom_u32() }.to_ne_bytes());
    }
    for chunk in event.span_id.chunks_mut(4) {
        chunk.copy_from_slice(&unsafe { bpf_get_prandom_u32() }.to_ne_bytes());
    }
    // W3C: an all-zero id is invalid.
    event.trace_id[0] |= 1;
    event.span_id[0] |= 1;
}

/// Length of a traceparent value, `00-<32>-<16>-01`.
const VALUE_LEN: usize = 55;

/// Writes the traceparent value of the report's ids at `out[at..at + VALUE_LEN]`.
#[inline(always)]
fn write_value(event: &InjectEvent, out: &mut [u8], at: usize) {
    let out = &mut out[at..at + VALUE_LEN];
    out[..3].copy_from_slice(b"00-");
    for (i, b) in event.trace_id.iter().enumerate() {
        out[3 + 2 * i] = HEX[(b >> 4) as usize];
        out[4 + 2 * i] = HEX[(b & 15) as usize];
    }
    out[35] = b'-';
    for (i, b) in event.span_id.iter().enumerate() {
        out[36 + 2 * i] = HEX[(b >> 4) as usize];
        out[37 + 2 * i] = HEX[(b & 15) as usize];
    }
    // The sampled flag: the agent's ratio decision for this trace id.
    let random = event.trace_id[9..]
        .iter()
        .fold(0u64, |acc, &b| (acc << 8) | b as u64);
    let sampled = random < setting!(sample_below);
    out[52..].copy_from_slice(if sampled { b"-01" } else { b"-00" });
}

/// What an AMQP 0-9-1 client sends first.
const AMQP_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";
/// Bytes read of each AMQP frame to know it: its header (type, channel, size), and
/// the class and method of a method frame.
const AMQP_PEEK: u32 = 11;
const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xce;
/// Property flags of a content header (basic class).
const FLAG_CONTENT_TYPE: u16 = 0x8000;
const FLAG_CONTENT_ENCODING: u16 = 0x4000;
const FLAG_HEADERS: u16 = 0x2000;
/// Property flags go on in another 16 bits.
const FLAG_CONTINUED: u16 = 0x0001;
/// Where the properties of a content header frame start: the frame header (7), class,
/// weight (2 each), body size (8), property flags (2).
const PROPS_AT: usize = 21;
/// A headers-table entry named `traceparent`, as it starts: its shortstr name.
const ENTRY_NAME: &[u8; 12] = b"\x0btraceparent";

/// One AMQP frame starts at the first byte of the message (the program keeps it so with
/// `bpf_msg_apply_bytes`): a basic.publish is remembered, the content header that
/// follows it on its channel gets a traceparent entry, and the program is not run
/// again until the frame's last byte went by, whatever its size and however many
/// writes carry it.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn amqp_frame(
    ctx: &SkMsgContext,
    state: &mut InjectState,
    buf: &mut [u8; MAX_HEAD],
    len: usize,
    size: u32,
    pid_tgid: u64,
    event: &mut InjectEvent,
    entry: &mut [u8; 4 + AMQP_ENTRY_LEN as usize],
) -> Result<(), ()> {
    if len < 7 {
        // A frame header split over writes: where frames start is lost.
        return leave(state, inject::LOST_SYNC);
    }
    let kind = buf[0];
    let channel = u16::from_be_bytes([buf[1], buf[2]]) as u32;
    let frame = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as u64 + 8;
    if frame > (u32::MAX - 2 * AMQP_ENTRY_LEN) as u64 {
        return leave(state, inject::LOST_SYNC);
    }
    let mut added = 0;
    match kind {
        FRAME_METHOD => {
            if len < AMQP_PEEK as usize {
                return leave(state, inject::LOST_SYNC);
            }
            let class = u16::from_be_bytes([buf[7], buf[8]]);
            let method = u16::from_be_bytes([buf[9], buf[10]]);
            if class == 60 && method == 40 {
                if state.pending != 0 {
                    // The previous publish's content header never came.
                    bump(inject::AMQP_UNSUPPORTED);
                }
                state.pending = channel + 1;
                state.pending_seq = state.seq;
                state.seq += 1;
            }
        }
        FRAME_HEADER => {
            if state.pending == channel + 1 {
                state.pending = 0;
                match amqp_header(ctx, buf, frame as u32, size) {
                    Header::Write { at, table } => {
                        draw_ids(
                            event,
                            pid_tgid,
                            state.pending_seq,
                            inject::PROTO_AMQP,
                            channel,
                        );
                        if !amqp_write(ctx, at, table, frame as u32, event, entry) {
                            return leave(state, inject::PUSH_FAILED);
                        }
                        added = if table {
                            AMQP_ENTRY_LEN
                        } else {
                            AMQP_ENTRY_LEN + 4
                        };
                    }
                    Header::Leave(why) => bump(why),
                }
            }
        }
        FRAME_BODY | FRAME_HEARTBEAT => {}
        _ => return leave(state, inject::LOST_SYNC),
    }
    // SAFETY: helper on this run's context.
    unsafe { bpf_msg_apply_bytes(ctx.msg, frame as u32 + added) };
    Ok(())
}

/// What to do with a publish's content header.
enum Header {
    /// Insert the entry at `at`: into the table there (`table`), or a new table.
    Write { at: u32, table: bool },
    /// Leave it as it is, counted in this slot.
    Leave(u32),
}

/// Reads the content header frame (`frame` bytes) at the start of the message.
#[inline(always)]
fn amqp_header(ctx: &SkMsgContext, buf: &mut [u8; MAX_HEAD], frame: u32, size: u32) -> Header {
    if frame > size {
        // Not wholly in this write.
        return Header::Leave(inject::SPLIT_HEAD);
    }
    if frame as usize > MAX_HEAD {
        return Header::Leave(inject::HEAD_TOO_LONG);
    }
    if (frame as usize) < PROPS_AT + 1 {
        return Header::Leave(inject::AMQP_UNSUPPORTED);
    }
    // SAFETY: helper on this run's context.
    if unsafe { bpf_msg_pull_data(ctx.msg, 0, frame, 0) } != 0 {
        return Header::Leave(inject::PUSH_FAILED);
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    let len = end.saturating_sub(data);
    if len < frame as usize || len > MAX_HEAD {
        return Header::Leave(inject::PUSH_FAILED);
    }
    let len = frame as usize;
    if copy_in(buf, data, len).is_err() {
        return Header::Leave(inject::PUSH_FAILED);
    }
    // The properties end before the frame-end byte.
    let props_end = len - 1;
    if buf[props_end & MASK] != FRAME_END {
        return Header::Leave(inject::AMQP_UNSUPPORTED);
    }
    let flags = u16::from_be_bytes([buf[19], buf[20]]);
    if flags & FLAG_CONTINUED != 0 {
        return Header::Leave(inject::AMQP_UNSUPPORTED);
    }
    let mut at = PROPS_AT;
    // content-type and content-encoding, short strings, come before the headers.
    if flags & FLAG_CONTENT_TYPE != 0 {
        if at >= props_end {
            return Header::Leave(inject::AMQP_UNSUPPORTED);
        }
        at += 1 + buf[at & MASK] as usize;
    }
    if flags & FLAG_CONTENT_ENCODING != 0 {
        if at >= props_end {
            return Header::Leave(inject::AMQP_UNSUPPORTED);
        }
        at += 1 + buf[at & MASK] as usize;
    }
    if at > props_end {
        return Header::Leave(inject::AMQP_UNSUPPORTED);
    }
    if flags & FLAG_HEADERS == 0 {
        return Header::Write {
            at: at as u32,
            table: false,
        };
    }
    if at + 4 > props_end {
        return Header::Leave(inject::AMQP_UNSUPPORTED);
    }
    let table = u32::from_be_bytes([
        buf[at & MASK],
        buf[(at + 1) & MASK],
        buf[(at + 2) & MASK],
        buf[(at + 3) & MASK],
    ]) as usize;
    if at + 4 + table > props_end {
        return Header::Leave(inject::AMQP_UNSUPPORTED);
    }
    if table >= ENTRY_NAME.len() {
        let mut find = Find {
            from: (at + 4) as u32,
            found: 0,
        };
        let tries = (table - ENTRY_NAME.len() + 1) as u32;
        // SAFETY: the callback reads only the scratch buffer; `find` outlives the call.
        unsafe {
            bpf_loop(
                tries,
                find_entry_name as *mut core::ffi::c_void,
                &raw mut find as *mut core::ffi::c_void,
                0,
            )
        };
        if find.found != 0 {
            // Or a value that holds those bytes: left alone either way.
            return Header::Leave(inject::ALREADY_PRESENT);
        }
    }
    Header::Write {
        at: (at + 4) as u32,
        table: true,
    }
}

/// The search of [`find_entry_name`].
#[repr(C)]
struct Find {
    from: u32,
    found: u32,
}

/// bpf_loop callback: whether [`ENTRY_NAME`] starts at byte `from + i` of the scratch
/// copy; stops the loop when it does.
extern "C" fn find_entry_name(i: u32, ctx: *mut core::ffi::c_void) -> i64 {
    // SAFETY: bpf_loop passes the `Find` it was given.
    let find = unsafe { &mut *(ctx as *mut Find) };
    let Some(scratch) = INJECT_SCRATCH.get_ptr(0) else {
        return 1;
    };
    // SAFETY: this CPU's scratch value, read only here.
    let buf = unsafe { &(*scratch).buf };
    let at = (find.from + i) as usize;
    if buf[at & MASK] != ENTRY_NAME[0] {
        return 0;
    }
    let mut j = 1;
    while j < ENTRY_NAME.len() {
        if buf[(at + j) & MASK] != ENTRY_NAME[j] {
            return 0;
        }
        j += 1;
    }
    find.found = 1;
    1
}

/// Makes room at `at` of the content header (`frame` bytes) and writes the entry there,
/// with a table length first when there was no table (`!table`, and the headers flag
/// set), the table's or the frame's sizes grown to match; reports the ids. False when
/// the kernel refused.
#[inline(always)]
fn amqp_write(
    ctx: &SkMsgContext,
    at: u32,
    table: bool,
    frame: u32,
    event: &mut InjectEvent,
    entry: &mut [u8; 4 + AMQP_ENTRY_LEN as usize],
) -> bool {
    entry[..4].copy_from_slice(&AMQP_ENTRY_LEN.to_be_bytes());
    entry[4..16].copy_from_slice(ENTRY_NAME);
    entry[16] = b'S';
    entry[17..21].copy_from_slice(&(VALUE_LEN as u32).to_be_bytes());
    write_value(event, entry, 21);
    let n = if table {
        AMQP_ENTRY_LEN
    } else {
        AMQP_ENTRY_LEN + 4
    };
    if ctx.push_data(at, n, 0).is_err() {
        return false;
    }
    // SAFETY: helper on this run's context.
    if unsafe { bpf_msg_pull_data(ctx.msg, 0, at + n, 0) } != 0 {
        return false;
    }
    let (data, end) = (ctx.data(), ctx.data_end());
    if data + PROPS_AT > end {
        return false;
    }
    let p = data as *mut u8;
    // SAFETY: the first PROPS_AT bytes were checked against data_end above.
    unsafe {
        let new_size = (frame - 8 + n).to_be_bytes();
        for (i, b) in new_size.iter().enumerate() {
            *p.add(3 + i) = *b;
        }
        if !table {
            *p.add(19) |= (FLAG_HEADERS >> 8) as u8;
        }
    }
    if table {
        // The table's length (the 4 bytes before `at`), then the entry after it.
        let len_at = byte_at(at as usize - 4);
        let dst = data + len_at;
        if dst + 4 + AMQP_ENTRY_LEN as usize > end {
            return false;
        }
        let dst = dst as *mut u8;
        // SAFETY: `dst..dst + 4 + AMQP_ENTRY_LEN` was checked against data_end above.
        unsafe {
            let old = u32::from_be_bytes([*dst, *dst.add(1), *dst.add(2), *dst.add(3)]);
            let new = old.wrapping_add(AMQP_ENTRY_LEN).to_be_bytes();
            for (i, b) in new.iter().enumerate() {
                *dst.add(i) = *b;
            }
            for i in 0..AMQP_ENTRY_LEN as usize {
                *dst.add(4 + i) = entry[4 + i];
            }
        }
    } else {
        let dst = data + byte_at(at as usize);
        if dst + entry.len() > end {
            return false;
        }
        let dst = dst as *mut u8;
        // SAFETY: `dst..dst + entry.len()` was checked against data_end above.
        unsafe {
            for (i, b) in entry.iter().enumerate() {
                *dst.add(i) = *b;
            }
        }
    }
    bump(inject::INJECTED);
    if INJECT_EVENTS.output::<InjectEvent>(event, 0).is_err() {
        bump(inject::EVENT_LOST);
    }
    true
}
