//! The write side of one connection, shared by every caller and one writer
//! task.
//!
//! A caller whose frame finds nothing waiting writes it to the socket
//! itself, without blocking (`try_write`), so a lone request reaches the
//! daemon without waking another task. Whatever the socket does not take at
//! once is appended to a buffer that the writer task drains as the socket
//! becomes writable; while anything is buffered, later frames are appended
//! behind it, never written ahead of it, so frames leave in the order they
//! were accepted and are never interleaved. Concurrent callers under load
//! thus share the writer's system calls, as they did when every frame went
//! through it.
//!
//! The buffer is bounded: a caller waits for room once `limit` bytes are
//! waiting (so it holds at most `limit` plus one frame), which is how a
//! daemon that stops reading pushes back on the game.

use std::io;
use std::sync::{Mutex, MutexGuard, PoisonError};

use bytes::{Buf, BytesMut};
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// One connection's outgoing bytes. Callers hold it through
/// [`Conn`](crate::connection::Conn); the writer task started by
/// [`Outbox::write_until_closed`] drains it.
#[derive(Debug)]
pub(crate) struct Outbox {
    /// Held only for a non-blocking write or a buffer change, never across
    /// an await.
    state: Mutex<State>,
    /// Wakes the writer task when bytes are buffered.
    buffered: Notify,
    /// Wakes callers waiting for room when the writer drained the buffer.
    room: Notify,
    /// The most bytes buffered before callers wait.
    limit: usize,
}

/// The frame could not be sent: the connection's writing has ended.
#[derive(Debug)]
pub(crate) struct Closed;

#[derive(Debug)]
struct State {
    /// The socket, while it is usable: `Some` unless the writer task has
    /// taken it to wait for writability (only ever while bytes are
    /// buffered) or writing has ended.
    socket: Option<OwnedWriteHalf>,
    /// Bytes accepted and not yet written, oldest first.
    buffer: BytesMut,
    /// Set once writing ended; every send fails from then on.
    closed: bool,
}

impl Outbox {
    /// An outbox writing to `socket`, buffering up to `limit` bytes.
    pub(crate) fn new(socket: OwnedWriteHalf, limit: usize) -> Self {
        Self::with(Some(socket), limit)
    }

    /// An outbox whose writing has already ended, for tests of the routing
    /// tables.
    #[cfg(test)]
    pub(crate) fn closed() -> Self {
        let outbox = Self::with(None, 0);
        outbox.lock().closed = true;
        outbox
    }

    fn with(socket: Option<OwnedWriteHalf>, limit: usize) -> Self {
        Self {
            state: Mutex::new(State {
                socket,
                buffer: BytesMut::new(),
                closed: false,
            }),
            buffered: Notify::new(),
            room: Notify::new(),
            limit,
        }
    }

    /// Sends one encoded frame, waiting for room if the buffer is full.
    /// Once this returns `Ok`, the frame is written or buffered in order;
    /// if the call is dropped while waiting, nothing of it was sent.
    pub(crate) async fn send(&self, frame: &[u8]) -> Result<(), Closed> {
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            // Registered before the check, so a drain in between is not
            // missed.
            room.as_mut().enable();
            if self.try_send(frame)? {
                return Ok(());
            }
            room.await;
        }
    }

    /// Sends one encoded frame if there is room for it; `Ok(false)` if the
    /// buffer is full.
    pub(crate) fn try_send(&self, frame: &[u8]) -> Result<bool, Closed> {
        let mut state = self.lock();
        if state.closed {
            return Err(Closed);
        }
        if !state.buffer.is_empty() {
            if state.buffer.len() >= self.limit {
                return Ok(false);
            }
            state.buffer.extend_from_slice(frame);
            // The writer task was woken when the buffer filled; it drains
            // what was added since in the same pass.
            return Ok(true);
        }
        // Nothing is waiting, so the socket is here and the frame may go
        // straight to it.
        let written = match &state.socket {
            Some(socket) => match socket.try_write(frame) {
                Ok(written) => written,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => 0,
                Err(err) => {
                    tracing::warn!(%err, "closing the connection after a write failure");
                    close(&mut state);
                    drop(state);
                    self.room.notify_waiters();
                    // The writer task finds the socket gone and ends the
                    // connection, so the reader stops and the client
                    // reconnects.
                    self.buffered.notify_one();
                    return Err(Closed);
                }
            },
            None => 0,
        };
        if let Some(rest) = frame.get(written..)
            && !rest.is_empty()
        {
            state.buffer.extend_from_slice(rest);
            drop(state);
            self.buffered.notify_one();
        }
        Ok(true)
    }

    /// The writer task: drains the buffer as the socket takes it, until
    /// `cancel` is cancelled or a write fails; then ends writing, which
    /// shuts the socket down for writing (the daemon reads EOF), and
    /// cancels `cancel` so the reader stops too.
    pub(crate) async fn write_until_closed(&self, cancel: CancellationToken) {
        tokio::select! {
            biased;
            () = cancel.cancelled() => {}
            result = self.drain() => {
                if let Err(err) = result {
                    tracing::warn!(%err, "closing the connection after a write failure");
                }
            }
        }
        close(&mut self.lock());
        self.room.notify_waiters();
        cancel.cancel();
    }

    /// Writes buffered bytes for as long as there are any to write.
    async fn drain(&self) -> io::Result<()> {
        loop {
            self.buffered.notified().await;
            loop {
                let waiting = {
                    let mut state = self.lock();
                    let State { socket, buffer, .. } = &mut *state;
                    let Some(socket) = socket.as_ref() else {
                        // Writing ended.
                        return Ok(());
                    };
                    match socket.try_write(buffer) {
                        Ok(written) => buffer.advance(written),
                        Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                        Err(err) => return Err(err),
                    }
                    if buffer.len() < self.limit {
                        self.room.notify_waiters();
                    }
                    if buffer.is_empty() {
                        break;
                    }
                    // Taken out to wait for writability without the lock;
                    // callers meanwhile see a non-empty buffer and only
                    // append to it.
                    state.socket.take()
                };
                let Some(socket) = waiting else {
                    return Ok(());
                };
                let ready = socket.writable().await;
                let mut state = self.lock();
                if state.closed {
                    return Ok(());
                }
                state.socket = Some(socket);
                drop(state);
                ready?;
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Ends writing: drops the socket's write half, which shuts it down for
/// writing, and whatever was still buffered.
fn close(state: &mut State) {
    state.closed = true;
    state.socket = None;
    state.buffer.clear();
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;
    use tokio::net::UnixStream;

    use super::*;

    /// A frame sent while an earlier one is still buffered goes behind it,
    /// even when the socket has room again before the writer task runs.
    #[tokio::test(flavor = "current_thread")]
    async fn a_frame_never_overtakes_a_buffered_one() {
        let (ours, theirs) = UnixStream::pair().expect("socket pair");
        let (_read, write) = ours.into_split();
        let outbox = std::sync::Arc::new(Outbox::new(write, 64 << 20));
        let cancel = CancellationToken::new();
        // On this single-threaded runtime the writer task runs only when the
        // test awaits something that is not ready.
        let writer = tokio::spawn({
            let outbox = std::sync::Arc::clone(&outbox);
            let cancel = cancel.clone();
            async move { outbox.write_until_closed(cancel).await }
        });
        let first = vec![1u8; 8 << 20];
        outbox.send(&first).await.expect("send the first frame");
        assert!(
            !outbox.lock().buffer.is_empty(),
            "the socket took 8 MiB at once; the test needs a smaller socket buffer"
        );
        // Room in the socket again, made by a plain blocking read, which
        // does not let the writer task run.
        let theirs = theirs.into_std().expect("std socket");
        theirs.set_nonblocking(false).expect("blocking");
        let mut chunk = vec![0u8; 64 << 10];
        let made_room = std::io::Read::read(&mut &theirs, &mut chunk).expect("read");
        assert!(made_room > 0);
        outbox
            .send(&[2u8; 16])
            .await
            .expect("send the second frame");
        theirs.set_nonblocking(true).expect("non-blocking");
        let mut theirs = UnixStream::from_std(theirs).expect("tokio socket");
        let mut received = chunk[..made_room].to_vec();
        while received.len() < first.len() + 16 {
            let n = theirs.read(&mut chunk).await.expect("read");
            assert!(n > 0, "the connection ended early");
            received.extend_from_slice(&chunk[..n]);
        }
        let mut expected = first;
        expected.extend_from_slice(&[2u8; 16]);
        assert!(received == expected, "the second frame overtook the first");
        cancel.cancel();
        writer.await.expect("writer");
    }

    /// Frames sent by many callers, far more than the socket buffer holds
    /// while nobody reads, arrive whole and each caller's in its order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_arrive_whole_and_in_order_past_a_full_socket() {
        let (ours, theirs) = UnixStream::pair().expect("socket pair");
        let (_read, write) = ours.into_split();
        let outbox = std::sync::Arc::new(Outbox::new(write, 64 * 1024));
        let cancel = CancellationToken::new();
        let writer = tokio::spawn({
            let outbox = std::sync::Arc::clone(&outbox);
            let cancel = cancel.clone();
            async move { outbox.write_until_closed(cancel).await }
        });
        const CALLERS: u8 = 8;
        const FRAMES: u32 = 2_000;
        const SIZE: usize = 1_000;
        let callers: Vec<_> = (0..CALLERS)
            .map(|caller| {
                let outbox = std::sync::Arc::clone(&outbox);
                tokio::spawn(async move {
                    for n in 0..FRAMES {
                        let mut frame = vec![caller; SIZE];
                        frame[1..5].copy_from_slice(&n.to_le_bytes());
                        outbox.send(&frame).await.expect("send");
                    }
                })
            })
            .collect();
        // Let the socket fill before anything is read.
        tokio::task::yield_now().await;
        let mut theirs = theirs;
        let mut next = [0u32; CALLERS as usize];
        let mut frame = vec![0u8; SIZE];
        for _ in 0..u32::from(CALLERS) * FRAMES {
            theirs.read_exact(&mut frame).await.expect("read a frame");
            let caller = frame[0];
            assert!(
                frame[5..].iter().all(|byte| *byte == caller),
                "a frame was interleaved with another"
            );
            let n = u32::from_le_bytes(frame[1..5].try_into().expect("four bytes"));
            assert_eq!(n, next[usize::from(caller)], "caller {caller} out of order");
            next[usize::from(caller)] += 1;
        }
        for caller in callers {
            caller.await.expect("caller");
        }
        cancel.cancel();
        writer.await.expect("writer");
        // Writing ended: the peer reads EOF, and sends fail.
        assert_eq!(theirs.read(&mut frame).await.expect("read EOF"), 0);
        assert!(outbox.send(b"late").await.is_err());
    }
}
