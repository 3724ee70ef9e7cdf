//! The connection handle and the requests made through it.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use profiled_protocol::{
    ClientFrame, DEFAULT_MAX_FRAME, FrameCodec, Hello, LoadPolicy, PROTOCOL_VERSION, Reply,
    Request, RequestBody, Role, ServerFrame, SessionId, Welcome, encode_frame_into,
};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::codec::{BytesCodec, FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use crate::connection::{self, Effect, Pending, Shared};
use crate::{ClientError, Profile};

/// How many encoded frames may wait for the writer task. Callers wait for
/// room beyond this, which bounds the memory queued behind a slow socket.
const WRITE_QUEUE: usize = 256;

/// A connection to the daemon, shared by cloning.
///
/// Every clone, and every [`Profile`] loaded through one, uses the same
/// socket; calls from many tasks run concurrently over it. The connection
/// closes when the last clone and profile are dropped, or at once on
/// [`Client::close`]. The daemon then releases the session's leases.
#[derive(Clone, Debug)]
pub struct Client {
    /// Dropped with the last clone, which stops the background tasks.
    inner: Arc<Inner>,
}

/// How to connect.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// The rights asked for. The daemon grants [`Role::Admin`] only to
    /// peers its configuration allows.
    pub role: Role,
    /// The largest frame this client reads or writes. Writes are further
    /// held to the daemon's announced [`Welcome::max_frame`], so an
    /// oversized save fails locally instead of closing the connection.
    pub max_frame: u32,
}

/// How to load.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// What to do when another session holds the profile.
    pub policy: LoadPolicy,
    /// How long the daemon may take to grant the lease before failing with
    /// [`ErrorCode::Timeout`](crate::ErrorCode::Timeout), counted from when it
    /// reads the request and rounded up to whole milliseconds; `None` waits
    /// as long as the policy requires.
    pub deadline: Option<Duration>,
}

/// The state behind every clone of a [`Client`].
struct Inner {
    /// The session the connection was opened for.
    session: SessionId,
    /// The daemon's handshake answer.
    welcome: Welcome,
    /// The largest payload a request may encode to: the smaller of ours and
    /// the daemon's limit.
    max_frame: u32,
    /// Request ids, unique on this connection.
    next_id: AtomicU64,
    /// Encoded frames for the writer task, which holds the receiver.
    frames: mpsc::Sender<Bytes>,
    /// The routing tables the reader task fills in.
    shared: Arc<Shared>,
    /// Cancelled to stop both tasks, which shuts the socket down.
    cancel: CancellationToken,
    /// The tasks, taken by [`Client::close`] to wait for them.
    tasks: Mutex<Option<Tasks>>,
}

/// The connection's background tasks.
struct Tasks {
    /// Runs [`connection::read_frames`].
    reader: JoinHandle<()>,
    /// Runs [`connection::write_frames`].
    writer: JoinHandle<()>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            role: Role::Game,
            max_frame: DEFAULT_MAX_FRAME,
        }
    }
}

impl Client {
    /// Connects to the daemon's socket at `path` as a game server and
    /// completes the handshake.
    pub async fn connect(
        path: impl AsRef<Path>,
        session: SessionId,
    ) -> Result<Client, ClientError> {
        Self::connect_with(path, session, ConnectOptions::default()).await
    }

    /// Connects to the daemon's socket at `path` and completes the
    /// handshake, with explicit options.
    pub async fn connect_with(
        path: impl AsRef<Path>,
        session: SessionId,
        options: ConnectOptions,
    ) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).await?;
        let (read_half, write_half) = stream.into_split();
        let mut reader = FramedRead::new(
            read_half,
            FrameCodec::<ServerFrame, ClientFrame>::new(options.max_frame),
        );
        let mut writer = FramedWrite::new(write_half, BytesCodec::new());

        let hello = ClientFrame::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            session: session.clone(),
            role: options.role,
        });
        writer.send(encode(&hello, options.max_frame)?).await?;
        let welcome = match reader.next().await {
            Some(Ok(ServerFrame::Welcome(welcome))) => welcome,
            Some(Ok(ServerFrame::Refused(err))) => return Err(ClientError::Refused(err)),
            Some(Ok(other)) => {
                return Err(ClientError::Protocol(format!(
                    "expected a welcome, got {}",
                    frame_name(&other)
                )));
            }
            Some(Err(err)) => return Err(err.into()),
            None => return Err(ClientError::Disconnected),
        };
        if welcome.protocol_version != PROTOCOL_VERSION {
            return Err(ClientError::Protocol(format!(
                "welcomed with protocol version {}, expected {PROTOCOL_VERSION}",
                welcome.protocol_version
            )));
        }

        let shared = Arc::new(Shared::default());
        let cancel = CancellationToken::new();
        let (frames, queue) = mpsc::channel(WRITE_QUEUE);
        let tasks = Tasks {
            reader: tokio::spawn(connection::read_frames(
                reader,
                Arc::clone(&shared),
                cancel.clone(),
            )),
            writer: tokio::spawn(connection::write_frames(writer, queue, cancel.clone())),
        };
        Ok(Client {
            inner: Arc::new(Inner {
                max_frame: options.max_frame.min(welcome.max_frame),
                session,
                welcome,
                next_id: AtomicU64::new(1),
                frames,
                shared,
                cancel,
                tasks: Mutex::new(Some(tasks)),
            }),
        })
    }

    /// The session this connection was opened for.
    pub fn session(&self) -> &SessionId {
        &self.inner.session
    }

    /// The daemon's handshake answer.
    pub fn welcome(&self) -> &Welcome {
        &self.inner.welcome
    }

    /// Acquires the lease on `store`/`key` and reads the profile.
    pub async fn load(
        &self,
        store: &str,
        key: &str,
        policy: LoadPolicy,
    ) -> Result<Profile, ClientError> {
        let options = LoadOptions {
            policy,
            deadline: None,
        };
        self.load_with(store, key, options).await
    }

    /// Acquires the lease on `store`/`key` and reads the profile, with a
    /// deadline if given.
    pub async fn load_with(
        &self,
        store: &str,
        key: &str,
        options: LoadOptions,
    ) -> Result<Profile, ClientError> {
        // The reader task installs the sender the moment the response
        // arrives, so events sent right behind it are not missed.
        let (events_tx, events) = mpsc::unbounded_channel();
        let body = RequestBody::Load {
            store: store.to_owned(),
            key: key.to_owned(),
            policy: options.policy,
            deadline_ms: options.deadline.map(duration_ms),
        };
        let effect = Effect::Subscribe {
            store: store.to_owned(),
            key: key.to_owned(),
            events: events_tx,
        };
        match self.request(body, effect).await? {
            Reply::Loaded(loaded) => Ok(Profile {
                client: self.clone(),
                store: store.to_owned(),
                key: key.to_owned(),
                epoch: loaded.epoch,
                data: loaded.data,
                meta: loaded.meta,
                events,
            }),
            other => Err(unexpected("loaded", &other)),
        }
    }

    /// Writes a held profile's data under the lease `epoch`, and returns
    /// the profile's version after the write once it is durable.
    pub async fn save(
        &self,
        store: &str,
        key: &str,
        epoch: u64,
        data: Vec<u8>,
    ) -> Result<u64, ClientError> {
        let body = RequestBody::Save {
            store: store.to_owned(),
            key: key.to_owned(),
            epoch,
            data,
        };
        match self.request(body, Effect::None).await? {
            Reply::Saved { version } => Ok(version),
            other => Err(unexpected("saved", &other)),
        }
    }

    /// Ends the lease `epoch` on a profile, with a final write of `data` in
    /// the same atomic step if given, and returns the profile's version
    /// after it. The lease's [`Profile`] receives no more events.
    pub async fn release(
        &self,
        store: &str,
        key: &str,
        epoch: u64,
        data: Option<Vec<u8>>,
    ) -> Result<u64, ClientError> {
        let body = RequestBody::Release {
            store: store.to_owned(),
            key: key.to_owned(),
            epoch,
            data,
        };
        let effect = Effect::Unsubscribe {
            store: store.to_owned(),
            key: key.to_owned(),
            epoch,
        };
        match self.request(body, effect).await? {
            Reply::Released { version } => Ok(version),
            other => Err(unexpected("released", &other)),
        }
    }

    /// Makes a round trip to the daemon.
    pub async fn ping(&self) -> Result<(), ClientError> {
        match self.request(RequestBody::Ping, Effect::None).await? {
            Reply::Pong => Ok(()),
            other => Err(unexpected("pong", &other)),
        }
    }

    /// Closes the connection; the daemon then releases this session's
    /// leases.
    ///
    /// This takes effect for every clone and [`Profile`] at once: requests
    /// in flight fail with [`ClientError::Disconnected`], later ones fail
    /// the same way, and event streams end. It returns once the socket is
    /// shut down.
    pub async fn close(self) {
        self.inner.cancel.cancel();
        let tasks = self
            .inner
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(Tasks { reader, writer }) = tasks {
            // Neither task panics, and a task cancelled by a runtime shutting
            // down has nothing left to wait for.
            let _ = writer.await;
            let _ = reader.await;
        }
    }

    /// The routing tables, for [`Profile`]'s drop.
    pub(crate) fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    /// Sends one request and waits for its reply.
    ///
    /// The frame is encoded here, not by the writer task, so a frame over
    /// the limit fails only its own call and the connection stays usable.
    async fn request(&self, body: RequestBody, effect: Effect) -> Result<Reply, ClientError> {
        let inner = &*self.inner;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = encode(&ClientFrame::Request(Request { id, body }), inner.max_frame)?;
        let (reply, response) = oneshot::channel();
        if !inner.shared.register(id, Pending { reply, effect }) {
            return Err(ClientError::Disconnected);
        }
        // If this call is dropped while waiting for room in the queue, the
        // request was never sent and its entry must go. Once it is queued the
        // entry stays: its response will come and remove it.
        let unsent = Unsent {
            shared: &inner.shared,
            id,
        };
        if inner.frames.send(frame).await.is_err() {
            // The writer has stopped, so the frame was never sent; dropping
            // the guard removes the entry.
            return Err(ClientError::Disconnected);
        }
        unsent.queued();
        match response.await {
            Ok(result) => result.map_err(ClientError::Daemon),
            Err(_) => Err(ClientError::Disconnected),
        }
    }
}

/// Removes a registered request's entry unless its frame was queued, so a
/// request that was never sent leaves nothing behind.
struct Unsent<'a> {
    /// Where the entry was registered.
    shared: &'a Shared,
    /// The entry's request id.
    id: u64,
}

impl Unsent<'_> {
    /// The frame is queued, so its response will come and remove the entry.
    fn queued(self) {
        std::mem::forget(self);
    }
}

impl Drop for Unsent<'_> {
    fn drop(&mut self) {
        self.shared.forget(self.id);
    }
}

impl std::fmt::Debug for Inner {
    /// Shows who the connection is, not its routing tables.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("session", &self.session)
            .field("connection_id", &self.welcome.connection_id)
            .field("closed", &self.cancel.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    /// The last clone is gone: stop both tasks, which closes the socket.
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Encodes one frame, prefix included, held to `max_frame`.
fn encode(frame: &ClientFrame, max_frame: u32) -> Result<Bytes, ClientError> {
    let mut buf = BytesMut::new();
    encode_frame_into(frame, &mut buf, max_frame)?;
    Ok(buf.freeze())
}

/// Converts a deadline to whole milliseconds, rounding up so that a short
/// non-zero deadline never becomes an immediate timeout.
fn duration_ms(deadline: Duration) -> u64 {
    u64::try_from(deadline.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

/// The error for a success of the wrong kind.
fn unexpected(expected: &str, got: &Reply) -> ClientError {
    let got = match got {
        Reply::Loaded(_) => "loaded",
        Reply::Saved { .. } => "saved",
        Reply::Released { .. } => "released",
        Reply::Pong => "pong",
    };
    ClientError::Protocol(format!("expected a {expected} reply, got {got}"))
}

/// A frame's kind, for errors; the frame itself may be large.
fn frame_name(frame: &ServerFrame) -> &'static str {
    match frame {
        ServerFrame::Welcome(_) => "welcome",
        ServerFrame::Refused(_) => "refusal",
        ServerFrame::Response(_) => "response",
        ServerFrame::Event(_) => "event",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_round_up_to_whole_milliseconds() {
        assert_eq!(duration_ms(Duration::ZERO), 0);
        assert_eq!(duration_ms(Duration::from_nanos(1)), 1);
        assert_eq!(duration_ms(Duration::from_millis(250)), 250);
        assert_eq!(duration_ms(Duration::MAX), u64::MAX);
    }
}
