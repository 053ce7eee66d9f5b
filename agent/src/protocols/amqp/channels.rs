//! Channel state: contents (method, header, body) still arriving per channel and
//! direction, consumers, and the operations waiting for a confirm, a return or an ack;
//! how they complete, settle, and finish when a channel closes.

use std::collections::VecDeque;

use agent_common::Direction;
use amq_protocol::protocol::basic;

use super::*;

/// What a content belongs to.
#[derive(Clone, Debug)]
pub(super) enum ContentOf {
    Publish {
        mandatory: bool,
        seq: Option<u64>,
        /// The publish's number on the connection.
        number: u64,
    },
    Deliver {
        consumer_tag: String,
        delivery_tag: u64,
        redelivered: bool,
    },
    GetOk {
        delivery_tag: u64,
        redelivered: bool,
        queue: Option<String>,
        no_ack: bool,
    },
    Return,
}

/// A message whose content header or body is still arriving.
#[derive(Clone, Debug)]
pub(super) struct Content {
    pub(super) of: ContentOf,
    pub(super) message: Message,
    pub(super) start_ns: u64,
    /// The declared body size, once the content header was understood.
    pub(super) expected: Option<u64>,
    pub(super) header_seen: bool,
    pub(super) received: u64,
    /// Captured bytes are still contiguous.
    pub(super) capturing: bool,
    /// Payload size of the first body frame when it was not the last: the size
    /// the sender splits bodies into.
    pub(super) chunk_hint: Option<u32>,
}

#[derive(Debug, Default)]
pub(super) struct Channel {
    /// Confirm mode (confirm.select sent) and the next publish sequence number.
    pub(super) confirms: bool,
    pub(super) next_seq: u64,
    /// Publish sequence numbers are unreliable (client bytes were lost).
    pub(super) seq_lost: bool,
    /// Publishes waiting for their confirm, in sequence order.
    pub(super) awaiting_confirm: VecDeque<(u64, Publish)>,
    /// Mandatory publishes without confirms, waiting for a possible return.
    pub(super) awaiting_return: VecDeque<Publish>,
    /// Deliveries waiting for an ack, in delivery-tag order.
    pub(super) unacked: VecDeque<Delivery>,
    /// Content from the client (index 0) and from the broker (index 1).
    pub(super) content: [Option<Content>; 2],
    /// basic.consume sent, consume-ok awaited: (queue, consumer tag, no-ack).
    pub(super) pending_consumes: VecDeque<(String, String, bool)>,
    /// basic.get sent, get-ok or get-empty awaited: (queue, no-ack).
    pub(super) pending_gets: VecDeque<(String, bool)>,
    /// The last queue declared: what an empty queue name means on this channel.
    pub(super) last_queue: Option<String>,
    /// Consumer tags seen in deliveries whose basic.consume the parser never saw (at
    /// most [`MAX_UNKNOWN_CONSUMERS`]): an ack on the channel for a delivery it does not
    /// hold shows they ack, and their later deliveries wait for it.
    pub(super) unknown_consumers: Vec<String>,
}

impl Channel {
    fn open_operations(&self) -> usize {
        self.awaiting_confirm.len() + self.awaiting_return.len() + self.unacked.len()
    }
}

#[derive(Debug)]
pub(super) struct Consumer {
    /// `None` for a consumer learnt from its acks rather than from basic.consume.
    pub(super) queue: Option<String>,
    pub(super) no_ack: bool,
}

/// Content slot of a channel for frames sent by the client (0) or the broker (1).
pub(super) fn slot(from_client: bool) -> usize {
    if from_client { 0 } else { 1 }
}

impl AmqpParser {
    pub(super) fn push_finished(&mut self, op: AmqpOperation) {
        if self.finished.len() >= MAX_FINISHED {
            self.finished.pop_front();
        }
        self.finished.push_back(op);
    }

    /// The channel state for frames on `id`, created on first use while under the bound.
    pub(super) fn channel(&mut self, id: u16) -> Option<&mut Channel> {
        if !self.channels.contains_key(&id) && self.channels.len() >= MAX_CHANNELS {
            return None;
        }
        Some(self.channels.entry(id).or_default())
    }

    /// Makes room for one more open operation by finishing the oldest one.
    pub(super) fn reserve_open_operation(&mut self) {
        if self.open_operations < MAX_OPEN_OPERATIONS {
            self.open_operations += 1;
            return;
        }
        let oldest = self
            .channels
            .iter()
            .flat_map(|(id, ch)| {
                let p = ch.awaiting_confirm.front().map(|(_, p)| p.start_ns);
                let r = ch.awaiting_return.front().map(|p| p.start_ns);
                let u = ch.unacked.front().map(|d| d.start_ns);
                [(p, 0), (r, 1), (u, 2)]
                    .into_iter()
                    .filter_map(move |(t, k)| t.map(|t| (t, *id, k)))
            })
            .min();
        let Some((_, id, which)) = oldest else {
            self.open_operations += 1;
            return;
        };
        let ch = self.channels.get_mut(&id).expect("found above");
        let op = match which {
            0 => ch
                .awaiting_confirm
                .pop_front()
                .map(|(_, p)| AmqpOperation::Publish(p)),
            1 => ch.awaiting_return.pop_front().map(AmqpOperation::Publish),
            _ => ch.unacked.pop_front().map(AmqpOperation::Delivery),
        };
        if let Some(op) = op {
            self.push_finished(op);
        }
    }

    /// Finishes mandatory publishes whose return had time to come.
    pub(super) fn release_returns(&mut self, now_ns: u64) {
        if self.open_operations == 0 {
            return;
        }
        let mut done = Vec::new();
        for ch in self.channels.values_mut() {
            while ch
                .awaiting_return
                .front()
                .is_some_and(|p| p.end_ns.saturating_add(RETURN_WAIT_NS) <= now_ns)
            {
                done.push(ch.awaiting_return.pop_front().expect("checked"));
            }
        }
        done.sort_by_key(|p| p.start_ns);
        self.open_operations -= done.len();
        for p in done {
            self.push_finished(AmqpOperation::Publish(p));
        }
    }

    /// Closes channel `id`: its open operations finish (with the error, if the close
    /// was one), contents in flight are dropped. `report`: an error close of this
    /// channel alone is reported as a `ChannelError`. `ended`: the connection ended
    /// for this reason without closing the channel, so the open operations are
    /// incomplete; they end at `ts_ns` only when the socket really closed then.
    pub(super) fn finish_channel(
        &mut self,
        id: u16,
        reason: Option<CloseReason>,
        ts_ns: u64,
        report: bool,
        ended: Option<EndReason>,
    ) {
        let Some(mut ch) = self.channels.remove(&id) else {
            if let Some(r) = reason.filter(|r| report && r.is_error()) {
                self.push_channel_error(id, r, ts_ns);
            }
            return;
        };
        self.consumers.retain(|(c, _), _| *c != id);
        self.open_operations -= ch.open_operations();
        let error = reason.clone().filter(CloseReason::is_error);
        let end_ns = if ended.is_none_or(EndReason::socket_closed) {
            ts_ns
        } else {
            0
        };
        let mut done: Vec<AmqpOperation> = Vec::new();
        for (_, mut p) in ch.awaiting_confirm.drain(..) {
            p.error.clone_from(&error);
            p.end_ns = p.end_ns.max(end_ns);
            p.incomplete = ended;
            done.push(AmqpOperation::Publish(p));
        }
        for mut p in ch.awaiting_return.drain(..) {
            p.error.clone_from(&error);
            done.push(AmqpOperation::Publish(p));
        }
        for mut dl in ch.unacked.drain(..) {
            dl.error.clone_from(&error);
            dl.end_ns = dl.end_ns.max(end_ns);
            dl.incomplete = ended;
            done.push(AmqpOperation::Delivery(dl));
        }
        for op in done {
            self.push_finished(op);
        }
        if let Some(r) = error.filter(|_| report) {
            self.push_channel_error(id, r, ts_ns);
        }
    }

    pub(super) fn push_channel_error(&mut self, channel: u16, reason: CloseReason, ts_ns: u64) {
        let (role, vhost) = (self.role_of(), self.vhost.clone());
        self.push_finished(AmqpOperation::ChannelError {
            role,
            channel,
            reason,
            ts_ns,
            vhost,
        });
    }

    pub(super) fn add_consumer(
        &mut self,
        channel: u16,
        tag: String,
        queue: Option<String>,
        no_ack: bool,
    ) {
        let key = (channel, tag);
        if self.consumers.contains_key(&key) || self.consumers.len() < MAX_CONSUMERS {
            self.consumers.insert(key, Consumer { queue, no_ack });
        }
    }

    /// basic.return: the broker gives back a mandatory message it could not route.
    pub(super) fn returned(&mut self, channel_id: u16, r: &basic::Return, ts_ns: u64) {
        let Some(ch) = self.channels.get_mut(&channel_id) else {
            return;
        };
        let matches = |p: &Publish| {
            p.mandatory
                && p.returned.is_none()
                && p.message.exchange == r.exchange.as_str()
                && p.message.routing_key == r.routing_key.as_str()
        };
        let returned = Some((r.reply_code, r.reply_text.as_str().to_owned()));
        if let Some((_, p)) = ch.awaiting_confirm.iter_mut().find(|(_, p)| matches(p)) {
            p.returned = returned;
        } else if let Some(i) = ch.awaiting_return.iter().position(matches) {
            let mut p = ch.awaiting_return.remove(i).expect("index from position");
            p.returned = returned;
            p.end_ns = ts_ns;
            self.open_operations -= 1;
            self.push_finished(AmqpOperation::Publish(p));
        }
    }

    /// The broker sent a method on the channel: a return for the mandatory publishes
    /// before it would have come first.
    pub(super) fn broker_answered(&mut self, channel_id: u16) {
        let Some(ch) = self.channels.get_mut(&channel_id) else {
            return;
        };
        if ch.awaiting_return.is_empty() {
            return;
        }
        let done: Vec<Publish> = ch.awaiting_return.drain(..).collect();
        self.open_operations -= done.len();
        for p in done {
            self.push_finished(AmqpOperation::Publish(p));
        }
    }

    /// Publisher confirm from the broker for sequence number `tag` (and all before it
    /// with `multiple`; tag 0 with `multiple` means all).
    pub(super) fn confirm(
        &mut self,
        channel_id: u16,
        tag: u64,
        multiple: bool,
        ack: bool,
        ts_ns: u64,
    ) {
        let Some(ch) = self.channels.get_mut(&channel_id) else {
            return;
        };
        let done = take_settled(&mut ch.awaiting_confirm, tag, multiple, |(seq, _)| *seq);
        self.open_operations -= done.len();
        for (_, mut p) in done {
            p.confirmed = Some(ack);
            p.end_ns = ts_ns.max(p.end_ns);
            self.push_finished(AmqpOperation::Publish(p));
        }
    }

    /// The consumer settled delivery `tag` (and all before it with `multiple`; tag 0
    /// with `multiple` means all).
    pub(super) fn settle(
        &mut self,
        channel_id: u16,
        tag: u64,
        multiple: bool,
        outcome: Outcome,
        ts_ns: u64,
    ) {
        let Some(ch) = self.channels.get_mut(&channel_id) else {
            return;
        };
        let done = take_settled(&mut ch.unacked, tag, multiple, |d| d.delivery_tag);
        // An ack for a delivery of unknown ack mode, held or finished already: the
        // consumers of the channel ack, and their next deliveries wait for theirs as
        // any known consumer's do.
        let acks_unknown = done.is_empty()
            || done
                .iter()
                .any(|d| d.outcome == Some(Outcome::AckModeUnknown));
        if acks_unknown {
            for tag in std::mem::take(&mut ch.unknown_consumers) {
                self.add_consumer(channel_id, tag, None, false);
            }
        }
        self.open_operations -= done.len();
        for mut d in done {
            d.outcome = Some(outcome);
            d.end_ns = ts_ns.max(d.end_ns);
            self.push_finished(AmqpOperation::Delivery(d));
        }
    }

    /// Finishes the deliveries of unknown ack mode that waited [`ACK_MODE_WAIT_NS`]
    /// without an ack, with the outcome unknown and ending when they were delivered.
    pub(super) fn release_unknown_ack_modes(&mut self, now_ns: u64) {
        if self.open_operations == 0 {
            return;
        }
        let mut done = Vec::new();
        for ch in self.channels.values_mut() {
            let waited_enough = |d: &Delivery| {
                d.outcome == Some(Outcome::AckModeUnknown)
                    && d.end_ns.saturating_add(ACK_MODE_WAIT_NS) <= now_ns
            };
            if ch.unacked.iter().any(waited_enough) {
                let (gone, kept) = std::mem::take(&mut ch.unacked)
                    .into_iter()
                    .partition(waited_enough);
                ch.unacked = kept;
                done.extend(gone);
            }
        }
        done.sort_by_key(|d: &Delivery| d.start_ns);
        self.open_operations -= done.len();
        for d in done {
            self.push_finished(AmqpOperation::Delivery(d));
        }
    }

    pub(super) fn begin_content(
        &mut self,
        channel_id: u16,
        from_client: bool,
        of: ContentOf,
        message: Message,
        ts_ns: u64,
    ) {
        let Some(ch) = self.channel(channel_id) else {
            return;
        };
        ch.content[slot(from_client)] = Some(Content {
            of,
            message,
            start_ns: ts_ns,
            expected: None,
            header_seen: false,
            received: 0,
            capturing: true,
            chunk_hint: None,
        });
    }

    pub(super) fn content_mut(&mut self, dir: Direction, channel_id: u16) -> Option<&mut Content> {
        let from_client = self.client_dir? == dir;
        self.channels.get_mut(&channel_id)?.content[slot(from_client)].as_mut()
    }

    pub(super) fn take_content(&mut self, dir: Direction, channel_id: u16) -> Option<Content> {
        let from_client = self.client_dir? == dir;
        self.channels.get_mut(&channel_id)?.content[slot(from_client)].take()
    }

    /// A method frame that could not be understood: a content it starts would be
    /// misattributed, so the one in flight on the channel ends.
    pub(super) fn content_broken(&mut self, dir: Direction, channel_id: u16) {
        self.take_content(dir, channel_id);
    }

    pub(super) fn content_header(
        &mut self,
        dir: Direction,
        channel_id: u16,
        body_size: u64,
        properties: Properties,
        ts_ns: u64,
    ) {
        let Some(c) = self.content_mut(dir, channel_id) else {
            return;
        };
        if c.header_seen {
            self.take_content(dir, channel_id);
            return;
        }
        c.header_seen = true;
        c.expected = Some(body_size);
        c.message.body_size = body_size;
        c.message.properties = properties;
        if body_size == 0 {
            self.complete_content(dir, channel_id, ts_ns);
        }
    }

    pub(super) fn content_header_unknown(&mut self, dir: Direction, channel_id: u16) {
        let Some(c) = self.content_mut(dir, channel_id) else {
            return;
        };
        if c.header_seen {
            self.take_content(dir, channel_id);
            return;
        }
        c.header_seen = true;
    }

    /// A body frame's header: it must continue a content whose header came.
    pub(super) fn body_frame_starts(&mut self, dir: Direction, head: FrameHead) {
        let Some(c) = self.content_mut(dir, head.channel) else {
            return;
        };
        if !c.header_seen
            || c.expected
                .is_some_and(|e| c.received + u64::from(head.size) > e)
        {
            self.take_content(dir, head.channel);
            return;
        }
        if c.chunk_hint.is_none()
            && c.received == 0
            && c.expected.is_some_and(|e| e > u64::from(head.size))
        {
            c.chunk_hint = Some(head.size);
        }
    }

    /// Body octets of the current frame: `data` when captured, else `len` uncaptured.
    pub(super) fn body_bytes(&mut self, dir: Direction, data: Option<&[u8]>, len: u64) {
        let channel_id = self.halves[dir.index()].frame.channel;
        let Some(c) = self.content_mut(dir, channel_id) else {
            return;
        };
        match data {
            Some(d) if c.capturing => {
                let room = MAX_BODY_CAPTURE - c.message.body.len();
                c.message.body.extend_from_slice(&d[..room.min(d.len())]);
            }
            Some(_) => {}
            None => c.capturing = false,
        }
        c.received = c.received.saturating_add(len);
    }

    pub(super) fn body_frame_ends(&mut self, dir: Direction, channel_id: u16, ts_ns: u64) {
        let Some(c) = self.content_mut(dir, channel_id) else {
            return;
        };
        if c.expected.is_some_and(|e| c.received >= e) {
            self.complete_content(dir, channel_id, ts_ns);
        }
    }

    /// A method on a channel ends a content whose size was not understood.
    pub(super) fn end_unsized_content(&mut self, channel_id: u16, from_client: bool, ts_ns: u64) {
        let Some(ch) = self.channels.get_mut(&channel_id) else {
            return;
        };
        if let Some(c) = &mut ch.content[slot(from_client)]
            && c.header_seen
            && c.expected.is_none()
        {
            c.message.body_size = c.received;
            c.expected = Some(c.received);
            let dir = if from_client {
                self.client_dir
            } else {
                self.client_dir.map(Direction::opposite)
            };
            if let Some(dir) = dir {
                self.complete_content(dir, channel_id, ts_ns);
            }
        }
    }

    /// The content on `channel_id` in direction `dir` is complete.
    pub(super) fn complete_content(&mut self, dir: Direction, channel_id: u16, ts_ns: u64) {
        let Some(c) = self.take_content(dir, channel_id) else {
            return;
        };
        let role = self.role_of();
        let (vhost, user) = (self.vhost.clone(), self.user.clone());
        match c.of {
            ContentOf::Return => {}
            ContentOf::Publish {
                mandatory,
                seq,
                number,
            } => {
                let publish = Publish {
                    role,
                    channel: channel_id,
                    number,
                    message: c.message,
                    mandatory,
                    start_ns: c.start_ns,
                    end_ns: ts_ns,
                    confirmed: None,
                    returned: None,
                    error: None,
                    vhost,
                    user,
                    incomplete: None,
                };
                if let Some(seq) = seq {
                    self.reserve_open_operation();
                    if let Some(ch) = self.channels.get_mut(&channel_id) {
                        ch.awaiting_confirm.push_back((seq, publish));
                    }
                } else if mandatory {
                    self.reserve_open_operation();
                    if let Some(ch) = self.channels.get_mut(&channel_id) {
                        ch.awaiting_return.push_back(publish);
                    }
                } else {
                    self.push_finished(AmqpOperation::Publish(publish));
                }
            }
            ContentOf::Deliver {
                consumer_tag,
                delivery_tag,
                redelivered,
            } => {
                let consumer = self.consumers.get(&(channel_id, consumer_tag.clone()));
                let (queue, no_ack) = match consumer {
                    Some(cn) => (cn.queue.clone(), Some(cn.no_ack)),
                    None => (None, None),
                };
                if no_ack.is_none()
                    && let Some(ch) = self.channels.get_mut(&channel_id)
                    && ch.unknown_consumers.len() < MAX_UNKNOWN_CONSUMERS
                    && !ch.unknown_consumers.contains(&consumer_tag)
                {
                    ch.unknown_consumers.push(consumer_tag.clone());
                }
                let delivery = Delivery {
                    role,
                    kind: DeliveryKind::Deliver,
                    channel: channel_id,
                    consumer_tag: Some(consumer_tag),
                    queue,
                    delivery_tag,
                    redelivered,
                    message: c.message,
                    start_ns: c.start_ns,
                    end_ns: ts_ns,
                    outcome: match no_ack {
                        Some(true) => Some(Outcome::AutoAck),
                        Some(false) => None,
                        None => Some(Outcome::AckModeUnknown),
                    },
                    error: None,
                    vhost,
                    user,
                    incomplete: None,
                };
                self.delivered(channel_id, delivery, no_ack == Some(true));
            }
            ContentOf::GetOk {
                delivery_tag,
                redelivered,
                queue,
                no_ack,
            } => {
                let delivery = Delivery {
                    role,
                    kind: DeliveryKind::Get,
                    channel: channel_id,
                    consumer_tag: None,
                    queue,
                    delivery_tag,
                    redelivered,
                    message: c.message,
                    start_ns: c.start_ns,
                    end_ns: ts_ns,
                    outcome: no_ack.then_some(Outcome::AutoAck),
                    error: None,
                    vhost,
                    user,
                    incomplete: None,
                };
                self.delivered(channel_id, delivery, no_ack);
            }
        }
    }

    /// A delivery's content is complete; `settled` when no ack will be waited for (the
    /// consumer or get asked for none).
    pub(super) fn delivered(&mut self, channel_id: u16, delivery: Delivery, settled: bool) {
        if self.role() == Some(Role::Server) {
            self.push_finished(AmqpOperation::Dispatch(delivery.clone()));
        } else if self.started.len() < MAX_FINISHED {
            self.started.push(crate::protocols::Started::Delivery {
                delivery: Box::new(delivery.clone()),
                settled,
            });
        }
        if settled {
            self.push_finished(AmqpOperation::Delivery(delivery));
            return;
        }
        self.reserve_open_operation();
        match self.channels.get_mut(&channel_id) {
            Some(ch) => ch.unacked.push_back(delivery),
            None => {
                self.open_operations -= 1;
                self.push_finished(AmqpOperation::Delivery(delivery));
            }
        }
    }
}

/// Takes from `queue` (oldest first, tags ascending) the entry with tag `tag`, or with
/// `multiple` every entry up to `tag` (all of them for tag 0): the rule basic.ack,
/// basic.nack and the broker's confirms share.
pub(super) fn take_settled<T>(
    queue: &mut VecDeque<T>,
    tag: u64,
    multiple: bool,
    tag_of: impl Fn(&T) -> u64,
) -> Vec<T> {
    let mut done = Vec::new();
    if multiple {
        while queue.front().is_some_and(|e| tag == 0 || tag_of(e) <= tag) {
            done.extend(queue.pop_front());
        }
    } else if let Some(i) = queue.iter().position(|e| tag_of(e) == tag) {
        done.extend(queue.remove(i));
    }
    done
}
