//! The client handle and the requests made through it.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use profiled_protocol::{
    Changes, ClientFrame, DEFAULT_MAX_FRAME, LoadPolicy, Reply, Request, RequestBody, Role,
    SessionId, Welcome,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::connection::{Effect, Link, Pending, Shared};
use crate::reconnect::{self, Dialer, Running, encode};
use crate::{ClientError, Profile};

/// How long [`Client::close`] waits for typed profiles' last saves.
const CLOSE_PATIENCE: Duration = Duration::from_secs(10);

/// A session's link to the daemon, shared by cloning.
///
/// Every clone, and every [`Profile`] loaded through one, uses the same
/// connection; calls from many tasks run concurrently over it. The link
/// closes when the last clone and profile are dropped, or at once on
/// [`Client::close`].
///
/// # Reconnecting
///
/// When the connection drops for any other reason (the daemon restarted,
/// took a signal, or closed the socket), the client reconnects to the same
/// socket with the same [`SessionId`] for up to
/// [`ConnectOptions::reconnect_for`]. The daemon keeps a dropped session's
/// leases for its resume grace and lists them in the new [`Welcome`]:
///
/// - a [`Profile`] whose lease is listed with the same epoch carries on as
///   if nothing happened;
/// - a `Profile` whose lease is not listed receives
///   [`ProfileEvent::LeaseExpired`](crate::ProfileEvent::LeaseExpired) and
///   its event stream ends; its saves fail with
///   [`ErrorCode::LeaseLost`](crate::ErrorCode::LeaseLost).
///
/// Requests made while the client is reconnecting wait for the new
/// connection. Requests already sent when the connection dropped fail with
/// [`ClientError::Disconnected`] and are not re-sent: whether the daemon
/// applied them is unknown, and deciding whether to retry is the caller's.
/// A save is safe to retry while its lease is held, since it carries the
/// epoch and the full data. A load whose answer was lost may have been
/// granted: the lease then shows up in [`Client::welcome`]'s `leases` with
/// no profile, loading it again fails with
/// [`ErrorCode::AlreadyLoaded`](crate::ErrorCode::AlreadyLoaded), and
/// [`Client::release`] with the listed epoch ends it. If reconnecting does not succeed in time, or the daemon
/// refuses the new handshake, the link ends as after [`Client::close`],
/// except that requests fail with the refusal.
///
/// A connection the daemon ends with a
/// [`ErrorCode::Superseded`](crate::ErrorCode::Superseded) refusal is not
/// reconnected either: another connection took the session over, and
/// reconnecting would only take it back. Requests then fail with that
/// refusal.
///
/// ```no_run
/// use profiled_client::{Client, SessionId};
///
/// # async fn run() -> Result<(), profiled_client::ClientError> {
/// let session = SessionId { place_id: 1818, job_id: "server-7".into() };
/// let client = Client::connect("/run/profiled/profiled.sock", session).await?;
/// // Each task gets its own clone; they all share the one connection.
/// let background = client.clone();
/// tokio::spawn(async move { background.ping().await });
/// client.ping().await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct Client {
    /// Dropped with the last clone, which stops the background tasks.
    inner: Arc<Inner>,
}

/// How [`Client::connect_with`] connects.
///
/// The [`Default`] suits a game server: the game role, the protocol's
/// default frame limit and 30 s of reconnecting. Set only the fields that
/// differ and take the rest from the default, so the code keeps compiling
/// and keeps sensible values when fields are added.
///
/// ```
/// use std::time::Duration;
/// use profiled_client::{ConnectOptions, Role};
///
/// // An operator tool asks for admin rights, and gives up soon on a daemon that is gone.
/// let options = ConnectOptions {
///     role: Role::Admin,
///     reconnect_for: Duration::from_secs(5),
///     ..ConnectOptions::default()
/// };
/// assert_eq!(options.role, Role::Admin);
/// ```
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// The rights asked for. The daemon grants [`Role::Admin`] only to
    /// peers its configuration allows.
    pub role: Role,
    /// The largest frame this client reads or writes. Writes are further
    /// held to the daemon's announced [`Welcome::max_frame`], so an
    /// oversized save fails locally instead of closing the connection.
    pub max_frame: u32,
    /// How long to keep trying to reconnect after the connection drops,
    /// counted from the drop; requests made meanwhile wait at most this
    /// long. Attempts back off from 10 ms, doubling up to 1 s, with jitter.
    /// It should exceed the daemon's `session.resume_grace` only if a late
    /// reconnect is still useful without the leases. [`Duration::ZERO`]
    /// disables reconnecting: a drop then ends the link at once. Default
    /// 30 s.
    pub reconnect_for: Duration,
}

/// How [`Client::load_with`] and the typed
/// [`ProfileStore::load_with`](crate::typed::ProfileStore::load_with) load.
///
/// The default is [`LoadPolicy::ForceLoad`] with no deadline, which is what
/// [`Client::load`] does. A deadline keeps a player's join from stalling
/// behind a holder that is slow to let go.
///
/// ```
/// use std::time::Duration;
/// use profiled_client::{LoadOptions, LoadPolicy};
///
/// // Wait in line for the lease, but no longer than 5 seconds.
/// let options = LoadOptions { policy: LoadPolicy::Repeat, deadline: Some(Duration::from_secs(5)) };
/// assert_eq!(LoadOptions::default().policy, LoadPolicy::ForceLoad);
/// # let _ = options;
/// ```
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
    /// The session every connection is opened for.
    session: SessionId,
    /// Request ids, unique across all of the client's connections.
    next_id: AtomicU64,
    /// The routing tables and the link's state, shared with the reader
    /// tasks and the supervisor.
    shared: Arc<Shared>,
    /// Cancelled to stop the supervisor and the live connection's tasks,
    /// which shuts the socket down and ends reconnecting.
    closing: CancellationToken,
    /// The supervisor task, taken by [`Client::close`] to wait for it.
    supervisor: Mutex<Option<JoinHandle<()>>>,
    /// The typed layer's keeper tasks, one per held typed profile, so
    /// [`Client::close`] can wait for their last saves.
    keepers: TaskTracker,
    /// Cancelled by [`Client::close`]: every keeper makes its profile's
    /// last save and releases it.
    keepers_stop: CancellationToken,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            role: Role::Game,
            max_frame: DEFAULT_MAX_FRAME,
            reconnect_for: Duration::from_secs(30),
        }
    }
}

impl Client {
    /// Connects to the daemon's socket at `path` as a game server and
    /// completes the handshake.
    ///
    /// The daemon owns leases by session, so `session` must be unique to this
    /// server process; see [`Client::connect_with`] for other options.
    ///
    /// ```no_run
    /// use profiled_client::{Client, SessionId};
    ///
    /// # async fn run() -> Result<(), profiled_client::ClientError> {
    /// let session = SessionId { place_id: 1818, job_id: "server-7".into() };
    /// let client = Client::connect("/run/profiled/profiled.sock", session).await?;
    /// println!("connected to profiled {}", client.welcome().daemon_version);
    /// # Ok(()) }
    /// ```
    pub async fn connect(
        path: impl AsRef<Path>,
        session: SessionId,
    ) -> Result<Client, ClientError> {
        Self::connect_with(path, session, ConnectOptions::default()).await
    }

    /// Connects to the daemon's socket at `path` and completes the
    /// handshake, with explicit options.
    ///
    /// This first connection is made once: its failure is returned, not
    /// retried. Reconnecting applies to connections that drop later.
    ///
    /// ```no_run
    /// use profiled_client::{Client, ConnectOptions, Role, SessionId};
    ///
    /// # async fn run() -> Result<(), profiled_client::ClientError> {
    /// let session = SessionId { place_id: 0, job_id: "ops-console".into() };
    /// let options = ConnectOptions { role: Role::Admin, ..ConnectOptions::default() };
    /// let admin = Client::connect_with("/run/profiled/profiled.sock", session, options).await?;
    /// # let _ = admin;
    /// # Ok(()) }
    /// ```
    pub async fn connect_with(
        path: impl AsRef<Path>,
        session: SessionId,
        options: ConnectOptions,
    ) -> Result<Client, ClientError> {
        let dialer = Dialer {
            path: path.as_ref().to_owned(),
            session: session.clone(),
            options,
        };
        let handshake = dialer.handshake().await?;
        let shared = Arc::new(Shared::new(handshake.welcome.clone()));
        let closing = CancellationToken::new();
        let running = Running::start(handshake, 1, dialer.options.max_frame, &shared, &closing);
        let supervisor = tokio::spawn(reconnect::supervise(
            dialer,
            Arc::clone(&shared),
            closing.clone(),
            running,
        ));
        Ok(Client {
            inner: Arc::new(Inner {
                session,
                next_id: AtomicU64::new(1),
                shared,
                closing,
                supervisor: Mutex::new(Some(supervisor)),
                keepers: TaskTracker::new(),
                keepers_stop: CancellationToken::new(),
            }),
        })
    }

    /// The session this client's connections are opened for, which owns
    /// every lease the client holds. It is useful in logs, to match them with
    /// the daemon's.
    ///
    /// ```no_run
    /// # fn run(client: profiled_client::Client) {
    /// println!("serving as {}", client.session());
    /// # }
    /// ```
    pub fn session(&self) -> &SessionId {
        &self.inner.session
    }

    /// The daemon's latest handshake answer: the first connection's, or the
    /// last reconnect's. Its `leases` are what the daemon said this session
    /// held at that handshake.
    ///
    /// ```no_run
    /// # fn run(client: profiled_client::Client) {
    /// // Leases this session already held when it connected, for example from
    /// // a load whose answer was lost.
    /// for lease in client.welcome().leases {
    ///     println!("holding {}/{} at epoch {}", lease.store, lease.key, lease.epoch);
    /// }
    /// # }
    /// ```
    pub fn welcome(&self) -> Welcome {
        self.inner.shared.welcome()
    }

    /// The daemon's shutdown deadline, once it has announced one.
    ///
    /// The value is `None` while the daemon runs normally. On
    /// [`Event::ShuttingDown`](crate::protocol::Event::ShuttingDown) it
    /// becomes the instant the daemon releases every remaining lease
    /// itself; until then it still takes saves and releases but no loads,
    /// so the game should save and release what it holds. Each held
    /// [`Profile`] also receives
    /// [`ProfileEvent::ShuttingDown`](crate::ProfileEvent::ShuttingDown).
    /// After a reconnect to a daemon that runs normally it is `None` again.
    ///
    /// An [`Instant`] rather than the daemon's relative `deadline_ms`, so
    /// the value stays right however late the receiver looks at it.
    ///
    /// ```no_run
    /// # async fn run(client: profiled_client::Client) {
    /// let mut notice = client.shutdown_notice();
    /// // Wakes once the daemon announces it is stopping; fails if the client closes first.
    /// if let Ok(deadline) = notice.wait_for(Option::is_some).await {
    ///     println!("save and release every profile by {:?}", *deadline);
    /// }
    /// # }
    /// ```
    pub fn shutdown_notice(&self) -> watch::Receiver<Option<Instant>> {
        self.inner.shared.shutdown()
    }

    /// Acquires the lease on `store`/`key` and reads the profile.
    ///
    /// When another session holds the profile, `policy` says whether to take
    /// it, wait for it or give up; see [`LoadPolicy`].
    ///
    /// ```no_run
    /// use profiled_client::{ErrorCode, LoadPolicy};
    ///
    /// # async fn run(client: profiled_client::Client) -> Result<(), profiled_client::ClientError> {
    /// match client.load("PlayerData", "Player_2261", LoadPolicy::Cancel).await {
    ///     Ok(profile) => println!("loaded at epoch {}", profile.epoch()),
    ///     Err(err) if matches!(err.code(), Some(ErrorCode::Taken { .. })) => println!("in use elsewhere"),
    ///     Err(err) => return Err(err),
    /// }
    /// # Ok(()) }
    /// ```
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
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use profiled_client::{ErrorCode, LoadOptions, LoadPolicy};
    ///
    /// # async fn run(client: profiled_client::Client) -> Result<(), profiled_client::ClientError> {
    /// let options = LoadOptions { policy: LoadPolicy::Repeat, deadline: Some(Duration::from_secs(5)) };
    /// match client.load_with("PlayerData", "Player_2261", options).await {
    ///     Ok(profile) => println!("loaded at epoch {}", profile.epoch()),
    ///     Err(err) if err.code() == Some(&ErrorCode::Timeout) => println!("still held; try again later"),
    ///     Err(err) => return Err(err),
    /// }
    /// # Ok(()) }
    /// ```
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
                messages: loaded.messages,
                events,
            }),
            other => Err(unexpected("loaded", &other)),
        }
    }

    /// Writes a held profile's data under the lease `epoch`, and returns
    /// the profile's version after the write once it is durable.
    ///
    /// Most code saves through [`Profile::save`]; this form is for code that
    /// kept only the lease's store, key and epoch, such as a lease listed in
    /// [`Client::welcome`].
    ///
    /// ```no_run
    /// # async fn run(client: profiled_client::Client) -> Result<(), profiled_client::ClientError> {
    /// # let epoch = 1;
    /// let version = client.save("PlayerData", "Player_2261", epoch, b"coins=10".to_vec()).await?;
    /// println!("saved as version {version}");
    /// # Ok(()) }
    /// ```
    pub async fn save(
        &self,
        store: &str,
        key: &str,
        epoch: u64,
        data: Vec<u8>,
    ) -> Result<u64, ClientError> {
        self.save_with(store, key, epoch, data, Changes::default())
            .await
    }

    /// Like [`Client::save`], also applying `changes` (meta tags, user ids,
    /// consumed messages) in the same atomic step.
    ///
    /// ```no_run
    /// use profiled_client::Changes;
    ///
    /// # async fn run(client: profiled_client::Client) -> Result<(), profiled_client::ClientError> {
    /// # let epoch = 1;
    /// // Record whose data this is, so a GDPR erasure request can find it.
    /// let changes = Changes { user_ids: Some(vec![2261]), ..Changes::default() };
    /// client.save_with("PlayerData", "Player_2261", epoch, b"coins=10".to_vec(), changes).await?;
    /// # Ok(()) }
    /// ```
    pub async fn save_with(
        &self,
        store: &str,
        key: &str,
        epoch: u64,
        data: Vec<u8>,
        changes: Changes,
    ) -> Result<u64, ClientError> {
        let body = RequestBody::Save {
            store: store.to_owned(),
            key: key.to_owned(),
            epoch,
            data,
            changes,
        };
        match self.request(body, Effect::None).await? {
            Reply::Saved { version } => Ok(version),
            other => Err(unexpected("saved", &other)),
        }
    }

    /// Ends the lease `epoch` on a profile, with a final write of `data` in
    /// the same atomic step if given, and returns the profile's version
    /// after it. The lease's [`Profile`] receives no more events.
    ///
    /// ```no_run
    /// # async fn run(client: profiled_client::Client) -> Result<(), profiled_client::ClientError> {
    /// // Right after connecting, end the leases an earlier run of this session
    /// // left behind, keeping their last saved data.
    /// for lease in client.welcome().leases {
    ///     client.release(&lease.store, &lease.key, lease.epoch, None).await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn release(
        &self,
        store: &str,
        key: &str,
        epoch: u64,
        data: Option<Vec<u8>>,
    ) -> Result<u64, ClientError> {
        self.release_with(store, key, epoch, data, Changes::default())
            .await
    }

    /// Like [`Client::release`], also applying `changes` (meta tags, user
    /// ids, consumed messages) in the same atomic step.
    ///
    /// ```no_run
    /// use profiled_client::Changes;
    ///
    /// # async fn run(client: profiled_client::Client) -> Result<(), profiled_client::ClientError> {
    /// # let epoch = 1;
    /// // The final data includes message 7's effect, so consume it in the same step.
    /// let changes = Changes { consumed_messages: vec![7], ..Changes::default() };
    /// client.release_with("PlayerData", "Player_2261", epoch, Some(b"coins=17".to_vec()), changes).await?;
    /// # Ok(()) }
    /// ```
    pub async fn release_with(
        &self,
        store: &str,
        key: &str,
        epoch: u64,
        data: Option<Vec<u8>>,
        changes: Changes,
    ) -> Result<u64, ClientError> {
        let body = RequestBody::Release {
            store: store.to_owned(),
            key: key.to_owned(),
            epoch,
            data,
            changes,
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

    /// Makes a round trip to the daemon, to check that it answers, for
    /// example in a health check. While the client is reconnecting it waits
    /// for the new connection like any request.
    ///
    /// ```no_run
    /// # async fn run(client: profiled_client::Client) {
    /// let healthy = client.ping().await.is_ok();
    /// # let _ = healthy;
    /// # }
    /// ```
    pub async fn ping(&self) -> Result<(), ClientError> {
        match self.request(RequestBody::Ping, Effect::None).await? {
            Reply::Pong => Ok(()),
            other => Err(unexpected("pong", &other)),
        }
    }

    /// Closes the link for good; the daemon then releases this session's
    /// leases once its resume grace has passed.
    ///
    /// Typed profiles ([`crate::typed`]) go first: every one still held, or
    /// dropped and not yet released, makes its last save and releases
    /// ([`LastSaveReason::ClientClosed`](crate::typed::LastSaveReason::ClientClosed)),
    /// for at most ten seconds in all. Raw [`Profile`]s are not released.
    ///
    /// Then it takes effect for every clone and [`Profile`] at once: requests
    /// in flight fail with [`ClientError::Disconnected`], later ones fail
    /// the same way without waiting, event streams end, and no reconnect is
    /// attempted, even if one was under way. It returns once the socket is
    /// shut down.
    ///
    /// ```no_run
    /// use profiled_client::LoadPolicy;
    ///
    /// # async fn run(client: profiled_client::Client) -> Result<(), profiled_client::ClientError> {
    /// # let profile = client.load("PlayerData", "Player_2261", LoadPolicy::ForceLoad).await?;
    /// // Closing does not release leases, so release what is held first.
    /// profile.release(None).await?;
    /// client.close().await;
    /// # Ok(()) }
    /// ```
    pub async fn close(self) {
        // Typed profiles, held or just dropped, make their last saves and
        // release before the connection goes, for at most CLOSE_PATIENCE.
        self.inner.keepers_stop.cancel();
        self.inner.keepers.close();
        if tokio::time::timeout(CLOSE_PATIENCE, self.inner.keepers.wait())
            .await
            .is_err()
        {
            tracing::warn!("closing before every typed profile's last save was answered");
        }
        self.inner.closing.cancel();
        let supervisor = self
            .inner
            .supervisor
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(supervisor) = supervisor {
            // The supervisor does not panic, and one cancelled by a runtime
            // shutting down has nothing left to wait for.
            let _ = supervisor.await;
        }
    }

    /// Runs a typed profile's keeper task, which [`Client::close`] waits
    /// for.
    pub(crate) fn spawn_keeper<F>(&self, keeper: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.inner.keepers.spawn(keeper);
    }

    /// Cancelled once [`Client::close`] is called: keepers then make their
    /// last saves.
    pub(crate) fn keepers_stop(&self) -> CancellationToken {
        self.inner.keepers_stop.clone()
    }

    /// The routing tables, for [`Profile`]'s drop.
    pub(crate) fn shared(&self) -> &Shared {
        &self.inner.shared
    }

    /// Sends one request and waits for its reply.
    ///
    /// While the link is down this waits for the reconnect. A request whose
    /// connection was gone before its frame was sent is registered again on
    /// the next one; once sent, a drop fails it with
    /// [`ClientError::Disconnected`]. The frame is encoded here, not by the
    /// writer task, so a frame over the limit fails only its own call and
    /// the connection stays usable.
    pub(crate) async fn request(
        &self,
        body: RequestBody,
        effect: Effect,
    ) -> Result<Reply, ClientError> {
        let inner = &*self.inner;
        let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
        let frame = ClientFrame::Request(Request { id, body });
        let (reply, response) = oneshot::channel();
        let mut pending = Pending { reply, effect };
        let mut link = inner.shared.link();
        loop {
            let state = link
                .wait_for(|link| !matches!(link, Link::Down))
                .await
                .map_err(|_| ClientError::Disconnected)?
                .clone();
            let conn = match state {
                Link::Up(conn) => conn,
                Link::Ended(why) => return Err(why.error()),
                Link::Down => continue,
            };
            // Each daemon announces its own limit, so the frame is encoded
            // for the connection it goes to.
            let bytes = encode(&frame, conn.max_frame)?;
            if let Err(back) = inner.shared.register(conn.generation, id, pending) {
                // That connection ended after it was looked up, and the link
                // has already moved on from it.
                pending = back;
                continue;
            }
            // If this call is dropped while waiting for room in the queue,
            // the request was never sent and its entry must go. Once it is
            // queued the entry stays: its response, or the connection's end,
            // will remove it.
            let unsent = Unsent {
                shared: &inner.shared,
                id,
            };
            let sent = conn.outbox.send(&bytes).await;
            unsent.queued();
            if sent.is_err() {
                // The writer stopped, so the frame was never sent and may go
                // to the next connection, once the reader has stopped too
                // and marked this one gone. Waiting for that, rather than
                // retrying at once, leaves the reader the time to do it.
                let Some(back) = inner.shared.take(id) else {
                    return Err(ClientError::Disconnected);
                };
                pending = back;
                link.wait_for(
                    |link| !matches!(link, Link::Up(live) if live.generation == conn.generation),
                )
                .await
                .map_err(|_| ClientError::Disconnected)?;
                continue;
            }
            return match response.await {
                Ok(result) => result,
                Err(_) => Err(ClientError::Disconnected),
            };
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
    /// The frame is queued, or the caller deals with the entry itself.
    fn queued(self) {
        std::mem::forget(self);
    }
}

impl Drop for Unsent<'_> {
    fn drop(&mut self) {
        self.shared.take(self.id);
    }
}

impl std::fmt::Debug for Inner {
    /// Shows who the client is, not its routing tables.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("session", &self.session)
            .field("connection_id", &self.shared.welcome().connection_id)
            .field("closed", &self.closing.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl Drop for Inner {
    /// The last clone is gone: stop the supervisor and the connection's
    /// tasks, which closes the socket and ends reconnecting.
    fn drop(&mut self) {
        self.closing.cancel();
    }
}

/// Converts a deadline to whole milliseconds, rounding up so that a short
/// non-zero deadline never becomes an immediate timeout.
fn duration_ms(deadline: Duration) -> u64 {
    u64::try_from(deadline.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

/// The error for a success of the wrong kind.
pub(crate) fn unexpected(expected: &str, got: &Reply) -> ClientError {
    let got = match got {
        Reply::Loaded(_) => "loaded",
        Reply::Saved { .. } => "saved",
        Reply::Released { .. } => "released",
        Reply::Pong => "pong",
        Reply::MessageSent { .. } => "message sent",
        Reply::Viewed(_) => "viewed",
        Reply::Versions(_) => "versions",
        Reply::Overwritten { .. } => "overwritten",
        Reply::Wiped => "wiped",
        Reply::Stats(_) => "stats",
        Reply::Status(_) => "status",
        Reply::Sessions(_) => "sessions",
        Reply::Revoked { .. } => "revoked",
        Reply::ReleaseAsked { .. } => "release asked",
        Reply::BackedUp { .. } => "backed up",
        Reply::Exported(_) => "exported",
    };
    ClientError::Protocol(format!("expected a {expected} reply, got {got}"))
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
