//! The hooks, one file per family. `sys_*` hooks capture socket I/O; `sched_*` hooks
//! follow processes; `select_*` hooks and [`select::traced`] decide which processes are
//! traced; `go_*` uprobes tell which goroutine a Go program's I/O is for.

pub mod goroutines;
mod sched;
pub mod select;
mod sys;
pub mod tls;
