//! One client connection: handshake, then requests until either side
//! closes.
//!
//! The reader decodes frames and starts each request; requests run
//! concurrently and answer in whatever order they finish, so a load waiting
//! in a queue never holds up a save behind it. A separate writer task drains
//! the connection's outbound queue, which the lease driver also feeds with
//! load answers and events. At most `limits.max_in_flight` saves and
//! releases are in flight; beyond that the reader stops reading, and the
//! kernel's socket buffer pushes back on the client.

use std::sync::Arc;

use futures::stream::{FuturesUnordered, StreamExt};
use futures::{SinkExt, future::BoxFuture};
use profiled_protocol::{
    ClientFrame, Error, ErrorCode, FrameCodec, FrameError, Hello, PROTOCOL_VERSION, Response, Role,
    ServerFrame, SessionId, Welcome,
};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use crate::access::{AccessPolicy, Peer};
use crate::config::LimitsConfig;
use crate::leases::{ConnId, ConnLink, Leases};
use crate::requests::{Started, check_name};
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

type Transport = Framed<UnixStream, FrameCodec<ClientFrame, ServerFrame>>;

/// Outbound frames queued beyond the in-flight requests, for events.
const EVENT_SLACK: usize = 1024;

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
    let (outbound, queue) = mpsc::channel(context.limits.max_in_flight + EVENT_SLACK);
    // `kill` drops the connection at once (the driver uses it on a client
    // that stopped reading, or whose session reconnected elsewhere);
    // `stop` lets it finish the requests in flight first.
    let kill = CancellationToken::new();
    let link = ConnLink {
        outbound: outbound.clone(),
        kill: kill.clone(),
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
    if transport.send(welcome).await.is_err() {
        context.leases.disconnect(conn);
        return;
    }
    tracing::debug!(conn, %session, "session connected");
    let (sink, frames) = transport.split();
    let writer = tokio::spawn(write_frames(sink, queue, kill.clone()));
    let session = Session {
        conn,
        session,
        role,
        context: Arc::clone(&context),
        outbound,
    };
    session.read_requests(frames, &kill, &stop).await;
    context.leases.disconnect(conn);
    // The writer ends once every sender is gone (ours just dropped with the
    // session; the driver drops its copy on disconnect) or on kill.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), writer).await;
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
    /// Feeds the writer task, which holds the receiver.
    outbound: mpsc::Sender<ServerFrame>,
}

impl Session {
    async fn read_requests(
        self,
        mut frames: futures::stream::SplitStream<Transport>,
        kill: &CancellationToken,
        stop: &CancellationToken,
    ) {
        let max_in_flight = self.context.limits.max_in_flight;
        let idle_timeout = self.context.limits.idle_timeout;
        let mut in_flight: FuturesUnordered<BoxFuture<'static, ServerFrame>> =
            FuturesUnordered::new();
        // The cancellation and idle futures are made once, not once per
        // request: each new one registers a waiter, which costs more than
        // the select itself on the save path.
        let killed = kill.cancelled();
        let stopping = stop.cancelled();
        let idle = tokio::time::sleep(idle_timeout);
        tokio::pin!(killed, stopping, idle);
        loop {
            tokio::select! {
                () = &mut killed => break,
                () = &mut idle, if !idle_timeout.is_zero() && in_flight.is_empty() => {
                    tracing::info!(conn = self.conn, ?idle_timeout, "closing an idle connection");
                    self.close_with(
                        ErrorCode::Timeout,
                        format!("no request for {}s", idle_timeout.as_secs_f64()),
                    )
                    .await;
                    break;
                }
                () = &mut stopping => {
                    // The daemon is stopping: read nothing more, but answer
                    // what is in flight, so a write that committed is
                    // acknowledged rather than left in doubt.
                    while let Some(frame) = in_flight.next().await {
                        if self.outbound.send(frame).await.is_err() {
                            break;
                        }
                    }
                    break;
                }
                Some(frame) = in_flight.next(), if !in_flight.is_empty() => {
                    if self.outbound.send(frame).await.is_err() {
                        break;
                    }
                }
                next = frames.next(), if in_flight.len() < max_in_flight => {
                    if !idle_timeout.is_zero()
                        && let Some(deadline) = tokio::time::Instant::now().checked_add(idle_timeout)
                    {
                        idle.as_mut().reset(deadline);
                    }
                    let request = match next {
                        None => break,
                        Some(Ok(ClientFrame::Request(request))) => request,
                        Some(Ok(ClientFrame::Hello(_))) => {
                            self.close_with(ErrorCode::InvalidRequest, "hello after the handshake").await;
                            break;
                        }
                        Some(Err(err)) => {
                            self.frame_error(err).await;
                            break;
                        }
                    };
                    let id = request.id;
                    match self.start(request) {
                        Started::Done(result) => {
                            let frame = ServerFrame::Response(Response { id, result });
                            if self.outbound.send(frame).await.is_err() {
                                break;
                            }
                        }
                        Started::Pending(future) => in_flight.push(future),
                        Started::Queued => {}
                    }
                }
            }
        }
    }

    async fn frame_error(&self, err: FrameError) {
        match err {
            FrameError::Io(err) => {
                tracing::debug!(conn = self.conn, error = %err, "connection failed");
            }
            FrameError::TooLarge { .. } => {
                tracing::warn!(conn = self.conn, error = %err, "closing a connection that sent an oversized frame");
                self.close_with(ErrorCode::TooLarge, err.to_string()).await;
            }
            FrameError::Malformed(_) => {
                tracing::warn!(conn = self.conn, error = %err, "closing a connection that sent a malformed frame");
                self.close_with(ErrorCode::InvalidRequest, err.to_string())
                    .await;
            }
        }
    }

    /// Tells the client why the daemon is closing its connection.
    async fn close_with(&self, code: ErrorCode, message: impl Into<String>) {
        let _ = self
            .outbound
            .send(ServerFrame::Refused(Error::new(code, message)))
            .await;
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
        Ok(Some(Ok(ClientFrame::Hello(hello)))) => hello,
        Ok(Some(Ok(ClientFrame::Request(_)))) => {
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

/// Writes queued frames, flushing once per burst rather than per frame.
/// A `Refused` frame is the last: once it is flushed the connection is
/// closed, through `kill`, so the reader stops too.
async fn write_frames(
    mut sink: futures::stream::SplitSink<Transport, ServerFrame>,
    mut queue: mpsc::Receiver<ServerFrame>,
    kill: CancellationToken,
) {
    let killed = kill.cancelled();
    tokio::pin!(killed);
    'bursts: loop {
        let frame = tokio::select! {
            () = &mut killed => break,
            frame = queue.recv() => frame,
        };
        let mut next = frame;
        while let Some(frame) = next.take() {
            let last = matches!(frame, ServerFrame::Refused(_));
            if feed(&mut sink, frame).await.is_err() {
                break 'bursts;
            }
            if last {
                let _ = sink.flush().await;
                kill.cancel();
                break 'bursts;
            }
            next = queue.try_recv().ok();
        }
        if sink.flush().await.is_err() {
            break;
        }
        if queue.is_closed() && queue.is_empty() {
            break;
        }
    }
    let _ = sink.close().await;
}

/// Queues one frame on the sink. A frame too large to send (a profile that
/// grew past `max_frame` under an older limit) is logged and skipped, not
/// treated as a broken connection.
async fn feed(
    sink: &mut futures::stream::SplitSink<Transport, ServerFrame>,
    frame: ServerFrame,
) -> Result<(), FrameError> {
    match sink.feed(frame).await {
        Err(err @ FrameError::TooLarge { .. }) => {
            tracing::error!(error = %err, "dropped an outbound frame over the frame limit");
            Ok(())
        }
        other => other,
    }
}
