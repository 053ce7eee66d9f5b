//! Which goroutine a Go program's socket I/O is for.
//!
//! Goroutines move between threads, so in a Go program the thread of a read or write
//! says nothing about the request it belongs to. These uprobes (on Go functions, with
//! Go's register ABI on amd64: arguments in RAX, RBX, RCX..., the current goroutine's
//! `g` in R14) tell it instead, and the data events of a Go socket carry a goroutine
//! identity where other programs' carry their thread id ([`stamp`]):
//!
//! - `internal/poll.(*FD).Read` and `(*FD).Write` (every socket read and write of
//!   net.Conn goes through them, the syscall inside, perhaps after the goroutine parked
//!   and woke on another thread): the goroutine reading or writing each descriptor,
//!   per direction. poll.FD is `{fdmu fdMutex (16 bytes); Sysfd int; ...}` since Go 1.9.
//! - net/http's client writes a request from its connection's own writeLoop goroutine,
//!   not from the goroutine that called `Client.Do`: `(*persistConn).roundTrip(pc,
//!   treq)`, on the calling goroutine, remembers it by the `*Request` that treq (a
//!   `*transportRequest`, whose first field is the embedded `*Request`) carries, and
//!   `(*Request).write(r, ...)` on the writeLoop, called with that same pointer, makes
//!   its writes count as that goroutine's. (Transport.roundTrip may copy the request
//!   before: a body to rewind.)
//! - Goroutines a handler starts (`go func() {...}()` inside ServeHTTP) count as the
//!   handler's: `serverHandler.ServeHTTP` marks its goroutine as serving while it runs
//!   (entry and RET instructions), and `runtime.newproc1(fn, callergp, ...)`, run on
//!   the system stack of the thread, gives the new `g` (returned in RAX at its RET
//!   instructions) its caller's identity when the caller serves or is itself a
//!   handler's. Goroutines started elsewhere (the server's per-connection goroutines)
//!   are their own.
//!
//! A goroutine's identity is its `g`'s address folded into 31 bits with the top bit
//! set (thread ids are below 2^22): [`logical_id`].

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::{map, uprobe},
    maps::LruHashMap,
    programs::ProbeContext,
};

use agent_common::Direction;

use crate::config::setting;

/// A goroutine (or any Go object) of a process.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct GoKey {
    pub tgid: u64,
    pub addr: u64,
}

/// A descriptor's direction in a process.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct GoFdKey {
    pub tgid: u32,
    pub fd: u32,
    pub direction: u32,
    pub _pad: u32,
}

/// The goroutine identity reading or writing each Go socket, by direction.
#[map(name = "GO_FD_OWNER")]
static GO_FD_OWNER: LruHashMap<GoFdKey, u32> = LruHashMap::with_max_entries(65536, 0);

/// `*http.Request` -> the goroutine that called `roundTrip` with it.
#[map(name = "GO_REQUESTS")]
static GO_REQUESTS: LruHashMap<GoKey, u64> = LruHashMap::with_max_entries(16384, 0);

/// Goroutine -> the goroutine its writes count as: a writeLoop writing a request, or a
/// goroutine a handler started.
#[map(name = "GO_ACTING")]
static GO_ACTING: LruHashMap<GoKey, u64> = LruHashMap::with_max_entries(65536, 0);

/// Goroutines inside `serverHandler.ServeHTTP`.
#[map(name = "GO_SERVING")]
static GO_SERVING: LruHashMap<GoKey, u8> = LruHashMap::with_max_entries(65536, 0);

/// Thread -> the identity a goroutine being created there takes (0: its own), between
/// newproc1's entry and its return.
#[map(name = "GO_NEWPROC")]
static GO_NEWPROC: LruHashMap<u64, u64> = LruHashMap::with_max_entries(4096, 0);

/// The identity data events carry for goroutine `g`.
#[inline(always)]
pub fn logical_id(g: u64) -> u32 {
    // agent_common::is_goroutine_id tells these from thread ids.
    0x8000_0000 | ((g >> 3) as u32 & 0x7fff_ffff)
}

/// `pid_tgid` with the thread id replaced by the identity of the goroutine doing I/O
/// on `fd` in `direction`, when a Go program's is known.
#[inline(always)]
pub fn stamp(pid_tgid: u64, fd: u32, direction: Direction) -> u64 {
    if setting!(follow_goroutines) == 0 {
        return pid_tgid;
    }
    match unsafe { GO_FD_OWNER.get(fd_key(pid_tgid, fd, direction)) } {
        Some(id) => (pid_tgid & 0xffff_ffff_0000_0000) | u64::from(*id),
        None => pid_tgid,
    }
}

/// Whom goroutine `g`'s writes count as.
#[inline(always)]
fn acting(tgid: u64, g: u64) -> u64 {
    match unsafe { GO_ACTING.get(GoKey { tgid, addr: g }) } {
        Some(a) => *a,
        None => g,
    }
}

#[inline(always)]
fn fd_key(pid_tgid: u64, fd: u32, direction: Direction) -> GoFdKey {
    GoFdKey {
        tgid: (pid_tgid >> 32) as u32,
        fd,
        direction: direction as u32,
        _pad: 0,
    }
}

/// Goroutine `g` reads or writes `fd` now (from the TLS probes too); nothing unless
/// goroutines are followed.
#[inline(always)]
pub fn own(pid_tgid: u64, fd: u32, direction: Direction, g: u64) {
    if setting!(follow_goroutines) == 0 {
        return;
    }
    let who = match direction {
        Direction::Egress => acting(pid_tgid >> 32, g),
        Direction::Ingress => g,
    };
    let _ = GO_FD_OWNER.insert(fd_key(pid_tgid, fd, direction), logical_id(who), 0);
}

#[inline(always)]
fn fd_io(ctx: &ProbeContext, direction: Direction) {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !crate::probes::select::traced(pid_tgid) {
        return;
    }
    let regs = unsafe { &*ctx.regs };
    let sysfd = unsafe { bpf_probe_read_user((regs.rax + 16) as *const u64) }.unwrap_or(u64::MAX);
    if sysfd > u64::from(u32::MAX / 2) {
        return;
    }
    own(pid_tgid, sysfd as u32, direction, regs.r14);
}

/// `func (fd *FD) Read(p []byte) (int, error)` in internal/poll.
#[uprobe]
pub fn go_fd_read_enter(ctx: ProbeContext) -> u32 {
    fd_io(&ctx, Direction::Ingress);
    0
}

/// `func (fd *FD) Write(p []byte) (int, error)` in internal/poll.
#[uprobe]
pub fn go_fd_write_enter(ctx: ProbeContext) -> u32 {
    fd_io(&ctx, Direction::Egress);
    0
}

/// `func (pc *persistConn) roundTrip(req *transportRequest) (*Response, error)` in
/// net/http.
#[uprobe]
pub fn go_round_trip_enter(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !crate::probes::select::traced(pid_tgid) {
        return 0;
    }
    let regs = unsafe { &*ctx.regs };
    let Ok(request) = (unsafe { bpf_probe_read_user(regs.rbx as *const u64) }) else {
        return 0;
    };
    let tgid = pid_tgid >> 32;
    let caller = acting(tgid, regs.r14);
    let _ = GO_REQUESTS.insert(
        GoKey {
            tgid,
            addr: request,
        },
        caller,
        0,
    );
    0
}

/// `func (r *Request) write(w io.Writer, usingProxy bool, ...) error` in net/http.
#[uprobe]
pub fn go_request_write_enter(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !crate::probes::select::traced(pid_tgid) {
        return 0;
    }
    let regs = unsafe { &*ctx.regs };
    let tgid = pid_tgid >> 32;
    let req = GoKey {
        tgid,
        addr: regs.rax,
    };
    let me = GoKey {
        tgid,
        addr: regs.r14,
    };
    // A request that went through roundTrip: its writes are its caller's. Another
    // (a request a server writes to a proxy, say) is the writer's own.
    match unsafe { GO_REQUESTS.get(req) } {
        Some(caller) => {
            let caller = *caller;
            let _ = GO_ACTING.insert(me, caller, 0);
        }
        None => {
            let _ = GO_ACTING.remove(me);
        }
    }
    0
}

/// `serverHandler.ServeHTTP` entry: this goroutine handles a request.
#[uprobe]
pub fn go_serve_enter(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !crate::probes::select::traced(pid_tgid) {
        return 0;
    }
    let regs = unsafe { &*ctx.regs };
    let _ = GO_SERVING.insert(
        GoKey {
            tgid: pid_tgid >> 32,
            addr: regs.r14,
        },
        1,
        0,
    );
    0
}

/// A RET of `serverHandler.ServeHTTP`: the handler returned.
#[uprobe]
pub fn go_serve_ret(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let regs = unsafe { &*ctx.regs };
    let _ = GO_SERVING.remove(GoKey {
        tgid: pid_tgid >> 32,
        addr: regs.r14,
    });
    0
}

/// `func newproc1(fn *funcval, callergp *g, callerpc uintptr, ...) *g` in runtime,
/// on the system stack: who the new goroutine will count as.
#[uprobe]
pub fn go_newproc_enter(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !crate::probes::select::traced(pid_tgid) {
        return 0;
    }
    let regs = unsafe { &*ctx.regs };
    let tgid = pid_tgid >> 32;
    let caller = GoKey {
        tgid,
        addr: regs.rbx,
    };
    let inherited = if unsafe { GO_SERVING.get(caller) }.is_some() {
        regs.rbx
    } else {
        match unsafe { GO_ACTING.get(caller) } {
            Some(a) => *a,
            None => 0,
        }
    };
    let _ = GO_NEWPROC.insert(pid_tgid, inherited, 0);
    0
}

/// A RET of `runtime.newproc1`: the new `g` is in RAX. A `g` is reused after its
/// goroutine exits, so one created outside a handler forgets what it counted as.
#[uprobe]
pub fn go_newproc_ret(ctx: ProbeContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(inherited) = (unsafe { GO_NEWPROC.get(pid_tgid) }).copied() else {
        return 0;
    };
    let _ = GO_NEWPROC.remove(pid_tgid);
    let regs = unsafe { &*ctx.regs };
    let new = GoKey {
        tgid: pid_tgid >> 32,
        addr: regs.rax,
    };
    if inherited == 0 {
        let _ = GO_ACTING.remove(new);
    } else {
        let _ = GO_ACTING.insert(new, inherited, 0);
    }
    let _ = GO_SERVING.remove(new);
    0
}
