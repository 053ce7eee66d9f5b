//! Which protocol a connection speaks: every parser reads the first bytes until one
//! recognises them; the others are dropped. A connection nobody recognises is left
//! alone (and counted), never guessed at.

use agent_common::Direction;

use super::{Parsed, ProtocolParser, amqp::AmqpParser, http::HttpParser, http2::Http2Parser};
use crate::conn::EndReason;

/// The parser of one connection: every protocol's until one recognises the bytes, then
/// that one alone.
#[derive(Debug)]
pub struct ConnParser {
    candidates: Vec<Box<dyn ProtocolParser>>,
    decided: bool,
    /// What a parser that handed over to another one left untaken.
    carried: Vec<Parsed>,
}

/// Where detection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Undecided,
    Known,
    /// No parser understands the bytes: stop feeding them.
    Unknown,
}

impl Default for ConnParser {
    fn default() -> Self {
        Self::new()
    }
}

impl ConnParser {
    /// Every protocol sonde parses: HTTP/1.x, HTTP/2 and AMQP 0-9-1.
    pub fn new() -> Self {
        Self::with(vec![
            Box::new(HttpParser::new()),
            Box::new(Http2Parser::new()),
            Box::new(AmqpParser::new()),
        ])
    }

    /// These parsers, in order of preference when two recognise the same bytes.
    pub fn with(candidates: Vec<Box<dyn ProtocolParser>>) -> Self {
        ConnParser {
            candidates,
            decided: false,
            carried: Vec::new(),
        }
    }

    pub fn feed(&mut self, dir: Direction, data: &[u8], ts_ns: u64) {
        for p in &mut self.candidates {
            p.feed(dir, data, ts_ns);
        }
        self.decide();
        self.switch();
    }

    pub fn skip(&mut self, dir: Direction, len: u64, ts_ns: u64) {
        for p in &mut self.candidates {
            p.skip(dir, len, ts_ns);
        }
        self.decide();
        self.switch();
    }

    pub fn resync(&mut self, dir: Direction) {
        for p in &mut self.candidates {
            p.resync(dir);
        }
    }

    pub fn close(&mut self, ts_ns: u64, reason: EndReason) {
        for p in &mut self.candidates {
            p.close(ts_ns, reason);
        }
    }

    /// Time passes on a connection that may be idle (AMQP releases publishes that
    /// waited for a possible basic.return).
    pub fn tick(&mut self, now_ns: u64) {
        if self.decided {
            for p in &mut self.candidates {
                p.tick(now_ns);
            }
        }
    }

    /// Finished exchanges and operations, oldest first; nothing until decided.
    pub fn take(&mut self) -> Vec<Parsed> {
        let mut out = std::mem::take(&mut self.carried);
        if self.decided {
            for p in &mut self.candidates {
                p.take(&mut out);
            }
        }
        out
    }

    /// See [`ProtocolParser::next_message_in`]; `None` until decided.
    pub fn next_message_in(&self, dir: Direction) -> Option<u64> {
        match &self.candidates[..] {
            [p] if self.decided => p.next_message_in(dir),
            _ => None,
        }
    }

    /// See [`ProtocolParser::kernel_follows_frames`]; false until decided.
    pub fn kernel_follows_frames(&self) -> bool {
        match &self.candidates[..] {
            [p] if self.decided => p.kernel_follows_frames(),
            _ => false,
        }
    }

    /// See [`ProtocolParser::in_sync`]; undecided connections count as in sync.
    pub fn in_sync(&self, dir: Direction) -> bool {
        match &self.candidates[..] {
            [p] if self.decided => p.in_sync(dir),
            _ => true,
        }
    }

    pub fn verdict(&self) -> Verdict {
        if self.candidates.iter().all(|p| p.detect() == Some(false)) {
            Verdict::Unknown
        } else if self.decided {
            Verdict::Known
        } else {
            Verdict::Undecided
        }
    }

    /// The decided parser hands over to another protocol's (HTTP/1.1 upgraded to h2c).
    fn switch(&mut self) {
        if let [p] = &mut self.candidates[..]
            && self.decided
            && let Some(next) = p.upgrade()
        {
            p.take(&mut self.carried);
            self.candidates = vec![next];
        }
    }

    /// Keeps the first parser that recognised the bytes; drops those that refused them.
    fn decide(&mut self) {
        if self.decided {
            return;
        }
        if let Some(i) = self
            .candidates
            .iter()
            .position(|p| p.detect() == Some(true))
        {
            let chosen = self.candidates.swap_remove(i);
            self.candidates = vec![chosen];
            self.decided = true;
        } else if self.candidates.len() > 1 {
            self.candidates.retain(|p| p.detect() != Some(false));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocols::Started;

    #[test]
    fn http_and_amqp_and_neither_are_told_apart() {
        let mut p = ConnParser::new();
        p.feed(Direction::Egress, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 1);
        assert_eq!(p.verdict(), Verdict::Known);
        p.feed(Direction::Ingress, b"HTTP/1.1 204 No Content\r\n\r\n", 2);
        assert!(matches!(
            &p.take()[..],
            [Parsed::Started(_), Parsed::Http(_)]
        ));

        let mut p = ConnParser::new();
        p.feed(Direction::Egress, b"AMQP\x00\x00\x09\x01", 1);
        assert_eq!(p.verdict(), Verdict::Known);
        assert_eq!(p.next_message_in(Direction::Egress), Some(0));

        let mut p = ConnParser::new();
        p.feed(
            Direction::Egress,
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            1,
        );
        assert_eq!(p.verdict(), Verdict::Unknown);
        assert!(p.take().is_empty());
    }

    #[test]
    fn the_http2_preface_picks_the_http2_parser() {
        let mut p = ConnParser::new();
        p.feed(Direction::Egress, crate::protocols::http2::PREFACE, 1);
        assert_eq!(p.verdict(), Verdict::Known);
        // SETTINGS (empty), then a HEADERS frame: GET / (static table).
        p.feed(
            Direction::Egress,
            b"\0\0\0\x04\0\0\0\0\0\0\0\x02\x01\x05\0\0\0\x01\x82\x84",
            2,
        );
        p.feed(Direction::Ingress, b"\0\0\x01\x01\x05\0\0\0\x01\x88", 3);
        match &p.take()[..] {
            [Parsed::Started(_), Parsed::Http(ex)] => {
                assert_eq!(
                    (ex.request.method.as_str(), ex.request.target.as_str()),
                    ("GET", "/")
                );
                assert_eq!(ex.request.version, 2);
                assert_eq!(ex.response.as_ref().map(|r| r.status), Some(200));
            }
            other => panic!("{other:?}"),
        }
    }

    /// `curl --http2` on plaintext: an HTTP/1.1 request asking for h2c, a 101, then
    /// HTTP/2 both ways; the first request's response comes on stream 1.
    #[test]
    fn a_101_to_h2c_hands_the_connection_to_the_http2_parser() {
        let mut p = ConnParser::new();
        p.feed(
            Direction::Egress,
            b"GET /orders/7 HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n\
              Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n",
            1,
        );
        // The 101, the server's SETTINGS and stream 1's response in one read.
        let mut reply = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\
                          Upgrade: h2c\r\n\r\n"
            .to_vec();
        reply.extend_from_slice(b"\0\0\0\x04\0\0\0\0\0");
        reply.extend_from_slice(b"\0\0\x01\x01\x04\0\0\0\x01\x88");
        reply.extend_from_slice(b"\0\0\x02\0\x01\0\0\0\x01ok");
        p.feed(Direction::Ingress, &reply, 2);
        let first = p.take();
        match &first[..] {
            [
                Parsed::Started(Started::Http { seq: 0, .. }),
                Parsed::Http(ex),
            ] => {
                assert_eq!(ex.seq, 0);
                assert_eq!(ex.request.target, "/orders/7");
                assert_eq!(ex.request.version, 1, "the request went as HTTP/1.1");
                let resp = ex.response.as_ref().expect("stream 1's response");
                assert_eq!((resp.status, resp.version), (200, 2));
                assert_eq!(ex.response_body, b"ok");
                assert_eq!((ex.request_start_ns, ex.response_start_ns), (1, 2));
            }
            other => panic!("{other:?}"),
        }
        // The client's preface and SETTINGS, then a request on stream 3.
        let mut next = crate::protocols::http2::PREFACE.to_vec();
        next.extend_from_slice(b"\0\0\0\x04\0\0\0\0\0");
        next.extend_from_slice(b"\0\0\x03\x01\x05\0\0\0\x03\x82\x86\x84");
        p.feed(Direction::Egress, &next, 3);
        p.feed(Direction::Ingress, b"\0\0\x01\x01\x05\0\0\0\x03\x8d", 4);
        match &p.take()[..] {
            [Parsed::Started(Started::Http { seq, .. }), Parsed::Http(ex)] => {
                assert_eq!(*seq, ex.seq);
                assert!(ex.seq > 0, "numbered above the HTTP/1.1 exchange");
                assert_eq!((ex.request.version, ex.request.target.as_str()), (2, "/"));
                assert_eq!(ex.response.as_ref().map(|r| r.status), Some(404));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_101_to_websocket_still_ends_parsing() {
        let mut p = ConnParser::new();
        p.feed(
            Direction::Egress,
            b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            1,
        );
        p.feed(
            Direction::Ingress,
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\0\0\0\x04\0\0\0\0\0",
            2,
        );
        match &p.take()[..] {
            [Parsed::Started(_), Parsed::Http(ex)] => {
                assert_eq!(ex.response.as_ref().map(|r| r.status), Some(101));
            }
            other => panic!("{other:?}"),
        }
        p.feed(Direction::Egress, crate::protocols::http2::PREFACE, 3);
        assert!(p.take().is_empty());
    }

    #[test]
    fn undecided_connections_yield_nothing_and_know_no_message_start() {
        let mut p = ConnParser::new();
        p.feed(Direction::Egress, b"GET / HT", 1);
        assert_eq!(p.verdict(), Verdict::Undecided);
        assert_eq!(p.next_message_in(Direction::Egress), None);
        assert!(p.in_sync(Direction::Egress));
        assert!(p.take().is_empty());
    }
}
