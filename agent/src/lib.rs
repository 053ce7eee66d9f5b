//! sonde: a zero-code distributed tracing agent.
//!
//! The modules follow the pipeline in DESIGN.md, one stage each: probes (load and
//! attach the eBPF programs) -> events (decode the ring buffer) -> process (who is
//! this pid) -> conn (which connection) -> reassembly (byte streams with gaps) ->
//! protocols (HTTP/1.x, AMQP 0-9-1) -> spans (semantic-convention spans) -> context
//! (parents and traces) -> export. Beside the pipeline: discovery (naming processes
//! from /proc and finding TLS code, on a thread of its own), agent (`sonde run`),
//! replay (`sonde replay`), admin and telemetry (/metrics). The config file
//! (settings) holds the business rules (business: order.id and other attributes
//! picked from payloads) and the selection and identity of processes (selection);
//! kubernetes names the pod, container and workload of processes in pods.

/// Hash maps on the per-event path: foldhash (a fast, per-process seeded hash) rather
/// than SipHash, which showed as 7% of the pipeline's instructions.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
/// As [`FastMap`], for sets.
pub type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

pub mod admin;
pub mod agent;
pub mod business;
pub mod business_metrics;
pub mod config;
pub mod conn;
pub mod context;
pub mod discovery;
pub mod events;
pub mod export;
pub mod kubernetes;
pub mod orders;
pub mod pipeline;
pub mod privileges;
pub mod probes;
pub mod process;
pub mod protocols;
pub mod reassembly;
pub mod replay;
pub mod sampling;
pub mod selection;
pub mod settings;
pub mod spans;
pub mod telemetry;
