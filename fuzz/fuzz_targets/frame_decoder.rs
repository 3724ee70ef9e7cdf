//! Arbitrary bytes, in arbitrary chunks, through the daemon's frame codec
//! (`FrameCodec<Incoming, ServerFrame>`), checked against a model of the
//! documented framing.
//!
//! Input layout: byte 0 picks the frame limit, byte 1 seeds the chunk
//! sizes, the rest is the byte stream a client would send.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use profiled_protocol::{
    ClientFrame, FrameCodec, FrameError, Incoming, LENGTH_PREFIX, RequestBody, ServerFrame,
    decode_payload, encode_payload,
};
use tokio_util::codec::Decoder;

/// Frame limits small enough for libFuzzer's inputs to cross them.
const LIMITS: [u32; 4] = [16, 100, 1024, 64 * 1024];

fuzz_target!(|data: &[u8]| {
    let [limit, seed, stream @ ..] = data else {
        return;
    };
    let max = LIMITS[usize::from(*limit) % LIMITS.len()];
    let mut codec = FrameCodec::<Incoming, ServerFrame>::new(max);
    let mut buf = BytesMut::new();
    let mut state = u32::from(*seed) | 0x100;
    let mut rest = stream;
    while !rest.is_empty() {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let take = (state as usize % 64 + 1).min(rest.len());
        let (chunk, tail) = rest.split_at(take);
        buf.extend_from_slice(chunk);
        rest = tail;
        if !drain(&mut codec, &mut buf, max, stream.len()) {
            // The daemon closes the connection at the first error.
            return;
        }
    }
});

/// Decodes every whole frame in `buf`, checking each step against the
/// model. Returns false once the codec reports an error.
fn drain(
    codec: &mut FrameCodec<Incoming, ServerFrame>,
    buf: &mut BytesMut,
    max: u32,
    fed: usize,
) -> bool {
    loop {
        let before = buf.clone();
        let capacity = buf.capacity();
        let outcome = codec.decode(buf);
        let announced = before
            .first_chunk::<LENGTH_PREFIX>()
            .map(|prefix| u32::from_be_bytes(*prefix));
        match (announced, outcome) {
            (None, Ok(None)) => return true,
            (None, other) => panic!("no prefix yet, but {other:?}"),
            (
                Some(len),
                Err(FrameError::TooLarge {
                    len: got,
                    max: limit,
                }),
            ) => {
                assert!(len > max && got == u64::from(len) && limit == max);
                assert_eq!(buf.capacity(), capacity, "reserved for a refused frame");
                return false;
            }
            (Some(len), _) if len > max => panic!("a {len}-byte prefix over {max} passed"),
            (Some(len), Ok(None)) => {
                let total = LENGTH_PREFIX + len as usize;
                assert!(before.len() < total, "a whole frame was left undecoded");
                assert_eq!(&buf[..], &before[..], "a partial frame was consumed");
                assert!(
                    buf.capacity() <= 2 * (LENGTH_PREFIX + max as usize) + 2 * fed,
                    "buffer of capacity {} for a limit of {max}",
                    buf.capacity()
                );
                return true;
            }
            (Some(len), decoded) => {
                let total = LENGTH_PREFIX + len as usize;
                assert!(
                    before.len() >= total,
                    "decoded a partial frame: {decoded:?}"
                );
                assert_eq!(&buf[..], &before[total..], "consumed other than one frame");
                let payload = &before[LENGTH_PREFIX..total];
                let model = decode_payload::<ClientFrame>(payload);
                match decoded {
                    Ok(Some(Incoming::UnknownRequest { id, kind })) => {
                        assert!(model.is_err(), "a frame the model reads called unknown");
                        assert!(kind >= RequestBody::KINDS);
                        let mut header = 1u32.to_be_bytes().to_vec();
                        header.extend_from_slice(&id.to_be_bytes());
                        header.extend_from_slice(&kind.to_be_bytes());
                        assert!(payload.starts_with(&header));
                    }
                    Ok(Some(Incoming::Frame(frame))) => {
                        assert_eq!(model.ok().as_ref(), Some(&frame), "codec and model differ");
                        let again = encode_payload(&frame).expect("an accepted frame re-encodes");
                        assert!(again.len() <= payload.len());
                        let back: ClientFrame = decode_payload(&again).expect("re-decodes");
                        assert_eq!(back, frame, "the frame changed in a round trip");
                    }
                    Err(FrameError::Malformed(_)) => {
                        assert!(model.is_err(), "codec refused what the model accepts");
                        return false;
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
    }
}
