//! Redaction, on by default: secrets and payment card numbers never leave the node.
//!
//! Every span passes through [`Redactor::span`] on its way to the exporters (the
//! pipeline wraps its sink), so every attribute is covered, `url.full` and `url.query`
//! included, and the resource's attributes and the span's name and status too. A value
//! is redacted when:
//! - its attribute's name is a secret name (`user.password`, `http.request.header.cookie`);
//! - it came from a secret header (`Authorization`, `Cookie`, `Set-Cookie`,
//!   `Proxy-Authorization`, API-key style names) or from a query parameter, JSON field
//!   or AMQP header with a secret name (the business rules ask [`Redactor`] before they
//!   keep a value);
//! - inside any text: the value of a `name=value`, `name: value` or `"name": "value"`
//!   pair whose name is a secret name (query strings, command-line arguments,
//!   form-like text), the credential after `Bearer`/`Basic`/`Digest`, the password of
//!   a URL's user info, and digit runs that are payment card numbers (13 to 19 digits,
//!   spaces or dashes allowed between groups, a card network's leading digits, Luhn
//!   checksum right).
//!
//! Names are compared without case and without `-`, `_`, `.` and spaces, and a name is
//! secret when it contains one of the secret words (`password`, `token`, `secret`,
//! `apikey`, `cardnumber`...): `X-Auth-Token`, `api_key` and `cardNumber` all are. The
//! config file's `redaction:` section adds words and header names, or turns parts off.
//! The redacted text is replaced by [`REDACTED`]; the rest of the value stays, so that
//! `url.query` still shows which parameters were sent.
//!
//! Written by hand: the scanners are small, run on short attribute values, and no crate
//! does this combination (key/value pairs in free text, card numbers with Luhn).

use serde::Deserialize;

use crate::spans::{KeyValue, Span, Status, Value};

/// What a redacted value, or part of a value, is replaced by.
pub const REDACTED: &str = "[REDACTED]";

/// Words that make a name secret (compared after [`normalize`]).
const SECRET_WORDS: &[&str] = &[
    "password",
    "passwd",
    "passphrase",
    "pwd",
    "secret",
    "token",
    "apikey",
    "accesskey",
    "privatekey",
    "authorization",
    "credential",
    "cardnumber",
    "cardno",
    "ccnumber",
    "creditcard",
    "cvv",
    "cvc",
    "sessionid",
    "cookie",
];

/// Header names whose values are secrets whatever their words (lower case).
const SECRET_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "api-key",
    "x-amz-security-token",
];

/// Authentication schemes whose credential follows them in a header value.
const AUTH_SCHEMES: &[&str] = &["bearer", "basic", "digest", "negotiate", "token"];

/// The `redaction:` section of the config file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedactionConfig {
    /// Off only for debugging on a machine whose data may be seen by anyone.
    pub enabled: bool,
    /// Keep the built-in secret words and header names beside the file's own.
    pub defaults: bool,
    /// More words that make a query parameter, JSON field, AMQP header, argument or
    /// attribute name secret (`ssn`, `iban`).
    pub names: Vec<Name>,
    /// More header names whose values are secrets (`X-Signature`).
    pub headers: Vec<Name>,
    /// Redact payment card numbers wherever they appear.
    pub card_numbers: bool,
}

impl Default for RedactionConfig {
    fn default() -> Self {
        RedactionConfig {
            enabled: true,
            defaults: true,
            names: Vec::new(),
            headers: Vec::new(),
            card_numbers: true,
        }
    }
}

/// A name in the `redaction:` section: not empty once `-`, `_`, `.` and spaces go.
#[derive(Clone, Debug, Deserialize)]
#[serde(try_from = "String")]
pub struct Name(String);

impl TryFrom<String> for Name {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        if normalize(&s).is_empty() {
            return Err(format!(
                "redaction name {s:?} is empty: give a word such as `ssn`"
            ));
        }
        Ok(Name(s))
    }
}

/// Decides what is secret and replaces it.
#[derive(Clone, Debug)]
pub struct Redactor {
    enabled: bool,
    /// Normalized.
    words: Vec<String>,
    /// Lower case.
    headers: Vec<String>,
    card_numbers: bool,
    /// Attribute keys already judged, by address and length ([`Redactor::is_secret_key`]).
    keys: std::sync::Arc<KeyCache>,
    /// Names already judged ([`Redactor::is_secret_name`]).
    names: std::sync::Arc<std::sync::Mutex<crate::FastMap<String, bool>>>,
    /// Resources already redacted, by address: (the original, its redacted copy if it
    /// needed one, values changed).
    resources: std::sync::Arc<std::sync::Mutex<crate::FastMap<usize, CachedResource>>>,
}

/// Answers of [`Redactor::is_secret_key`] by the key's address and length, read without
/// a lock: it is asked for every attribute of every span. Open addressing over atomics;
/// a slot holds `address << 16 | length << 2 | secret << 1 | 1` (0 is empty). Keys
/// that do not fit (an address of more than 48 bits, a length of 16 KiB or more) or
/// find no slot are judged again each time.
#[derive(Debug)]
struct KeyCache {
    slots: Box<[std::sync::atomic::AtomicU64]>,
}

impl KeyCache {
    const SLOTS: usize = 1024;
    const PROBES: usize = 8;

    fn new() -> Self {
        KeyCache {
            slots: (0..Self::SLOTS)
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
        }
    }

    /// The slot value for `key` with the secret bit clear, if it fits.
    fn tag(key: &str) -> Option<u64> {
        let address = key.as_ptr() as u64;
        (address < 1 << 48 && key.len() < 1 << 14)
            .then_some(address << 16 | (key.len() as u64) << 2 | 1)
    }

    fn home(tag: u64) -> usize {
        // Fibonacci hashing of the address bits.
        ((tag >> 16).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 54) as usize % Self::SLOTS
    }

    fn get(&self, key: &str) -> Option<bool> {
        use std::sync::atomic::Ordering::Relaxed;
        let tag = Self::tag(key)?;
        let home = Self::home(tag);
        for i in 0..Self::PROBES {
            let v = self.slots[(home + i) % Self::SLOTS].load(Relaxed);
            if v == 0 {
                return None;
            }
            if v & !2 == tag {
                return Some(v & 2 != 0);
            }
        }
        None
    }

    fn insert(&self, key: &str, secret: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(tag) = Self::tag(key) else {
            return;
        };
        let value = tag | u64::from(secret) << 1;
        let home = Self::home(tag);
        for i in 0..Self::PROBES {
            match self.slots[(home + i) % Self::SLOTS].compare_exchange(0, value, Relaxed, Relaxed)
            {
                Ok(_) => return,
                Err(v) if v & !2 == tag => return,
                Err(_) => {}
            }
        }
    }
}

type CachedResource = (
    std::sync::Arc<crate::spans::Resource>,
    Option<std::sync::Arc<crate::spans::Resource>>,
    u64,
);

impl Default for Redactor {
    /// The built-in redaction, as with no config file.
    fn default() -> Self {
        Redactor::new(&RedactionConfig::default())
    }
}

impl Redactor {
    pub fn new(config: &RedactionConfig) -> Self {
        let builtin = |list: &[&str]| -> Vec<String> {
            if config.defaults {
                list.iter().map(|s| (*s).to_owned()).collect()
            } else {
                Vec::new()
            }
        };
        let mut words = builtin(SECRET_WORDS);
        words.extend(config.names.iter().map(|n| normalize(&n.0)));
        let mut headers = builtin(SECRET_HEADERS);
        headers.extend(
            config
                .headers
                .iter()
                .map(|n| n.0.trim().to_ascii_lowercase()),
        );
        Redactor {
            enabled: config.enabled,
            words,
            headers,
            card_numbers: config.card_numbers,
            keys: std::sync::Arc::new(KeyCache::new()),
            names: Default::default(),
            resources: Default::default(),
        }
    }

    /// Whether redaction is on at all.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether a query parameter, JSON field, argument or attribute with this name
    /// carries a secret.
    pub fn is_secret_name(&self, name: &str) -> bool {
        if !self.enabled {
            return false;
        }
        // Rules ask about the same few names for every exchange: remembered (bounded).
        if let Ok(known) = self.names.lock()
            && let Some(&secret) = known.get(name)
        {
            return secret;
        }
        let secret = self.judge_name(name);
        if name.len() <= 64
            && let Ok(mut known) = self.names.lock()
        {
            if known.len() >= 4096 {
                known.clear();
            }
            known.insert(name.to_owned(), secret);
        }
        secret
    }

    fn judge_name(&self, name: &str) -> bool {
        // Most names are short ASCII: normalized on the stack, no allocation (this runs
        // for every attribute of every span).
        let mut buf = [0u8; 96];
        let mut len = 0;
        for &c in name.as_bytes() {
            if matches!(c, b'-' | b'_' | b'.' | b' ' | b'[' | b']') {
                continue;
            }
            if !c.is_ascii() || len == buf.len() {
                let n = normalize(name);
                return !n.is_empty() && self.words.iter().any(|w| n.contains(w.as_str()));
            }
            buf[len] = c.to_ascii_lowercase();
            len += 1;
        }
        let n = &buf[..len];
        !n.is_empty()
            && self.words.iter().any(|w| {
                let w = w.as_bytes();
                w.len() <= n.len() && n.windows(w.len()).any(|x| x == w)
            })
    }

    /// As [`Redactor::is_secret_name`] for an attribute key: the agent's keys are a
    /// small fixed set of `&'static str`, so the answer is remembered by address.
    fn is_secret_key(&self, key: &'static str) -> bool {
        if let Some(secret) = self.keys.get(key) {
            return secret;
        }
        let secret = self.is_secret_name(key);
        self.keys.insert(key, secret);
        secret
    }

    /// Whether the values of this HTTP or AMQP header are secrets.
    pub fn is_secret_header(&self, name: &str) -> bool {
        self.enabled
            && (self
                .headers
                .iter()
                .any(|h| h.eq_ignore_ascii_case(name.trim()))
                || self.is_secret_name(name))
    }

    /// Redacts a span in place; the number of values changed.
    pub fn span(&self, span: &mut Span) -> u64 {
        if !self.enabled {
            return 0;
        }
        let mut changed = self.attributes(&mut span.attributes);
        if let Some(name) = self.text(&span.name) {
            span.name = name;
            changed += 1;
        }
        if let Status::Error(message) = &mut span.status
            && let Some(m) = self.text(message)
        {
            *message = m;
            changed += 1;
        }
        changed += self.resource(&mut span.resource);
        changed
    }

    /// A process's resource is shared by all its spans: redacted once, then the
    /// redacted one (or the same, when it has nothing secret) is reused by address. The
    /// original is kept, so its address cannot be reused by another while remembered.
    fn resource(&self, resource: &mut std::sync::Arc<crate::spans::Resource>) -> u64 {
        use std::sync::Arc;
        let id = Arc::as_ptr(resource) as usize;
        if let Ok(known) = self.resources.lock()
            && let Some((_, redacted, n)) = known.get(&id)
        {
            if let Some(r) = redacted {
                *resource = Arc::clone(r);
            }
            return *n;
        }
        let original = Arc::clone(resource);
        let needs = resource
            .attributes
            .iter()
            .any(|kv| self.value_would_change(kv.key, &kv.value));
        let (redacted, n) = if needs {
            let mut r = (*original).clone();
            let n = self.attributes(&mut r.attributes);
            (Some(Arc::new(r)), n)
        } else {
            (None, 0)
        };
        if let Some(r) = &redacted {
            *resource = Arc::clone(r);
        }
        if let Ok(mut known) = self.resources.lock() {
            if known.len() >= 4096 {
                known.clear();
            }
            known.insert(id, (original, redacted, n));
        }
        n
    }

    fn attributes(&self, attributes: &mut [KeyValue]) -> u64 {
        let mut changed = 0;
        for kv in attributes {
            if self.value_of(self.is_secret_key(kv.key), &mut kv.value) {
                changed += 1;
            }
        }
        changed
    }

    fn value_would_change(&self, key: &'static str, value: &Value) -> bool {
        self.value_of(self.is_secret_key(key), &mut value.clone())
    }

    /// Redacts one attribute's value; whether it changed.
    pub fn value(&self, key: &str, value: &mut Value) -> bool {
        self.value_of(self.is_secret_name(key), value)
    }

    /// As [`Redactor::value`], with `whole`: whether the key names a secret.
    fn value_of(&self, whole: bool, value: &mut Value) -> bool {
        if !self.enabled {
            return false;
        }
        match value {
            Value::Str(s) if whole => {
                if s == REDACTED {
                    return false;
                }
                *s = REDACTED.to_owned();
                true
            }
            Value::Str(s) => match self.text(s) {
                Some(t) => {
                    *s = t;
                    true
                }
                None => false,
            },
            Value::StrArray(items) if whole => {
                let before = items.clone();
                items.iter_mut().for_each(|s| *s = REDACTED.to_owned());
                *items != before
            }
            Value::StrArray(items) => self.args(items),
            Value::Int(_) | Value::Double(_) if whole => {
                *value = Value::Str(REDACTED.to_owned());
                true
            }
            // A card number has 13 digits or more.
            Value::Int(i) if self.card_numbers && i.unsigned_abs() >= 1_000_000_000_000 => {
                let digits = i.to_string();
                if is_card_number(digits.as_bytes()) {
                    *value = Value::Str(REDACTED.to_owned());
                    true
                } else {
                    false
                }
            }
            _ => false,
        }
    }

    /// Redacts a list of command-line arguments: each as text, and the argument after
    /// an option with a secret name (`--password hunter2`).
    pub fn args(&self, args: &mut [String]) -> bool {
        let mut changed = false;
        let mut next_is_secret = false;
        for arg in args.iter_mut() {
            if next_is_secret && arg != REDACTED && !arg.starts_with('-') {
                *arg = REDACTED.to_owned();
                changed = true;
                next_is_secret = false;
                continue;
            }
            next_is_secret = arg.starts_with('-') && !arg.contains('=') && self.is_secret_name(arg);
            if let Some(t) = self.text(arg) {
                *arg = t;
                changed = true;
            }
        }
        changed
    }

    /// `text` with its secrets replaced, or None when it has none.
    pub fn text(&self, text: &str) -> Option<String> {
        if !self.enabled || text.is_empty() {
            return None;
        }
        // What each finder needs, in one pass: most values (addresses, paths, methods)
        // have none of it, and are left at once.
        let (mut space, mut at, mut pair, mut digits) = (false, false, false, 0usize);
        for &c in text.as_bytes() {
            match c {
                b' ' => space = true,
                b'@' => at = true,
                b'=' | b':' => pair = true,
                b'0'..=b'9' => digits += 1,
                _ => {}
            }
        }
        let mut cuts: Vec<(usize, usize)> = Vec::new();
        if pair {
            self.pairs(text, &mut cuts);
        }
        if space {
            auth_credentials(text, &mut cuts);
        }
        if at {
            url_passwords(text, &mut cuts);
        }
        if self.card_numbers && digits >= 13 {
            card_numbers(text.as_bytes(), &mut cuts);
        }
        if cuts.is_empty() {
            return None;
        }
        cuts.sort_unstable();
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for (start, end) in cuts {
            let start = start.max(at);
            if start >= end {
                continue;
            }
            out.push_str(&text[at..start]);
            out.push_str(REDACTED);
            at = end;
        }
        out.push_str(&text[at..]);
        (out != text).then_some(out)
    }

    /// The values of `name=value`, `name: value` and `"name": "value"` pairs whose name
    /// is secret.
    fn pairs(&self, text: &str, cuts: &mut Vec<(usize, usize)>) {
        let b = text.as_bytes();
        let mut i = 0;
        while i < b.len() {
            if !is_name_byte(b[i]) || (i > 0 && is_name_byte(b[i - 1])) {
                i += 1;
                continue;
            }
            let start = i;
            while i < b.len() && is_name_byte(b[i]) {
                i += 1;
            }
            let name = &text[start..i];
            let mut j = i;
            while j < b.len() && matches!(b[j], b'"' | b'\'' | b']') {
                j += 1;
            }
            while j < b.len() && b[j] == b' ' {
                j += 1;
            }
            if j >= b.len() || !matches!(b[j], b'=' | b':') {
                continue;
            }
            // `name::path` and `scheme://` are not pairs.
            if b.get(j + 1).is_some_and(|c| *c == b':' || *c == b'/') {
                continue;
            }
            j += 1;
            while j < b.len() && b[j] == b' ' {
                j += 1;
            }
            if !self.is_secret_name(name) {
                continue;
            }
            let (vstart, vend) = match b.get(j) {
                Some(q @ (b'"' | b'\'')) => {
                    let q = *q;
                    let mut k = j + 1;
                    while k < b.len() && b[k] != q {
                        k += if b[k] == b'\\' { 2 } else { 1 };
                    }
                    (j + 1, k.min(b.len()))
                }
                _ => {
                    let mut k = j;
                    while k < b.len() && !is_value_end(b[k]) {
                        k += 1;
                    }
                    (j, k)
                }
            };
            if vend > vstart {
                cuts.push((vstart, vend));
            }
            i = vend.max(i);
        }
    }
}

/// Lower case, without `-`, `_`, `.`, `[`, `]` and spaces.
fn normalize(name: &str) -> String {
    name.chars()
        .filter(|c| !matches!(c, '-' | '_' | '.' | ' ' | '[' | ']'))
        .flat_map(char::to_lowercase)
        .collect()
}

fn is_name_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'[')
}

fn is_value_end(c: u8) -> bool {
    c.is_ascii_whitespace()
        || matches!(
            c,
            b'&' | b';' | b',' | b'"' | b'\'' | b'}' | b')' | b'<' | b'>' | b'#'
        )
}

/// The credential after an authentication scheme (`Bearer abc.def`).
fn auth_credentials(text: &str, cuts: &mut Vec<(usize, usize)>) {
    // A scheme is a word followed by a space: look at the word before each space
    // (no lower-cased copy, no substring search: this runs for every value with a space).
    let b = text.as_bytes();
    let mut p = 0;
    while let Some(off) = b[p..].iter().position(|&c| c == b' ') {
        let space = p + off;
        p = space + 1;
        let mut w = space;
        while w > 0 && b[w - 1].is_ascii_alphanumeric() {
            w -= 1;
        }
        let word = &b[w..space];
        if !AUTH_SCHEMES
            .iter()
            .any(|s| word.eq_ignore_ascii_case(s.as_bytes()))
        {
            continue;
        }
        let mut k = space;
        while k < b.len() && b[k] == b' ' {
            k += 1;
        }
        let cred = k;
        while k < b.len() && (b[k].is_ascii_alphanumeric() || b"-._~+/=".contains(&b[k])) {
            k += 1;
        }
        if k - cred >= 6 {
            cuts.push((cred, k));
            p = k;
        }
    }
}

/// The password of a URL's user info (`https://user:pw@host/`).
fn url_passwords(text: &str, cuts: &mut Vec<(usize, usize)>) {
    let mut from = 0;
    while let Some(pos) = text[from..].find("://") {
        let authority_start = from + pos + 3;
        let rest = &text[authority_start..];
        let authority_len = rest.find(['/', '?', '#', ' ']).unwrap_or(rest.len());
        let authority = &rest[..authority_len];
        if let Some(at) = authority.rfind('@')
            && let Some(colon) = authority[..at].find(':')
            && at > colon + 1
        {
            cuts.push((authority_start + colon + 1, authority_start + at));
        }
        from = authority_start;
    }
}

/// Runs of 13 to 19 digits (single spaces or dashes between groups) that are card
/// numbers. Every run of consecutive groups is tried, longest first, so that a card
/// number next to another number is still found. Digits that touch a letter are part
/// of an identifier, not a number (`42ea` in a UUID, a container id's hex), and a
/// UUID's groups are never a card number, even when they are all digits.
fn card_numbers(text: &[u8], cuts: &mut Vec<(usize, usize)>) {
    // UUIDs become letters in a copy, so that their digits touch a letter below.
    let mut masked = None;
    let mut p = 0;
    while p < text.len() {
        let boundary = p == 0 || !text[p - 1].is_ascii_alphanumeric();
        match uuid_at(text, p).filter(|_| boundary) {
            Some(len) => {
                masked.get_or_insert_with(|| text.to_vec())[p..p + len].fill(b'u');
                p += len;
            }
            None => p += 1,
        }
    }
    let b = masked.as_deref().unwrap_or(text);
    let mut i = 0;
    while i < b.len() {
        if !b[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        if i > 0 && b[i - 1].is_ascii_alphabetic() {
            // Inside a word: skip the rest of it.
            while i < b.len() && b[i].is_ascii_alphanumeric() {
                i += 1;
            }
            continue;
        }
        // Groups of digits separated by one space or dash.
        let mut groups: Vec<(usize, usize)> = Vec::new();
        let mut k = i;
        loop {
            let start = k;
            while k < b.len() && b[k].is_ascii_digit() {
                k += 1;
            }
            if k < b.len() && b[k].is_ascii_alphabetic() {
                // This group runs into a word; the run ends before it.
                break;
            }
            groups.push((start, k));
            if k + 1 < b.len() && matches!(b[k], b' ' | b'-') && b[k + 1].is_ascii_digit() {
                k += 1;
            } else {
                break;
            }
        }
        if groups.is_empty() {
            while k < b.len() && b[k].is_ascii_alphanumeric() {
                k += 1;
            }
        }
        let mut g = 0;
        while g < groups.len() {
            let mut found = None;
            for last in (g..groups.len()).rev() {
                let digits: Vec<u8> = groups[g..=last]
                    .iter()
                    .flat_map(|&(s, e)| b[s..e].iter().copied())
                    .collect();
                if is_card_number(&digits) {
                    found = Some(last);
                    break;
                }
            }
            match found {
                Some(last) => {
                    cuts.push((groups[g].0, groups[last].1));
                    g = last + 1;
                }
                None => g += 1,
            }
        }
        i = k.max(i + 1);
    }
}

/// The length of the UUID (8-4-4-4-12 hex digits, not inside a longer word) at `at`.
fn uuid_at(b: &[u8], at: usize) -> Option<usize> {
    const SHAPE: [usize; 5] = [8, 4, 4, 4, 12];
    let mut k = at;
    for (n, &len) in SHAPE.iter().enumerate() {
        if n > 0 {
            if b.get(k) != Some(&b'-') {
                return None;
            }
            k += 1;
        }
        let end = k + len;
        if end > b.len() || !b[k..end].iter().all(u8::is_ascii_hexdigit) {
            return None;
        }
        k = end;
    }
    match b.get(k) {
        Some(c) if c.is_ascii_alphanumeric() => None,
        _ => Some(k - at),
    }
}

/// 13 to 19 ASCII digits, a card network's leading digits and a valid Luhn checksum.
fn is_card_number(digits: &[u8]) -> bool {
    if !(13..=19).contains(&digits.len()) || !digits.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let prefix = |n: usize| -> u32 {
        digits[..n]
            .iter()
            .fold(0, |acc, d| acc * 10 + u32::from(d - b'0'))
    };
    // Amex, Diners, JCB (3); Visa (4); Mastercard, Maestro (5); Discover, UnionPay,
    // Maestro (6); Mastercard's 2-series.
    let network = matches!(digits[0], b'3'..=b'6') || (2221..=2720).contains(&prefix(4));
    network && luhn(digits)
}

fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, d)| {
            let d = u32::from(d - b'0');
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r() -> Redactor {
        Redactor::default()
    }

    fn red(s: &str) -> String {
        r().text(s).unwrap_or_else(|| s.to_owned())
    }

    #[test]
    fn query_parameters_with_secret_names_lose_their_values_only() {
        assert_eq!(
            red("id=7&token=abc123&password=hunter2&api_key=K-9&q=shoes"),
            "id=7&token=[REDACTED]&password=[REDACTED]&api_key=[REDACTED]&q=shoes"
        );
        assert_eq!(
            red("https://shop.example:8443/orders?access_token=x.y.z&card_number=12"),
            "https://shop.example:8443/orders?access_token=[REDACTED]&card_number=[REDACTED]"
        );
        assert_eq!(
            red("client_secret=s3cr3t#frag"),
            "client_secret=[REDACTED]#frag"
        );
    }

    #[test]
    fn json_like_and_header_like_text() {
        assert_eq!(
            red(r#"{"user":"ann","password":"p w\"d","cardNumber": "x"}"#),
            r#"{"user":"ann","password":"[REDACTED]","cardNumber": "[REDACTED]"}"#
        );
        assert_eq!(
            red("Authorization: Bearer eyJhbGciOi.J9x-y"),
            "Authorization: [REDACTED] [REDACTED]"
        );
        assert_eq!(red("auth Basic dXNlcjpwYXNz"), "auth Basic [REDACTED]");
    }

    #[test]
    fn url_user_info_passwords() {
        assert_eq!(
            red("amqp://guest:guestpw@broker:5672/vhost"),
            "amqp://guest:[REDACTED]@broker:5672/vhost"
        );
        assert_eq!(red("http://host:80/a"), "http://host:80/a");
    }

    #[test]
    fn card_numbers_are_found_by_luhn_wherever_they_are() {
        for card in [
            "4111111111111111",
            "4111 1111 1111 1111",
            "5500-0000-0000-0004",
            "378282246310005",
            "6011111111111117",
        ] {
            assert_eq!(
                red(&format!("paid with {card}.")),
                "paid with [REDACTED].",
                "{card}"
            );
            assert_eq!(
                red(&format!("/cards/{card}/charge")),
                "/cards/[REDACTED]/charge"
            );
        }
        // A card number beside another number is still found.
        assert_eq!(red("order 77 4111111111111111"), "order 77 [REDACTED]");
        // Not cards: a Luhn failure, a millisecond timestamp, a short id, a phone.
        for not in [
            "4111111111111112",
            "1733059200000",
            "order-1234567",
            "+1 212 555 0100",
        ] {
            assert_eq!(red(not), not);
        }
        // A card number beside punctuation or an underscore is still one.
        assert_eq!(red("pan_4111111111111111;"), "pan_[REDACTED];");
    }

    #[test]
    fn attribute_keys_are_judged_once_and_remembered_by_address() {
        let r = r();
        let keys: [&'static str; 4] = [
            "user.password",
            "url.path",
            "http.request.header.cookie",
            "server.port",
        ];
        for _ in 0..3 {
            for key in keys {
                assert_eq!(r.is_secret_key(key), r.is_secret_name(key), "{key}");
            }
        }
        assert_eq!(r.keys.get("user.password"), Some(true));
        assert_eq!(r.keys.get("url.path"), Some(false));
        // Many more keys than slots: answers stay right when the table is full.
        let many: Vec<&'static str> = (0..3000)
            .map(|i| &*Box::leak(format!("k{i}.token{}", i % 2).into_boxed_str()))
            .collect();
        for key in &many {
            assert_eq!(r.is_secret_key(key), r.is_secret_name(key), "{key}");
        }
        for key in &many {
            assert_eq!(r.is_secret_key(key), r.is_secret_name(key), "{key}");
        }
    }

    #[test]
    fn identifiers_are_not_card_numbers() {
        // A pod's UID whose first groups are a valid Visa number by Luhn (a CI run
        // exported `[REDACTED]ea-bcc2-e1a03085f5fb` as k8s.pod.uid).
        let uid = "48792796-1689-42ea-bcc2-e1a03085f5fb";
        assert!(is_card_number(b"48792796168942"));
        assert_eq!(red(uid), uid);
        assert_eq!(red(&format!("pod {uid} ready")), format!("pod {uid} ready"));
        // All-digit UUID groups, hex ids that start or end with digits.
        for id in [
            "41111111-1111-1111-4111-111111111111",
            "4111111111111111abc",
            "abc4111111111111111",
            "22530b3f845d4b97aeb2225bbbf4d5fc1dd9f30453ec45bba4111111111111111",
        ] {
            assert_eq!(red(id), id);
        }
        // Many random-looking UUIDs: none changes.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..20_000 {
            let mut hex = String::new();
            for _ in 0..32 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Mostly digits, so that long digit runs are common.
                let d = (x % 13) as u8;
                hex.push(if d < 10 {
                    (b'0' + d) as char
                } else {
                    (b'a' + d - 10) as char
                });
            }
            let uuid = format!(
                "{}-{}-{}-{}-{}",
                &hex[..8],
                &hex[8..12],
                &hex[12..16],
                &hex[16..20],
                &hex[20..]
            );
            assert_eq!(r().text(&uuid), None, "{uuid}");
        }
    }

    #[test]
    fn ordinary_values_are_left_alone() {
        for s in [
            "GET /orders/{id}",
            "order.created",
            "curl/8.5.0",
            "https://api.token-service.example:8443/v1",
            "routing_key=orders.created",
            "keyboard=qwerty",
        ] {
            assert_eq!(r().text(s), None, "{s}");
        }
    }

    #[test]
    fn secret_names_and_headers() {
        let r = r();
        for n in [
            "password",
            "X-Auth-Token",
            "api_key",
            "apiKey",
            "cardNumber",
            "card-number",
            "user.password",
            "http.request.header.cookie",
        ] {
            assert!(r.is_secret_name(n), "{n}");
        }
        for n in [
            "order.id",
            "url.query",
            "messaging.rabbitmq.destination.routing_key",
        ] {
            assert!(!r.is_secret_name(n), "{n}");
        }
        for h in [
            "Authorization",
            "Cookie",
            "set-cookie",
            "Proxy-Authorization",
            "X-API-Key",
        ] {
            assert!(r.is_secret_header(h), "{h}");
        }
        assert!(!r.is_secret_header("Content-Type"));
    }

    #[test]
    fn arguments_after_secret_options() {
        let mut args: Vec<String> = [
            "slicer",
            "--password",
            "hunter2",
            "--token=t0k",
            "-o",
            "out.gcode",
        ]
        .map(String::from)
        .to_vec();
        assert!(r().args(&mut args));
        assert_eq!(
            args,
            [
                "slicer",
                "--password",
                REDACTED,
                "--token=[REDACTED]",
                "-o",
                "out.gcode"
            ]
        );
    }

    #[test]
    fn attribute_values_by_key() {
        let r = r();
        let mut v = Value::Str("hunter2".into());
        assert!(r.value("user.password", &mut v));
        assert_eq!(v, Value::Str(REDACTED.into()));
        let mut n = Value::Int(4111111111111111);
        assert!(r.value("payment.ref", &mut n));
        assert_eq!(n, Value::Str(REDACTED.into()));
        let mut ok = Value::Int(200);
        assert!(!r.value("http.response.status_code", &mut ok));
    }

    #[test]
    fn the_config_adds_names_and_can_turn_parts_off() {
        let cfg: RedactionConfig =
            serde_saphyr::from_str("names: [ssn]\nheaders: [X-Signature]\ncard_numbers: false\n")
                .unwrap();
        let r = Redactor::new(&cfg);
        assert_eq!(r.text("ssn=123-45-6789").as_deref(), Some("ssn=[REDACTED]"));
        assert!(r.is_secret_header("x-signature"));
        assert!(r.is_secret_name("password"), "defaults kept");
        assert_eq!(r.text("4111111111111111"), None);

        let off: RedactionConfig = serde_saphyr::from_str("enabled: false\n").unwrap();
        assert_eq!(Redactor::new(&off).text("password=x"), None);

        let no_defaults: RedactionConfig =
            serde_saphyr::from_str("defaults: false\nnames: [pin]\n").unwrap();
        let r = Redactor::new(&no_defaults);
        assert!(!r.is_secret_name("password") && r.is_secret_name("pin"));

        let err = serde_saphyr::from_str::<RedactionConfig>("names: ['--']\n").unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
    }
}
