//! The agent's hot paths, without the kernel: what each HTTP exchange or AMQP message
//! costs in user space once its bytes are out of the ring buffer.
//!
//! `cargo bench -p sonde --bench hot_paths` (add `-- --quick` for a short run). The
//! groups:
//! - `pipeline`: one keep-alive HTTP exchange through the whole pipeline as the live
//!   agent runs it (connection table, reassembly, parser, span, trace graph, order
//!   fill, redaction, business metrics) into the OTLP exporter's encoding: the user-space
//!   part of `agent_cpu_us_per_request` in `cargo xtask bench`;
//! - `http`, `amqp`: the parsers alone, in bytes per second and time per exchange;
//! - `reassembly`: in-order stream pieces;
//! - `otlp`: a batch of spans to protobuf (as sent) and to JSON (the file exporter);
//! - `replay`: real captures (the fixtures of `agent/tests`) through `sonde replay`.

use std::{
    hint::black_box,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use agent_common::{Direction, EventKind};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use prost::Message;
use sonde::{
    events::Event,
    export::otlp,
    pipeline::{Pipeline, PipelineOptions, Sink},
    protocols::{amqp::AmqpParser, http::HttpParser},
    reassembly::StreamCursor,
    settings::Settings,
    spans::{KeyValue, Resource, Span, SpanKind, Status, Value},
    telemetry::Metrics,
};

// The agent's allocator, so that allocation costs what it costs in `sonde run`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../tests/support/keepalive.rs"]
mod keepalive;
use keepalive::{PID, REQUEST, RESPONSE, data, header, tuple};

/// The live agent's pipeline, with the default config file's rules, whose spans go
/// through the business metrics into the OTLP exporter's encoding (the bytes are
/// counted and dropped, as a receiver would take them).
fn live_pipeline(spans_out: Arc<AtomicU64>) -> Pipeline {
    let settings = Settings::default();
    let metrics = Arc::new(Metrics::default());
    let observed = metrics.clone();
    let sink: Sink = Box::new(move |span| {
        observed.business.observe(&span);
        let (_resource, proto) = otlp::to_proto(span);
        black_box(proto.encode_to_vec());
        spans_out.fetch_add(1, Ordering::Relaxed);
    });
    let opts = PipelineOptions {
        exclude_own_sockets: false,
        business: Arc::new(
            sonde::business::Rules::new(settings.business)
                .with_redaction(sonde::business::Redactor::new(&settings.redaction)),
        ),
        ..PipelineOptions::default()
    };
    let mut p = Pipeline::new(opts, metrics, sink);
    p.set_mono_to_unix(1_800_000_000_000_000_000);
    p
}

fn pipeline(c: &mut Criterion) {
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(1));
    // 64 keep-alive connections taken in turn, 20 us apart, as wrk's would be.
    const CONNS: u32 = 64;
    g.bench_function("http_keepalive_exchange", |b| {
        let spans_out = Arc::new(AtomicU64::new(0));
        let mut p = live_pipeline(spans_out.clone());
        // Stream offsets of each connection's two directions.
        let mut offsets = vec![(0u64, 0u64); CONNS as usize];
        let mut ts = 1_000_000_000u64;
        for fd in 0..CONNS {
            p.handle(Event::Accept {
                header: header(EventKind::Accept, 100 + fd, ts),
                tuple: tuple(40000 + (100 + fd) as u16),
            });
        }
        let mut n = 0u64;
        b.iter(|| {
            let i = (n % u64::from(CONNS)) as usize;
            let fd = 100 + i as u32;
            let (inbound, outbound) = offsets[i];
            data(&mut p, fd, Direction::Ingress, inbound, REQUEST, ts);
            data(
                &mut p,
                fd,
                Direction::Egress,
                outbound,
                RESPONSE,
                ts + 15_000,
            );
            offsets[i] = (
                inbound + REQUEST.len() as u64,
                outbound + RESPONSE.len() as u64,
            );
            ts += 20_000;
            n += 1;
            if n.is_multiple_of(256) {
                p.tick(ts);
            }
        });
        // Every exchange measured must have come out as its span, or the figure is
        // not what it says.
        p.tick(ts + 60_000_000_000);
        assert_eq!(
            spans_out.load(Ordering::Relaxed),
            n,
            "spans out, for exchanges in"
        );
    });
    g.finish();
}

fn http(c: &mut Criterion) {
    let mut g = c.benchmark_group("http");
    g.throughput(Throughput::Bytes((REQUEST.len() + RESPONSE.len()) as u64));
    g.bench_function("parse_exchange", |b| {
        let mut parser = HttpParser::new();
        let mut ts = 0u64;
        b.iter(|| {
            parser.feed(Direction::Ingress, black_box(REQUEST), ts);
            parser.feed(Direction::Egress, black_box(RESPONSE), ts + 1_000);
            ts += 2_000;
            black_box(parser.take_exchanges());
        });
    });
    // A 64 KiB body in 4 KiB reads: the cost of bytes the parser only counts.
    let body = vec![b'x'; 64 * 1024];
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    g.throughput(Throughput::Bytes(
        (REQUEST.len() + head.len() + body.len()) as u64,
    ));
    g.bench_function("parse_64k_body", |b| {
        let mut parser = HttpParser::new();
        let mut ts = 0u64;
        b.iter(|| {
            parser.feed(Direction::Ingress, REQUEST, ts);
            parser.feed(Direction::Egress, head.as_bytes(), ts);
            for chunk in body.chunks(4096) {
                parser.feed(Direction::Egress, black_box(chunk), ts);
            }
            ts += 2_000;
            black_box(parser.take_exchanges());
        });
    });
    g.finish();
}

/// AMQP frames, written by amq-protocol as a client and a broker would.
mod frames {
    use amq_protocol::{
        frame::{AMQPContentHeader, AMQPFrame, WriteContext, gen_frame},
        protocol::{AMQPClass, basic},
    };

    fn frame(f: AMQPFrame) -> Vec<u8> {
        gen_frame(&f)(WriteContext::from(Vec::new()))
            .expect("frame serialises")
            .write
    }

    fn content(channel: u16, body: &[u8]) -> Vec<u8> {
        [
            frame(AMQPFrame::Header(
                channel,
                AMQPContentHeader {
                    class_id: 60,
                    body_size: body.len() as u64,
                    properties: basic::AMQPProperties::default()
                        .with_content_type("application/json".into())
                        .with_delivery_mode(2),
                },
            )),
            frame(AMQPFrame::Body(channel, body.to_vec())),
        ]
        .concat()
    }

    /// The protocol header and basic.publish of `body` on channel 1.
    pub fn publish(body: &[u8]) -> Vec<u8> {
        let publish = basic::Publish {
            exchange: "orders".into(),
            routing_key: "order.created".into(),
            mandatory: false,
            immediate: false,
        };
        [
            frame(AMQPFrame::Method(
                1,
                AMQPClass::Basic(basic::AMQPMethod::Publish(publish)),
            )),
            content(1, body),
        ]
        .concat()
    }

    /// basic.deliver of `body` on channel 1 to consumer `tag`.
    pub fn delivery(tag: &str, delivery_tag: u64, body: &[u8]) -> Vec<u8> {
        let deliver = basic::Deliver {
            consumer_tag: tag.into(),
            delivery_tag,
            redelivered: false,
            exchange: "orders".into(),
            routing_key: "order.created".into(),
        };
        [
            frame(AMQPFrame::Method(
                1,
                AMQPClass::Basic(basic::AMQPMethod::Deliver(deliver)),
            )),
            content(1, body),
        ]
        .concat()
    }

    /// basic.ack of `delivery_tag` on channel 1.
    pub fn ack(delivery_tag: u64) -> Vec<u8> {
        frame(AMQPFrame::Method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag,
                multiple: false,
            })),
        ))
    }
}

fn amqp(c: &mut Criterion) {
    let body = br#"{"order_id":"ord-20261202-0042","status":"created","items":[{"sku":"gear-m3","qty":2}]}"#;
    let mut g = c.benchmark_group("amqp");
    let publish = frames::publish(body);
    g.throughput(Throughput::Bytes(publish.len() as u64));
    g.bench_function("parse_publish", |b| {
        let mut parser = AmqpParser::new();
        parser.feed(Direction::Egress, b"AMQP\x00\x00\x09\x01", 0);
        let mut ts = 0u64;
        b.iter(|| {
            parser.feed(Direction::Egress, black_box(&publish), ts);
            ts += 1_000;
            black_box(parser.take_operations());
        });
    });
    // A consumer: the delivery comes in, the ack goes out. Delivery tags grow, so the
    // stream is built for a whole batch of iterations at once.
    g.throughput(Throughput::Elements(1000));
    g.bench_function("parse_1000_deliveries_and_acks", |b| {
        b.iter_batched(
            || {
                (1..=1000u64)
                    .map(|tag| (frames::delivery("amq.ctag-1", tag, body), frames::ack(tag)))
                    .collect::<Vec<_>>()
            },
            |messages| {
                let mut parser = AmqpParser::new();
                parser.feed(Direction::Egress, b"AMQP\x00\x00\x09\x01", 0);
                for (i, (delivery, ack)) in messages.iter().enumerate() {
                    let ts = i as u64 * 1_000;
                    parser.feed(Direction::Ingress, delivery, ts);
                    parser.feed(Direction::Egress, ack, ts + 500);
                }
                black_box(parser.take_operations());
            },
            BatchSize::LargeInput,
        );
    });
    g.finish();
}

fn reassembly(c: &mut Criterion) {
    let mut g = c.benchmark_group("reassembly");
    let piece = vec![b'a'; 1024];
    g.throughput(Throughput::Elements(1));
    g.bench_function("in_order_1k", |b| {
        let mut r = StreamCursor::new();
        let mut offset = 0u64;
        b.iter(|| {
            let advance = r.advance(offset, piece.len() as u64, black_box(&piece));
            black_box(advance.pieces().count());
            offset += piece.len() as u64;
        });
    });
    g.finish();
}

/// A server span as the HTTP builder makes them, with its usual attributes.
fn http_span(i: u64, resource: &Arc<Resource>) -> Span {
    let attrs: [(&'static str, Value); 12] = [
        ("http.request.method", "GET".into()),
        ("url.path", format!("/orders/ord-{i}").into()),
        ("url.scheme", "http".into()),
        ("http.route", "/orders/{id}".into()),
        ("server.address", "10.0.0.2".into()),
        ("server.port", Value::Int(8080)),
        ("client.address", "10.0.0.3".into()),
        ("network.peer.port", Value::Int(40_000 + (i % 1000) as i64)),
        ("network.protocol.version", "1.1".into()),
        ("user_agent.original", "shop/2.3 (python-requests)".into()),
        ("http.response.status_code", Value::Int(200)),
        ("order.id", format!("ord-{i}").into()),
    ];
    Span {
        trace_id: [7; 16],
        span_id: i.to_be_bytes(),
        parent_span_id: Some([9; 8]),
        name: "GET /orders/{id}".into(),
        kind: SpanKind::Server,
        start_unix_nanos: 1_800_000_000_000_000_000 + i * 20_000,
        end_unix_nanos: 1_800_000_000_000_015_000 + i * 20_000,
        attributes: attrs
            .into_iter()
            .map(|(k, v)| KeyValue::new(k, v))
            .collect(),
        status: Status::Unset,
        resource: resource.clone(),
    }
}

fn otlp_encoding(c: &mut Criterion) {
    const BATCH: u64 = 512;
    let mut g = c.benchmark_group("otlp");
    g.throughput(Throughput::Elements(BATCH));
    let resource = Arc::new(Resource {
        service_name: "crm".into(),
        pid: PID,
        executable_name: "nginx".into(),
        host_name: "node-1".into(),
        attributes: vec![KeyValue::new("process.command", "nginx: worker process")],
        generic_name: false,
    });
    let spans: Vec<Span> = (0..BATCH).map(|i| http_span(i, &resource)).collect();
    g.bench_function("protobuf_batch_512", |b| {
        b.iter_batched(
            || spans.clone(),
            |spans| {
                let encoded: Vec<_> = spans
                    .into_iter()
                    .map(|s| {
                        let (resource, proto) = otlp::to_proto(s);
                        (resource, proto.encode_to_vec())
                    })
                    .collect();
                let groups = otlp::group_by_resource(encoded);
                black_box(otlp::encode_request(&groups, |b| b.as_slice()))
            },
            BatchSize::LargeInput,
        );
    });
    g.bench_function("json_batch_512", |b| {
        b.iter_batched(
            || spans.clone(),
            |spans| {
                let request = otlp::to_request(spans.into_iter().map(otlp::to_proto));
                black_box(serde_json::to_vec(&request).expect("encodes"))
            },
            BatchSize::LargeInput,
        );
    });
    g.finish();
}

fn replay(c: &mut Criterion) {
    let mut g = c.benchmark_group("replay");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for (name, file) in [
        ("python_keepalive", "replay/python_keepalive.pcap"),
        ("nginx_proxy", "replay/nginx_proxy.pcapng"),
        ("amqp_confirms_acks", "amqp/confirms_acks.pcap"),
        ("amqp_fanout", "amqp/fanout.pcap"),
    ] {
        let path = fixtures.join(file);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        g.throughput(Throughput::Bytes(bytes.len() as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                let spans = Arc::new(AtomicU64::new(0));
                let counted = spans.clone();
                let sink: Sink = Box::new(move |_span| {
                    counted.fetch_add(1, Ordering::Relaxed);
                });
                let outcome = sonde::replay::replay_reader(
                    &path,
                    bytes.as_slice(),
                    Arc::new(Metrics::default()),
                    sink,
                );
                assert!(outcome.error.is_none(), "{name}: {:?}", outcome.error);
                assert!(spans.load(Ordering::Relaxed) > 0, "{name}: no spans");
            });
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = pipeline, http, amqp, reassembly, otlp_encoding, replay
}
criterion_main!(benches);
