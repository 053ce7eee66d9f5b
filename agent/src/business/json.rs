//! JSON paths (`order.items[0].id`, `items[*].id`, `..orderId`) and a lenient scanner
//! that finds the scalars of a body the rules ask for.
//!
//! Written by hand because bodies arrive as a captured prefix: a body cut anywhere
//! must still give every field that was captured whole, which a JSON library (which
//! answers a truncated document with an error and nothing else) does not do. The scanner
//! walks the bytes once, keeps only the path to the current value, stops at the first
//! byte that is not JSON or at the end of the prefix, and never reports a value that may
//! have been cut (a number or literal that touches the end of the prefix). Work is
//! linear in the body's length and nesting is bounded ([`MAX_DEPTH`]).

use std::borrow::Cow;

/// Deepest nesting followed; the scanner stops at a deeper value.
pub const MAX_DEPTH: usize = 32;
/// Longest JSON path accepted in a rule, in steps.
const MAX_PATH_STEPS: usize = 16;

/// One step of the path to a value in a document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seg<'a> {
    Key(Cow<'a, str>),
    Index(usize),
}

/// One step of a rule's path.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
    /// `[*]`: any element of an array.
    AnyIndex,
}

/// A path to a value: `a.b`, `a[0].b`, `a[*].b`, `a["odd.key"]`; a leading `..` lets it
/// start at any depth (`..order.id` is an `id` under an `order` object anywhere).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonPath {
    steps: Vec<Step>,
    anywhere: bool,
}

impl JsonPath {
    /// The name of the field the path ends in, unless it ends in an array index.
    pub fn last_key(&self) -> Option<&str> {
        match self.steps.last()? {
            Step::Key(k) => Some(k),
            Step::Index(_) | Step::AnyIndex => None,
        }
    }

    /// Parses a path, or says what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (anywhere, mut rest) = match text.strip_prefix("..") {
            Some(r) => (true, r),
            None => (false, text.strip_prefix("$.").unwrap_or(text)),
        };
        let bad = |why: &str| Err(format!("JSON path {text:?}: {why}"));
        let mut steps = Vec::new();
        let mut expect_key = true;
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix('[') {
                let Some(end) = after.find(']') else {
                    return bad("a `[` is not closed");
                };
                let inner = &after[..end];
                let step = if inner == "*" {
                    Step::AnyIndex
                } else if let Some(key) = inner.strip_prefix('"').and_then(|k| k.strip_suffix('"'))
                {
                    Step::Key(key.to_owned())
                } else if let Ok(i) = inner.parse::<usize>() {
                    Step::Index(i)
                } else {
                    return bad("inside [] goes an index, * or a quoted key");
                };
                steps.push(step);
                rest = &after[end + 1..];
                expect_key = false;
                continue;
            }
            if !expect_key {
                match rest.strip_prefix('.') {
                    Some(r) => rest = r,
                    None => return bad("steps are separated by `.`"),
                }
            }
            let end = rest.find(['.', '[']).unwrap_or(rest.len());
            if end == 0 {
                return bad("a key is empty");
            }
            steps.push(Step::Key(rest[..end].to_owned()));
            rest = &rest[end..];
            expect_key = false;
        }
        if steps.is_empty() {
            return bad("it names no field");
        }
        if steps.len() > MAX_PATH_STEPS {
            return bad("it is longer than 16 steps");
        }
        Ok(JsonPath { steps, anywhere })
    }

    /// Whether the value at `path` is one this path names.
    pub fn matches(&self, path: &[Seg<'_>]) -> bool {
        let tail = match self.anywhere {
            true if path.len() >= self.steps.len() => &path[path.len() - self.steps.len()..],
            false if path.len() == self.steps.len() => path,
            _ => return false,
        };
        self.steps
            .iter()
            .zip(tail)
            .all(|(step, seg)| match (step, seg) {
                (Step::Key(k), Seg::Key(s)) => k == s,
                (Step::Index(i), Seg::Index(j)) => i == j,
                (Step::AnyIndex, Seg::Index(_)) => true,
                _ => false,
            })
    }
}

/// A scalar the scanner found.
#[derive(Debug)]
pub struct Scalar<'s, 'a> {
    /// The path from the document's root to the value.
    pub path: &'s [Seg<'a>],
    /// Which object of the document holds it (numbered in the order they open), `None`
    /// for an array element or a top-level scalar.
    pub object: Option<u32>,
    /// Strings unescaped; numbers as written; `true`/`false`. `null` is not reported.
    pub value: Cow<'a, str>,
}

enum Frame {
    Object(u32),
    Array(usize),
}

/// Calls `visit` with every scalar of the JSON document that starts `body`, in document
/// order, up to the end of the document, the first byte that is not JSON, or the end of
/// `body` (a value cut there is not reported).
pub fn scan<'a>(body: &'a [u8], mut visit: impl FnMut(&Scalar<'_, 'a>)) {
    let mut c = Cursor { b: body, i: 0 };
    let mut path: Vec<Seg<'a>> = Vec::new();
    let mut frames: Vec<Frame> = Vec::new();
    let mut objects = 0u32;
    'value: loop {
        c.skip_ws();
        let Some(first) = c.peek() else { return };
        match first {
            b'{' | b'[' => {
                c.i += 1;
                if frames.len() >= MAX_DEPTH {
                    return;
                }
                c.skip_ws();
                if first == b'{' {
                    frames.push(Frame::Object(objects));
                    objects = objects.saturating_add(1);
                    if c.peek() == Some(b'}') {
                        c.i += 1;
                        frames.pop();
                    } else {
                        let Some(key) = c.key() else { return };
                        path.push(Seg::Key(key));
                        continue 'value;
                    }
                } else {
                    frames.push(Frame::Array(0));
                    if c.peek() == Some(b']') {
                        c.i += 1;
                        frames.pop();
                    } else {
                        path.push(Seg::Index(0));
                        continue 'value;
                    }
                }
            }
            b'"' => {
                let Some(value) = c.string() else { return };
                visit(&Scalar {
                    path: &path,
                    object: holder(&frames),
                    value,
                });
            }
            _ => {
                let Some(literal) = c.literal() else { return };
                if literal != "null" {
                    visit(&Scalar {
                        path: &path,
                        object: holder(&frames),
                        value: Cow::Borrowed(literal),
                    });
                }
            }
        }
        // A value is complete: go on in the container that holds it.
        loop {
            let Some(frame) = frames.last_mut() else {
                return;
            };
            c.skip_ws();
            let Some(next) = c.peek() else { return };
            c.i += 1;
            match (frame, next) {
                (Frame::Object(_), b',') => {
                    path.pop();
                    c.skip_ws();
                    let Some(key) = c.key() else { return };
                    path.push(Seg::Key(key));
                    continue 'value;
                }
                (Frame::Array(index), b',') => {
                    *index += 1;
                    if let Some(last) = path.last_mut() {
                        *last = Seg::Index(*index);
                    }
                    continue 'value;
                }
                (Frame::Object(_), b'}') | (Frame::Array(_), b']') => {
                    path.pop();
                    frames.pop();
                }
                _ => return,
            }
        }
    }
}

fn holder(frames: &[Frame]) -> Option<u32> {
    match frames.last() {
        Some(Frame::Object(id)) => Some(*id),
        _ => None,
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\r' | b'\n')) {
            self.i += 1;
        }
    }

    /// A key and the `:` after it.
    fn key(&mut self) -> Option<Cow<'a, str>> {
        let key = self.string()?;
        self.skip_ws();
        (self.peek()? == b':').then(|| self.i += 1)?;
        Some(key)
    }

    /// A string starting at the cursor, unescaped; `None` if it is cut or malformed.
    fn string(&mut self) -> Option<Cow<'a, str>> {
        if self.peek()? != b'"' {
            return None;
        }
        let start = self.i + 1;
        let mut j = start;
        let mut escaped = false;
        loop {
            match *self.b.get(j)? {
                b'"' => break,
                b'\\' => {
                    escaped = true;
                    j += 2;
                }
                _ => j += 1,
            }
        }
        let raw = &self.b[start..j];
        self.i = j + 1;
        if !escaped {
            return Some(String::from_utf8_lossy(raw));
        }
        unescape(raw).map(Cow::Owned)
    }

    /// A number, `true`, `false` or `null`; `None` when it runs to the end of the bytes
    /// (it may have been cut) or is none of those.
    fn literal(&mut self) -> Option<&'a str> {
        let start = self.i;
        while matches!(
            self.peek(),
            Some(b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z' | b'+' | b'-' | b'.')
        ) {
            self.i += 1;
        }
        if self.i == self.b.len() || self.i == start {
            return None;
        }
        let text = std::str::from_utf8(&self.b[start..self.i]).ok()?;
        let number = text.starts_with(|c: char| c == '-' || c.is_ascii_digit())
            && text.parse::<f64>().is_ok();
        (number || matches!(text, "true" | "false" | "null")).then_some(text)
    }
}

/// The text of a string's raw bytes (between the quotes) with escapes resolved; lone
/// surrogates become U+FFFD.
fn unescape(raw: &[u8]) -> Option<String> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        if raw[i] != b'\\' {
            out.push(raw[i]);
            i += 1;
            continue;
        }
        let c = *raw.get(i + 1)?;
        i += 2;
        let simple = match c {
            b'"' => b'"',
            b'\\' => b'\\',
            b'/' => b'/',
            b'b' => 8,
            b'f' => 12,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'u' => {
                let hex = |at: usize| -> Option<u32> {
                    let h = std::str::from_utf8(raw.get(at..at + 4)?).ok()?;
                    u32::from_str_radix(h, 16).ok()
                };
                let mut code = hex(i)?;
                i += 4;
                if (0xD800..0xDC00).contains(&code)
                    && raw.get(i..i + 2) == Some(b"\\u")
                    && let Some(low) = hex(i + 2).filter(|l| (0xDC00..0xE000).contains(l))
                {
                    code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
                    i += 6;
                }
                let ch = char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER);
                let mut buf = [0; 4];
                out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                continue;
            }
            _ => return None,
        };
        out.push(simple);
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalars(body: &str) -> Vec<(String, Option<u32>, String)> {
        let mut out = Vec::new();
        scan(body.as_bytes(), |s| {
            let path = s
                .path
                .iter()
                .map(|seg| match seg {
                    Seg::Key(k) => format!(".{k}"),
                    Seg::Index(i) => format!("[{i}]"),
                })
                .collect::<String>();
            out.push((path, s.object, s.value.to_string()));
        });
        out
    }

    fn path_matches(path: &str, body: &str) -> Vec<String> {
        let p = JsonPath::parse(path).unwrap();
        let mut out = Vec::new();
        scan(body.as_bytes(), |s| {
            if p.matches(s.path) {
                out.push(s.value.to_string());
            }
        });
        out
    }

    #[test]
    fn every_scalar_is_found_with_its_path_and_object() {
        let body = r#"{"order": {"id": 42, "status": "paid", "tags": ["a", true, null]},
                       "items": [{"id": "x"}, {"id": -1.5e3}], "empty": {}, "none": []}"#;
        assert_eq!(
            scalars(body),
            vec![
                (".order.id".into(), Some(1), "42".into()),
                (".order.status".into(), Some(1), "paid".into()),
                (".order.tags[0]".into(), None, "a".into()),
                (".order.tags[1]".into(), None, "true".into()),
                (".items[0].id".into(), Some(2), "x".into()),
                (".items[1].id".into(), Some(3), "-1.5e3".into()),
            ]
        );
    }

    #[test]
    fn paths_name_nested_fields_array_elements_and_any_depth() {
        let body = r#"{"a": {"b": [{"c": 1}, {"c": 2}]}, "order": {"id": "o-7"}, "x": {"order": {"id": 8}}}"#;
        assert_eq!(path_matches("a.b[1].c", body), ["2"]);
        assert_eq!(path_matches("a.b[*].c", body), ["1", "2"]);
        assert_eq!(path_matches("$.order.id", body), ["o-7"]);
        assert_eq!(path_matches("..order.id", body), ["o-7", "8"]);
        assert_eq!(path_matches("order[\"id\"]", body), ["o-7"]);
        assert!(path_matches("b.c", body).is_empty());
    }

    #[test]
    fn bad_paths_say_what_is_wrong() {
        for (path, why) in [
            ("", "names no field"),
            ("a..b", "key is empty"),
            ("a[x]", "inside []"),
            ("a[0", "not closed"),
            ("a[0]b", "separated by"),
        ] {
            let err = JsonPath::parse(path).unwrap_err();
            assert!(err.contains(why), "{path}: {err}");
        }
    }

    #[test]
    fn escapes_are_resolved_in_keys_and_values() {
        let body = r#"{"k\u0065y": "a\"b\\c\n\u00e9\ud83d\ude00", "e": "\ud800x"}"#;
        let found = scalars(body);
        assert_eq!(found[0].0, ".key");
        assert_eq!(found[0].2, "a\"b\\c\né😀");
        assert_eq!(found[1].2, "\u{fffd}x");
    }

    #[test]
    fn a_cut_body_gives_the_fields_captured_whole_and_never_a_cut_value() {
        let body = r#"{"order_id": "A-1", "count": 12345, "status": "printing", "note": "long"}"#;
        let whole = scalars(body);
        for cut in 0..body.len() {
            let part = scalars(&body[..cut]);
            assert!(whole.starts_with(&part), "cut at {cut}: {part:?}");
            for (_, _, v) in &part {
                assert!(whole.iter().any(|(_, _, w)| w == v), "cut at {cut}: {v}");
            }
        }
        assert_eq!(scalars(&body[..30]).len(), 1);
        assert_eq!(
            scalars(&body[..34]).len(),
            1,
            "12345 cut to 123 is not reported"
        );
        assert_eq!(scalars(&body[..35]).len(), 2);
    }

    #[test]
    fn garbage_ends_the_scan_without_harm() {
        assert!(scalars("not json").is_empty());
        assert_eq!(scalars(r#"{"a": 1, oops}"#).len(), 1);
        assert_eq!(scalars(r#"{"a": tru, "b": 2}"#).len(), 0);
        assert_eq!(scalars("[1, 2] trailing").len(), 2);
        let deep = "[".repeat(10_000) + "1" + &"]".repeat(10_000);
        assert!(scalars(&deep).is_empty());
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_scan_without_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            scan(&bytes, |_| {});
        }

        #[test]
        fn any_prefix_of_a_document_reports_a_prefix_of_its_scalars(
            keys in proptest::collection::vec("[a-z_]{1,6}", 1..8),
            cut in 0usize..400,
        ) {
            let body = format!(
                "{{{}}}",
                keys.iter().enumerate()
                    .map(|(i, k)| format!("\"{k}\": {{\"v\": [{i}, \"s{i}\"]}}"))
                    .collect::<Vec<_>>().join(", ")
            );
            let whole = scalars(&body);
            let part = scalars(&body[..cut.min(body.len())]);
            proptest::prop_assert!(whole.starts_with(&part));
        }
    }
}
