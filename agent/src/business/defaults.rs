//! The rules in force with no config file: `order.id` from the common spellings of an
//! order id in paths, query strings, headers and JSON bodies, and `order.status` from a
//! status field in the same JSON object as an order id (never a bare `status` in a body
//! that has no order id).
//!
//! - path: a segment after `orders` or `order` that looks like an identifier
//!   (`/orders/42`, `/api/v1/orders/ORD-1234/status`; not `/orders/search`);
//! - query parameters `order_id`, `orderId`, `order-id`;
//! - headers `X-Order-Id`, `Order-Id` (request, then response), and `X-Order-Status`;
//! - JSON fields (at any depth, the shallowest first) `order_id`, `orderId`, `orderID`,
//!   `OrderId`, `order-id`, and `id` inside an `order` object;
//! - AMQP headers with the same names as the JSON fields, and `x-order-id`.

use std::sync::LazyLock;

use super::{
    ORDER_ID, ORDER_STATUS,
    json::{JsonPath, Seg},
    pattern::Pattern,
    rule::{Rule, Source},
};

/// JSON fields (and AMQP headers) that hold an order id.
const ORDER_ID_KEYS: [&str; 5] = ["order_id", "orderId", "orderID", "OrderId", "order-id"];
/// Query parameters that hold an order id.
const ORDER_ID_PARAMS: [&str; 3] = ["order_id", "orderId", "order-id"];
/// Fields beside an order id that hold its status.
pub(super) const STATUS_KEYS: [&str; 4] = ["status", "order_status", "orderStatus", "OrderStatus"];

/// Whether a JSON value at `path` is a default order id field.
pub(super) fn is_order_id_field(path: &[Seg<'_>]) -> bool {
    match path {
        [.., Seg::Key(parent), Seg::Key(id)] if parent == "order" && id == "id" => true,
        [.., Seg::Key(k)] => ORDER_ID_KEYS.contains(&k.as_ref()),
        _ => false,
    }
}

/// The default rules, in the order they are tried.
pub(super) fn rules() -> &'static [Rule] {
    static RULES: LazyLock<Vec<Rule>> = LazyLock::new(build);
    &RULES
}

fn build() -> Vec<Rule> {
    let mut rules = Vec::new();
    for template in ["/**/orders/{id}/**", "/**/order/{id}/**"] {
        let pattern = Pattern::path(template).expect("default template is valid");
        let mut rule = Rule::default_rule(
            ORDER_ID,
            Source::Path {
                pattern,
                capture: 0,
            },
        );
        rule.identifiers_only = true;
        rules.push(rule);
    }
    for p in ORDER_ID_PARAMS {
        rules.push(Rule::default_rule(ORDER_ID, Source::Query(p.to_owned())));
    }
    for (attribute, header) in [
        (ORDER_ID, "x-order-id"),
        (ORDER_ID, "order-id"),
        (ORDER_STATUS, "x-order-status"),
    ] {
        rules.push(Rule::default_rule(
            attribute,
            Source::Header {
                name: header.to_owned(),
                side: None,
            },
        ));
    }
    for key in ORDER_ID_KEYS.iter().chain(&["x-order-id"]) {
        rules.push(Rule::default_rule(
            ORDER_ID,
            Source::AmqpHeader((*key).to_owned()),
        ));
    }
    // One rule for every spelling, so that the shallowest field wins whatever its
    // spelling (a top-level `orderId` over an `order_id` deep in a list of items).
    let paths = ORDER_ID_KEYS
        .iter()
        .map(|k| format!("..{k}"))
        .chain(["..order.id".to_owned()])
        .map(|p| JsonPath::parse(&p).expect("default JSON path is valid"))
        .collect();
    rules.push(Rule::default_rule(
        ORDER_ID,
        Source::Json { paths, side: None },
    ));
    rules
}
