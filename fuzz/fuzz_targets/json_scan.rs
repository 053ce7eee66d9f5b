//! The lenient JSON scanner the business rules read bodies with: any bytes, never a
//! panic; every scalar it reports again for any longer prefix of the same input (a
//! value is only reported once it was captured whole); paths no deeper than the bound.
//!
//! Input: the first byte chooses a cut point (as a fraction of the rest), the rest is
//! the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sonde::business::json::{MAX_DEPTH, scan};

fn scalars(body: &[u8]) -> Vec<(usize, Option<u32>, String)> {
    let mut out = Vec::new();
    scan(body, |s| {
        assert!(s.path.len() <= MAX_DEPTH);
        out.push((s.path.len(), s.object, s.value.to_string()));
    });
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, body)) = data.split_first() else {
        return;
    };
    let whole = scalars(body);
    let at = body.len() * usize::from(cut) / 255;
    let part = scalars(&body[..at]);
    assert!(
        whole.starts_with(&part),
        "a prefix reported {part:?}, the whole {whole:?}"
    );
});
