//! The background tasks that own one socket, and the routing tables they
//! share with the callers across reconnects.
//!
//! Callers write encoded frames through the connection's
//! [`Outbox`], whose writer task drains what the socket does not take at
//! once. One reader task decodes frames from the read half and routes each
//! [`Response`] to the call waiting for its id and each [`Event`] to the
//! [`Profile`](crate::Profile) holding that lease. Both tasks stop when the
//! connection's [`CancellationToken`] is cancelled, and each cancels it when
//! it stops on its own, so one side failing takes the other down with it.
//!
//! A connection is one generation of the client's link to the daemon. When
//! it ends, the requests waiting on it fail, but the event routes stay: the
//! supervisor in [`crate::reconnect`] opens the next generation and
//! [`Shared::resume`] keeps each route whose lease the daemon still lists.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures::StreamExt;
use profiled_protocol::{
    ClientFrame, Error, ErrorCode, Event, FrameCodec, FromDaemon, HeldLease, Reply, Request,
    RequestBody, Response, ServerFrame, Welcome,
};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::codec::{BytesCodec, FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use crate::outbox::Outbox;
use crate::{ClientError, ProfileEvent};

/// The read half of a connection, decoding what the daemon sends.
pub(crate) type FrameReader = FramedRead<OwnedReadHalf, FrameCodec<FromDaemon, ClientFrame>>;

/// The write half of a connection during the handshake; afterwards it goes
/// to the connection's [`Outbox`].
pub(crate) type FrameWriter = FramedWrite<OwnedWriteHalf, BytesCodec>;

/// What the reader tasks, the reconnect supervisor and the callers share:
/// the requests waiting for a response, the leases waiting for events, and
/// the state of the link.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Held only for map operations, never across an await.
    state: Mutex<State>,
    /// The link's state. [`Shared`] changes it under the `state` lock, so a
    /// caller that sees [`Link::Up`] and then fails to register on that
    /// generation is sure to see the change on its next look. Callers hold
    /// receivers made with [`Shared::link`].
    link: watch::Sender<Link>,
    /// When the daemon said it releases every lease, if it announced a
    /// shutdown. The game holds receivers from
    /// [`Client::shutdown_notice`](crate::Client::shutdown_notice). Taken
    /// and dropped when the link ends for good, so waiting receivers fail
    /// rather than wait forever.
    shutdown: Mutex<Option<watch::Sender<Option<Instant>>>>,
}

/// The client's link to the daemon, as the callers see it.
#[derive(Clone, Debug)]
pub(crate) enum Link {
    /// A connection is up; requests go to it.
    Up(Conn),
    /// The connection dropped and the supervisor is reconnecting. New
    /// requests wait for the next [`Link::Up`].
    Down,
    /// No connection will be made again; requests fail with this.
    Ended(Ended),
}

/// One live connection, as the callers need it.
#[derive(Clone, Debug)]
pub(crate) struct Conn {
    /// Which connection this is, counted from 1. A request registers under
    /// it, so one registered as a connection ends cannot be left waiting.
    pub(crate) generation: u64,
    /// Where encoded frames for this connection go; its writer task drains
    /// what the socket does not take at once.
    pub(crate) outbox: Arc<Outbox>,
    /// The largest payload a request may encode to: the smaller of the
    /// client's and this daemon's limit.
    pub(crate) max_frame: u32,
}

/// Why the link ended for good.
#[derive(Clone, Debug)]
pub(crate) enum Ended {
    /// [`Client::close`](crate::Client::close) was called or the last handle
    /// was dropped.
    Closed,
    /// The connection dropped and reconnecting was disabled, or did not
    /// succeed within `reconnect_for`.
    GaveUp,
    /// The daemon refused the reconnect's handshake, or ended a connection
    /// with a refusal.
    Refused(Error),
    /// The daemon answered the reconnect's handshake against the protocol.
    Protocol(String),
}

/// A request waiting for its response.
#[derive(Debug)]
pub(crate) struct Pending {
    /// The caller awaits the other end. A caller that gave up has dropped
    /// it, and the response is then discarded.
    pub(crate) reply: oneshot::Sender<Result<Reply, ClientError>>,
    /// What the reader does to the subscriptions when the request succeeds,
    /// before anything after the response is read.
    pub(crate) effect: Effect,
}

/// A change to the event subscriptions that must happen exactly when a
/// response is read, so that no event sent after it is misrouted.
#[derive(Debug)]
pub(crate) enum Effect {
    /// Nothing to change.
    None,
    /// A load: on `Loaded`, route this lease's events to `events`. The
    /// daemon may send an event right behind the response, so the reader
    /// installs the route before it reads on.
    Subscribe {
        /// The profile's store.
        store: String,
        /// The profile's key.
        key: String,
        /// The [`Profile`](crate::Profile) built from the response holds
        /// the receiver.
        events: mpsc::UnboundedSender<ProfileEvent>,
    },
    /// A release: on `Released`, the lease is over and its route goes.
    Unsubscribe {
        /// The profile's store.
        store: String,
        /// The profile's key.
        key: String,
        /// The released lease; a newer lease's route is left alone.
        epoch: u64,
    },
}

/// The routing tables, behind [`Shared::state`].
#[derive(Debug)]
struct State {
    /// The generation whose reader is running, if any. Requests register
    /// only on it, so none waits for a response no reader will route.
    live: Option<u64>,
    /// Requests sent (or about to be) on the live connection, by id.
    pending: HashMap<u64, Pending>,
    /// Where each held lease's events go, by store and key. Routes outlive
    /// connections: a resumed lease keeps its route.
    subscriptions: HashMap<(String, String), Subscription>,
    /// The latest handshake answer.
    welcome: Welcome,
    /// Ids for the releases the reader sends by itself; they count down
    /// from `u64::MAX`, far from the callers' ids, which count up from 1.
    next_orphan_id: u64,
}

/// The route for one lease's events.
#[derive(Debug)]
struct Subscription {
    /// The lease's epoch. Events name the epoch they are about, and one for
    /// another epoch is not about this lease.
    epoch: u64,
    /// The [`Profile`](crate::Profile) of this lease holds the receiver.
    events: mpsc::UnboundedSender<ProfileEvent>,
    /// The ids of the messages handed to the profile. After a reconnect
    /// the daemon sends every message still pending again, and those
    /// already handed over are skipped. The oldest ids are forgotten past
    /// [`HANDED_IDS`].
    handed: BTreeSet<u64>,
}

/// The most message ids a route remembers as handed over: far more than
/// the daemon lets be pending for one profile at once, so an id forgotten
/// is one consumed long ago, which the daemon never sends again.
const HANDED_IDS: usize = 1 << 16;

impl Shared {
    /// The tables for a client whose first handshake was answered with
    /// `welcome`, with no connection live yet.
    pub(crate) fn new(welcome: Welcome) -> Self {
        Self {
            state: Mutex::new(State {
                live: None,
                pending: HashMap::new(),
                subscriptions: HashMap::new(),
                welcome,
                next_orphan_id: u64::MAX,
            }),
            link: watch::Sender::new(Link::Down),
            shutdown: Mutex::new(Some(watch::Sender::new(None))),
        }
    }

    /// A receiver of the link's state, for a caller to wait on.
    pub(crate) fn link(&self) -> watch::Receiver<Link> {
        self.link.subscribe()
    }

    /// A receiver of the daemon's shutdown deadline; once the link has
    /// ended, one whose sender is gone.
    pub(crate) fn shutdown(&self) -> watch::Receiver<Option<Instant>> {
        match &*self.shutdown_sender() {
            Some(sender) => sender.subscribe(),
            None => watch::channel(None).1,
        }
    }

    /// Tells the shutdown notice's watchers `deadline`, unless the link
    /// has ended.
    fn announce_shutdown(&self, deadline: Option<Instant>) {
        if let Some(sender) = &*self.shutdown_sender() {
            sender.send_replace(deadline);
        }
    }

    fn shutdown_sender(&self) -> std::sync::MutexGuard<'_, Option<watch::Sender<Option<Instant>>>> {
        self.shutdown.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The latest handshake answer.
    pub(crate) fn welcome(&self) -> Welcome {
        self.lock().welcome.clone()
    }

    /// Makes `conn`, just welcomed with `welcome`, the live connection.
    ///
    /// Each route whose lease `welcome` lists with the same epoch is kept,
    /// so its profile carries on as if nothing happened. Every other route
    /// gets [`ProfileEvent::LeaseExpired`] and is removed, which ends its
    /// stream: the daemon ended that lease while the client was away. The
    /// shutdown notice is cleared, since a daemon that is stopping announces
    /// it afresh on each connection.
    pub(crate) fn resume(&self, conn: Conn, welcome: Welcome) {
        let mut state = self.lock();
        let held: HashSet<(&str, &str, u64)> = welcome
            .leases
            .iter()
            .map(|HeldLease { store, key, epoch }| (store.as_str(), key.as_str(), *epoch))
            .collect();
        state.subscriptions.retain(|(store, key), sub| {
            let kept = held.contains(&(store.as_str(), key.as_str(), sub.epoch));
            if !kept {
                tracing::info!(
                    store,
                    key,
                    epoch = sub.epoch,
                    "lease expired while disconnected"
                );
                // A profile dropped meanwhile has nothing to tell.
                let _ = sub.events.send(ProfileEvent::LeaseExpired);
            }
            kept
        });
        drop(held);
        state.welcome = welcome;
        state.live = Some(conn.generation);
        self.announce_shutdown(None);
        self.link.send_replace(Link::Up(conn));
    }

    /// Registers a request on connection `generation` before it is sent, so
    /// its response cannot arrive first. Hands the request back if that
    /// connection is no longer live.
    pub(crate) fn register(
        &self,
        generation: u64,
        id: u64,
        pending: Pending,
    ) -> Result<(), Pending> {
        let mut state = self.lock();
        if state.live != Some(generation) {
            return Err(pending);
        }
        state.pending.insert(id, pending);
        Ok(())
    }

    /// Takes back a request that was never sent; `None` if its connection
    /// ended meanwhile and failed it.
    pub(crate) fn take(&self, id: u64) -> Option<Pending> {
        self.lock().pending.remove(&id)
    }

    /// Removes the route of a lease whose [`Profile`](crate::Profile) is
    /// gone, unless a newer lease on the key has replaced it.
    /// The epoch of a lease this session holds that no live profile does:
    /// one whose load answer was lost when a connection dropped (the daemon
    /// listed it at the last handshake), or one whose answer reached a load
    /// future that was then dropped unread (its route is there, with nobody
    /// listening).
    pub(crate) fn orphaned_lease(&self, store: &str, key: &str) -> Option<u64> {
        let state = self.lock();
        match state.subscriptions.get(&(store.to_owned(), key.to_owned())) {
            Some(sub) if sub.events.is_closed() => return Some(sub.epoch),
            Some(_) => return None,
            None => {}
        }
        state
            .welcome
            .leases
            .iter()
            .find(|lease| lease.store == store && lease.key == key)
            .map(|lease| lease.epoch)
    }

    pub(crate) fn unsubscribe(&self, store: &str, key: &str, epoch: u64) {
        let slot = (store.to_owned(), key.to_owned());
        self.lock().unroute(&slot, epoch);
    }

    /// Marks connection `generation` gone and the link down. Dropping every
    /// waiting reply sender fails those requests with `Disconnected`; the
    /// event routes stay for the next connection.
    pub(crate) fn disconnect(&self, generation: u64) {
        let mut state = self.lock();
        if state.live != Some(generation) {
            return;
        }
        state.live = None;
        let pending = std::mem::take(&mut state.pending);
        self.link.send_replace(Link::Down);
        drop(state);
        drop(pending);
    }

    /// Ends the link for good. Waiting requests fail with `Disconnected`,
    /// later ones with `why`, and dropping every event sender ends those
    /// profiles' event streams.
    pub(crate) fn end(&self, why: Ended) {
        let mut state = self.lock();
        state.live = None;
        let pending = std::mem::take(&mut state.pending);
        let subscriptions = std::mem::take(&mut state.subscriptions);
        self.link.send_replace(Link::Ended(why));
        drop(state);
        drop((pending, subscriptions));
        drop(self.shutdown_sender().take());
    }

    /// Routes one frame read from the daemon, skipping what a newer daemon
    /// appended to the protocol: a reply this client cannot read fails its
    /// request alone.
    fn receive(&self, frame: FromDaemon) {
        match frame {
            FromDaemon::Frame(frame) => self.dispatch(frame),
            FromDaemon::UnknownReply { id, kind } => {
                let Some(Pending { reply, .. }) = self.lock().pending.remove(&id) else {
                    tracing::warn!(id, "ignoring a response to no request in flight");
                    return;
                };
                let _ = reply.send(Err(ClientError::Protocol(format!(
                    "the daemon answered with reply kind {kind}, which is newer than this client"
                ))));
            }
            FromDaemon::UnknownEvent { kind } => {
                tracing::debug!(kind, "skipping an event kind newer than this client");
            }
            FromDaemon::UnknownFrame { kind } => {
                tracing::debug!(kind, "skipping a frame kind newer than this client");
            }
        }
    }

    /// Routes one frame read from the daemon.
    fn dispatch(&self, frame: ServerFrame) {
        match frame {
            ServerFrame::Response(response) => self.respond(response),
            ServerFrame::Event(event) => self.notify(event),
            ServerFrame::Welcome(welcome) => {
                tracing::warn!(?welcome, "ignoring a second welcome from the daemon");
            }
            ServerFrame::Refused(err) => {
                // The reader ends the connection on a refusal before it gets
                // here; this is for frames dispatched directly.
                tracing::warn!(%err, "ignoring a refusal after the handshake");
            }
        }
    }

    /// Hands a response to the request with its id, applying the request's
    /// effect on the subscriptions first.
    fn respond(&self, Response { id, result }: Response) {
        let mut state = self.lock();
        let Some(Pending { reply, effect }) = state.pending.remove(&id) else {
            tracing::warn!(id, "ignoring a response to no request in flight");
            return;
        };
        // A grant whose caller may still stop waiting before it takes it.
        let mut granted = None;
        match (effect, &result) {
            (Effect::Subscribe { store, key, events }, Ok(Reply::Loaded(loaded)))
                if !reply.is_closed() =>
            {
                let epoch = loaded.epoch;
                granted = Some((store.clone(), key.clone(), epoch));
                let handed = loaded.messages.iter().map(|m| m.id).collect();
                state.subscriptions.insert(
                    (store, key),
                    Subscription {
                        epoch,
                        events,
                        handed,
                    },
                );
            }
            (Effect::Subscribe { store, key, .. }, Ok(Reply::Loaded(loaded))) => {
                // The caller gave up on this load (its future was dropped,
                // say by a timeout) but the daemon granted it. Nobody holds
                // a Profile for the lease, so it is handed straight back
                // rather than left held until the session ends.
                let epoch = loaded.epoch;
                self.release_orphan(&mut state, store, key, epoch);
            }
            (Effect::Unsubscribe { store, key, epoch }, Ok(Reply::Released { .. })) => {
                state.unroute(&(store, key), epoch);
            }
            _ => {}
        }
        drop(state);
        // The caller may have stopped waiting; its response has nowhere to
        // go. A grant it gave up on after the check above is handed back
        // like one it had given up on before.
        if let (Err(Ok(Reply::Loaded(_))), Some((store, key, epoch))) =
            (reply.send(result.map_err(ClientError::Daemon)), granted)
        {
            let mut state = self.lock();
            let slot = (store, key);
            state.unroute(&slot, epoch);
            let (store, key) = slot;
            self.release_orphan(&mut state, store, key, epoch);
        }
    }

    /// Sends a release for a lease granted to a load nobody waits for any
    /// more. Its response is consumed here. If the connection cannot take
    /// the frame now, the lease stays held until the session ends, which is
    /// no worse than before.
    fn release_orphan(&self, state: &mut State, store: String, key: String, epoch: u64) {
        let Link::Up(conn) = &*self.link.borrow() else {
            return;
        };
        let id = state.next_orphan_id;
        state.next_orphan_id -= 1;
        let frame = ClientFrame::Request(Request {
            id,
            body: RequestBody::Release {
                store: store.clone(),
                key: key.clone(),
                epoch,
                data: None,
                changes: profiled_protocol::Changes::default(),
            },
        });
        let Ok(bytes) = profiled_protocol::encode_frame(&frame) else {
            return;
        };
        let (reply, _) = oneshot::channel();
        state.pending.insert(
            id,
            Pending {
                reply,
                effect: Effect::None,
            },
        );
        if !matches!(conn.outbox.try_send(&bytes), Ok(true)) {
            state.pending.remove(&id);
            tracing::warn!(
                store,
                key,
                epoch,
                "could not release a lease whose load was abandoned"
            );
        } else {
            tracing::debug!(
                store,
                key,
                epoch,
                "releasing a lease whose load was abandoned"
            );
        }
    }

    /// Passes an event to the holder of the lease it is about, or to every
    /// holder for a shutdown.
    fn notify(&self, event: Event) {
        let (store, key, epoch, event) = match event {
            Event::ReleaseRequested {
                store,
                key,
                epoch,
                requester,
            } => (
                store,
                key,
                epoch,
                ProfileEvent::ReleaseRequested { requester },
            ),
            Event::LeaseLost {
                store,
                key,
                epoch,
                reason,
                new_owner,
            } => (
                store,
                key,
                epoch,
                ProfileEvent::LeaseLost { reason, new_owner },
            ),
            Event::Message {
                store,
                key,
                epoch,
                message,
            } => (store, key, epoch, ProfileEvent::Message(message)),
            Event::ShuttingDown { deadline_ms } => {
                tracing::info!(deadline_ms, "the daemon is shutting down");
                self.shutting_down(Instant::now() + Duration::from_millis(deadline_ms));
                return;
            }
        };
        let mut state = self.lock();
        let slot = (store, key);
        let Some(sub) = state.subscriptions.get_mut(&slot) else {
            tracing::debug!(
                store = slot.0,
                key = slot.1,
                epoch,
                "event for no held profile"
            );
            return;
        };
        if sub.epoch != epoch {
            tracing::debug!(
                store = slot.0,
                key = slot.1,
                epoch,
                held = sub.epoch,
                "event for another epoch than the one held"
            );
            return;
        }
        if let ProfileEvent::Message(message) = &event {
            if !sub.handed.insert(message.id) {
                tracing::debug!(
                    store = slot.0,
                    key = slot.1,
                    id = message.id,
                    "message already handed to the profile"
                );
                return;
            }
            if sub.handed.len() > HANDED_IDS {
                sub.handed.pop_first();
            }
        }
        if sub.events.send(event).is_err() {
            // Nobody listens. A dropped profile removes its route first, so
            // this is a load whose future was dropped with its answer
            // unread: nobody holds a Profile for the lease, and it is
            // handed back.
            state.subscriptions.remove(&slot);
            let (store, key) = slot;
            self.release_orphan(&mut state, store, key, epoch);
        }
    }

    /// Tells every held profile, and the shutdown notice's watchers, that
    /// the daemon releases every lease at `deadline`.
    fn shutting_down(&self, deadline: Instant) {
        let mut state = self.lock();
        state.subscriptions.retain(|_, sub| {
            // A profile that was dropped leaves a stale route to remove.
            sub.events
                .send(ProfileEvent::ShuttingDown { deadline })
                .is_ok()
        });
        self.announce_shutdown(Some(deadline));
    }

    /// Locks the state. A panic elsewhere while holding the lock cannot
    /// leave the maps half-updated, since every update is a single insert
    /// or remove, so a poisoned lock is used as is.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    /// Removes the route of lease `epoch` on `slot`, unless a newer lease on
    /// the key has replaced it.
    fn unroute(&mut self, slot: &(String, String), epoch: u64) {
        if self
            .subscriptions
            .get(slot)
            .is_some_and(|sub| sub.epoch == epoch)
        {
            self.subscriptions.remove(slot);
        }
    }
}

impl Ended {
    /// The error a request fails with once the link has ended.
    pub(crate) fn error(&self) -> ClientError {
        match self {
            Self::Closed | Self::GaveUp => ClientError::Disconnected,
            Self::Refused(err) => ClientError::Refused(err.clone()),
            Self::Protocol(message) => ClientError::Protocol(message.clone()),
        }
    }
}

/// Reads frames of connection `generation` until the daemon closes it, the
/// socket fails, or the connection is cancelled, then fails every request
/// still waiting on it.
///
/// Returns the refusal the daemon ended the connection with if it is
/// final: [`ErrorCode::Superseded`] after the handshake says a newer
/// connection took the session over, and reconnecting would only take it
/// back. Other refusals after the handshake (a frame the daemon would not
/// read, or a shutdown) leave the client to reconnect.
pub(crate) async fn read_frames(
    mut reader: FrameReader,
    shared: Arc<Shared>,
    generation: u64,
    cancel: CancellationToken,
) -> Option<Error> {
    let mut refusal = None;
    loop {
        let frame = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            frame = reader.next() => frame,
        };
        match frame {
            Some(Ok(FromDaemon::Frame(ServerFrame::Refused(err)))) => {
                tracing::warn!(%err, "the daemon ended the connection");
                if err.code == ErrorCode::Superseded {
                    refusal = Some(err);
                }
                break;
            }
            Some(Ok(frame)) => shared.receive(frame),
            Some(Err(err)) => {
                tracing::warn!(%err, "closing the connection after a read failure");
                break;
            }
            None => {
                tracing::debug!("the daemon closed the connection");
                break;
            }
        }
    }
    shared.disconnect(generation);
    cancel.cancel();
    refusal
}

#[cfg(test)]
mod tests {
    use profiled_protocol::{Loaded, LossReason, Message, ProfileMeta, SessionId};

    use super::*;

    fn meta() -> ProfileMeta {
        ProfileMeta {
            created_at_ms: 1,
            updated_at_ms: 0,
            load_count: 1,
            version: 0,
            active: None,
            meta_tags: Default::default(),
            user_ids: Vec::new(),
        }
    }

    fn welcome(leases: Vec<HeldLease>) -> Welcome {
        Welcome {
            daemon_version: "test".into(),
            protocol_version: profiled_protocol::PROTOCOL_VERSION,
            max_frame: profiled_protocol::DEFAULT_MAX_FRAME,
            connection_id: 1,
            leases,
        }
    }

    /// A connection of `generation` whose writer is not running.
    fn conn(generation: u64) -> Conn {
        Conn {
            generation,
            outbox: Arc::new(Outbox::closed()),
            max_frame: profiled_protocol::DEFAULT_MAX_FRAME,
        }
    }

    /// Tables with connection 1 live.
    fn live() -> Shared {
        let shared = Shared::new(welcome(Vec::new()));
        shared.resume(conn(1), welcome(Vec::new()));
        shared
    }

    fn held(key: &str, epoch: u64) -> HeldLease {
        HeldLease {
            store: "s".into(),
            key: key.into(),
            epoch,
        }
    }

    fn loaded(id: u64, epoch: u64) -> ServerFrame {
        ServerFrame::Response(Response {
            id,
            result: Ok(Reply::Loaded(Loaded {
                epoch,
                data: None,
                meta: meta(),
                messages: Vec::new(),
            })),
        })
    }

    fn lost(key: &str, epoch: u64) -> ServerFrame {
        ServerFrame::Event(Event::LeaseLost {
            store: "s".into(),
            key: key.into(),
            epoch,
            reason: LossReason::Stolen,
            new_owner: Some(SessionId {
                place_id: 1,
                job_id: "thief".into(),
            }),
        })
    }

    /// Registers a load of `s/key` on connection 1 and returns its reply
    /// and event receivers.
    fn load(
        shared: &Shared,
        id: u64,
        key: &str,
    ) -> (
        oneshot::Receiver<Result<Reply, ClientError>>,
        mpsc::UnboundedReceiver<ProfileEvent>,
    ) {
        let (reply, reply_rx) = oneshot::channel();
        let (events, events_rx) = mpsc::unbounded_channel();
        let effect = Effect::Subscribe {
            store: "s".into(),
            key: key.into(),
            events,
        };
        assert!(shared.register(1, id, Pending { reply, effect }).is_ok());
        (reply_rx, events_rx)
    }

    /// Registers a ping on connection `generation`; `false` if refused.
    fn ping(shared: &Shared, generation: u64, id: u64) -> bool {
        let (reply, _reply_rx) = oneshot::channel();
        let pending = Pending {
            reply,
            effect: Effect::None,
        };
        shared.register(generation, id, pending).is_ok()
    }

    #[test]
    fn an_event_right_behind_the_loaded_response_reaches_the_profile() {
        let shared = live();
        let (mut reply, mut events) = load(&shared, 1, "k");
        shared.dispatch(loaded(1, 5));
        shared.dispatch(lost("k", 5));
        assert!(matches!(reply.try_recv(), Ok(Ok(Reply::Loaded(_)))));
        assert!(matches!(
            events.try_recv(),
            Ok(ProfileEvent::LeaseLost {
                reason: LossReason::Stolen,
                ..
            })
        ));
    }

    /// Each message reaches the profile once per lease: those in the load's
    /// answer and those already handed over are skipped when the daemon
    /// sends them again after a reconnect, while one it could not send
    /// before (a gap) still gets through later. A new lease starts afresh.
    #[test]
    fn each_message_is_handed_to_a_lease_once() {
        fn message(key: &str, epoch: u64, id: u64) -> ServerFrame {
            ServerFrame::Event(Event::Message {
                store: "s".into(),
                key: key.into(),
                epoch,
                message: Message {
                    id,
                    sent_at_ms: 0,
                    payload: Vec::new(),
                },
            })
        }
        fn ids(events: &mut mpsc::UnboundedReceiver<ProfileEvent>) -> Vec<u64> {
            std::iter::from_fn(|| events.try_recv().ok())
                .map(|event| match event {
                    ProfileEvent::Message(message) => message.id,
                    other => panic!("unexpected {other:?}"),
                })
                .collect()
        }
        let shared = live();
        let (_reply, mut events) = load(&shared, 1, "k");
        let ServerFrame::Response(mut answer) = loaded(1, 5) else {
            unreachable!("a response")
        };
        if let Ok(Reply::Loaded(loaded)) = &mut answer.result {
            loaded.messages = vec![Message {
                id: 1,
                sent_at_ms: 0,
                payload: Vec::new(),
            }];
        }
        shared.dispatch(ServerFrame::Response(answer));
        // Overflow and live messages, with 3 missing (a gap).
        for id in [2, 4] {
            shared.dispatch(message("k", 5, id));
        }
        assert_eq!(ids(&mut events), [2, 4]);
        // After a reconnect: everything still pending, again.
        for id in [1, 2, 3, 4] {
            shared.dispatch(message("k", 5, id));
        }
        assert_eq!(ids(&mut events), [3], "only the one never handed over");

        // A new lease on the key hands its messages over afresh.
        let (_reply, mut fresh) = load(&shared, 2, "k");
        shared.dispatch(loaded(2, 6));
        shared.dispatch(message("k", 6, 4));
        assert_eq!(ids(&mut fresh), [4]);
    }

    #[test]
    fn events_for_other_epochs_or_keys_are_dropped() {
        let shared = live();
        let (_reply, mut events) = load(&shared, 1, "k");
        shared.dispatch(loaded(1, 5));
        shared.dispatch(lost("k", 4));
        shared.dispatch(lost("other", 5));
        assert!(events.try_recv().is_err());
    }

    #[test]
    fn a_failed_load_installs_no_route() {
        let shared = live();
        let (mut reply, mut events) = load(&shared, 1, "k");
        shared.dispatch(ServerFrame::Response(Response {
            id: 1,
            result: Err(Error::new(ErrorCode::Timeout, "deadline passed")),
        }));
        assert!(matches!(reply.try_recv(), Ok(Err(_))));
        // The sender went with the pending entry, so the stream has ended.
        assert!(matches!(
            events.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
    }

    #[test]
    fn a_release_ends_its_lease_route_but_not_a_newer_one() {
        let shared = live();
        let (_reply, mut events) = load(&shared, 1, "k");
        shared.dispatch(loaded(1, 5));

        let (reply, _reply_rx) = oneshot::channel();
        let effect = Effect::Unsubscribe {
            store: "s".into(),
            key: "k".into(),
            epoch: 4,
        };
        assert!(shared.register(1, 2, Pending { reply, effect }).is_ok());
        shared.dispatch(ServerFrame::Response(Response {
            id: 2,
            result: Ok(Reply::Released { version: 1 }),
        }));
        shared.dispatch(lost("k", 5));
        assert!(events.try_recv().is_ok(), "epoch 5 is still routed");

        let (reply, _reply_rx) = oneshot::channel();
        let effect = Effect::Unsubscribe {
            store: "s".into(),
            key: "k".into(),
            epoch: 5,
        };
        assert!(shared.register(1, 3, Pending { reply, effect }).is_ok());
        shared.dispatch(ServerFrame::Response(Response {
            id: 3,
            result: Ok(Reply::Released { version: 2 }),
        }));
        assert!(matches!(
            events.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
    }

    #[test]
    fn a_disconnect_fails_waiters_but_keeps_routes_for_the_next_connection() {
        let shared = live();
        let (mut first, _) = load(&shared, 1, "a");
        let (_b_reply, mut events) = load(&shared, 2, "b");
        shared.dispatch(loaded(2, 1));
        shared.disconnect(1);
        assert!(matches!(
            first.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        assert!(matches!(&*shared.link().borrow(), Link::Down));
        assert!(!ping(&shared, 1, 3), "the old connection takes no requests");

        shared.resume(conn(2), welcome(vec![held("b", 1)]));
        assert!(ping(&shared, 2, 4));
        shared.dispatch(lost("b", 1));
        assert!(
            events.try_recv().is_ok(),
            "the resumed lease is still routed"
        );
    }

    #[test]
    fn a_resume_expires_routes_the_daemon_no_longer_lists() {
        let shared = live();
        let (_kept_reply, mut kept) = load(&shared, 1, "kept");
        let (_other_reply, mut other_epoch) = load(&shared, 2, "other_epoch");
        let (_missing_reply, mut missing) = load(&shared, 3, "missing");
        shared.dispatch(loaded(1, 1));
        shared.dispatch(loaded(2, 2));
        shared.dispatch(loaded(3, 3));
        shared.disconnect(1);
        shared.resume(
            conn(2),
            welcome(vec![held("kept", 1), held("other_epoch", 9)]),
        );

        assert!(matches!(
            kept.try_recv(),
            Err(mpsc::error::TryRecvError::Empty)
        ));
        for events in [&mut other_epoch, &mut missing] {
            assert_eq!(events.try_recv(), Ok(ProfileEvent::LeaseExpired));
            assert!(matches!(
                events.try_recv(),
                Err(mpsc::error::TryRecvError::Disconnected)
            ));
        }
    }

    #[test]
    fn a_shutdown_reaches_every_profile_and_the_notice_until_the_next_connection() {
        let shared = live();
        let notice = shared.shutdown();
        let (_a_reply, mut a) = load(&shared, 1, "a");
        let (_b_reply, mut b) = load(&shared, 2, "b");
        shared.dispatch(loaded(1, 1));
        shared.dispatch(loaded(2, 1));
        shared.dispatch(ServerFrame::Event(Event::ShuttingDown { deadline_ms: 500 }));

        let deadline = notice.borrow().expect("a deadline");
        assert_eq!(a.try_recv(), Ok(ProfileEvent::ShuttingDown { deadline }));
        assert_eq!(b.try_recv(), Ok(ProfileEvent::ShuttingDown { deadline }));

        shared.disconnect(1);
        shared.resume(conn(2), welcome(vec![held("a", 1), held("b", 1)]));
        assert_eq!(*notice.borrow(), None);
    }

    #[test]
    fn ending_fails_waiters_ends_streams_and_refuses_new_requests() {
        let shared = live();
        let (mut first, _) = load(&shared, 1, "a");
        let (_b_reply, mut events) = load(&shared, 2, "b");
        shared.dispatch(loaded(2, 1));
        shared.end(Ended::Closed);
        assert!(matches!(
            first.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        assert!(matches!(
            events.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
        assert!(!ping(&shared, 1, 3));
        assert!(matches!(
            &*shared.link().borrow(),
            Link::Ended(Ended::Closed)
        ));
    }

    #[test]
    fn unexpected_frames_are_ignored() {
        let shared = live();
        shared.dispatch(ServerFrame::Response(Response {
            id: 99,
            result: Ok(Reply::Pong),
        }));
        shared.dispatch(lost("k", 1));
        shared.dispatch(ServerFrame::Refused(Error::new(ErrorCode::Storage, "x")));
    }
}
