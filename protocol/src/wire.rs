//! The messages that cross the socket.
//!
//! Every type here is part of the wire format described in the crate docs.
//! Enum variants are encoded by their position, so new variants are only ever
//! appended, and struct fields are encoded in declaration order, so a field
//! change is a protocol version change.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::frame::{FrameError, Inbound, decode_payload};

/// The identity of one game-server instance, as ProfileService's
/// `ActiveSession = {PlaceId, JobId}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SessionId {
    /// The game (or place) the server runs.
    pub place_id: u64,
    /// The unique id of the server process within the place.
    pub job_id: String,
}

/// What a connection is allowed to do. Admin rights are checked against the
/// peer's credentials by the daemon; asking for them is not enough.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// A game server: load, save, release, send messages, view, list
    /// versions, stats and status.
    Game,
    /// An operator tool such as `profilectl`.
    Admin,
}

/// What a load does when another session holds the profile.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LoadPolicy {
    /// Ask the owner to release, and take the lease anyway once the
    /// daemon's `force_load_timeout` has passed. The newest ForceLoad of a
    /// key wins; older ones end with [`ErrorCode::Superseded`].
    #[default]
    ForceLoad,
    /// Take the lease at once. The owner receives [`Event::LeaseLost`].
    Steal,
    /// Wait in line until the lease is free, without asking the owner.
    Repeat,
    /// Fail at once with [`ErrorCode::Taken`].
    Cancel,
}

/// The first frame on every connection, sent by the client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The client's [`PROTOCOL_VERSION`](crate::PROTOCOL_VERSION).
    pub protocol_version: u32,
    /// Who is connecting; leases are owned by sessions.
    pub session: SessionId,
    /// The rights the client asks for.
    pub role: Role,
}

/// The daemon's answer to an accepted [`Hello`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The daemon's crate version, for logs and `profilectl status`.
    pub daemon_version: String,
    /// The protocol version the daemon speaks (equal to the client's).
    pub protocol_version: u32,
    /// The largest frame the daemon accepts, so clients can refuse
    /// oversized saves locally instead of losing the connection.
    pub max_frame: u32,
    /// The daemon's id for this connection, for correlating logs.
    pub connection_id: u64,
    /// The leases this session already holds: after a reconnect within the
    /// daemon's resume grace (or after a daemon restart), they are resumed
    /// with their epochs. A lease the client believes it holds but that is
    /// missing here was lost while it was away.
    pub leases: Vec<HeldLease>,
}

/// A lease a session holds, as listed in [`Welcome::leases`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldLease {
    /// The profile's store.
    pub store: String,
    /// The profile's key.
    pub key: String,
    /// The lease's epoch.
    pub epoch: u64,
}

/// Frames sent by a client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientFrame {
    /// The handshake; only valid as the first frame.
    Hello(Hello),
    /// A request; only valid after [`ServerFrame::Welcome`].
    Request(Request),
}

/// A request and the client-chosen id its response will carry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Echoed in the [`Response`]. Ids only need to be unique among the
    /// connection's requests in flight.
    pub id: u64,
    /// What is asked.
    pub body: RequestBody,
}

/// The requests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestBody {
    /// Acquire the lease on a profile and read it.
    Load {
        /// The profile's store, e.g. `PlayerData`.
        store: String,
        /// The profile's key within the store, e.g. `Player_2261`.
        key: String,
        /// What to do when another session holds it.
        policy: LoadPolicy,
        /// How long the caller is willing to wait, in milliseconds from the
        /// moment the daemon reads the request; `None` waits as long as the
        /// policy requires.
        deadline_ms: Option<u64>,
    },
    /// Write a held profile's data. Acknowledged once durable.
    Save {
        /// The profile's store.
        store: String,
        /// The profile's key.
        key: String,
        /// The epoch of the lease the write is made under.
        epoch: u64,
        /// The new data, opaque to the daemon.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        /// Metadata changes and consumed messages, applied atomically with
        /// the data.
        changes: Changes,
    },
    /// End a lease, optionally with a final write in the same atomic step.
    Release {
        /// The profile's store.
        store: String,
        /// The profile's key.
        key: String,
        /// The epoch of the lease being ended.
        epoch: u64,
        /// A final write; `None` keeps the last saved data.
        #[serde(with = "serde_bytes")]
        data: Option<Vec<u8>>,
        /// Metadata changes and consumed messages, applied atomically with
        /// the release.
        changes: Changes,
    },
    /// A no-op round trip, for liveness checks and measuring the floor.
    Ping,
    /// Queue a message for a profile, held or not, existing or not. The
    /// holder, if any, is sent [`Event::Message`]; a later loader finds it
    /// in [`Loaded::messages`]. It stays pending until a save or release
    /// lists its id in [`Changes::consumed_messages`].
    SendMessage {
        /// The profile's store.
        store: String,
        /// The profile's key.
        key: String,
        /// The message, opaque to the daemon.
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
    /// Read a profile without a lease: its current data, or a kept version.
    View {
        /// The profile's store.
        store: String,
        /// The profile's key.
        key: String,
        /// A version from [`RequestBody::ListVersions`]; `None` is the
        /// current data.
        version: Option<u64>,
    },
    /// List a profile's kept versions. No lease is needed.
    ListVersions {
        /// The profile's store.
        store: String,
        /// The profile's key.
        key: String,
        /// Which versions, in which order.
        query: VersionQuery,
    },
    /// Admin: replace a profile's data, ending any lease on it (the holder
    /// is sent [`Event::LeaseLost`] with [`LossReason::Overwritten`]). The
    /// data it replaces is kept as a version first, so a rollback can be
    /// undone.
    Overwrite {
        /// The profile's store.
        store: String,
        /// The profile's key.
        key: String,
        /// The new data.
        source: OverwriteSource,
    },
    /// Admin: erase a profile's data, metadata, versions and messages, and
    /// end any lease on it. Its epoch and version counters are kept, so a
    /// fencing token is never reused.
    Wipe {
        /// The profile's store.
        store: String,
        /// The profile's key.
        key: String,
    },
    /// The daemon's counters and gauges.
    Stats,
    /// A summary of the daemon: version, uptime, sessions, leases, storage.
    Status,
    /// Admin: every session the daemon knows and the leases each holds.
    Sessions,
    /// Admin: end the lease on a profile now, keeping its last saved data.
    /// The holder is sent [`Event::LeaseLost`] with [`LossReason::Revoked`]
    /// and the next queued load is granted.
    Revoke {
        /// The profile's store.
        store: String,
        /// The profile's key.
        key: String,
    },
    /// Admin: send the holder of a profile [`Event::ReleaseRequested`], as a
    /// ForceLoad would, without queueing a load.
    AskRelease {
        /// The profile's store.
        store: String,
        /// The profile's key.
        key: String,
    },
    /// Admin: write a consistent copy of the database (a RocksDB
    /// checkpoint) to a new directory on the daemon's host. A daemon
    /// started on that directory serves the profiles as they were.
    Backup {
        /// The directory to create; it must not exist.
        path: String,
    },
    /// Admin: read a page of a store's profiles, in key order.
    Export {
        /// The store.
        store: String,
        /// Start after this key; `None` starts at the first.
        after: Option<String>,
        /// The most profiles in the page.
        limit: u32,
    },
    /// Admin: write a profile as exported, ending any lease on it as
    /// [`RequestBody::Overwrite`] does.
    Import {
        /// The store.
        store: String,
        /// The profile.
        profile: ExportedProfile,
    },
}

/// What a save or release changes besides the data. The default changes
/// nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changes {
    /// Replaces every meta tag when set.
    pub meta_tags: Option<BTreeMap<String, Vec<u8>>>,
    /// Replaces the user ids (for GDPR requests) when set.
    pub user_ids: Option<Vec<u64>>,
    /// Ids of the pending messages this write has applied. They are removed
    /// in the same atomic step as the write. Ids that are not pending are
    /// ignored, so a retried write is harmless.
    pub consumed_messages: Vec<u64>,
}

/// Which versions [`RequestBody::ListVersions`] returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionQuery {
    /// Newest first rather than oldest first.
    pub newest_first: bool,
    /// Only versions saved at or after this time (Unix milliseconds).
    pub from_ms: Option<u64>,
    /// Only versions saved at or before this time (Unix milliseconds).
    pub to_ms: Option<u64>,
    /// The most versions returned; the daemon may return fewer.
    pub limit: u32,
}

/// The data [`RequestBody::Overwrite`] writes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OverwriteSource {
    /// These bytes.
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The data of a kept version (a rollback).
    Version(u64),
}

/// Frames sent by the daemon.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ServerFrame {
    /// The handshake succeeded.
    Welcome(Welcome),
    /// The handshake failed; the daemon closes the connection after this.
    Refused(Error),
    /// The outcome of one request.
    Response(Response),
    /// Something the client did not ask for but must know.
    Event(Event),
}

/// The outcome of the request with the same id.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// The [`Request::id`] this answers.
    pub id: u64,
    /// What happened.
    pub result: Result<Reply, Error>,
}

/// Successful outcomes, one per request kind.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    /// The lease was granted.
    Loaded(Loaded),
    /// The save is durable.
    Saved {
        /// The profile's version after this write.
        version: u64,
    },
    /// The lease has ended; any final data is durable.
    Released {
        /// The profile's version after the release.
        version: u64,
    },
    /// The answer to [`RequestBody::Ping`].
    Pong,
    /// The message is durable and pending.
    MessageSent {
        /// The message's id, unique within the profile.
        id: u64,
    },
    /// The answer to [`RequestBody::View`].
    Viewed(ProfileView),
    /// The answer to [`RequestBody::ListVersions`].
    Versions(Vec<VersionInfo>),
    /// The overwrite or import is durable.
    Overwritten {
        /// The profile's version after the write.
        version: u64,
    },
    /// The profile is erased.
    Wiped,
    /// The answer to [`RequestBody::Stats`].
    Stats(Vec<Metric>),
    /// The answer to [`RequestBody::Status`].
    Status(DaemonStatus),
    /// The answer to [`RequestBody::Sessions`].
    Sessions(Vec<SessionInfo>),
    /// The answer to [`RequestBody::Revoke`].
    Revoked {
        /// The lease that was ended; `None` if the profile was not held.
        lease: Option<ActiveSession>,
    },
    /// The answer to [`RequestBody::AskRelease`].
    ReleaseAsked {
        /// The lease whose holder was asked; `None` if it was not held.
        lease: Option<ActiveSession>,
    },
    /// The backup is complete.
    BackedUp {
        /// The directory written.
        path: String,
        /// The size of its files, in bytes.
        bytes: u64,
    },
    /// The answer to [`RequestBody::Export`].
    Exported(ExportPage),
}

/// A granted lease and the profile it covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Loaded {
    /// The fencing token every save and release of this lease must carry.
    pub epoch: u64,
    /// The stored data, or `None` for a profile that was never saved.
    #[serde(with = "serde_bytes")]
    pub data: Option<Vec<u8>>,
    /// What the daemon knows about the profile.
    pub meta: ProfileMeta,
    /// Messages waiting to be applied, oldest first: as many as fit in
    /// the frame with the rest of this answer. The others follow it at
    /// once as [`Event::Message`]s, in order.
    pub messages: Vec<Message>,
}

/// A message sent to a profile.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Unique within the profile and increasing; a save lists it in
    /// [`Changes::consumed_messages`] once applied.
    pub id: u64,
    /// When it was sent, in Unix milliseconds.
    pub sent_at_ms: u64,
    /// What was sent.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

/// A profile read without a lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileView {
    /// The version shown.
    pub version: u64,
    /// When that version was written, in Unix milliseconds.
    pub saved_at_ms: u64,
    /// Its data; `None` if the profile has messages but was never saved.
    #[serde(with = "serde_bytes")]
    pub data: Option<Vec<u8>>,
    /// The profile's current metadata.
    pub meta: ProfileMeta,
    /// The profile's pending messages.
    pub messages: Vec<Message>,
}

/// One kept version of a profile.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// The version, for [`RequestBody::View`] and [`OverwriteSource::Version`].
    pub version: u64,
    /// When it was written, in Unix milliseconds.
    pub saved_at_ms: u64,
    /// Its data's size in bytes.
    pub size: u64,
}

/// One counter or gauge. Names and labels follow Prometheus conventions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    /// For example `profiled_loads_total`.
    pub name: String,
    /// Label names and values, for example `("policy", "force_load")`.
    pub labels: Vec<(String, String)>,
    /// The value.
    pub value: f64,
}

/// A summary of the daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonStatus {
    /// The daemon's crate version.
    pub daemon_version: String,
    /// Milliseconds since it started.
    pub uptime_ms: u64,
    /// Open client connections.
    pub connections: u64,
    /// Sessions connected or holding leases.
    pub sessions: u64,
    /// Leases held.
    pub leases_held: u64,
    /// Loads waiting in queues.
    pub queued_loads: u64,
    /// The database's size on disk, in bytes.
    pub storage_bytes: u64,
}

/// A session and its leases, for [`RequestBody::Sessions`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// The session.
    pub session: SessionId,
    /// Its connection; `None` while it is away within its resume grace.
    pub connection_id: Option<u64>,
    /// The leases it holds.
    pub leases: Vec<HeldLease>,
}

/// A page of exported profiles.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportPage {
    /// The profiles, in key order.
    pub profiles: Vec<ExportedProfile>,
    /// The key to ask for the next page after; `None` at the end.
    pub next: Option<String>,
}

/// A profile as exported and imported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportedProfile {
    /// The profile's key.
    pub key: String,
    /// Its version when exported; informational on import.
    pub version: u64,
    /// When its data was last written, in Unix milliseconds.
    pub updated_at_ms: u64,
    /// Its data, `None` if never saved.
    #[serde(with = "serde_bytes")]
    pub data: Option<Vec<u8>>,
    /// Its meta tags.
    pub meta_tags: BTreeMap<String, Vec<u8>>,
    /// Its user ids.
    pub user_ids: Vec<u64>,
}

/// A profile's metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileMeta {
    /// When the profile was first loaded, in milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// When its data was last written, in milliseconds since the Unix epoch;
    /// 0 if it never was.
    pub updated_at_ms: u64,
    /// How many times a lease on it has been granted.
    pub load_count: u64,
    /// The number of committed data writes.
    pub version: u64,
    /// The session holding the lease, if any.
    pub active: Option<ActiveSession>,
    /// Tags a game attaches to the profile, set by a save.
    pub meta_tags: BTreeMap<String, Vec<u8>>,
    /// The players whose personal data the profile holds, so a GDPR erasure
    /// request can find it.
    pub user_ids: Vec<u64>,
}

/// The holder of a lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveSession {
    /// Who holds it.
    pub session: SessionId,
    /// The lease's fencing token.
    pub epoch: u64,
    /// When it was granted, in milliseconds since the Unix epoch.
    pub since_ms: u64,
}

/// Pushed by the daemon, never in answer to a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// Another session force-loads a profile this connection holds. Save and
    /// release it promptly, or it is taken after `force_load_timeout`.
    ReleaseRequested {
        /// The profile's store.
        store: String,
        /// The profile's key.
        key: String,
        /// The epoch of the lease being asked for.
        epoch: u64,
        /// The session that wants it.
        requester: SessionId,
    },
    /// A lease this connection held was taken. Every later write under its
    /// epoch is refused with [`ErrorCode::LeaseLost`].
    LeaseLost {
        /// The profile's store.
        store: String,
        /// The profile's key.
        key: String,
        /// The epoch that is no longer valid.
        epoch: u64,
        /// Why it was taken.
        reason: LossReason,
        /// Who holds it now.
        new_owner: Option<SessionId>,
    },
    /// The daemon is stopping. It takes no more loads; saves and releases
    /// are still accepted until the deadline, after which it releases every
    /// remaining lease itself, keeping the last saved data.
    ShuttingDown {
        /// Milliseconds from when the event was sent until the daemon
        /// releases the remaining leases.
        deadline_ms: u64,
    },
    /// A message was sent to a profile this connection holds. Apply it, and
    /// list its id in the next save's [`Changes::consumed_messages`].
    Message {
        /// The profile's store.
        store: String,
        /// The profile's key.
        key: String,
        /// The epoch of the lease it was delivered under.
        epoch: u64,
        /// The message.
        message: Message,
    },
}

/// Why a lease was taken from its holder. Open: reasons appended later
/// carry no fields, and one this build does not know decodes as
/// [`LossReason::Unknown`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self")]
#[non_exhaustive]
pub enum LossReason {
    /// Another session loaded it with [`LoadPolicy::Steal`].
    Stolen,
    /// The holder did not release within `force_load_timeout` of a
    /// [`Event::ReleaseRequested`].
    ForceLoadTimeout,
    /// An admin overwrote (or imported) the profile.
    Overwritten,
    /// An admin wiped the profile.
    Wiped,
    /// An admin ended the lease.
    Revoked,
    /// A reason appended after this build, by its variant index. Never
    /// sent by a daemon of this build.
    #[serde(skip)]
    Unknown(u32),
}

/// A failed request, or a refused handshake.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct Error {
    /// What went wrong, for programs.
    pub code: ErrorCode,
    /// What went wrong, for people: lowercase, no trailing period.
    pub message: String,
}

/// Error codes. Append-only, like every wire enum, and open: codes
/// appended later carry no fields (the error's message says the rest), and
/// one this build does not know decodes as [`ErrorCode::Unknown`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(remote = "Self")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The client and daemon speak different protocol versions.
    #[error("unsupported protocol version {client} (daemon speaks {daemon})")]
    UnsupportedVersion {
        /// The client's version.
        client: u32,
        /// The daemon's version.
        daemon: u32,
    },
    /// The request is malformed or not allowed in this state.
    #[error("invalid request")]
    InvalidRequest,
    /// A frame, name or payload is over a configured limit.
    #[error("too large")]
    TooLarge,
    /// This session already holds (or is loading) the profile.
    #[error("already loaded by this session")]
    AlreadyLoaded,
    /// Another session holds the profile and the policy was `Cancel`.
    #[error("taken by place {} job {}", owner.place_id, owner.job_id)]
    Taken {
        /// The holder.
        owner: SessionId,
    },
    /// The epoch is not the profile's current lease; the write was refused.
    #[error("lease lost")]
    LeaseLost,
    /// A newer ForceLoad of the same key replaced this one.
    #[error("superseded by a newer force load")]
    Superseded,
    /// The caller's deadline passed before the lease could be granted.
    #[error("timed out")]
    Timeout,
    /// The daemon is shutting down and takes no new loads.
    #[error("daemon is shutting down")]
    ShuttingDown,
    /// The storage engine failed; nothing was acknowledged.
    #[error("storage error")]
    Storage,
    /// The profile, or the asked-for version of it, does not exist.
    #[error("not found")]
    NotFound,
    /// The request needs rights this connection does not have.
    #[error("forbidden")]
    Forbidden,
    /// The profile already has the most pending messages allowed; the
    /// message was not queued and no older one was dropped.
    #[error("too many pending messages (limit {limit})")]
    TooManyMessages {
        /// The configured limit.
        limit: u64,
    },
    /// The connection already has the most loads waiting in queues that
    /// the daemon allows (`limits.max_queued_loads`); this one was not
    /// queued. It may be sent again once one of them is answered.
    #[error("too many loads waiting (limit {limit})")]
    TooManyLoads {
        /// The configured limit.
        limit: u64,
    },
    /// The session already holds the most leases one session may
    /// (`limits.max_leases_per_session`, named in the message); the load
    /// was not granted. Release a profile before loading another.
    #[error("too many leases held by this session")]
    TooManyLeases,
    /// A code appended after this build, by its variant index; the error's
    /// message says what it means. Never sent by a daemon of this build.
    #[error("error code {0}, newer than this build")]
    #[serde(skip)]
    Unknown(u32),
}

impl Error {
    /// An error with a code and a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.place_id, self.job_id)
    }
}

impl RequestBody {
    /// How many request kinds this crate knows: a variant index at or past
    /// it was appended by a newer version.
    pub const KINDS: u32 = 17;
}

impl ServerFrame {
    /// How many frame kinds this crate knows.
    pub const KINDS: u32 = 4;
}

impl Reply {
    /// How many reply kinds this crate knows.
    pub const KINDS: u32 = 16;
}

impl Event {
    /// How many event kinds this crate knows.
    pub const KINDS: u32 = 4;
}

impl ErrorCode {
    /// How many error codes this crate knows, [`ErrorCode::Unknown`] not
    /// counted.
    pub const KINDS: u32 = 15;
}

impl LossReason {
    /// How many loss reasons this crate knows, [`LossReason::Unknown`] not
    /// counted.
    pub const KINDS: u32 = 5;
}

impl Inbound for ClientFrame {
    fn from_payload(payload: &[u8]) -> Result<Self, FrameError> {
        decode_payload(payload)
    }
}

impl Inbound for ServerFrame {
    fn from_payload(payload: &[u8]) -> Result<Self, FrameError> {
        decode_payload(payload)
    }
}
