//! The hooks, one file per family. `sys_*` hooks capture socket I/O; `sched_*` hooks
//! follow processes; `select_*` hooks and [`select::traced`] decide which processes are
//! traced.

mod sched;
pub mod select;
mod sys;
pub mod tls;
