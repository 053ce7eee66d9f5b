//! HTTP/1.x message heads: recognising a start line from its first bytes, parsing a
//! complete head with httparse, and the body framing rules of RFC 9112 section 6.

/// Most headers kept per head; framing is still decided from all of them.
pub const MAX_KEPT_HEADERS: usize = 64;
/// Longest header value kept; longer ones are cut (on a character boundary).
pub const MAX_HEADER_VALUE: usize = 8 * 1024;
/// Longest method token accepted when recognising a request line.
const MAX_METHOD: usize = 24;

/// What a message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Request,
    Response,
}

/// Whether bytes can start a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fit {
    /// They do: a whole request line, or a status line up to its status code.
    Yes(Kind),
    /// They are a prefix of one; more bytes will tell.
    Maybe,
    No,
}

/// A request's head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// The raw request-target: origin form (`/a?b`), absolute form, authority form or `*`.
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1, 2 for HTTP/2.
    pub version: u8,
    /// Lower-case names, values as sent (lossily decoded as UTF-8), in order; at most
    /// [`MAX_KEPT_HEADERS`] of them. HTTP/2 keeps its pseudo-headers (`:authority`...).
    pub headers: Vec<(String, String)>,
    /// HTTP/2 on a connection whose HPACK table is unknown (it predates the agent):
    /// some fields referred to entries that are unknown and are missing here; the
    /// method or target is empty when it was one of them.
    pub header_table_unknown: bool,
}

/// A response's head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub reason: String,
    /// As in [`RequestHead::version`].
    pub version: u8,
    /// As in [`RequestHead::headers`]; HTTP/2 trailers follow the headers.
    pub headers: Vec<(String, String)>,
}

impl RequestHead {
    /// The first value of header `name` (give it in lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

impl ResponseHead {
    /// The first value of header `name` (give it in lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// What the framing headers of a head say, read from all headers (kept or not).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FramingHeaders {
    /// Transfer-Encoding was present; `Some(true)` when its last coding is chunked.
    chunked: Option<bool>,
    content_length: Option<u64>,
    /// Content-Length values that disagree or are not numbers.
    invalid_length: bool,
}

/// How a message's body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    Length(u64),
    Chunked,
    /// The body runs until the connection closes.
    UntilClose,
    /// A 1xx response other than 101: the final response is still to come.
    Interim,
    /// 101 Switching Protocols or a successful CONNECT: the bytes that follow are not
    /// HTTP/1.x any more.
    Tunnel,
}

/// Request body framing (RFC 9112 section 6.3); `None` when the head is unusable.
pub fn request_framing(f: &FramingHeaders) -> Option<Framing> {
    match f.chunked {
        Some(true) => Some(Framing::Chunked),
        // A server answers a request with another final coding with 400; nothing
        // after it can be framed.
        Some(false) => None,
        None if f.invalid_length => None,
        None => Some(match f.content_length {
            Some(0) | None => Framing::Empty,
            Some(n) => Framing::Length(n),
        }),
    }
}

/// Response body framing given the request method it answers (`None` when unknown).
pub fn response_framing(
    status: u16,
    request_method: Option<&str>,
    f: &FramingHeaders,
) -> Option<Framing> {
    if status == 101 {
        return Some(Framing::Tunnel);
    }
    if (100..200).contains(&status) {
        return Some(Framing::Interim);
    }
    if request_method == Some("CONNECT") && (200..300).contains(&status) {
        return Some(Framing::Tunnel);
    }
    if request_method == Some("HEAD") || status == 204 || status == 304 {
        return Some(Framing::Empty);
    }
    match f.chunked {
        Some(true) => Some(Framing::Chunked),
        Some(false) => Some(Framing::UntilClose),
        None if f.invalid_length => None,
        None => Some(match f.content_length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }),
    }
}

/// Whether `buf` starts a message of kind `want` (either kind when `None`).
pub fn classify(buf: &[u8], want: Option<Kind>) -> Fit {
    let request = if want == Some(Kind::Response) {
        Fit::No
    } else {
        request_line(buf)
    };
    let status = if want == Some(Kind::Request) {
        Fit::No
    } else {
        status_line(buf)
    };
    match (request, status) {
        (Fit::Yes(_), _) => Fit::Yes(Kind::Request),
        (_, Fit::Yes(_)) => Fit::Yes(Kind::Response),
        (Fit::Maybe, _) | (_, Fit::Maybe) => Fit::Maybe,
        _ => Fit::No,
    }
}

/// `buf` with `lit` removed from its front, or how it fails to start with `lit`.
fn literal<'a>(buf: &'a [u8], lit: &[u8]) -> Result<&'a [u8], Fit> {
    if buf.len() < lit.len() {
        return Err(if lit.starts_with(buf) {
            Fit::Maybe
        } else {
            Fit::No
        });
    }
    buf.strip_prefix(lit).ok_or(Fit::No)
}

/// `METHOD SP request-target SP HTTP/1.x CRLF` (or a bare LF).
fn request_line(buf: &[u8]) -> Fit {
    let is_method = |c: &u8| c.is_ascii_uppercase() || *c == b'-' || *c == b'_';
    let method = buf
        .iter()
        .take(MAX_METHOD + 1)
        .take_while(|c| is_method(c))
        .count();
    if method > MAX_METHOD {
        return Fit::No;
    }
    if method == buf.len() {
        return Fit::Maybe;
    }
    if method == 0 || buf[method] != b' ' {
        return Fit::No;
    }
    let rest = &buf[method + 1..];
    let target = rest.iter().take_while(|&&c| c > b' ' && c != 0x7f).count();
    if target == rest.len() {
        return Fit::Maybe;
    }
    if target == 0 || rest[target] != b' ' {
        return Fit::No;
    }
    let rest = match literal(&rest[target + 1..], b"HTTP/1.") {
        Ok(rest) => rest,
        Err(fit) => return fit,
    };
    match rest {
        [] => Fit::Maybe,
        [b'0' | b'1'] | [b'0' | b'1', b'\r'] => Fit::Maybe,
        [b'0' | b'1', b'\n', ..] | [b'0' | b'1', b'\r', b'\n', ..] => Fit::Yes(Kind::Request),
        _ => Fit::No,
    }
}

/// `HTTP/1.x SP 3DIGIT` followed by SP or the end of the line.
fn status_line(buf: &[u8]) -> Fit {
    let rest = match literal(buf, b"HTTP/1.") {
        Ok(rest) => rest,
        Err(fit) => return fit,
    };
    let pattern: [fn(u8) -> bool; 6] = [
        |c| c == b'0' || c == b'1',
        |c| c == b' ',
        |c| c.is_ascii_digit(),
        |c| c.is_ascii_digit(),
        |c| c.is_ascii_digit(),
        |c| c == b' ' || c == b'\r' || c == b'\n',
    ];
    for (i, ok) in pattern.iter().enumerate() {
        match rest.get(i) {
            None => return Fit::Maybe,
            Some(&c) if !ok(c) => return Fit::No,
            Some(_) => {}
        }
    }
    Fit::Yes(Kind::Response)
}

/// Parses a complete request head (`buf` ends with its empty line).
pub fn parse_request(buf: &[u8]) -> Option<(RequestHead, FramingHeaders)> {
    let mut stack = [httparse::EMPTY_HEADER; MAX_KEPT_HEADERS];
    let mut heap;
    let mut req = httparse::Request::new(&mut stack);
    let parsed = match req.parse(buf) {
        Err(httparse::Error::TooManyHeaders) => {
            heap = vec![httparse::EMPTY_HEADER; line_count(buf)];
            req = httparse::Request::new(&mut heap);
            req.parse(buf)
        }
        other => other,
    };
    if parsed != Ok(httparse::Status::Complete(buf.len())) {
        return None;
    }
    let head = RequestHead {
        method: req.method?.to_owned(),
        target: req.path?.to_owned(),
        version: req.version?,
        headers: kept_headers(req.headers),
        header_table_unknown: false,
    };
    Some((head, framing_headers(req.headers)))
}

/// Parses a complete response head (`buf` ends with its empty line).
pub fn parse_response(buf: &[u8]) -> Option<(ResponseHead, FramingHeaders)> {
    let mut stack = [httparse::EMPTY_HEADER; MAX_KEPT_HEADERS];
    let mut heap;
    let mut resp = httparse::Response::new(&mut stack);
    let parsed = match resp.parse(buf) {
        Err(httparse::Error::TooManyHeaders) => {
            heap = vec![httparse::EMPTY_HEADER; line_count(buf)];
            resp = httparse::Response::new(&mut heap);
            resp.parse(buf)
        }
        other => other,
    };
    if parsed != Ok(httparse::Status::Complete(buf.len())) {
        return None;
    }
    let head = ResponseHead {
        status: resp.code?,
        reason: resp.reason.unwrap_or_default().to_owned(),
        version: resp.version?,
        headers: kept_headers(resp.headers),
    };
    Some((head, framing_headers(resp.headers)))
}

fn line_count(buf: &[u8]) -> usize {
    buf.iter().filter(|&&c| c == b'\n').count()
}

fn kept_headers(headers: &[httparse::Header<'_>]) -> Vec<(String, String)> {
    headers
        .iter()
        .take(MAX_KEPT_HEADERS)
        .map(|h| {
            let mut value = String::from_utf8_lossy(h.value).into_owned();
            if value.len() > MAX_HEADER_VALUE {
                let mut cut = MAX_HEADER_VALUE;
                while !value.is_char_boundary(cut) {
                    cut -= 1;
                }
                value.truncate(cut);
            }
            (h.name.to_ascii_lowercase(), value)
        })
        .collect()
}

fn framing_headers(headers: &[httparse::Header<'_>]) -> FramingHeaders {
    let mut f = FramingHeaders::default();
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let last = h
                .value
                .split(|&c| c == b',')
                .map(|c| c.trim_ascii())
                .rfind(|c| !c.is_empty());
            if let Some(coding) = last {
                f.chunked = Some(coding.eq_ignore_ascii_case(b"chunked"));
            }
        } else if h.name.eq_ignore_ascii_case("content-length") {
            for v in h.value.split(|&c| c == b',') {
                let v = v.trim_ascii();
                let n = (!v.is_empty() && v.len() <= 19 && v.iter().all(u8::is_ascii_digit))
                    .then(|| std::str::from_utf8(v).ok()?.parse::<u64>().ok())
                    .flatten();
                match (n, f.content_length) {
                    (None, _) => f.invalid_length = true,
                    (Some(n), Some(prev)) if n != prev => f.invalid_length = true,
                    (Some(n), _) => f.content_length = Some(n),
                }
            }
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_are_recognised_from_their_first_bytes() {
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\n", None),
            Fit::Yes(Kind::Request)
        );
        assert_eq!(
            classify(b"M-SEARCH * HTTP/1.1\n", None),
            Fit::Yes(Kind::Request)
        );
        for prefix in [
            "G",
            "GET",
            "GET ",
            "GET /a",
            "GET /a ",
            "GET /a HTTP/1",
            "GET /a HTTP/1.1\r",
        ] {
            assert_eq!(classify(prefix.as_bytes(), None), Fit::Maybe, "{prefix}");
        }
        for bad in [
            "get / HTTP/1.1\r\n",
            "GET  / HTTP/1.1\r\n",
            "GET / HTTP/2.0\r\n",
            "GET / HTTP/1.1 x",
        ] {
            assert_eq!(classify(bad.as_bytes(), None), Fit::No, "{bad}");
        }
    }

    #[test]
    fn status_lines_are_recognised_at_their_status_code() {
        assert_eq!(classify(b"HTTP/1.1 200 ", None), Fit::Yes(Kind::Response));
        assert_eq!(
            classify(b"HTTP/1.0 404\r\n", None),
            Fit::Yes(Kind::Response)
        );
        assert_eq!(classify(b"HTTP/1.1 20", None), Fit::Maybe);
        assert_eq!(classify(b"HTTP/1.1 2000", None), Fit::No);
        assert_eq!(
            classify(b"HTTP/1.1 200 OK\r\n", Some(Kind::Request)),
            Fit::No
        );
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\n", Some(Kind::Response)),
            Fit::No
        );
    }

    #[test]
    fn other_protocols_are_rejected() {
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", None), Fit::No);
        assert_eq!(classify(b"AMQP\x00\x00\x09\x01", None), Fit::No);
        assert_eq!(classify(b"\x16\x03\x01\x02\x00\x01", None), Fit::No);
        assert_eq!(classify(b"SSH-2.0-OpenSSH_9.6\r\n", None), Fit::No);
    }

    #[test]
    fn request_head_is_parsed_with_lowercase_names() {
        let (head, framing) =
            parse_request(b"POST /orders?x=1 HTTP/1.1\r\nHost: shop\r\nContent-Length: 5\r\n\r\n")
                .unwrap();
        assert_eq!(head.method, "POST");
        assert_eq!(head.target, "/orders?x=1");
        assert_eq!(head.version, 1);
        assert_eq!(head.header("host"), Some("shop"));
        assert_eq!(request_framing(&framing), Some(Framing::Length(5)));
    }

    #[test]
    fn many_headers_are_bounded_but_framing_sees_them_all() {
        let mut raw = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..100 {
            raw.extend_from_slice(format!("X-{i}: {i}\r\n").as_bytes());
        }
        raw.extend_from_slice(b"Content-Length: 3\r\n\r\n");
        let (head, framing) = parse_response(&raw).unwrap();
        assert_eq!(head.headers.len(), MAX_KEPT_HEADERS);
        assert_eq!(
            response_framing(head.status, Some("GET"), &framing),
            Some(Framing::Length(3))
        );
    }

    #[test]
    fn long_values_are_cut() {
        let raw = format!(
            "GET / HTTP/1.1\r\nCookie: {}\r\n\r\n",
            "é".repeat(MAX_HEADER_VALUE)
        );
        let (head, _) = parse_request(raw.as_bytes()).unwrap();
        assert!(head.header("cookie").unwrap().len() <= MAX_HEADER_VALUE);
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let f = |raw: &[u8]| parse_response(raw).unwrap().1;
        let chunked =
            f(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 3\r\n\r\n");
        assert_eq!(
            response_framing(200, Some("GET"), &chunked),
            Some(Framing::Chunked)
        );
        let gzip = f(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n");
        assert_eq!(
            response_framing(200, Some("GET"), &gzip),
            Some(Framing::UntilClose)
        );
        assert_eq!(request_framing(&gzip), None);
        let none = FramingHeaders::default();
        assert_eq!(
            response_framing(200, Some("GET"), &none),
            Some(Framing::UntilClose)
        );
        assert_eq!(
            response_framing(200, Some("HEAD"), &chunked),
            Some(Framing::Empty)
        );
        assert_eq!(
            response_framing(204, Some("GET"), &none),
            Some(Framing::Empty)
        );
        assert_eq!(
            response_framing(304, Some("GET"), &none),
            Some(Framing::Empty)
        );
        assert_eq!(
            response_framing(100, Some("GET"), &none),
            Some(Framing::Interim)
        );
        assert_eq!(
            response_framing(101, Some("GET"), &none),
            Some(Framing::Tunnel)
        );
        assert_eq!(
            response_framing(200, Some("CONNECT"), &none),
            Some(Framing::Tunnel)
        );
        assert_eq!(request_framing(&none), Some(Framing::Empty));
        let same = f(b"HTTP/1.1 200 OK\r\nContent-Length: 4, 4\r\nContent-Length: 4\r\n\r\n");
        assert_eq!(response_framing(200, None, &same), Some(Framing::Length(4)));
        let differ = f(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(response_framing(200, None, &differ), None);
        let junk = f(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n");
        assert_eq!(response_framing(200, None, &junk), None);
    }

    #[test]
    fn incomplete_or_trailing_bytes_are_not_a_head() {
        assert!(parse_request(b"GET / HTTP/1.1\r\nHost: a\r\n").is_none());
        assert!(parse_request(b"GET / HTTP/1.1\r\n\r\nGET").is_none());
    }
}
