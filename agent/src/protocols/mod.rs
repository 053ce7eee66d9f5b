//! Protocol parsers: one module per protocol, each incremental (it answers "need more
//! bytes" rather than guessing) and tolerant of gaps in the captured stream.

pub mod amqp;
pub mod detect;
pub mod http;
