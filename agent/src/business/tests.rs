//! The rule engine on exchanges as the parsers give them.

use super::*;
use crate::protocols::amqp::Properties;
use crate::settings::Settings;

struct Http {
    method: &'static str,
    target: &'static str,
    req_headers: Vec<(String, String)>,
    resp_headers: Vec<(String, String)>,
    req_body: Vec<u8>,
    resp_body: Vec<u8>,
}

fn http(method: &'static str, target: &'static str) -> Http {
    Http {
        method,
        target,
        req_headers: vec![],
        resp_headers: vec![],
        req_body: vec![],
        resp_body: vec![],
    }
}

impl Http {
    fn req_body(mut self, b: &str) -> Self {
        self.req_body = b.as_bytes().to_vec();
        self
    }
    fn resp_body(mut self, b: &str) -> Self {
        self.resp_body = b.as_bytes().to_vec();
        self
    }
    fn req_header(mut self, n: &str, v: &str) -> Self {
        self.req_headers.push((n.to_ascii_lowercase(), v.into()));
        self
    }
    fn resp_header(mut self, n: &str, v: &str) -> Self {
        self.resp_headers.push((n.to_ascii_lowercase(), v.into()));
        self
    }

    fn found(&self, rules: &Rules, service: &str) -> Vec<(String, String)> {
        let request = RequestHead {
            method: self.method.into(),
            target: self.target.into(),
            version: 1,
            headers: self.req_headers.clone(),
            header_table_unknown: false,
        };
        let response = ResponseHead {
            status: 200,
            reason: "OK".into(),
            version: 1,
            headers: self.resp_headers.clone(),
        };
        let (path, query) = match self.target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (self.target, None),
        };
        let view = ExchangeView {
            service,
            exchange: Exchange::Http(HttpView {
                method: self.method,
                path: Some(path),
                query,
                request: &request,
                response: Some(&response),
                request_body: &self.req_body,
                response_body: &self.resp_body,
            }),
        };
        pairs(apply(rules, &view))
    }
}

fn pairs(found: Vec<(&'static str, Value)>) -> Vec<(String, String)> {
    found
        .into_iter()
        .map(|(k, v)| match v {
            Value::Str(s) => (k.to_owned(), s),
            other => panic!("{k} is {other:?}"),
        })
        .collect()
}

fn amqp(
    rules: &Rules,
    exchange: &str,
    key: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Vec<(String, String)> {
    let message = Message {
        exchange: exchange.into(),
        routing_key: key.into(),
        properties: Properties {
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            ..Default::default()
        },
        body_size: body.len() as u64,
        body: body.as_bytes().to_vec(),
    };
    let view = ExchangeView {
        service: "mes",
        exchange: Exchange::Amqp(&message),
    };
    pairs(apply(rules, &view))
}

fn defaults() -> Rules {
    Rules::default()
}

/// The rules of a config file with `defaults` and these rules (flow mappings).
fn rules(defaults: bool, rules: &[&str]) -> Rules {
    let mut yaml = format!("business:\n  defaults: {defaults}\n  rules:");
    yaml.push_str(if rules.is_empty() { " []\n" } else { "\n" });
    for r in rules {
        yaml.push_str(&format!("    - {r}\n"));
    }
    Rules::new(Settings::parse(&yaml).unwrap().business)
}

fn order(id: &str) -> Vec<(String, String)> {
    vec![("order.id".into(), id.into())]
}

fn order_status(id: &str, status: &str) -> Vec<(String, String)> {
    vec![
        ("order.id".into(), id.into()),
        ("order.status".into(), status.into()),
    ]
}

#[test]
fn defaults_find_order_ids_in_paths() {
    let d = defaults();
    assert_eq!(http("GET", "/orders/42").found(&d, "shop"), order("42"));
    assert_eq!(
        http("GET", "/api/orders/ORD-1234/status").found(&d, "shop"),
        order("ORD-1234")
    );
    assert_eq!(
        http("GET", "/api/v1/order/1001").found(&d, "shop"),
        order("1001")
    );
    assert_eq!(
        http("GET", "/orders/a%20b123").found(&d, "shop"),
        order("a b123")
    );
    assert!(http("GET", "/orders/search").found(&d, "shop").is_empty());
    assert!(http("GET", "/orders").found(&d, "shop").is_empty());
    assert!(http("GET", "/health").found(&d, "shop").is_empty());
}

#[test]
fn defaults_find_order_ids_in_queries_and_headers() {
    let d = defaults();
    assert_eq!(
        http("GET", "/track?orderId=77&x=1").found(&d, "s"),
        order("77")
    );
    assert_eq!(
        http("GET", "/track?x=1&order_id=A%2B1").found(&d, "s"),
        order("A+1")
    );
    assert_eq!(
        http("GET", "/track?order-id=x+y").found(&d, "s"),
        order("x y")
    );
    assert_eq!(
        http("GET", "/x")
            .req_header("X-Order-Id", "h-1")
            .found(&d, "s"),
        order("h-1")
    );
    assert_eq!(
        http("POST", "/x")
            .resp_header("X-Order-ID", "h-2")
            .resp_header("X-Order-Status", "new")
            .found(&d, "s"),
        order_status("h-2", "new")
    );
}

#[test]
fn defaults_find_order_ids_and_statuses_in_json_bodies() {
    let d = defaults();
    let snake = r#"{"order_id": "A-1", "status": "paid", "total": 3}"#;
    assert_eq!(
        http("POST", "/checkout").req_body(snake).found(&d, "s"),
        order_status("A-1", "paid")
    );
    let camel = r#"{"customer": "c", "orderId": 55, "orderStatus": "printing"}"#;
    assert_eq!(
        http("POST", "/checkout").resp_body(camel).found(&d, "s"),
        order_status("55", "printing")
    );
    let nested = r#"{"data": {"order": {"id": "o-9", "status": "shipped"}}}"#;
    assert_eq!(
        http("GET", "/latest").resp_body(nested).found(&d, "s"),
        order_status("o-9", "shipped")
    );
    let kebab = r#"[{"order-id": "k-1"}]"#;
    assert_eq!(
        http("GET", "/x").resp_body(kebab).found(&d, "s"),
        order("k-1")
    );
}

#[test]
fn a_status_is_taken_only_beside_an_order_id() {
    let d = defaults();
    assert!(
        http("GET", "/health")
            .resp_body(r#"{"status": "ok"}"#)
            .found(&d, "s")
            .is_empty()
    );
    // The order id from the path, a bare status in the body: no status.
    assert_eq!(
        http("GET", "/orders/42")
            .resp_body(r#"{"status": "ok"}"#)
            .found(&d, "s"),
        order("42")
    );
    // The status of another object than the order id's is not the order's.
    let apart = r#"{"order_id": 1, "payment": {"status": "declined"}}"#;
    assert_eq!(
        http("GET", "/x").resp_body(apart).found(&d, "s"),
        order("1")
    );
}

#[test]
fn the_shallowest_order_id_wins_whatever_its_spelling() {
    let body = r#"{"items": [{"order_id": "deep"}], "orderId": "top"}"#;
    assert_eq!(
        http("GET", "/x").resp_body(body).found(&defaults(), "s"),
        order("top")
    );
}

#[test]
fn the_request_comes_before_the_response_and_the_path_before_bodies() {
    let d = defaults();
    let found = http("POST", "/x")
        .req_body(r#"{"order_id": "req"}"#)
        .resp_body(r#"{"order_id": "resp"}"#)
        .found(&d, "s");
    assert_eq!(found, order("req"));
    let found = http("PUT", "/orders/1234")
        .req_body(r#"{"order_id": "body"}"#)
        .found(&d, "s");
    assert_eq!(found, order("1234"));
}

#[test]
fn a_body_cut_short_still_gives_the_fields_captured_whole() {
    let d = defaults();
    let body = r#"{"order_id": "A-7", "status": "new", "model": "AAAAAAAAAAAA"#;
    assert_eq!(
        http("POST", "/x").req_body(body).found(&d, "s"),
        order_status("A-7", "new")
    );
    let cut_in_id = r#"{"order_id": "A-"#;
    assert!(
        http("POST", "/x")
            .req_body(cut_in_id)
            .found(&d, "s")
            .is_empty()
    );
}

#[test]
fn compressed_and_non_json_bodies_are_not_read() {
    let d = defaults();
    let found = http("POST", "/x")
        .req_header("Content-Encoding", "gzip")
        .req_body(r#"{"order_id": 1}"#)
        .found(&d, "s");
    assert!(found.is_empty());
    assert!(
        http("POST", "/x")
            .req_body("order_id=1")
            .found(&d, "s")
            .is_empty()
    );
}

#[test]
fn defaults_find_order_ids_in_amqp_bodies_and_headers() {
    let d = defaults();
    assert_eq!(
        amqp(
            &d,
            "orders",
            "order.created",
            &[],
            r#"{"orderId": "M-1", "status": "created"}"#
        ),
        order_status("M-1", "created")
    );
    assert_eq!(
        amqp(&d, "orders", "k", &[("x-order-id", "H-1")], "binary"),
        order("H-1")
    );
    assert_eq!(
        amqp(&d, "orders", "k", &[("Order_ID", "H-2")], ""),
        order("H-2")
    );
}

#[test]
fn config_rules_come_first_and_may_name_any_attribute() {
    let r = rules(
        true,
        &[
            "{attribute: customer.id, query: customer}",
            "{attribute: order.id, path: '/api/v2/purchases/{p}'}",
            "{attribute: tenant, header: X-Tenant, in: response}",
            "{attribute: model.file, json: 'items[*].model', in: request}",
            "{attribute: first.sku, json: 'items[0].sku'}",
        ],
    );
    let found = http("POST", "/api/v2/purchases/P-5?customer=c%407")
        .req_header("X-Tenant", "not-this-side")
        .resp_header("X-Tenant", "t1")
        .req_body(r#"{"items": [{"sku": "s1"}, {"model": "cube.stl", "sku": "s2"}], "order_id": "default"}"#)
        .found(&r, "shop");
    assert_eq!(
        found,
        [
            ("customer.id", "c@7"),
            ("order.id", "P-5"),
            ("tenant", "t1"),
            ("model.file", "cube.stl"),
            ("first.sku", "s1"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
    );
}

#[test]
fn restrictions_limit_where_a_rule_applies() {
    let r = rules(
        false,
        &[
            "{attribute: a, query: q, service: shop}",
            "{attribute: b, query: q, method: post}",
            "{attribute: c, query: q, route: '/api/**'}",
            "{attribute: d, json: v, exchange: orders, routing_key: 'order.*'}",
            "{attribute: e, amqp_header: h, method: GET}",
        ],
    );
    let names =
        |found: Vec<(String, String)>| found.into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    assert_eq!(
        names(http("POST", "/api/x?q=1").found(&r, "shop")),
        ["a", "b", "c"]
    );
    assert_eq!(
        names(http("GET", "/x?q=1").found(&r, "crm")),
        Vec::<String>::new()
    );
    assert_eq!(
        names(amqp(
            &r,
            "orders",
            "order.new",
            &[("h", "1")],
            r#"{"v": 1}"#
        )),
        ["d"]
    );
    assert!(amqp(&r, "orders", "order.new.eu", &[], r#"{"v": 1}"#).is_empty());
    assert!(amqp(&r, "other", "order.new", &[], r#"{"v": 1}"#).is_empty());
}

#[test]
fn without_defaults_only_the_files_rules_apply() {
    let r = rules(false, &[]);
    assert!(
        http("GET", "/orders/42?order_id=1")
            .found(&r, "s")
            .is_empty()
    );
}

#[test]
fn values_are_trimmed_and_bounded() {
    let long = "x".repeat(1000);
    let body = format!(r#"{{"order_id": "  {long}  "}}"#);
    let found = http("POST", "/x").req_body(&body).found(&defaults(), "s");
    assert_eq!(found[0].1.len(), MAX_VALUE_LEN);
    assert!(
        http("POST", "/x")
            .req_body(r#"{"order_id": "  "}"#)
            .found(&defaults(), "s")
            .is_empty()
    );
}

#[test]
fn bad_rules_are_refused_with_the_reason() {
    for (rule, why) in [
        ("{query: a, header: b}", "names query and header"),
        ("{attribute: x}", "names none"),
        ("{path: '/a/{x}/{y}'}", "say which with `capture`"),
        ("{path: '/a/b'}", "no {placeholder}"),
        ("{path: '/a/{x}', capture: y}", "not a placeholder"),
        ("{query: a, in: request}", "`in` goes with"),
        ("{header: a, in: message}", "amqp_header"),
        ("{attribute: 'a b', query: q}", "names are letters"),
        ("{json: a, in: sideways}", "unknown variant"),
        ("{json: a, routing_key: 'a.#.#.#'}", "at most 2"),
    ] {
        let yaml = format!("business:\n  rules:\n    - {rule}\n");
        let err = Settings::parse(&yaml).unwrap_err();
        assert!(err.contains("line 3") && err.contains(why), "{rule}: {err}");
    }
}

proptest::proptest! {
    #[test]
    fn any_bodies_and_targets_give_bounded_values_without_panic(
        body in proptest::collection::vec(proptest::num::u8::ANY, 0..256),
        text in "[{}\\[\\]\":,a-z0-9_ ]{0,200}",
    ) {
        let d = defaults();
        let mut ex = http("POST", "/orders/%ff%fe?order_id=%zz");
        ex.req_body = body;
        ex.resp_body = text.into_bytes();
        for (_, v) in ex.found(&d, "s") {
            proptest::prop_assert!(v.len() <= MAX_VALUE_LEN);
        }
    }
}
