//! Process lifecycle: exec (a process may now be another program) and exit (forget it).

use agent_common::EventKind;
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_task, bpf_probe_read_kernel},
    macros::tracepoint,
    programs::TracePointContext,
};

use crate::{config::setting, emit::proc_event};

/// sched/sched_process_exec: fires in the new program's context.
#[tracepoint]
pub fn sched_exec(_ctx: TracePointContext) -> u32 {
    // task_struct->mm->{arg,env}_{start,end}: the new program's command line and
    // environment, in its own memory.
    let task = unsafe { bpf_get_current_task() };
    let mm: u64 = read(task, setting!(offsets.task_mm));
    let range = |start: u32, end: u32| (mm != 0).then(|| (read(mm, start), read(mm, end)));
    let args = range(setting!(offsets.mm_arg_start), setting!(offsets.mm_arg_end));
    let env = range(setting!(offsets.mm_env_start), setting!(offsets.mm_env_end));
    // task_struct->real_parent: the thread that forked this process (while it lives).
    let parent = read(task, setting!(offsets.task_real_parent));
    let id = |off: u32| {
        if parent == 0 {
            return 0;
        }
        // SAFETY: a probe read of a kernel address; a bad address only fails the read.
        unsafe { bpf_probe_read_kernel((parent + off as u64) as *const u32) }.unwrap_or(0)
    };
    let forker = (
        id(setting!(offsets.task_tgid)),
        id(setting!(offsets.task_pid)),
    );
    proc_event(
        EventKind::Exec,
        bpf_get_current_pid_tgid(),
        0,
        forker,
        args,
        env,
    );
    0
}

#[inline(always)]
fn read(base: u64, offset: u32) -> u64 {
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const u64) }.unwrap_or(0)
}

/// sched/sched_process_exit: fires per thread; only the group leader's exit ends the
/// process. task_struct->exit_code holds the wait status.
#[tracepoint]
pub fn sched_exit(_ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid >> 32) as u32 != pid_tgid as u32 {
        return 0;
    }
    let task = unsafe { bpf_get_current_task() };
    let off = setting!(offsets.task_exit_code) as u64;
    let code: i32 = unsafe { bpf_probe_read_kernel((task + off) as *const i32) }.unwrap_or(0);
    proc_event(EventKind::Exit, pid_tgid, code, (0, 0), None, None);
    0
}
