//! The hooks, one file per family. `sys_*` hooks capture socket I/O; `sched_*` hooks
//! follow processes.

mod sched;
mod sys;
pub mod tls;
