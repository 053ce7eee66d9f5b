//! [`Span`]s to OTLP: each span to its protobuf form as it enters the export queue
//! ([`to_proto`]), and a batch of them to one `ExportTraceServiceRequest`
//! ([`to_request`]).
//!
//! The agent speaks for many services at once, so a batch holds spans of many
//! resources: each distinct resource gets its own `ResourceSpans`, in the order it
//! first appears in the batch. The same message goes out over gRPC, as protobuf over
//! HTTP, and (serialised with opentelemetry-proto's serde support) as a line of the
//! OTLP JSON file.

use std::sync::Arc;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, ArrayValue, InstrumentationScope, KeyValue, any_value,
};
use opentelemetry_proto::tonic::resource::v1::Resource as ProtoResource;
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span as ProtoSpan, Status as ProtoStatus,
    span::SpanKind as ProtoKind, status::StatusCode,
};
use opentelemetry_semantic_conventions::SCHEMA_URL;
use opentelemetry_semantic_conventions::resource::{
    HOST_NAME, PROCESS_EXECUTABLE_NAME, PROCESS_PID, SERVICE_NAME, TELEMETRY_SDK_NAME,
    TELEMETRY_SDK_VERSION,
};

use crate::spans::{self, Resource, Span, SpanKind, Status, Value};

/// The instrumentation scope and `telemetry.sdk.name` of every span sonde makes.
pub const SCOPE_NAME: &str = "sonde";
/// sonde's version, as the scope version and `telemetry.sdk.version`.
pub const SCOPE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// W3C trace flags: sampled. Every span the agent exports was kept by its sampler.
const TRACE_FLAGS_SAMPLED: u32 = 0x01;

/// `span` in its OTLP form, and the resource it belongs to. Consumes the span, so its
/// strings move rather than being copied. Done as a span enters the export queue:
/// the queue is bounded by the encoded size of what it holds.
pub fn to_proto(span: Span) -> (Arc<Resource>, ProtoSpan) {
    let Span {
        trace_id,
        span_id,
        parent_span_id,
        name,
        kind,
        start_unix_nanos,
        end_unix_nanos,
        attributes,
        status,
        resource,
    } = span;
    let proto = ProtoSpan {
        trace_id: trace_id.to_vec(),
        span_id: span_id.to_vec(),
        parent_span_id: parent_span_id.map(|id| id.to_vec()).unwrap_or_default(),
        flags: TRACE_FLAGS_SAMPLED,
        name,
        kind: to_proto_kind(kind) as i32,
        start_time_unix_nano: start_unix_nanos,
        end_time_unix_nano: end_unix_nanos,
        attributes: attributes.into_iter().map(into_proto_kv).collect(),
        status: to_proto_status(status),
        ..Default::default()
    };
    (resource, proto)
}

/// Groups `items` by resource, in the order each resource first appears.
pub fn group_by_resource<T>(
    items: impl IntoIterator<Item = (Arc<Resource>, T)>,
) -> Vec<(Arc<Resource>, Vec<T>)> {
    let mut groups: Vec<(Arc<Resource>, Vec<T>)> = Vec::new();
    for (resource, item) in items {
        // Builders share one Arc per process, so the pointer test nearly always
        // decides; equal resources behind different Arcs still land together.
        match groups
            .iter_mut()
            .find(|(r, _)| Arc::ptr_eq(r, &resource) || **r == *resource)
        {
            Some((_, group)) => group.push(item),
            None => groups.push((resource, vec![item])),
        }
    }
    groups
}

/// One request for a batch of spans, grouped by resource.
pub fn to_request(
    spans: impl IntoIterator<Item = (Arc<Resource>, ProtoSpan)>,
) -> ExportTraceServiceRequest {
    let resource_spans = group_by_resource(spans)
        .into_iter()
        .map(|(resource, spans)| ResourceSpans {
            resource: Some(to_proto_resource(&resource)),
            scope_spans: vec![ScopeSpans {
                scope: Some(scope()),
                spans,
                schema_url: SCHEMA_URL.to_owned(),
            }],
            schema_url: SCHEMA_URL.to_owned(),
        })
        .collect();
    ExportTraceServiceRequest { resource_spans }
}

/// The protobuf encoding of the request [`to_request`] would make, from spans already
/// encoded (each a `Span` message's bytes), grouped by resource: what the OTLP
/// exporter sends, put together without decoding the spans again. Fields in tag
/// order, as prost writes them, so the bytes are the same.
pub fn encode_request<T>(
    groups: &[(Arc<Resource>, Vec<T>)],
    span_bytes: impl Fn(&T) -> &[u8],
) -> Vec<u8> {
    use prost::encoding::{self, WireType, encode_key, encode_varint, encoded_len_varint};
    // Every field here has a tag below 16, so its key is one byte.
    fn delimited_len(len: usize) -> usize {
        encoding::key_len(1) + encoded_len_varint(len as u64) + len
    }
    fn put_delimited_head(tag: u32, len: usize, buf: &mut Vec<u8>) {
        encode_key(tag, WireType::LengthDelimited, buf);
        encode_varint(len as u64, buf);
    }
    let schema_url = SCHEMA_URL.to_owned();
    let scope = scope();
    let mut buf = Vec::new();
    for (resource, spans) in groups {
        let resource = to_proto_resource(resource);
        let spans_len: usize = spans
            .iter()
            .map(|s| delimited_len(span_bytes(s).len()))
            .sum();
        let scope_spans_len = encoding::message::encoded_len(1, &scope)
            + spans_len
            + encoding::string::encoded_len(3, &schema_url);
        let resource_spans_len = encoding::message::encoded_len(1, &resource)
            + delimited_len(scope_spans_len)
            + encoding::string::encoded_len(3, &schema_url);
        put_delimited_head(1, resource_spans_len, &mut buf);
        encoding::message::encode(1, &resource, &mut buf);
        put_delimited_head(2, scope_spans_len, &mut buf);
        encoding::message::encode(1, &scope, &mut buf);
        for span in spans {
            let bytes = span_bytes(span);
            put_delimited_head(2, bytes.len(), &mut buf);
            buf.extend_from_slice(bytes);
        }
        encoding::string::encode(3, &schema_url, &mut buf);
        encoding::string::encode(3, &schema_url, &mut buf);
    }
    buf
}

fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: SCOPE_NAME.to_owned(),
        version: SCOPE_VERSION.to_owned(),
        ..Default::default()
    }
}

/// The resource's fixed fields, sonde's own `telemetry.sdk.*`, then the further
/// attributes. A further attribute that repeats a key already set is left out: OTLP
/// readers disagree on which duplicate wins, and the fixed fields are the ones the
/// process registry vouches for.
///
/// `telemetry.sdk.language` is left out on purpose: it would describe the agent
/// (Rust), not the traced service.
fn to_proto_resource(resource: &Resource) -> ProtoResource {
    let mut attributes = vec![
        kv(SERVICE_NAME, string(&resource.service_name)),
        kv(
            PROCESS_PID,
            any_value::Value::IntValue(i64::from(resource.pid)),
        ),
        kv(PROCESS_EXECUTABLE_NAME, string(&resource.executable_name)),
        kv(HOST_NAME, string(&resource.host_name)),
        kv(TELEMETRY_SDK_NAME, string(SCOPE_NAME)),
        kv(TELEMETRY_SDK_VERSION, string(SCOPE_VERSION)),
    ];
    let fixed = attributes.len();
    for extra in &resource.attributes {
        if !attributes[..fixed].iter().any(|a| a.key == extra.key) {
            attributes.push(into_proto_kv(extra.clone()));
        }
    }
    ProtoResource {
        attributes,
        ..Default::default()
    }
}

fn to_proto_kind(kind: SpanKind) -> ProtoKind {
    match kind {
        SpanKind::Internal => ProtoKind::Internal,
        SpanKind::Server => ProtoKind::Server,
        SpanKind::Client => ProtoKind::Client,
        SpanKind::Producer => ProtoKind::Producer,
        SpanKind::Consumer => ProtoKind::Consumer,
    }
}

/// An unset status is left out of the message, as OTLP writers do.
fn to_proto_status(status: Status) -> Option<ProtoStatus> {
    match status {
        Status::Unset => None,
        Status::Ok => Some(ProtoStatus {
            code: StatusCode::Ok as i32,
            message: String::new(),
        }),
        Status::Error(message) => Some(ProtoStatus {
            code: StatusCode::Error as i32,
            message,
        }),
    }
}

fn into_proto_kv(attribute: spans::KeyValue) -> KeyValue {
    let value = match attribute.value {
        Value::Str(s) => any_value::Value::StringValue(s),
        Value::Int(i) => any_value::Value::IntValue(i),
        Value::Bool(b) => any_value::Value::BoolValue(b),
        Value::Double(d) => any_value::Value::DoubleValue(d),
        Value::StrArray(items) => string_array(items.into_iter()),
    };
    kv(attribute.key, value)
}

fn string_array(items: impl Iterator<Item = String>) -> any_value::Value {
    any_value::Value::ArrayValue(ArrayValue {
        values: items
            .map(|s| AnyValue {
                value: Some(any_value::Value::StringValue(s)),
            })
            .collect(),
    })
}

fn string(s: &str) -> any_value::Value {
    any_value::Value::StringValue(s.to_owned())
}

fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spans::KeyValue as SpanKv;

    fn request_of(spans: Vec<Span>) -> ExportTraceServiceRequest {
        to_request(spans.into_iter().map(to_proto))
    }

    fn resource(service: &str, pid: u32) -> Arc<Resource> {
        Arc::new(Resource {
            service_name: service.to_owned(),
            pid,
            executable_name: "python3".to_owned(),
            host_name: "node-1".to_owned(),
            attributes: vec![
                SpanKv::new("container.id", "abc123"),
                // Repeats a fixed field: must not override it.
                SpanKv::new(SERVICE_NAME, "impostor"),
            ],
            generic_name: false,
        })
    }

    fn span(resource: &Arc<Resource>, kind: SpanKind, n: u8) -> Span {
        Span {
            trace_id: [0xab; 16],
            span_id: [n; 8],
            parent_span_id: (n > 1).then_some([1; 8]),
            name: "GET /orders/{id}".to_owned(),
            kind,
            start_unix_nanos: 1_700_000_000_000_000_000,
            end_unix_nanos: 1_700_000_000_012_300_000,
            attributes: vec![
                SpanKv::new("http.request.method", "GET"),
                SpanKv::new("http.response.status_code", 200u16),
                SpanKv::new("order.present", true),
                SpanKv {
                    key: "order.weight",
                    value: Value::Double(1.5),
                },
                SpanKv::new(
                    "messaging.rabbitmq.queues",
                    vec!["crm".to_owned(), "audit".to_owned()],
                ),
            ],
            status: if n == 3 {
                Status::Error("boom".to_owned())
            } else {
                Status::Unset
            },
            resource: Arc::clone(resource),
        }
    }

    #[test]
    fn groups_spans_by_resource_in_first_seen_order() {
        let shop = resource("shop-api", 10);
        let crm = resource("crm-api", 20);
        // An equal resource behind a second Arc belongs with the first.
        let shop_again = Arc::new((*shop).clone());
        let batch = vec![
            span(&shop, SpanKind::Server, 1),
            span(&crm, SpanKind::Client, 2),
            span(&shop_again, SpanKind::Client, 3),
        ];
        let request = request_of(batch);
        assert_eq!(request.resource_spans.len(), 2);
        let names: Vec<_> = request
            .resource_spans
            .iter()
            .map(|rs| {
                let attrs = &rs.resource.as_ref().unwrap().attributes;
                match &attrs[0].value.as_ref().unwrap().value {
                    Some(any_value::Value::StringValue(s)) => s.clone(),
                    other => panic!("service.name not a string: {other:?}"),
                }
            })
            .collect();
        assert_eq!(names, ["shop-api", "crm-api"]);
        let shop_spans = &request.resource_spans[0].scope_spans[0].spans;
        assert_eq!(shop_spans.len(), 2);
        assert_eq!(shop_spans[1].span_id, vec![3; 8]);
        let scope = request.resource_spans[0].scope_spans[0]
            .scope
            .as_ref()
            .unwrap();
        assert_eq!(scope.name, "sonde");
        assert_eq!(scope.version, env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn a_request_put_together_from_encoded_spans_is_what_prost_would_encode() {
        use prost::Message;
        let shop = resource("shop-api", 10);
        let crm = resource("crm-api", 20);
        let batch = vec![
            span(&shop, SpanKind::Server, 1),
            span(&crm, SpanKind::Client, 2),
            span(&shop, SpanKind::Client, 3),
        ];
        let encoded: Vec<(Arc<Resource>, Vec<u8>)> = batch
            .clone()
            .into_iter()
            .map(|s| {
                let (resource, proto) = to_proto(s);
                (resource, proto.encode_to_vec())
            })
            .collect();
        let groups = group_by_resource(encoded);
        let bytes = encode_request(&groups, |s| s.as_slice());
        assert_eq!(bytes, request_of(batch).encode_to_vec());
        assert!(encode_request::<Vec<u8>>(&[], |s| s.as_slice()).is_empty());
    }

    #[test]
    fn json_has_hex_ids_integer_enums_and_typed_attributes() {
        let shop = resource("shop-api", 1234);
        let batch = vec![
            span(&shop, SpanKind::Server, 1),
            span(&shop, SpanKind::Client, 3),
        ];
        let json = serde_json::to_value(request_of(batch)).unwrap();

        let rs = &json["resourceSpans"][0];
        let resource_attrs = rs["resource"]["attributes"].as_array().unwrap();
        let find = |attrs: &[serde_json::Value], key: &str| {
            attrs
                .iter()
                .find(|a| a["key"] == key)
                .map(|a| a["value"].clone())
        };
        assert_eq!(
            find(resource_attrs, "service.name").unwrap()["stringValue"],
            "shop-api"
        );
        assert_eq!(
            find(resource_attrs, "process.pid").unwrap()["intValue"],
            "1234"
        );
        assert_eq!(
            find(resource_attrs, "host.name").unwrap()["stringValue"],
            "node-1"
        );
        assert_eq!(
            find(resource_attrs, "telemetry.sdk.name").unwrap()["stringValue"],
            "sonde"
        );
        assert_eq!(
            find(resource_attrs, "container.id").unwrap()["stringValue"],
            "abc123"
        );
        let service_names = resource_attrs
            .iter()
            .filter(|a| a["key"] == "service.name")
            .count();
        assert_eq!(
            service_names, 1,
            "a further attribute must not repeat service.name"
        );

        let server = &rs["scopeSpans"][0]["spans"][0];
        assert_eq!(server["traceId"], "abababababababababababababababab");
        assert_eq!(server["spanId"], "0101010101010101");
        assert_eq!(server["parentSpanId"], "");
        assert_eq!(server["kind"], 2, "SPAN_KIND_SERVER");
        assert_eq!(server["startTimeUnixNano"], "1700000000000000000");
        assert_eq!(server["endTimeUnixNano"], "1700000000012300000");
        assert_eq!(server["name"], "GET /orders/{id}");
        let attrs = server["attributes"].as_array().unwrap();
        assert_eq!(
            find(attrs, "http.request.method").unwrap()["stringValue"],
            "GET"
        );
        assert_eq!(
            find(attrs, "http.response.status_code").unwrap()["intValue"],
            "200"
        );
        assert_eq!(find(attrs, "order.present").unwrap()["boolValue"], true);
        assert_eq!(find(attrs, "order.weight").unwrap()["doubleValue"], 1.5);
        assert_eq!(
            find(attrs, "messaging.rabbitmq.queues").unwrap()["arrayValue"]["values"],
            serde_json::json!([{"stringValue": "crm"}, {"stringValue": "audit"}])
        );

        let client = &rs["scopeSpans"][0]["spans"][1];
        assert_eq!(client["kind"], 3, "SPAN_KIND_CLIENT");
        assert_eq!(client["parentSpanId"], "0101010101010101");
        assert_eq!(client["status"]["code"], 2, "STATUS_CODE_ERROR");
        assert_eq!(client["status"]["message"], "boom");
    }

    #[test]
    fn every_kind_and_status_maps() {
        let r = resource("s", 1);
        let kinds = [
            (SpanKind::Internal, ProtoKind::Internal),
            (SpanKind::Server, ProtoKind::Server),
            (SpanKind::Client, ProtoKind::Client),
            (SpanKind::Producer, ProtoKind::Producer),
            (SpanKind::Consumer, ProtoKind::Consumer),
        ];
        for (kind, expected) in kinds {
            assert_eq!(to_proto(span(&r, kind, 1)).1.kind, expected as i32);
        }
        assert_eq!(to_proto_status(Status::Unset), None);
        assert_eq!(
            to_proto_status(Status::Ok).unwrap().code,
            StatusCode::Ok as i32
        );
    }
}
