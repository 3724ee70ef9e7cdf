//! Session leases: the table of holders and queues, and the task that
//! drives it.
//!
//! One task (the driver) owns the [`LeaseTable`]. Connections send it
//! commands through a [`Leases`] handle; it applies them to the table with
//! the current time, carries out the resulting effects, and feeds storage
//! outcomes back in. Answers to loads and pushed events go straight into
//! each connection's outbound queue, in the order the table produced them,
//! so a client always sees `Loaded` before any event about that lease.

#[cfg(test)]
mod model;
mod table;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::{FuturesOrdered, StreamExt};
use futures::{FutureExt, future::BoxFuture};
use profiled_protocol::{
    self as protocol, ErrorCode, Event, LoadPolicy, LossReason, Reply, Response, ServerFrame,
    SessionId,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::ProfileKey;
use crate::replies;
use crate::stats::{LoadOutcome, Stats};
use crate::storage::{AdminAction, AdminDone, Granted, Grantee, Sent, Storage, WriteError};
pub use table::{
    ConnId, Connected, Effect, HandOver, LeaseEvent, LeaseRules, LeaseTable, LoadError,
    LoadRequest, SessionSummary,
};

/// Room kept in a connection's outbound queue, beyond a grant's overflow,
/// when pushing a resumed lease's pending messages: for the answers and
/// events that follow.
const RESUME_SLACK: usize = 256;

/// A handle to the lease driver. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Leases {
    /// The driver task holds the receiving end.
    commands: mpsc::UnboundedSender<Command>,
}

/// Counts for status and shutdown reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeaseCounts {
    /// Leases held.
    pub held: usize,
    /// Loads waiting in queues.
    pub queued: usize,
    /// Sessions connected or holding leases.
    pub sessions: usize,
}

/// What [`Leases::release_all`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Released {
    /// Leases the daemon released.
    pub by_daemon: usize,
    /// Releases storage failed: the leases stay recorded, and the next
    /// start recovers them for their sessions to resume.
    pub failed: usize,
}

/// What a connection registers with the driver.
#[derive(Debug)]
pub struct ConnLink {
    /// The connection's outbound queue; its writer task holds the receiver.
    pub outbound: mpsc::Sender<ServerFrame>,
    /// Cancelled by the driver if the connection stops reading, so one
    /// stuck client cannot make the driver buffer without bound.
    pub kill: CancellationToken,
    /// Closed by the driver when a newer connection takes the session
    /// over, before that connection learns it has the session; the
    /// connection starts no request once it is closed.
    pub gate: Gate,
    /// Room the outbound queue keeps for a grant's pending messages that
    /// overflow its answer (`limits.max_pending_messages`); pushing a
    /// resumed lease's messages leaves it free.
    pub overflow_room: usize,
}

/// Whether a connection may still start requests. The connection starts
/// each request while holding the gate's lock and the driver closes it
/// under the same lock, so nothing the older of two connections of one
/// session starts after a takeover can reach storage behind the newer
/// one's writes.
#[derive(Clone, Debug, Default)]
pub struct Gate(Arc<std::sync::Mutex<bool>>);

impl Gate {
    /// Runs `start` unless the gate is closed, holding it open meanwhile.
    pub fn pass<T>(&self, start: impl FnOnce() -> T) -> Option<T> {
        let closed = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (!*closed).then(start)
    }

    /// Whether the gate is closed.
    pub fn is_closed(&self) -> bool {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn close(&self) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = true;
    }
}

/// A session is live under another user.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the session is in use by uid {owner}")]
pub struct SessionTaken {
    /// The uid that holds it.
    pub owner: u32,
}

/// The lease driver has stopped; the daemon is going away.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the daemon is shutting down")]
pub struct DriverGone;

#[derive(Debug)]
enum Command {
    Connect {
        conn: ConnId,
        session: SessionId,
        uid: u32,
        link: ConnLink,
        reply: oneshot::Sender<Result<Connected, SessionTaken>>,
    },
    Disconnect {
        conn: ConnId,
    },
    Load {
        conn: ConnId,
        request_id: u64,
        key: ProfileKey,
        policy: LoadPolicy,
        wait: Option<Duration>,
    },
    Release {
        key: ProfileKey,
        owner: SessionId,
        epoch: u64,
        data: Option<Vec<u8>>,
        changes: protocol::Changes,
        reply: oneshot::Sender<Result<u64, WriteError>>,
    },
    StopLoads {
        /// How long clients have before the daemon releases their leases.
        grace: Duration,
    },
    WhenIdle {
        reply: oneshot::Sender<Released>,
    },
    ReleaseAll {
        reply: oneshot::Sender<Released>,
    },
    Counts {
        reply: oneshot::Sender<LeaseCounts>,
    },
    SendMessage {
        key: ProfileKey,
        payload: Vec<u8>,
        max_pending: u64,
        reply: oneshot::Sender<Result<u64, WriteError>>,
    },
    Admin {
        key: ProfileKey,
        action: AdminAction,
        reply: oneshot::Sender<Result<AdminDone, WriteError>>,
    },
    AskRelease {
        key: ProfileKey,
        requester: SessionId,
        reply: oneshot::Sender<Option<(SessionId, u64)>>,
    },
    Sessions {
        reply: oneshot::Sender<Vec<SessionSummary>>,
    },
}

/// A storage write the driver started, finished.
enum Completion {
    Message {
        key: ProfileKey,
        result: Result<Sent, WriteError>,
        reply: oneshot::Sender<Result<u64, WriteError>>,
    },
    Admin {
        key: ProfileKey,
        reason: LossReason,
        result: Result<AdminDone, WriteError>,
        reply: oneshot::Sender<Result<AdminDone, WriteError>>,
    },
    Grant {
        key: ProfileKey,
        ticket: u64,
        result: Result<Granted, WriteError>,
    },
    /// A release the daemon made for a holder that left.
    Release {
        key: ProfileKey,
        result: Result<u64, WriteError>,
    },
    /// The messages pending for a lease that a reconnecting session
    /// resumed, read in the order of writes.
    Resumed {
        conn: ConnId,
        key: ProfileKey,
        session: SessionId,
        epoch: u64,
        result: Result<Vec<protocol::Message>, WriteError>,
    },
    /// A holder's own release.
    ClientRelease {
        key: ProfileKey,
        epoch: u64,
        result: Result<u64, WriteError>,
        reply: oneshot::Sender<Result<u64, WriteError>>,
    },
}

/// The driver task's state.
struct Driver {
    table: LeaseTable,
    storage: Storage,
    commands: mpsc::UnboundedReceiver<Command>,
    /// Every registered connection's link, by id.
    links: HashMap<ConnId, ConnLink>,
    /// Writes under way, in the order they were submitted. The committer
    /// applies writes in that order too, so each outcome is handled with
    /// every earlier write's outcome already known: a message's holder, or
    /// the lease an admin action ended, is judged against the right state.
    writes: FuturesOrdered<BoxFuture<'static, Completion>>,
    /// Loads waiting for an answer, by connection and request id.
    loads: HashMap<(ConnId, u64), PendingLoad>,
    /// The largest frame a connection sends (`limits.max_frame`): a grant's
    /// pending messages that do not fit in its answer follow it as events.
    max_frame: u32,
    /// The daemon's counters.
    stats: Arc<Stats>,
    /// The uid each live session was connected by.
    session_uids: HashMap<SessionId, u32>,
    /// Callers of `release_all` (and `when_idle`) waiting for the table to
    /// become idle, with the releases they started and the count of failed
    /// releases when they asked.
    idle_waiters: Vec<(oneshot::Sender<Released>, usize, usize)>,
    /// Releases the daemon made on its own that storage failed, ever.
    failed_releases: usize,
    /// Resumed leases whose pending messages are being read, with the
    /// reads under way. Messages stored for such a lease before the read
    /// are in its answer, so they are not also pushed on their own, which
    /// keeps the holder's messages in id order.
    resuming: HashMap<ProfileKey, Resuming>,
}

/// A resumed lease whose pending messages are being read.
struct Resuming {
    session: SessionId,
    epoch: u64,
    /// Reads under way: a session may reconnect again before the first
    /// read is answered.
    reads: usize,
}

/// A release to make, as a holder sends it.
struct ClientRelease {
    key: ProfileKey,
    owner: SessionId,
    epoch: u64,
    data: Option<Vec<u8>>,
    changes: protocol::Changes,
}

/// A load waiting for its answer.
struct PendingLoad {
    /// The profile, to address the messages that follow a grant.
    key: ProfileKey,
    /// When it arrived, for the handoff time.
    at: Instant,
    /// Its policy, for the load stats.
    policy: LoadPolicy,
    /// Whether the profile was held when it arrived, for the handoff stats.
    held: bool,
}

impl Leases {
    /// Starts the driver on the current runtime, holding the leases
    /// `recovered` from storage (each with its session, epoch, and the uid
    /// that connected the session, if recorded) until their sessions
    /// resume them or their grace runs out; only that uid, or root, may
    /// resume one. It runs until every handle is dropped and its last
    /// writes have finished. `max_frame` is the largest frame connections
    /// send.
    pub fn start(
        storage: Storage,
        rules: LeaseRules,
        recovered: Vec<(ProfileKey, SessionId, u64, Option<u32>)>,
        stats: Arc<Stats>,
        max_frame: u32,
    ) -> Self {
        let (commands, receiver) = mpsc::unbounded_channel();
        let mut table = LeaseTable::new(rules);
        let mut session_uids = HashMap::new();
        let recovered = recovered
            .into_iter()
            .map(|(key, session, epoch, uid)| {
                if let Some(uid) = uid {
                    session_uids.insert(session.clone(), uid);
                }
                (key, session, epoch)
            })
            .collect();
        table.recover(recovered, Instant::now());
        let driver = Driver {
            table,
            storage,
            commands: receiver,
            links: HashMap::new(),
            writes: FuturesOrdered::new(),
            loads: HashMap::new(),
            max_frame,
            stats,
            session_uids,
            idle_waiters: Vec::new(),
            failed_releases: 0,
            resuming: HashMap::new(),
        };
        tokio::spawn(driver.run());
        Self { commands }
    }

    /// Registers a connection's session and returns the leases it resumes.
    /// A connection already serving the session is closed.
    /// Refused with [`SessionTaken`] when the session is live (connected,
    /// or holding leases) under another user: only that user, or root, may
    /// resume or take it over.
    pub async fn connect(
        &self,
        conn: ConnId,
        session: SessionId,
        uid: u32,
        link: ConnLink,
    ) -> Result<Result<Connected, SessionTaken>, DriverGone> {
        let (reply, answer) = oneshot::channel();
        let command = Command::Connect {
            conn,
            session,
            uid,
            link,
            reply,
        };
        self.commands.send(command).map_err(|_| DriverGone)?;
        answer.await.map_err(|_| DriverGone)
    }

    /// Cancels a connection's waits and releases its leases.
    pub fn disconnect(&self, conn: ConnId) {
        let _ = self.commands.send(Command::Disconnect { conn });
    }

    /// Queues a load. The answer goes to the connection's outbound queue as
    /// a `Response` to `request_id`.
    pub fn load(
        &self,
        conn: ConnId,
        request_id: u64,
        key: ProfileKey,
        policy: LoadPolicy,
        wait: Option<Duration>,
    ) {
        let _ = self.commands.send(Command::Load {
            conn,
            request_id,
            key,
            policy,
            wait,
        });
    }

    /// Ends `owner`'s lease on `key` under `epoch`, writing `data` first if
    /// given, and resolves to the profile's version once that is durable.
    /// A load waiting for the profile has its grant written right behind
    /// the release, so the two share one sync.
    ///
    /// The command is sent before this returns, so the driver sees it in
    /// the order the connection read it.
    pub fn release(
        &self,
        key: ProfileKey,
        owner: SessionId,
        epoch: u64,
        data: Option<Vec<u8>>,
        changes: protocol::Changes,
    ) -> impl Future<Output = Result<u64, WriteError>> + Send + 'static {
        let (reply, answer) = oneshot::channel();
        // A failed send drops `reply`, and the answer is then `Closed`.
        let _ = self.commands.send(Command::Release {
            key,
            owner,
            epoch,
            data,
            changes,
            reply,
        });
        async move { answer.await.unwrap_or(Err(WriteError::Closed)) }
    }

    /// Ends every waiting load with `ShuttingDown`, refuses new ones, and
    /// tells every connection it has `grace` to save and release.
    pub fn stop_loads(&self, grace: Duration) {
        let _ = self.commands.send(Command::StopLoads { grace });
    }

    /// Resolves once no lease is held, granted or being released.
    pub async fn when_idle(&self) {
        let (reply, answer) = oneshot::channel();
        if self.commands.send(Command::WhenIdle { reply }).is_ok() {
            let _ = answer.await;
        }
    }

    /// Releases every held lease and waits until each release is durable
    /// or has failed.
    pub async fn release_all(&self) -> Released {
        let (reply, answer) = oneshot::channel();
        if self.commands.send(Command::ReleaseAll { reply }).is_err() {
            return Released::default();
        }
        answer.await.unwrap_or_default()
    }

    /// Current counts.
    pub async fn counts(&self) -> LeaseCounts {
        let (reply, answer) = oneshot::channel();
        if self.commands.send(Command::Counts { reply }).is_err() {
            return LeaseCounts::default();
        }
        answer.await.unwrap_or_default()
    }

    /// Stores a message for `key` and, once it is durable, pushes it to the
    /// profile's holder. Resolves to the message's id.
    pub async fn send_message(
        &self,
        key: ProfileKey,
        payload: Vec<u8>,
        max_pending: u64,
    ) -> Result<u64, WriteError> {
        let (reply, answer) = oneshot::channel();
        let command = Command::SendMessage {
            key,
            payload,
            max_pending,
            reply,
        };
        self.commands
            .send(command)
            .map_err(|_| WriteError::Closed)?;
        answer.await.unwrap_or(Err(WriteError::Closed))
    }

    /// Applies an administrative change and, once it is durable, tells the
    /// holder of any lease it ended and hands the profile to the next
    /// waiter.
    pub async fn admin(
        &self,
        key: ProfileKey,
        action: AdminAction,
    ) -> Result<AdminDone, WriteError> {
        let (reply, answer) = oneshot::channel();
        let command = Command::Admin { key, action, reply };
        self.commands
            .send(command)
            .map_err(|_| WriteError::Closed)?;
        answer.await.unwrap_or(Err(WriteError::Closed))
    }

    /// Asks the holder of `key` to release it. Returns the holder and its
    /// epoch, if the profile is held.
    pub async fn ask_release(
        &self,
        key: ProfileKey,
        requester: SessionId,
    ) -> Result<Option<(SessionId, u64)>, DriverGone> {
        let (reply, answer) = oneshot::channel();
        let command = Command::AskRelease {
            key,
            requester,
            reply,
        };
        self.commands.send(command).map_err(|_| DriverGone)?;
        answer.await.map_err(|_| DriverGone)
    }

    /// Every session and its leases.
    pub async fn sessions(&self) -> Result<Vec<SessionSummary>, DriverGone> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Sessions { reply })
            .map_err(|_| DriverGone)?;
        answer.await.map_err(|_| DriverGone)
    }
}

impl Driver {
    async fn run(mut self) {
        loop {
            let timer = self.table.next_timer();
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(command) => self.command(command),
                    None => break,
                },
                Some(done) = self.writes.next(), if !self.writes.is_empty() => {
                    self.completion(done);
                }
                () = sleep_until(timer), if timer.is_some() => {
                    self.table.fire_timers(Instant::now());
                }
            }
            self.apply_effects();
            self.wake_idle_waiters();
        }
        // Every handle is gone; finish the writes already started so their
        // outcomes are not lost mid-flight.
        while let Some(done) = self.writes.next().await {
            self.completion(done);
            self.apply_effects();
        }
    }

    fn command(&mut self, command: Command) {
        let now = Instant::now();
        match command {
            Command::Connect {
                conn,
                session,
                uid,
                link,
                reply,
            } => {
                // A session belongs to the user that connected it while it
                // lives; once the table forgets it, anyone may start it anew.
                if !self.table.knows(&session) {
                    self.session_uids.remove(&session);
                }
                // Forget the owners of sessions that are gone, now and then,
                // so the map stays the size of the table's.
                if self.session_uids.len() > 2 * self.table.session_count() + 64 {
                    let table = &self.table;
                    self.session_uids.retain(|s, _| table.knows(s));
                }
                let owner = *self.session_uids.entry(session.clone()).or_insert(uid);
                if owner != uid && uid != 0 {
                    let _ = reply.send(Err(SessionTaken { owner }));
                    return;
                }
                self.links.insert(conn, link);
                let connected = self.table.connect(conn, session.clone(), now);
                // An older connection of the session is closed (its gate
                // first) before this one learns it has the session.
                self.apply_effects();
                // Messages stored while the session was away were pushed to
                // nobody; they follow the welcome. The client skips those
                // it was handed before it went away.
                for (key, epoch) in &connected.leases {
                    self.read_pending(conn, key.clone(), session.clone(), *epoch);
                }
                let _ = reply.send(Ok(connected));
            }
            Command::Disconnect { conn } => {
                self.links.remove(&conn);
                self.loads.retain(|(c, _), _| *c != conn);
                self.table.disconnect(conn, now);
            }
            Command::Load {
                conn,
                request_id,
                key,
                policy,
                wait,
            } => {
                let held = self.table.holder(&key).is_some();
                let pending = PendingLoad {
                    key: key.clone(),
                    at: now,
                    policy,
                    held,
                };
                self.loads.insert((conn, request_id), pending);
                self.table.load(
                    LoadRequest {
                        conn,
                        request_id,
                        key,
                        policy,
                        deadline: wait.map(|wait| now + wait),
                    },
                    now,
                );
            }
            Command::Release {
                key,
                owner,
                epoch,
                data,
                changes,
                reply,
            } => {
                let release = ClientRelease {
                    key,
                    owner,
                    epoch,
                    data,
                    changes,
                };
                self.release(release, reply);
            }
            Command::StopLoads { grace } => {
                self.table.stop_loads();
                self.table.announce_shutdown(grace);
            }
            Command::WhenIdle { reply } => {
                self.idle_waiters.push((reply, 0, self.failed_releases));
            }
            Command::ReleaseAll { reply } => {
                let started = self.table.release_all();
                self.idle_waiters
                    .push((reply, started, self.failed_releases));
            }
            Command::Counts { reply } => {
                let _ = reply.send(LeaseCounts {
                    held: self.table.held(),
                    queued: self.table.queued(),
                    sessions: self.table.session_count(),
                });
            }
            Command::SendMessage {
                key,
                payload,
                max_pending,
                reply,
            } => {
                let write = self.storage.send_message(key.clone(), payload, max_pending);
                self.writes.push_back(
                    write
                        .map(move |result| Completion::Message { key, result, reply })
                        .boxed(),
                );
            }
            Command::Admin { key, action, reply } => {
                let reason = match action {
                    AdminAction::Wipe => LossReason::Wiped,
                    AdminAction::Revoke => LossReason::Revoked,
                    AdminAction::Overwrite(_)
                    | AdminAction::Rollback(_)
                    | AdminAction::Import { .. } => LossReason::Overwritten,
                };
                let write = self.storage.admin(key.clone(), action);
                self.writes.push_back(
                    write
                        .map(move |result| Completion::Admin {
                            key,
                            reason,
                            result,
                            reply,
                        })
                        .boxed(),
                );
            }
            Command::AskRelease {
                key,
                requester,
                reply,
            } => {
                let _ = reply.send(self.table.ask_release(&key, requester));
            }
            Command::Sessions { reply } => {
                let _ = reply.send(self.table.sessions());
            }
        }
    }

    fn completion(&mut self, done: Completion) {
        let now = Instant::now();
        match done {
            Completion::Grant {
                key,
                ticket,
                result,
            } => self.table.grant_done(&key, ticket, result, now),
            Completion::Release { key, result } => {
                match result {
                    Ok(_) => self.stats.daemon_released(),
                    Err(err) => {
                        // Only a failure of storage leaves the lease
                        // recorded; a lease already gone needs no release.
                        if matches!(err, WriteError::Storage(_) | WriteError::Closed) {
                            self.stats.storage_error();
                            self.failed_releases += 1;
                        }
                        tracing::warn!(profile = %key, error = %err, "releasing a lease failed");
                    }
                }
                self.table.release_done(&key, now);
            }
            Completion::ClientRelease {
                key,
                epoch,
                result,
                reply,
            } => {
                if result.is_ok() {
                    self.table.released(&key, epoch, now);
                }
                let _ = reply.send(result);
            }
            Completion::Resumed {
                conn,
                key,
                session,
                epoch,
                result,
            } => self.resumed(conn, key, &session, epoch, result),
            Completion::Message { key, result, reply } => {
                self.stats.message(result.is_ok());
                if let Ok(Sent {
                    message,
                    lease: Some(lease),
                }) = &result
                    && !self.resuming.get(&key).is_some_and(|resuming| {
                        resuming.session == lease.session && resuming.epoch == lease.epoch
                    })
                {
                    // Only the holder the message was stored under hears of
                    // it; a grant after it returns it with the data instead.
                    if let Some(conn) = self.table.holder_conn(&key, &lease.session, lease.epoch) {
                        let event = Event::Message {
                            store: key.store().to_owned(),
                            key: key.key().to_owned(),
                            epoch: lease.epoch,
                            message: message.clone(),
                        };
                        self.send(conn, ServerFrame::Event(event));
                    }
                }
                let _ = reply.send(result.map(|sent| sent.message.id));
            }
            Completion::Admin {
                key,
                reason,
                result,
                reply,
            } => {
                if let Ok(AdminDone {
                    ended: Some(lease), ..
                }) = &result
                {
                    self.table.revoked(&key, lease.epoch, reason, now);
                    if reason == LossReason::Revoked {
                        self.stats.daemon_released();
                    }
                }
                match (&result, reason) {
                    (Ok(_), LossReason::Wiped) => self.stats.wiped(),
                    (Ok(_), LossReason::Overwritten) => self.stats.overwritten(),
                    (Err(WriteError::Storage(_)), _) => self.stats.storage_error(),
                    _ => {}
                }
                let _ = reply.send(result);
            }
        }
    }

    fn apply_effects(&mut self) {
        // Applying one may change the table again (a lease given back
        // because its answer cannot be sent), so until none are left.
        loop {
            let effects = self.table.take_effects();
            if effects.is_empty() {
                return;
            }
            for effect in effects {
                self.apply(effect);
            }
        }
    }

    fn apply(&mut self, effect: Effect) {
        match effect {
            Effect::Grant { key, ticket, owner } => {
                let write = self.storage.grant(key.clone(), self.grantee(owner));
                self.track_grant(key, ticket, write);
            }
            Effect::Release { key, owner, epoch } => {
                let write = self.storage.release(
                    key.clone(),
                    owner,
                    epoch,
                    None,
                    protocol::Changes::default(),
                );
                self.writes.push_back(
                    write
                        .map(move |result| Completion::Release { key, result })
                        .boxed(),
                );
            }
            Effect::Answer {
                conn,
                request_id,
                result,
            } => self.answer_load(conn, request_id, result),
            Effect::Taken { reason } => match reason {
                LossReason::Stolen => self.stats.stolen(),
                LossReason::ForceLoadTimeout => self.stats.force_timeout(),
                _ => {}
            },
            Effect::Push { conn, event } => self.send(conn, ServerFrame::Event(wire_event(event))),
            Effect::Kick { conn } => {
                if let Some(link) = self.links.remove(&conn) {
                    link.gate.close();
                    tracing::info!(conn, "closing a connection whose session reconnected");
                    // The client must not reconnect and take the session
                    // back, so it is told why; the writer closes the
                    // connection after sending it.
                    let refusal = ServerFrame::Refused(protocol::Error::new(
                        ErrorCode::Superseded,
                        "the session connected again on another connection",
                    ));
                    if link.outbound.try_send(refusal).is_err() {
                        link.kill.cancel();
                    }
                }
            }
        }
    }

    /// Sends a load its answer. A grant's pending messages that do not fit
    /// in the answer follow it as events, addressed by the load's key. A
    /// profile that does not fit even without them (stored under larger
    /// limits) is refused `TooLarge`, and its lease given back: nobody can
    /// use a lease whose answer cannot be sent.
    fn answer_load(&mut self, conn: ConnId, request_id: u64, result: Result<Granted, LoadError>) {
        let load = self.loads.remove(&(conn, request_id));
        if let Some(load) = &load {
            self.count_load(load, &result);
        }
        let lease = result
            .as_ref()
            .ok()
            .map(|granted| (granted.lease.session.clone(), granted.lease.epoch));
        let mut response = Response {
            id: request_id,
            result: result.map(loaded).map_err(load_error),
        };
        // Without the load's key the rest could not be addressed, so the
        // answer keeps them all and, if that is too large, is refused with
        // `TooLarge` when it is written.
        let (Some(load), Some((owner, epoch)), Ok(Reply::Loaded(granted))) =
            (load, lease, &mut response.result)
        else {
            self.send(conn, ServerFrame::Response(response));
            return;
        };
        let mut overflow = fit_messages(request_id, granted, self.max_frame);
        // The frame's own variant index adds four bytes.
        if protocol::payload_len(&response).is_ok_and(|len| len + 4 > self.max_frame as usize) {
            response.result = Err(protocol::Error::new(
                ErrorCode::TooLarge,
                "the profile is larger than a frame (limits.max_frame); \
                 the lease was given back",
            ));
            overflow.clear();
            let release = ClientRelease {
                key: load.key.clone(),
                owner,
                epoch,
                data: None,
                changes: protocol::Changes::default(),
            };
            self.release(release, oneshot::channel().0);
        }
        self.send(conn, ServerFrame::Response(response));
        // After the answer, so the client knows the lease they are about.
        for message in overflow {
            let event = Event::Message {
                store: load.key.store().to_owned(),
                key: load.key.key().to_owned(),
                epoch,
                message,
            };
            self.send(conn, ServerFrame::Event(event));
        }
    }

    /// Queues a grant's write among the writes under way, so its outcome
    /// reaches the table as ticket `ticket`, in submission order.
    fn track_grant(
        &mut self,
        key: ProfileKey,
        ticket: u64,
        write: impl Future<Output = Result<Granted, WriteError>> + Send + 'static,
    ) {
        self.writes.push_back(
            write
                .map(move |result| Completion::Grant {
                    key,
                    ticket,
                    result,
                })
                .boxed(),
        );
    }

    /// Ends a holder's lease (its own release, or one the daemon makes for
    /// it). A load waiting for the profile has its grant written in one
    /// step with the release: one batch, one sync.
    fn release(&mut self, release: ClientRelease, reply: oneshot::Sender<Result<u64, WriteError>>) {
        let ClientRelease {
            key,
            owner,
            epoch,
            data,
            changes,
        } = release;
        let (write, grant) = match self.table.releasing(&key, &owner, epoch) {
            Some(HandOver { ticket, next }) => {
                let next = self.grantee(next);
                let (write, grant) =
                    self.storage
                        .hand_over(key.clone(), owner, epoch, data, changes, next);
                (write.boxed(), Some((ticket, grant)))
            }
            None => {
                let write = self
                    .storage
                    .release(key.clone(), owner, epoch, data, changes);
                (write.boxed(), None)
            }
        };
        let released = key.clone();
        self.writes.push_back(
            write
                .map(move |result| Completion::ClientRelease {
                    key: released,
                    epoch,
                    result,
                    reply,
                })
                .boxed(),
        );
        if let Some((ticket, grant)) = grant {
            self.track_grant(key, ticket, grant);
        }
    }

    /// A grant to `session`, with the uid that connected it.
    fn grantee(&self, session: SessionId) -> Grantee {
        let uid = self.session_uids.get(&session).copied();
        Grantee { session, uid }
    }

    /// Counts a load's outcome, and the handoff time of a ForceLoad that
    /// took a held profile.
    fn count_load(&self, load: &PendingLoad, result: &Result<Granted, LoadError>) {
        let outcome = match result {
            Ok(_) => {
                if load.held && load.policy == LoadPolicy::ForceLoad {
                    self.stats.handoff(load.at.elapsed());
                }
                LoadOutcome::Granted
            }
            Err(LoadError::AlreadyLoaded(_)) => LoadOutcome::AlreadyLoaded,
            Err(LoadError::Taken { .. }) => LoadOutcome::Taken,
            Err(LoadError::Superseded(_)) => LoadOutcome::Superseded,
            Err(LoadError::Timeout(_)) => LoadOutcome::Timeout,
            Err(LoadError::TooManyLeases { .. }) => LoadOutcome::TooManyLeases,
            Err(LoadError::ShuttingDown | LoadError::Storage(WriteError::Closed)) => {
                LoadOutcome::ShuttingDown
            }
            Err(LoadError::Storage(_)) => {
                self.stats.storage_error();
                LoadOutcome::StorageError
            }
        };
        self.stats.load(load.policy, outcome);
    }

    /// Queues a frame for a connection without waiting. A connection whose
    /// queue is full has stopped reading; it is closed rather than buffered
    /// for without bound.
    fn send(&mut self, conn: ConnId, frame: ServerFrame) {
        let Some(link) = self.links.get(&conn) else {
            return;
        };
        if let Err(mpsc::error::TrySendError::Full(_)) = link.outbound.try_send(frame) {
            tracing::warn!(conn, "closing a connection that stopped reading");
            link.kill.cancel();
        }
    }

    /// Reads the messages pending for a lease `session` resumed on `conn`,
    /// in the order of writes, to push them once read.
    fn read_pending(&mut self, conn: ConnId, key: ProfileKey, session: SessionId, epoch: u64) {
        let reads = self.resuming.get(&key).map_or(0, |resuming| resuming.reads);
        let resuming = Resuming {
            session: session.clone(),
            epoch,
            reads: reads + 1,
        };
        self.resuming.insert(key.clone(), resuming);
        let read = self.storage.pending_messages(key.clone());
        self.writes.push_back(
            read.map(move |result| Completion::Resumed {
                conn,
                key,
                session,
                epoch,
                result,
            })
            .boxed(),
        );
    }

    /// Pushes a resumed lease's pending messages to its holder, if it
    /// still holds the lease on `conn`: as many as the connection's queue
    /// has room for, oldest first. Those that do not fit, or all of them if
    /// the read failed, stay pending: the holder gets them at its next
    /// reconnect, and the next loader with the profile.
    fn resumed(
        &mut self,
        conn: ConnId,
        key: ProfileKey,
        session: &SessionId,
        epoch: u64,
        result: Result<Vec<protocol::Message>, WriteError>,
    ) {
        if let Some(resuming) = self.resuming.get_mut(&key) {
            resuming.reads = resuming.reads.saturating_sub(1);
            if resuming.reads == 0 {
                self.resuming.remove(&key);
            }
        }
        let mut messages = match result {
            Ok(messages) => messages,
            Err(err) => {
                tracing::warn!(profile = %key, error = %err, "reading a resumed lease's messages failed; they stay pending");
                return;
            }
        };
        if messages.is_empty() || self.table.holder_conn(&key, session, epoch) != Some(conn) {
            return;
        }
        let room = self.links.get(&conn).map_or(0, |link| {
            link.outbound
                .capacity()
                .saturating_sub(link.overflow_room.saturating_add(RESUME_SLACK))
        });
        if room < messages.len() {
            tracing::warn!(
                profile = %key,
                pending = messages.len(),
                pushed = room,
                "no room to push all of a resumed lease's messages; the rest stay pending"
            );
            messages.truncate(room);
        }
        for message in messages {
            let event = Event::Message {
                store: key.store().to_owned(),
                key: key.key().to_owned(),
                epoch,
                message,
            };
            self.send(conn, ServerFrame::Event(event));
        }
    }

    fn wake_idle_waiters(&mut self) {
        if self.idle_waiters.is_empty() || !self.table.is_idle() || !self.writes.is_empty() {
            return;
        }
        for (reply, started, failed_before) in self.idle_waiters.drain(..) {
            let failed = self.failed_releases - failed_before;
            let _ = reply.send(Released {
                by_daemon: started.saturating_sub(failed),
                failed,
            });
        }
    }
}

/// Sleeps until `at`, or forever if there is no deadline.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The wire form of a granted lease.
fn loaded(granted: Granted) -> Reply {
    let Granted {
        lease,
        meta,
        data,
        messages,
    } = granted;
    Reply::Loaded(protocol::Loaded {
        epoch: lease.epoch,
        data,
        meta: replies::profile_meta(meta, Some(lease)),
        messages,
    })
}

/// Keeps in a grant's answer (request `id`) as many of its pending
/// messages, oldest first, as fit in a frame of `max_frame` bytes, and
/// returns the rest, in order, to be sent after it as events.
///
/// The profile's data and metadata always fit with room to spare
/// (`Config::validate` bounds them below the frame), and so does each
/// message on its own; their total does not, since up to
/// `limits.max_pending_messages` may be pending.
fn fit_messages(id: u64, granted: &mut protocol::Loaded, max_frame: u32) -> Vec<protocol::Message> {
    if granted.messages.is_empty() {
        return Vec::new();
    }
    let mut messages = std::mem::take(&mut granted.messages);
    // The answer around the `Loaded`: the frame's variant, the request id,
    // the result's and the reply's variants (at most 16 bytes as varints),
    // and the message list's length grown from one byte to at most nine.
    const AROUND: usize = 16 + 8;
    let (Ok(bare), Ok(id_len)) = (protocol::payload_len(&*granted), protocol::payload_len(&id))
    else {
        granted.messages = messages;
        return Vec::new();
    };
    let mut room = (max_frame as usize).saturating_sub(bare + id_len + AROUND);
    let fit = messages
        .iter()
        .take_while(|message| match protocol::payload_len(message) {
            Ok(len) if len <= room => {
                room -= len;
                true
            }
            _ => false,
        })
        .count();
    let overflow = messages.split_off(fit);
    granted.messages = messages;
    overflow
}

/// The wire form of a failed load.
fn load_error(err: LoadError) -> protocol::Error {
    let message = err.to_string();
    let code = match err {
        LoadError::AlreadyLoaded(_) => ErrorCode::AlreadyLoaded,
        LoadError::Taken { owner, .. } => ErrorCode::Taken { owner },
        LoadError::Superseded(_) => ErrorCode::Superseded,
        LoadError::Timeout(_) => ErrorCode::Timeout,
        LoadError::TooManyLeases { .. } => ErrorCode::TooManyLeases,
        LoadError::ShuttingDown => ErrorCode::ShuttingDown,
        LoadError::Storage(WriteError::Closed) => ErrorCode::ShuttingDown,
        LoadError::Storage(WriteError::NotFound) => ErrorCode::NotFound,
        LoadError::Storage(WriteError::TooManyMessages(limit)) => {
            ErrorCode::TooManyMessages { limit }
        }
        LoadError::Storage(_) => ErrorCode::Storage,
    };
    protocol::Error::new(code, message)
}

/// The wire form of a lease event.
fn wire_event(event: LeaseEvent) -> Event {
    match event {
        LeaseEvent::ReleaseRequested {
            key,
            epoch,
            requester,
        } => Event::ReleaseRequested {
            store: key.store().to_owned(),
            key: key.key().to_owned(),
            epoch,
            requester,
        },
        LeaseEvent::LeaseLost {
            key,
            epoch,
            reason,
            new_owner,
        } => Event::LeaseLost {
            store: key.store().to_owned(),
            key: key.key().to_owned(),
            epoch,
            reason,
            new_owner,
        },
        LeaseEvent::ShuttingDown { deadline_ms } => Event::ShuttingDown { deadline_ms },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HistoryConfig, StorageConfig};

    /// Grants `count` leases to one session in `storage`, as a previous run
    /// of the daemon would have left them for recovery.
    async fn leave_leases(
        storage: &Storage,
        prefix: &str,
        count: usize,
    ) -> Vec<(ProfileKey, SessionId, u64, Option<u32>)> {
        let session = SessionId {
            place_id: 1,
            job_id: "gone".to_owned(),
        };
        let mut leases = Vec::new();
        for i in 0..count {
            let key = ProfileKey::new("s", format!("{prefix}{i}"));
            let to = Grantee {
                session: session.clone(),
                uid: None,
            };
            let granted = storage.grant(key.clone(), to).await.expect("grant");
            leases.push((key, session.clone(), granted.lease.epoch, None));
        }
        leases
    }

    fn start(
        storage: &Storage,
        recovered: Vec<(ProfileKey, SessionId, u64, Option<u32>)>,
    ) -> Leases {
        let rules = LeaseRules {
            force_load_timeout: Duration::from_secs(5),
            resume_grace: Duration::from_secs(60),
            take_disconnected_at_once: false,
            max_leases_per_session: usize::MAX,
        };
        let stats = Arc::new(Stats::new());
        Leases::start(
            storage.clone(),
            rules,
            recovered,
            stats,
            protocol::DEFAULT_MAX_FRAME,
        )
    }

    /// The shutdown report counts what storage released, and the releases
    /// it failed apart: a stop that kept leases must not pass for a clean
    /// one.
    #[tokio::test]
    async fn releases_that_storage_fails_are_counted_as_failed_not_made() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = StorageConfig {
            path: dir.path().to_owned(),
            ..StorageConfig::default()
        };
        let (storage, _) = Storage::open(&config, &HistoryConfig::default()).expect("open");

        let recovered = leave_leases(&storage, "made", 2).await;
        let released = start(&storage, recovered).release_all().await;
        assert_eq!(
            released,
            Released {
                by_daemon: 2,
                failed: 0
            }
        );

        let recovered = leave_leases(&storage, "kept", 3).await;
        storage.close().await.expect("close");
        let released = start(&storage, recovered).release_all().await;
        assert_eq!(
            released,
            Released {
                by_daemon: 0,
                failed: 3
            }
        );
    }
}
