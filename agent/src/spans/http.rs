//! HTTP server and client spans from parsed exchanges, with the attributes of the
//! OpenTelemetry HTTP semantic conventions.
//!
//! Where the conventions ask for the server's address and port, the `Host` header (or
//! an absolute-form request target) wins; a `Host` without a port gets the port the
//! connection really used rather than the scheme's default, because that is what was
//! observed.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use opentelemetry_semantic_conventions::attribute as semconv;

use super::route::template_route;
use super::{
    HEADER_TABLE_UNKNOWN, INCOMPLETE, INCOMPLETE_REASON, KeyValue, Resource, Span, SpanKind,
    Status, new_span_id, new_trace_id,
};
use crate::conn::{ConnInfo, Role};
use crate::context::w3c::parse_traceparent;
use crate::protocols::http::HttpExchange;

/// Methods the conventions know; any other is reported as `_OTHER`.
const KNOWN_METHODS: [&str; 10] = [
    "CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "QUERY", "TRACE",
];

/// The span of one exchange. `mono_to_unix_ns` is added to the exchange's monotonic
/// times to get Unix times; `tls` says the bytes were read from a TLS library.
pub fn http_span(
    ex: &HttpExchange,
    conn: &ConnInfo,
    resource: Arc<Resource>,
    mono_to_unix_ns: i128,
    tls: bool,
) -> Span {
    let req = &ex.request;
    let target = Target::parse(&req.target, tls);
    let route = target.path.map(template_route);
    let known = KNOWN_METHODS.contains(&req.method.as_str());
    let method = if known { req.method.as_str() } else { "_OTHER" };
    // HTTP/2 on a connection whose header table is unknown: no method to report.
    let method_seen = !req.method.is_empty();

    let mut attrs = Vec::with_capacity(24);
    if method_seen {
        attrs.push(KeyValue::new(semconv::HTTP_REQUEST_METHOD, method));
    }
    if !known && method_seen {
        attrs.push(KeyValue::new(
            semconv::HTTP_REQUEST_METHOD_ORIGINAL,
            req.method.as_str(),
        ));
    }
    if let Some(path) = target.path {
        attrs.push(KeyValue::new(semconv::URL_PATH, path));
    }
    if let Some(query) = target.query {
        attrs.push(KeyValue::new(semconv::URL_QUERY, query));
    }
    attrs.push(KeyValue::new(semconv::URL_SCHEME, target.scheme));
    if tls {
        // The plaintext came from a TLS library's read or write: the session was up.
        attrs.push(KeyValue::new(semconv::TLS_ESTABLISHED, true));
    }
    if let Some(route) = &route {
        attrs.push(KeyValue::new(semconv::HTTP_ROUTE, route.as_str()));
    }

    let own_end = match ex.role {
        Role::Server => conn.local,
        Role::Client => conn.remote,
    };
    let authority = target.authority.or_else(|| {
        req.header("host")
            .or_else(|| req.header(":authority"))
            .filter(|h| !h.is_empty())
    });
    let (server_address, server_port) = match authority.map(split_host_port) {
        Some((host, port)) => (host.to_owned(), port.unwrap_or(own_end.port())),
        None => (own_end.ip().to_string(), own_end.port()),
    };
    if ex.role == Role::Client {
        let full = if target.absolute {
            req.target.clone()
        } else {
            let authority =
                authority.map_or_else(|| authority_of(own_end, target.scheme), str::to_owned);
            format!("{}://{}{}", target.scheme, authority, target.path_and_query)
        };
        attrs.push(KeyValue::new(semconv::URL_FULL, full));
    }
    attrs.push(KeyValue::new(semconv::SERVER_ADDRESS, server_address));
    attrs.push(KeyValue::new(semconv::SERVER_PORT, server_port));
    if ex.role == Role::Server {
        attrs.push(KeyValue::new(
            semconv::CLIENT_ADDRESS,
            conn.remote.ip().to_string(),
        ));
    }
    attrs.push(KeyValue::new(
        semconv::NETWORK_PEER_ADDRESS,
        conn.remote.ip().to_string(),
    ));
    attrs.push(KeyValue::new(
        semconv::NETWORK_PEER_PORT,
        conn.remote.port(),
    ));
    attrs.push(KeyValue::new(semconv::NETWORK_PROTOCOL_NAME, "http"));
    attrs.push(KeyValue::new(
        semconv::NETWORK_PROTOCOL_VERSION,
        match req.version {
            2 => "2".to_owned(),
            minor => format!("1.{minor}"),
        },
    ));
    if req.header_table_unknown {
        attrs.push(KeyValue::new(HEADER_TABLE_UNKNOWN, true));
    }
    let grpc = Grpc::of(ex);
    if let Some(g) = &grpc {
        g.attributes(&mut attrs);
    }
    if let Some(agent) = req.header("user-agent") {
        attrs.push(KeyValue::new(semconv::USER_AGENT_ORIGINAL, agent));
    }
    attrs.push(KeyValue::new(
        semconv::HTTP_REQUEST_BODY_SIZE,
        ex.request_body_size,
    ));

    let mut status = match &ex.response {
        // The exchange was cut short (see below), which is not an error in itself.
        None => Status::Unset,
        Some(resp) => {
            attrs.push(KeyValue::new(
                semconv::HTTP_RESPONSE_STATUS_CODE,
                resp.status,
            ));
            attrs.push(KeyValue::new(
                semconv::HTTP_RESPONSE_BODY_SIZE,
                ex.response_body_size,
            ));
            let threshold = if ex.role == Role::Server { 500 } else { 400 };
            if resp.status >= threshold {
                attrs.push(KeyValue::new(semconv::ERROR_TYPE, resp.status.to_string()));
                Status::Error(format!("HTTP {}", resp.status))
            } else {
                Status::Unset
            }
        }
    };

    // gRPC reports its outcome in its status, whatever the HTTP status: non-zero is an
    // error on both sides.
    if let Some(code) = grpc.as_ref().and_then(|g| g.status)
        && code != 0
        && status == Status::Unset
    {
        attrs.push(KeyValue::new(semconv::ERROR_TYPE, code.to_string()));
        status = Status::Error(format!("gRPC status {code}"));
    }

    if let Some(reason) = ex.incomplete {
        attrs.push(KeyValue::new(INCOMPLETE, true));
        attrs.push(KeyValue::new(INCOMPLETE_REASON, reason.as_str()));
    }

    let name_method = if known { req.method.as_str() } else { "HTTP" };
    let name = match (&grpc, &route) {
        (
            Some(Grpc {
                service_method: Some((service, method)),
                ..
            }),
            _,
        ) => format!("{service}/{method}"),
        (_, Some(route)) => format!("{name_method} {route}"),
        (_, None) => name_method.to_owned(),
    };
    let (trace_id, parent_span_id) = match req.header("traceparent").and_then(parse_traceparent) {
        Some((trace, parent, _flags)) => (trace, Some(parent)),
        None => (new_trace_id(), None),
    };
    let end_ns = if ex.response.is_some() {
        ex.response_end_ns
    } else {
        ex.request_end_ns
    };
    let start_unix_nanos = to_unix(ex.request_start_ns, mono_to_unix_ns);
    Span {
        trace_id,
        span_id: new_span_id(),
        parent_span_id,
        name,
        kind: match ex.role {
            Role::Server => SpanKind::Server,
            Role::Client => SpanKind::Client,
        },
        start_unix_nanos,
        end_unix_nanos: to_unix(end_ns, mono_to_unix_ns).max(start_unix_nanos),
        attributes: attrs,
        status,
        resource,
    }
}

/// What a gRPC call's span says beyond HTTP.
struct Grpc<'a> {
    /// From the path `/package.Service/Method`.
    service_method: Option<(&'a str, &'a str)>,
    /// `grpc-status` from the trailers (or a trailers-only response).
    status: Option<i64>,
}

impl<'a> Grpc<'a> {
    /// The names the gRPC conventions used until the RPC conventions were reworked
    /// (`rpc.system.name`, a fully-qualified `rpc.method`): what Jaeger users and the
    /// dashboards built on them query today.
    #[allow(deprecated)]
    fn attributes(&self, attrs: &mut Vec<KeyValue>) {
        attrs.push(KeyValue::new(semconv::RPC_SYSTEM, "grpc"));
        if let Some((service, method)) = self.service_method {
            attrs.push(KeyValue::new(semconv::RPC_SERVICE, service));
            attrs.push(KeyValue::new(semconv::RPC_METHOD, method));
        }
        if let Some(code) = self.status {
            attrs.push(KeyValue::new(semconv::RPC_GRPC_STATUS_CODE, code));
        }
    }

    /// Some when the request's content-type is gRPC's.
    fn of(ex: &'a HttpExchange) -> Option<Self> {
        let ct = ex.request.header("content-type")?;
        if !ct.starts_with("application/grpc") {
            return None;
        }
        let path = ex.request.target.split('?').next().unwrap_or_default();
        let service_method = path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .filter(|(s, m)| !s.is_empty() && !m.is_empty() && !m.contains('/'));
        let status = ex
            .response
            .as_ref()
            .and_then(|r| r.header("grpc-status"))
            .and_then(|s| s.trim().parse().ok());
        Some(Grpc {
            service_method,
            status,
        })
    }
}

fn to_unix(mono_ns: u64, mono_to_unix_ns: i128) -> u64 {
    (i128::from(mono_ns) + mono_to_unix_ns).clamp(0, i128::from(u64::MAX)) as u64
}

/// The parts of a request-target (RFC 9112 section 3.2).
struct Target<'a> {
    scheme: &'static str,
    /// `host[:port]` of an absolute-form or authority-form target.
    authority: Option<&'a str>,
    absolute: bool,
    path: Option<&'a str>,
    query: Option<&'a str>,
    /// Path and query as sent, for `url.full`.
    path_and_query: &'a str,
}

impl<'a> Target<'a> {
    fn parse(raw: &'a str, tls: bool) -> Self {
        let mut t = Target {
            scheme: if tls { "https" } else { "http" },
            authority: None,
            absolute: false,
            path: None,
            query: None,
            path_and_query: "",
        };
        if raw.is_empty() {
            // An HTTP/2 path that could not be decoded.
            return t;
        }
        let lower = raw.get(..8).unwrap_or(raw).to_ascii_lowercase();
        let rest = if lower.starts_with("http://") {
            t.scheme = "http";
            &raw[7..]
        } else if lower.starts_with("https://") {
            t.scheme = "https";
            &raw[8..]
        } else if raw.starts_with('/') || raw == "*" {
            t.path_and_query = raw;
            let (path, query) = split_query(raw);
            t.path = Some(path);
            t.query = query;
            return t;
        } else {
            // Authority form, as CONNECT sends it.
            t.authority = Some(raw);
            return t;
        };
        t.absolute = true;
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        t.authority = Some(&rest[..split]).filter(|a| !a.is_empty());
        t.path_and_query = &rest[split..];
        let (path, query) = split_query(t.path_and_query);
        t.path = Some(if path.is_empty() { "/" } else { path });
        t.query = query;
        t
    }
}

fn split_query(s: &str) -> (&str, Option<&str>) {
    let s = s.split('#').next().unwrap_or_default();
    match s.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (s, None),
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`; the port when it is a number.
fn split_host_port(authority: &str) -> (&str, Option<u16>) {
    if let Some(rest) = authority.strip_prefix('[')
        && let Some((host, after)) = rest.split_once(']')
    {
        return (host, after.strip_prefix(':').and_then(|p| p.parse().ok()));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => match port.parse() {
            Ok(port) => (host, Some(port)),
            Err(_) => (host, None),
        },
        _ => (authority, None),
    }
}

/// `ip[:port]` for `url.full`, leaving out the scheme's default port.
fn authority_of(addr: SocketAddr, scheme: &str) -> String {
    let host = match addr.ip() {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("[{ip}]"),
    };
    let default = if scheme == "https" { 443 } else { 80 };
    if addr.port() == default {
        host
    } else {
        format!("{host}:{}", addr.port())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::EndReason;
    use crate::protocols::http::{RequestHead, ResponseHead};
    use crate::spans::Value;

    fn resource() -> Arc<Resource> {
        Arc::new(Resource {
            service_name: "shop".into(),
            pid: 1,
            executable_name: "python3".into(),
            host_name: "node".into(),
            attributes: vec![],
            generic_name: false,
        })
    }

    fn conn() -> ConnInfo {
        ConnInfo {
            local: "10.0.0.1:8080".parse().unwrap(),
            remote: "10.0.0.2:51234".parse().unwrap(),
        }
    }

    fn exchange(
        role: Role,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        status: Option<u16>,
    ) -> HttpExchange {
        HttpExchange {
            role,
            seq: 0,
            request: std::sync::Arc::new(RequestHead {
                method: method.into(),
                target: target.into(),
                version: 1,
                headers: headers
                    .iter()
                    .map(|(n, v)| ((*n).into(), (*v).into()))
                    .collect(),
                header_table_unknown: false,
            }),
            response: status.map(|status| ResponseHead {
                status,
                reason: String::new(),
                version: 1,
                headers: vec![],
            }),
            request_start_ns: 1_000,
            request_end_ns: 2_000,
            response_start_ns: 3_000,
            response_end_ns: 4_000,
            request_body_size: 12,
            response_body_size: 34,
            request_body: vec![],
            response_body: vec![],
            incomplete: None,
        }
    }

    fn str_attr<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
        match span.attribute(key)? {
            Value::Str(s) => Some(s),
            other => panic!("{key} is {other:?}"),
        }
    }

    fn int_attr(span: &Span, key: &str) -> Option<i64> {
        match span.attribute(key)? {
            Value::Int(i) => Some(*i),
            other => panic!("{key} is {other:?}"),
        }
    }

    #[test]
    fn server_span_has_route_name_and_attributes() {
        let ex = exchange(
            Role::Server,
            "GET",
            "/orders/42?verbose=1",
            &[("host", "shop.local:8443"), ("user-agent", "curl/8.5")],
            Some(200),
        );
        let span = http_span(&ex, &conn(), resource(), 1_000_000, false);
        assert_eq!(span.name, "GET /orders/{id}");
        assert_eq!(span.kind, SpanKind::Server);
        assert_eq!(span.status, Status::Unset);
        assert_eq!(
            (span.start_unix_nanos, span.end_unix_nanos),
            (1_001_000, 1_004_000)
        );
        assert_eq!(str_attr(&span, semconv::HTTP_REQUEST_METHOD), Some("GET"));
        assert_eq!(str_attr(&span, semconv::URL_PATH), Some("/orders/42"));
        assert_eq!(str_attr(&span, semconv::URL_QUERY), Some("verbose=1"));
        assert_eq!(str_attr(&span, semconv::URL_SCHEME), Some("http"));
        assert_eq!(str_attr(&span, semconv::HTTP_ROUTE), Some("/orders/{id}"));
        assert_eq!(str_attr(&span, semconv::SERVER_ADDRESS), Some("shop.local"));
        assert_eq!(int_attr(&span, semconv::SERVER_PORT), Some(8443));
        assert_eq!(str_attr(&span, semconv::CLIENT_ADDRESS), Some("10.0.0.2"));
        assert_eq!(
            str_attr(&span, semconv::NETWORK_PEER_ADDRESS),
            Some("10.0.0.2")
        );
        assert_eq!(int_attr(&span, semconv::NETWORK_PEER_PORT), Some(51234));
        assert_eq!(
            str_attr(&span, semconv::NETWORK_PROTOCOL_NAME),
            Some("http")
        );
        assert_eq!(
            str_attr(&span, semconv::NETWORK_PROTOCOL_VERSION),
            Some("1.1")
        );
        assert_eq!(
            str_attr(&span, semconv::USER_AGENT_ORIGINAL),
            Some("curl/8.5")
        );
        assert_eq!(
            int_attr(&span, semconv::HTTP_RESPONSE_STATUS_CODE),
            Some(200)
        );
        assert_eq!(int_attr(&span, semconv::HTTP_REQUEST_BODY_SIZE), Some(12));
        assert_eq!(int_attr(&span, semconv::HTTP_RESPONSE_BODY_SIZE), Some(34));
        assert_eq!(span.attribute(semconv::URL_FULL), None);
        assert_eq!(span.attribute(semconv::ERROR_TYPE), None);
        assert_eq!(span.parent_span_id, None);
    }

    #[test]
    fn server_without_host_uses_local_address() {
        let mut ex = exchange(Role::Server, "POST", "/orders", &[], Some(201));
        std::sync::Arc::make_mut(&mut ex.request).version = 0;
        let span = http_span(&ex, &conn(), resource(), 0, true);
        assert_eq!(str_attr(&span, semconv::SERVER_ADDRESS), Some("10.0.0.1"));
        assert_eq!(int_attr(&span, semconv::SERVER_PORT), Some(8080));
        assert_eq!(str_attr(&span, semconv::URL_SCHEME), Some("https"));
        assert_eq!(
            str_attr(&span, semconv::NETWORK_PROTOCOL_VERSION),
            Some("1.0")
        );
        assert_eq!(span.attribute(semconv::URL_QUERY), None);
    }

    #[test]
    fn client_span_has_url_full() {
        let client = ConnInfo {
            local: "10.0.0.2:51234".parse().unwrap(),
            remote: "10.0.0.9:3000".parse().unwrap(),
        };
        let ex = exchange(
            Role::Client,
            "GET",
            "/customers/7?x=1",
            &[("host", "crm:3000")],
            Some(200),
        );
        let span = http_span(&ex, &client, resource(), 0, false);
        assert_eq!(span.kind, SpanKind::Client);
        assert_eq!(
            str_attr(&span, semconv::URL_FULL),
            Some("http://crm:3000/customers/7?x=1")
        );
        assert_eq!(str_attr(&span, semconv::SERVER_ADDRESS), Some("crm"));
        assert_eq!(int_attr(&span, semconv::SERVER_PORT), Some(3000));
        assert_eq!(span.attribute(semconv::CLIENT_ADDRESS), None);

        let no_host = exchange(Role::Client, "GET", "/a", &[], Some(200));
        let span = http_span(&no_host, &client, resource(), 0, true);
        assert_eq!(
            str_attr(&span, semconv::URL_FULL),
            Some("https://10.0.0.9:3000/a")
        );
        assert_eq!(str_attr(&span, semconv::SERVER_ADDRESS), Some("10.0.0.9"));

        let v6 = ConnInfo {
            local: "[::1]:5000".parse().unwrap(),
            remote: "[fd00::2]:443".parse().unwrap(),
        };
        let span = http_span(&no_host, &v6, resource(), 0, true);
        assert_eq!(
            str_attr(&span, semconv::URL_FULL),
            Some("https://[fd00::2]/a")
        );

        let proxy = exchange(
            Role::Client,
            "GET",
            "http://files:9000/models/1.stl",
            &[],
            Some(200),
        );
        let span = http_span(&proxy, &client, resource(), 0, false);
        assert_eq!(
            str_attr(&span, semconv::URL_FULL),
            Some("http://files:9000/models/1.stl")
        );
        assert_eq!(str_attr(&span, semconv::URL_PATH), Some("/models/1.stl"));
        assert_eq!(str_attr(&span, semconv::SERVER_ADDRESS), Some("files"));
        assert_eq!(int_attr(&span, semconv::SERVER_PORT), Some(9000));
    }

    #[test]
    fn status_depends_on_role() {
        let span = |role, status| {
            http_span(
                &exchange(role, "GET", "/", &[], status),
                &conn(),
                resource(),
                0,
                false,
            )
        };
        assert_eq!(
            span(Role::Server, Some(503)).status,
            Status::Error("HTTP 503".into())
        );
        assert_eq!(
            str_attr(&span(Role::Server, Some(503)), semconv::ERROR_TYPE),
            Some("503")
        );
        assert_eq!(span(Role::Server, Some(404)).status, Status::Unset);
        assert_eq!(
            span(Role::Client, Some(404)).status,
            Status::Error("HTTP 404".into())
        );
        assert_eq!(span(Role::Client, Some(302)).status, Status::Unset);
        let mut ex = exchange(Role::Client, "GET", "/", &[], None);
        ex.incomplete = Some(EndReason::ConnectionClosed);
        let closed = http_span(&ex, &conn(), resource(), 0, false);
        assert_eq!(
            closed.status,
            Status::Unset,
            "a cut-short exchange is no error"
        );
        assert_eq!(closed.attribute(INCOMPLETE), Some(&Value::Bool(true)));
        assert_eq!(
            str_attr(&closed, INCOMPLETE_REASON),
            Some("connection_closed")
        );
        assert_eq!(closed.end_unix_nanos, 2_000);
        assert_eq!(closed.attribute(semconv::HTTP_RESPONSE_STATUS_CODE), None);
    }

    #[test]
    fn unknown_methods_are_other() {
        let span = http_span(
            &exchange(Role::Server, "PROPFIND", "/dav/1", &[], Some(207)),
            &conn(),
            resource(),
            0,
            false,
        );
        assert_eq!(span.name, "HTTP /dav/{id}");
        assert_eq!(
            str_attr(&span, semconv::HTTP_REQUEST_METHOD),
            Some("_OTHER")
        );
        assert_eq!(
            str_attr(&span, semconv::HTTP_REQUEST_METHOD_ORIGINAL),
            Some("PROPFIND")
        );
    }

    #[test]
    fn connect_and_asterisk_targets() {
        let span = http_span(
            &exchange(Role::Client, "CONNECT", "files:443", &[], Some(200)),
            &conn(),
            resource(),
            0,
            false,
        );
        assert_eq!(span.name, "CONNECT");
        assert_eq!(str_attr(&span, semconv::SERVER_ADDRESS), Some("files"));
        assert_eq!(int_attr(&span, semconv::SERVER_PORT), Some(443));
        let span = http_span(
            &exchange(Role::Server, "OPTIONS", "*", &[], Some(200)),
            &conn(),
            resource(),
            0,
            false,
        );
        assert_eq!(span.name, "OPTIONS *");
    }

    #[test]
    fn traceparent_sets_trace_and_parent() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ex = exchange(Role::Server, "GET", "/", &[("traceparent", tp)], Some(200));
        let span = http_span(&ex, &conn(), resource(), 0, false);
        assert_eq!(
            crate::spans::hex(&span.trace_id),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(
            span.parent_span_id.map(|p| crate::spans::hex(&p)),
            Some("00f067aa0ba902b7".into())
        );
        assert_ne!(span.span_id, span.parent_span_id.unwrap());

        let bad = exchange(
            Role::Server,
            "GET",
            "/",
            &[("traceparent", "00-zz")],
            Some(200),
        );
        let span = http_span(&bad, &conn(), resource(), 0, false);
        assert_eq!(span.parent_span_id, None);
        assert_ne!(span.trace_id, [0; 16]);
    }

    #[test]
    fn host_port_splitting() {
        assert_eq!(split_host_port("a"), ("a", None));
        assert_eq!(split_host_port("a:81"), ("a", Some(81)));
        assert_eq!(split_host_port("a:x"), ("a", None));
        assert_eq!(split_host_port("[::1]:81"), ("::1", Some(81)));
        assert_eq!(split_host_port("[::1]"), ("::1", None));
        assert_eq!(split_host_port("::1"), ("::1", None));
    }

    #[test]
    #[allow(deprecated)]
    fn grpc_calls_get_rpc_attributes_and_a_non_zero_status_is_an_error() {
        for role in [Role::Server, Role::Client] {
            let mut ex = exchange(
                role,
                "POST",
                "/shop.v1.Orders/Get",
                &[
                    (":authority", "mes.local:50051"),
                    ("content-type", "application/grpc+proto"),
                ],
                Some(200),
            );
            std::sync::Arc::make_mut(&mut ex.request).version = 2;
            let resp = ex.response.as_mut().unwrap();
            resp.headers.push(("grpc-status".into(), "5".into()));
            let span = http_span(&ex, &conn(), resource(), 0, false);
            assert_eq!(span.name, "shop.v1.Orders/Get");
            assert_eq!(str_attr(&span, semconv::RPC_SYSTEM), Some("grpc"));
            assert_eq!(
                str_attr(&span, semconv::RPC_SERVICE),
                Some("shop.v1.Orders")
            );
            assert_eq!(str_attr(&span, semconv::RPC_METHOD), Some("Get"));
            assert_eq!(int_attr(&span, semconv::RPC_GRPC_STATUS_CODE), Some(5));
            assert_eq!(
                str_attr(&span, semconv::NETWORK_PROTOCOL_VERSION),
                Some("2")
            );
            assert_eq!(str_attr(&span, semconv::SERVER_ADDRESS), Some("mes.local"));
            assert_eq!(int_attr(&span, semconv::SERVER_PORT), Some(50051));
            assert!(matches!(span.status, Status::Error(_)), "{role:?}");

            let resp = ex.response.as_mut().unwrap();
            resp.headers.last_mut().unwrap().1 = "0".into();
            let span = http_span(&ex, &conn(), resource(), 0, false);
            assert_eq!(span.status, Status::Unset);
        }
    }

    #[test]
    fn an_unknown_header_table_reports_no_method_or_path() {
        let mut ex = exchange(Role::Server, "", "", &[], Some(200));
        let request = std::sync::Arc::make_mut(&mut ex.request);
        request.version = 2;
        request.header_table_unknown = true;
        let span = http_span(&ex, &conn(), resource(), 0, false);
        assert_eq!(span.name, "HTTP");
        assert_eq!(str_attr(&span, semconv::HTTP_REQUEST_METHOD), None);
        assert_eq!(str_attr(&span, semconv::URL_PATH), None);
        assert!(span.attributes.iter().any(
            |kv| kv.key == HEADER_TABLE_UNKNOWN && kv.value == crate::spans::Value::Bool(true)
        ));
    }
}
