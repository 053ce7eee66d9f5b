//! `sonde orders --serve ADDR`: the order list and, per order, a timeline of its spans
//! by service, as plain HTML rendered on the server (no script, no external asset:
//! the machines this runs on have no internet, and Jaeger's own UI assets are not
//! installable there). Each page load reads Jaeger again.
//!
//! Hand-written over a `TcpListener` with httparse, like the admin endpoint: three GET
//! routes and `Connection: close` need no web framework.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use percent_encoding::{NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn};

use super::jaeger::Jaeger;
use super::journey::{Journey, OrderSummary, Span, ms};
use super::text::timestamp;
use super::{OrdersError, find_orders, recent, text};

const MAX_HEAD: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(5);

struct State {
    jaeger: Jaeger,
    since: Duration,
    limit: usize,
}

pub async fn serve(
    addr: SocketAddr,
    jaeger: Jaeger,
    since: Duration,
    limit: usize,
) -> Result<(), OrdersError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| OrdersError::Serve { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| OrdersError::Serve { addr, source })?;
    info!(%local, "serving the order journeys");
    eprintln!("sonde: order journeys at http://{local}/");
    let state = Arc::new(State {
        jaeger,
        since,
        limit,
    });
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let state = Arc::clone(&state);
                tokio::spawn(async move {
                    if let Err(error) = handle(stream, &state).await {
                        debug!(%peer, %error, "page request failed");
                    }
                });
            }
            Err(error) => {
                warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(mut stream: TcpStream, state: &State) -> std::io::Result<()> {
    let mut buf = vec![0u8; MAX_HEAD];
    let mut filled = 0;
    let path = loop {
        let n = tokio::time::timeout(READ_TIMEOUT, stream.read(&mut buf[filled..]))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "slow request"))??;
        if n == 0 {
            return Ok(());
        }
        filled += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..filled]) {
            Ok(httparse::Status::Complete(_)) => {
                if req.method != Some("GET") {
                    return respond(&mut stream, 405, "text/plain", "GET only\n").await;
                }
                break req.path.unwrap_or("/").to_owned();
            }
            Ok(httparse::Status::Partial) if filled < buf.len() => continue,
            _ => return respond(&mut stream, 400, "text/plain", "bad request\n").await,
        }
    };
    let (route, query) = path.split_once('?').unwrap_or((&path, ""));
    let since = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("since="))
        .and_then(|v| humantime::parse_duration(&percent_decode_str(v).decode_utf8_lossy()).ok())
        .unwrap_or(state.since);
    let (status, kind, body) = if route == "/" {
        match recent(&state.jaeger, since, state.limit).await {
            Ok((journeys, notes)) => (
                200,
                "text/html; charset=utf-8",
                list_page(&journeys, &notes, since),
            ),
            Err(e) => (502, "text/html; charset=utf-8", error_page(&e.to_string())),
        }
    } else if route == "/api/orders" {
        match recent(&state.jaeger, since, state.limit).await {
            Ok((journeys, _)) => {
                let report: Vec<OrderSummary> = journeys.iter().map(OrderSummary::of).collect();
                (
                    200,
                    "application/json",
                    serde_json::to_string_pretty(&report).unwrap_or_default(),
                )
            }
            Err(e) => (502, "text/plain; charset=utf-8", e.to_string()),
        }
    } else if let Some(id) = route.strip_prefix("/journey/") {
        let id = percent_decode_str(id).decode_utf8_lossy().into_owned();
        let window = Duration::from_secs(24 * 3600).max(since);
        match find_orders(&state.jaeger, std::slice::from_ref(&id), window, None, 0.0).await {
            Ok(found) => {
                let journeys = found.into_iter().next().map(|f| f.1).unwrap_or_default();
                (200, "text/html; charset=utf-8", order_page(&id, &journeys))
            }
            Err(e) => (502, "text/html; charset=utf-8", error_page(&e.to_string())),
        }
    } else {
        (404, "text/plain; charset=utf-8", "not found\n".to_owned())
    };
    respond(&mut stream, status, kind, &body).await
}

async fn respond(
    stream: &mut TcpStream,
    status: u16,
    kind: &str,
    body: &str,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Bad Gateway",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// Text made safe for HTML, attributes included.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

const STYLE: &str = r#"
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em;margin:0 0 .3em} h2{font-size:1.15em;margin:1.2em 0 .4em}
table{border-collapse:collapse} td,th{padding:3px 8px;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}
th{background:#f3f3f3} a{color:#0645ad}
.st-ok{color:#1a7f37}.st-error{color:#c62828;font-weight:bold}.st-stalled{color:#b26a00;font-weight:bold}
.muted{color:#777} .num{text-align:right;font-variant-numeric:tabular-nums}
.wf{width:100%;border-collapse:collapse;table-layout:fixed} .wf td{border-bottom:1px solid #eee;padding:2px 6px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.lane{position:relative;height:16px}
.bar{position:absolute;top:2px;height:12px;min-width:2px;border-radius:2px;opacity:.9}
.bar.error{background:#c62828 !important;outline:2px solid #7f0000}
.bar.stalled{background:repeating-linear-gradient(45deg,#f0a000,#f0a000 4px,#ffe0a0 4px,#ffe0a0 8px) !important;outline:2px solid #b26a00}
.mark{font-weight:bold;margin-left:4px} .mark.error{color:#c62828} .mark.stalled{color:#b26a00}
.svc{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:4px;vertical-align:middle}
.legend span{margin-right:1em} pre{background:#f7f7f7;padding:8px;overflow:auto;font-size:12px}
.banner{padding:6px 10px;border-radius:4px;margin:.5em 0} .banner.error{background:#fdecea;color:#7f0000} .banner.stalled{background:#fff4e0;color:#6b3f00} .banner.ok{background:#e9f6ec;color:#0b4a1e}
"#;

fn head(title: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{STYLE}</style></head><body>",
        esc(title)
    )
}

fn error_page(message: &str) -> String {
    format!(
        "{}<h1>sonde orders</h1><p class=\"banner error\">{}</p></body></html>",
        head("sonde orders: error"),
        esc(message)
    )
}

/// An order's page. Not `/order/ID`: the agent's default rules take the segment after
/// `order` for an order id, and a traced node would then make the browser's visit
/// part of the order's journey.
fn link(id: &str) -> String {
    format!("/journey/{}", utf8_percent_encode(id, NON_ALPHANUMERIC))
}

fn status_class(j: &Journey) -> &'static str {
    if j.failure.is_some() {
        "st-error"
    } else if j.stall.is_some() {
        "st-stalled"
    } else {
        "st-ok"
    }
}

pub fn list_page(journeys: &[Journey], notes: &[String], since: Duration) -> String {
    let mut o = head("sonde orders");
    let failed = journeys
        .iter()
        .filter(|j| j.failed_stage().is_some())
        .count();
    let _ = write!(
        o,
        "<h1>Orders</h1><p class=\"muted\">{} orders with a trace in the last {} ({} failed or stalled), newest first, read from Jaeger.</p>",
        journeys.len(),
        esc(&humantime::format_duration(since).to_string()),
        failed
    );
    for n in notes {
        let _ = write!(o, "<p class=\"banner stalled\">{}</p>", esc(n));
    }
    o.push_str("<table id=\"orders\"><tr><th>order</th><th>started</th><th>status</th><th class=\"num\">duration</th><th>failed or stalled stage</th><th class=\"num\">spans</th><th>services</th><th>trace</th></tr>");
    for j in journeys {
        let _ = write!(
            o,
            "<tr class=\"order\" data-order=\"{id}\"><td><a href=\"{href}\">{id}</a></td><td>{start}</td><td class=\"{cls}\">{status}</td><td class=\"num\">{dur:.1} ms</td><td class=\"{cls}\">{stage}</td><td class=\"num\">{spans}</td><td>{services}</td><td class=\"muted\">{trace}</td></tr>",
            id = esc(&j.order_id),
            href = link(&j.order_id),
            start = esc(&timestamp(j.start_us)),
            cls = status_class(j),
            status = esc(&j.status()),
            dur = j.duration_ms(),
            stage = esc(j.failed_stage().unwrap_or("")),
            spans = j.span_count,
            services = esc(&j.services.join(" → ")),
            trace = esc(&j.trace_id),
        );
    }
    o.push_str("</table></body></html>");
    o
}

/// A colour per service, stable across pages.
fn colour(service: &str) -> String {
    let h = service.bytes().fold(2166136261u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(16777619)
    });
    format!("hsl({}, 55%, 55%)", h % 360)
}

fn depth(s: &Span, journey: &Journey) -> usize {
    let mut d = 0;
    let mut at = s.parent.as_deref();
    while let Some(p) = at {
        match journey.spans.iter().find(|x| x.span_id == p) {
            Some(x) if d < 64 => {
                d += 1;
                at = x.parent.as_deref();
            }
            _ => break,
        }
    }
    d
}

pub fn order_page(id: &str, journeys: &[Journey]) -> String {
    let mut o = head(&format!("order {id}"));
    let _ = write!(
        o,
        "<p><a href=\"/\">← all orders</a></p><h1>Order {}</h1>",
        esc(id)
    );
    if journeys.is_empty() {
        let _ = write!(
            o,
            "<p class=\"banner stalled\" id=\"no-trace\">No trace in Jaeger has a span with order.id {}.</p></body></html>",
            esc(id)
        );
        return o;
    }
    if journeys.len() > 1 {
        let _ = write!(
            o,
            "<p class=\"banner error\" id=\"split\">This order is in {} traces: its journey is broken into pieces, a link the tracing missed.</p>",
            journeys.len()
        );
    }
    for j in journeys {
        waterfall(&mut o, j);
    }
    o.push_str("</body></html>");
    o
}

fn waterfall(o: &mut String, j: &Journey) {
    let total = j.end_us.saturating_sub(j.start_us).max(1);
    let _ = write!(
        o,
        "<section class=\"journey\" data-trace=\"{}\"><h2>Trace {}</h2><p>{} → {} · <b>{:.1} ms</b> · {} spans · status <b class=\"{}\" id=\"status\">{}</b></p>",
        esc(&j.trace_id),
        esc(&j.trace_id),
        esc(&timestamp(j.start_us)),
        esc(&timestamp(j.end_us)),
        j.duration_ms(),
        j.span_count,
        status_class(j),
        esc(&j.status())
    );
    match (&j.failure, &j.stall) {
        (None, None) => o.push_str("<p class=\"banner ok\">No error, no stall.</p>"),
        (f, s) => {
            if let Some(f) = f {
                let _ = write!(
                    o,
                    "<p class=\"banner error\" id=\"broke\">✖ Broke at stage <b>{}</b>, +{:.1} ms: {} {}: {}</p>",
                    esc(&f.stage),
                    ms(f.at_us.saturating_sub(j.start_us)),
                    esc(&f.service),
                    esc(&f.operation),
                    esc(&f.detail)
                );
            }
            if let Some(s) = s {
                let _ = write!(
                    o,
                    "<p class=\"banner stalled\" id=\"stalls\">⏸ Stalls at stage <b>{}</b>, +{:.1} ms: {} {}: {}</p>",
                    esc(&s.stage),
                    ms(s.at_us.saturating_sub(j.start_us)),
                    esc(&s.service),
                    esc(&s.operation),
                    esc(&s.detail)
                );
            }
        }
    }
    o.push_str("<p class=\"legend\">");
    for s in &j.services {
        let _ = write!(
            o,
            "<span><i class=\"svc\" style=\"background:{}\"></i>{}</span>",
            colour(s),
            esc(s)
        );
    }
    o.push_str("</p><table class=\"wf\"><col style=\"width:11%\"><col style=\"width:27%\"><col style=\"width:8%\"><col><tr><th>service</th><th>span</th><th class=\"num\">duration</th><th>timeline (0 – ");
    let _ = write!(o, "{:.1} ms)</th></tr>", ms(total));
    let origin = j.failure.as_ref().map(|f| f.span_id.as_str());
    let stuck = j.stall.as_ref().map(|f| f.span_id.as_str());
    for s in &j.spans {
        let left = (s.start_us.saturating_sub(j.start_us)) as f64 * 100.0 / total as f64;
        let width = (s.duration_us as f64 * 100.0 / total as f64).max(0.2);
        let state = if s.is_stalled() {
            "stalled"
        } else if s.is_error() {
            "error"
        } else {
            "ok"
        };
        let mark = if Some(s.span_id.as_str()) == origin {
            "<span class=\"mark error\">✖ broke here</span>"
        } else if Some(s.span_id.as_str()) == stuck {
            "<span class=\"mark stalled\">⏸ stalls here</span>"
        } else {
            ""
        };
        let kind = format!("{:?}", s.kind).to_lowercase();
        let _ = write!(
            o,
            "<tr class=\"span {state}\" data-span=\"{sid}\" data-service=\"{svc}\"><td><i class=\"svc\" style=\"background:{c}\"></i>{svc}</td><td style=\"padding-left:{pad}px\" title=\"{kind} {name}\"><span class=\"muted\">{kind}</span> {name}{mark}</td><td class=\"num\">{dur:.1} ms</td><td><div class=\"lane\"><div class=\"bar {state}\" style=\"left:{left:.3}%;width:{width:.3}%;background:{c}\" title=\"{name}: {dur:.1} ms\"></div></div></td></tr>",
            sid = esc(&s.span_id),
            svc = esc(&s.service),
            c = colour(&s.service),
            pad = 6 + 12 * depth(s, j),
            name = esc(&s.name),
            dur = ms(s.duration_us),
        );
    }
    o.push_str("</table><details><summary>Journey as text</summary><pre>");
    o.push_str(&esc(&text::journey(j, 1)));
    o.push_str("</pre></details></section>");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_is_escaped() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    #[test]
    fn an_order_without_a_trace_says_so() {
        let page = order_page("<o-1>", &[]);
        assert!(
            page.contains("No trace in Jaeger has a span with order.id &lt;o-1&gt;"),
            "{page}"
        );
    }
}
