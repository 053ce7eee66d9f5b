//! Message bodies: Content-Length, chunked (size lines, data, trailers) and until
//! close, with the captured prefix kept.

use agent_common::Direction;

use super::*;

impl HttpParser {
    pub(super) fn start_chunked(&mut self, dir: Direction) {
        let h = &mut self.halves[dir.index()];
        h.reset_buffer();
        h.trailer_bytes = 0;
        h.phase = Phase::Body(Body::Chunked(Chunk::Size));
    }

    /// `len` body bytes of `dir`'s current message; `bytes` when they were captured.
    pub(super) fn body_bytes(
        &mut self,
        dir: Direction,
        bytes: Option<&[u8]>,
        len: u64,
        ts_ns: u64,
    ) {
        let is_request = self.is_request_dir(dir);
        let h = &mut self.halves[dir.index()];
        h.last_ns = ts_ns;
        let capturing = h.capturing && bytes.is_some();
        h.capturing = capturing;
        let Some(f) = h.target.and_then(|seq| self.in_flight_mut(seq)) else {
            return;
        };
        if f.dropped {
            return;
        }
        let ex = &mut f.exchange;
        let (size, body) = if is_request {
            (&mut ex.request_body_size, &mut ex.request_body)
        } else {
            (&mut ex.response_body_size, &mut ex.response_body)
        };
        *size = size.saturating_add(len);
        if let (true, Some(bytes)) = (capturing, bytes) {
            let room = MAX_BODY_CAPTURE.saturating_sub(body.len());
            body.extend_from_slice(&bytes[..room.min(bytes.len())]);
        }
    }

    pub(super) fn feed_body(
        &mut self,
        dir: Direction,
        body: Body,
        data: &[u8],
        ts_ns: u64,
    ) -> usize {
        let d = dir.index();
        match body {
            Body::UntilClose => {
                self.body_bytes(dir, Some(data), data.len() as u64, ts_ns);
                data.len()
            }
            Body::Length(left) | Body::Chunked(Chunk::Data(left)) => {
                let n = usize::try_from(left).map_or(data.len(), |l| l.min(data.len()));
                self.body_bytes(dir, Some(&data[..n]), n as u64, ts_ns);
                let left = left - n as u64;
                match (body, left) {
                    (Body::Length(_), 0) => self.finish_message(dir, ts_ns),
                    (Body::Length(_), _) => self.halves[d].phase = Phase::Body(Body::Length(left)),
                    (_, 0) => self.halves[d].phase = Phase::Body(Body::Chunked(Chunk::DataEnd)),
                    (_, _) => self.halves[d].phase = Phase::Body(Body::Chunked(Chunk::Data(left))),
                }
                n
            }
            Body::Chunked(Chunk::DataEnd) => {
                self.halves[d].last_ns = ts_ns;
                match data[0] {
                    b'\r' if self.halves[d].buf.is_empty() => {
                        self.halves[d].buf.push(b'\r');
                        1
                    }
                    b'\n' => {
                        self.halves[d].reset_buffer();
                        self.halves[d].phase = Phase::Body(Body::Chunked(Chunk::Size));
                        1
                    }
                    _ => {
                        self.lose_sync(dir, false, false);
                        0
                    }
                }
            }
            Body::Chunked(chunk @ (Chunk::Size | Chunk::Trailer)) => {
                let h = &mut self.halves[d];
                h.last_ns = ts_ns;
                let (n, line_end) = match data.iter().position(|&c| c == b'\n') {
                    Some(p) => (p + 1, true),
                    None => (data.len(), false),
                };
                if h.buf.len() + n > MAX_LINE {
                    self.lose_sync(dir, false, false);
                    return n;
                }
                h.buf.extend_from_slice(&data[..n]);
                if !line_end {
                    return n;
                }
                let line_len = h.buf.len();
                let empty_line = h.buf == b"\n" || h.buf == b"\r\n";
                let size = chunk_size(&h.buf);
                h.buf.clear();
                if chunk == Chunk::Size {
                    match size {
                        Some(0) => h.phase = Phase::Body(Body::Chunked(Chunk::Trailer)),
                        Some(size) => h.phase = Phase::Body(Body::Chunked(Chunk::Data(size))),
                        None => self.lose_sync(dir, true, false),
                    }
                } else if empty_line {
                    self.finish_message(dir, ts_ns);
                } else {
                    h.trailer_bytes += line_len;
                    if h.trailer_bytes > MAX_TRAILERS {
                        self.lose_sync(dir, true, false);
                    }
                }
                n
            }
        }
    }
}

/// The size in a chunk-size line (`1a;ext=x\r\n`), or `None` when it is not one.
pub(super) fn chunk_size(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\n")?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line.split(|&c| c == b';').next()?.trim_ascii();
    if digits.is_empty() || digits.len() > 15 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
}
