//! The messages that cross the socket.
//!
//! Every type here is part of the wire format described in the crate docs.
//! Enum variants are encoded by their position, so new variants are only ever
//! appended, and struct fields are encoded in declaration order, so a field
//! change is a protocol version change.

use serde::{Deserialize, Serialize};

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
    /// A game server: load, save, release.
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
    },
    /// A no-op round trip, for liveness checks and measuring the floor.
    Ping,
}

/// Frames sent by the daemon.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The [`Request::id`] this answers.
    pub id: u64,
    /// What happened.
    pub result: Result<Reply, Error>,
}

/// Successful outcomes, one per request kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
}

/// Why a lease was taken from its holder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LossReason {
    /// Another session loaded it with [`LoadPolicy::Steal`].
    Stolen,
    /// The holder did not release within `force_load_timeout` of a
    /// [`Event::ReleaseRequested`].
    ForceLoadTimeout,
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

/// Error codes. Append-only, like every wire enum.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
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
