//! One client connection: handshake, then requests until either side
//! closes.
//!
//! One task serves the connection, both ways. It decodes frames and starts
//! each request; requests run concurrently and answer in whatever order
//! they finish, so a load waiting in a queue never holds up a save behind
//! it. The same task writes the answers, and the frames the lease driver
//! queues for the connection (load answers and events), gathering whatever
//! is ready into one flush. Writing from the task that read the request
//! spares a save's round trip a wake of a separate writer task. At most
//! `limits.max_in_flight` saves and releases are in flight; beyond that the
//! task stops reading, and the kernel's socket buffer pushes back on the
//! client. A client that stops reading stalls its own connection and no
//! other: its writes wait, and the driver closes it once its queue is full.

use std::sync::Arc;

use futures::stream::{FuturesUnordered, StreamExt};
use futures::{FutureExt, SinkExt, future::BoxFuture};
use profiled_protocol::{
    ClientFrame, Error, ErrorCode, FrameCodec, FrameError, Hello, Incoming, PROTOCOL_VERSION,
    RequestBody, Response, Role, ServerFrame, SessionId, Welcome,
};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use crate::access::{AccessPolicy, Peer};
use crate::config::LimitsConfig;
use crate::leases::{ConnId, ConnLink, Gate, Leases};
use crate::requests::{Releasing, Started, check_name};
use crate::stats::Stats;
use crate::storage::Storage;

/// What every connection shares.
#[derive(Debug)]
pub struct Context {
    /// The lease driver.
    pub leases: Leases,
    /// The database, for saves, releases and reads.
    pub storage: Storage,
    /// The limits to enforce.
    pub limits: LimitsConfig,
    /// The daemon's counters.
    pub stats: Arc<Stats>,
    /// Who may connect, and as what.
    pub access: AccessPolicy,
}

type Transport = Framed<UnixStream, FrameCodec<Incoming, ServerFrame>>;

/// Outbound frames queued beyond the in-flight requests and a load's
/// pending messages, for events.
const EVENT_SLACK: usize = 1024;

/// The most frames an outbound queue holds, however large the limits: a
/// bounded channel allocates only for what is queued, but its capacity must
/// stay well below `usize::MAX`.
const MAX_QUEUE: usize = 1 << 24;

/// The most frames written in one burst before the task reads again, so a
/// steady stream of events cannot keep requests unread.
const MAX_BURST: usize = 64;

/// The refusal of a request whose kind this daemon does not know (`kind`),
/// most likely from a newer client: the frame was skipped whole, so only
/// that request fails and the connection carries on.
fn unknown_kind(kind: u32) -> Error {
    Error::new(
        ErrorCode::InvalidRequest,
        format!(
            "unknown request kind {kind}: this daemon ({}) knows kinds 0 to {}",
            env!("CARGO_PKG_VERSION"),
            RequestBody::KINDS - 1
        ),
    )
}

/// The refusal of a load beyond `limits.max_queued_loads` (`limit`).
fn too_many_loads(limit: usize) -> Error {
    Error::new(
        ErrorCode::TooManyLoads {
            limit: limit as u64,
        },
        format!("{limit} loads already wait for an answer on this connection"),
    )
}

/// How long a closing connection may take to write what the driver queued
/// for it before it went away.
const CLOSING_WRITES: std::time::Duration = std::time::Duration::from_secs(1);

/// Serves one connection until it closes or `stop` is cancelled.
pub async fn serve(
    stream: UnixStream,
    conn: ConnId,
    context: Arc<Context>,
    stop: CancellationToken,
) {
    context.stats.connected();
    let _counted = Counted(&context.stats);
    // The kernel's word on who is connecting; without it, the peer is
    // treated as nobody in particular, which only an open policy admits.
    let peer = match stream.peer_cred() {
        Ok(cred) => Peer::new(cred.uid(), cred.gid(), cred.pid()),
        Err(err) => {
            tracing::warn!(conn, error = %err, "could not read the peer's credentials");
            Peer::new(u32::MAX, u32::MAX, None)
        }
    };
    let mut transport = Framed::new(stream, FrameCodec::new(context.limits.max_frame));
    let Some((session, role)) = handshake(&mut transport, &context, &peer, &stop).await else {
        return;
    };
    // A grant's pending messages that do not fit in its answer are queued
    // right behind it, up to `max_pending_messages` of them, and must not
    // find the queue full: a full queue closes the connection.
    let limits = &context.limits;
    let pending = usize::try_from(limits.max_pending_messages).unwrap_or(usize::MAX);
    // Stopping answers every waiting load at once, too.
    let capacity = limits
        .max_in_flight
        .saturating_add(limits.max_queued_loads)
        .saturating_add(pending)
        .saturating_add(EVENT_SLACK)
        .min(MAX_QUEUE);
    let (outbound, queue) = mpsc::channel(capacity);
    // `kill` drops the connection at once (the driver uses it on a client
    // that stopped reading, or whose session reconnected elsewhere);
    // `stop` lets it finish the requests in flight first.
    let kill = CancellationToken::new();
    let gate = Gate::default();
    let link = ConnLink {
        outbound,
        kill: kill.clone(),
        gate: gate.clone(),
        overflow_room: pending,
    };
    let connected = match context
        .leases
        .connect(conn, session.clone(), peer.uid, link)
        .await
    {
        Ok(Ok(connected)) => connected,
        Ok(Err(taken)) => {
            tracing::warn!(uid = peer.uid, pid = ?peer.pid, %session, owner = taken.owner, "refused a session owned by another user");
            refuse(&mut transport, ErrorCode::Forbidden, taken.to_string()).await;
            return;
        }
        Err(_) => {
            refuse(
                &mut transport,
                ErrorCode::ShuttingDown,
                "the daemon is shutting down",
            )
            .await;
            return;
        }
    };
    let held = connected.leases.len();
    let leases = connected
        .leases
        .into_iter()
        .map(crate::replies::held_lease)
        .collect();
    let welcome = ServerFrame::Welcome(Welcome {
        daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
        protocol_version: PROTOCOL_VERSION,
        max_frame: context.limits.max_frame,
        connection_id: conn,
        leases,
    });
    match transport.send(welcome).await {
        Ok(()) => {}
        // Only leases recovered after a restart under lower limits than
        // they were granted under (`limits.max_leases_per_session`,
        // `max_frame`) can make it too large. The refusal is final for
        // the client, which stops reconnecting, so the leases end with
        // this disconnect's resume grace rather than being held by a
        // session that can never resume them.
        Err(FrameError::TooLarge { len, max }) => {
            tracing::warn!(
                conn,
                %session,
                held,
                len,
                max,
                "refusing a session whose welcome is over the frame limit"
            );
            let message = format!(
                "this session holds {held} leases, too many to list in a welcome of at most {max} bytes ({len}); they end with the resume grace"
            );
            refuse(&mut transport, ErrorCode::TooManyLeases, message).await;
            context.leases.disconnect(conn);
            return;
        }
        Err(err) => {
            tracing::debug!(conn, %session, %err, "could not send the welcome");
            context.leases.disconnect(conn);
            return;
        }
    }
    tracing::debug!(conn, %session, "session connected");
    let session = Session {
        conn,
        session,
        role,
        context: Arc::clone(&context),
        releasing: Releasing::default(),
    };
    let mut link = Link {
        transport,
        queue,
        kill,
        gate,
        loads_waiting: 0,
        stop: stop.clone(),
    };
    let open = session.serve_requests(&mut link, &stop).await;
    context.leases.disconnect(conn);
    // What the driver queued before it learned of the disconnect (a load's
    // answer, `ShuttingDown`) is still written; the queue ends once the
    // driver drops its sender.
    if open {
        let _ = tokio::time::timeout(CLOSING_WRITES, link.write_the_rest()).await;
    }
    let _ = tokio::time::timeout(CLOSING_WRITES, link.transport.close()).await;
    tracing::debug!(conn, "session disconnected");
}

/// Counts the connection as closed when dropped, however `serve` ends.
struct Counted<'a>(&'a Stats);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.disconnected();
    }
}

/// A connection after its handshake.
pub(crate) struct Session {
    /// The daemon's id for the connection.
    pub(crate) conn: ConnId,
    /// The session it serves.
    pub(crate) session: SessionId,
    /// The rights it asked for in its `Hello`.
    pub(crate) role: Role,
    /// What every connection shares.
    pub(crate) context: Arc<Context>,
    /// This connection's releases not yet answered, so a save sent behind
    /// one is refused rather than applied ahead of it.
    pub(crate) releasing: Releasing,
}

/// The socket after the handshake, and what else may end or feed it.
struct Link {
    transport: Transport,
    /// Frames from the lease driver, which holds the sender in the
    /// connection's `ConnLink`.
    queue: mpsc::Receiver<ServerFrame>,
    /// Cancelled by the driver to drop the connection at once.
    kill: CancellationToken,
    /// Closed by the driver when a newer connection takes the session
    /// over; no request is started once it is.
    gate: Gate,
    /// Cancelled when the daemon stops; from then on a write that waits
    /// for the client gets [`CLOSING_WRITES`] more, so a client that stopped
    /// reading cannot hold the shutdown up.
    stop: CancellationToken,
    /// Loads handed to the lease driver and not yet answered. Their answers
    /// come through `queue`, taken on either of two paths (the read loop,
    /// or a burst of writes), so the count lives here. The connection is
    /// not idle while one waits, though nothing is in flight.
    loads_waiting: usize,
}

/// What writing a frame left the connection as.
enum Written {
    /// Open for more.
    Open,
    /// Closed: the frame was a refusal, which ends the connection, or the
    /// write failed, or the connection was killed.
    Closed,
}

impl Session {
    /// Reads requests and writes answers until the connection closes or
    /// `stop` is cancelled and everything in flight is answered. Returns
    /// whether the connection is still open for writing.
    async fn serve_requests(&self, link: &mut Link, stop: &CancellationToken) -> bool {
        let max_in_flight = self.context.limits.max_in_flight;
        let max_queued_loads = self.context.limits.max_queued_loads;
        let idle_timeout = self.context.limits.idle_timeout;
        let mut in_flight: FuturesUnordered<BoxFuture<'static, ServerFrame>> =
            FuturesUnordered::new();
        // The driver drops its sender when it lets go of the connection.
        let mut driver_open = true;
        // The cancellation and idle futures are made once, not once per
        // request: each new one registers a waiter, which costs more than
        // the select itself on the save path.
        let kill = link.kill.clone();
        let killed = kill.cancelled();
        let stopping = stop.cancelled();
        let idle = tokio::time::sleep(idle_timeout);
        tokio::pin!(killed, stopping, idle);
        'serve: loop {
            let answer = tokio::select! {
                () = &mut killed => return false,
                () = &mut idle, if !idle_timeout.is_zero() && in_flight.is_empty() && link.loads_waiting == 0 => {
                    tracing::info!(conn = self.conn, ?idle_timeout, "closing an idle connection");
                    let message = format!("no request for {}s", idle_timeout.as_secs_f64());
                    link.close_with(ErrorCode::Timeout, message).await;
                    return false;
                }
                () = &mut stopping => {
                    // The daemon is stopping: read nothing more, but answer
                    // what is in flight, so a write that committed is
                    // acknowledged rather than left in doubt.
                    while let Some(frame) = in_flight.next().await {
                        if let Written::Closed = link.write(frame).await {
                            return false;
                        }
                    }
                    return link.flush().await;
                }
                Some(frame) = in_flight.next(), if !in_flight.is_empty() => frame,
                frame = link.queue.recv(), if driver_open => match frame {
                    Some(frame) => {
                        link.count_answer(&frame);
                        frame
                    }
                    None => {
                        driver_open = false;
                        continue;
                    }
                },
                next = link.transport.next(), if in_flight.len() < max_in_flight && !link.gate.is_closed() => 'read: {
                    rearm(idle.as_mut(), idle_timeout);
                    let request = match next {
                        None => return true,
                        Some(Ok(Incoming::Frame(ClientFrame::Request(request)))) => request,
                        Some(Ok(Incoming::UnknownRequest { id, kind })) => {
                            break 'read ServerFrame::Response(Response { id, result: Err(unknown_kind(kind)) });
                        }
                        Some(Ok(Incoming::Frame(ClientFrame::Hello(_)))) => {
                            link.close_with(ErrorCode::InvalidRequest, "hello after the handshake").await;
                            return false;
                        }
                        Some(Err(err)) => {
                            // The requests before the bad frame were fine:
                            // what they started is answered before the
                            // refusal, so a save that committed is not left
                            // in doubt. A broken socket takes no answers.
                            if !matches!(err, FrameError::Io(_)) {
                                while let Some(frame) = in_flight.next().await {
                                    if let Written::Closed = link.write(frame).await {
                                        return false;
                                    }
                                }
                            }
                            self.frame_error(link, err).await;
                            return false;
                        }
                    };
                    let id = request.id;
                    let too_many = matches!(request.body, RequestBody::Load { .. })
                        && link.loads_waiting >= max_queued_loads;
                    if too_many {
                        ServerFrame::Response(Response { id, result: Err(too_many_loads(max_queued_loads)) })
                    } else {
                        // Taken over since it was read: the refusal is
                        // queued, and the request is not started.
                        let Some(started) = link.gate.pass(|| self.start(request)) else {
                            continue 'serve;
                        };
                        match started {
                            Started::Done(result) => ServerFrame::Response(Response { id, result }),
                            Started::Pending(future) => {
                                in_flight.push(future);
                                continue 'serve;
                            }
                            Started::Queued => {
                                link.loads_waiting += 1;
                                continue 'serve;
                            }
                        }
                    }
                }
            };
            if !link.write_burst(answer, &mut in_flight).await {
                return false;
            }
            // A client still taking answers is not idle, however long a
            // burst took to write.
            rearm(idle.as_mut(), idle_timeout);
        }
    }

    async fn frame_error(&self, link: &mut Link, err: FrameError) {
        match err {
            FrameError::Io(err) => {
                tracing::debug!(conn = self.conn, error = %err, "connection failed");
            }
            FrameError::TooLarge { .. } => {
                tracing::warn!(conn = self.conn, error = %err, "closing a connection that sent an oversized frame");
                link.close_with(ErrorCode::TooLarge, err.to_string()).await;
            }
            FrameError::Malformed(_) => {
                tracing::warn!(conn = self.conn, error = %err, "closing a connection that sent a malformed frame");
                link.close_with(ErrorCode::InvalidRequest, err.to_string())
                    .await;
            }
        }
    }
}

impl Link {
    /// Counts a frame taken from the driver's queue if it answers a load:
    /// every `Response` the driver queues does.
    fn count_answer(&mut self, frame: &ServerFrame) {
        if matches!(frame, ServerFrame::Response(_)) {
            self.loads_waiting = self.loads_waiting.saturating_sub(1);
        }
    }

    /// Writes `first` and every other answer already to hand (finished
    /// requests, frames from the driver), then flushes once. Returns
    /// whether the connection is still open.
    async fn write_burst(
        &mut self,
        first: ServerFrame,
        in_flight: &mut FuturesUnordered<BoxFuture<'static, ServerFrame>>,
    ) -> bool {
        let mut next = Some(first);
        let mut written = 0;
        while let Some(frame) = next {
            if let Written::Closed = self.write(frame).await {
                return false;
            }
            written += 1;
            if written == MAX_BURST {
                break;
            }
            // Polled without a waker of this task's; the select that follows
            // polls both again with one, so nothing that becomes ready
            // meanwhile is missed.
            next = in_flight.next().now_or_never().flatten().or_else(|| {
                let frame = self.queue.try_recv().ok()?;
                self.count_answer(&frame);
                Some(frame)
            });
        }
        self.flush().await
    }

    /// Queues one frame for the socket. A `Refused` frame is the last: it
    /// is flushed and the connection is closed.
    ///
    /// A frame too large to send is not treated as a broken connection.
    /// An answer is replaced by a `TooLarge` error to the same request, so
    /// every request is still answered exactly once; an event is logged
    /// and skipped.
    async fn write(&mut self, frame: ServerFrame) -> Written {
        let last = matches!(frame, ServerFrame::Refused(_));
        let answers = match &frame {
            ServerFrame::Response(response) => Some(response.id),
            _ => None,
        };
        match self.unless_killed(|transport| transport.feed(frame)).await {
            Some(Ok(())) => {}
            Some(Err(err @ FrameError::TooLarge { .. })) => {
                let Some(id) = answers else {
                    tracing::error!(error = %err, "dropped an outbound frame over the frame limit");
                    return Written::Open;
                };
                tracing::error!(error = %err, request = id, "an answer is over the frame limit");
                let refusal = ServerFrame::Response(Response {
                    id,
                    result: Err(Error::new(
                        ErrorCode::TooLarge,
                        format!("the answer is over the frame limit: {err}"),
                    )),
                });
                match self
                    .unless_killed(|transport| transport.feed(refusal))
                    .await
                {
                    Some(Ok(())) => {}
                    Some(Err(_)) | None => return Written::Closed,
                }
            }
            Some(Err(_)) | None => return Written::Closed,
        }
        if last {
            self.flush().await;
            return Written::Closed;
        }
        Written::Open
    }

    /// Sends what is queued; whether the connection is still open.
    async fn flush(&mut self) -> bool {
        matches!(
            self.unless_killed(|transport| transport.flush()).await,
            Some(Ok(()))
        )
    }

    /// Writes what the driver queued until it drops its sender.
    async fn write_the_rest(&mut self) {
        loop {
            let frame = tokio::select! {
                () = self.kill.cancelled() => return,
                frame = self.queue.recv() => frame,
            };
            let Some(frame) = frame else {
                break;
            };
            if let Written::Closed = self.write(frame).await {
                return;
            }
        }
        self.flush().await;
    }

    /// Runs a write on the socket, unless the connection is killed while
    /// the write waits for a client that does not read, or the daemon has
    /// been stopping for [`CLOSING_WRITES`]. The write is tried once before
    /// any waiter is registered, since it rarely has to wait.
    async fn unless_killed<'a, F>(
        &'a mut self,
        write: impl FnOnce(&'a mut Transport) -> F,
    ) -> Option<F::Output>
    where
        F: std::future::Future + 'a,
    {
        let mut write = std::pin::pin!(write(&mut self.transport));
        if let Some(done) = write.as_mut().now_or_never() {
            return Some(done);
        }
        let stopped_long_enough = async {
            self.stop.cancelled().await;
            tokio::time::sleep(CLOSING_WRITES).await;
        };
        tokio::select! {
            () = self.kill.cancelled() => None,
            () = stopped_long_enough => None,
            done = write => Some(done),
        }
    }

    /// Tells the client why the daemon is closing its connection.
    async fn close_with(&mut self, code: ErrorCode, message: impl Into<String>) {
        self.write(ServerFrame::Refused(Error::new(code, message)))
            .await;
    }
}

/// Moves the idle deadline to `timeout` from now; a zero timeout means no
/// idle limit, and the deadline is left alone.
fn rearm(idle: std::pin::Pin<&mut tokio::time::Sleep>, timeout: std::time::Duration) {
    if !timeout.is_zero()
        && let Some(deadline) = tokio::time::Instant::now().checked_add(timeout)
    {
        idle.reset(deadline);
    }
}

/// Reads and checks the `Hello`. On failure the client is told why and
/// `None` is returned.
async fn handshake(
    transport: &mut Transport,
    context: &Context,
    peer: &Peer,
    stop: &CancellationToken,
) -> Option<(SessionId, Role)> {
    let first = tokio::select! {
        () = stop.cancelled() => return None,
        first = tokio::time::timeout(context.limits.handshake_timeout, transport.next()) => first,
    };
    let hello = match first {
        Err(_) => {
            refuse(
                transport,
                ErrorCode::InvalidRequest,
                "no hello within the handshake timeout",
            )
            .await;
            return None;
        }
        Ok(None) => return None,
        Ok(Some(Ok(Incoming::Frame(ClientFrame::Hello(hello))))) => hello,
        Ok(Some(Ok(
            Incoming::Frame(ClientFrame::Request(_)) | Incoming::UnknownRequest { .. },
        ))) => {
            refuse(
                transport,
                ErrorCode::InvalidRequest,
                "the first frame must be a hello",
            )
            .await;
            return None;
        }
        Ok(Some(Err(FrameError::Io(_)))) => return None,
        Ok(Some(Err(err @ FrameError::TooLarge { .. }))) => {
            refuse(transport, ErrorCode::TooLarge, err.to_string()).await;
            return None;
        }
        Ok(Some(Err(err))) => {
            refuse(transport, ErrorCode::InvalidRequest, err.to_string()).await;
            return None;
        }
    };
    let Hello {
        protocol_version,
        session,
        role,
    } = hello;
    if protocol_version != PROTOCOL_VERSION {
        let code = ErrorCode::UnsupportedVersion {
            client: protocol_version,
            daemon: PROTOCOL_VERSION,
        };
        let message =
            format!("client speaks protocol {protocol_version}, daemon speaks {PROTOCOL_VERSION}");
        refuse(transport, code, message).await;
        return None;
    }
    if let Err(err) = check_name("job id", &session.job_id, context.limits.max_name) {
        refuse(transport, err.code, err.message).await;
        return None;
    }
    if let Err(why) = context.access.check(peer, role) {
        tracing::warn!(
            uid = peer.uid,
            gid = peer.gid,
            pid = ?peer.pid,
            ?role,
            %session,
            "refused a connection: {why}"
        );
        refuse(transport, ErrorCode::Forbidden, why).await;
        return None;
    }
    Some((session, role))
}

/// Sends `Refused` during the handshake, before the writer task exists.
async fn refuse(transport: &mut Transport, code: ErrorCode, message: impl Into<String>) {
    let _ = transport
        .send(ServerFrame::Refused(Error::new(code, message)))
        .await;
}
