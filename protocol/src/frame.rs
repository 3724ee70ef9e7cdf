//! Length-prefixed bincode frames, bounded before allocation.

use std::marker::PhantomData;

use bytes::{Buf, BufMut, BytesMut};
use serde::{Serialize, de::DeserializeOwned};
use tokio_util::codec::{Decoder, Encoder};

/// The size of the big-endian length prefix.
pub const LENGTH_PREFIX: usize = 4;

/// The largest frame any configuration may allow: 1 GiB.
pub const MAX_FRAME_CEILING: u32 = 1 << 30;

/// The room a reader keeps for the next read once it has taken a frame:
/// the initial size of tokio-util's read buffer, so a connection's buffer
/// never grows for it.
const READ_WINDOW: usize = 8 * 1024;

/// The only bincode configuration the protocol uses: big-endian fixed-width
/// integers, so every field has the size the crate docs give it.
pub const CONFIG: bincode::config::Configuration<
    bincode::config::BigEndian,
    bincode::config::Fixint,
> = bincode::config::standard()
    .with_big_endian()
    .with_fixed_int_encoding();

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The socket failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The length prefix is over the limit; nothing was allocated for it.
    #[error("frame of {len} bytes is over the limit of {max}")]
    TooLarge {
        /// The announced (or encoded) payload length.
        len: u64,
        /// The limit in force.
        max: u32,
    },
    /// The payload is not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// A message type a [`FrameCodec`] reads.
pub trait Inbound: Sized {
    /// Decodes one payload, as [`decode_payload`] does unless the type
    /// says otherwise.
    fn from_payload(payload: &[u8]) -> Result<Self, FrameError>;
}

/// A tokio-util codec that reads frames of `In` and writes frames of `Out`.
///
/// The daemon uses `FrameCodec<Incoming, ServerFrame>` and clients
/// `FrameCodec<FromDaemon, ClientFrame>`.
#[derive(Debug)]
pub struct FrameCodec<In, Out> {
    max_frame: u32,
    _types: PhantomData<fn(Out) -> In>,
}

impl<In, Out> FrameCodec<In, Out> {
    /// A codec refusing payloads longer than `max_frame` bytes, in both
    /// directions. Values above [`MAX_FRAME_CEILING`] are clamped to it.
    pub fn new(max_frame: u32) -> Self {
        Self {
            max_frame: max_frame.min(MAX_FRAME_CEILING),
            _types: PhantomData,
        }
    }

    /// The limit in force.
    pub fn max_frame(&self) -> u32 {
        self.max_frame
    }
}

impl<In: Inbound, Out> Decoder for FrameCodec<In, Out> {
    type Item = In;
    type Error = FrameError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, FrameError> {
        let Some(prefix) = src.first_chunk::<LENGTH_PREFIX>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*prefix);
        if len > self.max_frame {
            return Err(FrameError::TooLarge {
                len: u64::from(len),
                max: self.max_frame,
            });
        }
        let total = LENGTH_PREFIX + len as usize;
        if src.len() < total {
            // Reserve only what this frame still needs; the length is bounded above.
            src.reserve(total - src.len());
            return Ok(None);
        }
        src.advance(LENGTH_PREFIX);
        let payload = src.split_to(len as usize);
        let decoded = In::from_payload(&payload);
        // FramedRead reads only into the buffer's spare capacity, which
        // every frame taken from its front uses up: a nearly used buffer
        // would take the next frame in two reads. With the payload gone,
        // reserving moves what is left of the buffer to the front of its
        // allocation instead of allocating, so each read again has room
        // for a whole frame of up to `READ_WINDOW` bytes (or the limit, if
        // that is smaller: no frame is longer).
        drop(payload);
        let window = READ_WINDOW.min(LENGTH_PREFIX + self.max_frame as usize);
        if src.capacity() - src.len() < window {
            src.reserve(window);
        }
        decoded.map(Some)
    }
}

impl<In, Out: Serialize> Encoder<Out> for FrameCodec<In, Out> {
    type Error = FrameError;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), FrameError> {
        encode_frame_into(&item, dst, self.max_frame)
    }
}

/// The length of the payload that holds `item`, without encoding it.
///
/// Senders use it to fit a message into a frame before they send it; it
/// fails with [`FrameError::Malformed`] when `item` cannot be encoded.
pub fn payload_len<T: Serialize>(item: &T) -> Result<usize, FrameError> {
    let mut size = bincode::enc::write::SizeWriter::default();
    bincode::serde::encode_into_writer(item, &mut size, CONFIG)
        .map_err(|err| FrameError::Malformed(err.to_string()))?;
    Ok(size.bytes_written)
}

/// Appends one frame (prefix and payload) holding `item` to `dst`.
///
/// Fails with [`FrameError::TooLarge`], leaving `dst` as it was, when the
/// payload is longer than `max_frame`.
pub fn encode_frame_into<T: Serialize>(
    item: &T,
    dst: &mut BytesMut,
    max_frame: u32,
) -> Result<(), FrameError> {
    // Sized first, so that a frame over the limit is refused before any
    // of it is written, and `dst` grows once rather than step by step as
    // bincode writes: growing it for a 2 KiB save was 5% of a client's CPU.
    let len = payload_len(item)?;
    let len32 = match u32::try_from(len) {
        Ok(len32) if len32 <= max_frame => len32,
        _ => {
            return Err(FrameError::TooLarge {
                len: len as u64,
                max: max_frame,
            });
        }
    };
    let start = dst.len();
    dst.reserve(LENGTH_PREFIX + len);
    dst.put_u32(len32);
    let mut writer = dst.writer();
    let written = bincode::serde::encode_into_std_write(item, &mut writer, CONFIG);
    let dst = writer.into_inner();
    match written {
        Ok(written) if written == len => Ok(()),
        // Serialize implementations that write differently each time are
        // not ours; the frame is dropped rather than sent mislabelled.
        Ok(written) => {
            dst.truncate(start);
            Err(FrameError::Malformed(format!(
                "the payload took {written} bytes after measuring {len}"
            )))
        }
        Err(err) => {
            dst.truncate(start);
            Err(FrameError::Malformed(err.to_string()))
        }
    }
}

/// Encodes one whole frame, for tests and tools that write to a plain socket.
pub fn encode_frame<T: Serialize>(item: &T) -> Result<Vec<u8>, FrameError> {
    let mut buf = BytesMut::new();
    encode_frame_into(item, &mut buf, MAX_FRAME_CEILING)?;
    Ok(buf.to_vec())
}

/// Encodes a message's payload, without the length prefix.
pub fn encode_payload<T: Serialize>(item: &T) -> Result<Vec<u8>, FrameError> {
    bincode::serde::encode_to_vec(item, CONFIG)
        .map_err(|err| FrameError::Malformed(err.to_string()))
}

/// Decodes one payload (a frame without its prefix).
///
/// Decoding never allocates more than twice the payload's length: bincode
/// is given a byte limit of the payload length rounded up to a power of two.
/// Every byte a well-formed payload claims is a byte it contains, so honest
/// frames never reach the limit, while a forged length inside a small frame
/// is refused before its buffer is allocated.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    let limit_bits = payload.len().max(64).next_power_of_two().trailing_zeros();
    let decoded = decode_with_limit_bits(payload, limit_bits);
    match decoded {
        Ok((value, read)) if read == payload.len() => Ok(value),
        Ok((_, read)) => Err(FrameError::Malformed(format!(
            "{} trailing bytes after the message",
            payload.len() - read
        ))),
        Err(err) => Err(FrameError::Malformed(err.to_string())),
    }
}

/// Dispatches to a bincode configuration whose compile-time limit is
/// `1 << bits`; bincode's limits are const generics, so each size the
/// frame ceiling allows has its own instance.
fn decode_with_limit_bits<T: DeserializeOwned>(
    payload: &[u8],
    bits: u32,
) -> Result<(T, usize), bincode::error::DecodeError> {
    macro_rules! limited {
        ($($bits:literal)*) => {
            match bits {
                $($bits => bincode::serde::decode_from_slice(payload, CONFIG.with_limit::<{ 1 << $bits }>()),)*
                _ => Err(bincode::error::DecodeError::LimitExceeded),
            }
        };
    }
    limited!(6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ClientFrame, RequestBody};

    #[test]
    fn a_frame_over_the_limit_is_refused_before_its_payload_arrives() {
        let mut codec = FrameCodec::<ClientFrame, ClientFrame>::new(1024);
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xf0][..]);
        let err = codec.decode(&mut buf).expect_err("oversized prefix");
        assert!(matches!(
            err,
            FrameError::TooLarge {
                len: 0xffff_fff0,
                max: 1024
            }
        ));
        assert!(
            buf.capacity() < 1024,
            "nothing was reserved for the refused frame"
        );
    }

    #[test]
    fn a_forged_string_length_is_refused_without_allocating_it() {
        // A Request frame whose Load.store claims 2^40 bytes but carries four.
        let mut payload = Vec::new();
        payload.extend_from_slice(&1u32.to_be_bytes()); // ClientFrame::Request
        payload.extend_from_slice(&7u64.to_be_bytes()); // id
        payload.extend_from_slice(&0u32.to_be_bytes()); // RequestBody::Load
        payload.extend_from_slice(&(1u64 << 40).to_be_bytes());
        payload.extend_from_slice(b"abcd");
        let err = decode_payload::<ClientFrame>(&payload).expect_err("forged length");
        assert!(matches!(err, FrameError::Malformed(_)), "{err}");
    }

    #[test]
    fn frames_round_trip_through_the_codec_in_pieces() {
        let frame = ClientFrame::Request(crate::Request {
            id: 9,
            body: RequestBody::Save {
                store: "s".into(),
                key: "k".into(),
                epoch: 3,
                data: vec![7; 5000],
                changes: Default::default(),
            },
        });
        let bytes = encode_frame(&frame).expect("encode");
        let mut codec = FrameCodec::<ClientFrame, ClientFrame>::new(1 << 20);
        let mut buf = BytesMut::new();
        for chunk in bytes.chunks(333) {
            assert!(buf.is_empty() || codec.decode(&mut buf).expect("partial").is_none());
            buf.extend_from_slice(chunk);
        }
        assert_eq!(codec.decode(&mut buf).expect("whole"), Some(frame));
        assert!(buf.is_empty());
    }

    #[test]
    fn encoding_over_the_limit_fails_and_leaves_the_buffer_untouched() {
        let mut codec = FrameCodec::<ClientFrame, ClientFrame>::new(100);
        let mut buf = BytesMut::from(&b"xy"[..]);
        let frame = ClientFrame::Request(crate::Request {
            id: 1,
            body: RequestBody::Save {
                store: "s".into(),
                key: "k".into(),
                epoch: 1,
                data: vec![0; 200],
                changes: Default::default(),
            },
        });
        assert!(matches!(
            codec.encode(frame, &mut buf),
            Err(FrameError::TooLarge { max: 100, .. })
        ));
        assert_eq!(&buf[..], b"xy");
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        let mut payload = encode_payload(&ClientFrame::Request(crate::Request {
            id: 1,
            body: RequestBody::Ping,
        }))
        .expect("encode");
        payload.push(0);
        assert!(matches!(
            decode_payload::<ClientFrame>(&payload),
            Err(FrameError::Malformed(_))
        ));
    }

    /// A socket that holds whole frames, each sent by one write, and hands
    /// out at most what one read asks for, as a Unix socket does.
    struct Frames {
        sent: std::collections::VecDeque<Vec<u8>>,
        reads: usize,
    }

    impl tokio::io::AsyncRead for Frames {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            self.reads += 1;
            if let Some(front) = self.sent.front_mut() {
                let n = front.len().min(buf.remaining());
                buf.put_slice(&front[..n]);
                front.drain(..n);
                if front.is_empty() {
                    self.sent.pop_front();
                }
            }
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn each_save_sized_frame_takes_one_read() {
        use futures::StreamExt;

        let save = ClientFrame::Request(crate::Request {
            id: 1,
            body: RequestBody::Save {
                store: "s".into(),
                key: "k".into(),
                epoch: 1,
                data: vec![7; 2048],
                changes: Default::default(),
            },
        });
        let frame = crate::encode_frame(&save).expect("encode");
        let count = 40;
        let socket = Frames {
            sent: std::iter::repeat_n(frame, count).collect(),
            reads: 0,
        };
        let mut reader = tokio_util::codec::FramedRead::new(
            socket,
            FrameCodec::<ClientFrame, ClientFrame>::new(1 << 20),
        );
        let read = futures::executor::block_on(async {
            let mut read = 0;
            while let Some(frame) = reader.next().await {
                frame.expect("decode");
                read += 1;
            }
            read
        });
        assert_eq!(read, count);
        // One read per frame, and one more that finds the end.
        assert_eq!(reader.get_ref().reads, count + 1);
    }
}
