//! Methods: which side sends each one, the login in connection.start-ok, and what each
//! method the parser understands does to the connection and channel state.

use agent_common::Direction;
use amq_protocol::protocol::{AMQPClass, basic, channel, confirm, connection, exchange, queue};

use super::*;

/// Which side sends a method, when only one side does.
pub(super) fn sender(class: &AMQPClass) -> Option<Role> {
    use Role::{Client, Server};
    Some(match class {
        AMQPClass::Connection(m) => match m {
            connection::AMQPMethod::Start(_)
            | connection::AMQPMethod::Secure(_)
            | connection::AMQPMethod::Tune(_)
            | connection::AMQPMethod::OpenOk(_)
            | connection::AMQPMethod::Blocked(_)
            | connection::AMQPMethod::Unblocked(_)
            | connection::AMQPMethod::UpdateSecretOk(_) => Server,
            connection::AMQPMethod::StartOk(_)
            | connection::AMQPMethod::SecureOk(_)
            | connection::AMQPMethod::TuneOk(_)
            | connection::AMQPMethod::Open(_)
            | connection::AMQPMethod::UpdateSecret(_) => Client,
            connection::AMQPMethod::Close(_) | connection::AMQPMethod::CloseOk(_) => return None,
        },
        AMQPClass::Channel(m) => match m {
            channel::AMQPMethod::Open(_) => Client,
            channel::AMQPMethod::OpenOk(_) => Server,
            _ => return None,
        },
        AMQPClass::Exchange(m) => match m {
            exchange::AMQPMethod::Declare(_)
            | exchange::AMQPMethod::Delete(_)
            | exchange::AMQPMethod::Bind(_)
            | exchange::AMQPMethod::Unbind(_) => Client,
            _ => Server,
        },
        AMQPClass::Queue(m) => match m {
            queue::AMQPMethod::Declare(_)
            | queue::AMQPMethod::Bind(_)
            | queue::AMQPMethod::Purge(_)
            | queue::AMQPMethod::Delete(_)
            | queue::AMQPMethod::Unbind(_) => Client,
            _ => Server,
        },
        AMQPClass::Basic(m) => match m {
            basic::AMQPMethod::Qos(_)
            | basic::AMQPMethod::Consume(_)
            | basic::AMQPMethod::Publish(_)
            | basic::AMQPMethod::Get(_)
            | basic::AMQPMethod::Reject(_)
            | basic::AMQPMethod::RecoverAsync(_)
            | basic::AMQPMethod::Recover(_) => Client,
            basic::AMQPMethod::QosOk(_)
            | basic::AMQPMethod::ConsumeOk(_)
            | basic::AMQPMethod::Return(_)
            | basic::AMQPMethod::Deliver(_)
            | basic::AMQPMethod::GetOk(_)
            | basic::AMQPMethod::GetEmpty(_)
            | basic::AMQPMethod::RecoverOk(_) => Server,
            basic::AMQPMethod::Cancel(_)
            | basic::AMQPMethod::CancelOk(_)
            | basic::AMQPMethod::Ack(_)
            | basic::AMQPMethod::Nack(_) => return None,
        },
        AMQPClass::Confirm(m) => match m {
            confirm::AMQPMethod::Select(_) => Client,
            confirm::AMQPMethod::SelectOk(_) => Server,
        },
        AMQPClass::Tx(m) => match m {
            amq_protocol::protocol::tx::AMQPMethod::Select(_)
            | amq_protocol::protocol::tx::AMQPMethod::Commit(_)
            | amq_protocol::protocol::tx::AMQPMethod::Rollback(_) => Client,
            _ => Server,
        },
        AMQPClass::Access(m) => match m {
            amq_protocol::protocol::access::AMQPMethod::Request(_) => Client,
            amq_protocol::protocol::access::AMQPMethod::RequestOk(_) => Server,
        },
    })
}

/// The user name in a connection.start-ok response.
pub(super) fn login(mechanism: &str, response: &[u8]) -> Option<String> {
    match mechanism {
        // authzid NUL authcid NUL password
        "PLAIN" => {
            let mut parts = response.split(|b| *b == 0);
            let _authzid = parts.next()?;
            let user = parts.next()?;
            Some(String::from_utf8_lossy(user).into_owned())
        }
        // A field table without its length prefix, holding LOGIN and PASSWORD.
        "AMQPLAIN" => {
            let mut table = Vec::with_capacity(response.len() + 4);
            table.extend_from_slice(&u32::try_from(response.len()).ok()?.to_be_bytes());
            table.extend_from_slice(response);
            if !decode::nesting_is_bounded(&table) {
                return None;
            }
            let (_, t) = amq_protocol::types::parsing::parse_field_table(table.as_slice()).ok()?;
            decode::headers(&t)
                .into_iter()
                .find(|(k, _)| k == "LOGIN")
                .map(|(_, v)| v)
        }
        _ => None,
    }
}

impl AmqpParser {
    pub(super) fn role_of(&self) -> Role {
        self.role().unwrap_or(Role::Client)
    }

    /// A method frame, decoded.
    pub(super) fn method(&mut self, dir: Direction, channel_id: u16, class: AMQPClass, ts_ns: u64) {
        if let Some(role) = sender(&class) {
            let sent_by_client = role == Role::Client;
            match self.client_dir {
                None => self.client_dir = Some(if sent_by_client { dir } else { dir.opposite() }),
                Some(c) if (c == dir) != sent_by_client => return,
                Some(_) => {}
            }
        }
        let Some(client_dir) = self.client_dir else {
            return;
        };
        let from_client = dir == client_dir;
        // A method ends any content of this direction on the channel whose header did
        // not say its size (it was not understood).
        self.end_unsized_content(channel_id, from_client, ts_ns);
        match class {
            AMQPClass::Connection(m) => self.connection_method(m, from_client, ts_ns),
            AMQPClass::Channel(channel::AMQPMethod::Close(c)) => {
                let reason = CloseReason {
                    reply_code: c.reply_code,
                    reply_text: c.reply_text.as_str().to_owned(),
                    class_id: c.class_id,
                    method_id: c.method_id,
                    by: if from_client {
                        Role::Client
                    } else {
                        Role::Server
                    },
                };
                self.finish_channel(channel_id, Some(reason), ts_ns, true, None);
            }
            AMQPClass::Channel(_) => {}
            AMQPClass::Confirm(confirm::AMQPMethod::Select(_)) => {
                if let Some(ch) = self.channel(channel_id)
                    && !ch.confirms
                {
                    ch.confirms = true;
                    ch.next_seq = 1;
                }
            }
            AMQPClass::Exchange(exchange::AMQPMethod::Declare(m)) => {
                let change = Topology::ExchangeDeclare {
                    exchange: m.exchange.as_str().to_owned(),
                    kind: m.kind.as_str().to_owned(),
                };
                self.topology(channel_id, change, ts_ns);
            }
            AMQPClass::Queue(queue::AMQPMethod::DeclareOk(m)) => {
                let name = m.queue.as_str().to_owned();
                if let Some(ch) = self.channel(channel_id) {
                    ch.last_queue = Some(name.clone());
                }
                self.topology(channel_id, Topology::QueueDeclare { queue: name }, ts_ns);
            }
            AMQPClass::Queue(queue::AMQPMethod::Bind(m)) => {
                let queue = self.queue_name(channel_id, m.queue.as_str());
                let change = Topology::QueueBind {
                    queue,
                    exchange: m.exchange.as_str().to_owned(),
                    routing_key: m.routing_key.as_str().to_owned(),
                };
                self.topology(channel_id, change, ts_ns);
            }
            AMQPClass::Basic(m) => self.basic_method(channel_id, m, from_client, ts_ns),
            _ => {}
        }
        if !from_client {
            self.broker_answered(channel_id);
        }
    }

    pub(super) fn topology(&mut self, channel: u16, change: Topology, ts_ns: u64) {
        let role = self.role_of();
        self.push_finished(AmqpOperation::Topology {
            role,
            channel,
            change,
            ts_ns,
        });
    }

    /// What a queue name means on a channel: empty is the last queue declared there.
    pub(super) fn queue_name(&self, channel: u16, name: &str) -> String {
        if name.is_empty()
            && let Some(q) = self
                .channels
                .get(&channel)
                .and_then(|c| c.last_queue.as_ref())
        {
            return q.clone();
        }
        name.to_owned()
    }

    pub(super) fn connection_method(
        &mut self,
        m: connection::AMQPMethod,
        from_client: bool,
        ts_ns: u64,
    ) {
        match m {
            connection::AMQPMethod::StartOk(s) => {
                self.user = login(s.mechanism.as_str(), s.response.as_bytes());
            }
            connection::AMQPMethod::TuneOk(t) => self.frame_max = Some(t.frame_max),
            connection::AMQPMethod::Open(o) => {
                self.vhost = Some(o.virtual_host.as_str().to_owned())
            }
            connection::AMQPMethod::Close(c) => {
                let reason = CloseReason {
                    reply_code: c.reply_code,
                    reply_text: c.reply_text.as_str().to_owned(),
                    class_id: c.class_id,
                    method_id: c.method_id,
                    by: if from_client {
                        Role::Client
                    } else {
                        Role::Server
                    },
                };
                let mut ids: Vec<u16> = self.channels.keys().copied().collect();
                ids.sort_unstable();
                let error = reason.is_error().then_some(&reason);
                for id in ids {
                    self.finish_channel(id, error.cloned(), ts_ns, false, None);
                }
                self.channels.clear();
                self.consumers.clear();
                if reason.is_error() {
                    let (role, vhost) = (self.role_of(), self.vhost.clone());
                    self.push_finished(AmqpOperation::ConnectionError {
                        role,
                        reason,
                        ts_ns,
                        vhost,
                    });
                }
            }
            _ => {}
        }
    }

    pub(super) fn basic_method(
        &mut self,
        channel_id: u16,
        m: basic::AMQPMethod,
        from_client: bool,
        ts_ns: u64,
    ) {
        let queue_of =
            |s: &Self, q: &amq_protocol::types::ShortString| s.queue_name(channel_id, q.as_str());
        match m {
            basic::AMQPMethod::Publish(p) if from_client => {
                let number = self.publishes;
                self.publishes += 1;
                let Some(ch) = self.channel(channel_id) else {
                    return;
                };
                let seq = (ch.confirms && !ch.seq_lost).then(|| {
                    ch.next_seq += 1;
                    ch.next_seq - 1
                });
                if ch.confirms && ch.seq_lost {
                    ch.next_seq += 1;
                }
                let message = Message {
                    exchange: p.exchange.as_str().to_owned(),
                    routing_key: p.routing_key.as_str().to_owned(),
                    ..Message::default()
                };
                self.begin_content(
                    channel_id,
                    true,
                    ContentOf::Publish {
                        mandatory: p.mandatory,
                        seq,
                        number,
                    },
                    message,
                    ts_ns,
                );
            }
            basic::AMQPMethod::Deliver(dl) if !from_client => {
                let message = Message {
                    exchange: dl.exchange.as_str().to_owned(),
                    routing_key: dl.routing_key.as_str().to_owned(),
                    ..Message::default()
                };
                let of = ContentOf::Deliver {
                    consumer_tag: dl.consumer_tag.as_str().to_owned(),
                    delivery_tag: dl.delivery_tag,
                    redelivered: dl.redelivered,
                };
                self.begin_content(channel_id, false, of, message, ts_ns);
            }
            basic::AMQPMethod::GetOk(g) if !from_client => {
                let request = self
                    .channel(channel_id)
                    .and_then(|ch| ch.pending_gets.pop_front());
                let message = Message {
                    exchange: g.exchange.as_str().to_owned(),
                    routing_key: g.routing_key.as_str().to_owned(),
                    ..Message::default()
                };
                let of = ContentOf::GetOk {
                    delivery_tag: g.delivery_tag,
                    redelivered: g.redelivered,
                    no_ack: request.as_ref().is_some_and(|r| r.1),
                    queue: request.map(|r| r.0),
                };
                self.begin_content(channel_id, false, of, message, ts_ns);
            }
            basic::AMQPMethod::GetEmpty(_) if !from_client => {
                if let Some(ch) = self.channel(channel_id) {
                    ch.pending_gets.pop_front();
                }
            }
            basic::AMQPMethod::Return(r) if !from_client => {
                self.returned(channel_id, &r, ts_ns);
                let message = Message {
                    exchange: r.exchange.as_str().to_owned(),
                    routing_key: r.routing_key.as_str().to_owned(),
                    ..Message::default()
                };
                self.begin_content(channel_id, false, ContentOf::Return, message, ts_ns);
            }
            basic::AMQPMethod::Get(g) if from_client => {
                let queue = queue_of(self, &g.queue);
                if let Some(ch) = self.channel(channel_id)
                    && ch.pending_gets.len() < MAX_PENDING_REQUESTS
                {
                    ch.pending_gets.push_back((queue, g.no_ack));
                }
            }
            basic::AMQPMethod::Consume(c) if from_client => {
                let queue = queue_of(self, &c.queue);
                let tag = c.consumer_tag.as_str().to_owned();
                if !tag.is_empty() {
                    self.add_consumer(channel_id, tag.clone(), Some(queue.clone()), c.no_ack);
                }
                if !c.nowait
                    && let Some(ch) = self.channel(channel_id)
                    && ch.pending_consumes.len() < MAX_PENDING_REQUESTS
                {
                    ch.pending_consumes.push_back((queue, tag, c.no_ack));
                }
            }
            basic::AMQPMethod::ConsumeOk(ok) if !from_client => {
                let request = self
                    .channel(channel_id)
                    .and_then(|ch| ch.pending_consumes.pop_front());
                if let Some((queue, _, no_ack)) = request {
                    self.add_consumer(
                        channel_id,
                        ok.consumer_tag.as_str().to_owned(),
                        Some(queue),
                        no_ack,
                    );
                }
            }
            basic::AMQPMethod::CancelOk(c) => {
                self.consumers
                    .remove(&(channel_id, c.consumer_tag.as_str().to_owned()));
            }
            basic::AMQPMethod::Ack(a) if from_client => {
                self.settle(channel_id, a.delivery_tag, a.multiple, Outcome::Ack, ts_ns)
            }
            basic::AMQPMethod::Nack(n) if from_client => {
                let outcome = Outcome::Nack { requeue: n.requeue };
                self.settle(channel_id, n.delivery_tag, n.multiple, outcome, ts_ns);
            }
            basic::AMQPMethod::Reject(r) if from_client => self.settle(
                channel_id,
                r.delivery_tag,
                false,
                Outcome::Reject { requeue: r.requeue },
                ts_ns,
            ),
            basic::AMQPMethod::Ack(a) => {
                self.confirm(channel_id, a.delivery_tag, a.multiple, true, ts_ns)
            }
            basic::AMQPMethod::Nack(n) => {
                self.confirm(channel_id, n.delivery_tag, n.multiple, false, ts_ns)
            }
            _ => {}
        }
    }
}
