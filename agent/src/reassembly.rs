//! Per-direction stream reassembly: turns the kernel's data events into the ordered
//! byte stream a protocol parser reads, with the holes in it made explicit.
//!
//! Every data event carries the stream offset of its first byte (counted per direction
//! since the programs first saw the socket), the number of bytes the syscall really
//! moved and a captured prefix of them. [`StreamCursor`] compares the offset with the
//! one it expects and tells the parser, in order: how many bytes were lost before the
//! event (events the ring buffer dropped), the captured bytes, and how many bytes of the
//! event were not captured. An event that starts before the expected offset overlaps
//! what was already delivered (its first bytes are dropped), or, when it lies wholly
//! before, means the kernel's counter restarted (the descriptor was reused): the parser
//! is told to resynchronise, because the size of the hole is unknown.
//!
//! Written by hand because no library does this: TCP reassembly crates work on
//! segments with sequence numbers and keep out-of-order data in memory, while sonde
//! gets whole syscalls with a captured prefix and must never buffer payload. The cursor
//! keeps one number per direction, whatever the input.
//!
//! Events of one direction reach user space in the order the programs submitted them.
//! Two threads writing to one socket on two CPUs can still submit out of offset order;
//! the later-offset event then reads as a gap and the earlier one as a resync, which
//! loses those exchanges rather than mixing their bytes.

/// One instruction for the parser, in stream order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    /// This many bytes passed without being seen.
    Gap(u64),
    /// An unknown number of bytes is missing.
    Resync,
    /// These bytes follow in the stream.
    Data(&'a [u8]),
}

/// What one data event means for the stream: up to three pieces, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Advance<'a> {
    /// A gap or a resync before the event's bytes.
    pub before: Option<Piece<'a>>,
    /// The captured bytes not seen before (may be empty).
    pub data: &'a [u8],
    /// Bytes of the event after `data` that were not captured.
    pub uncaptured: u64,
}

impl<'a> Advance<'a> {
    /// The pieces in stream order, empty ones left out.
    pub fn pieces(&self) -> impl Iterator<Item = Piece<'a>> + use<'a> {
        let data = (!self.data.is_empty()).then_some(Piece::Data(self.data));
        let after = (self.uncaptured > 0).then_some(Piece::Gap(self.uncaptured));
        [self.before, data, after].into_iter().flatten()
    }
}

/// Where one direction of one connection stands: the offset of the next byte expected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamCursor {
    next: u64,
}

impl StreamCursor {
    pub fn new() -> Self {
        Self::default()
    }

    /// The stream offset of the next byte expected.
    pub fn next_offset(&self) -> u64 {
        self.next
    }

    /// Accounts for one data event: `offset` of its first byte, `len` bytes moved by the
    /// syscall, `captured` the copied prefix (anything beyond `len` is ignored).
    pub fn advance<'a>(&mut self, offset: u64, len: u64, captured: &'a [u8]) -> Advance<'a> {
        let captured =
            &captured[..usize::try_from(len).map_or(captured.len(), |l| l.min(captured.len()))];
        let end = offset.saturating_add(len);
        let mut advance = Advance {
            before: None,
            data: captured,
            uncaptured: len - captured.len() as u64,
        };
        if len == 0 {
            advance.uncaptured = 0;
            return advance;
        }
        if offset > self.next {
            advance.before = Some(Piece::Gap(offset - self.next));
        } else if offset < self.next {
            if end <= self.next {
                advance.before = Some(Piece::Resync);
            } else {
                let seen = self.next - offset;
                if seen < captured.len() as u64 {
                    advance.data = &captured[seen as usize..];
                } else {
                    advance.data = &[];
                    advance.uncaptured = end - self.next;
                }
            }
        }
        self.next = end;
        advance
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(c: &mut StreamCursor, offset: u64, len: u64, data: &[u8]) -> Vec<String> {
        c.advance(offset, len, data)
            .pieces()
            .map(|p| match p {
                Piece::Gap(n) => format!("gap {n}"),
                Piece::Resync => "resync".to_owned(),
                Piece::Data(d) => format!("data {}", String::from_utf8_lossy(d)),
            })
            .collect()
    }

    #[test]
    fn in_order_events_are_passed_through() {
        let mut c = StreamCursor::new();
        assert_eq!(pieces(&mut c, 0, 3, b"abc"), ["data abc"]);
        assert_eq!(pieces(&mut c, 3, 2, b"de"), ["data de"]);
        assert_eq!(c.next_offset(), 5);
    }

    #[test]
    fn uncaptured_tail_is_a_gap_after_the_data() {
        let mut c = StreamCursor::new();
        assert_eq!(pieces(&mut c, 0, 10, b"abcd"), ["data abcd", "gap 6"]);
        assert_eq!(pieces(&mut c, 10, 5, b""), ["gap 5"]);
        assert_eq!(c.next_offset(), 15);
    }

    #[test]
    fn lost_events_are_a_gap_before_the_data() {
        let mut c = StreamCursor::new();
        assert_eq!(pieces(&mut c, 0, 2, b"ab"), ["data ab"]);
        assert_eq!(pieces(&mut c, 7, 4, b"xy"), ["gap 5", "data xy", "gap 2"]);
        assert_eq!(c.next_offset(), 11);
    }

    #[test]
    fn lost_first_events_are_a_gap_from_zero() {
        let mut c = StreamCursor::new();
        assert_eq!(pieces(&mut c, 100, 2, b"ab"), ["gap 100", "data ab"]);
    }

    #[test]
    fn overlap_drops_the_bytes_already_seen() {
        let mut c = StreamCursor::new();
        assert_eq!(pieces(&mut c, 0, 4, b"abcd"), ["data abcd"]);
        assert_eq!(pieces(&mut c, 2, 4, b"cdef"), ["data ef"]);
        assert_eq!(c.next_offset(), 6);
    }

    #[test]
    fn overlap_beyond_the_captured_prefix_leaves_only_a_gap() {
        let mut c = StreamCursor::new();
        assert_eq!(pieces(&mut c, 0, 10, b"abcdefghij"), ["data abcdefghij"]);
        // Bytes 4..14 moved, 4..6 captured, 4..10 already seen: 10..14 are missing.
        assert_eq!(pieces(&mut c, 4, 10, b"ef"), ["gap 4"]);
        assert_eq!(c.next_offset(), 14);
    }

    #[test]
    fn event_wholly_before_means_resync() {
        let mut c = StreamCursor::new();
        assert_eq!(pieces(&mut c, 0, 100, b"x"), ["data x", "gap 99"]);
        assert_eq!(pieces(&mut c, 0, 3, b"new"), ["resync", "data new"]);
        assert_eq!(c.next_offset(), 3);
        assert_eq!(pieces(&mut c, 3, 1, b"!"), ["data !"]);
    }

    #[test]
    fn captured_longer_than_len_is_clamped() {
        let mut c = StreamCursor::new();
        assert_eq!(pieces(&mut c, 0, 2, b"abcdef"), ["data ab"]);
        assert_eq!(c.next_offset(), 2);
    }

    #[test]
    fn empty_event_changes_nothing() {
        let mut c = StreamCursor::new();
        assert_eq!(pieces(&mut c, 0, 2, b"ab"), ["data ab"]);
        assert!(pieces(&mut c, 0, 0, b"").is_empty());
        assert!(pieces(&mut c, 50, 0, b"").is_empty());
        assert_eq!(c.next_offset(), 2);
    }

    #[test]
    fn offsets_near_u64_max_do_not_overflow() {
        let mut c = StreamCursor::new();
        let p = pieces(&mut c, u64::MAX - 1, 10, b"ab");
        assert_eq!(
            p,
            [
                format!("gap {}", u64::MAX - 1),
                "data ab".to_owned(),
                "gap 8".to_owned()
            ]
        );
        assert_eq!(c.next_offset(), u64::MAX);
    }
}
