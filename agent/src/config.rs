//! Command line. Every runtime knob is a flag with a `SONDE_*` environment equivalent;
//! the standard OTEL_EXPORTER_OTLP_* variables configure OTLP export.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};

use crate::{
    export::{self, Destination, OtlpConfig, OtlpOptions, Output, QueueConfig},
    probes::Backend,
};

#[derive(Debug, Parser)]
#[command(
    name = "sonde",
    version,
    about = "Zero-code distributed tracing agent (eBPF -> OpenTelemetry)"
)]
pub struct Cli {
    /// Log filter, as RUST_LOG: error, warn, info, debug, trace, or per module.
    #[arg(long, env = "SONDE_LOG", default_value = "info", global = true)]
    pub log: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Trace every process on this node (needs root) and export spans.
    Run(RunArgs),
    /// Turn a pcap or pcapng capture (tcpdump -w) into spans with the same pipeline.
    Replay(ReplayArgs),
    /// Each order's journey, read back from Jaeger: `sonde orders ID...`, a summary
    /// across orders (no id, `--since 1h`), or `--json`.
    Orders(crate::orders::OrdersArgs),
}

/// Where spans go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputKind {
    /// One readable line per span on standard output.
    Stdout,
    /// OTLP JSON lines (the OpenTelemetry file exporter format) into --output-file.
    OtlpJson,
    /// OTLP over gRPC or HTTP/protobuf to --otlp-endpoint / OTEL_EXPORTER_OTLP_ENDPOINT.
    Otlp,
}

/// Where spans go: the same flags for `run` and `replay`.
#[derive(Debug, clap::Args)]
pub struct OutputArgs {
    /// Span output. Default: otlp when an OTLP endpoint is set (flag or
    /// OTEL_EXPORTER_OTLP_ENDPOINT), stdout otherwise.
    #[arg(long, env = "SONDE_OUTPUT", value_enum)]
    pub output: Option<OutputKind>,

    /// File for --output otlp-json (appended to).
    #[arg(long, env = "SONDE_OUTPUT_FILE")]
    pub output_file: Option<PathBuf>,

    /// OTLP endpoint, e.g. http://jaeger:4317 (gRPC) or http://jaeger:4318 (HTTP).
    /// Overrides OTEL_EXPORTER_OTLP_ENDPOINT.
    #[arg(long, env = "SONDE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// grpc or http/protobuf. Overrides OTEL_EXPORTER_OTLP_PROTOCOL (default
    /// http/protobuf, or grpc for an endpoint on port 4317).
    #[arg(long, env = "SONDE_OTLP_PROTOCOL")]
    pub otlp_protocol: Option<String>,

    /// Extra OTLP headers, k=v,k2=v2 (merged over OTEL_EXPORTER_OTLP_HEADERS).
    #[arg(long, env = "SONDE_OTLP_HEADERS")]
    pub otlp_headers: Option<String>,

    /// PEM file of CA certificates to trust for an https OTLP endpoint.
    #[arg(long, env = "SONDE_OTLP_CA_FILE")]
    pub otlp_ca_file: Option<PathBuf>,

    /// Also write every exported span to this file as OTLP JSON lines (the format of
    /// --output otlp-json, appended to), whatever --output is: a copy of what went to
    /// the collector. It has its own queue, bounded like the main one; its counters are
    /// sonde_tee_spans_written_total and sonde_tee_spans_dropped_total.
    #[arg(long, env = "SONDE_TEE_FILE")]
    pub tee_file: Option<PathBuf>,

    /// PEM client certificate (chain) for mutual TLS with the OTLP receiver; needs
    /// --otlp-client-key. Overrides OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE.
    #[arg(long, env = "SONDE_OTLP_CLIENT_CERT")]
    pub otlp_client_cert: Option<PathBuf>,

    /// PEM private key of --otlp-client-cert (PKCS#8, PKCS#1 or SEC1). Overrides
    /// OTEL_EXPORTER_OTLP_CLIENT_KEY.
    #[arg(long, env = "SONDE_OTLP_CLIENT_KEY")]
    pub otlp_client_key: Option<PathBuf>,

    /// Name the receiver's certificate must be valid for, instead of the endpoint's
    /// host (e.g. when the endpoint is an IP address).
    #[arg(long, env = "SONDE_OTLP_SERVER_NAME")]
    pub otlp_server_name: Option<String>,

    /// Most MiB of spans (protobuf-encoded) waiting for export, retries included;
    /// spans beyond it are dropped and counted (reason queue_full).
    #[arg(long, env = "SONDE_EXPORT_QUEUE_MB", default_value_t = export::config::DEFAULT_QUEUE_MB)]
    pub export_queue_mb: usize,

    /// Longest a span waits for export while the receiver is down (e.g. 90s, 5m, 1h);
    /// older spans are dropped and counted (reason expired).
    #[arg(long, env = "SONDE_EXPORT_MAX_AGE", default_value = "5m", value_parser = humantime::parse_duration)]
    pub export_max_age: Duration,
}

impl OutputArgs {
    /// The output these flags ask for: `--output` if given, else OTLP when an endpoint
    /// is set (flag or OTEL_EXPORTER_OTLP_ENDPOINT) and stdout otherwise.
    pub fn resolve(&self) -> anyhow::Result<Output> {
        let otlp = OtlpOptions {
            endpoint: self.otlp_endpoint.clone(),
            protocol: self.otlp_protocol.clone(),
            headers: self.otlp_headers.clone(),
            timeout: None,
            ca_file: self.otlp_ca_file.clone(),
            client_cert: self.otlp_client_cert.clone(),
            client_key: self.otlp_client_key.clone(),
            server_name: self.otlp_server_name.clone(),
        };
        let env: HashMap<String, String> = std::env::vars().collect();
        let configured = export::endpoint_configured(&env, &otlp);
        let kind = self.output.unwrap_or(if configured {
            OutputKind::Otlp
        } else {
            OutputKind::Stdout
        });
        let destination = match kind {
            OutputKind::Stdout => Destination::Stdout,
            OutputKind::OtlpJson => {
                let Some(path) = self.output_file.clone() else {
                    anyhow::bail!(
                        "--output otlp-json needs --output-file PATH (or SONDE_OUTPUT_FILE)"
                    );
                };
                Destination::OtlpJson { path }
            }
            OutputKind::Otlp => Destination::Otlp(OtlpConfig::resolve(&env, &otlp)?),
        };
        let queue = QueueConfig::resolve(&env, self.export_queue_mb, self.export_max_age)?;
        Ok(Output {
            destination,
            queue,
            tee: self.tee_file.clone(),
        })
    }
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// How socket syscalls are hooked: kprobes where the kernel has them, else syscall
    /// tracepoints (auto), or one forced.
    #[arg(long, env = "SONDE_PROBE_BACKEND", value_enum, default_value_t = Backend::Auto)]
    pub probe_backend: Backend,

    #[command(flatten)]
    pub out: OutputArgs,

    /// Serve /healthz, /readyz and /metrics (Prometheus) on this address.
    #[arg(long, env = "SONDE_ADMIN_ADDR")]
    pub admin_addr: Option<SocketAddr>,

    /// Payload bytes copied per socket read or write (at most 16384). Bodies beyond it
    /// are counted, not captured.
    #[arg(long, env = "SONDE_PAYLOAD_CAP", default_value_t = agent_common::DEFAULT_PAYLOAD_CAP)]
    pub payload_cap: u32,

    /// Size of the kernel-to-agent ring buffer in MiB (a power of two, 1 to 1024).
    #[arg(long, env = "SONDE_RING_BUFFER_MB", default_value_t = 8, value_parser = parse_ring_buffer_mb)]
    pub ring_buffer_mb: u32,

    /// Most connections tracked at once.
    #[arg(long, env = "SONDE_MAX_CONNECTIONS", default_value_t = 65536)]
    pub max_connections: usize,

    /// A request still unanswered, a delivery still unacknowledged or a program still
    /// running after this long is exported while it hangs, as a span marked
    /// sonde.stalled=true in its trace (0s: never).
    #[arg(long, env = "SONDE_STALL_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub stall_timeout: std::time::Duration,

    /// Keep this share of orders (0 to 1), decided by a hash of the order id (of the
    /// trace id without one), the same in every agent; orders with an error, a stall or
    /// (with `sampling.slow` in the config file) slowness are kept whatever the ratio.
    /// Overrides the config file's `sampling.ratio`.
    #[arg(long, env = "SONDE_SAMPLE_RATIO", value_parser = parse_ratio)]
    pub sample_ratio: Option<f64>,
    /// The config file (YAML): business rules, process selection and identity. Read and
    /// checked before anything is loaded into the kernel.
    #[arg(long, env = "SONDE_CONFIG")]
    pub config: Option<PathBuf>,

    /// Never trace processes with this command name (as `ps -o comm` shows it; the
    /// kernel keeps 15 bytes). Repeatable; decided in the kernel.
    #[arg(
        long = "exclude-comm",
        env = "SONDE_EXCLUDE_COMM",
        value_delimiter = ','
    )]
    pub exclude_comm: Vec<String>,

    /// Trace only processes in this cgroup v2 directory or below it (e.g.
    /// /sys/fs/cgroup/unified/shop.slice). Repeatable; decided in the kernel.
    #[arg(long = "cgroup", env = "SONDE_CGROUP", value_delimiter = ',')]
    pub cgroups: Vec<PathBuf>,

    /// Write a W3C traceparent into the plaintext HTTP/1.x requests traced processes
    /// send (cgroup sock_ops + sk_msg; needs CAP_NET_ADMIN), so that the agent on the
    /// receiving node continues the trace. Without the capability, tracing goes on
    /// without it.
    #[arg(long, env = "SONDE_INJECT_TRACEPARENT")]
    pub inject_traceparent: bool,

    /// In Go net/http programs, follow goroutines with uprobes (on every socket read
    /// and write, the handler, the client's request writer and goroutine creation), so
    /// that a call is the child of the request its goroutine serves. Off by default:
    /// each probe is a trap into the kernel in every process that runs such an
    /// executable, traced or not (README, "Whole traces").
    #[arg(long, env = "SONDE_FOLLOW_GOROUTINES")]
    pub follow_goroutines: bool,
}

/// Largest ring buffer: the kernel sizes it in a u32 of bytes and limits one ring to
/// a quarter of that.
pub const MAX_RING_BUFFER_MB: u32 = 1024;

fn parse_ratio(s: &str) -> Result<f64, String> {
    let r: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number"))?;
    if (0.0..=1.0).contains(&r) {
        Ok(r)
    } else {
        Err(format!("{r} is not between 0 and 1"))
    }
}

fn parse_ring_buffer_mb(s: &str) -> Result<u32, String> {
    let mb: u32 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number of MiB"))?;
    if !mb.is_power_of_two() || mb > MAX_RING_BUFFER_MB {
        return Err(format!(
            "{mb} MiB: the ring buffer must be a power of two from 1 to {MAX_RING_BUFFER_MB} MiB"
        ));
    }
    Ok(mb)
}

impl RunArgs {
    /// The ring buffer's size in bytes (the MiB were checked when parsed).
    pub fn ring_buffer_bytes(&self) -> u32 {
        self.ring_buffer_mb * 1024 * 1024
    }
}

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The capture: pcap or pcapng (tcpdump -w, tshark -w, dumpcap), of Ethernet, Linux
    /// cooked (SLL, SLL2), loopback/null or raw IP frames.
    pub file: PathBuf,

    #[command(flatten)]
    pub out: OutputArgs,

    /// The config file (YAML): its business rules and identity rules apply to the
    /// replay too.
    #[arg(long, env = "SONDE_CONFIG")]
    pub config: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(extra: &[&str]) -> Result<RunArgs, clap::Error> {
        let argv = ["sonde", "run"].iter().chain(extra);
        match Cli::try_parse_from(argv)?.command {
            Command::Run(args) => Ok(args),
            Command::Replay(_) | Command::Orders(_) => unreachable!("parsed `run`"),
        }
    }

    #[test]
    fn ring_buffer_sizes_up_to_the_kernel_limit_are_taken_in_bytes() {
        assert_eq!(run_args(&[]).unwrap().ring_buffer_bytes(), 8 << 20);
        let big = run_args(&["--ring-buffer-mb", "1024"]).unwrap();
        assert_eq!(big.ring_buffer_bytes(), 1 << 30);
    }

    #[test]
    fn ring_buffer_sizes_that_would_overflow_or_are_not_powers_of_two_are_refused() {
        for bad in ["4096", "2048", "8192", "3", "0", "many"] {
            let err = run_args(&["--ring-buffer-mb", bad])
                .unwrap_err()
                .to_string();
            assert!(err.contains("--ring-buffer-mb"), "{bad}: {err}");
            if bad.parse::<u32>().is_ok() {
                assert!(
                    err.contains("power of two from 1 to 1024 MiB"),
                    "{bad}: {err}"
                );
            }
        }
    }
}
