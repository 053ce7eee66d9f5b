//! Trace context: which trace a span belongs to and who its parent is (DESIGN.md,
//! "Trace context, in order of precedence").
//!
//! - [`w3c`]: the `traceparent` a request or message carries, which wins (rule 1);
//! - [`http`]: the two ends of one HTTP exchange seen on this node, joined when their
//!   requests start: the server span is the client span's child (rule 2);
//! - [`amqp`]: each RabbitMQ delivery (and the broker's route span) made the child of
//!   the publish that carried the same message (rule 2);
//! - [`injected`]: the ids the kernel wrote into a request (`--inject-traceparent`),
//!   which its client span takes, so that the receiving agent's rule 1 continues it;
//! - [`inproc`]: the request or delivery a service was handling when it made a call or
//!   started a program (rule 3);
//! - [`trace`]: the graph those decisions make, which gives every span its trace once
//!   its parent's is known, and shows exchanges that hang while they hang;
//! - [`order`]: the order id of a trace, set on every span of it.

pub mod amqp;
pub mod http;
pub mod injected;
pub mod inproc;
pub mod order;
pub mod trace;
pub mod w3c;

pub use amqp::{MessageKey, MessageLinker};
pub use http::{ConnKey, Linker};
