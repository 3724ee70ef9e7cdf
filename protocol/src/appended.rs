//! Reading what a newer peer appended to the wire enums.
//!
//! Variants are appended without a new protocol version (crate docs,
//! "Evolution"), so either side may meet an index past the last one it
//! knows. A frame's length already says where it ends, so an unknown
//! variant never puts the stream out of step: each side reads the frame
//! around it and keeps the connection.
//!
//! - The daemon reads [`Incoming`]: a request of an unknown kind is named,
//!   so it alone can be refused.
//! - A client reads [`FromDaemon`]: an event or frame of an unknown kind is
//!   named, so it can be skipped, and a reply of an unknown kind, so its
//!   request alone fails.
//! - [`ErrorCode`] and [`LossReason`] are *open*: their appended variants
//!   carry no fields, so an unknown index decodes as `Unknown(index)` in
//!   place, and the rest of the message (an error's text, a lost lease's
//!   new owner) is still read.

use std::marker::PhantomData;

use serde::de::value::EnumAccessDeserializer;
use serde::de::{
    DeserializeSeed, Deserializer, EnumAccess, IntoDeserializer, VariantAccess, Visitor,
};
use serde::{Deserialize, Serialize, Serializer};

use crate::frame::{FrameError, Inbound, decode_payload};
use crate::wire::{ClientFrame, ErrorCode, Event, LossReason, Reply, RequestBody, ServerFrame};

/// What the daemon reads from a client: a [`ClientFrame`], or a request of
/// a kind appended to [`RequestBody`] after the daemon was built. Request
/// kinds are added without a new protocol version, so a newer client may
/// send one; its frame is consumed whole, the stream stays in step, and
/// the daemon answers that request alone with `InvalidRequest`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A frame this side understands.
    Frame(ClientFrame),
    /// A request whose kind this side does not know.
    UnknownRequest {
        /// The request's id, for the answer.
        id: u64,
        /// The [`RequestBody`] variant index that was sent.
        kind: u32,
    },
}

/// What a client reads from the daemon: a [`ServerFrame`], or a frame that
/// carries a variant appended after the client was built, which a newer
/// daemon may send. Each is read whole, so the connection carries on.
#[derive(Clone, Debug, PartialEq)]
pub enum FromDaemon {
    /// A frame this side understands.
    Frame(ServerFrame),
    /// A successful response whose [`Reply`] kind this side does not know:
    /// the request with this id failed to be understood, not to be done.
    UnknownReply {
        /// The request's id.
        id: u64,
        /// The [`Reply`] variant index that was sent.
        kind: u32,
    },
    /// An event of a kind this side does not know; nothing it holds
    /// depends on one, so it may be skipped.
    UnknownEvent {
        /// The [`Event`] variant index that was sent.
        kind: u32,
    },
    /// A frame of a kind this side does not know.
    UnknownFrame {
        /// The [`ServerFrame`] variant index that was sent.
        kind: u32,
    },
}

/// A wire enum whose appended variants carry no fields, and which decodes
/// an index past the last it knows as `Unknown(index)`.
pub(crate) trait Open: Sized {
    /// The enum's name, for serde.
    const NAME: &'static str;
    /// How many variants this build knows, `Unknown` not counted.
    const KINDS: u32;
    /// The derived decoder for the variants this build knows.
    fn known<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error>;
    /// The derived encoder for the variants this build knows.
    fn encode_known<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error>;
    /// A variant this build does not know, by its index.
    fn unknown(index: u32) -> Self;
    /// The index of a variant this build does not know, or `None`.
    fn unknown_index(&self) -> Option<u32>;
}

/// Decodes an [`Open`] enum.
pub(crate) fn deserialize_open<'de, T: Open, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<T, D::Error> {
    deserializer.deserialize_enum(T::NAME, &[], OpenVisitor(PhantomData))
}

/// Encodes an [`Open`] enum: an unknown variant as its bare index, which is
/// all a variant without fields is on the wire. An `Unknown` holding an
/// index this build knows is refused: encoded bare, it would be that
/// variant without its fields.
pub(crate) fn serialize_open<T: Open, S: Serializer>(
    value: &T,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match value.unknown_index() {
        Some(index) if index < T::KINDS => Err(serde::ser::Error::custom(format!(
            "{}::Unknown({index}) names a known variant",
            T::NAME
        ))),
        Some(index) => serializer.serialize_unit_variant(T::NAME, index, "Unknown"),
        None => value.encode_known(serializer),
    }
}

/// Reads an [`Open`] enum's index, then hands a known one to the derived
/// decoder.
struct OpenVisitor<T>(PhantomData<T>);

/// An enum whose index has been read already, offered to the derived
/// decoder as if it had not.
struct Peeked<V> {
    index: u32,
    variant: V,
}

impl Inbound for Incoming {
    /// A payload that is not a [`ClientFrame`] but starts like a `Request`
    /// (tag 1, the `u64` id, then a `u32` kind) whose kind is past
    /// [`RequestBody::KINDS`] is [`Incoming::UnknownRequest`]; anything
    /// else that does not decode is malformed.
    fn from_payload(payload: &[u8]) -> Result<Self, FrameError> {
        let err = match decode_payload(payload) {
            Ok(frame) => return Ok(Self::Frame(frame)),
            Err(err) => err,
        };
        let mut header = Header(payload);
        match (header.u32(), header.u64(), header.u32()) {
            (Some(1), Some(id), Some(kind)) if kind >= RequestBody::KINDS => {
                Ok(Self::UnknownRequest { id, kind })
            }
            _ => Err(err),
        }
    }
}

impl Inbound for FromDaemon {
    /// A payload that is not a [`ServerFrame`] is named by the first index
    /// in it past what this build knows: the frame's tag, an event's kind,
    /// or a successful response's reply kind (after its `u64` id and the
    /// `Result`'s tag 0). Anything else that does not decode is malformed.
    fn from_payload(payload: &[u8]) -> Result<Self, FrameError> {
        let err = match decode_payload(payload) {
            Ok(frame) => return Ok(Self::Frame(frame)),
            Err(err) => err,
        };
        let mut header = Header(payload);
        match header.u32() {
            Some(kind) if kind >= ServerFrame::KINDS => Ok(Self::UnknownFrame { kind }),
            Some(2) => match (header.u64(), header.u32(), header.u32()) {
                (Some(id), Some(0), Some(kind)) if kind >= Reply::KINDS => {
                    Ok(Self::UnknownReply { id, kind })
                }
                _ => Err(err),
            },
            Some(3) => match header.u32() {
                Some(kind) if kind >= Event::KINDS => Ok(Self::UnknownEvent { kind }),
                _ => Err(err),
            },
            _ => Err(err),
        }
    }
}

impl<'de, T: Open> Visitor<'de> for OpenVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "enum {}", T::NAME)
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<T, A::Error> {
        let (index, variant) = data.variant::<u32>()?;
        if index < T::KINDS {
            T::known(EnumAccessDeserializer::new(Peeked { index, variant }))
        } else {
            variant.unit_variant()?;
            Ok(T::unknown(index))
        }
    }
}

impl<'de, V: VariantAccess<'de>> EnumAccess<'de> for Peeked<V> {
    type Error = V::Error;
    type Variant = V;

    fn variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<(S::Value, V), V::Error> {
        let index = IntoDeserializer::<'de, V::Error>::into_deserializer(self.index);
        Ok((seed.deserialize(index)?, self.variant))
    }
}

/// Big-endian fields read off the front of a payload, for naming a frame
/// that does not decode.
struct Header<'a>(&'a [u8]);

impl Header<'_> {
    fn u32(&mut self) -> Option<u32> {
        let (field, rest) = self.0.split_first_chunk::<4>()?;
        self.0 = rest;
        Some(u32::from_be_bytes(*field))
    }

    fn u64(&mut self) -> Option<u64> {
        let (field, rest) = self.0.split_first_chunk::<8>()?;
        self.0 = rest;
        Some(u64::from_be_bytes(*field))
    }
}

/// Implements [`Open`], `Serialize` and `Deserialize` for an enum that
/// derives them with `#[serde(remote = "Self")]` (which makes the derived
/// code inherent functions, for these impls to call) and whose last
/// variant, `Unknown(u32)`, is `#[serde(skip)]`.
macro_rules! open_enum {
    ($name:ident, $kinds:expr) => {
        impl Open for $name {
            const NAME: &'static str = stringify!($name);
            const KINDS: u32 = $kinds;

            fn known<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                $name::deserialize(deserializer)
            }

            fn encode_known<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                $name::serialize(self, serializer)
            }

            fn unknown(index: u32) -> Self {
                Self::Unknown(index)
            }

            fn unknown_index(&self) -> Option<u32> {
                match self {
                    Self::Unknown(index) => Some(*index),
                    _ => None,
                }
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serialize_open(self, serializer)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                deserialize_open(deserializer)
            }
        }
    };
}

open_enum!(ErrorCode, ErrorCode::KINDS);
open_enum!(LossReason, LossReason::KINDS);

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use tokio_util::codec::Decoder;

    use super::*;
    use crate::{
        Error, ExportedProfile, FrameCodec, Request, Response, SessionId, encode_frame,
        encode_payload,
    };

    /// A frame of these fields, each already encoded.
    fn framed(fields: &[&[u8]]) -> Vec<u8> {
        let payload = fields.concat();
        let mut bytes = u32::try_from(payload.len())
            .expect("small")
            .to_be_bytes()
            .to_vec();
        bytes.extend_from_slice(&payload);
        bytes
    }

    /// A string as bincode writes it here: a `u64` length, then the bytes.
    fn string(text: &str) -> Vec<u8> {
        let mut bytes = (text.len() as u64).to_be_bytes().to_vec();
        bytes.extend_from_slice(text.as_bytes());
        bytes
    }

    /// Decodes every frame in `bytes` as a client does.
    fn read_as_client(bytes: &[u8]) -> Vec<Result<FromDaemon, String>> {
        let mut codec = FrameCodec::<FromDaemon, ClientFrame>::new(1024);
        let mut buf = BytesMut::from(bytes);
        let mut frames = Vec::new();
        while !buf.is_empty() {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => frames.push(Ok(frame)),
                Ok(None) => panic!("a partial frame was left"),
                Err(err) => {
                    frames.push(Err(err.to_string()));
                    break;
                }
            }
        }
        frames
    }

    /// A request kind from a newer client is reported with its id, and
    /// the frames after it still decode; a known kind with a broken body,
    /// or an unknown frame tag, is still malformed.
    #[test]
    fn a_request_of_an_unknown_kind_is_named_and_the_stream_stays_in_step() {
        // The last kind this crate knows is KINDS - 1. The match is
        // exhaustive, so a new kind stops this compiling until it is listed
        // here as the last, with KINDS raised.
        fn is_last(body: &RequestBody) -> bool {
            match body {
                RequestBody::Import { .. } => true,
                RequestBody::Load { .. }
                | RequestBody::Save { .. }
                | RequestBody::Release { .. }
                | RequestBody::Ping
                | RequestBody::SendMessage { .. }
                | RequestBody::View { .. }
                | RequestBody::ListVersions { .. }
                | RequestBody::Overwrite { .. }
                | RequestBody::Wipe { .. }
                | RequestBody::Stats
                | RequestBody::Status
                | RequestBody::Sessions
                | RequestBody::Revoke { .. }
                | RequestBody::AskRelease { .. }
                | RequestBody::Backup { .. }
                | RequestBody::Export { .. } => false,
            }
        }
        let last = ClientFrame::Request(Request {
            id: 1,
            body: RequestBody::Import {
                store: "s".into(),
                profile: ExportedProfile {
                    key: "k".into(),
                    version: 0,
                    updated_at_ms: 0,
                    data: None,
                    meta_tags: Default::default(),
                    user_ids: Vec::new(),
                },
            },
        });
        let ClientFrame::Request(request) = &last else {
            unreachable!("built as a request")
        };
        assert!(is_last(&request.body));
        let encoded = encode_payload(&last).expect("encode");
        assert_eq!(encoded[12..16], (RequestBody::KINDS - 1).to_be_bytes());

        let mut codec = FrameCodec::<Incoming, ClientFrame>::new(1024);
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&framed(&[
            &1u32.to_be_bytes(),
            &42u64.to_be_bytes(),
            &RequestBody::KINDS.to_be_bytes(),
            b"whatever it carries",
        ]));
        buf.extend_from_slice(&encode_frame(&last).expect("encode"));
        assert_eq!(
            codec.decode(&mut buf).expect("unknown kind"),
            Some(Incoming::UnknownRequest {
                id: 42,
                kind: RequestBody::KINDS
            })
        );
        assert_eq!(
            codec.decode(&mut buf).expect("the next frame"),
            Some(Incoming::Frame(last))
        );

        for bad in [
            framed(&[
                &1u32.to_be_bytes(),
                &42u64.to_be_bytes(),
                &(RequestBody::KINDS - 1).to_be_bytes(),
                b"\xff",
            ]),
            framed(&[
                &2u32.to_be_bytes(),
                &42u64.to_be_bytes(),
                &RequestBody::KINDS.to_be_bytes(),
            ]),
        ] {
            let mut buf = BytesMut::from(&bad[..]);
            let err = codec.decode(&mut buf).expect_err("malformed");
            assert!(matches!(err, FrameError::Malformed(_)), "{err}");
        }
    }

    /// What a newer daemon may append reaches an older client as a named
    /// unknown, each frame read whole so the next still decodes; a frame
    /// broken in a kind the client knows is still malformed.
    #[test]
    fn a_reply_event_or_frame_of_an_unknown_kind_is_named_and_the_stream_stays_in_step() {
        let pong = ServerFrame::Response(Response {
            id: 8,
            result: Ok(Reply::Pong),
        });
        let pong_bytes = encode_frame(&pong).expect("encode");
        let stream = [
            framed(&[
                &2u32.to_be_bytes(),
                &7u64.to_be_bytes(),
                &0u32.to_be_bytes(),
                &Reply::KINDS.to_be_bytes(),
                b"its fields",
            ]),
            pong_bytes.clone(),
            framed(&[
                &3u32.to_be_bytes(),
                &(Event::KINDS + 3).to_be_bytes(),
                b"its fields",
            ]),
            pong_bytes.clone(),
            framed(&[&ServerFrame::KINDS.to_be_bytes(), b"anything"]),
            pong_bytes.clone(),
        ]
        .concat();
        let frames = read_as_client(&stream);
        let ok = Ok(FromDaemon::Frame(pong));
        assert_eq!(
            frames,
            [
                Ok(FromDaemon::UnknownReply {
                    id: 7,
                    kind: Reply::KINDS
                }),
                ok.clone(),
                Ok(FromDaemon::UnknownEvent {
                    kind: Event::KINDS + 3
                }),
                ok.clone(),
                Ok(FromDaemon::UnknownFrame {
                    kind: ServerFrame::KINDS
                }),
                ok,
            ]
        );

        for broken in [
            // A known reply kind (Saved) with its field cut short.
            framed(&[
                &2u32.to_be_bytes(),
                &7u64.to_be_bytes(),
                &0u32.to_be_bytes(),
                &1u32.to_be_bytes(),
                b"\x01",
            ]),
            // A `Result` tag that is neither Ok nor Err.
            framed(&[
                &2u32.to_be_bytes(),
                &7u64.to_be_bytes(),
                &5u32.to_be_bytes(),
                &Reply::KINDS.to_be_bytes(),
            ]),
            // A known event kind (ShuttingDown) without its deadline.
            framed(&[&3u32.to_be_bytes(), &2u32.to_be_bytes()]),
            // A header too short to name anything.
            framed(&[&3u32.to_be_bytes(), b"\x00"]),
        ] {
            let frames = read_as_client(&broken);
            assert!(
                matches!(&frames[..], [Err(err)] if err.starts_with("malformed frame")),
                "{frames:?}"
            );
        }
    }

    /// An error code or loss reason appended later decodes in place as
    /// `Unknown`, and what follows it in the message is still read.
    #[test]
    fn an_error_code_or_loss_reason_appended_later_is_unknown_and_the_rest_is_read() {
        let error = framed(&[
            &2u32.to_be_bytes(),
            &7u64.to_be_bytes(),
            &1u32.to_be_bytes(),
            &(ErrorCode::KINDS + 2).to_be_bytes(),
            &string("the daemon's own words"),
        ]);
        let unknown_code = ServerFrame::Response(Response {
            id: 7,
            result: Err(Error::new(
                ErrorCode::Unknown(ErrorCode::KINDS + 2),
                "the daemon's own words",
            )),
        });
        assert_eq!(
            read_as_client(&error),
            [Ok(FromDaemon::Frame(unknown_code.clone()))]
        );
        // Encoded, an unknown code is its bare index again.
        assert_eq!(encode_frame(&unknown_code).expect("encode"), error);

        let owner = SessionId {
            place_id: 3,
            job_id: "b".into(),
        };
        let lost = framed(&[
            &3u32.to_be_bytes(),
            &1u32.to_be_bytes(),
            &string("store"),
            &string("key"),
            &9u64.to_be_bytes(),
            &LossReason::KINDS.to_be_bytes(),
            &[1],
            &3u64.to_be_bytes(),
            &string("b"),
        ]);
        let unknown_reason = ServerFrame::Event(Event::LeaseLost {
            store: "store".into(),
            key: "key".into(),
            epoch: 9,
            reason: LossReason::Unknown(LossReason::KINDS),
            new_owner: Some(owner),
        });
        assert_eq!(
            read_as_client(&lost),
            [Ok(FromDaemon::Frame(unknown_reason.clone()))]
        );
        assert_eq!(encode_frame(&unknown_reason).expect("encode"), lost);

        // An `Unknown` that names a known index would encode that variant
        // without its fields; it is refused instead.
        let fieldless = Error::new(ErrorCode::Unknown(4), "Taken has an owner");
        assert!(encode_frame(&ServerFrame::Refused(fieldless)).is_err());
    }

    /// Each `KINDS` is one past the index of the last variant this crate
    /// knows, and the known variants of the open enums still decode. The
    /// matches are exhaustive (but for `Unknown`), so a new variant stops
    /// this compiling until it is listed here as the last, with `KINDS`
    /// raised.
    #[test]
    fn kinds_count_the_variants_this_crate_knows() {
        fn index(payload: &[u8], at: usize) -> u32 {
            u32::from_be_bytes(payload[at..at + 4].try_into().expect("four bytes"))
        }
        fn is_last_code(code: &ErrorCode) -> bool {
            match code {
                ErrorCode::TooManyLeases => true,
                ErrorCode::UnsupportedVersion { .. }
                | ErrorCode::InvalidRequest
                | ErrorCode::TooLarge
                | ErrorCode::AlreadyLoaded
                | ErrorCode::Taken { .. }
                | ErrorCode::LeaseLost
                | ErrorCode::Superseded
                | ErrorCode::Timeout
                | ErrorCode::ShuttingDown
                | ErrorCode::Storage
                | ErrorCode::NotFound
                | ErrorCode::Forbidden
                | ErrorCode::TooManyMessages { .. }
                | ErrorCode::TooManyLoads { .. }
                | ErrorCode::Unknown(_) => false,
            }
        }
        fn is_last_reason(reason: LossReason) -> bool {
            match reason {
                LossReason::Revoked => true,
                LossReason::Stolen
                | LossReason::ForceLoadTimeout
                | LossReason::Overwritten
                | LossReason::Wiped
                | LossReason::Unknown(_) => false,
            }
        }
        fn is_last_reply(reply: &Reply) -> bool {
            match reply {
                Reply::Exported(_) => true,
                Reply::Loaded(_)
                | Reply::Saved { .. }
                | Reply::Released { .. }
                | Reply::Pong
                | Reply::MessageSent { .. }
                | Reply::Viewed(_)
                | Reply::Versions(_)
                | Reply::Overwritten { .. }
                | Reply::Wiped
                | Reply::Stats(_)
                | Reply::Status(_)
                | Reply::Sessions(_)
                | Reply::Revoked { .. }
                | Reply::ReleaseAsked { .. }
                | Reply::BackedUp { .. } => false,
            }
        }
        fn is_last_event(event: &Event) -> bool {
            match event {
                Event::Message { .. } => true,
                Event::ReleaseRequested { .. }
                | Event::LeaseLost { .. }
                | Event::ShuttingDown { .. } => false,
            }
        }
        fn is_last_frame(frame: &ServerFrame) -> bool {
            match frame {
                ServerFrame::Event(_) => true,
                ServerFrame::Welcome(_) | ServerFrame::Refused(_) | ServerFrame::Response(_) => {
                    false
                }
            }
        }

        let code = ErrorCode::TooManyLeases;
        let refused = ServerFrame::Refused(Error::new(code.clone(), "x"));
        let encoded = encode_payload(&refused).expect("encode");
        assert!(is_last_code(&code));
        assert_eq!(index(&encoded, 4), ErrorCode::KINDS - 1);
        assert_eq!(
            crate::decode_payload::<ServerFrame>(&encoded).expect("decode"),
            refused
        );

        let reply = Reply::Exported(crate::ExportPage {
            profiles: Vec::new(),
            next: None,
        });
        assert!(is_last_reply(&reply));
        let encoded = encode_payload(&ServerFrame::Response(Response {
            id: 1,
            result: Ok(reply),
        }))
        .expect("encode");
        assert_eq!(index(&encoded, 16), Reply::KINDS - 1);

        let event = Event::Message {
            store: "s".into(),
            key: "k".into(),
            epoch: 1,
            message: crate::Message {
                id: 1,
                sent_at_ms: 0,
                payload: Vec::new(),
            },
        };
        assert!(is_last_event(&event));
        let frame = ServerFrame::Event(event);
        assert!(is_last_frame(&frame));
        let encoded = encode_payload(&frame).expect("encode");
        assert_eq!(index(&encoded, 0), ServerFrame::KINDS - 1);
        assert_eq!(index(&encoded, 4), Event::KINDS - 1);

        let reason = LossReason::Revoked;
        assert!(is_last_reason(reason));
        let lost = ServerFrame::Event(Event::LeaseLost {
            store: String::new(),
            key: String::new(),
            epoch: 1,
            reason,
            new_owner: None,
        });
        let encoded = encode_payload(&lost).expect("encode");
        assert_eq!(index(&encoded, 8 + 16 + 8), LossReason::KINDS - 1);
        assert_eq!(
            crate::decode_payload::<ServerFrame>(&encoded).expect("decode"),
            lost
        );
    }
}
