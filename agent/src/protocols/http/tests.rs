use super::body::chunk_size;
use super::*;
use agent_common::Direction::{Egress as Out, Ingress as In};

/// A one-line summary per exchange: role, request line, status, times, body sizes.
fn summary(ex: &HttpExchange) -> String {
    let status = ex
        .response
        .as_ref()
        .map_or("none".to_owned(), |r| r.status.to_string());
    format!(
        "{:?} {} {} -> {} req {}..{} resp {}..{} body {}/{}",
        ex.role,
        ex.request.method,
        ex.request.target,
        status,
        ex.request_start_ns,
        ex.request_end_ns,
        ex.response_start_ns,
        ex.response_end_ns,
        ex.request_body_size,
        ex.response_body_size
    )
}

fn run(steps: &[(Direction, &[u8])]) -> (HttpParser, Vec<String>) {
    let mut p = HttpParser::new();
    for (i, (dir, data)) in steps.iter().enumerate() {
        p.feed(*dir, data, (i as u64 + 1) * 10);
    }
    let out = p.take_exchanges().iter().map(summary).collect();
    (p, out)
}

#[test]
fn server_exchange_with_content_length_bodies() {
    let (p, out) = run(&[
        (
            In,
            b"POST /orders HTTP/1.1\r\nHost: shop\r\nContent-Length: 7\r\n\r\n{\"a\":1}",
        ),
        (Out, b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"),
    ]);
    assert_eq!(
        out,
        ["Server POST /orders -> 201 req 10..10 resp 20..20 body 7/2"]
    );
    assert_eq!(p.is_http(), Some(true));
    assert_eq!(p.role(), Some(Role::Server));
}

#[test]
fn client_role_and_bodies_are_captured() {
    let mut p = HttpParser::new();
    p.feed(Out, b"GET /a HTTP/1.1\r\n\r\n", 1);
    p.feed(In, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel", 2);
    p.feed(In, b"lo", 3);
    let ex = p.take_exchanges();
    assert_eq!(p.role(), Some(Role::Client));
    assert_eq!(ex.len(), 1);
    assert_eq!(ex[0].role, Role::Client);
    assert_eq!(ex[0].response_body, b"hello");
    assert_eq!((ex[0].response_start_ns, ex[0].response_end_ns), (2, 3));
}

#[test]
fn head_split_byte_by_byte_keeps_first_byte_time() {
    let mut p = HttpParser::new();
    for (i, b) in b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n".iter().enumerate() {
        p.feed(In, &[*b], 100 + i as u64);
    }
    p.feed(Out, b"HTTP/1.1 204 No Content\r\n\r\n", 500);
    let out: Vec<_> = p.take_exchanges().iter().map(summary).collect();
    assert_eq!(
        out,
        ["Server GET /x -> 204 req 100..127 resp 500..500 body 0/0"]
    );
}

#[test]
fn chunked_body_is_decoded_across_reads() {
    let mut p = HttpParser::new();
    p.feed(Out, b"GET / HTTP/1.1\r\n\r\n", 1);
    p.feed(
        In,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        2,
    );
    for (i, part) in [
        "1",
        "0;ext=1\r",
        "\n0123456789abcdef\r",
        "\n3\r\nxyz",
        "\r\n0\r\nX-Sum: 1\r\n",
        "\r\n",
    ]
    .iter()
    .enumerate()
    {
        p.feed(In, part.as_bytes(), 3 + i as u64);
    }
    let ex = p.take_exchanges();
    assert_eq!(ex.len(), 1);
    assert_eq!(ex[0].response_body, b"0123456789abcdefxyz");
    assert_eq!(ex[0].response_body_size, 19);
    assert_eq!(ex[0].response_end_ns, 8);
}

#[test]
fn pipelined_requests_pair_in_order() {
    let (_, out) = run(&[
        (In, b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\nHEAD /3 HTTP/1.1\r\n\r\n"),
        (Out, b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\naHTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"),
        (Out, b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n"),
    ]);
    assert_eq!(
        out,
        [
            "Server GET /1 -> 200 req 10..10 resp 20..20 body 0/1",
            "Server GET /2 -> 404 req 10..10 resp 20..20 body 0/0",
            "Server HEAD /3 -> 200 req 10..10 resp 30..30 body 0/0",
        ]
    );
}

#[test]
fn interim_responses_are_skipped() {
    let (_, out) = run(&[
        (
            In,
            b"PUT /m HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
        ),
        (Out, b"HTTP/1.1 100 Continue\r\n\r\n"),
        (In, b"abc"),
        (Out, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
    ]);
    assert_eq!(
        out,
        ["Server PUT /m -> 200 req 10..30 resp 40..40 body 3/0"]
    );
}

#[test]
fn body_until_close_ends_at_close() {
    let mut p = HttpParser::new();
    p.feed(Out, b"GET / HTTP/1.0\r\n\r\n", 1);
    p.feed(In, b"HTTP/1.0 200 OK\r\n\r\nsome", 2);
    p.feed(In, b" bytes", 3);
    assert!(p.take_exchanges().is_empty());
    p.close(9);
    let ex = p.take_exchanges();
    assert_eq!(ex.len(), 1);
    assert_eq!(ex[0].response_body, b"some bytes");
    assert_eq!(ex[0].response_end_ns, 3);
}

#[test]
fn request_without_response_is_emitted_at_close() {
    let mut p = HttpParser::new();
    p.feed(In, b"GET /slow HTTP/1.1\r\n\r\n", 5);
    assert!(p.take_exchanges().is_empty());
    p.close(50);
    let ex = p.take_exchanges();
    assert_eq!(ex.len(), 1);
    assert_eq!(ex[0].response, None);
    assert_eq!(ex[0].request_end_ns, 5);
    assert_eq!(ex[0].incomplete, Some(EndReason::ConnectionClosed));
    p.feed(In, b"GET /after HTTP/1.1\r\n\r\n", 60);
    assert!(p.take_exchanges().is_empty());
}

#[test]
fn every_end_reason_finishes_open_exchanges_as_incomplete() {
    for reason in [
        EndReason::ConnectionClosed,
        EndReason::ProcessExit,
        EndReason::Evicted,
        EndReason::Idle,
        EndReason::CaptureEnd,
        EndReason::AgentStop,
    ] {
        let mut p = HttpParser::new();
        p.feed(Out, b"GET /done HTTP/1.1\r\n\r\n", 1);
        p.feed(In, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 2);
        p.feed(Out, b"GET /cut HTTP/1.1\r\n\r\n", 3);
        p.feed(In, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", 4);
        p.feed(In, b"de", 5);
        p.feed(Out, b"GET /unanswered HTTP/1.1\r\n\r\n", 6);
        let done = p.take_exchanges();
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].incomplete, None, "{reason:?}");
        p.end(100, reason);
        let ex = p.take_exchanges();
        let got: Vec<_> = ex
            .iter()
            .map(|e| (e.request.target.as_str(), e.incomplete))
            .collect();
        assert_eq!(
            got,
            [("/cut", Some(reason)), ("/unanswered", Some(reason))],
            "{reason:?}"
        );
        // A response cut short ends at its last byte seen, with what was read of it.
        assert_eq!((ex[0].response_end_ns, ex[0].response_body_size), (5, 5));
        assert_eq!(ex[1].response, None);
        assert_eq!(ex[1].request_end_ns, 6);
    }
}

#[test]
fn a_body_until_close_is_complete_only_when_the_socket_closed() {
    for (reason, incomplete) in [
        (EndReason::ConnectionClosed, None),
        (EndReason::ProcessExit, None),
        (EndReason::Idle, Some(EndReason::Idle)),
        (EndReason::AgentStop, Some(EndReason::AgentStop)),
    ] {
        let mut p = HttpParser::new();
        p.feed(Out, b"GET / HTTP/1.0\r\n\r\n", 1);
        p.feed(In, b"HTTP/1.0 200 OK\r\n\r\nsome", 2);
        p.end(9, reason);
        let ex = p.take_exchanges();
        assert_eq!(ex.len(), 1);
        assert_eq!(ex[0].incomplete, incomplete, "{reason:?}");
        assert_eq!(ex[0].response_end_ns, 2);
    }
}

#[test]
fn a_request_cut_short_is_incomplete() {
    let mut p = HttpParser::new();
    p.feed(
        In,
        b"POST /upload HTTP/1.1\r\nContent-Length: 100\r\n\r\nab",
        1,
    );
    p.feed(In, b"cd", 2);
    p.end(9, EndReason::ProcessExit);
    let ex = p.take_exchanges();
    assert_eq!(ex.len(), 1);
    assert_eq!(ex[0].incomplete, Some(EndReason::ProcessExit));
    assert_eq!((ex[0].request_end_ns, ex[0].request_body_size), (2, 4));
}

#[test]
fn next_message_in_counts_what_is_left_of_a_known_body() {
    let mut p = HttpParser::new();
    assert_eq!(p.next_message_in(Out), Some(0));
    p.feed(
        Out,
        b"POST /a HTTP/1.1\r\nContent-Length: 100000\r\n\r\n",
        1,
    );
    assert_eq!(p.next_message_in(Out), Some(100_000));
    p.feed(Out, &[b'x'; 1000], 2);
    assert_eq!(p.next_message_in(Out), Some(99_000));
    p.skip(Out, 98_000, 3);
    assert_eq!(p.next_message_in(Out), Some(1000));
    p.skip(Out, 1000, 4);
    assert_eq!(p.next_message_in(Out), Some(0), "the next head starts here");
    // A head in part: where it ends is not known.
    p.feed(Out, b"GET /b HT", 5);
    assert_eq!(p.next_message_in(Out), None);

    // Chunked: the data of a known chunk, then the line after it.
    p.feed(
        In,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        6,
    );
    assert_eq!(p.next_message_in(In), Some(0));
    p.feed(In, b"10000\r\nabc", 7);
    assert_eq!(p.next_message_in(In), Some(0x10000 - 3));
    p.skip(In, 0x10000 - 3, 8);
    assert_eq!(p.next_message_in(In), Some(0));
    p.feed(In, b"\r\n0\r\n\r\n", 9);
    assert_eq!(p.take_exchanges().len(), 1);

    // Until close: unknown.
    let mut p = HttpParser::new();
    p.feed(Out, b"GET / HTTP/1.0\r\n\r\n", 1);
    p.feed(In, b"HTTP/1.0 200 OK\r\n\r\nsome", 2);
    assert_eq!(p.next_message_in(In), None);
}

#[test]
fn next_message_in_is_unknown_when_sync_is_lost_or_the_connection_is_not_http() {
    let mut p = HttpParser::new();
    p.feed(In, b"GET /a HTTP/1.1\r\n\r\n", 1);
    p.resync(In);
    assert_eq!(p.next_message_in(In), None);
    assert!(!ProtocolParser::in_sync(&p, In));
    p.feed(In, b"GET /b HTTP/1.1\r\n", 2);
    assert!(ProtocolParser::in_sync(&p, In), "a start line was found");

    let mut p = HttpParser::new();
    p.feed(Out, b"\x16\x03\x01\x02\x00", 1);
    assert_eq!(p.is_http(), Some(false));
    assert_eq!(p.next_message_in(Out), None);
}

#[test]
fn switching_protocols_stops_parsing() {
    let mut p = HttpParser::new();
    p.feed(
        In,
        b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        1,
    );
    p.feed(
        Out,
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello",
        2,
    );
    p.feed(In, b"GET /not-http HTTP/1.1\r\n\r\n", 3);
    p.close(4);
    let ex = p.take_exchanges();
    assert_eq!(ex.len(), 1);
    assert_eq!(ex[0].response.as_ref().map(|r| r.status), Some(101));
}

#[test]
fn other_protocols_are_not_http() {
    let prefaces: [&[u8]; 5] = [
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
        b"AMQP\x00\x00\x09\x01",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"\x00\x00\x00\x00\x00",
        b"get / http/1.1\r\n\r\n",
    ];
    for preface in prefaces {
        let mut p = HttpParser::new();
        p.feed(Out, preface, 1);
        p.feed(In, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 2);
        p.close(3);
        assert_eq!(p.is_http(), Some(false), "{preface:?}");
        assert!(p.take_exchanges().is_empty());
    }
}

#[test]
fn detection_waits_for_a_whole_head() {
    let mut p = HttpParser::new();
    p.feed(In, b"GET / HTTP/1.1\r\nHo", 1);
    assert_eq!(p.is_http(), None);
    p.feed(In, b"st: a\r\n\r\n", 2);
    assert_eq!(p.is_http(), Some(true));
}

#[test]
fn oversized_head_is_not_http() {
    let mut p = HttpParser::new();
    p.feed(In, b"GET / HTTP/1.1\r\n", 1);
    let filler = format!("X-Fill: {}\r\n", "a".repeat(1000));
    for i in 0..70 {
        p.feed(In, filler.as_bytes(), 2 + i);
    }
    assert_eq!(p.is_http(), Some(false));
}

#[test]
fn skip_inside_body_counts_as_body() {
    let mut p = HttpParser::new();
    p.feed(In, b"GET /big HTTP/1.1\r\n\r\n", 1);
    p.feed(
        Out,
        b"HTTP/1.1 200 OK\r\nContent-Length: 10000\r\n\r\nabc",
        2,
    );
    p.skip(Out, 9994, 2);
    p.feed(Out, b"xyz", 3);
    p.feed(In, b"GET /next HTTP/1.1\r\n\r\n", 4);
    p.feed(Out, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 5);
    let ex = p.take_exchanges();
    assert_eq!(ex.len(), 2);
    assert_eq!(ex[0].response_body_size, 10000);
    // The captured prefix stops at the first byte not captured.
    assert_eq!(ex[0].response_body, b"abc");
    assert_eq!(ex[0].response_end_ns, 3);
    assert_eq!(ex[1].request.target, "/next");
}

#[test]
fn skip_in_a_head_drops_the_exchange_and_its_response() {
    let mut p = HttpParser::new();
    p.feed(In, b"GET /1 HTTP/1.1\r\n\r\n", 1);
    p.feed(Out, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 2);
    // A request whose head was larger than the capture.
    p.feed(In, b"GET /2 HTTP/1.1\r\nCookie: aaaa", 3);
    p.skip(In, 5000, 3);
    p.feed(Out, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 4);
    p.feed(In, b"GET /3 HTTP/1.1\r\n\r\n", 5);
    p.feed(
        Out,
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
        6,
    );
    let out: Vec<_> = p.take_exchanges().iter().map(summary).collect();
    assert_eq!(
        out,
        [
            "Server GET /1 -> 200 req 1..1 resp 2..2 body 0/0",
            "Server GET /3 -> 404 req 5..5 resp 6..6 body 0/0"
        ]
    );
}

#[test]
fn lost_request_whose_response_came_first_does_not_shift_pairing() {
    let mut p = HttpParser::new();
    p.feed(In, b"GET /1 HTTP/1.1\r\n\r\n", 1);
    p.feed(Out, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 2);
    // Request /2 was lost entirely; its response arrives, then the gap is noticed.
    p.feed(Out, b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n", 4);
    p.skip(In, 19, 5);
    p.feed(In, b"GET /3 HTTP/1.1\r\n\r\n", 5);
    p.feed(Out, b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n", 6);
    let out: Vec<_> = p
        .take_exchanges()
        .iter()
        .map(|e| summary(e)[..22].to_owned())
        .collect();
    assert_eq!(out, ["Server GET /1 -> 200 r", "Server GET /3 -> 201 r"]);
}

#[test]
fn gap_in_chunked_framing_resynchronises_on_the_next_response() {
    let mut p = HttpParser::new();
    p.feed(Out, b"GET /1 HTTP/1.1\r\n\r\n", 1);
    p.feed(
        In,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
        2,
    );
    p.skip(In, 20, 3);
    p.feed(In, b"ignored tail\r\n0\r\n\r\n", 3);
    p.feed(Out, b"GET /2 HTTP/1.1\r\n\r\n", 4);
    p.feed(In, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 5);
    let out: Vec<_> = p.take_exchanges().iter().map(summary).collect();
    assert_eq!(out, ["Client GET /2 -> 200 req 4..4 resp 5..5 body 0/2"]);
}

#[test]
fn connection_predating_the_agent_starts_at_the_first_boundary() {
    let mut p = HttpParser::new();
    p.resync(In);
    p.resync(Out);
    p.feed(Out, b"dy of an earlier response\r\n", 1);
    p.feed(In, b"tail of a body\nGET /next HTTP/1.1\r\n\r\n", 2);
    p.feed(Out, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 3);
    let out: Vec<_> = p.take_exchanges().iter().map(summary).collect();
    assert_eq!(out, ["Server GET /next -> 200 req 2..2 resp 3..3 body 0/0"]);
    assert_eq!(p.is_http(), Some(true));
}

#[test]
fn undecided_scan_gives_up_on_binary() {
    let mut p = HttpParser::new();
    p.resync(In);
    let junk = [0x55u8; 4096];
    for i in 0..20 {
        p.feed(In, &junk, i);
    }
    assert_eq!(p.is_http(), Some(false));
}

#[test]
fn resync_after_a_response_gap_pairs_with_the_newest_request() {
    let mut p = HttpParser::new();
    p.feed(Out, b"GET /1 HTTP/1.1\r\n\r\n", 1);
    p.feed(In, b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc", 2);
    // Events lost: the rest of /1's response (the first 97 bytes of the gap), /2's
    // whole response.
    p.feed(Out, b"GET /2 HTTP/1.1\r\n\r\n", 3);
    p.feed(Out, b"GET /3 HTTP/1.1\r\n\r\n", 5);
    p.skip(In, 500, 6);
    p.feed(In, b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n", 6);
    let out: Vec<_> = p.take_exchanges().iter().map(summary).collect();
    assert_eq!(
        out,
        [
            "Client GET /1 -> 200 req 1..1 resp 2..6 body 0/100",
            "Client GET /3 -> 202 req 5..5 resp 6..6 body 0/0"
        ]
    );
}

#[test]
fn many_unanswered_requests_stay_bounded() {
    let mut p = HttpParser::new();
    for i in 0..(MAX_IN_FLIGHT as u64 + 10) {
        p.feed(In, format!("GET /{i} HTTP/1.1\r\n\r\n").as_bytes(), i);
    }
    assert!(p.in_flight.len() <= MAX_IN_FLIGHT);
    // The responses of the dropped requests are discarded, the rest pair in order.
    for i in 0..(MAX_IN_FLIGHT as u64 + 10) {
        p.feed(
            Out,
            format!("HTTP/1.1 200 OK\r\nX-N: {i}\r\nContent-Length: 0\r\n\r\n").as_bytes(),
            1000 + i,
        );
    }
    let ex = p.take_exchanges();
    assert_eq!(ex.len(), MAX_IN_FLIGHT);
    for e in ex {
        assert_eq!(
            Some(&e.request.target[1..]),
            e.response.as_ref().and_then(|r| r.header("x-n"))
        );
    }
}

#[test]
fn body_capture_is_bounded() {
    let mut p = HttpParser::new();
    let big = vec![b'x'; 40_000];
    p.feed(
        In,
        format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", big.len()).as_bytes(),
        1,
    );
    p.feed(In, &big, 2);
    p.feed(Out, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 3);
    let ex = p.take_exchanges();
    assert_eq!(ex[0].request_body.len(), MAX_BODY_CAPTURE);
    assert_eq!(ex[0].request_body_size, 40_000);
}

#[test]
fn chunk_size_lines() {
    assert_eq!(chunk_size(b"1A\r\n"), Some(26));
    assert_eq!(chunk_size(b"0;name=value\r\n"), Some(0));
    assert_eq!(chunk_size(b"ff\n"), Some(255));
    assert_eq!(chunk_size(b"\r\n"), None);
    assert_eq!(chunk_size(b"xyz\r\n"), None);
    assert_eq!(chunk_size(b"fffffffffffffffff\r\n"), None);
}
