//! Writing events into the ring buffer.
//!
//! Wake-ups are batched: a submit wakes the reader only when it takes the bytes
//! waiting past a multiple of `wakeup_bytes`; between those the reader drains the
//! buffer on its own short timer. Waking on every submit once the buffer is past the
//! mark (as this did before) costs a wake-up per event exactly when the reader is
//! behind (an irq_work inside the traced call, and the reader woken again and again).

use agent_common::{
    ConnEvent, DataEvent, Direction, EventHeader, EventKind, MAX_PAYLOAD, NextMessage, ProcEvent,
    SockInfo, counter, framing, lost,
};
use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_ktime_get_ns,
        generated::{bpf_probe_read_user, bpf_ringbuf_output},
    },
};

use crate::{
    config::setting,
    http_follow,
    maps::{EVENTS, NEXT_MESSAGE, SCRATCH, count, count_lost},
    socket,
};

/// The flags for submitting `size` more bytes: a wake-up when they take the bytes
/// waiting past the next multiple of `wakeup_bytes`, none otherwise.
#[inline(always)]
fn wakeup_flags(size: u64) -> u64 {
    let mark = setting!(wakeup_bytes);
    if mark == 0 {
        return BPF_RB_FORCE_WAKEUP as u64;
    }
    let waiting = EVENTS.query(BPF_RB_AVAIL_DATA as u64);
    if waiting / mark != (waiting + size) / mark {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

#[inline(always)]
pub fn header(kind: EventKind, pid_tgid: u64, fd: u32) -> EventHeader {
    // SAFETY: a helper without arguments.
    header_at(kind, pid_tgid, fd, unsafe { bpf_ktime_get_ns() })
}

#[inline(always)]
fn header_at(kind: EventKind, pid_tgid: u64, fd: u32, ts_ns: u64) -> EventHeader {
    EventHeader {
        kind: kind as u32,
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        fd,
        ts_ns,
    }
}

#[inline(always)]
fn output<T>(event: &T) {
    if EVENTS
        .output::<T>(event, wakeup_flags(core::mem::size_of::<T>() as u64))
        .is_err()
    {
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

/// Adds `value` to `*counter` atomically and returns the value before. Written as the
/// instruction itself (BPF_ATOMIC | BPF_FETCH, Linux 5.12): core leaves the atomic
/// read-modify-write methods out for BPF (the target has no compare-and-swap), and
/// the compiler accepts a fetching add only for `-mcpu=v3`, which the build cannot
/// ask for, while every kernel that runs sonde accepts the instruction.
///
/// # Safety
/// `counter` must point to a naturally aligned u64 in map memory.
#[inline(always)]
unsafe fn fetch_add(counter: *mut u64, value: u64) -> u64 {
    let mut v = value;
    // SAFETY: the caller passes a valid, aligned map value address; the instruction
    // reads and writes only those 8 bytes.
    unsafe {
        core::arch::asm!(
            "{v} = atomic_fetch_add((u64 *)({p} + 0), {v})",
            p = in(reg) counter,
            v = inout(reg) v,
            options(nostack),
        );
    }
    v
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
    parent: (u32, u32),
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
        (*ev).parent_tgid = parent.0;
        (*ev).parent_tid = parent.1;
        (*ev).comm = aya_ebpf::helpers::bpf_get_current_comm().unwrap_or([0; 16]);
        (*ev).args_len = read_user_range(&raw mut (*ev).args, args);
        (*ev).env_len = read_user_range(&raw mut (*ev).env, env);
    }
    // An exec is rare and its /proc entry may vanish soon (a curl lives for
    // milliseconds): wake the reader at once.
    let flags = if kind == EventKind::Exec {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        wakeup_flags(core::mem::size_of::<ProcEvent>() as u64)
    };
    entry.submit(flags);
}

/// One data event: `len` bytes moved at user address `src` (0 when the bytes cannot be
/// read, as for sendfile), of which the first `payload_cap` are copied. `ts_ns` is when
/// the bytes moved: the call's start for bytes sent, its end for bytes received. It is
/// never 0 (a branch on it here would double the states the verifier walks for every
/// event of an iovec loop).
///
/// When the next message of this stream starts inside these bytes but past the copied
/// prefix, the bytes go up as two events split there, the second with a prefix copied
/// from the new message's first byte: a read that holds the end of a large body and the
/// start of the next message loses neither. User space announces such starts; with
/// `follow_http`, the programs also find them in the HTTP heads of the bytes they copy
/// (http_follow.rs), for the reads that come before user space has caught up.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
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
    follow_http: bool,
) {
    // SAFETY: `info` points into a SOCKETS map value, valid for the whole program run;
    // the counters are naturally aligned u64s, and the stream offset must be taken
    // with an atomic add because threads on other CPUs write the same socket.
    let offset = unsafe {
        let counter = match (direction, tls) {
            (Direction::Ingress, false) => &raw mut (*info).ingress_bytes,
            (Direction::Egress, false) => &raw mut (*info).egress_bytes,
            (Direction::Ingress, true) => &raw mut (*info).tls_ingress_bytes,
            (Direction::Egress, true) => &raw mut (*info).tls_egress_bytes,
        };
        // The offset advances whether or not the event gets through, so that user
        // space sees a lost event as a gap of the right size. Plaintext from a TLS
        // library and bytes on the wire are two streams, each with its own count.
        fetch_add(counter, len)
    };
    let mut cap = setting!(payload_cap) as u64;
    if cap > MAX_PAYLOAD as u64 {
        cap = MAX_PAYLOAD as u64;
    }
    let slot = NextMessage::slot(direction, tls);
    let key = socket::key((pid_tgid >> 32) as u32, fd);
    let next = NEXT_MESSAGE.get_ptr_mut(key);
    let mut start = 0u64;
    let mut amqp = false;
    if let Some(next) = next {
        // SAFETY: a map value pointer, valid for the run; `slot` is below 4.
        unsafe {
            start = (*next).offset[slot & 3];
            amqp = (*next).framing[slot & 3] == framing::AMQP;
        }
    }
    let mut split = 0u64;
    if src != 0 && start > offset + cap && start < offset + len {
        split = start - offset;
    }
    let record = Record {
        // In a Go program, the goroutine the I/O is for, where its thread id would be.
        pid_tgid: crate::probes::goroutines::stamp(pid_tgid, fd, direction),
        fd,
        info,
        direction,
        syscall,
        ts_ns,
        cap,
        // Bytes go past the copied prefix and user space knows of no message start
        // ahead: let it read the head it needs at once, before the process reads on.
        wake: next.is_some() && start <= offset && len > cap,
    };
    let follow = follow_http && !amqp && src != 0 && len > cap;
    if !follow {
        if split == 0 {
            record.emit(src, offset, len);
        } else {
            record.emit(src, offset, split);
            record.emit(src + split, offset + split, len - split);
            count(counter::MESSAGE_WINDOWS);
        }
        if let Some(next) = next {
            follow_frames(next, slot, offset, len);
        }
        return;
    }
    // Each piece is copied first and its heads read before it is sent, so that a next
    // message they place in this read past the piece's copy is split off into a piece
    // of its own. Where the pieces stand is kept in map memory (http_follow::Cursor).
    let end = offset + len;
    let Some(cur) = http_follow::cursor() else {
        record.emit(src, offset, len);
        return;
    };
    // SAFETY: this CPU's cursor, valid for the run.
    unsafe {
        write_volatile(&raw mut (*cur).at, offset);
        write_volatile(
            &raw mut (*cur).from,
            if start > offset { start } else { offset },
        );
        write_volatile(&raw mut (*cur).found, 0);
    }
    for piece in 0..MAX_PIECES {
        // SAFETY: as above.
        let (at, from) = unsafe {
            (
                read_volatile(&raw const (*cur).at),
                read_volatile(&raw const (*cur).from),
            )
        };
        let mut piece_end = if split != 0 && piece == 0 {
            offset + split
        } else {
            end
        };
        if at < offset || at >= piece_end {
            break;
        }
        let Some(size) = record.fill(src + (at - offset), at, piece_end - at) else {
            break;
        };
        let after = http_follow::next_start(from);
        if after != 0 {
            // SAFETY: as above.
            unsafe { write_volatile(&raw mut (*cur).found, after) };
        }
        if piece_end == end && piece + 1 < MAX_PIECES && after > at + cap && after < end {
            piece_end = after;
            record.set_len(after - at);
        }
        record.submit(size);
        if piece_end == end {
            break;
        }
        count(counter::MESSAGE_WINDOWS);
        // SAFETY: as above.
        unsafe {
            write_volatile(&raw mut (*cur).at, piece_end);
            write_volatile(&raw mut (*cur).from, piece_end);
        }
    }
    // SAFETY: as above.
    let found = unsafe { read_volatile(&raw const (*cur).found) };
    if found > start && found >= end {
        match next {
            // SAFETY: a map value pointer, valid for the run; `slot` is below 4.
            Some(next) => unsafe { (*next).offset[slot & 3] = found },
            None => {
                let mut fresh = NextMessage::default();
                fresh.offset[slot & 3] = found;
                let _ = NEXT_MESSAGE.insert(key, fresh, 0);
            }
        }
    }
}

/// Most pieces one read is split into where the programs follow HTTP heads.
const MAX_PIECES: u32 = 4;

/// For a stream whose frames the programs follow (AMQP), moves the announced offset
/// past every frame whose header lies in the bytes just copied, so that the next large
/// read is split at its frame boundary too, without waiting for user space.
#[inline(always)]
fn follow_frames(next: *mut NextMessage, slot: usize, offset: u64, len: u64) {
    // SAFETY: a map value pointer, valid for the run; `slot` is below 4.
    unsafe {
        if (*next).framing[slot & 3] != framing::AMQP {
            return;
        }
        let Some(buf) = SCRATCH.get_ptr_mut(0) else {
            return;
        };
        // The last record written to the scratch buffer holds the bytes from
        // `copied_from` on (the window, or the prefix when there was no split).
        let copied_from = (*buf).event.offset;
        let copied = (*buf).event.captured as u64;
        let end = offset + len;
        let mut frame = (*next).offset[slot & 3];
        for _ in 0..8 {
            if frame < copied_from || frame >= end {
                break;
            }
            let at = frame - copied_from;
            if at + 7 > copied {
                break;
            }
            let at = (at & (MAX_PAYLOAD as u64 - 1)) as usize;
            if at + 7 > MAX_PAYLOAD {
                break;
            }
            let p = &raw const (*buf).payload;
            let size = u32::from_be_bytes([(*p)[at + 3], (*p)[at + 4], (*p)[at + 5], (*p)[at + 6]]);
            // type, channel and size (7 bytes), the payload, the frame-end octet.
            frame += 8 + size as u64;
        }
        (*next).offset[slot & 3] = frame;
    }
}

/// Copies a socket tuple word by word: a plain struct copy between map values can
/// come out as a call to a byte-by-byte memcpy, which costs the verifier dearly.
///
/// # Safety
/// Both pointers must be to `SockTuple`s in map memory (8-byte aligned, 40 bytes).
#[inline(always)]
unsafe fn copy_tuple(dst: *mut agent_common::SockTuple, src: *const agent_common::SockTuple) {
    const WORDS: usize = core::mem::size_of::<agent_common::SockTuple>() / 8;
    let (dst, src) = (dst.cast::<u64>(), src.cast::<u64>());
    for i in 0..WORDS {
        // SAFETY: in bounds of both 40-byte tuples, 8-byte aligned (see above).
        unsafe { core::ptr::write_volatile(dst.add(i), core::ptr::read_volatile(src.add(i))) };
    }
}

/// What one record of a data event shares with the other half of a split.
struct Record {
    pid_tgid: u64,
    fd: u32,
    info: *mut SockInfo,
    direction: Direction,
    syscall: u32,
    ts_ns: u64,
    cap: u64,
    wake: bool,
}

impl Record {
    /// Writes one data event for `len` bytes at stream `offset` from user address `src`
    /// into the ring buffer, through the per-CPU scratch buffer (too big for the stack).
    #[inline(always)]
    fn emit(&self, src: u64, offset: u64, len: u64) {
        if let Some(size) = self.fill(src, offset, len) {
            self.submit(size);
        }
    }

    /// Fills the scratch buffer with the event and its copied prefix; returns its size,
    /// `None` when it cannot be sent (counted).
    #[inline(always)]
    fn fill(&self, src: u64, offset: u64, len: u64) -> Option<u64> {
        let Some(buf) = SCRATCH.get_ptr_mut(0) else {
            count_lost(lost::NO_SCRATCH);
            return None;
        };
        let mut captured = if src == 0 { 0 } else { self.cap };
        if captured > len {
            captured = len;
        }
        // SAFETY: `buf` is this CPU's scratch slot and `self.info` a SOCKETS map value,
        // both valid for the run; the copy length is bounded by MAX_PAYLOAD, the size
        // of the payload array, and the helper checks the user address itself.
        unsafe {
            if captured > 0 {
                // The same number (1..=MAX_PAYLOAD: user space keeps the cap at most
                // MAX_PAYLOAD), bounded on the register handed to the helper. Linux 6.1's
                // verifier does not carry a bound checked on one register over to the
                // copy the compiler reloads from the stack, and refuses the program
                // ("R2 min value is negative"); 6.12 and later do.
                captured = ((captured - 1) & (MAX_PAYLOAD as u64 - 1)) + 1;
                let dst = (&raw mut (*buf).payload).cast::<core::ffi::c_void>();
                if bpf_probe_read_user(dst, captured as u32, src as *const core::ffi::c_void) != 0 {
                    count_lost(lost::USER_READ);
                    captured = 0;
                }
            }
            let ev = &raw mut (*buf).event;
            (*ev).header = header_at(EventKind::Data, self.pid_tgid, self.fd, self.ts_ns);
            copy_tuple(&raw mut (*ev).tuple, &raw const (*self.info).tuple);
            (*ev).offset = offset;
            (*ev).len = len;
            (*ev).captured = captured as u32;
            (*ev).direction = self.direction as u32;
            (*ev).syscall = self.syscall;
            (*ev).role = (*self.info).role;
            let size = core::mem::size_of::<DataEvent>() as u64
                + (captured & (MAX_PAYLOAD as u64 * 2 - 1));
            if size > core::mem::size_of::<crate::maps::DataBuf>() as u64 {
                count_lost(lost::OVERSIZE);
                return None;
            }
            Some(size)
        }
    }

    /// Shortens the event in the scratch buffer to `len` bytes (more than it copied).
    #[inline(always)]
    fn set_len(&self, len: u64) {
        if let Some(buf) = SCRATCH.get_ptr_mut(0) {
            // SAFETY: this CPU's scratch slot, valid for the run.
            unsafe { (*buf).event.len = len };
        }
    }

    /// Sends the `size` bytes [`Record::fill`] put in the scratch buffer.
    #[inline(always)]
    fn submit(&self, size: u64) {
        let Some(buf) = SCRATCH.get_ptr_mut(0) else {
            return;
        };
        let flags = if self.wake {
            BPF_RB_FORCE_WAKEUP as u64
        } else {
            wakeup_flags(size)
        };
        // SAFETY: the scratch slot holds `size` bytes of event and prefix (fill checked
        // it against the slot's size).
        let ret = unsafe {
            bpf_ringbuf_output(
                (&raw const EVENTS).cast_mut().cast(),
                buf.cast(),
                size,
                flags,
            )
        };
        if ret != 0 {
            count_lost(lost::RINGBUF_FULL);
        }
    }
}
