//! TLS plaintext at the library boundary: uprobes and uretprobes on OpenSSL (and
//! BoringSSL, which keeps the same names):
//!   int SSL_write(SSL *ssl, const void *buf, int num);
//!   int SSL_read(SSL *ssl, void *buf, int num);
//!   int SSL_write_ex(SSL *s, const void *buf, size_t num, size_t *written);
//!   int SSL_read_ex(SSL *ssl, void *buf, size_t num, size_t *readbytes);
//! The plain forms return the byte count; the _ex forms return 1 and store the count
//! through the last argument.
//!
//! Which socket an SSL object uses is learnt from the socket syscall the library makes
//! on the same thread inside the call (a socket BIO), else from the last socket the
//! thread used just before (a memory BIO, as in Node.js, whose event loop moves the
//! ciphertext itself), and is then remembered per SSL object.

use agent_common::{Direction, SyscallId};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user},
    macros::{map, uprobe, uretprobe},
    maps::{HashMap, LruHashMap},
    programs::{ProbeContext, RetProbeContext},
};

use crate::{config::setting, emit::data_event, socket::lookup};

const KIND_READ: u32 = 0;
const KIND_WRITE: u32 = 1;
const KIND_READ_EX: u32 = 2;
const KIND_WRITE_EX: u32 = 3;
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
    /// 1 when the write's plaintext was already sent up at entry.
    pub emitted: u32,
    pub _pad: u32,
}

/// Calls in flight, by thread (pid_tgid).
#[map(name = "TLS_CALLS")]
static TLS_CALLS: HashMap<u64, TlsCall> = HashMap::with_max_entries(16384, 0);

#[repr(C)]
#[derive(Clone, Copy)]
pub struct SslKey {
    pub tgid: u64,
    pub ssl: u64,
}

/// (process, SSL object) -> socket descriptor.
#[map(name = "SSL_FDS")]
static SSL_FDS: LruHashMap<SslKey, u32> = LruHashMap::with_max_entries(65536, 0);

/// The TCP socket each thread used last (for libraries with memory BIOs).
#[map(name = "LAST_FD")]
static LAST_FD: LruHashMap<u64, u32> = LruHashMap::with_max_entries(65536, 0);

/// Called from the socket syscall hooks for TCP sockets. Returns true when the thread
/// is inside a TLS library call: the bytes are ciphertext.
#[inline(always)]
pub fn note_socket_io(pid_tgid: u64, fd: u32) -> bool {
    let _ = LAST_FD.insert(pid_tgid, fd, 0);
    match TLS_CALLS.get_ptr_mut(pid_tgid) {
        Some(call) => {
            unsafe { (*call).fd = fd };
            true
        }
        None => false,
    }
}

#[inline(always)]
fn enter(ctx: &ProbeContext, kind: u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid >> 32) as u32 == setting!(agent_tgid) {
        return;
    }
    let mut call = TlsCall {
        ssl: ctx.arg::<u64>(0).unwrap_or(0),
        buf: ctx.arg::<u64>(1).unwrap_or(0),
        count_ptr: if kind == KIND_READ_EX || kind == KIND_WRITE_EX {
            ctx.arg::<u64>(3).unwrap_or(0)
        } else {
            0
        },
        kind,
        fd: NO_FD,
        start_ns: unsafe { bpf_ktime_get_ns() },
        emitted: 0,
        _pad: 0,
    };
    // A write's plaintext is in its buffer already: send it up now, in order with
    // what other threads read on the same connection, when the socket is known.
    if kind == KIND_WRITE || kind == KIND_WRITE_EX {
        let num = if kind == KIND_WRITE {
            ctx.arg::<i32>(2).unwrap_or(0) as i64 as u64
        } else {
            ctx.arg::<u64>(2).unwrap_or(0)
        };
        let key = SslKey {
            tgid: pid_tgid >> 32,
            ssl: call.ssl,
        };
        if let Some(fd) = unsafe { SSL_FDS.get(key) }.copied()
            && num > 0
            && (num >> 62) == 0
            && emit_on(pid_tgid, fd, &call, num, call.start_ns)
        {
            call.emitted = 1;
        }
    }
    let _ = TLS_CALLS.insert(pid_tgid, call, 0);
}

#[inline(always)]
fn exit(ctx: &RetProbeContext) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(call) = (unsafe { TLS_CALLS.get(pid_tgid) }).copied() else {
        return;
    };
    let _ = TLS_CALLS.remove(pid_tgid);
    let ret = ctx.ret::<i64>() as i32;
    if call.emitted == 1 {
        return;
    }
    if let Some(len) = plaintext_len(&call, ret) {
        emit_plaintext(pid_tgid, &call, len);
    }
}

#[inline(always)]
fn plaintext_len(call: &TlsCall, ret: i32) -> Option<u64> {
    let len: u64 = if call.kind == KIND_READ_EX || call.kind == KIND_WRITE_EX {
        if ret != 1 {
            return None;
        }
        unsafe { bpf_probe_read_user(call.count_ptr as *const u64) }.unwrap_or(0)
    } else {
        if ret <= 0 {
            return None;
        }
        ret as u64
    };
    (len > 0).then_some(len)
}

/// Sends `len` plaintext bytes of `call` up, on the socket the session uses: the one
/// the library used during the call, else the one remembered for the session, else the
/// one the thread used last.
#[inline(always)]
fn emit_plaintext(pid_tgid: u64, call: &TlsCall, len: u64) {
    let tgid = pid_tgid >> 32;
    let ssl_key = SslKey {
        tgid,
        ssl: call.ssl,
    };
    let mut fd = call.fd;
    if fd == NO_FD {
        fd = match unsafe { SSL_FDS.get(ssl_key) } {
            Some(fd) => *fd,
            None => match unsafe { LAST_FD.get(pid_tgid) } {
                Some(fd) => *fd,
                None => return,
            },
        };
    }
    let _ = SSL_FDS.insert(ssl_key, fd, 0);
    // Writes are stamped with their start, reads with their return (when the bytes
    // are there).
    let ts = if is_write(call.kind) {
        call.start_ns
    } else {
        0
    };
    emit_on(pid_tgid, fd, call, len, ts);
}

#[inline(always)]
fn is_write(kind: u32) -> bool {
    kind == KIND_WRITE || kind == KIND_WRITE_EX
}

/// One plaintext event on socket `fd`; false when `fd` is not a TCP socket.
#[inline(always)]
fn emit_on(pid_tgid: u64, fd: u32, call: &TlsCall, len: u64, ts_ns: u64) -> bool {
    let Some(info) = lookup((pid_tgid >> 32) as u32, fd) else {
        return false;
    };
    unsafe {
        if (*info).is_tcp != 1 {
            return false;
        }
        (*info).is_tls = 1;
    }
    let (dir, syscall) = if is_write(call.kind) {
        (Direction::Egress, SyscallId::TlsWrite)
    } else {
        (Direction::Ingress, SyscallId::TlsRead)
    };
    data_event(
        pid_tgid,
        fd,
        info,
        dir,
        syscall as u32,
        call.buf,
        len,
        true,
        ts_ns,
    );
    true
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

#[uretprobe]
pub fn ssl_ret(ctx: RetProbeContext) -> u32 {
    exit(&ctx);
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
    if (pid_tgid >> 32) as u32 == setting!(agent_tgid) {
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
        emitted: 0,
        _pad: 0,
    };
    if call.fd == NO_FD
        && let Some(fd) = unsafe {
            SSL_FDS.get(SslKey {
                tgid: pid_tgid >> 32,
                ssl: call.ssl,
            })
        }
    {
        call.fd = *fd;
    }
    // A write's bytes are all in `b` at entry (Write writes all of them or fails).
    if kind == KIND_WRITE && call.fd != NO_FD && regs.rcx > 0 && (regs.rcx >> 62) == 0 {
        let _ = SSL_FDS.insert(
            SslKey {
                tgid: pid_tgid >> 32,
                ssl: call.ssl,
            },
            call.fd,
            0,
        );
        if emit_on(pid_tgid, call.fd, &call, regs.rcx, call.start_ns) {
            call.emitted = 1;
        }
    }
    let _ = GO_TLS_CALLS.insert(key, call, 0);
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
    let n = regs.rax as i64;
    if n > 0 && call.emitted == 0 {
        emit_plaintext(pid_tgid, &call, n as u64);
    }
    0
}
