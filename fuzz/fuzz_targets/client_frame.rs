//! Arbitrary bytes as one frame payload: `decode_payload::<ClientFrame>`
//! must return, never panic or allocate beyond its bound, and whatever it
//! accepts must survive a re-encode and decode unchanged.

#![no_main]

use libfuzzer_sys::fuzz_target;
use profiled_protocol::{ClientFrame, decode_payload, encode_payload};

fuzz_target!(|data: &[u8]| {
    let Ok(frame) = decode_payload::<ClientFrame>(data) else {
        return;
    };
    let again = encode_payload(&frame).expect("an accepted frame re-encodes");
    // Maps are re-encoded sorted and without duplicate keys, so the bytes
    // may differ from (and only be shorter than) the input; the value may not.
    assert!(
        again.len() <= data.len(),
        "re-encoding grew {} bytes to {}",
        data.len(),
        again.len()
    );
    let decoded = decode_payload::<ClientFrame>(&again).expect("a re-encoded frame decodes");
    assert_eq!(decoded, frame, "the frame changed in a round trip");
});
