//! Programs a traced service runs (a slicer turning a 3D model into printer code, a
//! converter): the exec and the exit of a child process become an INTERNAL span under
//! the request or delivery the thread that forked it was handling, named after the
//! executable, with its arguments (bounded), exit code and duration. A non-zero exit
//! or a signal is an error. A program started while nothing was being handled is no
//! span: it is not part of any request (a cron job, a shell).
//!
//! The program's own span is in flight for everything it does in turn: a program it
//! runs (`sh -c` running the slicer) and the calls it makes are its children.

use crate::FastMap;
use std::sync::Arc;

use opentelemetry_semantic_conventions::attribute as semconv;

use super::{Pipeline, Then};
use crate::{
    context::{inproc::Found, trace::Parent},
    spans::{KeyValue, Resource, Span, SpanId, SpanKind, Status, new_span_id, new_trace_id},
    telemetry::Metrics,
};

/// Arguments kept per program, and bytes per argument.
const MAX_ARGS: usize = 32;
const MAX_ARG_LEN: usize = 256;
/// Programs followed at once.
const MAX_PROGRAMS: usize = 4096;

/// A program running under a request.
struct Program {
    id: SpanId,
    start_ns: u64,
    name: String,
    args: Vec<String>,
    /// The service that ran it.
    resource: Arc<Resource>,
}

/// Programs running under a request, by process id.
#[derive(Default)]
pub(super) struct Programs {
    running: FastMap<u32, Program>,
}

impl Pipeline {
    /// Process `pid` started a program at `ts_ns`; `forker` is the (process, thread)
    /// that forked it.
    pub(super) fn program_started(
        &mut self,
        pid: u32,
        ts_ns: u64,
        comm: &str,
        args: &[String],
        forker: (u32, u32),
    ) {
        let name = program_name(comm, args);
        let args: Vec<String> = args
            .iter()
            .take(MAX_ARGS)
            .map(|a| a.chars().take(MAX_ARG_LEN).collect())
            .collect();
        if let Some(p) = self.programs.running.get_mut(&pid) {
            // It ran another program in its place (a shell's exec): same span, new name.
            p.name = name;
            p.args = args;
            return;
        }
        let (ppid, ptid) = forker;
        if ppid == 0 || self.programs.running.len() >= MAX_PROGRAMS {
            return;
        }
        let parent = match self.in_process_parent(ppid, ptid, ts_ns, None) {
            // A program is started by the thread that forks it, for what that thread
            // is doing then.
            Found::Parent(p) | Found::ByThread(p) => p,
            Found::Nothing => return,
            Found::Ambiguous => {
                Metrics::inc(&self.metrics.parent_ambiguous);
                return;
            }
        };
        let id = new_span_id();
        let program = Program {
            id,
            start_ns: ts_ns,
            name,
            args,
            resource: self.registry.resource(ppid),
        };
        let template = self.opts.stall_timeout.map(|_| {
            let span = self.program_span(pid, &program, None, ts_ns);
            Box::new(move || span) as crate::context::trace::StallTemplate
        });
        self.graph.open(id, ts_ns, ts_ns, template);
        self.graph.decide(id, Parent::Node(parent));
        self.inproc.begin(pid, 0, id, ts_ns, None);
        self.programs.running.insert(pid, program);
    }

    /// Process `pid` exited at `ts_ns` with wait status `status`.
    pub(super) fn program_ended(&mut self, pid: u32, ts_ns: u64, status: i32) {
        let Some(program) = self.programs.running.remove(&pid) else {
            return;
        };
        let span = self.program_span(pid, &program, Some(status), ts_ns);
        Metrics::inc(&self.metrics.process_spans);
        self.graph.finish(span, Then::Out, ts_ns);
        self.pump(ts_ns);
    }

    /// Programs still running at shutdown: their spans, ending now, without an exit code.
    pub(super) fn programs_end_all(&mut self, now_ns: u64) {
        let pids: Vec<u32> = self.programs.running.keys().copied().collect();
        for pid in pids {
            if let Some(program) = self.programs.running.remove(&pid) {
                let mut span = self.program_span(pid, &program, None, now_ns);
                span.attributes
                    .push(KeyValue::new(crate::spans::INCOMPLETE, true));
                span.attributes
                    .push(KeyValue::new(crate::spans::INCOMPLETE_REASON, "agent_stop"));
                self.graph.finish(span, Then::Out, now_ns);
            }
        }
        self.pump(now_ns);
    }

    fn program_span(&self, pid: u32, p: &Program, status: Option<i32>, end_ns: u64) -> Span {
        let mut attributes = vec![
            KeyValue::new(semconv::PROCESS_PID, pid),
            KeyValue::new(semconv::PROCESS_EXECUTABLE_NAME, p.name.clone()),
            KeyValue::new(semconv::PROCESS_COMMAND_ARGS, p.args.clone()),
        ];
        let mut outcome = Status::Unset;
        if let Some(status) = status {
            // A wait status: the low 7 bits are a signal, else the exit code is above.
            let signal = status & 0x7f;
            if signal != 0 {
                attributes.push(KeyValue::new(SIGNAL, i64::from(signal)));
                attributes.push(KeyValue::new(
                    semconv::ERROR_TYPE,
                    format!("signal {signal}"),
                ));
                outcome = Status::Error(format!("killed by signal {signal}"));
            } else {
                let code = (status >> 8) & 0xff;
                attributes.push(KeyValue::new(semconv::PROCESS_EXIT_CODE, i64::from(code)));
                if code != 0 {
                    attributes.push(KeyValue::new(semconv::ERROR_TYPE, code.to_string()));
                    outcome = Status::Error(format!("exit code {code}"));
                }
            }
        }
        let unix =
            |ns: u64| (i128::from(ns) + self.mono_to_unix_ns).clamp(0, i128::from(u64::MAX)) as u64;
        Span {
            trace_id: new_trace_id(),
            span_id: p.id,
            parent_span_id: None,
            name: p.name.clone(),
            kind: SpanKind::Internal,
            start_unix_nanos: unix(p.start_ns),
            end_unix_nanos: unix(end_ns.max(p.start_ns)),
            attributes,
            status: outcome,
            resource: p.resource.clone(),
        }
    }
}

/// sonde's attribute: the signal that ended a program.
pub const SIGNAL: &str = "sonde.process.signal";

/// A program's name: its executable's file name from the command line, else its comm.
fn program_name(comm: &str, args: &[String]) -> String {
    args.first()
        .and_then(|a| a.rsplit('/').next())
        .filter(|n| !n.is_empty())
        .unwrap_or(comm)
        .to_owned()
}
