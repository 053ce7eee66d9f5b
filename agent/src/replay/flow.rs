//! TCP reassembly for replays, one direction of a connection at a time: segments put
//! in sequence order, retransmitted and overlapping bytes dropped, holes given up on
//! (see the [module docs](super) for when).
//!
//! Written here by hand because the pipeline's stream cursor expects whole reads with
//! stream offsets, not segments with sequence numbers.

use std::{borrow::Cow, collections::BTreeMap};

/// Most bytes of out-of-order segments held per direction of a connection.
pub const MAX_HELD_BYTES: u64 = 1 << 20;
/// Most out-of-order segments held per direction of a connection.
pub const MAX_HELD_SEGMENTS: usize = 1024;
/// How long (capture time) a hole waits for a retransmission before it is skipped.
pub const HOLE_TIMEOUT_NS: u64 = 5_000_000_000;
/// Bytes to hand to the pipeline: `len` bytes at stream `offset`, of which `data` is the
/// captured prefix.
#[derive(Debug)]
pub(super) struct Delivery<'a> {
    pub offset: u64,
    pub len: u64,
    pub data: Cow<'a, [u8]>,
}

/// An out-of-order segment waiting for the bytes before it.
struct Held {
    len: u64,
    data: Vec<u8>,
}

/// One direction of a connection being put back in order.
#[derive(Default)]
pub(super) struct Flow {
    /// The sequence number of stream offset 0, once known.
    base: Option<u32>,
    /// The stream offset of the next byte to deliver.
    next: u64,
    held: BTreeMap<u64, Held>,
    held_bytes: u64,
    /// Capture time the current hole opened.
    hole_since: Option<u64>,
    /// The stream offset of the FIN, once seen.
    pub fin: Option<u64>,
    /// Bytes skipped as missing.
    pub missing: u64,
}

impl Flow {
    pub(super) fn start_at(&mut self, seq: u32) {
        self.base.get_or_insert(seq);
    }

    /// Where sequence number `seq` falls in the stream (negative: before its start).
    /// Sequence numbers wrap; segments are within 2 GiB of the next byte expected.
    pub(super) fn offset_of(&self, seq: u32) -> i128 {
        let base = self.base.expect("offset_of after start_at");
        let next_seq = base.wrapping_add(self.next as u32);
        i128::from(self.next) + i128::from(seq.wrapping_sub(next_seq) as i32)
    }

    pub(super) fn finished(&self) -> bool {
        self.fin.is_some_and(|f| self.next >= f) && self.held.is_empty()
    }

    /// Takes a segment's payload; appends to `out` what can be delivered now.
    pub(super) fn segment<'a>(
        &mut self,
        seq: u32,
        len: u64,
        payload: &'a [u8],
        now: u64,
        out: &mut Vec<Delivery<'a>>,
    ) {
        self.start_at(seq);
        let offset = self.offset_of(seq);
        let Some((offset, len, data)) = self.trim(offset, len, payload) else {
            return;
        };
        if offset == self.next {
            out.push(Delivery {
                offset,
                len,
                data: Cow::Borrowed(data),
            });
            self.next += len;
            self.release(now, out);
            return;
        }
        match self.held.get(&offset) {
            Some(h) if h.len >= len => {}
            previous => {
                let replaced = previous.map_or(0, |h| h.len);
                self.held_bytes = self.held_bytes - replaced + len;
                self.held.insert(
                    offset,
                    Held {
                        len,
                        data: data.to_vec(),
                    },
                );
            }
        }
        self.hole_since.get_or_insert(now);
        while self.held_bytes > MAX_HELD_BYTES || self.held.len() > MAX_HELD_SEGMENTS {
            self.skip_hole(now, out);
        }
        if self
            .hole_since
            .is_some_and(|t| now.saturating_sub(t) >= HOLE_TIMEOUT_NS)
        {
            self.skip_hole(now, out);
        }
    }

    /// The part of `len` bytes at `offset` not delivered yet, or None.
    fn trim<'a>(&self, offset: i128, len: u64, payload: &'a [u8]) -> Option<(u64, u64, &'a [u8])> {
        let end = offset + i128::from(len);
        if len == 0 || end <= i128::from(self.next) {
            return None;
        }
        if offset >= i128::from(self.next) {
            return Some((offset as u64, len, payload));
        }
        let seen = (i128::from(self.next) - offset) as u64;
        let cut = usize::try_from(seen)
            .unwrap_or(usize::MAX)
            .min(payload.len());
        Some((self.next, len - seen, &payload[cut..]))
    }

    /// Delivers held segments that the stream has reached.
    fn release<'a>(&mut self, now: u64, out: &mut Vec<Delivery<'a>>) {
        while let Some(entry) = self.held.first_entry() {
            if *entry.key() > self.next {
                break;
            }
            let offset = *entry.key();
            let held = entry.remove();
            self.held_bytes -= held.len;
            if let Some((offset, len, data)) = self.trim(i128::from(offset), held.len, &held.data) {
                out.push(Delivery {
                    offset,
                    len,
                    data: Cow::Owned(data.to_vec()),
                });
                self.next = offset + len;
            }
        }
        self.hole_since = if self.held.is_empty() {
            None
        } else {
            Some(now)
        };
    }

    /// Gives up on the hole before the first held segment.
    fn skip_hole<'a>(&mut self, now: u64, out: &mut Vec<Delivery<'a>>) {
        if let Some((&offset, _)) = self.held.first_key_value() {
            self.missing += offset.saturating_sub(self.next);
            self.next = self.next.max(offset);
            self.release(now, out);
        }
    }

    /// The receiver acknowledged the bytes before `ack`: those the capture does not have
    /// it will never send again.
    pub(super) fn acknowledged<'a>(&mut self, ack: u32, now: u64, out: &mut Vec<Delivery<'a>>) {
        if self.base.is_none() {
            return;
        }
        let mut acked = self.offset_of(ack);
        // A FIN takes a sequence number of its own.
        if let Some(fin) = self.fin {
            acked = acked.min(i128::from(fin));
        }
        while acked > i128::from(self.next) {
            match self.held.first_key_value() {
                Some((&offset, _)) if i128::from(offset) <= acked => self.skip_hole(now, out),
                _ => {
                    let len = (acked - i128::from(self.next)) as u64;
                    out.push(Delivery {
                        offset: self.next,
                        len,
                        data: Cow::Borrowed(&[]),
                    });
                    self.missing += len;
                    self.next += len;
                }
            }
        }
    }

    /// Delivers everything held, skipping the holes (the connection is over).
    pub(super) fn flush<'a>(&mut self, now: u64, out: &mut Vec<Delivery<'a>>) {
        while !self.held.is_empty() {
            self.skip_hole(now, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(flow: &mut Flow, steps: &[(u32, &[u8])]) -> Vec<(u64, u64, Vec<u8>)> {
        let mut all = Vec::new();
        for (seq, data) in steps {
            let mut out = Vec::new();
            flow.segment(*seq, data.len() as u64, data, 0, &mut out);
            all.extend(
                out.into_iter()
                    .map(|d| (d.offset, d.len, d.data.into_owned())),
            );
        }
        all
    }

    #[test]
    fn in_order_retransmitted_and_overlapping_segments() {
        let mut f = Flow::default();
        f.start_at(100);
        let got = run(
            &mut f,
            &[(100, b"abc"), (100, b"abc"), (102, b"cdef"), (101, b"b")],
        );
        assert_eq!(got, vec![(0, 3, b"abc".to_vec()), (3, 3, b"def".to_vec())]);
    }

    #[test]
    fn out_of_order_segments_wait_for_the_hole() {
        let mut f = Flow::default();
        f.start_at(0);
        let got = run(&mut f, &[(3, b"def"), (6, b"g"), (0, b"abc")]);
        assert_eq!(
            got,
            vec![
                (0, 3, b"abc".to_vec()),
                (3, 3, b"def".to_vec()),
                (6, 1, b"g".to_vec())
            ]
        );
    }

    #[test]
    fn sequence_numbers_wrap() {
        let mut f = Flow::default();
        f.start_at(u32::MAX - 1);
        let got = run(&mut f, &[(0, b"cd"), (u32::MAX - 1, b"ab"), (2, b"e")]);
        assert_eq!(
            got,
            vec![
                (0, 2, b"ab".to_vec()),
                (2, 2, b"cd".to_vec()),
                (4, 1, b"e".to_vec())
            ]
        );
    }

    #[test]
    fn an_acknowledged_hole_is_skipped() {
        let mut f = Flow::default();
        f.start_at(0);
        assert!(run(&mut f, &[(0, b"ab"), (4, b"ef")]).len() == 1);
        let mut out = Vec::new();
        f.acknowledged(6, 0, &mut out);
        let got: Vec<_> = out
            .into_iter()
            .map(|d| (d.offset, d.len, d.data.into_owned()))
            .collect();
        assert_eq!(got, vec![(4, 2, b"ef".to_vec())]);
        assert_eq!(f.missing, 2);
        // A hole at the end, acknowledged, is a delivery without bytes.
        let mut out = Vec::new();
        f.acknowledged(9, 0, &mut out);
        assert_eq!((out[0].offset, out[0].len, out[0].data.len()), (6, 3, 0));
    }

    #[test]
    fn a_hole_is_given_up_after_the_timeout() {
        let mut f = Flow::default();
        f.start_at(0);
        let mut out = Vec::new();
        f.segment(0, 2, b"ab", 0, &mut out);
        f.segment(4, 2, b"ef", 1_000, &mut out);
        f.segment(6, 2, b"gh", HOLE_TIMEOUT_NS / 2, &mut out);
        assert_eq!(out.len(), 1, "still waiting for bytes 2..4");
        f.segment(8, 2, b"ij", HOLE_TIMEOUT_NS + 1_000, &mut out);
        let offsets: Vec<u64> = out.iter().map(|d| d.offset).collect();
        assert_eq!(offsets, [0, 4, 6, 8]);
        assert_eq!(f.missing, 2);
    }

    #[test]
    fn held_bytes_are_bounded() {
        let mut f = Flow::default();
        f.start_at(0);
        let big = vec![b'x'; 600_000];
        let got = run(&mut f, &[(10, &big), (700_000, &big)]);
        assert_eq!(
            got.len(),
            1,
            "the first held segment goes once the bound is passed"
        );
        assert_eq!(got[0].0, 10);
        assert!(f.held_bytes <= MAX_HELD_BYTES);
    }
}
