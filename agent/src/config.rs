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
        Ok(Output { destination, queue })
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
}

/// Largest ring buffer: the kernel sizes it in a u32 of bytes and limits one ring to
/// a quarter of that.
pub const MAX_RING_BUFFER_MB: u32 = 1024;

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
            Command::Replay(_) => unreachable!("parsed `run`"),
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
