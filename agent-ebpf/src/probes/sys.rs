//! Socket I/O hooks, in two backends that share one body per syscall:
//! - syscall tracepoints (`syscalls/sys_enter_X`, `sys_exit_X`): the record holds the
//!   syscall number at offset 8 and each argument in an 8-byte slot from offset 16; the
//!   exit record holds the return value at offset 16 (tracefs `format` files).
//! - kprobes on the x86-64 syscall wrappers (`__x64_sys_X(const struct pt_regs *regs)`)
//!   and kretprobes for the return value, where the kernel has kprobes.
//!
//! Enter hooks keep the arguments per thread in `PENDING`; exit hooks read the bytes the
//! syscall moved (for reads they are only there after the call) and emit events.

use agent_common::{Direction, EventKind, MAX_IOVECS, SyscallId, lost, role};
use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_user,
        generated::bpf_loop,
    },
    macros::{kprobe, kretprobe, map, tracepoint},
    maps::PerCpuArray,
    programs::{ProbeContext, RetProbeContext, TracePointContext},
};

use crate::{
    config::setting,
    emit::{conn_event, data_event},
    maps::{PENDING, PendingCall, SOCKETS, count_lost},
    socket::{classify, forget, key, lookup},
};

const CALL_CONNECT: u32 = 100;
const CALL_OWN_CONNECT: u32 = 101;
const EINPROGRESS: i64 = 115;

use crate::probes::select::traced;

#[inline(always)]
fn is_agent(pid_tgid: u64) -> bool {
    (pid_tgid >> 32) as u32 == setting!(agent_tgid)
}

// ---- bodies shared by both backends ----

/// read/write/recvfrom/sendto(fd, buf, count), readv/writev(fd, iov, iovcnt),
/// recvmsg/sendmsg(fd, msg, flags), sendfile(out_fd, in_fd, offset, count).
#[inline(always)]
fn enter_io(call: SyscallId, fd: u64, ptr: u64, count: u64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !traced(pid_tgid) {
        return;
    }
    let fd = fd as u32;
    let info = match lookup((pid_tgid >> 32) as u32, fd) {
        Some(info) if unsafe { (*info).is_tcp } == 1 => info,
        _ => return,
    };
    // Inside SSL_read/SSL_write this is the library moving ciphertext: it tells which
    // socket the TLS session uses, and its bytes are not sent up. Outside, a TLS record
    // written may tell the socket of a memory-BIO session.
    let (direction, head) = io_head(call, ptr, count);
    if crate::probes::tls::note_socket_io(pid_tgid, fd, direction, head)
        || unsafe { (*info).is_tls } == 1
    {
        return;
    }
    let pending = PendingCall {
        call: call as u32,
        fd,
        ptr,
        count,
        ts_ns: match direction {
            // SAFETY: a helper without arguments.
            Direction::Egress => unsafe { bpf_ktime_get_ns() },
            Direction::Ingress => 0,
        },
    };
    if PENDING.insert(pid_tgid, pending, 0).is_err() {
        count_lost(lost::MAP_FULL);
    }
}

/// Which way a call moves bytes and, for a write, the user address and length of its
/// first contiguous bytes (0, 0 when unknown).
#[inline(always)]
fn io_head(call: SyscallId, ptr: u64, count: u64) -> (Direction, (u64, u64)) {
    let first_iov = |iov: u64| -> (u64, u64) {
        // struct iovec { void *iov_base; size_t iov_len; }
        let base = unsafe { bpf_probe_read_user(iov as *const u64) }.unwrap_or(0);
        let len = unsafe { bpf_probe_read_user((iov + 8) as *const u64) }.unwrap_or(0);
        (base, len)
    };
    match call {
        SyscallId::Write | SyscallId::Sendto => (Direction::Egress, (ptr, count)),
        SyscallId::Writev if count > 0 => (Direction::Egress, first_iov(ptr)),
        SyscallId::Sendmsg => {
            // struct user_msghdr: msg_iov at 16, msg_iovlen at 24.
            let iov: u64 = unsafe { bpf_probe_read_user((ptr + 16) as *const u64) }.unwrap_or(0);
            let n: u64 = unsafe { bpf_probe_read_user((ptr + 24) as *const u64) }.unwrap_or(0);
            (
                Direction::Egress,
                if iov != 0 && n > 0 {
                    first_iov(iov)
                } else {
                    (0, 0)
                },
            )
        }
        SyscallId::Writev | SyscallId::Sendfile => (Direction::Egress, (0, 0)),
        _ => (Direction::Ingress, (0, 0)),
    }
}

/// The exit of `call`, a constant in each program: the branches for the other calls
/// compile away, and the verifier walks only the one this program can take.
#[inline(always)]
fn exit_io(ret: i64, call: SyscallId) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(pending) = (unsafe { PENDING.get(pid_tgid) }).copied() else {
        return;
    };
    let _ = PENDING.remove(pid_tgid);
    // A call of another kind: its exit was missed (a kretprobe past maxactive), and
    // this return value is not its.
    if ret <= 0 || pending.call != call as u32 {
        return;
    }
    let Some(info) = SOCKETS.get_ptr_mut(key((pid_tgid >> 32) as u32, pending.fd)) else {
        return;
    };
    if unsafe { (*info).is_tcp } != 1 {
        return;
    }
    let len = ret as u64;
    let fd = pending.fd;
    let call = call as u32;
    // Bytes received are there when the call returns; bytes sent leave from its start.
    let ts_ns = if pending.ts_ns != 0 {
        pending.ts_ns
    } else {
        // SAFETY: a helper without arguments.
        unsafe { bpf_ktime_get_ns() }
    };
    if call == SyscallId::Read as u32 || call == SyscallId::Recvfrom as u32 {
        data_event(
            pid_tgid,
            fd,
            info,
            Direction::Ingress,
            call,
            pending.ptr,
            len,
            false,
            ts_ns,
            true,
        );
    } else if call == SyscallId::Write as u32 || call == SyscallId::Sendto as u32 {
        data_event(
            pid_tgid,
            fd,
            info,
            Direction::Egress,
            call,
            pending.ptr,
            len,
            false,
            ts_ns,
            true,
        );
    } else if call == SyscallId::Sendfile as u32 {
        data_event(
            pid_tgid,
            fd,
            info,
            Direction::Egress,
            call,
            0,
            len,
            false,
            ts_ns,
            false,
        );
    } else if call == SyscallId::Readv as u32 {
        iov_events(
            pid_tgid,
            fd,
            info,
            Direction::Ingress,
            call,
            pending.ptr,
            pending.count,
            len,
            ts_ns,
        );
    } else if call == SyscallId::Writev as u32 {
        iov_events(
            pid_tgid,
            fd,
            info,
            Direction::Egress,
            call,
            pending.ptr,
            pending.count,
            len,
            ts_ns,
        );
    } else if call == SyscallId::Recvmsg as u32 || call == SyscallId::Sendmsg as u32 {
        // struct user_msghdr: msg_iov at 16, msg_iovlen at 24 (x86-64 and arm64 ABI).
        let iov: u64 =
            unsafe { bpf_probe_read_user((pending.ptr + 16) as *const u64) }.unwrap_or(0);
        let iovlen: u64 =
            unsafe { bpf_probe_read_user((pending.ptr + 24) as *const u64) }.unwrap_or(0);
        let dir = if call == SyscallId::Recvmsg as u32 {
            Direction::Ingress
        } else {
            Direction::Egress
        };
        iov_events(pid_tgid, fd, info, dir, call, iov, iovlen, len, ts_ns);
    }
}

/// Bytes moved through an iovec array: one event per buffer, in order, for the first
/// MAX_IOVECS buffers; whatever lies beyond is reported as one uncaptured event so that
/// the stream offsets stay right. The buffers are walked in a bpf_loop ([`iov_buffer`]),
/// which the verifier checks once whatever their number (grpcio writes a frame over 25).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn iov_events(
    pid_tgid: u64,
    fd: u32,
    info: *mut agent_common::SockInfo,
    dir: Direction,
    call: u32,
    iov: u64,
    iovcnt: u64,
    total: u64,
    ts_ns: u64,
) {
    let mut remaining = total;
    if let Some(walk) = IOV_WALK.get_ptr_mut(0) {
        let n = if iovcnt < MAX_IOVECS as u64 {
            iovcnt
        } else {
            MAX_IOVECS as u64
        };
        // SAFETY: this CPU's walk state, valid for the run; the callback reads it only.
        unsafe {
            *walk = IovWalk {
                pid_tgid,
                iov,
                remaining: total,
                ts_ns,
                fd,
                egress: (dir == Direction::Egress) as u32,
                call,
                _pad: 0,
            };
            bpf_loop(
                n as u32,
                iov_buffer as *mut core::ffi::c_void,
                core::ptr::null_mut(),
                0,
            );
            remaining = (*walk).remaining;
        }
    }
    if remaining > 0 {
        data_event(
            pid_tgid, fd, info, dir, call, 0, remaining, false, ts_ns, false,
        );
    }
}

/// The state of [`iov_buffer`], in map memory: the verifier knows nothing of what it
/// reads there, so the callback's states agree from one buffer to the next.
#[repr(C)]
struct IovWalk {
    pid_tgid: u64,
    /// The iovec array's user address.
    iov: u64,
    /// Bytes of the call not yet sent up.
    remaining: u64,
    ts_ns: u64,
    fd: u32,
    egress: u32,
    call: u32,
    _pad: u32,
}

#[map(name = "IOV_WALK")]
static IOV_WALK: PerCpuArray<IovWalk> = PerCpuArray::with_max_entries(1, 0);

/// bpf_loop callback, buffer `i` of the iovec array: one data event for its bytes.
extern "C" fn iov_buffer(i: u32, _ctx: *mut core::ffi::c_void) -> i64 {
    let Some(w) = IOV_WALK.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: this CPU's walk state, valid for the run.
    let w = unsafe { &mut *w };
    if w.remaining == 0 {
        return 1;
    }
    // struct iovec { void *iov_base; size_t iov_len; }
    let at = w.iov + u64::from(i) * 16;
    let base: u64 = unsafe { bpf_probe_read_user(at as *const u64) }.unwrap_or(0);
    let len: u64 = unsafe { bpf_probe_read_user((at + 8) as *const u64) }.unwrap_or(0);
    let n = if len < w.remaining { len } else { w.remaining };
    if n == 0 {
        return 0;
    }
    let Some(info) = SOCKETS.get_ptr_mut(key((w.pid_tgid >> 32) as u32, w.fd)) else {
        return 1;
    };
    let dir = if w.egress == 1 {
        Direction::Egress
    } else {
        Direction::Ingress
    };
    data_event(
        w.pid_tgid, w.fd, info, dir, w.call, base, n, false, w.ts_ns, false,
    );
    w.remaining -= n;
    0
}

/// connect(fd, addr, addrlen). The agent's own connects (its exports) are reported
/// too, as such, so that user space can leave their other end alone when the
/// receiver runs on this node.
#[inline(always)]
fn enter_connect(fd: u64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let own = is_agent(pid_tgid);
    if !own && !traced(pid_tgid) {
        return;
    }
    let pending = PendingCall {
        call: if own { CALL_OWN_CONNECT } else { CALL_CONNECT },
        fd: fd as u32,
        ptr: 0,
        count: 0,
        ts_ns: 0,
    };
    if PENDING.insert(pid_tgid, pending, 0).is_err() {
        count_lost(lost::MAP_FULL);
    }
}

#[inline(always)]
fn exit_connect(ret: i64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(pending) = (unsafe { PENDING.get(pid_tgid) }).copied() else {
        return;
    };
    let _ = PENDING.remove(pid_tgid);
    let kind = match pending.call {
        CALL_CONNECT => EventKind::Connect,
        CALL_OWN_CONNECT => EventKind::OwnConnect,
        _ => return,
    };
    if ret != 0 && ret != -EINPROGRESS {
        return;
    }
    let tgid = (pid_tgid >> 32) as u32;
    forget(tgid, pending.fd);
    if let Some(info) = classify(tgid, pending.fd, role::CLIENT) {
        // SAFETY: a SOCKETS map value pointer, valid for this program run.
        let info = unsafe { &*info };
        if info.is_tcp == 1 {
            conn_event(kind, pid_tgid, pending.fd, info, ret as i32);
        }
    }
}

/// accept(fd, addr, addrlen) / accept4(fd, addr, addrlen, flags): the new descriptor
/// is the return value.
#[inline(always)]
fn exit_accept(ret: i64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !traced(pid_tgid) || ret < 0 {
        return;
    }
    let tgid = (pid_tgid >> 32) as u32;
    let fd = ret as u32;
    forget(tgid, fd);
    if let Some(info) = classify(tgid, fd, role::SERVER) {
        // SAFETY: a SOCKETS map value pointer, valid for this program run.
        let info = unsafe { &*info };
        if info.is_tcp == 1 {
            conn_event(EventKind::Accept, pid_tgid, fd, info, 0);
        }
    }
}

/// close(fd), and dup2/dup3(oldfd, newfd, ...) which close newfd.
#[inline(always)]
fn enter_close(fd: u64) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let fd = fd as u32;
    let Some(info) = (unsafe { SOCKETS.get(key(tgid, fd)) }).copied() else {
        return;
    };
    if info.is_tcp == 1 {
        let kind = if is_agent(pid_tgid) {
            EventKind::OwnClose
        } else {
            EventKind::Close
        };
        conn_event(kind, pid_tgid, fd, &info, 0);
    }
    forget(tgid, fd);
}

// ---- syscall tracepoint backend ----

#[inline(always)]
fn tp_arg(ctx: &TracePointContext, n: usize) -> u64 {
    unsafe { ctx.read_at::<u64>(16 + n * 8) }.unwrap_or(0)
}

#[inline(always)]
fn tp_ret(ctx: &TracePointContext) -> i64 {
    unsafe { ctx.read_at::<i64>(16) }.unwrap_or(-1)
}

macro_rules! tp_io {
    ($enter:ident, $exit:ident, $call:expr, $ptr_arg:expr, $count_arg:expr) => {
        #[tracepoint]
        pub fn $enter(ctx: TracePointContext) -> u32 {
            enter_io(
                $call,
                tp_arg(&ctx, 0),
                tp_arg(&ctx, $ptr_arg),
                tp_arg(&ctx, $count_arg),
            );
            0
        }
        #[tracepoint]
        pub fn $exit(ctx: TracePointContext) -> u32 {
            exit_io(tp_ret(&ctx), $call);
            0
        }
    };
}

tp_io!(sys_read_enter, sys_read_exit, SyscallId::Read, 1, 2);
tp_io!(sys_write_enter, sys_write_exit, SyscallId::Write, 1, 2);
tp_io!(sys_readv_enter, sys_readv_exit, SyscallId::Readv, 1, 2);
tp_io!(sys_writev_enter, sys_writev_exit, SyscallId::Writev, 1, 2);
tp_io!(
    sys_recvfrom_enter,
    sys_recvfrom_exit,
    SyscallId::Recvfrom,
    1,
    2
);
tp_io!(sys_sendto_enter, sys_sendto_exit, SyscallId::Sendto, 1, 2);
tp_io!(
    sys_recvmsg_enter,
    sys_recvmsg_exit,
    SyscallId::Recvmsg,
    1,
    2
);
tp_io!(
    sys_sendmsg_enter,
    sys_sendmsg_exit,
    SyscallId::Sendmsg,
    1,
    2
);
// sendfile64(out_fd, in_fd, offset, count): the socket is out_fd; no user buffer.
tp_io!(
    sys_sendfile_enter,
    sys_sendfile_exit,
    SyscallId::Sendfile,
    1,
    3
);

#[tracepoint]
pub fn sys_connect_enter(ctx: TracePointContext) -> u32 {
    enter_connect(tp_arg(&ctx, 0));
    0
}

#[tracepoint]
pub fn sys_connect_exit(ctx: TracePointContext) -> u32 {
    exit_connect(tp_ret(&ctx));
    0
}

#[tracepoint]
pub fn sys_accept_exit(ctx: TracePointContext) -> u32 {
    exit_accept(tp_ret(&ctx));
    0
}

#[tracepoint]
pub fn sys_close_enter(ctx: TracePointContext) -> u32 {
    enter_close(tp_arg(&ctx, 0));
    0
}

/// dup2(oldfd, newfd) and dup3(oldfd, newfd, flags): newfd is closed first.
#[tracepoint]
pub fn sys_dup_enter(ctx: TracePointContext) -> u32 {
    enter_close(tp_arg(&ctx, 1));
    0
}

// ---- kprobe backend (x86-64 syscall wrappers) ----

/// Offsets of the syscall argument registers in x86-64 `struct pt_regs`:
/// di, si, dx, r10 (the ABI is fixed; it is not a kernel-internal layout).
const PT_REGS_ARG: [u64; 4] = [112, 104, 96, 56];

#[inline(always)]
fn kp_arg(ctx: &ProbeContext, n: usize) -> u64 {
    let Some(regs) = ctx.arg::<u64>(0) else {
        return 0;
    };
    unsafe { bpf_probe_read_kernel((regs + PT_REGS_ARG[n]) as *const u64) }.unwrap_or(0)
}

#[inline(always)]
fn kp_ret(ctx: &RetProbeContext) -> i64 {
    let _ = ctx.as_ptr();
    ctx.ret::<i64>()
}

macro_rules! kp_io {
    ($enter:ident, $exit:ident, $call:expr, $ptr_arg:expr, $count_arg:expr) => {
        #[kprobe]
        pub fn $enter(ctx: ProbeContext) -> u32 {
            enter_io(
                $call,
                kp_arg(&ctx, 0),
                kp_arg(&ctx, $ptr_arg),
                kp_arg(&ctx, $count_arg),
            );
            0
        }
        #[kretprobe]
        pub fn $exit(ctx: RetProbeContext) -> u32 {
            exit_io(kp_ret(&ctx), $call);
            0
        }
    };
}

kp_io!(kp_read_enter, kp_read_exit, SyscallId::Read, 1, 2);
kp_io!(kp_write_enter, kp_write_exit, SyscallId::Write, 1, 2);
kp_io!(kp_readv_enter, kp_readv_exit, SyscallId::Readv, 1, 2);
kp_io!(kp_writev_enter, kp_writev_exit, SyscallId::Writev, 1, 2);
kp_io!(
    kp_recvfrom_enter,
    kp_recvfrom_exit,
    SyscallId::Recvfrom,
    1,
    2
);
kp_io!(kp_sendto_enter, kp_sendto_exit, SyscallId::Sendto, 1, 2);
kp_io!(kp_recvmsg_enter, kp_recvmsg_exit, SyscallId::Recvmsg, 1, 2);
kp_io!(kp_sendmsg_enter, kp_sendmsg_exit, SyscallId::Sendmsg, 1, 2);
kp_io!(
    kp_sendfile_enter,
    kp_sendfile_exit,
    SyscallId::Sendfile,
    1,
    3
);

#[kprobe]
pub fn kp_connect_enter(ctx: ProbeContext) -> u32 {
    enter_connect(kp_arg(&ctx, 0));
    0
}

#[kretprobe]
pub fn kp_connect_exit(ctx: RetProbeContext) -> u32 {
    exit_connect(kp_ret(&ctx));
    0
}

#[kretprobe]
pub fn kp_accept_exit(ctx: RetProbeContext) -> u32 {
    exit_accept(kp_ret(&ctx));
    0
}

#[kprobe]
pub fn kp_close_enter(ctx: ProbeContext) -> u32 {
    enter_close(kp_arg(&ctx, 0));
    0
}

#[kprobe]
pub fn kp_dup_enter(ctx: ProbeContext) -> u32 {
    enter_close(kp_arg(&ctx, 1));
    0
}
