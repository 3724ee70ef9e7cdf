//! The profiled wire protocol, shared by the daemon and its clients.
//!
//! This page is the protocol's one written definition. A client in another
//! language can be written from it alone.
//!
//! # Transport
//!
//! A Unix stream socket. The client speaks first. Both directions carry a
//! sequence of frames and nothing else.
//!
//! # Frames
//!
//! ```text
//! +----------------------+---------------------------+
//! | length: u32, BE      | payload: `length` bytes   |
//! +----------------------+---------------------------+
//! ```
//!
//! `length` counts the payload only. The daemon's limit (`limits.max_frame`
//! in its config, announced in [`Welcome::max_frame`]) applies to `length`:
//! a longer prefix is refused as soon as its four bytes arrive, before any
//! buffer is allocated for it, and the connection is closed. A payload that
//! does not decode to exactly one message, with no bytes left over, is
//! malformed and also closes the connection, except for a variant appended
//! after the reader was built (see [Evolution](#evolution)).
//!
//! # Payload encoding
//!
//! Payloads are [bincode] 2.0.1 in its serde mode, with one configuration
//! ([`CONFIG`]): big-endian, fixed-width integers. That gives:
//!
//! | type | bytes |
//! |---|---|
//! | `u8`, `bool` | 1 (`bool` is 0 or 1) |
//! | `u32` | 4, big-endian |
//! | `u64` | 8, big-endian |
//! | `String` | `u64` byte length, then that many bytes of UTF-8 |
//! | byte string (`data`) | `u64` length, then the bytes |
//! | `Option<T>` | `u8` 0 for none; `u8` 1 then `T` for some |
//! | `Vec<T>` | `u64` count, then each `T` |
//! | struct | its fields in declaration order, no padding, no names |
//! | enum | `u32` variant index (0 for the first variant), then the variant's fields in order |
//! | `f64` | 8, IEEE 754, big-endian |
//! | `Map<K, V>` | `u64` count, then each key and its value, keys in ascending byte order |
//! | `(A, B)` | `A` then `B` |
//! | `Result<T, E>` | an enum: 0 then `T` for Ok, 1 then `E` for Err |
//!
//! Variant indexes are positions in the declarations below. Enums on the
//! wire are append-only, so an index never changes meaning. Any change to a
//! struct's fields changes [`PROTOCOL_VERSION`].
//!
//! # Evolution
//!
//! Variants are appended without a new protocol version, so a peer may
//! meet an index past the last one it knows. The frame's length already
//! says where the frame ends, so the reader skips what it cannot read and
//! keeps the connection:
//!
//! - The daemon answers a `Request` of a `RequestBody` kind it does not
//!   know with `InvalidRequest` to that request's id.
//! - After the `Welcome`, a client skips a `ServerFrame` of an unknown kind
//!   and an `Event` of an unknown kind (before it, anything but a `Welcome`
//!   or `Refused` fails the handshake), and fails only the request whose
//!   `Response` carries an
//!   `Ok` with an unknown `Reply` kind. (A daemon answers each request kind
//!   with the replies it had when that kind was added, so this means a
//!   broken daemon, not a newer one.)
//! - `ErrorCode` and `LossReason` are *open*: a variant appended to either
//!   carries no fields, so one a reader does not know is a bare `u32` and
//!   the rest of the message (the error's `message`, `LeaseLost`'s
//!   `new_owner`) still follows it and is read. The Rust types decode such
//!   an index as `ErrorCode::Unknown(index)` and `LossReason::Unknown(index)`.
//!
//! Only the first unknown index in a frame is looked for: a known `Reply`
//! or `Event` whose fields are broken is malformed, as before.
//!
//! # Messages
//!
//! The client sends [`ClientFrame`]s:
//!
//! ```text
//! ClientFrame  0 Hello { protocol_version: u32, session: SessionId, role: Role }
//!              1 Request { id: u64, body: RequestBody }
//! SessionId      { place_id: u64, job_id: String }
//! Role         0 Game   1 Admin
//! RequestBody  0 Load { store: String, key: String, policy: LoadPolicy, deadline_ms: Option<u64> }
//!              1 Save { store: String, key: String, epoch: u64, data: bytes, changes: Changes }
//!              2 Release { store: String, key: String, epoch: u64, data: Option<bytes>, changes: Changes }
//!              3 Ping
//!              4 SendMessage { store: String, key: String, payload: bytes }
//!              5 View { store: String, key: String, version: Option<u64> }
//!              6 ListVersions { store: String, key: String, query: VersionQuery }
//!              7 Overwrite { store: String, key: String, source: OverwriteSource }      (admin)
//!              8 Wipe { store: String, key: String }                                    (admin)
//!              9 Stats
//!             10 Status
//!             11 Sessions                                                               (admin)
//!             12 Revoke { store: String, key: String }                                  (admin)
//!             13 AskRelease { store: String, key: String }                              (admin)
//!             14 Backup { path: String }                                                (admin)
//!             15 Export { store: String, after: Option<String>, limit: u32 }            (admin)
//!             16 Import { store: String, profile: ExportedProfile }                     (admin)
//! LoadPolicy   0 ForceLoad   1 Steal   2 Repeat   3 Cancel
//! Changes        { meta_tags: Option<Map<String, bytes>>, user_ids: Option<Vec<u64>>,
//!                  consumed_messages: Vec<u64> }
//! VersionQuery   { newest_first: bool, from_ms: Option<u64>, to_ms: Option<u64>, limit: u32 }
//! OverwriteSource 0 Data(bytes)   1 Version(u64)
//! ExportedProfile { key: String, version: u64, updated_at_ms: u64, data: Option<bytes>,
//!                   meta_tags: Map<String, bytes>, user_ids: Vec<u64> }
//! ```
//!
//! Requests marked (admin) need a connection whose `Hello` asked for
//! `Role::Admin`; any other connection gets `Forbidden`.
//!
//! The daemon sends [`ServerFrame`]s:
//!
//! ```text
//! ServerFrame  0 Welcome { daemon_version: String, protocol_version: u32, max_frame: u32, connection_id: u64,
//!                        leases: Vec<HeldLease> }
//!              1 Refused(Error)
//!              2 Response { id: u64, result: Result<Reply, Error> }
//!              3 Event(Event)
//! Reply        0 Loaded { epoch: u64, data: Option<bytes>, meta: ProfileMeta, messages: Vec<Message> }
//!              1 Saved { version: u64 }
//!              2 Released { version: u64 }
//!              3 Pong
//!              4 MessageSent { id: u64 }
//!              5 Viewed(ProfileView)
//!              6 Versions(Vec<VersionInfo>)
//!              7 Overwritten { version: u64 }
//!              8 Wiped
//!              9 Stats(Vec<Metric>)
//!             10 Status(DaemonStatus)
//!             11 Sessions(Vec<SessionInfo>)
//!             12 Revoked { lease: Option<ActiveSession> }
//!             13 ReleaseAsked { lease: Option<ActiveSession> }
//!             14 BackedUp { path: String, bytes: u64 }
//!             15 Exported(ExportPage)
//! ProfileMeta    { created_at_ms: u64, updated_at_ms: u64, load_count: u64, version: u64,
//!                  active: Option<ActiveSession>, meta_tags: Map<String, bytes>, user_ids: Vec<u64> }
//! ActiveSession  { session: SessionId, epoch: u64, since_ms: u64 }
//! Message        { id: u64, sent_at_ms: u64, payload: bytes }
//! ProfileView    { version: u64, saved_at_ms: u64, data: Option<bytes>, meta: ProfileMeta,
//!                  messages: Vec<Message> }
//! VersionInfo    { version: u64, saved_at_ms: u64, size: u64 }
//! Metric         { name: String, labels: Vec<(String, String)>, value: f64 }
//! DaemonStatus   { daemon_version: String, uptime_ms: u64, connections: u64, sessions: u64,
//!                  leases_held: u64, queued_loads: u64, storage_bytes: u64 }
//! SessionInfo    { session: SessionId, connection_id: Option<u64>, leases: Vec<HeldLease> }
//! ExportPage     { profiles: Vec<ExportedProfile>, next: Option<String> }
//! HeldLease      { store: String, key: String, epoch: u64 }
//! Event        0 ReleaseRequested { store: String, key: String, epoch: u64, requester: SessionId }
//!              1 LeaseLost { store: String, key: String, epoch: u64, reason: LossReason,
//!                            new_owner: Option<SessionId> }
//!              2 ShuttingDown { deadline_ms: u64 }
//!              3 Message { store: String, key: String, epoch: u64, message: Message }
//! LossReason   0 Stolen   1 ForceLoadTimeout   2 Overwritten   3 Wiped   4 Revoked
//!              (open: later reasons carry no fields)
//! Error          { code: ErrorCode, message: String }
//! ErrorCode    0 UnsupportedVersion { client: u32, daemon: u32 }
//!              1 InvalidRequest   2 TooLarge   3 AlreadyLoaded
//!              4 Taken { owner: SessionId }
//!              5 LeaseLost   6 Superseded   7 Timeout   8 ShuttingDown   9 Storage
//!             10 NotFound   11 Forbidden   12 TooManyMessages { limit: u64 }
//!             13 TooManyLoads { limit: u64 }   14 TooManyLeases
//!              (open: later codes carry no fields)
//! ```
//!
//! Times are milliseconds since the Unix epoch, by the daemon's clock.
//!
//! # Example
//!
//! `Request { id: 7, body: Ping }` is the frame
//!
//! ```text
//! 00 00 00 10                length 16
//! 00 00 00 01                ClientFrame::Request
//! 00 00 00 00 00 00 00 07    id 7
//! 00 00 00 03                RequestBody::Ping
//! ```
//!
//! # Conversation
//!
//! 1. The client sends `Hello`. The daemon answers `Welcome`, or `Refused`
//!    and closes the connection (a version mismatch is refused with
//!    `UnsupportedVersion` naming both versions). A client that sends
//!    anything else first is disconnected.
//! 2. The client sends requests, each with an id of its choosing. Every
//!    request gets exactly one `Response` with that id; an answer that
//!    would not fit in a frame is replaced by a `TooLarge` error to the
//!    same request (a `View` of a profile whose pending messages outgrew
//!    the frame, for example). Responses may come
//!    in any order: a load waiting in a queue does not hold up the saves
//!    sent after it. Writes under one lease sent on one connection take
//!    effect in the order sent: a save sent behind a release of the same
//!    lease, even before that release is answered, is refused with
//!    `LeaseLost`, as it would be after the release.
//! 3. The daemon may send an `Event` at any time after `Welcome`.
//! 4. Either side may close the connection. The daemon cancels the
//!    connection's queued loads and keeps its leases for the resume grace
//!    (`session.resume_grace`): a new connection with the same `SessionId`
//!    within that time resumes them with the same epochs, listed in
//!    `Welcome::leases`. After the `Welcome` (not necessarily before other
//!    frames) the daemon sends each resumed lease's pending messages as
//!    `Event::Message`s, oldest first, as many as the connection's queue
//!    has room for; they include any the client was sent before it went
//!    away and has not yet consumed, so skip ids already handed over for
//!    that lease. Those not sent stay pending. If no connection resumes
//!    the session within the grace, the daemon releases its leases,
//!    keeping the last saved data. A `Hello` for a session that is still connected
//!    takes the session over; the older connection is sent
//!    `Refused(Superseded)` and closed, and should not reconnect.
//!
//! `Refused` is always the last frame the daemon sends on a connection:
//! after a failed handshake, a malformed or oversized frame (requests read
//! before it are answered first), or a takeover.
//! 5. On shutdown the daemon sends `ShuttingDown { deadline_ms }`, refuses
//!    new loads with `ShuttingDown`, accepts saves and releases until the
//!    deadline, then releases what is left itself.
//!
//! # Leases
//!
//! A `Load` that succeeds grants a lease with an `epoch`, a fencing token
//! that strictly increases for each profile, across daemon restarts too.
//! `Save` and `Release` carry it; a write under any other epoch fails with
//! `LeaseLost` and changes nothing. `Saved` and `Released` are sent only once
//! the write is durable.
//!
//! # Messages to profiles
//!
//! `SendMessage` stores a message durably and answers with its id. If the
//! profile is held, its holder is sent `Event::Message` at once (a holder
//! whose session is away gets it after its next `Welcome`); whoever
//! loads it next finds the pending messages in `Loaded::messages`, oldest
//! first, as many as fit in the frame with the data; the rest follow the
//! `Loaded` answer at once as `Event::Message`s, in order. A
//! message stays pending until a `Save` or `Release` under the current epoch
//! lists its id in `Changes::consumed_messages`; the removal is part of that
//! write's atomic step, so a message is applied exactly once even if the
//! holder crashes between receiving and saving.
//!
//! [bincode]: https://docs.rs/bincode/2.0.1

// Data from clients must never panic the daemon: no `expect` and no
// indexing that could go out of bounds outside tests (`unwrap` is denied
// workspace-wide).
#![cfg_attr(not(test), warn(clippy::expect_used, clippy::indexing_slicing))]
#![warn(missing_docs)]

mod appended;
mod frame;
mod wire;

pub use appended::{FromDaemon, Incoming};
pub use frame::{
    CONFIG, FrameCodec, FrameError, Inbound, LENGTH_PREFIX, MAX_FRAME_CEILING, decode_payload,
    encode_frame, encode_frame_into, encode_payload, payload_len,
};
pub use wire::{
    ActiveSession, Changes, ClientFrame, DaemonStatus, Error, ErrorCode, Event, ExportPage,
    ExportedProfile, HeldLease, Hello, LoadPolicy, Loaded, LossReason, Message, Metric,
    OverwriteSource, ProfileMeta, ProfileView, Reply, Request, RequestBody, Response, Role,
    ServerFrame, SessionId, SessionInfo, VersionInfo, VersionQuery, Welcome,
};

/// The protocol version this crate speaks. A daemon refuses a `Hello` with
/// any other.
pub const PROTOCOL_VERSION: u32 = 3;

/// The daemon's default frame limit: 4 MiB.
pub const DEFAULT_MAX_FRAME: u32 = 4 * 1024 * 1024;
