//! HPACK (RFC 7541) header-block decoding for one direction of an HTTP/2 connection,
//! with the dynamic table, and a mode for connections whose table state is unknown.
//!
//! Written here rather than taken whole from a crate because no maintained decoder
//! can decode a block while part of its dynamic table is unknown (a connection already
//! open when the agent started): those fail the whole block on the first reference
//! they cannot resolve. Huffman decoding, the part worth reusing, comes from
//! `loona-hpack`.
//!
//! Unknown table: the entries inserted since the agent started watching are known
//! (they are the newest, so their indices are right); an index past them refers to
//! an entry inserted before, which is unknown. Such fields are left out and the block
//! says so. Entries are evicted no earlier than the encoder evicts them (an entry
//! whose name is unknown counts its name as empty), so a known index is never wrong.

use std::collections::VecDeque;

use loona_hpack::huffman::HuffmanDecoder;

/// Largest dynamic table kept, whatever the encoder announces; entries that would
/// not fit are forgotten (references to them then decode as unknown).
pub const MAX_TABLE_SIZE: usize = 64 * 1024;
/// Largest integer accepted in a representation (lengths, indices, sizes).
const MAX_INTEGER: u64 = 1 << 24;

/// RFC 7541 appendix A.
const STATIC_TABLE: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// Why a block could not be decoded at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HpackError {
    #[error("header block ends inside a field")]
    Truncated,
    #[error("integer too large in a header block")]
    Integer,
    #[error("bad Huffman string in a header block")]
    Huffman,
    #[error("index 0 or past the table in a header block")]
    Index,
}

/// One dynamic-table entry; `None` parts were inserted while unknown.
#[derive(Debug, Clone)]
struct Entry {
    name: Option<String>,
    value: Option<String>,
}

impl Entry {
    /// The size RFC 7541 section 4.1 gives it, unknown parts counted as empty.
    fn size(&self) -> usize {
        self.name.as_ref().map_or(0, String::len) + self.value.as_ref().map_or(0, String::len) + 32
    }
}

/// A decoded block.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Block {
    /// Fields in order, names as sent (lower case in HTTP/2), values lossily UTF-8.
    pub fields: Vec<(String, String)>,
    /// Some fields referred to table entries that are unknown and were left out.
    pub unknown: bool,
}

/// The decoder of one direction.
#[derive(Debug)]
pub struct Decoder {
    /// Newest first.
    table: VecDeque<Entry>,
    size: usize,
    max_size: usize,
    /// Entries inserted before we started watching may exist past the known ones.
    partial: bool,
}

impl Decoder {
    /// A decoder that saw the connection from its start (empty table, 4096 bytes).
    pub fn new() -> Self {
        Decoder {
            table: VecDeque::new(),
            size: 0,
            max_size: 4096,
            partial: false,
        }
    }

    /// A decoder for a connection whose earlier blocks were not seen.
    pub fn unknown() -> Self {
        Decoder {
            partial: true,
            ..Decoder::new()
        }
    }

    /// Whether the table state is only partly known.
    pub fn is_partial(&self) -> bool {
        self.partial
    }

    /// Forgets the table: a block was lost, so what it inserted is unknown.
    pub fn lose(&mut self) {
        *self = Decoder::unknown();
    }

    /// Decodes one whole header block. On an error the table is no longer known.
    pub fn decode(&mut self, block: &[u8]) -> Result<Block, HpackError> {
        let r = self.decode_inner(block);
        if r.is_err() {
            self.lose();
        }
        r
    }

    fn decode_inner(&mut self, mut buf: &[u8]) -> Result<Block, HpackError> {
        let mut out = Block::default();
        while let Some(&first) = buf.first() {
            if first & 0x80 != 0 {
                let index = integer(&mut buf, 7)?;
                match self.lookup(index)? {
                    (Some(n), Some(v)) => out.fields.push((n, v)),
                    _ => out.unknown = true,
                }
            } else if first & 0xe0 == 0x20 {
                let size = integer(&mut buf, 5)? as usize;
                self.max_size = size;
                self.evict(0);
            } else {
                let (prefix, indexing) = if first & 0x40 != 0 {
                    (6, true)
                } else {
                    (4, false)
                };
                let name_index = integer(&mut buf, prefix)?;
                let name = if name_index == 0 {
                    Some(string(&mut buf)?)
                } else {
                    self.lookup(name_index)?.0
                };
                let value = string(&mut buf)?;
                match &name {
                    Some(n) => out.fields.push((n.clone(), value.clone())),
                    None => out.unknown = true,
                }
                if indexing {
                    self.insert(Entry {
                        name,
                        value: Some(value),
                    });
                }
            }
        }
        Ok(out)
    }

    /// The entry at `index`: both parts `None` when it is unknown.
    fn lookup(&self, index: u64) -> Result<(Option<String>, Option<String>), HpackError> {
        let index = index as usize;
        if index == 0 {
            return Err(HpackError::Index);
        }
        if let Some((n, v)) = STATIC_TABLE.get(index - 1) {
            return Ok((Some((*n).to_owned()), Some((*v).to_owned())));
        }
        match self.table.get(index - 1 - STATIC_TABLE.len()) {
            Some(e) => Ok((e.name.clone(), e.value.clone())),
            // Evicted by us for memory, or inserted before we watched.
            None if self.partial || self.max_size > MAX_TABLE_SIZE => Ok((None, None)),
            None => Err(HpackError::Index),
        }
    }

    fn insert(&mut self, entry: Entry) {
        let size = entry.size();
        self.evict(size);
        if size <= self.max_size.min(MAX_TABLE_SIZE) {
            self.size += size;
            self.table.push_front(entry);
        } else {
            // RFC 7541 section 4.4: an entry larger than the table empties it.
            self.table.clear();
            self.size = 0;
        }
    }

    /// Evicts the oldest entries until `incoming` more bytes fit.
    fn evict(&mut self, incoming: usize) {
        let limit = self.max_size.min(MAX_TABLE_SIZE);
        while self.size + incoming > limit {
            match self.table.pop_back() {
                Some(e) => self.size -= e.size(),
                None => break,
            }
        }
    }
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

/// An integer with an `n`-bit prefix (RFC 7541 section 5.1).
fn integer(buf: &mut &[u8], n: u8) -> Result<u64, HpackError> {
    let (&first, rest) = buf.split_first().ok_or(HpackError::Truncated)?;
    *buf = rest;
    let max = (1u64 << n) - 1;
    let mut value = u64::from(first) & max;
    if value < max {
        return Ok(value);
    }
    let mut shift = 0;
    loop {
        let (&b, rest) = buf.split_first().ok_or(HpackError::Truncated)?;
        *buf = rest;
        // Zero continuation bytes add nothing but could shift past 64 bits.
        if shift > 56 {
            return Err(HpackError::Integer);
        }
        value += u64::from(b & 0x7f) << shift;
        if value > MAX_INTEGER {
            return Err(HpackError::Integer);
        }
        if b & 0x80 == 0 {
            return Ok(value);
        }
        shift += 7;
    }
}

/// A string literal (RFC 7541 section 5.2).
fn string(buf: &mut &[u8]) -> Result<String, HpackError> {
    let huffman = buf.first().ok_or(HpackError::Truncated)? & 0x80 != 0;
    let len = integer(buf, 7)? as usize;
    if buf.len() < len {
        return Err(HpackError::Truncated);
    }
    let (raw, rest) = buf.split_at(len);
    *buf = rest;
    if huffman {
        let bytes = HuffmanDecoder::new()
            .decode(raw)
            .map_err(|_| HpackError::Huffman)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    } else {
        Ok(String::from_utf8_lossy(raw).into_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use loona_hpack::Encoder;

    fn fields(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn blocks_from_a_real_encoder_decode_with_the_dynamic_table() {
        let mut enc = Encoder::new();
        let mut dec = Decoder::new();
        let first = [
            (":method", "POST"),
            (":path", "/orders/42"),
            (":authority", "shop.local:8443"),
            ("content-type", "application/grpc"),
            (
                "x-custom",
                "a value that is long enough to be worth huffman",
            ),
        ];
        for _ in 0..3 {
            let headers: Vec<(&[u8], &[u8])> = first
                .iter()
                .map(|(n, v)| (n.as_bytes(), v.as_bytes()))
                .collect();
            let block = enc.encode(headers);
            let got = dec.decode(&block).unwrap();
            assert_eq!(got.fields, fields(&first));
            assert!(!got.unknown);
        }
    }

    #[test]
    fn rfc_7541_c_4_requests_with_huffman() {
        // RFC 7541 appendix C.4.1 and C.4.2.
        let mut dec = Decoder::new();
        let c41 = hex("828684418cf1e3c2e5f23a6ba0ab90f4ff");
        assert_eq!(
            dec.decode(&c41).unwrap().fields,
            fields(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
            ])
        );
        let c42 = hex("828684be5886a8eb10649cbf");
        assert_eq!(
            dec.decode(&c42).unwrap().fields,
            fields(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                (":authority", "www.example.com"),
                ("cache-control", "no-cache"),
            ])
        );
    }

    #[test]
    fn an_unknown_table_decodes_what_it_can_and_says_what_it_cannot() {
        // C.4.2 alone: index 62 (the authority inserted by C.4.1) is unknown.
        let mut dec = Decoder::unknown();
        let got = dec.decode(&hex("828684be5886a8eb10649cbf")).unwrap();
        assert_eq!(
            got.fields,
            fields(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/"),
                ("cache-control", "no-cache"),
            ])
        );
        assert!(got.unknown);
        // The entry it inserted is known from now on, at index 62.
        let got = dec.decode(&[0xbe]).unwrap();
        assert_eq!(got.fields, fields(&[("cache-control", "no-cache")]));
        assert!(!got.unknown);
    }

    #[test]
    fn an_integer_with_endless_zero_continuations_is_an_error() {
        // The fuzzer's find: 0x80 bytes shifted past 64 bits.
        let mut bytes = vec![0x7f];
        bytes.extend([0x80; 20]);
        bytes.push(0x00);
        assert!(matches!(
            integer(&mut &bytes[..], 7),
            Err(HpackError::Integer)
        ));
    }

    #[test]
    fn garbage_is_an_error_and_loses_the_table() {
        let mut dec = Decoder::new();
        assert_eq!(dec.decode(&[0x80]), Err(HpackError::Index));
        assert!(dec.is_partial());
        assert_eq!(dec.decode(&[0x41]), Err(HpackError::Truncated));
        assert_eq!(
            dec.decode(&[0x3f, 0xff, 0xff, 0xff, 0xff, 0x7f]),
            Err(HpackError::Integer)
        );
    }

    #[test]
    fn size_updates_evict() {
        let mut dec = Decoder::new();
        dec.decode(b"\x40\x03x-a\x011").unwrap();
        assert_eq!(dec.table.len(), 1);
        dec.decode(&[0x20]).unwrap();
        assert_eq!(dec.table.len(), 0);
        assert_eq!(dec.decode(&[0xbe]), Err(HpackError::Index));
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }
}
