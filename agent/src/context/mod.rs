//! Trace context: which trace a span belongs to and who its parent is (DESIGN.md,
//! "Trace context, in order of precedence").
//!
//! - [`w3c`]: the `traceparent` a request or message carries, which wins (rule 1);
//! - [`http`]: the two ends of one HTTP exchange seen on this node, the server span
//!   made the client span's child (rule 2);
//! - [`amqp`]: each RabbitMQ delivery (and the broker's route span) made the child of
//!   the publish that carried the same message (rule 2).

pub mod amqp;
pub mod http;
pub mod w3c;

pub use amqp::{MessageKey, MessageLinker};
pub use http::{ConnKey, Linker};
