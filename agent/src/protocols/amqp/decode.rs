//! Frame payloads to values: method and content-header payloads are decoded with
//! amq-protocol; what sonde keeps of them (strings, the headers table as text) is
//! converted here.
//!
//! amq-protocol's field-table parser recurses once per nested table or array, with no
//! limit. A crafted payload of a few kilobytes could nest deeply enough to overflow the
//! agent's stack, so a payload is handed to it only when it cannot hold more than
//! [`MAX_NESTED_CONTAINERS`] nested tables or arrays (see [`nesting_is_bounded`]).

use amq_protocol::{
    frame::parsing::parse_content_header,
    protocol::{AMQPClass, parse_class},
    types::{AMQPValue, FieldTable},
};

use super::Properties;

/// Most candidate nested tables or arrays in one payload handed to amq-protocol.
pub(super) const MAX_NESTED_CONTAINERS: usize = 64;
/// Most headers kept per message.
pub(super) const MAX_HEADERS: usize = 64;
/// Longest header value kept, in bytes (longer ones are cut at a character boundary).
pub(super) const MAX_HEADER_VALUE: usize = 1024;

/// Decodes a method frame's payload, `None` when it is not a well-formed method.
pub(super) fn method(payload: &[u8]) -> Option<AMQPClass> {
    if !nesting_is_bounded(payload) {
        return None;
    }
    match parse_class(payload) {
        Ok(([], class)) => Some(class),
        _ => None,
    }
}

/// A content header: class id, declared body size, properties.
pub(super) struct ContentHeader {
    pub class_id: u16,
    pub body_size: u64,
    pub properties: Properties,
}

/// Decodes a content-header frame's payload.
pub(super) fn content_header(payload: &[u8]) -> Option<ContentHeader> {
    if !nesting_is_bounded(payload) {
        return None;
    }
    match parse_content_header(payload) {
        Ok(([], h)) => {
            let p = &h.properties;
            let s = |v: &Option<amq_protocol::types::ShortString>| {
                v.as_ref().map(|s| s.as_str().to_owned())
            };
            Some(ContentHeader {
                class_id: h.class_id,
                body_size: h.body_size,
                properties: Properties {
                    content_type: s(p.content_type()),
                    content_encoding: s(p.content_encoding()),
                    headers: p.headers().as_ref().map(headers).unwrap_or_default(),
                    delivery_mode: *p.delivery_mode(),
                    priority: *p.priority(),
                    correlation_id: s(p.correlation_id()),
                    reply_to: s(p.reply_to()),
                    expiration: s(p.expiration()),
                    message_id: s(p.message_id()),
                    timestamp: *p.timestamp(),
                    kind: s(p.kind()),
                    user_id: s(p.user_id()),
                    app_id: s(p.app_id()),
                },
            })
        }
        _ => None,
    }
}

/// Whether amq-protocol's recursion on `payload` stays shallow. Descending into a nested
/// table or array needs a type octet `F` or `A` followed by a 32-bit length that fits
/// in the rest of the payload; counting those positions bounds the depth from above.
/// Text rarely passes: the length would need three leading zero octets.
pub(super) fn nesting_is_bounded(payload: &[u8]) -> bool {
    let mut candidates = 0;
    for (i, window) in payload.windows(5).enumerate() {
        if window[0] == b'F' || window[0] == b'A' {
            let len = u32::from_be_bytes([window[1], window[2], window[3], window[4]]) as usize;
            if len <= payload.len() - i - 5 {
                candidates += 1;
                if candidates > MAX_NESTED_CONTAINERS {
                    return false;
                }
            }
        }
    }
    true
}

/// A field table as `(name, value as text)` pairs, in name order, bounded.
pub(super) fn headers(table: &FieldTable) -> Vec<(String, String)> {
    table
        .inner()
        .iter()
        .take(MAX_HEADERS)
        .map(|(k, v)| {
            let mut text = String::new();
            value_text(v, &mut text);
            (k.as_str().to_owned(), text)
        })
        .collect()
}

/// Appends `v` as text to `out`, stopping at [`MAX_HEADER_VALUE`] bytes.
fn value_text(v: &AMQPValue, out: &mut String) {
    use std::fmt::Write;
    if out.len() >= MAX_HEADER_VALUE {
        return;
    }
    let start = out.len();
    match v {
        AMQPValue::Boolean(b) => write!(out, "{b}").ok(),
        AMQPValue::ShortShortInt(n) => write!(out, "{n}").ok(),
        AMQPValue::ShortShortUInt(n) => write!(out, "{n}").ok(),
        AMQPValue::ShortInt(n) => write!(out, "{n}").ok(),
        AMQPValue::ShortUInt(n) => write!(out, "{n}").ok(),
        AMQPValue::LongInt(n) => write!(out, "{n}").ok(),
        AMQPValue::LongUInt(n) => write!(out, "{n}").ok(),
        AMQPValue::LongLongInt(n) => write!(out, "{n}").ok(),
        AMQPValue::Float(n) => write!(out, "{n}").ok(),
        AMQPValue::Double(n) => write!(out, "{n}").ok(),
        AMQPValue::DecimalValue(d) => write!(out, "{}", decimal(d.scale, d.value)).ok(),
        AMQPValue::ShortString(s) => write!(out, "{}", s.as_str()).ok(),
        AMQPValue::LongString(s) => write!(out, "{}", String::from_utf8_lossy(s.as_bytes())).ok(),
        AMQPValue::Timestamp(t) => write!(out, "{t}").ok(),
        AMQPValue::ByteArray(b) => write!(out, "{}", String::from_utf8_lossy(b.as_slice())).ok(),
        AMQPValue::Void => None,
        AMQPValue::FieldArray(a) => {
            out.push('[');
            for (i, item) in a.as_slice().iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                value_text(item, out);
            }
            out.push(']');
            None
        }
        AMQPValue::FieldTable(t) => {
            out.push('{');
            for (i, (k, item)) in t.inner().iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(k.as_str());
                out.push_str(": ");
                value_text(item, out);
            }
            out.push('}');
            None
        }
    };
    if start == 0 && out.len() > MAX_HEADER_VALUE {
        let mut cut = MAX_HEADER_VALUE;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
}

/// An AMQP decimal (`value` × 10^-`scale`) as text.
fn decimal(scale: u8, value: u32) -> String {
    let digits = value.to_string();
    let scale = usize::from(scale);
    if scale == 0 {
        digits
    } else if digits.len() > scale {
        format!(
            "{}.{}",
            &digits[..digits.len() - scale],
            &digits[digits.len() - scale..]
        )
    } else {
        format!("0.{}{digits}", "0".repeat(scale - digits.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_are_written_with_their_scale() {
        assert_eq!(decimal(0, 42), "42");
        assert_eq!(decimal(2, 1234), "12.34");
        assert_eq!(decimal(3, 5), "0.005");
    }

    #[test]
    fn deep_nesting_is_refused_before_parsing() {
        // Each level: key "k", type 'F', 32-bit length of the rest.
        let depth = 5000;
        let mut inner: Vec<u8> = Vec::new();
        for _ in 0..depth {
            let mut level = vec![1, b'k', b'F'];
            level.extend_from_slice(&(inner.len() as u32).to_be_bytes());
            level.extend_from_slice(&inner);
            inner = level;
        }
        let mut payload = vec![0, 50, 0, 10]; // queue.declare
        payload.extend_from_slice(&[0, 0, 1, b'q', 0]);
        payload.extend_from_slice(&(inner.len() as u32).to_be_bytes());
        payload.extend_from_slice(&inner);
        assert!(!nesting_is_bounded(&payload));
        assert!(method(&payload).is_none());
    }

    #[test]
    fn moderate_nesting_parses() {
        let mut inner: Vec<u8> = Vec::new();
        for _ in 0..MAX_NESTED_CONTAINERS {
            let mut level = vec![1, b'k', b'F'];
            level.extend_from_slice(&(inner.len() as u32).to_be_bytes());
            level.extend_from_slice(&inner);
            inner = level;
        }
        let mut payload = vec![0, 50, 0, 10, 0, 0, 1, b'q', 0];
        payload.extend_from_slice(&(inner.len() as u32).to_be_bytes());
        payload.extend_from_slice(&inner);
        assert!(matches!(method(&payload), Some(AMQPClass::Queue(_))));
    }
}
