//! Following HTTP/1.x messages in the kernel, from the bytes a large read copied.
//!
//! User space announces where the next message of a stream starts (NEXT_MESSAGE), but
//! it learns that only once it has read the head, and a process can read a body of a
//! few hundred kilobytes and the next message in less time than the agent takes to
//! wake. So when a read moves more bytes than are copied, the programs read the heads
//! in what they did copy: a head that gives its body's length says where the next
//! message starts. A read that holds that start past its copied prefix is split there
//! (emit.rs), and the heads found in the window copied from it move the start on.
//!
//! Only heads the programs can be sure of are followed: a request or response line,
//! then headers with one Content-Length and no Transfer-Encoding (a request with
//! neither has no body; a 1xx, 204 or 304 response has none either). Anything else
//! leaves the start where it was, for user space. A wrong start costs only a split
//! at a place user space did not need: it never changes the bytes or their offsets.

use agent_common::MAX_PAYLOAD;
use aya_ebpf::{helpers::generated::bpf_loop, macros::map, maps::PerCpuArray};

use crate::{
    branchless::{masked, name_at},
    maps::SCRATCH,
};

/// Heads followed in one copy: a window may hold a few small messages.
const MAX_HEADS: u32 = 4;
/// Header lines read in one head; a head with more is not followed.
const MAX_LINES: u32 = 64;

/// [`Scan::flags`] bits.
const RESPONSE: u32 = 1;
const NO_BODY: u32 = 2;
const LENGTH_DONE: u32 = 4;

/// The state of [`scan_byte`], in map memory rather than on the stack: the verifier
/// knows nothing of a value it reads from a map, so the callback's states agree
/// from one byte to the next and it is checked in a pass or two. On the stack, each
/// count would be a known constant, every byte a new state, and the programs that
/// copy bytes in three places would go past the verifier's limit.
#[repr(C)]
struct Scan {
    /// Index in the copy of the first byte looked at, and of the current head's.
    first: u32,
    head: u32,
    /// Bytes in the copy.
    end: u32,
    /// The last four bytes, the newest lowest.
    window: u32,
    lines: u32,
    /// Index in the copy where the value of Content-Length starts; 0 when none.
    length_from: u32,
    digits: u32,
    flags: u32,
    heads: u32,
    /// Index in the copy just past the last whole message found (may be past `end`).
    found: u32,
    length: u64,
}

#[map(name = "HTTP_SCAN")]
static HTTP_SCAN: PerCpuArray<Scan> = PerCpuArray::with_max_entries(1, 0);

/// Where the split of one read stands (emit.rs): stream offsets of the next piece's
/// start, of the message start its heads are read from, and of the message after the
/// last head found. In map memory like [`Scan`]: on the stack, each way through a
/// piece (copied or not, split or not) would leave different known values, and the
/// verifier would walk every later piece once for each.
#[repr(C)]
pub struct Cursor {
    pub at: u64,
    pub from: u64,
    pub found: u64,
}

#[map(name = "HTTP_CURSOR")]
static HTTP_CURSOR: PerCpuArray<Cursor> = PerCpuArray::with_max_entries(1, 0);

/// This CPU's [`Cursor`].
#[inline(always)]
pub fn cursor() -> Option<*mut Cursor> {
    HTTP_CURSOR.get_ptr_mut(0)
}

/// Where the message after the last whole head found in the scratch copy starts: the
/// heads are read from stream offset `from` on (a message start, or where the copy
/// starts when no start is known and the copy begins like one). 0 when no head there
/// says.
#[inline(always)]
pub fn next_start(from: u64) -> u64 {
    let (Some(buf), Some(scan)) = (SCRATCH.get_ptr(0), HTTP_SCAN.get_ptr_mut(0)) else {
        return 0;
    };
    // SAFETY: this CPU's scratch slot and scan state, valid for the run; the last
    // record written to the scratch slot is the copy looked at.
    unsafe {
        let copied_from = (*buf).event.offset;
        let copied = (*buf).event.captured as u64;
        let at = if from < copied_from {
            copied_from
        } else {
            from
        };
        if at >= copied_from + copied {
            return 0;
        }
        let first = (at - copied_from) as u32;
        (*scan).first = first;
        (*scan).end = copied as u32;
        (*scan).heads = 0;
        (*scan).found = 0;
        (*scan).start_head(first);
        bpf_loop(
            copied as u32 - first,
            scan_byte as *mut core::ffi::c_void,
            core::ptr::null_mut(),
            0,
        );
        if (*scan).heads == 0 {
            return 0;
        }
        copied_from + (*scan).found as u64
    }
}

impl Scan {
    /// Starts on a head at index `at` of the copy.
    #[inline(always)]
    fn start_head(&mut self, at: u32) {
        self.head = at;
        self.window = 0;
        self.lines = 0;
        self.length_from = 0;
        self.digits = 0;
        self.flags = 0;
        self.length = 0;
    }

    /// The body's length, once the head is whole, when it says it.
    #[inline(always)]
    fn body_len(&self) -> Option<u64> {
        if self.flags & NO_BODY != 0 {
            return Some(0);
        }
        if self.length_from != 0 {
            return (self.digits > 0).then_some(self.length);
        }
        // Without a length a request has no body; a response runs to the close.
        (self.flags & RESPONSE == 0).then_some(0)
    }
}

/// bpf_loop callback, byte `first + i` of the copy: a head's start line, then at each
/// line's start the header name; at the blank line, on to the next message when it
/// starts in the copy. Stops at the copy's end, or at a byte that shows the head
/// cannot be followed.
extern "C" fn scan_byte(i: u32, _ctx: *mut core::ffi::c_void) -> i64 {
    let (Some(buf), Some(s)) = (SCRATCH.get_ptr(0), HTTP_SCAN.get_ptr_mut(0)) else {
        return 1;
    };
    // SAFETY: this CPU's scratch value, read only here, and its scan state.
    let (p, s) = unsafe { (&(*buf).payload, &mut *s) };
    let at = s.first.wrapping_add(i);
    if at >= s.end {
        return 1;
    }
    if at < s.head {
        // A body the copy holds.
        return 0;
    }
    let at = at as usize;
    let b = p[masked::<MAX_PAYLOAD>(at)];
    if at == s.head as usize {
        if name_at(p, at, b"http/1.") != 0 {
            s.flags |= RESPONSE;
            let code = [
                p[masked::<MAX_PAYLOAD>(at + 9)],
                p[masked::<MAX_PAYLOAD>(at + 10)],
                p[masked::<MAX_PAYLOAD>(at + 11)],
            ];
            if code[0] == b'1' || matches!(code, [b'2', b'0', b'4'] | [b'3', b'0', b'4']) {
                s.flags |= NO_BODY;
            }
        } else if !b.is_ascii_uppercase() {
            // Neither a status line nor a request line (a method is upper case).
            return 1;
        }
    }
    if s.length_from != 0 && at as u32 >= s.length_from && s.flags & LENGTH_DONE == 0 {
        if b.is_ascii_digit() {
            s.length = s.length * 10 + (b - b'0') as u64;
            s.digits += 1;
            if s.digits > 18 {
                return 1;
            }
        } else if !(s.digits == 0 && (b == b' ' || b == b'\t')) {
            s.flags |= LENGTH_DONE;
        }
    }
    s.window = (s.window << 8) | b as u32;
    if s.window & 0xffff != 0x0d0a {
        return 0;
    }
    if s.window == 0x0d0a_0d0a {
        let Some(body) = s.body_len() else {
            return 1;
        };
        let end = at as u64 + 1 + body;
        if end > u32::MAX as u64 {
            return 1;
        }
        s.found = end as u32;
        s.heads += 1;
        if s.heads >= MAX_HEADS || end >= s.end as u64 {
            return 1;
        }
        s.start_head(end as u32);
        return 0;
    }
    if s.lines == 0 && s.flags & RESPONSE == 0 && name_at(p, at.wrapping_sub(9), b"http/1.") == 0 {
        // A request line ends in its version.
        return 1;
    }
    s.lines += 1;
    if s.lines > MAX_LINES {
        return 1;
    }
    let next = at + 1;
    match p[masked::<MAX_PAYLOAD>(next)] | 0x20 {
        b'c' if name_at(p, next, b"content-length:") != 0 => {
            if s.length_from != 0 {
                // Two lengths: user space decides.
                return 1;
            }
            s.length_from = (next + 15) as u32;
        }
        // A chunked (or otherwise encoded) body's end is not in its head.
        b't' if name_at(p, next, b"transfer-encoding:") != 0 => return 1,
        _ => {}
    }
    0
}
