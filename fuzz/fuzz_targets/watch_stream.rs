//! The remote store's watch stream decoder: any body, in any framing, never panics and yields
//! the same events as decoding its complete lines one by one, up to and with the first error
//! (which ends a watch). The input is the body (NDJSON lines, as the API sends them); the
//! prefix watched and the frames it comes in are drawn from a hash of it, so that seeds stay
//! readable and every input is cut in a way of its own.
#![no_main]

use flotilla_store::WatchEvent;
use flotilla_store::fuzzing::{watch_line, watch_stream};
use libfuzzer_sys::fuzz_target;

const PREFIXES: [&str; 4] = [
    "/registry/services/",
    "/registry/instances/",
    "/registry/events/",
    // Narrower than a kind: objects outside it are skipped.
    "/registry/services/web",
];

/// Comparable: events as they are, errors by their message.
type Outcome = Vec<Result<WatchEvent, String>>;

fn outcome(events: Vec<Result<WatchEvent, flotilla_store::StoreError>>) -> Outcome {
    events
        .into_iter()
        .map(|e| e.map_err(|e| format!("{e:?}")))
        .collect()
}

/// Complete lines, one by one, up to the first error.
fn reference(prefix: &str, body: &[u8]) -> Outcome {
    let mut out = Vec::new();
    for line in body.split_inclusive(|&b| b == b'\n') {
        if !line.ends_with(b"\n") {
            break;
        }
        match watch_line(prefix, line) {
            Ok(Some(event)) => out.push(Ok(event)),
            Ok(None) => {}
            Err(e) => {
                out.push(Err(format!("{e:?}")));
                break;
            }
        }
    }
    out
}

/// FNV-1a, then xorshift: a fixed function of the input.
fn rng(data: &[u8]) -> impl FnMut() -> u64 {
    let mut state = data.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    }) | 1;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

fuzz_target!(|data: &[u8]| {
    let mut next = rng(data);
    let prefix = PREFIXES[(next() % PREFIXES.len() as u64) as usize];

    let whole = outcome(watch_stream(prefix, [data]));
    let one_by_one = outcome(watch_stream(prefix, data.chunks(1)));
    // Frames of 0 to 64 bytes (empty frames happen: a body may send empty data frames).
    let mut frames = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let (frame, tail) = rest.split_at(((next() % 65) as usize).min(rest.len()));
        frames.push(frame);
        rest = tail;
    }
    let cut = outcome(watch_stream(prefix, frames));
    assert_eq!(
        whole,
        reference(prefix, data),
        "one frame, against line by line"
    );
    assert_eq!(one_by_one, whole, "one byte a frame");
    assert_eq!(cut, whole, "frames of up to 64 bytes");
    for event in whole.iter().flatten() {
        assert!(
            event.key().starts_with(prefix),
            "{event:?} outside {prefix}"
        );
        if let WatchEvent::Put { kv, .. } = event {
            assert!(serde_json::from_slice::<serde_json::Value>(&kv.value).is_ok());
        }
    }
});
