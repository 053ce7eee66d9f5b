//! Which processes are traced: every hook asks [`traced`] first. With no filter on it
//! costs a read of the settings; an excluded process costs one map lookup.
//!
//! Command names are decided when a program starts (sched_process_exec, where `comm` is
//! the new program's) and inherited by forked children (sched_process_fork), so that
//! a thread that renames itself does not change what its process is.

use agent_common::select;
use aya_ebpf::{
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm,
        bpf_get_current_pid_tgid,
    },
    macros::tracepoint,
    programs::TracePointContext,
};

use crate::{
    config::setting,
    maps::{CGROUP_VERDICT, CGROUPS, EXCLUDED_COMMS, EXCLUDED_TGIDS},
};

/// Whether the calling process is traced: not the agent, not excluded, and in a
/// selected cgroup when cgroups are selected.
#[inline(always)]
pub fn traced(pid_tgid: u64) -> bool {
    let tgid = (pid_tgid >> 32) as u32;
    if tgid == setting!(agent_tgid) {
        return false;
    }
    let flags = setting!(select);
    if flags == 0 {
        return true;
    }
    if flags & select::EXCLUDED != 0 && unsafe { EXCLUDED_TGIDS.get(tgid) }.is_some() {
        return false;
    }
    flags & select::CGROUPS == 0 || in_selected_cgroup()
}

#[inline(always)]
fn in_selected_cgroup() -> bool {
    let id = unsafe { bpf_get_current_cgroup_id() };
    if let Some(verdict) = unsafe { CGROUP_VERDICT.get(id) } {
        return *verdict == 1;
    }
    let mut verdict = 0u8;
    for level in 0..select::MAX_CGROUP_DEPTH as i32 {
        let ancestor = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if ancestor == 0 {
            break;
        }
        if unsafe { CGROUPS.get(ancestor) }.is_some() {
            verdict = 1;
            break;
        }
    }
    let _ = CGROUP_VERDICT.insert(id, verdict, 0);
    verdict == 1
}

/// sched/sched_process_exec: the process is a new program; excluded again only if its
/// command name is.
#[tracepoint]
pub fn select_exec(_ctx: TracePointContext) -> u32 {
    let flags = setting!(select);
    if flags & select::EXCLUDED == 0 {
        return 0;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let excluded = flags & select::COMMS != 0
        && bpf_get_current_comm().is_ok_and(|comm| unsafe { EXCLUDED_COMMS.get(comm) }.is_some());
    if excluded {
        let _ = EXCLUDED_TGIDS.insert(tgid, 1, 0);
    } else {
        let _ = EXCLUDED_TGIDS.remove(tgid);
    }
    0
}

/// sched/sched_process_fork (parent's context): `pid_t child_pid` at the offset user
/// space read from the tracepoint's format file. A child is excluded when its parent
/// is; a stale entry of a reused pid goes.
#[tracepoint]
pub fn select_fork(ctx: TracePointContext) -> u32 {
    if setting!(select) & select::EXCLUDED == 0 {
        return 0;
    }
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    let offset = setting!(fork_child_pid_offset) as usize;
    let Ok(child) = (unsafe { ctx.read_at::<u32>(offset) }) else {
        return 0;
    };
    if unsafe { EXCLUDED_TGIDS.get(parent) }.is_some() {
        let _ = EXCLUDED_TGIDS.insert(child, 1, 0);
    } else if unsafe { EXCLUDED_TGIDS.get(child) }.is_some() {
        let _ = EXCLUDED_TGIDS.remove(child);
    }
    0
}
