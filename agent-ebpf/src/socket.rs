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
    maps::{NEXT_MESSAGE, SOCKETS, count_lost},
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

/// Local and remote addresses of a TCP `struct sock`.
#[inline(always)]
fn tuple_of(sk: u64) -> Result<SockTuple, ()> {
    let mut t = SockTuple {
        family: read(sk, setting!(offsets.sk_family))?,
        ..SockTuple::default()
    };
    t.sport = read(sk, setting!(offsets.sk_num))?;
    let dport: u16 = read(sk, setting!(offsets.sk_dport))?;
    t.dport = u16::from_be(dport);
    if t.family == AF_INET {
        let s: [u8; 4] = read(sk, setting!(offsets.sk_rcv_saddr))?;
        let d: [u8; 4] = read(sk, setting!(offsets.sk_daddr))?;
        t.saddr[..4].copy_from_slice(&s);
        t.daddr[..4].copy_from_slice(&d);
    } else {
        t.saddr = read(sk, setting!(offsets.sk_v6_rcv_saddr))?;
        t.daddr = read(sk, setting!(offsets.sk_v6_daddr))?;
    }
    Ok(t)
}

/// Looks at descriptor `fd` of the current task afresh and records the answer (socket
/// or not) in `SOCKETS`. Returns the new entry, or None when the kernel reads failed.
#[inline(always)]
pub fn classify(tgid: u32, fd: u32, conn_role: u32) -> Option<SockInfo> {
    let mut info = SockInfo {
        role: conn_role,
        ..SockInfo::default()
    };
    match tcp_sock_of_fd(fd) {
        Ok(0) => {}
        Ok(sk) => match tuple_of(sk) {
            Ok(t) => {
                info.tuple = t;
                info.is_tcp = 1;
            }
            Err(()) => {
                count_lost(lost::KERNEL_READ);
                return None;
            }
        },
        Err(()) => {
            count_lost(lost::KERNEL_READ);
            return None;
        }
    }
    let _ = SOCKETS.insert(key(tgid, fd), info, 0);
    Some(info)
}

/// The cached entry for (tgid, fd), looking the descriptor up on a miss.
#[inline(always)]
pub fn lookup(tgid: u32, fd: u32) -> Option<*mut SockInfo> {
    let k = key(tgid, fd);
    if let Some(p) = SOCKETS.get_ptr_mut(k) {
        return Some(p);
    }
    classify(tgid, fd, role::UNKNOWN)?;
    SOCKETS.get_ptr_mut(k)
}

/// Forgets (tgid, fd): it was closed or replaced.
#[inline(always)]
pub fn forget(tgid: u32, fd: u32) {
    let _ = SOCKETS.remove(key(tgid, fd));
    let _ = NEXT_MESSAGE.remove(key(tgid, fd));
}
