//! Opening connections: the handshake, and the supervisor task that
//! reconnects with the same session when a connection drops.
//!
//! The supervisor owns the lifecycle of the client's link. It waits for the
//! live connection's tasks to stop; if that was not [`Client::close`]
//! (or the last handle going away), it dials the same socket again with the
//! same [`SessionId`], backing off exponentially with jitter, until a
//! handshake succeeds or `reconnect_for` has passed. The daemon keeps a
//! dropped session's leases for its resume grace, so a reconnect within it
//! gets them back with the same epochs; [`Shared::resume`] matches them
//! with the profiles' routes.
//!
//! [`Client::close`]: crate::Client::close

use std::hash::{BuildHasher, RandomState};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use profiled_protocol::{
    ClientFrame, ErrorCode, FrameCodec, FromDaemon, Hello, PROTOCOL_VERSION, ServerFrame,
    SessionId, Welcome, encode_frame_into,
};
use tokio::net::UnixStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::codec::{BytesCodec, FramedRead, FramedWrite};
use tokio_util::sync::CancellationToken;

use crate::connection::{self, Conn, Ended, FrameReader, FrameWriter, Shared};
use crate::outbox::Outbox;
use crate::{ClientError, ConnectOptions};

/// How many bytes of encoded frames may wait for the socket. Callers wait
/// for room beyond this, which bounds the memory queued behind a slow
/// socket.
const WRITE_BUFFER: usize = 1 << 20;

/// The pause before the second reconnect attempt; the first is immediate.
const FIRST_BACKOFF: Duration = Duration::from_millis(10);

/// The longest pause between reconnect attempts, so a daemon that comes
/// back is found within about a second.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Where and how to connect, kept for reconnecting.
#[derive(Debug)]
pub(crate) struct Dialer {
    /// The daemon's socket.
    pub(crate) path: PathBuf,
    /// The session every connection is opened for, so a reconnect resumes
    /// its leases.
    pub(crate) session: SessionId,
    /// The caller's options.
    pub(crate) options: ConnectOptions,
}

/// A handshake that succeeded, before its tasks are started.
pub(crate) struct Handshake {
    /// The read half, positioned after the welcome.
    reader: FrameReader,
    /// The write half.
    writer: FrameWriter,
    /// The daemon's answer.
    pub(crate) welcome: Welcome,
}

/// The tasks of one connection.
pub(crate) struct Running {
    /// Runs [`connection::read_frames`], which returns the refusal that
    /// ended the connection, if any.
    reader: JoinHandle<Option<profiled_protocol::Error>>,
    /// Runs [`Outbox::write_until_closed`].
    writer: JoinHandle<()>,
}

impl Dialer {
    /// Connects and completes the handshake once.
    pub(crate) async fn handshake(&self) -> Result<Handshake, ClientError> {
        let max_frame = self.options.max_frame;
        let stream = UnixStream::connect(&self.path).await?;
        let (read_half, write_half) = stream.into_split();
        let mut reader = FramedRead::new(
            read_half,
            FrameCodec::<FromDaemon, ClientFrame>::new(max_frame),
        );
        let mut writer = FramedWrite::new(write_half, BytesCodec::new());

        let hello = ClientFrame::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            session: self.session.clone(),
            role: self.options.role,
        });
        writer.send(encode(&hello, max_frame)?).await?;
        let welcome = match reader.next().await {
            Some(Ok(FromDaemon::Frame(ServerFrame::Welcome(welcome)))) => welcome,
            Some(Ok(FromDaemon::Frame(ServerFrame::Refused(err)))) => {
                return Err(ClientError::Refused(err));
            }
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
        Ok(Handshake {
            reader,
            writer,
            welcome,
        })
    }

    /// Dials until a handshake succeeds, the client closes, the daemon
    /// refuses, or `reconnect_for` passes.
    ///
    /// The first attempt is immediate, since a daemon that took the session
    /// over or restarted quickly is there at once. A refusal ends the
    /// attempts, except two that pass: [`ErrorCode::ShuttingDown`], since a
    /// daemon on its way out is followed by one that accepts, and
    /// [`ErrorCode::TooLarge`], which before the handshake means the daemon
    /// is at its connection limit.
    async fn reconnect(&self, closing: &CancellationToken) -> Result<Handshake, Ended> {
        if self.options.reconnect_for.is_zero() {
            return Err(Ended::GaveUp);
        }
        let until = Instant::now() + self.options.reconnect_for;
        let mut backoff = FIRST_BACKOFF;
        loop {
            let attempt = tokio::select! {
                biased;
                () = closing.cancelled() => return Err(Ended::Closed),
                attempt = tokio::time::timeout_at(until, self.handshake()) => attempt,
            };
            match attempt {
                Ok(Ok(handshake)) => return Ok(handshake),
                Ok(Err(ClientError::Refused(err)))
                    if !matches!(err.code, ErrorCode::ShuttingDown | ErrorCode::TooLarge) =>
                {
                    tracing::warn!(%err, "the daemon refused the reconnect");
                    return Err(Ended::Refused(err));
                }
                Ok(Err(ClientError::Protocol(message))) => {
                    tracing::warn!(message, "the daemon broke the protocol on reconnect");
                    return Err(Ended::Protocol(message));
                }
                Ok(Err(err)) => tracing::debug!(%err, "reconnect attempt failed"),
                Err(_) => break,
            }
            let pause = jittered(backoff);
            tokio::select! {
                biased;
                () = closing.cancelled() => return Err(Ended::Closed),
                () = tokio::time::sleep_until(until.min(Instant::now() + pause)) => {}
            }
            if Instant::now() >= until {
                break;
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        tracing::warn!(
            limit = ?self.options.reconnect_for,
            "giving up reconnecting to the daemon"
        );
        Err(Ended::GaveUp)
    }
}

impl Running {
    /// Starts the tasks of a connection just welcomed, as `generation`, and
    /// makes it the live one.
    pub(crate) fn start(
        handshake: Handshake,
        generation: u64,
        max_frame: u32,
        shared: &Arc<Shared>,
        closing: &CancellationToken,
    ) -> Self {
        let Handshake {
            reader,
            writer,
            welcome,
        } = handshake;
        // A child token: closing the client stops this connection, but this
        // connection failing leaves the client to reconnect.
        let cancel = closing.child_token();
        let outbox = Arc::new(Outbox::new(writer.into_inner(), WRITE_BUFFER));
        let conn = Conn {
            generation,
            outbox: Arc::clone(&outbox),
            max_frame: max_frame.min(welcome.max_frame),
        };
        // The routes are settled before the reader can deliver events from
        // the new connection.
        shared.resume(conn, welcome);
        Self {
            reader: tokio::spawn(connection::read_frames(
                reader,
                Arc::clone(shared),
                generation,
                cancel.clone(),
            )),
            writer: tokio::spawn(async move { outbox.write_until_closed(cancel).await }),
        }
    }

    /// Waits for both tasks to stop, and returns the refusal that ended the
    /// connection, if the daemon sent one.
    async fn stopped(self) -> Option<profiled_protocol::Error> {
        // Neither task panics, and a task cancelled by a runtime shutting
        // down has nothing left to wait for.
        let _ = self.writer.await;
        self.reader.await.ok().flatten()
    }
}

/// Keeps the link up until the client closes or reconnecting fails, then
/// ends it. `running` is connection 1, already started.
pub(crate) async fn supervise(
    dialer: Dialer,
    shared: Arc<Shared>,
    closing: CancellationToken,
    mut running: Running,
) {
    let mut generation = 1;
    loop {
        let refusal = running.stopped().await;
        if closing.is_cancelled() {
            break;
        }
        if let Some(err) = refusal {
            shared.end(Ended::Refused(err));
            return;
        }
        tracing::info!("the connection to the daemon dropped; reconnecting");
        match dialer.reconnect(&closing).await {
            Ok(handshake) => {
                generation += 1;
                tracing::info!(
                    generation,
                    connection_id = handshake.welcome.connection_id,
                    leases = handshake.welcome.leases.len(),
                    "reconnected to the daemon"
                );
                running = Running::start(
                    handshake,
                    generation,
                    dialer.options.max_frame,
                    &shared,
                    &closing,
                );
            }
            Err(why) => {
                shared.end(why);
                return;
            }
        }
    }
    shared.end(Ended::Closed);
}

/// Encodes one frame, prefix included, held to `max_frame`.
pub(crate) fn encode(frame: &ClientFrame, max_frame: u32) -> Result<Bytes, ClientError> {
    let mut buf = BytesMut::new();
    encode_frame_into(frame, &mut buf, max_frame)?;
    Ok(buf.freeze())
}

/// A pause between half of `backoff` and all of it, so clients that lost
/// the daemon together do not all come back in the same instant.
fn jittered(backoff: Duration) -> Duration {
    let half = backoff / 2;
    // Each `RandomState` is seeded afresh, which is randomness enough for
    // spreading retries.
    let random = RandomState::new().hash_one(backoff);
    let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
    half + Duration::from_nanos(random % nanos.saturating_add(1))
}

/// A frame's kind, for errors; the frame itself may be large.
fn frame_name(frame: &FromDaemon) -> String {
    match frame {
        FromDaemon::Frame(ServerFrame::Welcome(_)) => "a welcome".into(),
        FromDaemon::Frame(ServerFrame::Refused(_)) => "a refusal".into(),
        FromDaemon::Frame(ServerFrame::Response(_)) => "a response".into(),
        FromDaemon::Frame(ServerFrame::Event(_)) => "an event".into(),
        FromDaemon::UnknownReply { kind, .. } => format!("a response of reply kind {kind}"),
        FromDaemon::UnknownEvent { kind } => format!("an event of kind {kind}"),
        FromDaemon::UnknownFrame { kind } => format!("a frame of kind {kind}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jittered_pauses_stay_between_half_and_all_of_the_backoff() {
        for backoff in [Duration::ZERO, FIRST_BACKOFF, MAX_BACKOFF] {
            for _ in 0..100 {
                let pause = jittered(backoff);
                assert!(pause >= backoff / 2 && pause <= backoff, "{pause:?}");
            }
        }
    }
}
