//! Writing events into the ring buffer.
//!
//! Wake-ups are batched: a submit only wakes the reader once `wakeup_bytes` are
//! waiting; below that the reader drains the buffer on its own short timer, which
//! saves a wake-up per event under load.

use agent_common::{
    ConnEvent, DataEvent, Direction, EventHeader, EventKind, MAX_PAYLOAD, ProcEvent, SockInfo, lost,
};
use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_probe_read_user, bpf_ringbuf_output},
    },
};

use crate::{
    config::setting,
    maps::{EVENTS, SCRATCH, count_lost},
};

#[inline(always)]
fn wakeup_flags() -> u64 {
    if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= setting!(wakeup_bytes) {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

#[inline(always)]
pub fn header(kind: EventKind, pid_tgid: u64, fd: u32) -> EventHeader {
    EventHeader {
        kind: kind as u32,
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        fd,
        ts_ns: unsafe { bpf_ktime_get_ns() },
    }
}

#[inline(always)]
fn output<T>(event: &T) {
    if EVENTS.output::<T>(event, wakeup_flags()).is_err() {
        count_lost(lost::RINGBUF_FULL);
    }
}

#[inline(always)]
pub fn conn_event(kind: EventKind, pid_tgid: u64, fd: u32, info: &SockInfo, ret: i32) {
    output(&ConnEvent {
        header: header(kind, pid_tgid, fd),
        tuple: info.tuple,
        role: info.role,
        ret,
    });
}

/// Copies the user memory range `start..end` (at most N bytes) into `dst`; returns the
/// bytes copied, 0 when there is no range or it cannot be read.
#[inline(always)]
fn read_user_range<const N: usize>(dst: *mut [u8; N], range: Option<(u64, u64)>) -> u32 {
    let Some((start, end)) = range else { return 0 };
    let mut n = end.saturating_sub(start);
    if n > N as u64 {
        n = N as u64;
    }
    let dst = dst.cast::<core::ffi::c_void>();
    if n > 0
        && unsafe { bpf_probe_read_user(dst, n as u32, start as *const core::ffi::c_void) } == 0
    {
        n as u32
    } else {
        0
    }
}

/// An exec or exit event, written straight into the ring buffer (it is too big for
/// the stack). `args` and `env` are the user address ranges of the command line and
/// the environment, for exec.
#[inline(always)]
pub fn proc_event(
    kind: EventKind,
    pid_tgid: u64,
    exit_code: i32,
    args: Option<(u64, u64)>,
    env: Option<(u64, u64)>,
) {
    let Some(mut entry) = EVENTS.reserve::<ProcEvent>(0) else {
        count_lost(lost::RINGBUF_FULL);
        return;
    };
    let ev = entry.as_mut_ptr();
    unsafe {
        (*ev).header = header(kind, pid_tgid, 0);
        (*ev).exit_code = exit_code;
        (*ev).comm = aya_ebpf::helpers::bpf_get_current_comm().unwrap_or([0; 16]);
        (*ev).args_len = read_user_range(&raw mut (*ev).args, args);
        (*ev).env_len = read_user_range(&raw mut (*ev).env, env);
    }
    // An exec is rare and its /proc entry may vanish soon (a curl lives for
    // milliseconds): wake the reader at once.
    let flags = if kind == EventKind::Exec {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        wakeup_flags()
    };
    entry.submit(flags);
}

/// One data event: `len` bytes moved at user address `src` (0 when the bytes cannot be
/// read, as for sendfile), of which the first `payload_cap` are copied. `ts_ns` is when
/// the bytes moved, or 0 for now.
#[inline(always)]
#[allow(
    clippy::too_many_arguments,
    reason = "inlined into each probe: a struct of these values would only add a copy on the 512-byte BPF stack"
)]
pub fn data_event(
    pid_tgid: u64,
    fd: u32,
    info: *mut SockInfo,
    direction: Direction,
    syscall: u32,
    src: u64,
    len: u64,
    tls: bool,
    ts_ns: u64,
) {
    // The stream offset advances whether or not the event gets through, so that user
    // space sees a lost event as a gap of the right size. Plaintext from a TLS library
    // and bytes on the wire are two streams, each with its own count.
    let offset = unsafe {
        let counter = match (direction, tls) {
            (Direction::Ingress, false) => &raw mut (*info).ingress_bytes,
            (Direction::Egress, false) => &raw mut (*info).egress_bytes,
            (Direction::Ingress, true) => &raw mut (*info).tls_ingress_bytes,
            (Direction::Egress, true) => &raw mut (*info).tls_egress_bytes,
        };
        let o = *counter;
        *counter = o + len;
        o
    };
    let Some(buf) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let mut captured = setting!(payload_cap) as u64;
    if captured > len {
        captured = len;
    }
    if src == 0 {
        captured = 0;
    }
    if captured > MAX_PAYLOAD as u64 {
        captured = MAX_PAYLOAD as u64;
    }
    unsafe {
        if captured > 0 {
            let dst = (&raw mut (*buf).payload).cast::<core::ffi::c_void>();
            if bpf_probe_read_user(dst, captured as u32, src as *const core::ffi::c_void) != 0 {
                count_lost(lost::USER_READ);
                captured = 0;
            }
        }
        (*buf).event = DataEvent {
            header: {
                let mut h = header(EventKind::Data, pid_tgid, fd);
                if ts_ns != 0 {
                    h.ts_ns = ts_ns;
                }
                h
            },
            tuple: (*info).tuple,
            offset,
            len,
            captured: captured as u32,
            direction: direction as u32,
            syscall,
            role: (*info).role,
        };
        let size =
            core::mem::size_of::<DataEvent>() as u64 + (captured & (MAX_PAYLOAD as u64 * 2 - 1));
        if size > core::mem::size_of::<crate::maps::DataBuf>() as u64 {
            return;
        }
        let ret = bpf_ringbuf_output(
            (&raw const EVENTS).cast_mut().cast(),
            buf.cast(),
            size,
            wakeup_flags(),
        );
        if ret != 0 {
            count_lost(lost::RINGBUF_FULL);
        }
    }
}
