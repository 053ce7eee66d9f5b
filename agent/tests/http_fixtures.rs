//! The HTTP parser against the fixtures in `tests/fixtures/http` (framing described in
//! the README there): the whole of each, every prefix of each, and any split of its
//! reads.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use agent_common::Direction;
use proptest::prelude::*;
use sonde::protocols::http::{HttpExchange, HttpParser};

#[derive(Clone, Debug, PartialEq)]
enum Record {
    Data(Direction, Vec<u8>),
    Skip(Direction, u64),
    Resync(Direction),
    Close,
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/http")
}

fn fixtures() -> Vec<(String, Vec<Record>)> {
    let mut names: Vec<_> = std::fs::read_dir(fixture_dir())
        .expect("fixture directory")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "bin"))
        .collect();
    names.sort();
    assert!(names.len() >= 20, "fixtures missing: {names:?}");
    names
        .into_iter()
        .map(|p| {
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            let records = parse_records(&std::fs::read(&p).unwrap())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            (name, records)
        })
        .collect()
}

fn parse_records(mut bytes: &[u8]) -> Result<Vec<Record>, String> {
    let mut records = Vec::new();
    while !bytes.is_empty() {
        let nl = bytes
            .iter()
            .position(|&c| c == b'\n')
            .ok_or("record line without newline")?;
        let line = std::str::from_utf8(&bytes[..nl]).map_err(|e| e.to_string())?;
        bytes = &bytes[nl + 1..];
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let words: Vec<&str> = line.split(' ').collect();
        let dir = |w: &str| match w {
            "in" => Ok(Direction::Ingress),
            "out" => Ok(Direction::Egress),
            _ => Err(format!("bad direction in {line:?}")),
        };
        let number = |w: &str| w.parse::<u64>().map_err(|e| format!("{line:?}: {e}"));
        records.push(match words[..] {
            ["close"] => Record::Close,
            [d, "resync"] => Record::Resync(dir(d)?),
            [d, "skip", n] => Record::Skip(dir(d)?, number(n)?),
            [d, n] => {
                let n = number(n)? as usize;
                if bytes.len() < n + 1 || bytes[n] != b'\n' {
                    return Err(format!("{line:?}: payload not followed by a newline"));
                }
                let payload = bytes[..n].to_vec();
                bytes = &bytes[n + 1..];
                Record::Data(dir(d)?, payload)
            }
            _ => return Err(format!("bad record line {line:?}")),
        });
    }
    Ok(records)
}

fn ts(k: usize) -> u64 {
    (k as u64 + 1) * 1000
}

fn apply(p: &mut HttpParser, k: usize, record: &Record) {
    match record {
        Record::Data(d, data) => p.feed(*d, data, ts(k)),
        Record::Skip(d, n) => p.skip(*d, *n, ts(k)),
        Record::Resync(d) => p.resync(*d),
        Record::Close => p.close(ts(k)),
    }
}

fn run(records: &[Record]) -> (HttpParser, Vec<HttpExchange>) {
    let mut p = HttpParser::new();
    let mut out = Vec::new();
    for (k, r) in records.iter().enumerate() {
        apply(&mut p, k, r);
        out.extend(p.take_exchanges());
    }
    (p, out)
}

fn body(b: &[u8], size: u64) -> String {
    let shown: String = b
        .iter()
        .take(64)
        .flat_map(|c| std::ascii::escape_default(*c))
        .map(char::from)
        .collect();
    let more = if b.len() > 64 { "..." } else { "" };
    format!("size {size}, captured {}: \"{shown}\"{more}", b.len())
}

fn render(p: &HttpParser, exchanges: &[HttpExchange]) -> String {
    let mut s = format!("is_http: {:?}\nrole: {:?}\n", p.is_http(), p.role());
    for (i, ex) in exchanges.iter().enumerate() {
        let r = &ex.request;
        let _ = writeln!(s, "\nexchange {} ({:?})", i + 1, ex.role);
        let _ = writeln!(
            s,
            "  request: {} {} HTTP/1.{} at {}..{}",
            r.method, r.target, r.version, ex.request_start_ns, ex.request_end_ns
        );
        for (n, v) in &r.headers {
            let _ = writeln!(s, "    {n}: {v}");
        }
        let _ = writeln!(
            s,
            "  request body: {}",
            body(&ex.request_body, ex.request_body_size)
        );
        if let Some(reason) = ex.incomplete {
            let _ = writeln!(s, "  incomplete: {}", reason.as_str());
        }
        match &ex.response {
            None => s.push_str("  response: none\n"),
            Some(resp) => {
                let _ = writeln!(
                    s,
                    "  response: HTTP/1.{} {} {} at {}..{}",
                    resp.version,
                    resp.status,
                    resp.reason,
                    ex.response_start_ns,
                    ex.response_end_ns
                );
                for (n, v) in &resp.headers {
                    let _ = writeln!(s, "    {n}: {v}");
                }
                let _ = writeln!(
                    s,
                    "  response body: {}",
                    body(&ex.response_body, ex.response_body_size)
                );
            }
        }
    }
    s
}

#[test]
fn fixtures_match_expected() {
    let bless = std::env::var_os("SONDE_BLESS").is_some();
    let mut failures = Vec::new();
    for (name, records) in fixtures() {
        let (p, exchanges) = run(&records);
        let got = render(&p, &exchanges);
        let path = fixture_dir().join(format!("{name}.expected"));
        if bless {
            std::fs::write(&path, &got).unwrap();
            continue;
        }
        let want =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if got != want {
            failures.push(format!("--- {name}: expected\n{want}\n--- got\n{got}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn not_http_fixtures_yield_nothing() {
    for (name, records) in fixtures()
        .into_iter()
        .filter(|(n, _)| n.starts_with("not_http"))
    {
        let (p, exchanges) = run(&records);
        assert_eq!(p.is_http(), Some(false), "{name}");
        assert!(exchanges.is_empty(), "{name}");
    }
}

/// The records up to `cut` payload bytes into the stream, the last one cut short.
fn prefix(records: &[Record], mut cut: usize) -> Vec<Record> {
    let mut out = Vec::new();
    for r in records {
        match r {
            Record::Data(d, data) => {
                if cut < data.len() {
                    out.push(Record::Data(*d, data[..cut].to_vec()));
                    return out;
                }
                cut -= data.len();
                out.push(r.clone());
            }
            _ => out.push(r.clone()),
        }
    }
    out
}

#[test]
fn every_prefix_yields_a_prefix_of_the_exchanges() {
    for (name, records) in fixtures() {
        let (_, full) = run(&records);
        let total: usize = records
            .iter()
            .map(|r| {
                if let Record::Data(_, d) = r {
                    d.len()
                } else {
                    0
                }
            })
            .sum();
        for cut in 0..=total {
            let mut part = prefix(&records, cut);
            part.retain(|r| *r != Record::Close);
            let (_, got) = run(&part);
            assert!(
                got.len() <= full.len() && got[..] == full[..got.len()],
                "{name}: prefix of {cut} bytes gave {got:#?}"
            );
            // Closing there must not panic either; it may finish unanswered requests.
            let mut p = HttpParser::new();
            for (k, r) in part.iter().enumerate() {
                apply(&mut p, k, r);
            }
            p.close(u64::MAX);
            p.take_exchanges();
        }
    }
}

/// `records` with each payload cut into several reads, at positions taken from `cuts`.
fn split(records: &[Record], cuts: &[u16]) -> Vec<(usize, Record)> {
    let mut cuts = cuts.iter().copied().cycle();
    let mut out = Vec::new();
    for (k, r) in records.iter().enumerate() {
        let Record::Data(d, data) = r else {
            out.push((k, r.clone()));
            continue;
        };
        let mut rest = &data[..];
        while !rest.is_empty() {
            let n = match cuts.next() {
                Some(c) => 1 + usize::from(c) % rest.len(),
                None => rest.len(),
            };
            out.push((k, Record::Data(*d, rest[..n].to_vec())));
            rest = &rest[n..];
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn any_split_of_the_reads_gives_the_same_exchanges(cuts in prop::collection::vec(any::<u16>(), 0..48)) {
        for (name, records) in fixtures() {
            let (whole, expected) = run(&records);
            let mut p = HttpParser::new();
            let mut got = Vec::new();
            for (k, r) in split(&records, &cuts) {
                apply(&mut p, k, &r);
                got.extend(p.take_exchanges());
            }
            prop_assert_eq!(p.is_http(), whole.is_http(), "{}", name);
            prop_assert_eq!(&got, &expected, "{}", name);
        }
    }
}
