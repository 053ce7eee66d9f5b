//! TLS plaintext at the library boundary: uprobes and uretprobes on OpenSSL (and
//! BoringSSL, which keeps the same names):
//!   int SSL_write(SSL *ssl, const void *buf, int num);
//!   int SSL_read(SSL *ssl, void *buf, int num);
//!   int SSL_write_ex(SSL *s, const void *buf, size_t num, size_t *written);
//!   int SSL_read_ex(SSL *ssl, void *buf, size_t num, size_t *readbytes);
//!   int SSL_do_handshake(SSL *s);   (SSL_accept and SSL_connect call it)
//!   void SSL_free(SSL *ssl);
//!   int BIO_write(BIO *b, const void *data, int dlen);   (libcrypto)
//! The plain forms return the byte count; the _ex forms return 1 and store the count
//! through the last argument. Plaintext goes up when the call returns, with what the
//! call really read or wrote (a write retried after WANT_WRITE counts once); a write
//! is stamped with the time its call began.
//!
//! Which socket an SSL object uses:
//! - with a socket BIO, the library reads or writes the socket itself inside the call,
//!   on the same thread: that socket, confirmed;
//! - with memory BIOs (Node.js, Python's SSLObject) the program moves the ciphertext
//!   itself, when it likes: Node.js writes a session's records later, batched, often
//!   after other sessions' calls on the same thread, so the order of calls and socket
//!   writes tells nothing. What does is the content: every record the library hands to
//!   BIO_write inside a call is remembered by its first bytes (header and ciphertext or
//!   handshake random, unique per record) with the call's SSL object, and the socket
//!   write that starts with those bytes is that session's socket, confirmed. Every
//!   session writes before its first plaintext moves (a ClientHello, a ServerHello
//!   flight), so its socket is known by then. A write's plaintext on a session not
//!   confirmed yet (opened before the agent) waits for its record; a read's goes on the
//!   socket the thread read last, counted as guessed, and a later confirmation replaces
//!   the guess (counted as corrected when it differed).
//! - SSL_free forgets the session: a new SSL object often gets the address of a freed
//!   one, and must not inherit its socket.

use agent_common::{Direction, SyscallId, counter, lost};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user},
    macros::{map, uprobe, uretprobe},
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::{ProbeContext, RetProbeContext},
};

use crate::{
    emit::data_event,
    maps::{count, count_lost},
    socket::lookup,
};

const KIND_READ: u32 = 0;
const KIND_WRITE: u32 = 1;
const KIND_READ_EX: u32 = 2;
const KIND_WRITE_EX: u32 = 3;
const KIND_HANDSHAKE: u32 = 4;
const NO_FD: u32 = u32::MAX;

/// A TLS library call in flight on a thread.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TlsCall {
    pub ssl: u64,
    pub buf: u64,
    /// For the _ex forms, where the library stores the byte count.
    pub count_ptr: u64,
    pub kind: u32,
    /// The socket the library used during the call, or NO_FD.
    pub fd: u32,
    /// When the call began: a write's bytes leave then.
    pub start_ns: u64,
    pub _pad: u32,
    /// 1 when the write's plaintext was sent up at entry (Go, see `go_enter`).
    pub emitted: u32,
}

/// A call in flight: the thread, and how many probed calls it was inside of.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct CallKey {
    pub pid_tgid: u64,
    pub depth: u64,
}

/// Calls in flight, by thread and depth. Library calls nest: Node.js runs JavaScript
/// from inside SSL_read (the handshake callbacks), and that JavaScript writes on other
/// sessions, each write one more SSL_write inside.
#[map(name = "TLS_CALLS")]
static TLS_CALLS: HashMap<CallKey, TlsCall> = HashMap::with_max_entries(16384, 0);

/// Probed calls in flight on each thread (pid_tgid); the innermost is at depth - 1.
#[map(name = "TLS_DEPTH")]
static TLS_DEPTH: HashMap<u64, u64> = HashMap::with_max_entries(16384, 0);

/// Calls deeper than this are not followed (their bytes are counted as lost).
const MAX_DEPTH: u64 = 4;

/// Threads seen moving plaintext through a call that touched no socket: their TLS
/// sessions use memory BIOs, so a socket read or write inside one of their calls is
/// someone else's (JavaScript run from a callback), not the session's.
#[map(name = "MEMORY_BIO_THREADS")]
static MEMORY_BIO_THREADS: LruHashMap<u64, u32> = LruHashMap::with_max_entries(16384, 0);

/// Threads whose calls use a socket and that are not in MEMORY_BIO_THREADS: their
/// records go to the socket inside the call, so BIO_write need not remember them.
#[map(name = "SOCKET_BIO_THREADS")]
static SOCKET_BIO_THREADS: LruHashMap<u64, u32> = LruHashMap::with_max_entries(16384, 0);

#[inline(always)]
fn memory_bio_thread(pid_tgid: u64) -> bool {
    unsafe { MEMORY_BIO_THREADS.get(pid_tgid) }.is_some()
}

/// The innermost call in flight on the thread, if any.
#[inline(always)]
fn innermost(pid_tgid: u64) -> Option<*mut TlsCall> {
    let depth = unsafe { TLS_DEPTH.get(pid_tgid) }.copied()?;
    if depth == 0 || depth > MAX_DEPTH {
        return None;
    }
    TLS_CALLS.get_ptr_mut(CallKey {
        pid_tgid,
        depth: depth - 1,
    })
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct SslKey {
    pub tgid: u64,
    pub ssl: u64,
}

/// The socket of one TLS session.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SslSocket {
    pub fd: u32,
    /// 1 when seen (the library used the socket, or the socket carried one of the
    /// session's records); 0 when guessed from the thread's last read.
    pub confirmed: u32,
}

/// (process, SSL object) -> its socket.
#[map(name = "SSL_FDS")]
static SSL_FDS: LruHashMap<SslKey, SslSocket> = LruHashMap::with_max_entries(65536, 0);

/// The TCP socket each thread read last, outside TLS calls (a memory BIO's ciphertext
/// comes from there).
#[map(name = "LAST_READ_FD")]
static LAST_READ_FD: LruHashMap<u64, u32> = LruHashMap::with_max_entries(65536, 0);

/// Writes whose plaintext waits for the TLS record that tells their socket.
const MAX_PARKED: usize = 4;

/// Writes on a memory-BIO session whose socket is not known yet, by thread: the
/// session, and the plaintext of its writes not yet sent up.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct AwaitRecord {
    pub ssl: u64,
    pub parked: u32,
    pub _pad: u32,
    pub buf: [u64; MAX_PARKED],
    pub len: [u64; MAX_PARKED],
    pub start_ns: [u64; MAX_PARKED],
}

#[map(name = "TLS_AWAIT")]
static TLS_AWAIT: HashMap<u64, AwaitRecord> = HashMap::with_max_entries(16384, 0);

/// Where a new [`AwaitRecord`] is put together before it goes into `TLS_AWAIT`.
#[map(name = "AWAIT_SCRATCH")]
static AWAIT_SCRATCH: PerCpuArray<AwaitRecord> = PerCpuArray::with_max_entries(1, 0);

/// Called from the socket syscall hooks, at entry, for TCP sockets. Returns true when
/// the thread is inside a TLS library call: the bytes are ciphertext. `egress_head` is
/// the user address and length of the first contiguous bytes a write sends ((0, 0) for
/// reads).
#[inline(always)]
pub fn note_socket_io(
    pid_tgid: u64,
    fd: u32,
    direction: Direction,
    egress_head: (u64, u64),
) -> bool {
    let memory_bio = memory_bio_thread(pid_tgid);
    if let Some(call) = innermost(pid_tgid)
        && !memory_bio
    {
        // SAFETY: a map value pointer, valid for this program run.
        unsafe { (*call).fd = fd };
        return true;
    }
    match direction {
        Direction::Ingress => {
            // A keep-alive connection reads the same socket over and over: written only
            // when it changes, the lookup costs less than an LRU update on every read.
            match LAST_READ_FD.get_ptr_mut(pid_tgid) {
                // SAFETY: a map value pointer, valid for this program run.
                Some(last) => unsafe {
                    if *last != fd {
                        *last = fd;
                    }
                },
                None => {
                    let _ = LAST_READ_FD.insert(pid_tgid, fd, 0);
                }
            }
            // Writes parked on a session opened before the agent wait no longer than the
            // thread's next socket read (Node.js flushes its records before it reads).
            flush_await(pid_tgid);
        }
        Direction::Egress => {
            // Only a thread that moves memory-BIO ciphertext writes records for a session
            // that does not write them itself.
            let (head, len) = egress_head;
            if memory_bio && head != 0 && len >= RECORD_ID_LEN as u64 {
                confirm(pid_tgid, fd, head);
            }
        }
    }
    false
}

/// How many of a record's first bytes identify it: the 5-byte header and 19 bytes of
/// what follows (ciphertext, or a handshake message with its random), in which two
/// records practically never agree. The shortest records that matter are this long (a
/// TLS 1.3 alert: header, 3 bytes, a 16-byte tag); a change-cipher-spec record (6
/// bytes) is always written together with the record that follows it.
const RECORD_ID_LEN: usize = 24;

/// A TLS record by its first bytes, in one process.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct RecordId {
    pub tgid: u32,
    pub _pad: u32,
    pub head: [u8; RECORD_ID_LEN],
}

/// Records an SSL object wrote into its BIO during a call, by their first bytes -> the
/// SSL object. The socket write that carries one tells the session's socket; records a
/// socket BIO wrote, or that never start a socket write (those of a flight after its
/// first), leave by LRU eviction.
#[map(name = "TLS_RECORDS")]
static TLS_RECORDS: LruHashMap<RecordId, u64> = LruHashMap::with_max_entries(16384, 0);

/// A TLS record header: content type (change_cipher_spec 20 to application_data 23),
/// then version 3.x.
#[inline(always)]
fn is_record_head(h: &[u8; RECORD_ID_LEN]) -> bool {
    (20..=23).contains(&h[0]) && h[1] == 3 && h[2] <= 4
}

/// A socket write outside TLS calls, starting at user address `head` with at least
/// RECORD_ID_LEN bytes: when it starts with a record some SSL object wrote into its
/// memory BIO, `fd` is that session's socket, and the writes parked for it go up.
#[inline(always)]
fn confirm(pid_tgid: u64, fd: u32, head: u64) {
    let Ok(bytes) = (unsafe { bpf_probe_read_user(head as *const [u8; RECORD_ID_LEN]) }) else {
        return;
    };
    if !is_record_head(&bytes) {
        return;
    }
    let id = RecordId {
        tgid: (pid_tgid >> 32) as u32,
        _pad: 0,
        head: bytes,
    };
    let Some(ssl) = (unsafe { TLS_RECORDS.get(id) }).copied() else {
        return;
    };
    let _ = TLS_RECORDS.remove(id);
    let key = SslKey {
        tgid: pid_tgid >> 32,
        ssl,
    };
    let old = unsafe { SSL_FDS.get(key) }.copied();
    let known = matches!(old, Some(s) if s.confirmed == 1 && s.fd == fd);
    if !known {
        if let Some(s) = old
            && s.confirmed == 0
            && s.fd != fd
        {
            count(counter::TLS_CORRECTED);
        }
        let _ = SSL_FDS.insert(key, SslSocket { fd, confirmed: 1 }, 0);
        count(counter::TLS_CONFIRMED);
    }
    if let Some(wait) = TLS_AWAIT.get_ptr_mut(pid_tgid)
        && unsafe { (*wait).ssl } == ssl
    {
        emit_parked(pid_tgid, wait, fd);
        let _ = TLS_AWAIT.remove(pid_tgid);
    }
}

/// The parked writes of `wait` go up on `fd`.
#[inline(always)]
fn emit_parked(pid_tgid: u64, wait: *const AwaitRecord, fd: u32) {
    for i in 0..MAX_PARKED {
        // SAFETY: a map value pointer, valid for this program run; `i` is in bounds.
        let (parked, buf, len, start_ns) = unsafe {
            (
                (*wait).parked,
                (*wait).buf[i],
                (*wait).len[i],
                (*wait).start_ns[i],
            )
        };
        if i as u32 >= parked {
            break;
        }
        emit_on(pid_tgid, fd, Direction::Egress, buf, len, start_ns);
    }
}

/// No record write confirmed the awaited session before the thread read a socket (or
/// another session's write came, or the session ended): its parked writes go up on the
/// session's guessed socket (or the thread's last read), counted as guessed.
#[inline(always)]
fn flush_await(pid_tgid: u64) {
    let Some(wait) = TLS_AWAIT.get_ptr_mut(pid_tgid) else {
        return;
    };
    // SAFETY: a map value pointer, valid until the entry is removed at the end.
    let (ssl, parked) = unsafe { ((*wait).ssl, (*wait).parked) };
    if parked > 0 {
        match guess_socket(pid_tgid, ssl) {
            Some(fd) => emit_parked(pid_tgid, wait, fd),
            None => count_lost(lost::TLS_NO_SOCKET),
        }
    }
    let _ = TLS_AWAIT.remove(pid_tgid);
}

/// The socket of an unconfirmed session: its earlier guess, else the thread's last
/// read, remembered as a guess.
#[inline(always)]
fn guess_socket(pid_tgid: u64, ssl: u64) -> Option<u32> {
    let key = SslKey {
        tgid: pid_tgid >> 32,
        ssl,
    };
    if let Some(s) = unsafe { SSL_FDS.get(key) } {
        if s.confirmed == 0 {
            count(counter::TLS_GUESSED);
        }
        return Some(s.fd);
    }
    let fd = unsafe { LAST_READ_FD.get(pid_tgid) }.copied()?;
    let _ = SSL_FDS.insert(key, SslSocket { fd, confirmed: 0 }, 0);
    count(counter::TLS_GUESSED);
    Some(fd)
}

#[inline(always)]
fn enter(ctx: &ProbeContext, kind: u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !crate::probes::select::traced(pid_tgid) {
        return;
    }
    let depth = unsafe { TLS_DEPTH.get(pid_tgid) }.copied().unwrap_or(0);
    if TLS_DEPTH.insert(pid_tgid, depth + 1, 0).is_err() {
        count_lost(lost::MAP_FULL);
        return;
    }
    if depth >= MAX_DEPTH {
        count_lost(lost::MAP_FULL);
        return;
    }
    let call = TlsCall {
        ssl: ctx.arg::<u64>(0).unwrap_or(0),
        buf: if kind == KIND_HANDSHAKE {
            0
        } else {
            ctx.arg::<u64>(1).unwrap_or(0)
        },
        count_ptr: if kind == KIND_READ_EX || kind == KIND_WRITE_EX {
            ctx.arg::<u64>(3).unwrap_or(0)
        } else {
            0
        },
        kind,
        fd: NO_FD,
        start_ns: unsafe { bpf_ktime_get_ns() },
        _pad: 0,
        emitted: 0,
    };
    if TLS_CALLS
        .insert(CallKey { pid_tgid, depth }, call, 0)
        .is_err()
    {
        count_lost(lost::MAP_FULL);
    }
}

/// Returns come in the reverse order of entries: each one ends the innermost call.
#[inline(always)]
fn exit(ctx: &RetProbeContext) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(depth) = (unsafe { TLS_DEPTH.get(pid_tgid) }).copied() else {
        return;
    };
    if depth <= 1 {
        let _ = TLS_DEPTH.remove(pid_tgid);
    } else {
        let _ = TLS_DEPTH.insert(pid_tgid, depth - 1, 0);
    }
    if depth == 0 || depth > MAX_DEPTH {
        return;
    }
    let key = CallKey {
        pid_tgid,
        depth: depth - 1,
    };
    let Some(mut call) = (unsafe { TLS_CALLS.get(key) }).copied() else {
        return;
    };
    let _ = TLS_CALLS.remove(key);
    let len = plaintext_len(&call, ctx.ret::<i64>() as i32);
    // With a socket BIO every call touches the socket (a handshake step, a read that
    // would block, a write); a call that did not means memory BIOs on this thread, and
    // then a socket used inside a call says nothing about the call's session.
    if call.fd == NO_FD {
        let _ = MEMORY_BIO_THREADS.insert(pid_tgid, 1, 0);
    } else if memory_bio_thread(pid_tgid) {
        call.fd = NO_FD;
    } else {
        let _ = SOCKET_BIO_THREADS.insert(pid_tgid, 1, 0);
    }
    finish_call(pid_tgid, &call, len);
}

/// What a finished library call sent or received: `len` plaintext bytes (0 for none).
#[inline(always)]
fn finish_call(pid_tgid: u64, call: &TlsCall, len: u64) {
    let key = SslKey {
        tgid: pid_tgid >> 32,
        ssl: call.ssl,
    };
    let dir = direction(call.kind);
    let ts = if dir == Direction::Egress {
        call.start_ns
    } else {
        0
    };
    if call.fd != NO_FD {
        // A socket BIO: the library used this socket during the call.
        let _ = SSL_FDS.insert(
            key,
            SslSocket {
                fd: call.fd,
                confirmed: 1,
            },
            0,
        );
        if len > 0 {
            emit_on(pid_tgid, call.fd, dir, call.buf, len, ts);
        }
        return;
    }
    if let Some(s) = unsafe { SSL_FDS.get(key) }
        && s.confirmed == 1
    {
        if len > 0 {
            emit_on(pid_tgid, s.fd, dir, call.buf, len, ts);
        }
        return;
    }
    // A memory BIO whose socket is not known yet: the socket write that carries the
    // session's next record will tell.
    if len == 0 {
        return;
    }
    if dir == Direction::Egress {
        park(pid_tgid, call, len);
        return;
    }
    match guess_socket(pid_tgid, call.ssl) {
        Some(fd) => {
            emit_on(pid_tgid, fd, dir, call.buf, len, 0);
        }
        None => count_lost(lost::TLS_NO_SOCKET),
    }
}

/// Keeps back the plaintext of a write on a session whose socket is not known yet,
/// until the socket write that carries its record.
#[inline(always)]
fn park(pid_tgid: u64, call: &TlsCall, len: u64) {
    if let Some(wait) = TLS_AWAIT.get_ptr_mut(pid_tgid) {
        // SAFETY: a map value pointer, valid for this program run; `n` is checked
        // against the array length before it indexes.
        unsafe {
            let n = (*wait).parked as usize;
            if (*wait).ssl == call.ssl && n < MAX_PARKED {
                (*wait).buf[n] = call.buf;
                (*wait).len[n] = len;
                (*wait).start_ns[n] = call.start_ns;
                (*wait).parked += 1;
                return;
            }
        }
        // Another session, or no room: what waited goes up on its guess.
        flush_await(pid_tgid);
    }
    // Built in per-CPU scratch space: the record is too big for the BPF stack here.
    let Some(wait) = AWAIT_SCRATCH.get_ptr_mut(0) else {
        count_lost(lost::NO_SCRATCH);
        return;
    };
    // SAFETY: this CPU's scratch slot, valid for this program run.
    unsafe {
        (*wait).ssl = call.ssl;
        (*wait).parked = 1;
        (*wait).buf[0] = call.buf;
        (*wait).len[0] = len;
        (*wait).start_ns[0] = call.start_ns;
        if TLS_AWAIT.insert(pid_tgid, *wait, 0).is_err() {
            count_lost(lost::MAP_FULL);
        }
    }
}

#[inline(always)]
fn plaintext_len(call: &TlsCall, ret: i32) -> u64 {
    if call.kind == KIND_HANDSHAKE {
        return 0;
    }
    let len: u64 = if call.kind == KIND_READ_EX || call.kind == KIND_WRITE_EX {
        if ret != 1 {
            return 0;
        }
        unsafe { bpf_probe_read_user(call.count_ptr as *const u64) }.unwrap_or(0)
    } else {
        if ret <= 0 {
            return 0;
        }
        ret as u64
    };
    if len >> 62 != 0 { 0 } else { len }
}

#[inline(always)]
fn direction(kind: u32) -> Direction {
    if kind == KIND_WRITE || kind == KIND_WRITE_EX {
        Direction::Egress
    } else {
        Direction::Ingress
    }
}

/// One plaintext event on socket `fd`.
#[inline(always)]
fn emit_on(pid_tgid: u64, fd: u32, dir: Direction, buf: u64, len: u64, ts_ns: u64) {
    plaintext_event(pid_tgid, ((dir as u64) << 32) | fd as u64, buf, len, ts_ns);
}

/// The body of [`emit_on`], kept out of line (a BPF-to-BPF call) so that the many
/// callers do not each carry its stack: `fd_dir` is the descriptor in the low half
/// and the direction in the high half (a BPF call takes at most five arguments).
#[inline(never)]
fn plaintext_event(pid_tgid: u64, fd_dir: u64, buf: u64, len: u64, ts_ns: u64) -> u32 {
    let fd = fd_dir as u32;
    let dir = if (fd_dir >> 32) as u32 == Direction::Egress as u32 {
        Direction::Egress
    } else {
        Direction::Ingress
    };
    let Some(info) = lookup((pid_tgid >> 32) as u32, fd) else {
        return 0;
    };
    // SAFETY: a SOCKETS map value pointer, valid for this program run.
    unsafe {
        if (*info).is_tcp != 1 {
            return 0;
        }
        (*info).is_tls = 1;
    }
    let syscall = match dir {
        Direction::Egress => SyscallId::TlsWrite,
        Direction::Ingress => SyscallId::TlsRead,
    };
    let ts_ns = if ts_ns == 0 {
        // SAFETY: a helper without arguments.
        unsafe { bpf_ktime_get_ns() }
    } else {
        ts_ns
    };
    // The heads of TLS plaintext are not followed (emit.rs): the scan's bpf_loop frame
    // on top of this function's and the probe's goes past the 512 bytes of stack that
    // Linux 6.1 and 6.12 allow a chain of calls ("combined stack size of 3 calls is
    // 544"). A read returns at most one TLS record (16 KiB), so user space's own
    // announcements come sooner than for plain sockets.
    data_event(
        pid_tgid,
        fd,
        info,
        dir,
        syscall as u32,
        buf,
        len,
        true,
        ts_ns,
        false,
    );
    1
}

#[uprobe]
pub fn ssl_read_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, KIND_READ);
    0
}

#[uprobe]
pub fn ssl_write_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, KIND_WRITE);
    0
}

#[uprobe]
pub fn ssl_read_ex_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, KIND_READ_EX);
    0
}

#[uprobe]
pub fn ssl_write_ex_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, KIND_WRITE_EX);
    0
}

#[uprobe]
pub fn ssl_do_handshake_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, KIND_HANDSHAKE);
    0
}

#[uretprobe]
pub fn ssl_ret(ctx: RetProbeContext) -> u32 {
    exit(&ctx);
    0
}

/// SSL_free(ssl): the session ends; the next SSL object may get its address.
#[uprobe]
pub fn ssl_free_enter(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !crate::probes::select::traced(pid_tgid) {
        return 0;
    }
    let ssl = ctx.arg::<u64>(0).unwrap_or(0);
    if let Some(wait) = unsafe { TLS_AWAIT.get(pid_tgid) }
        && wait.ssl == ssl
    {
        flush_await(pid_tgid);
    }
    let _ = SSL_FDS.remove(SslKey {
        tgid: pid_tgid >> 32,
        ssl,
    });
    0
}

/// BIO_write(b, data, dlen) inside a TLS call: the record layer handing records to the
/// session's write BIO (a buffering BIO during the handshake, then the memory or socket
/// BIO). Each record is remembered with the call's SSL object (see `confirm`).
#[uprobe]
pub fn bio_write_enter(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(call) = innermost(pid_tgid) else {
        return 0;
    };
    // SAFETY: a map value pointer, valid for this program run.
    let (ssl, used_socket) = unsafe { ((*call).ssl, (*call).fd != NO_FD) };
    // A socket BIO writes its records to the socket itself, inside the call. A thread
    // not known yet is remembered: a memory-BIO thread's first call writes a flight.
    if !memory_bio_thread(pid_tgid)
        && (used_socket || unsafe { SOCKET_BIO_THREADS.get(pid_tgid) }.is_some())
    {
        return 0;
    }
    let data = ctx.arg::<u64>(1).unwrap_or(0);
    let len = ctx.arg::<u64>(2).unwrap_or(0) as i32;
    if data == 0 || len < RECORD_ID_LEN as i32 {
        return 0;
    }
    let Ok(head) = (unsafe { bpf_probe_read_user(data as *const [u8; RECORD_ID_LEN]) }) else {
        return 0;
    };
    if !is_record_head(&head) {
        return 0;
    }
    let id = RecordId {
        tgid: (pid_tgid >> 32) as u32,
        _pad: 0,
        head,
    };
    if TLS_RECORDS.insert(id, ssl, 0).is_err() {
        count_lost(lost::MAP_FULL);
    }
    0
}

// ---- Go crypto/tls ----
//
// func (c *Conn) Write(b []byte) (int, error) and func (c *Conn) Read(b []byte) (int, error)
// with Go's register ABI (amd64, Go 1.17+): c in RAX, b's pointer in RBX, its length in
// RCX; the int result comes back in RAX. The current goroutine is in R14. Goroutines
// move between threads, so calls are keyed by goroutine, and the return is caught by
// uprobes on the function's RET instructions (user space finds them): a uretprobe would
// corrupt Go's movable stacks.

#[repr(C)]
#[derive(Clone, Copy)]
pub struct GoCallKey {
    pub tgid: u64,
    pub goroutine: u64,
}

/// Go TLS calls in flight, by goroutine.
#[map(name = "GO_TLS_CALLS")]
static GO_TLS_CALLS: HashMap<GoCallKey, TlsCall> = HashMap::with_max_entries(16384, 0);

/// The descriptor under a `*tls.Conn`, when its transport is a `*net.TCPConn`:
/// tls.Conn starts with `conn net.Conn` (an interface: itab, data); the data points to a
/// TCPConn whose first word is `fd *netFD`; netFD starts with `pfd poll.FD`, and
/// poll.FD is `{fdmu fdMutex (16 bytes); Sysfd int; ...}`. These layouts have held
/// since Go 1.9; a wrong guess is caught by the TCP socket check of the caller.
#[inline(always)]
fn go_conn_fd(conn: u64) -> u32 {
    let read = |addr: u64| unsafe { bpf_probe_read_user(addr as *const u64) }.unwrap_or(0);
    let tcp_conn = read(conn + 8);
    if tcp_conn == 0 {
        return NO_FD;
    }
    let net_fd = read(tcp_conn);
    if net_fd == 0 {
        return NO_FD;
    }
    let sysfd = read(net_fd + 16);
    if sysfd > u32::MAX as u64 / 2 {
        NO_FD
    } else {
        sysfd as u32
    }
}

#[inline(always)]
fn go_enter(ctx: &ProbeContext, kind: u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !crate::probes::select::traced(pid_tgid) {
        return;
    }
    let regs = unsafe { &*ctx.regs };
    let key = GoCallKey {
        tgid: pid_tgid >> 32,
        goroutine: regs.r14,
    };
    let mut call = TlsCall {
        ssl: regs.rax,
        buf: regs.rbx,
        count_ptr: 0,
        kind,
        fd: go_conn_fd(regs.rax),
        start_ns: unsafe { bpf_ktime_get_ns() },
        _pad: 0,
        emitted: 0,
    };
    if call.fd == NO_FD
        && let Some(s) = unsafe {
            SSL_FDS.get(SslKey {
                tgid: pid_tgid >> 32,
                ssl: call.ssl,
            })
        }
    {
        call.fd = s.fd;
    }
    if call.fd != NO_FD {
        crate::probes::goroutines::own(pid_tgid, call.fd, direction(kind), regs.r14);
    }
    // Write writes all of `b` or fails, and the reply is read on another goroutine,
    // often on another thread, maybe before this call returns: the request goes up
    // now, ahead of it.
    if kind == KIND_WRITE && call.fd != NO_FD && regs.rcx > 0 && (regs.rcx >> 62) == 0 {
        emit_on(
            pid_tgid,
            call.fd,
            Direction::Egress,
            call.buf,
            regs.rcx,
            call.start_ns,
        );
        call.emitted = 1;
    }
    if GO_TLS_CALLS.insert(key, call, 0).is_err() {
        count_lost(lost::MAP_FULL);
    }
}

#[uprobe]
pub fn go_tls_read_enter(ctx: ProbeContext) -> u32 {
    go_enter(&ctx, KIND_READ);
    0
}

#[uprobe]
pub fn go_tls_write_enter(ctx: ProbeContext) -> u32 {
    go_enter(&ctx, KIND_WRITE);
    0
}

/// On a RET instruction of (*Conn).Read or (*Conn).Write.
#[uprobe]
pub fn go_tls_ret(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let regs = unsafe { &*ctx.regs };
    let key = GoCallKey {
        tgid: pid_tgid >> 32,
        goroutine: regs.r14,
    };
    let Some(call) = (unsafe { GO_TLS_CALLS.get(key) }).copied() else {
        return 0;
    };
    let _ = GO_TLS_CALLS.remove(key);
    // Write returns how much it wrote (all of `b` unless it failed), Read how much it read.
    let n = regs.rax as i64;
    if call.emitted == 1 {
        return 0;
    }
    if n > 0 && call.fd != NO_FD {
        let _ = SSL_FDS.insert(
            SslKey {
                tgid: pid_tgid >> 32,
                ssl: call.ssl,
            },
            SslSocket {
                fd: call.fd,
                confirmed: 1,
            },
            0,
        );
        let dir = direction(call.kind);
        let ts = if dir == Direction::Egress {
            call.start_ns
        } else {
            0
        };
        emit_on(pid_tgid, call.fd, dir, call.buf, n as u64, ts);
    } else if n > 0 {
        count_lost(lost::TLS_NO_SOCKET);
    }
    0
}
