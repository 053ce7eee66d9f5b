//! Exchanges in flight: requests waiting for their response, paired first in, first
//! out; what a loss of sync drops; when an exchange is finished and emitted.

use agent_common::Direction;

use super::*;

/// An exchange whose request or response is still arriving.
#[derive(Debug)]
pub(super) struct InFlight {
    pub(super) seq: u64,
    pub(super) exchange: HttpExchange,
    pub(super) request_done: bool,
    pub(super) response_done: bool,
    /// Lost to a gap: never emitted, kept only so that its response pairs with it.
    pub(super) dropped: bool,
}

impl HttpParser {
    pub(super) fn in_flight_mut(&mut self, seq: u64) -> Option<&mut InFlight> {
        let front = self.in_flight.front()?.seq;
        let i = usize::try_from(seq.checked_sub(front)?).ok()?;
        self.in_flight.get_mut(i)
    }

    pub(super) fn push_finished(&mut self, exchange: HttpExchange) {
        if self.finished.len() >= MAX_FINISHED {
            self.finished.pop_front();
        }
        self.finished.push_back(exchange);
    }

    /// Emits the exchanges at the front of the queue that are complete.
    pub(super) fn flush(&mut self) {
        while let Some(f) = self.in_flight.front() {
            if !(f.response_done && (f.request_done || f.dropped)) {
                break;
            }
            let f = self.in_flight.pop_front().expect("front exists");
            if !f.dropped {
                self.push_finished(f.exchange);
            }
        }
    }

    /// The direction lost sync: drop the message in flight and scan for the next start
    /// line. `placeholder`: a request was (at least partly) lost, so its response must
    /// be dropped when it comes, unless it already came and paired with nothing.
    pub(super) fn lose_sync(&mut self, dir: Direction, at_line_start: bool, placeholder: bool) {
        let is_request = self.is_request_dir(dir);
        let decided = self.decided == Some(true);
        let h = &mut self.halves[dir.index()];
        let before_loss_ns = h.last_ns;
        h.reset_buffer();
        h.gapped = true;
        h.phase = Phase::Lost { at_line_start };
        if !is_request && decided {
            h.resynced = true;
        }
        match h.target.take() {
            Some(seq) => {
                if let Some(f) = self.in_flight_mut(seq) {
                    f.dropped = true;
                    if is_request {
                        f.request_done = true;
                    } else {
                        f.response_done = true;
                    }
                }
            }
            None if placeholder && is_request && decided => {
                if self
                    .last_orphan_response_ns
                    .take()
                    .is_some_and(|t| t > before_loss_ns)
                {
                    return;
                }
                let role = self.role().expect("decided");
                self.push_in_flight(InFlight {
                    seq: 0,
                    exchange: HttpExchange::new(role, placeholder_head().into(), before_loss_ns),
                    request_done: true,
                    response_done: false,
                    dropped: true,
                });
            }
            None => {}
        }
        self.flush();
    }

    pub(super) fn push_in_flight(&mut self, mut f: InFlight) -> u64 {
        if self.in_flight.len() >= MAX_IN_FLIGHT
            && let Some(old) = self.in_flight.pop_front()
            && old.seq >= self.next_response_seq
        {
            self.responses_to_drop += 1;
        }
        f.seq = self.next_seq;
        self.next_seq += 1;
        self.in_flight.push_back(f);
        self.next_seq - 1
    }

    pub(super) fn on_request_head(
        &mut self,
        dir: Direction,
        head: RequestHead,
        framing: &FramingHeaders,
        ts_ns: u64,
    ) {
        let Some(framing) = head::request_framing(framing) else {
            return self.head_failed(dir);
        };
        self.decide(dir);
        let role = self.role().expect("decided");
        let start = self.halves[dir.index()].start_ns;
        let seq = self.push_in_flight(InFlight {
            seq: 0,
            exchange: HttpExchange::new(role, head.into(), start),
            request_done: false,
            response_done: false,
            dropped: false,
        });
        if let Some(f) = self.in_flight_mut(seq) {
            f.exchange.seq = seq;
        }
        let h = &mut self.halves[dir.index()];
        h.target = Some(seq);
        h.capturing = true;
        match framing {
            Framing::Length(n) => h.phase = Phase::Body(Body::Length(n)),
            Framing::Chunked => self.start_chunked(dir),
            _ => self.finish_message(dir, ts_ns),
        }
    }

    pub(super) fn on_response_head(
        &mut self,
        dir: Direction,
        head: ResponseHead,
        framing: &FramingHeaders,
        ts_ns: u64,
    ) {
        self.decide(dir.opposite());
        let start = self.halves[dir.index()].start_ns;
        if (100..200).contains(&head.status) && head.status != 101 {
            return;
        }
        let seq = self.pair_response(dir, start);
        if seq.is_none() {
            self.last_orphan_response_ns = Some(start);
        }
        let method = seq
            .and_then(|s| self.in_flight.iter().find(|f| f.seq == s))
            .map(|f| f.exchange.request.method.clone());
        let framing = head::response_framing(head.status, method.as_deref(), framing);
        if let Some(f) = seq.and_then(|s| self.in_flight_mut(s))
            && !f.dropped
        {
            f.exchange.response = Some(head);
            f.exchange.response_start_ns = start;
        }
        let h = &mut self.halves[dir.index()];
        h.target = seq;
        h.capturing = true;
        match framing {
            None => self.lose_sync(dir, true, false),
            Some(Framing::Length(n)) => h.phase = Phase::Body(Body::Length(n)),
            Some(Framing::Chunked) => self.start_chunked(dir),
            Some(Framing::UntilClose) => h.phase = Phase::Body(Body::UntilClose),
            Some(Framing::Empty | Framing::Interim) => self.finish_message(dir, ts_ns),
            Some(Framing::Tunnel) => {
                if let Some(upgrade) = seq.and_then(|s| self.take_h2c_upgrade(dir, s)) {
                    self.upgrade = Some(Box::new(upgrade));
                } else {
                    self.finish_message(dir, ts_ns);
                }
                if let Some(req) = self.request_dir {
                    let h = &self.halves[req.index()];
                    if h.target.is_some() {
                        let last = h.last_ns;
                        self.finish_message(req, last);
                    }
                }
                for h in &mut self.halves {
                    h.buf = Vec::new();
                    h.phase = Phase::Stopped;
                }
            }
        }
    }

    /// A 101 that switches the connection to HTTP/2 (`Upgrade: h2c`, RFC 7540 section
    /// 3.2) takes exchange `seq` out of the queue: its request was HTTP/1.1 and
    /// announced as such, its response comes as HTTP/2 frames on stream 1, so the
    /// exchange goes on in the HTTP/2 parser and the 101 is no response of its own.
    fn take_h2c_upgrade(&mut self, dir: Direction, seq: u64) -> Option<H2cUpgrade> {
        let f = self.in_flight_mut(seq)?;
        let h2c = f.exchange.response.as_ref().is_some_and(|r| {
            r.status == 101
                && r.header("upgrade")
                    .is_some_and(|u| u.trim().eq_ignore_ascii_case("h2c"))
        });
        if !h2c || f.dropped {
            return None;
        }
        // The request was sent whole before the switch; announce it if it is not yet.
        let req = dir.opposite();
        if self.halves[req.index()].target == Some(seq) {
            let last = self.halves[req.index()].last_ns;
            self.finish_message(req, last);
        }
        let i = self.in_flight.iter().position(|f| f.seq == seq)?;
        let mut f = self.in_flight.remove(i)?;
        f.exchange.response = None;
        f.exchange.response_start_ns = 0;
        self.halves[dir.index()].target = None;
        Some(H2cUpgrade {
            exchange: f.exchange,
            request_dir: req,
            next_seq: self.next_seq,
            after: Vec::new(),
            after_ns: 0,
        })
    }

    /// The exchange a response starting at `start_ns` answers, if any.
    pub(super) fn pair_response(&mut self, dir: Direction, start_ns: u64) -> Option<u64> {
        if self.responses_to_drop > 0 {
            self.responses_to_drop -= 1;
            return None;
        }
        let resynced = std::mem::take(&mut self.halves[dir.index()].resynced);
        let front = self.in_flight.front()?.seq;
        self.next_response_seq = self.next_response_seq.max(front);
        let mut chosen = None;
        for f in self
            .in_flight
            .iter()
            .filter(|f| f.seq >= self.next_response_seq)
        {
            if f.exchange.request_start_ns > start_ns {
                break;
            }
            chosen = Some(f.seq);
            if !resynced {
                break;
            }
        }
        let seq = chosen?;
        for f in self
            .in_flight
            .iter_mut()
            .filter(|f| f.seq >= self.next_response_seq && f.seq < seq)
        {
            f.dropped = true;
            f.response_done = true;
        }
        self.next_response_seq = seq + 1;
        Some(seq)
    }

    /// The current message of `dir` ended with a byte at `ts_ns`.
    pub(super) fn finish_message(&mut self, dir: Direction, ts_ns: u64) {
        let is_request = self.is_request_dir(dir);
        let h = &mut self.halves[dir.index()];
        h.phase = Phase::Head;
        h.reset_buffer();
        let mut begun = None;
        if let Some(f) = h.target.take().and_then(|seq| self.in_flight_mut(seq)) {
            if is_request {
                f.request_done = true;
                f.exchange.request_end_ns = ts_ns;
                if !f.dropped {
                    let ex = &f.exchange;
                    begun = Some(super::super::Started::Http {
                        seq: ex.seq,
                        role: ex.role,
                        request: ex.request.clone(),
                        body: ex.request_body.clone(),
                        start_ns: ex.request_start_ns,
                    });
                }
            } else {
                f.response_done = true;
                f.exchange.response_end_ns = ts_ns;
            }
        }
        if let Some(b) = begun
            && self.started.len() < MAX_FINISHED
        {
            self.started.push(b);
        }
        self.flush();
    }
}

pub(super) fn placeholder_head() -> RequestHead {
    RequestHead {
        method: String::new(),
        target: String::new(),
        version: 1,
        headers: Vec::new(),
        header_table_unknown: false,
    }
}

impl HttpExchange {
    /// An exchange as it stands when its request began: what a stalled span shows.
    pub fn started(
        role: Role,
        seq: u64,
        request: std::sync::Arc<RequestHead>,
        request_start_ns: u64,
    ) -> Self {
        HttpExchange {
            seq,
            ..HttpExchange::new(role, request, request_start_ns)
        }
    }

    /// The same exchange without its captured body bytes (their sizes stay): what a
    /// span of it needs, cheap to keep while the exchange is open.
    pub fn head_only(&self) -> HttpExchange {
        HttpExchange {
            role: self.role,
            seq: self.seq,
            request: self.request.clone(),
            response: self.response.clone(),
            request_start_ns: self.request_start_ns,
            request_end_ns: self.request_end_ns,
            response_start_ns: self.response_start_ns,
            response_end_ns: self.response_end_ns,
            request_body_size: self.request_body_size,
            response_body_size: self.response_body_size,
            request_body: Vec::new(),
            response_body: Vec::new(),
            incomplete: self.incomplete,
        }
    }

    pub(super) fn new(
        role: Role,
        request: std::sync::Arc<RequestHead>,
        request_start_ns: u64,
    ) -> Self {
        HttpExchange {
            role,
            seq: 0,
            request,
            response: None,
            request_start_ns,
            request_end_ns: request_start_ns,
            response_start_ns: 0,
            response_end_ns: 0,
            request_body_size: 0,
            response_body_size: 0,
            request_body: Vec::new(),
            response_body: Vec::new(),
            incomplete: None,
        }
    }
}
