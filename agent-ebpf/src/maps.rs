//! Every map the programs use. Names are shared with user space through
//! `agent_common::maps`.

use agent_common::{DataEvent, MAX_PAYLOAD, NextMessage, SockInfo, counter, lost};
use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
};

/// Events to user space. User space may resize it at load time.
#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(8 * 1024 * 1024, 0);

/// Events the programs had to drop, by cause (`agent_common::lost`).
#[map(name = "LOST")]
pub static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(lost::COUNT, 0);

/// Things the programs did that are not losses, by kind (`agent_common::counter`).
#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::COUNT, 0);

/// (tgid << 32 | fd) -> where the next message starts in each of its streams, written
/// by user space (and, for AMQP framing, moved on by the programs). Entries go with
/// the descriptor's `SOCKETS` entry and by LRU eviction.
#[map(name = "NEXT_MESSAGE")]
pub static NEXT_MESSAGE: LruHashMap<u64, NextMessage> = LruHashMap::with_max_entries(65536, 0);

/// (tgid << 32 | fd) -> what the descriptor is. A negative entry (is_tcp = 0) spares a
/// walk of the kernel's structures on every read of a file or pipe. Entries go on
/// close, dup2/dup3 over the descriptor, and by LRU eviction.
#[map(name = "SOCKETS")]
pub static SOCKETS: LruHashMap<u64, SockInfo> = LruHashMap::with_max_entries(65536, 0);

/// Where a new `SOCKETS` entry is put together before it is inserted: off the stack,
/// which kernels before 6.13 share between a program and the functions it calls.
#[map(name = "SOCK_SCRATCH")]
pub static SOCK_SCRATCH: PerCpuArray<SockInfo> = PerCpuArray::with_max_entries(1, 0);

/// Arguments of a syscall in flight, by thread (pid_tgid), from enter to exit.
#[map(name = "PENDING")]
pub static PENDING: HashMap<u64, PendingCall> = HashMap::with_max_entries(16384, 0);

/// Scratch space for one data event: too big for the 512-byte BPF stack.
#[map(name = "SCRATCH")]
pub static SCRATCH: PerCpuArray<DataBuf> = PerCpuArray::with_max_entries(1, 0);

#[repr(C)]
pub struct DataBuf {
    pub event: DataEvent,
    pub payload: [u8; MAX_PAYLOAD],
}

/// What a syscall's enter hook leaves for its exit hook.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PendingCall {
    /// A `Call` value.
    pub call: u32,
    pub fd: u32,
    /// Buffer, iovec array or msghdr pointer (user space), depending on `call`.
    pub ptr: u64,
    /// Buffer length or iovec count.
    pub count: u64,
    /// For a call that sends, when it was made (the bytes leave for the peer from then
    /// on, so a reply or a delivery on another CPU may be read before the call
    /// returns); 0 for the rest, whose bytes are there when the call returns.
    pub ts_ns: u64,
}

pub fn count_lost(cause: u32) {
    bump(&LOST, cause);
}

pub fn count(what: u32) {
    bump(&COUNTERS, what);
}

#[inline(always)]
fn bump(array: &PerCpuArray<u64>, index: u32) {
    if let Some(p) = array.get_ptr_mut(index) {
        // SAFETY: the pointer is to this CPU's slot of a per-CPU array, which nothing
        // else writes while this program runs (programs do not migrate mid-run).
        unsafe { *p += 1 };
    }
}

/// tgid -> 1: processes not traced (by command name, or by a config file rule that user
/// space decided). Children inherit the entry when they fork; exec clears it (the new
/// program is looked at again). Used when `select::EXCLUDED` is on.
#[map(name = "EXCLUDED_TGIDS")]
pub static EXCLUDED_TGIDS: LruHashMap<u32, u8> = LruHashMap::with_max_entries(65536, 0);

/// Command names (comm, NUL-padded) whose programs go into `EXCLUDED_TGIDS` when they
/// start (`--exclude-comm`).
#[map(name = "EXCLUDED_COMMS")]
pub static EXCLUDED_COMMS: HashMap<[u8; 16], u8> = HashMap::with_max_entries(256, 0);

/// cgroup v2 ids (the directory's inode) whose processes, and those of cgroups below,
/// are traced (`--cgroup`). Used when `select::CGROUPS` is on.
#[map(name = "CGROUPS")]
pub static CGROUPS: HashMap<u64, u8> = HashMap::with_max_entries(256, 0);

/// cgroup id -> 1 traced, 0 not: the answer for a cgroup once its ancestors were looked
/// up in `CGROUPS`, so that a process costs one lookup.
#[map]
pub static CGROUP_VERDICT: LruHashMap<u64, u8> = LruHashMap::with_max_entries(16384, 0);
