//! From (current task, fd) to the socket behind it, by reading kernel structures at
//! offsets user space took from the running kernel's BTF (no CO-RE in Rust eBPF):
//! task_struct->files->fdt->fd[fd] (struct file) -> f_inode->i_mode says whether it is
//! a socket; file->private_data (struct socket)->sk (struct sock) has the addresses.

use agent_common::{
    AF_INET, AF_INET6, IPPROTO_TCP, S_IFMT, S_IFSOCK, SOCK_STREAM, SockInfo, SockTuple, lost, role,
};
use aya_ebpf::helpers::{bpf_get_current_task, bpf_probe_read_kernel};

use crate::{
    config::setting,
    maps::{NEXT_MESSAGE, SOCK_SCRATCH, SOCKETS, count_lost},
};

#[inline(always)]
fn read<T>(base: u64, offset: u32) -> Result<T, ()> {
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T) }.map_err(|_| ())
}

#[inline(always)]
pub fn key(tgid: u32, fd: u32) -> u64 {
    ((tgid as u64) << 32) | fd as u64
}

/// The `struct sock` pointer of the current task's descriptor `fd`, or `Ok(0)` when the
/// descriptor is not an IPv4/IPv6 TCP socket.
#[inline(always)]
fn tcp_sock_of_fd(fd: u32) -> Result<u64, ()> {
    let task = unsafe { bpf_get_current_task() };
    let files: u64 = read(task, setting!(offsets.task_files))?;
    let fdt: u64 = read(files, setting!(offsets.files_fdt))?;
    let max_fds: u32 = read(fdt, setting!(offsets.fdtable_max_fds))?;
    if fd >= max_fds {
        return Ok(0);
    }
    let fd_array: u64 = read(fdt, setting!(offsets.fdtable_fd))?;
    let file: u64 = read(fd_array, fd * 8)?;
    if file == 0 {
        return Ok(0);
    }
    let inode: u64 = read(file, setting!(offsets.file_f_inode))?;
    let mode: u16 = read(inode, setting!(offsets.inode_i_mode))?;
    if mode & S_IFMT != S_IFSOCK {
        return Ok(0);
    }
    let socket: u64 = read(file, setting!(offsets.file_private_data))?;
    // A socket's file points back at it; anything else means the offsets are wrong.
    let back: u64 = read(socket, setting!(offsets.socket_file))?;
    if back != file {
        return Err(());
    }
    let sock_type: u16 = read(socket, setting!(offsets.socket_type))?;
    if sock_type != SOCK_STREAM {
        return Ok(0);
    }
    let sk: u64 = read(socket, setting!(offsets.socket_sk))?;
    if sk == 0 {
        return Ok(0);
    }
    let family: u16 = read(sk, setting!(offsets.sk_family))?;
    if family != AF_INET && family != AF_INET6 {
        return Ok(0);
    }
    let protocol: u16 = read(sk, setting!(offsets.sk_protocol))?;
    if protocol != IPPROTO_TCP {
        return Ok(0);
    }
    Ok(sk)
}

/// Writes the local and remote addresses of a TCP `struct sock` into `t`, field by
/// field: `t` is map memory, so no copy of the tuple goes through the stack.
///
/// # Safety
/// `t` must point to a `SockTuple` in map memory, valid for the program run.
#[inline(always)]
unsafe fn write_tuple(sk: u64, t: *mut SockTuple) -> Result<(), ()> {
    let family: u16 = read(sk, setting!(offsets.sk_family))?;
    let sport: u16 = read(sk, setting!(offsets.sk_num))?;
    let dport: u16 = read(sk, setting!(offsets.sk_dport))?;
    let (saddr, daddr) = if family == AF_INET {
        let s: [u8; 4] = read(sk, setting!(offsets.sk_rcv_saddr))?;
        let d: [u8; 4] = read(sk, setting!(offsets.sk_daddr))?;
        let (mut saddr, mut daddr) = ([0u8; 16], [0u8; 16]);
        saddr[..4].copy_from_slice(&s);
        daddr[..4].copy_from_slice(&d);
        (saddr, daddr)
    } else {
        (
            read(sk, setting!(offsets.sk_v6_rcv_saddr))?,
            read(sk, setting!(offsets.sk_v6_daddr))?,
        )
    };
    // SAFETY: the caller's pointer; every field is written whole.
    unsafe {
        (*t).family = family;
        (*t).sport = sport;
        (*t).dport = u16::from_be(dport);
        (*t)._pad = 0;
        (*t).saddr = saddr;
        (*t).daddr = daddr;
    }
    Ok(())
}

/// Looks at descriptor `fd` of the current task afresh and records the answer (socket
/// or not) in `SOCKETS`. Returns the new entry, or None when the kernel reads failed.
///
/// The entry is built in this CPU's `SOCK_SCRATCH` slot rather than on the stack.
/// Kernels before 6.13 (no private BPF stacks) allow a program and the functions it
/// calls 512 bytes of stack together, and the TLS return probe reaches this through a
/// function call: with the entry and its copies on the stack, 6.1 and 6.12 refused it
/// ("combined stack size of 2 calls is 640").
#[inline(always)]
pub fn classify(tgid: u32, fd: u32, conn_role: u32) -> Option<*mut SockInfo> {
    let Some(info) = SOCK_SCRATCH.get_ptr_mut(0) else {
        count_lost(lost::NO_SCRATCH);
        return None;
    };
    // SAFETY: this CPU's scratch slot, valid for the run; every field is set before
    // the entry is inserted.
    unsafe {
        (*info).is_tcp = 0;
        (*info).role = conn_role;
        (*info).ingress_bytes = 0;
        (*info).egress_bytes = 0;
        (*info).is_tls = 0;
        (*info)._pad = 0;
        (*info).tls_ingress_bytes = 0;
        (*info).tls_egress_bytes = 0;
        (*info).tuple = SockTuple::default();
        let tcp = match tcp_sock_of_fd(fd) {
            Ok(0) => Ok(false),
            Ok(sk) => write_tuple(sk, &raw mut (*info).tuple).map(|()| true),
            Err(()) => Err(()),
        };
        match tcp {
            Ok(true) => (*info).is_tcp = 1,
            Ok(false) => {}
            Err(()) => {
                count_lost(lost::KERNEL_READ);
                return None;
            }
        }
        let k = key(tgid, fd);
        // By reference: the helper reads the entry from map memory. Passed by value,
        // it would be copied onto the stack first.
        let entry: &SockInfo = &*info;
        let _ = SOCKETS.insert(k, entry, 0);
        SOCKETS.get_ptr_mut(k)
    }
}

/// The cached entry for (tgid, fd), looking the descriptor up on a miss.
#[inline(always)]
pub fn lookup(tgid: u32, fd: u32) -> Option<*mut SockInfo> {
    if let Some(p) = SOCKETS.get_ptr_mut(key(tgid, fd)) {
        return Some(p);
    }
    classify(tgid, fd, role::UNKNOWN)
}

/// Forgets (tgid, fd): it was closed or replaced.
#[inline(always)]
pub fn forget(tgid: u32, fd: u32) {
    let _ = SOCKETS.remove(key(tgid, fd));
    let _ = NEXT_MESSAGE.remove(key(tgid, fd));
}
