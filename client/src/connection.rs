//! The background tasks that own the socket, and the routing table they
//! share with the callers.
//!
//! One writer task drains a queue of encoded frames into the socket's write
//! half. One reader task decodes frames from the read half and routes each
//! [`Response`] to the call waiting for its id and each [`Event`] to the
//! [`Profile`](crate::Profile) holding that lease. Both tasks stop when the
//! connection's [`CancellationToken`] is cancelled, and each cancels it when
//! it stops on its own, so one side failing takes the other down with it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use profiled_protocol::{ClientFrame, Error, Event, FrameCodec, Reply, Response, ServerFrame};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{BytesCodec, FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use crate::ProfileEvent;

/// The read half of a connection, decoding what the daemon sends.
pub(crate) type FrameReader = FramedRead<OwnedReadHalf, FrameCodec<ServerFrame, ClientFrame>>;

/// The write half of a connection. Frames are encoded by the callers, so the
/// writer only copies bytes.
pub(crate) type FrameWriter = FramedWrite<OwnedWriteHalf, BytesCodec>;

/// What the reader task and the callers share: the requests waiting for a
/// response and the leases waiting for events.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// Held only for map operations, never across an await.
    state: Mutex<State>,
}

/// A request waiting for its response.
#[derive(Debug)]
pub(crate) struct Pending {
    /// The caller awaits the other end. A caller that gave up has dropped
    /// it, and the response is then discarded.
    pub(crate) reply: oneshot::Sender<Result<Reply, Error>>,
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
#[derive(Debug, Default)]
struct State {
    /// Set by the reader when it stops. From then on requests fail at once
    /// instead of waiting for a response no one will route.
    closed: bool,
    /// Requests sent (or about to be), by id.
    pending: HashMap<u64, Pending>,
    /// Where each held lease's events go, by store and key.
    subscriptions: HashMap<(String, String), Subscription>,
}

/// The route for one lease's events.
#[derive(Debug)]
struct Subscription {
    /// The lease's epoch. Events name the epoch they are about, and one for
    /// another epoch is not about this lease.
    epoch: u64,
    /// The [`Profile`](crate::Profile) of this lease holds the receiver.
    events: mpsc::UnboundedSender<ProfileEvent>,
}

impl Shared {
    /// Registers a request before it is sent, so its response cannot arrive
    /// first. Returns `false` once the connection is closed.
    pub(crate) fn register(&self, id: u64, pending: Pending) -> bool {
        let mut state = self.lock();
        if state.closed {
            return false;
        }
        state.pending.insert(id, pending);
        true
    }

    /// Forgets a request that was never sent.
    pub(crate) fn forget(&self, id: u64) {
        self.lock().pending.remove(&id);
    }

    /// Removes the route of a lease whose [`Profile`](crate::Profile) is
    /// gone, unless a newer lease on the key has replaced it.
    pub(crate) fn unsubscribe(&self, store: &str, key: &str, epoch: u64) {
        let mut state = self.lock();
        let slot = (store.to_owned(), key.to_owned());
        if state
            .subscriptions
            .get(&slot)
            .is_some_and(|sub| sub.epoch == epoch)
        {
            state.subscriptions.remove(&slot);
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
        match (effect, &result) {
            (Effect::Subscribe { store, key, events }, Ok(Reply::Loaded(loaded)))
                if !reply.is_closed() =>
            {
                let epoch = loaded.epoch;
                state
                    .subscriptions
                    .insert((store, key), Subscription { epoch, events });
            }
            (Effect::Unsubscribe { store, key, epoch }, Ok(Reply::Released { .. })) => {
                let slot = (store, key);
                if state
                    .subscriptions
                    .get(&slot)
                    .is_some_and(|sub| sub.epoch == epoch)
                {
                    state.subscriptions.remove(&slot);
                }
            }
            _ => {}
        }
        drop(state);
        // The caller may have stopped waiting; its response has nowhere to go.
        let _ = reply.send(result);
    }

    /// Passes an event to the holder of the lease it is about.
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
            Event::ShuttingDown { deadline_ms } => {
                tracing::info!(deadline_ms, "the daemon is shutting down");
                return;
            }
        };
        let mut state = self.lock();
        let slot = (store, key);
        let Some(sub) = state.subscriptions.get(&slot) else {
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
        if sub.events.send(event).is_err() {
            // The profile was dropped; its route is stale.
            state.subscriptions.remove(&slot);
        }
    }

    /// Marks the connection closed. Dropping every waiting reply sender
    /// fails those requests with `Disconnected`, and dropping every event
    /// sender ends those profiles' event streams.
    fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        let pending = std::mem::take(&mut state.pending);
        let subscriptions = std::mem::take(&mut state.subscriptions);
        drop(state);
        drop((pending, subscriptions));
    }

    /// Locks the state. A panic elsewhere while holding the lock cannot
    /// leave the maps half-updated, since every update is a single insert
    /// or remove, so a poisoned lock is used as is.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Reads frames until the daemon closes the connection, the socket fails,
/// or the connection is cancelled, then fails everything still waiting.
pub(crate) async fn read_frames(
    mut reader: FrameReader,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    loop {
        let frame = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            frame = reader.next() => frame,
        };
        match frame {
            Some(Ok(frame)) => shared.dispatch(frame),
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
    shared.close();
    cancel.cancel();
}

/// Writes queued frames until the queue's senders are gone, the socket
/// fails, or the connection is cancelled. Dropping the write half on return
/// shuts the socket down for writing, which the daemon reads as EOF.
pub(crate) async fn write_frames(
    mut writer: FrameWriter,
    mut frames: mpsc::Receiver<Bytes>,
    cancel: CancellationToken,
) {
    loop {
        let written = tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            written = write_batch(&mut writer, &mut frames) => written,
        };
        match written {
            Ok(true) => {}
            Ok(false) => break,
            Err(err) => {
                tracing::warn!(%err, "closing the connection after a write failure");
                break;
            }
        }
    }
    cancel.cancel();
}

/// Waits for a frame, then writes it and every other frame already queued
/// with one flush, so concurrent callers share system calls. Returns
/// `false` when the queue is closed.
async fn write_batch(
    writer: &mut FrameWriter,
    frames: &mut mpsc::Receiver<Bytes>,
) -> std::io::Result<bool> {
    let Some(first) = frames.recv().await else {
        return Ok(false);
    };
    writer.feed(first).await?;
    while let Ok(frame) = frames.try_recv() {
        writer.feed(frame).await?;
    }
    SinkExt::<Bytes>::flush(writer).await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use profiled_protocol::{ErrorCode, Loaded, LossReason, ProfileMeta, SessionId};

    use super::*;

    fn meta() -> ProfileMeta {
        ProfileMeta {
            created_at_ms: 1,
            updated_at_ms: 0,
            load_count: 1,
            version: 0,
            active: None,
        }
    }

    fn loaded(id: u64, epoch: u64) -> ServerFrame {
        ServerFrame::Response(Response {
            id,
            result: Ok(Reply::Loaded(Loaded {
                epoch,
                data: None,
                meta: meta(),
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

    /// Registers a load of `s/key` and returns its reply and event receivers.
    fn load(
        shared: &Shared,
        id: u64,
        key: &str,
    ) -> (
        oneshot::Receiver<Result<Reply, Error>>,
        mpsc::UnboundedReceiver<ProfileEvent>,
    ) {
        let (reply, reply_rx) = oneshot::channel();
        let (events, events_rx) = mpsc::unbounded_channel();
        let effect = Effect::Subscribe {
            store: "s".into(),
            key: key.into(),
            events,
        };
        assert!(shared.register(id, Pending { reply, effect }));
        (reply_rx, events_rx)
    }

    #[test]
    fn an_event_right_behind_the_loaded_response_reaches_the_profile() {
        let shared = Shared::default();
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

    #[test]
    fn events_for_other_epochs_or_keys_are_dropped() {
        let shared = Shared::default();
        let (_reply, mut events) = load(&shared, 1, "k");
        shared.dispatch(loaded(1, 5));
        shared.dispatch(lost("k", 4));
        shared.dispatch(lost("other", 5));
        assert!(events.try_recv().is_err());
    }

    #[test]
    fn a_failed_load_installs_no_route() {
        let shared = Shared::default();
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
        let shared = Shared::default();
        let (_reply, mut events) = load(&shared, 1, "k");
        shared.dispatch(loaded(1, 5));

        let (reply, _reply_rx) = oneshot::channel();
        let effect = Effect::Unsubscribe {
            store: "s".into(),
            key: "k".into(),
            epoch: 4,
        };
        assert!(shared.register(2, Pending { reply, effect }));
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
        assert!(shared.register(3, Pending { reply, effect }));
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
    fn closing_fails_waiters_ends_streams_and_refuses_new_requests() {
        let shared = Shared::default();
        let (mut first, _) = load(&shared, 1, "a");
        let (_, mut events) = load(&shared, 2, "b");
        shared.dispatch(loaded(2, 1));
        shared.close();
        assert!(matches!(
            first.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        assert!(matches!(
            events.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
        let (reply, _reply_rx) = oneshot::channel();
        assert!(!shared.register(
            3,
            Pending {
                reply,
                effect: Effect::None
            }
        ));
    }

    #[test]
    fn unexpected_frames_are_ignored() {
        let shared = Shared::default();
        shared.dispatch(ServerFrame::Response(Response {
            id: 99,
            result: Ok(Reply::Pong),
        }));
        shared.dispatch(lost("k", 1));
        shared.dispatch(ServerFrame::Refused(Error::new(ErrorCode::Storage, "x")));
    }
}
