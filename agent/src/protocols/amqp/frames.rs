//! AMQP framing, read by hand: the protocol header, 7-octet frame headers, payloads
//! and frame-end octets per direction; the scan for frame boundaries after a loss of
//! sync; and the layout of a skipped body into the frames its sender must have used.

use agent_common::Direction;
use amq_protocol::protocol::{AMQPClass, connection};

use super::*;

/// Where a direction is in its stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    /// Nothing read yet.
    Fresh,
    /// Reading the 8-octet protocol header (octets so far in `head`).
    ProtocolHeader,
    /// Reading a 7-octet frame header (octets so far in `head`).
    FrameHeader,
    /// Inside a frame's payload.
    Payload,
    /// Expecting the frame-end octet.
    FrameEnd,
    /// Sync lost: scanning for frame boundaries.
    Lost,
    /// Nothing more to parse in this direction.
    Stopped,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct FrameHead {
    pub(super) kind: u8,
    pub(super) channel: u16,
    pub(super) size: u32,
}

impl FrameHead {
    fn parse(b: &[u8]) -> Self {
        FrameHead {
            kind: b[0],
            channel: u16::from_be_bytes([b[1], b[2]]),
            size: u32::from_be_bytes([b[3], b[4], b[5], b[6]]),
        }
    }

    fn bytes(&self) -> [u8; 7] {
        let c = self.channel.to_be_bytes();
        let s = self.size.to_be_bytes();
        [self.kind, c[0], c[1], s[0], s[1], s[2], s[3]]
    }

    /// Plausible on its own: a known type, heartbeats empty on channel 0, content on a
    /// channel other than 0, room for a method's class and method ids.
    fn is_sane(&self, max_size: u32) -> bool {
        self.size <= max_size
            && match self.kind {
                FRAME_METHOD => self.size >= 4,
                FRAME_HEADER => self.size >= 14 && self.channel != 0,
                FRAME_BODY => self.channel != 0,
                FRAME_HEARTBEAT => self.size == 0 && self.channel == 0,
                _ => false,
            }
    }
}

/// One direction of the connection.
#[derive(Debug)]
pub(super) struct Half {
    pub(super) phase: Phase,
    /// Protocol-header or frame-header octets so far.
    pub(super) head: Vec<u8>,
    /// The frame header the parser expects next, after laying out a skipped body.
    pub(super) expected_head: Option<[u8; 7]>,
    pub(super) frame: FrameHead,
    /// Payload octets still to come in the current frame.
    pub(super) left: u64,
    /// Method or content-header payload so far.
    pub(super) payload: Vec<u8>,
    /// Part of the payload was not captured (or it is too big): don't decode it.
    pub(super) damaged: bool,
    /// Time of the current frame's first octet.
    pub(super) frame_ns: u64,
    /// Scan window while sync is lost.
    pub(super) scan: Vec<u8>,
    /// The direction is at its very beginning (no gap, nothing parsed).
    pub(super) at_start: bool,
    /// Bytes scanned while the connection is undecided.
    pub(super) scanned: u64,
    /// Bytes to parse again after sync was found in the scan window.
    pub(super) replay: Option<Vec<u8>>,
}

impl Half {
    pub(super) fn new() -> Self {
        Half {
            phase: Phase::Fresh,
            head: Vec::with_capacity(8),
            expected_head: None,
            frame: FrameHead {
                kind: 0,
                channel: 0,
                size: 0,
            },
            left: 0,
            payload: Vec::new(),
            damaged: false,
            frame_ns: 0,
            scan: Vec::new(),
            at_start: true,
            scanned: 0,
            replay: None,
        }
    }
}

/// Outcome of looking for a frame at the start of a scan window.
pub(super) enum Candidate {
    No,
    NeedMore,
    /// Frames start here.
    Yes,
}

/// A well-formed frame at the start of a scan window.
pub(super) struct Checked {
    /// Offset of the octet after it.
    pub(super) next: usize,
    /// It is connection.start on channel 0.
    pub(super) is_start: bool,
    /// Its payload decoded as a method or a content header.
    pub(super) decoded: bool,
}

/// Whether `b` starts with a well-formed frame.
pub(super) fn check_frame(b: &[u8]) -> Result<Checked, Candidate> {
    if b.len() < 7 {
        return Err(Candidate::NeedMore);
    }
    let head = FrameHead::parse(b);
    if !head.is_sane(MAX_RESYNC_FRAME) {
        return Err(Candidate::No);
    }
    let end = 7 + head.size as usize;
    if b.len() <= end {
        return Err(Candidate::NeedMore);
    }
    if b[end] != FRAME_END {
        return Err(Candidate::No);
    }
    let payload = &b[7..end];
    let mut is_start = false;
    match head.kind {
        FRAME_METHOD => match decode::method(payload) {
            Some(AMQPClass::Connection(connection::AMQPMethod::Start(_))) => {
                is_start = head.channel == 0
            }
            Some(_) => {}
            None => return Err(Candidate::No),
        },
        FRAME_HEADER => match decode::content_header(payload) {
            Some(h) if h.class_id == 60 => {}
            _ => return Err(Candidate::No),
        },
        _ => {}
    }
    let decoded = matches!(head.kind, FRAME_METHOD | FRAME_HEADER);
    Ok(Checked {
        next: end + 1,
        is_start,
        decoded,
    })
}

/// Whether frames start at the beginning of `b`: two well-formed frames in a row, or a
/// lone connection.start at the very start of a direction. On a connection not yet
/// known to be AMQP, one of the two must be a method or content header that decoded:
/// heartbeats and bodies alone prove little.
pub(super) fn candidate(b: &[u8], at_start: bool, need_decoded: bool) -> Candidate {
    match check_frame(b) {
        Err(c) => c,
        Ok(first) if first.is_start && at_start => Candidate::Yes,
        Ok(first) => match check_frame(&b[first.next..]) {
            Err(c) => c,
            Ok(second) if need_decoded && !first.decoded && !second.decoded => Candidate::No,
            Ok(_) => Candidate::Yes,
        },
    }
}

/// Where a skip lands when the rest of a content is laid out in frames.
pub(super) enum Landing {
    /// At a frame boundary, in sync.
    Boundary,
    /// `seen` octets into the predicted frame header.
    Header { predicted: [u8; 7], seen: usize },
    /// Inside a body frame of `size`, `left` payload octets to come.
    Payload { size: u32, left: u64 },
    /// Just before a body frame's end octet.
    End { size: u32 },
    /// Past the content's end, `rest` octets into what followed.
    Beyond,
}

impl AmqpParser {
    /// The first byte of a direction decides how it is read.
    pub(super) fn start(&mut self, dir: Direction, first: u8) {
        let h = &mut self.halves[dir.index()];
        match first {
            b'A' => h.phase = Phase::ProtocolHeader,
            FRAME_METHOD | FRAME_HEADER | FRAME_BODY | FRAME_HEARTBEAT => h.phase = Phase::Lost,
            _ if self.decided.is_none() => self.not_amqp(),
            _ => {
                h.at_start = false;
                h.phase = Phase::Lost;
            }
        }
    }

    pub(super) fn feed_protocol_header(&mut self, dir: Direction, data: &[u8]) -> usize {
        let h = &mut self.halves[dir.index()];
        let want = PROTOCOL_HEADER.len() - h.head.len();
        let n = want.min(data.len());
        h.head.extend_from_slice(&data[..n]);
        if !PROTOCOL_HEADER.starts_with(&h.head) {
            h.head.clear();
            if self.decided.is_none() {
                self.not_amqp();
            } else {
                self.lose_sync(dir);
            }
            return n;
        }
        if h.head.len() == PROTOCOL_HEADER.len() {
            h.head.clear();
            h.at_start = false;
            h.phase = Phase::FrameHeader;
            self.decided = Some(true);
            if self.client_dir.is_none() {
                self.client_dir = Some(dir);
            } else if self.client_dir != Some(dir) {
                // A broker answers with its own header to refuse the version, then closes.
                self.halves[dir.index()].phase = Phase::Stopped;
            }
        }
        n
    }

    /// Largest frame accepted in sync.
    pub(super) fn frame_limit(&self) -> u32 {
        match self.frame_max {
            Some(0) => u32::MAX,
            Some(n) => n.max(4096),
            None => DEFAULT_FRAME_LIMIT,
        }
    }

    pub(super) fn feed_frame_header(&mut self, dir: Direction, data: &[u8], ts_ns: u64) -> usize {
        let limit = self.frame_limit();
        let d = dir.index();
        let h = &mut self.halves[d];
        if h.head.is_empty() {
            h.frame_ns = ts_ns;
        }
        let n = (7 - h.head.len()).min(data.len());
        h.head.extend_from_slice(&data[..n]);
        if h.head.len() < 7 {
            return n;
        }
        let head = FrameHead::parse(&h.head);
        h.head.clear();
        let expected = h.expected_head.take();
        if expected.is_some_and(|e| e != head.bytes())
            || !head.is_sane(limit.saturating_sub(8).max(MAX_RESYNC_FRAME))
        {
            self.lose_sync(dir);
            return n;
        }
        h.frame = head;
        h.left = u64::from(head.size);
        h.payload.clear();
        h.damaged = head.size > MAX_BUFFERED_PAYLOAD;
        h.phase = if head.size == 0 {
            Phase::FrameEnd
        } else {
            Phase::Payload
        };
        if head.kind == FRAME_BODY {
            self.body_frame_starts(dir, head);
        }
        n
    }

    pub(super) fn feed_payload(&mut self, dir: Direction, data: &[u8]) -> usize {
        let h = &mut self.halves[dir.index()];
        let n = usize::try_from(h.left).map_or(data.len(), |l| l.min(data.len()));
        h.left -= n as u64;
        if h.left == 0 {
            h.phase = Phase::FrameEnd;
        }
        if h.frame.kind == FRAME_BODY {
            self.body_bytes(dir, Some(&data[..n]), n as u64);
        } else if !h.damaged {
            h.payload.extend_from_slice(&data[..n]);
        }
        n
    }

    pub(super) fn frame_end(&mut self, dir: Direction, octet: u8, ts_ns: u64) {
        let d = dir.index();
        if octet != FRAME_END {
            self.lose_sync(dir);
            return;
        }
        let h = &mut self.halves[d];
        h.phase = Phase::FrameHeader;
        let frame = h.frame;
        let damaged = h.damaged;
        let payload = std::mem::take(&mut h.payload);
        let frame_ns = h.frame_ns;
        match frame.kind {
            FRAME_METHOD if !damaged => match decode::method(&payload) {
                Some(class) => self.method(dir, frame.channel, class, frame_ns),
                None => self.content_broken(dir, frame.channel),
            },
            FRAME_HEADER if !damaged => match decode::content_header(&payload) {
                Some(header) if header.class_id == 60 => self.content_header(
                    dir,
                    frame.channel,
                    header.body_size,
                    header.properties,
                    ts_ns,
                ),
                _ => self.content_header_unknown(dir, frame.channel),
            },
            FRAME_HEADER => self.content_header_unknown(dir, frame.channel),
            FRAME_BODY => self.body_frame_ends(dir, frame.channel, ts_ns),
            _ => {
                if damaged && frame.kind == FRAME_METHOD {
                    self.content_broken(dir, frame.channel);
                }
            }
        }
        let h = &mut self.halves[d];
        h.payload = payload;
        h.payload.clear();
        h.payload.shrink_to(4096);
    }

    pub(super) fn feed_lost(&mut self, dir: Direction, data: &[u8]) {
        let d = dir.index();
        self.count_undecided_scan(d, data.len() as u64);
        if !self.active() {
            return;
        }
        let h = &mut self.halves[d];
        h.scan.extend_from_slice(data);
        let mut pos = 0;
        let found = loop {
            if pos >= h.scan.len() {
                break false;
            }
            match candidate(
                &h.scan[pos..],
                h.at_start && pos == 0,
                self.decided.is_none(),
            ) {
                Candidate::No => {
                    if h.at_start && pos == 0 && self.decided.is_none() {
                        // The first bytes of a direction are not a frame.
                        self.not_amqp();
                        return;
                    }
                    pos += 1;
                }
                Candidate::NeedMore => break false,
                Candidate::Yes => break true,
            }
        };
        let h = &mut self.halves[d];
        if pos > 0 {
            h.at_start = false;
        }
        if found {
            let bytes = h.scan.split_off(pos);
            h.scan = Vec::new();
            h.phase = Phase::FrameHeader;
            h.head.clear();
            h.expected_head = None;
            h.replay = Some(bytes);
            self.decided = Some(true);
        } else {
            h.scan.drain(..pos);
        }
    }

    /// Sync is lost in direction `dir`: what was in flight there is dropped.
    pub(super) fn lose_sync(&mut self, dir: Direction) {
        let d = dir.index();
        let h = &mut self.halves[d];
        h.phase = Phase::Lost;
        h.at_start = false;
        h.head.clear();
        h.expected_head = None;
        h.payload = Vec::new();
        h.scan.clear();
        let Some(client_dir) = self.client_dir else {
            return;
        };
        let from_client = dir == client_dir;
        let mut ids: Vec<u16> = self.channels.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let ch = self.channels.get_mut(&id).expect("listed above");
            ch.content[slot(from_client)] = None;
            let mut done = Vec::new();
            if from_client {
                // Acks may be in the gap, and publishes too (sequence numbers drift).
                done.extend(ch.unacked.drain(..).map(AmqpOperation::Delivery));
                if ch.confirms {
                    ch.seq_lost = true;
                }
            } else {
                done.extend(
                    ch.awaiting_confirm
                        .drain(..)
                        .map(|(_, p)| AmqpOperation::Publish(p)),
                );
            }
            self.open_operations -= done.len();
            for op in done {
                self.push_finished(op);
            }
        }
    }

    /// Whether the rest of the current content can be laid out in frames: in or right
    /// after a body frame, or between frames with one content of this direction
    /// waiting for body.
    pub(super) fn can_lay_out(&self, dir: Direction) -> bool {
        self.layout_content(dir).is_some()
    }

    /// The channel and content a skip in direction `dir` belongs to, if it can be
    /// laid out.
    pub(super) fn layout_content(&self, dir: Direction) -> Option<(u16, &Content)> {
        let h = &self.halves[dir.index()];
        let from_client = self.client_dir? == dir;
        let channel_id = match h.phase {
            Phase::Payload | Phase::FrameEnd if h.frame.kind == FRAME_BODY => h.frame.channel,
            Phase::FrameHeader => {
                // Only one content of this direction may be waiting for body.
                let mut waiting = self.channels.iter().filter(|(_, ch)| {
                    ch.content[slot(from_client)]
                        .as_ref()
                        .is_some_and(|c| c.header_seen && c.expected.is_some())
                });
                let (id, _) = waiting.next()?;
                if waiting.next().is_some() {
                    return None;
                }
                *id
            }
            _ => return None,
        };
        let c = self.channels.get(&channel_id)?.content[slot(from_client)].as_ref()?;
        c.expected?;
        Some((channel_id, c))
    }

    /// `len` uncaptured bytes at a point where the rest of a content can be laid out.
    pub(super) fn skip_laid_out(&mut self, dir: Direction, len: u64, ts_ns: u64) {
        let d = dir.index();
        let Some((channel_id, c)) = self.layout_content(dir) else {
            self.lose_sync(dir);
            return;
        };
        let expected = c.expected.unwrap_or(0);
        let chunk = match self.frame_max {
            Some(n) if n > 8 => Some(u64::from(n - 8)),
            _ => c.chunk_hint.map(u64::from),
        };
        let h = &self.halves[d];
        let head_seen = h.head.len() as u64;
        // Octets of the content's frames still to come from here, simulated.
        let mut rem = len;
        let mut remaining_body = expected - c.received;
        let mut body = 0u64;
        let landing = 'sim: {
            match h.phase {
                Phase::Payload => {
                    // Current body frame: `left` payload octets then its end octet.
                    let left = h.left;
                    remaining_body -= left;
                    body += left;
                    rem -= left;
                    if rem == 0 {
                        break 'sim Landing::End { size: h.frame.size };
                    }
                    rem -= 1;
                }
                Phase::FrameEnd => rem -= 1,
                _ => {}
            }
            let mut first_head_seen = if h.phase == Phase::FrameHeader {
                head_seen
            } else {
                0
            };
            loop {
                if rem == 0 {
                    break 'sim Landing::Boundary;
                }
                if remaining_body == 0 {
                    break 'sim Landing::Beyond;
                }
                let Some(chunk) = chunk else {
                    break 'sim Landing::Beyond;
                };
                let size = chunk.min(remaining_body);
                let head = FrameHead {
                    kind: FRAME_BODY,
                    channel: channel_id,
                    size: size as u32,
                }
                .bytes();
                if first_head_seen > 0 && h.head[..] != head[..first_head_seen as usize] {
                    break 'sim Landing::Beyond;
                }
                let head_left = 7 - first_head_seen;
                first_head_seen = 0;
                if rem < head_left {
                    break 'sim Landing::Header {
                        predicted: head,
                        seen: (7 - head_left + rem) as usize,
                    };
                }
                rem -= head_left;
                if rem < size {
                    body += rem;
                    break 'sim Landing::Payload {
                        size: size as u32,
                        left: size - rem,
                    };
                }
                rem -= size;
                body += size;
                remaining_body -= size;
                if rem == 0 {
                    break 'sim Landing::End { size: size as u32 };
                }
                rem -= 1;
            }
        };
        // Account for the body octets passed, frame by frame collapsed into one count.
        if let Some(c) = self.content_mut(dir, channel_id) {
            c.capturing = false;
            c.received = c.received.saturating_add(body);
        }
        let complete = self
            .content_mut(dir, channel_id)
            .is_some_and(|c| c.received >= expected);
        if complete && !matches!(landing, Landing::Payload { .. } | Landing::End { .. }) {
            self.complete_content(dir, channel_id, ts_ns);
        } else if complete && matches!(landing, Landing::End { .. }) {
            // The end octet of the last frame is still to come; complete when it does.
        }
        let h = &mut self.halves[d];
        h.head.clear();
        h.expected_head = None;
        match landing {
            Landing::Boundary => h.phase = Phase::FrameHeader,
            Landing::Header { predicted, seen } => {
                h.phase = Phase::FrameHeader;
                h.head.extend_from_slice(&predicted[..seen]);
                h.expected_head = Some(predicted);
            }
            Landing::Payload { size, left } => {
                h.phase = Phase::Payload;
                h.frame = FrameHead {
                    kind: FRAME_BODY,
                    channel: channel_id,
                    size,
                };
                h.left = left;
            }
            Landing::End { size } => {
                h.phase = Phase::FrameEnd;
                h.frame = FrameHead {
                    kind: FRAME_BODY,
                    channel: channel_id,
                    size,
                };
                h.left = 0;
            }
            Landing::Beyond => self.lose_sync(dir),
        }
    }
}
