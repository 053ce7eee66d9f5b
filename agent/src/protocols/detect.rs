//! Which protocol a connection speaks: every parser reads the first bytes until one
//! recognises them; the others are dropped. A connection nobody recognises is left
//! alone (and counted), never guessed at.

use agent_common::Direction;

use super::{
    amqp::{AmqpOperation, AmqpParser},
    http::{HttpExchange, HttpParser},
};

/// What a connection's parser produced. Short-lived (built and consumed in one call),
/// so the size difference of the variants costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
pub enum Parsed {
    Http(HttpExchange),
    Amqp(AmqpOperation),
}

pub enum ConnParser {
    /// Not decided yet: both parsers read.
    Detecting {
        http: Box<HttpParser>,
        amqp: Box<AmqpParser>,
    },
    Http(Box<HttpParser>),
    Amqp(Box<AmqpParser>),
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
    pub fn new() -> Self {
        ConnParser::Detecting {
            http: Box::default(),
            amqp: Box::default(),
        }
    }

    pub fn feed(&mut self, dir: Direction, data: &[u8], ts_ns: u64) {
        match self {
            ConnParser::Detecting { http, amqp } => {
                http.feed(dir, data, ts_ns);
                amqp.feed(dir, data, ts_ns);
            }
            ConnParser::Http(p) => p.feed(dir, data, ts_ns),
            ConnParser::Amqp(p) => p.feed(dir, data, ts_ns),
        }
        self.decide();
    }

    pub fn skip(&mut self, dir: Direction, len: u64, ts_ns: u64) {
        match self {
            ConnParser::Detecting { http, amqp } => {
                http.skip(dir, len, ts_ns);
                amqp.skip(dir, len, ts_ns);
            }
            ConnParser::Http(p) => p.skip(dir, len, ts_ns),
            ConnParser::Amqp(p) => p.skip(dir, len, ts_ns),
        }
        self.decide();
    }

    pub fn resync(&mut self, dir: Direction) {
        match self {
            ConnParser::Detecting { http, amqp } => {
                http.resync(dir);
                amqp.resync(dir);
            }
            ConnParser::Http(p) => p.resync(dir),
            ConnParser::Amqp(p) => p.resync(dir),
        }
    }

    pub fn close(&mut self, ts_ns: u64) {
        match self {
            ConnParser::Detecting { http, amqp } => {
                http.close(ts_ns);
                amqp.close(ts_ns);
            }
            ConnParser::Http(p) => p.close(ts_ns),
            ConnParser::Amqp(p) => p.close(ts_ns),
        }
    }

    /// Time passes on an idle connection (AMQP releases publishes that waited for a
    /// possible basic.return).
    pub fn tick(&mut self, now_ns: u64) {
        if let ConnParser::Amqp(p) = self {
            p.tick(now_ns);
        }
    }

    /// Finished exchanges and operations, oldest first.
    pub fn take(&mut self) -> Vec<Parsed> {
        match self {
            ConnParser::Detecting { .. } => Vec::new(),
            ConnParser::Http(p) => p.take_exchanges().into_iter().map(Parsed::Http).collect(),
            ConnParser::Amqp(p) => p.take_operations().into_iter().map(Parsed::Amqp).collect(),
        }
    }

    pub fn verdict(&self) -> Verdict {
        match self {
            ConnParser::Detecting { http, amqp } => {
                if http.is_http() == Some(false) && amqp.is_amqp() == Some(false) {
                    Verdict::Unknown
                } else {
                    Verdict::Undecided
                }
            }
            ConnParser::Http(p) if p.is_http() == Some(false) => Verdict::Unknown,
            ConnParser::Amqp(p) if p.is_amqp() == Some(false) => Verdict::Unknown,
            _ => Verdict::Known,
        }
    }

    fn decide(&mut self) {
        let ConnParser::Detecting { http, amqp } = self else {
            return;
        };
        if http.is_http() == Some(true) {
            *self = ConnParser::Http(std::mem::take(http));
        } else if amqp.is_amqp() == Some(true) {
            *self = ConnParser::Amqp(std::mem::take(amqp));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_and_amqp_and_neither_are_told_apart() {
        let mut p = ConnParser::new();
        p.feed(Direction::Egress, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 1);
        assert!(matches!(p, ConnParser::Http(_)));
        p.feed(Direction::Ingress, b"HTTP/1.1 204 No Content\r\n\r\n", 2);
        assert_eq!(p.take().len(), 1);

        let mut p = ConnParser::new();
        p.feed(Direction::Egress, b"AMQP\x00\x00\x09\x01", 1);
        assert!(matches!(p, ConnParser::Amqp(_)));
        assert_eq!(p.verdict(), Verdict::Known);

        let mut p = ConnParser::new();
        p.feed(
            Direction::Egress,
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
            1,
        );
        assert_eq!(p.verdict(), Verdict::Unknown);
        assert!(p.take().is_empty());
    }
}
