//! `sonde orders`: each order's journey, read back from Jaeger's query API. One order
//! (`sonde orders ID`), a JSON report of several (`--json`, the report `cargo xtask
//! demo` prints), a summary across the orders of a time window (`--since 1h`), and a
//! web page with a timeline per order (`--serve ADDR`).

pub mod jaeger;
pub mod journey;
pub mod page;
pub mod text;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use jaeger::{Jaeger, Trace};
use journey::{Journey, OrderSummary, Summary};

/// The order id attribute the agent puts on spans.
pub const ORDER_ID: &str = "order.id";

#[derive(Debug, thiserror::Error)]
pub enum OrdersError {
    #[error("--jaeger {url}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("TLS set-up for Jaeger failed: {0}")]
    Tls(String),
    #[error("Jaeger query {url} failed: {reason} (is Jaeger's query API at --jaeger?)")]
    Query { url: String, reason: String },
    #[error("--serve {addr}: {source}")]
    Serve {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Usage(String),
}

#[derive(Debug, clap::Args)]
pub struct OrdersArgs {
    /// Order ids (the `order.id` on the spans). None: a summary of the orders seen
    /// in the --since window.
    pub ids: Vec<String>,

    /// Jaeger's query API (the UI's address).
    #[arg(long, env = "SONDE_JAEGER", default_value = "http://localhost:16686")]
    pub jaeger: String,

    /// PEM file of CA certificates to trust for an https --jaeger.
    #[arg(long, env = "SONDE_JAEGER_CA_FILE")]
    pub jaeger_ca_file: Option<PathBuf>,

    /// Print JSON: with ids, one object per order (and per trace, when an order has
    /// several); without, the summary.
    #[arg(long)]
    pub json: bool,

    /// Window to look in, back from now: `1h`, `30m`, `2d`. Default 1h for the
    /// summary and the page, 24h for ids.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub since: Option<Duration>,

    /// Wait up to SECS for each order's trace to be in Jaeger and quiet (no new span
    /// for --quiet seconds); what is there by then is reported.
    #[arg(long, value_name = "SECS")]
    pub wait: Option<f64>,

    /// Seconds without a new span after which a trace counts as complete (--wait).
    #[arg(long, value_name = "SECS", default_value_t = 3.0)]
    pub quiet: f64,

    /// Most traces read per service (summary and page).
    #[arg(long, default_value_t = 1000)]
    pub limit: usize,

    /// Serve the order list and each order's timeline as a web page on this address
    /// (`127.0.0.1:8080`).
    #[arg(long, value_name = "ADDR")]
    pub serve: Option<SocketAddr>,
}

pub async fn run(args: OrdersArgs) -> anyhow::Result<()> {
    let jaeger = Jaeger::new(&args.jaeger, args.jaeger_ca_file.as_deref())?;
    if let Some(addr) = args.serve {
        if !args.ids.is_empty() || args.json || args.wait.is_some() {
            return Err(OrdersError::Usage(
                "--serve shows every order of the --since window: give no ids, --json or --wait with it"
                    .to_owned(),
            )
            .into());
        }
        let since = args.since.unwrap_or(Duration::from_secs(3600));
        return Ok(page::serve(addr, jaeger, since, args.limit).await?);
    }
    if args.ids.is_empty() {
        if args.wait.is_some() {
            return Err(OrdersError::Usage("--wait needs order ids".to_owned()).into());
        }
        let since = args.since.unwrap_or(Duration::from_secs(3600));
        let (journeys, notes) = recent(&jaeger, since, args.limit).await?;
        for n in &notes {
            eprintln!("sonde: {n}");
        }
        let summary = Summary::of(&journeys);
        if args.json {
            println!("{}", serde_json::to_string_pretty(&summary)?);
        } else {
            print!("{}", text::summary(&summary, since));
        }
        return Ok(());
    }
    let since = args.since.unwrap_or(Duration::from_secs(24 * 3600));
    let found = find_orders(&jaeger, &args.ids, since, args.wait, args.quiet).await?;
    let mut report = Vec::new();
    let mut out = String::new();
    for (id, journeys) in &found {
        if journeys.len() > 1 {
            eprintln!(
                "sonde: order {id} is in {} traces ({}): its journey is broken into pieces, a link the tracing missed",
                journeys.len(),
                journeys
                    .iter()
                    .map(|j| j.trace_id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if journeys.is_empty() {
            report.push(OrderSummary::missing(id));
            if !args.json {
                out.push_str(&format!(
                    "order {id}: no trace in Jaeger ({}) within the last {}\n\n",
                    args.jaeger,
                    humantime::format_duration(since)
                ));
            }
        }
        for j in journeys {
            report.push(OrderSummary::of(j));
            if !args.json {
                out.push_str(&text::journey(j, journeys.len()));
                out.push('\n');
            }
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{out}");
    }
    Ok(())
}

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

/// The traces of one order: every service's traces with its `order.id`.
async fn order_traces(
    jaeger: &Jaeger,
    services: &[String],
    id: &str,
    since: Duration,
) -> Result<Vec<Trace>, OrdersError> {
    let end = now_us() + 60_000_000;
    let start = now_us().saturating_sub(since.as_micros() as u64);
    let tags = BTreeMap::from([(ORDER_ID, id)]);
    let mut ids: Vec<String> = Vec::new();
    for service in services {
        let (traces, _) = jaeger.search(service, Some(&tags), start, end, 100).await?;
        for (tid, _) in traces {
            if !ids.contains(&tid) {
                ids.push(tid);
            }
        }
    }
    let mut out = Vec::new();
    for tid in ids {
        if let Some(t) = jaeger.trace(&tid).await? {
            out.push(t);
        }
    }
    Ok(out)
}

fn journeys_of(id: &str, traces: Vec<Trace>) -> Vec<Journey> {
    let mut js: Vec<Journey> = traces
        .into_iter()
        .map(|(tid, spans)| Journey::new(id, &tid, spans))
        .collect();
    js.sort_by_key(|j| (j.start_us, j.trace_id.clone()));
    js
}

/// Each order's journeys (none when it has no trace; several when its trace is in
/// pieces), in the order of `ids`. With `wait`, polls until every order has a trace
/// that has had no new span for `quiet` seconds, or `wait` seconds have passed.
pub async fn find_orders(
    jaeger: &Jaeger,
    ids: &[String],
    since: Duration,
    wait: Option<f64>,
    quiet: f64,
) -> Result<Vec<(String, Vec<Journey>)>, OrdersError> {
    let deadline = wait.map(|w| Instant::now() + Duration::from_secs_f64(w.max(0.0)));
    let quiet = Duration::from_secs_f64(quiet.max(0.0));
    // Per order: its traces, the span count last seen, and since when it is unchanged.
    let mut seen: Vec<(Vec<Trace>, usize, Instant)> = ids
        .iter()
        .map(|_| (Vec::new(), 0, Instant::now()))
        .collect();
    let mut settled = vec![false; ids.len()];
    loop {
        let services = jaeger.services().await?;
        for (i, id) in ids.iter().enumerate() {
            if settled[i] {
                continue;
            }
            let traces = order_traces(jaeger, &services, id, since).await?;
            let count: usize = traces.iter().map(|(_, s)| s.len()).sum();
            let entry = &mut seen[i];
            if count != entry.1 {
                entry.1 = count;
                entry.2 = Instant::now();
            }
            entry.0 = traces;
            settled[i] = deadline.is_none() || (count > 0 && entry.2.elapsed() >= quiet);
        }
        match deadline {
            Some(d) if !settled.iter().all(|s| *s) && Instant::now() < d => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            _ => break,
        }
    }
    Ok(ids
        .iter()
        .zip(seen)
        .map(|(id, (traces, _, _))| (id.clone(), journeys_of(id, traces)))
        .collect())
}

/// The journeys of every order with a span in the last `since`, and notes for the
/// user (a service whose traces were cut at `limit`, orders in several traces).
pub async fn recent(
    jaeger: &Jaeger,
    since: Duration,
    limit: usize,
) -> Result<(Vec<Journey>, Vec<String>), OrdersError> {
    let end = now_us() + 60_000_000;
    let start = now_us().saturating_sub(since.as_micros() as u64);
    let mut traces: BTreeMap<String, Vec<journey::Span>> = BTreeMap::new();
    let mut notes = Vec::new();
    for service in jaeger.services().await? {
        let (found, full) = jaeger.search(&service, None, start, end, limit).await?;
        if full {
            notes.push(format!(
                "service {service} has more than {limit} traces in the window: only {limit} read (raise --limit or shorten --since)"
            ));
        }
        for (tid, spans) in found {
            traces.entry(tid).or_insert(spans);
        }
    }
    let mut journeys = Vec::new();
    let mut per_order: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (tid, spans) in traces {
        let Some(order) = order_of(&spans) else {
            continue;
        };
        per_order
            .entry(order.clone())
            .or_default()
            .push(tid.clone());
        journeys.push(Journey::new(&order, &tid, spans));
    }
    for (order, tids) in per_order {
        if tids.len() > 1 {
            notes.push(format!(
                "order {order} is in {} traces ({}): a link the tracing missed",
                tids.len(),
                tids.join(", ")
            ));
        }
    }
    journeys.sort_by_key(|j| std::cmp::Reverse(j.start_us));
    Ok((journeys, notes))
}

/// The order a trace is about: the `order.id` most of its spans carry (the first
/// seen on a tie), none when no span has one.
pub fn order_of(spans: &[journey::Span]) -> Option<String> {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    let mut sorted: Vec<&journey::Span> = spans.iter().collect();
    sorted.sort_by_key(|s| s.start_us);
    for s in sorted {
        if let Some(id) = s.str(ORDER_ID) {
            match counts.iter_mut().find(|(k, _)| *k == id) {
                Some(c) => c.1 += 1,
                None => counts.push((id, 1)),
            }
        }
    }
    let best = counts.iter().map(|c| c.1).max()?;
    counts
        .into_iter()
        .find(|c| c.1 == best)
        .map(|c| c.0.to_owned())
}
