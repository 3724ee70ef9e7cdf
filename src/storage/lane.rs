//! The way every write reaches the [`Committer`], in the order submitted.
//!
//! The committer thread takes operations off a channel and commits them in
//! batches ([`Lane::run`]). A save submitted while the thread has nothing
//! to do is committed by its caller instead, on the caller's own task
//! ([`Lane::save`]), sparing two thread wakes: the committer's, and the
//! caller's for the answer. With `storage.sync` on, the caller also syncs
//! the WAL, as the committer thread does for a batch with nothing behind
//! it, so it holds its runtime worker for that disk round trip; the rules
//! under **Idle** keep that to saves that come one at a time. Only saves
//! are committed inline: grants and releases come from the lease driver,
//! one task, which would then wait out each write itself.
//!
//! **Order.** `queued` counts the operations sent to the thread and not yet
//! done. A sender counts its operation before sending it; the thread
//! uncounts a batch only once it is committed, holding the committer's
//! lock. A caller commits inline only while it holds that lock and `queued`
//! is zero: then no operation submitted before it is in the channel, or
//! taken off it and not yet committed, so an inline save never passes an
//! earlier write.
//!
//! **Failure.** An inline save whose write fails is answered as failed, as
//! a batch would be; one whose sync fails is left in doubt, as a batch
//! would be. Its caller records the failure, which stops inline commits,
//! and wakes the thread ([`Op::Wake`]); the thread takes the committer out
//! of the lane and reopens the database, or stops, as after any failure
//! ([`super::recovery`]); after a reopen it puts a new committer in, and
//! inline commits resume.
//!
//! **Stalls.** An inline save does not wait out a RocksDB write stall:
//! RocksDB refuses it at once, unapplied, and it goes to the thread, which
//! waits. An inline save still does what any write does on the runtime
//! worker: the point reads of a cache miss, and the WAL's `write(2)`.
//!
//! **Idle.** Under load the queue empties for moments between batches; a
//! save committed inline then is a batch of one, and the thread waits on
//! the lock behind it. So a save is committed inline only once the lock
//! has been let go for [`IDLE_BEFORE_INLINE`] since the last batch or
//! inline attempt, and only if that batch held one operation and the last
//! WAL sync answered one: when a sync has just answered many writers, the
//! first of their next saves would otherwise take a sync of its own ahead
//! of the others, and each round of writers would need two.
//!
//! **One worker.** A synced inline save holds its runtime worker for a
//! disk round trip. Where that worker is the runtime's only one (a daemon
//! given a single core, or a current-thread runtime), no other connection
//! is read meanwhile, so the next save comes alone and syncs alone as
//! well: on one core, saves at W = 32 ran at 3,565/s with one sync each,
//! against 25,118/s with 0.07 syncs each on two workers
//! (docs/PERFORMANCE.md, eleventh round). So a save that syncs is
//! committed inline only where another worker keeps serving; buffered
//! saves, which hold the worker for no disk round trip, are not limited.
//!
//! **Close.** The thread takes the committer out of the lane when it
//! closes, so nothing is written after its final flush.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{RecvTimeoutError, Sender};
use std::sync::{Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::WriteError;
use super::commit::{self, Committer, Ended, Op, Outcome, Queue, Write};
use super::durable::{Failure, SyncWatch};

/// The committer, shared by its thread and by callers that commit inline.
#[derive(Debug)]
pub(super) struct Lane {
    /// Locked by the thread for each batch and by a caller for an inline
    /// save.
    state: Mutex<State>,
    /// Operations sent to the thread and not yet committed or refused;
    /// inline commits wait for zero (see the module docs).
    queued: AtomicUsize,
}

/// What the lock guards.
#[derive(Debug)]
pub(super) struct State {
    /// `None` while the thread reopens the database after a failure, and
    /// once it has closed.
    committer: Option<Committer>,
    /// The failure of an inline save's write, until the thread takes it
    /// to reopen the database. No save is committed inline meanwhile.
    failed: Option<String>,
    /// When the last batch or inline attempt let go of the lock.
    last_commit: Instant,
    /// How many operations the last batch held (1 for an inline save).
    last_batch: usize,
}

/// How long the committer thread waits for an operation, while the syncer
/// holds batches, before it looks again whether their sync failed.
const SYNC_POLL: Duration = Duration::from_millis(50);

/// How long the committer must have been idle before a save is committed
/// inline (see the module docs). Saves that one task makes back to back,
/// such as a connection's pipelined requests, come within a few µs of each
/// other and go to the thread, which gives them one batch and one sync; a
/// lone writer's next save comes a client's round trip later (no less than
/// about 20 µs on the machines measured, 100 µs on one whose idle CPUs
/// halt) and is committed inline. At 50 µs, the lone writer's saves went to
/// the thread on the faster machine (docs/PERFORMANCE.md).
const IDLE_BEFORE_INLINE: Duration = Duration::from_micros(10);

impl Lane {
    /// A lane for `committer`.
    pub(super) fn new(committer: Committer) -> Self {
        Self {
            state: Mutex::new(State {
                committer: Some(committer),
                failed: None,
                last_commit: Instant::now(),
                last_batch: 0,
            }),
            queued: AtomicUsize::new(0),
        }
    }

    /// Sends `op` to the committer thread through `ops`.
    pub(super) fn submit(&self, ops: &Sender<Op>, op: Op) {
        self.queued.fetch_add(1, Ordering::SeqCst);
        // A send only fails once the committer has stopped; the op's reply
        // sender is then dropped and its caller sees `Closed`.
        let _ = ops.send(op);
    }

    /// Commits `write` inline if the committer is idle, or else sends it
    /// to the thread through `ops`. Returns where the answer will come.
    pub(super) fn save(
        &self,
        ops: &Sender<Op>,
        write: Write,
    ) -> oneshot::Receiver<Result<u64, WriteError>> {
        let state = match self.state.try_lock() {
            Ok(state) => Some(state),
            Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
            // The thread is committing a batch: queue behind it.
            Err(TryLockError::WouldBlock) => None,
        };
        if let Some(mut state) = state {
            match self.commit_inline(&mut state, &write) {
                Inline::Committed(answer) => return answer,
                Inline::Failed(answer) => {
                    drop(state);
                    self.submit(ops, Op::Wake);
                    return answer;
                }
                Inline::NotNow => {}
            }
        }
        let (reply, answer) = oneshot::channel();
        self.submit(ops, Op::Write { write, reply });
        answer
    }

    /// The committer thread: commits batches taken off `ops` until a
    /// `Close`, until every sender is gone, or until a write fails, its
    /// own or an inline save's. Says which, with the committer, taken out
    /// of the lane so that nothing commits inline until
    /// [`Lane::put`] puts a new one in.
    pub(super) fn run(&self, ops: &mut Queue) -> (Ended, Option<Committer>) {
        let (max_batch, watch) = match &self.lock().committer {
            Some(committer) => (committer.settings().max_batch, committer.sync_watch()),
            None => return (Ended::Closed, None),
        };
        let mut batch = Vec::with_capacity(max_batch);
        loop {
            let first = match &watch {
                Some(watch) => match next_op(ops, watch) {
                    Ok(first) => first,
                    Err(failure) => return (commit::ended(failure), self.take()),
                },
                None => ops.recv(),
            };
            let Some(first) = first else {
                return (Ended::Closed, self.take());
            };
            let mut guard = self.lock();
            let state = &mut *guard;
            if let Some(message) = state.failed.take() {
                // The reopen answers this operation, after the failure.
                ops.put_back(first);
                let committer = state.committer.take();
                let ended = match &committer {
                    Some(committer) => committer.failed(message),
                    None => Ended::Failed(message),
                };
                return (ended, committer);
            }
            let Some(committer) = state.committer.as_ref() else {
                // Only this thread takes the committer out, and it returns
                // when it does; should that change, leave the operation to
                // whoever reads the queue next.
                ops.put_back(first);
                return (Ended::Closed, None);
            };
            batch.push(first);
            while batch.len() < max_batch {
                match ops.try_recv() {
                    Some(op) => batch.push(op),
                    None => break,
                }
            }
            let taken = batch.len();
            let outcome = committer.commit(&mut batch, || !ops.is_empty());
            self.queued.fetch_sub(taken, Ordering::SeqCst);
            state.last_commit = Instant::now();
            state.last_batch = taken;
            match outcome {
                Outcome::Committed => {}
                Outcome::Close(reply, write_failure) => {
                    // Out of the lane before the flush, so that nothing is
                    // committed inline after it even if the flush panics.
                    let closing = state.committer.take();
                    let flushed = closing
                        .as_ref()
                        .map_or(Ok(()), |committer| committer.close(write_failure));
                    let _ = reply.send(flushed);
                    return (Ended::Closed, closing);
                }
                Outcome::WriteFailed(message) => {
                    let ended = committer.failed(message);
                    return (ended, state.committer.take());
                }
            }
        }
    }

    /// Puts the committer of a reopened database in; inline commits
    /// resume.
    pub(super) fn put(&self, committer: Committer) {
        let mut state = self.lock();
        state.committer = Some(committer);
        state.failed = None;
    }

    /// Refuses `op` with `err` while the committer is out of the lane, as
    /// [`commit::refuse`] does; returns a `Close`'s reply.
    pub(super) fn refuse(
        &self,
        op: Op,
        err: &WriteError,
    ) -> Option<oneshot::Sender<Result<(), String>>> {
        self.queued.fetch_sub(1, Ordering::SeqCst);
        commit::refuse(op, err)
    }

    /// Commits `write` on the caller's thread if the lane allows it now.
    fn commit_inline(&self, state: &mut State, write: &Write) -> Inline {
        if state.failed.is_some() || self.queued.load(Ordering::SeqCst) != 0 {
            return Inline::NotNow;
        }
        let Some(committer) = &state.committer else {
            return Inline::NotNow;
        };
        if committer.settings().sync && !other_workers_serve() {
            return Inline::NotNow;
        }
        let now = Instant::now();
        if now.saturating_duration_since(state.last_commit) < IDLE_BEFORE_INLINE
            || state.last_batch > 1
            || committer.last_sync_answered() > 1
        {
            return Inline::NotNow;
        }
        let (reply, answer) = oneshot::channel();
        // Cloned, so that a stalled save can still go to the thread. (The
        // batch consumes the write; giving it back unapplied would save
        // this copy of the data.)
        let committed = committer.commit_inline(write.clone(), reply);
        state.last_commit = Instant::now();
        state.last_batch = 1;
        let failure = match committed {
            Err(commit::Stalled) => return Inline::NotNow,
            Ok(Outcome::WriteFailed(message)) => Some(message),
            // The write went through, but its sync may have failed. (A lone
            // save holds no `Close`.)
            Ok(Outcome::Committed | Outcome::Close(..)) => committer.sync_failure(),
        };
        match failure {
            Some(message) => {
                state.failed = Some(message);
                Inline::Failed(answer)
            }
            None => Inline::Committed(answer),
        }
    }

    fn take(&self) -> Option<Committer> {
        self.lock().committer.take()
    }

    /// Holds the lock, as the thread does for a batch, so that saves made
    /// meanwhile go to the thread: for tests whose saves must not wait for
    /// a sync on the test's own thread.
    #[cfg(test)]
    pub(super) fn busy(&self) -> MutexGuard<'_, State> {
        self.lock()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What became of a save offered for an inline commit; the receivers get
/// its answer.
enum Inline {
    /// It was committed, or refused on its own (a lost lease).
    Committed(oneshot::Receiver<Result<u64, WriteError>>),
    /// Its write or its sync failed; the thread must be woken to reopen
    /// the database or stop.
    Failed(oneshot::Receiver<Result<u64, WriteError>>),
    /// It was not applied: it goes to the thread.
    NotNow,
}

/// Whether the calling thread may wait out a WAL sync while the rest of
/// the daemon carries on: true off any runtime, and on a runtime with
/// more than one worker (see **One worker** in the module docs).
fn other_workers_serve() -> bool {
    tokio::runtime::Handle::try_current()
        .map_or(true, |runtime| runtime.metrics().num_workers() > 1)
}

/// The next operation, or the failure recorded meanwhile. While the syncer
/// holds batches, the wait is cut into [`SYNC_POLL`] steps, so a sync that
/// fails while nothing arrives still ends the committer; once the syncer
/// is idle, any failure is already recorded, and the wait is plain.
fn next_op(ops: &mut Queue, syncer: &SyncWatch) -> Result<Option<Op>, Failure> {
    loop {
        let idle = syncer.is_idle();
        if let Some(failure) = syncer.failure() {
            return Err(failure);
        }
        if idle {
            return Ok(ops.recv());
        }
        match ops.recv_timeout(SYNC_POLL) {
            Ok(op) => return Ok(Some(op)),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Instant;

    use futures::FutureExt;
    use profiled_protocol::Changes;

    use super::*;
    use crate::ProfileKey;
    use crate::config::{HistoryConfig, StorageConfig};
    use crate::storage::tests::{grant_epoch, save_as_a, session};
    use crate::storage::{Storage, durable};

    /// Opens a buffered (`sync = false`) storage at `path`.
    fn buffered(path: &Path) -> Storage {
        open(path, false)
    }

    /// Opens a storage at `path` that syncs (`storage.sync`) if `sync`.
    fn open(path: &Path, sync: bool) -> Storage {
        let config = StorageConfig {
            path: path.to_owned(),
            sync,
            ..StorageConfig::default()
        };
        Storage::open(&config, &HistoryConfig::default())
            .expect("open")
            .0
    }

    /// Waits until a save would be committed inline: the committer thread
    /// answers a batch's operations before it lets go of the lock and the
    /// count, so a caller woken by an answer may find it still busy, and
    /// it must then have been idle for [`IDLE_BEFORE_INLINE`] after a batch
    /// of one. (Every batch and sync in these tests holds one operation.)
    async fn idle(storage: &Storage) {
        let lane = &storage.shared.lane;
        let until = Instant::now() + Duration::from_secs(20);
        let idle = || {
            lane.queued.load(Ordering::SeqCst) == 0
                && lane.state.try_lock().is_ok_and(|state| {
                    state.last_commit.elapsed() >= IDLE_BEFORE_INLINE && state.last_batch <= 1
                })
        };
        while !idle() {
            assert!(Instant::now() < until, "the committer never went idle");
            tokio::task::yield_now().await;
        }
    }

    /// A save of `data` by session `a`.
    fn save_by_a(key: &ProfileKey, epoch: u64, data: &[u8]) -> commit::Write {
        commit::Write {
            key: key.clone(),
            owner: session("a"),
            epoch,
            data: Some(data.to_vec()),
            changes: Changes::default(),
            release: false,
        }
    }

    #[tokio::test]
    async fn a_buffered_save_is_committed_before_save_returns_unless_the_committer_is_busy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = buffered(&dir.path().join("db"));
        let key = ProfileKey::new("s", "k");
        assert_eq!(grant_epoch(&storage, &key, "a").await, 1);
        idle(&storage).await;
        let inline = save_as_a(&storage, &key, b"one");
        assert_eq!(inline.now_or_never(), Some(Ok(1)), "answered on the spot");

        // With the committer busy (its lock held, as during a batch), the
        // save goes to the thread and is answered once the lock is free.
        let busy = storage.shared.lane.lock();
        let queued = save_as_a(&storage, &key, b"two");
        let mut queued = Box::pin(queued);
        assert_eq!((&mut queued).now_or_never(), None, "not committed inline");
        drop(busy);
        assert_eq!(queued.await, Ok(2));
        let view = storage.view(key, None).await.expect("view");
        assert_eq!(view.data.as_deref(), Some(&b"two"[..]));
        storage.close().await.expect("close");
    }

    /// A save right after a batch of several goes to the thread, however
    /// long the committer has been idle; once a batch of one has been
    /// committed, saves go inline again.
    #[tokio::test]
    async fn a_save_right_after_a_batch_of_several_goes_to_the_thread() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = buffered(&dir.path().join("db"));
        let key = ProfileKey::new("s", "k");
        assert_eq!(grant_epoch(&storage, &key, "a").await, 1);
        // Two saves queued while the lock is held are taken as one batch.
        let busy = storage.shared.lane.lock();
        let first = save_as_a(&storage, &key, b"one");
        let second = save_as_a(&storage, &key, b"two");
        drop(busy);
        assert_eq!((first.await, second.await), (Ok(1), Ok(2)));
        let lane = &storage.shared.lane;
        let after_batch = {
            // The thread answered from inside the batch, so this waits for
            // it to let go of the lock, with the batch recorded.
            let mut state = lane.lock();
            assert_eq!(state.last_batch, 2, "one batch of two");
            // Idle long enough that only the batch keeps it from going
            // inline.
            std::thread::sleep(IDLE_BEFORE_INLINE);
            let after_batch = save_by_a(&key, 1, b"three");
            assert!(
                matches!(lane.commit_inline(&mut state, &after_batch), Inline::NotNow),
                "a save right after a batch of several goes to the thread"
            );
            // The thread commits it as a batch of one.
            lane.save(&storage.shared.ops, after_batch)
        };
        assert_eq!(after_batch.await.expect("answered"), Ok(3));

        idle(&storage).await;
        let inline = save_as_a(&storage, &key, b"four");
        assert_eq!(inline.now_or_never(), Some(Ok(4)), "inline again");
        storage.close().await.expect("close");
    }

    /// The race the `queued` count closes: a release is queued (in the
    /// channel, or taken off it by the thread, which waits for the lock),
    /// and a save submitted after it gets the lock first. Committed inline, the save would
    /// land before the release, on a lease its owner had already ended.
    #[tokio::test]
    async fn an_inline_save_never_passes_a_write_submitted_before_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = buffered(&dir.path().join("db"));
        let key = ProfileKey::new("s", "k");
        let epoch = grant_epoch(&storage, &key, "a").await;
        let lane = Arc::clone(&storage.shared.lane);
        let late = save_by_a(&key, epoch, b"after the release");
        // Idle, so that only the count can keep the save from going inline.
        idle(&storage).await;
        let release = {
            let mut state = lane.lock();
            let release =
                storage.release(key.clone(), session("a"), epoch, None, Changes::default());
            assert!(
                matches!(lane.commit_inline(&mut state, &late), Inline::NotNow),
                "a save behind a queued release waits its turn"
            );
            release
        };
        assert_eq!(release.await, Ok(0));
        let answer = lane.save(&storage.shared.ops, late);
        assert_eq!(answer.await.expect("answered"), Err(WriteError::LeaseLost));
        let view = storage.view(key, None).await.expect("view");
        assert_eq!(view.data, None, "the late save changed nothing");
        storage.close().await.expect("close");
    }

    /// A save whose inline write RocksDB would stall goes to the thread,
    /// which commits it exactly once: at either durability it takes one
    /// version, and the save after it goes inline again. (Two workers, so
    /// that a synced save may go inline at all.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_inline_save_is_committed_once_by_the_thread() {
        for sync in [false, true] {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("db");
            let storage = open(&path, sync);
            let key = ProfileKey::new("s", "k");
            assert_eq!(grant_epoch(&storage, &key, "a").await, 1);
            idle(&storage).await;
            durable::faults::stall_inline_writes(&path, 1);
            let stalled = save_as_a(&storage, &key, b"one");
            assert_eq!(
                durable::faults::stalls_left(&path),
                0,
                "sync = {sync}: the save was tried inline"
            );
            assert_eq!(stalled.await, Ok(1), "sync = {sync}: committed once");
            idle(&storage).await;
            let inline = save_as_a(&storage, &key, b"two");
            if sync {
                assert_eq!(inline.await, Ok(2), "sync = {sync}");
            } else {
                assert_eq!(inline.now_or_never(), Some(Ok(2)), "inline again");
            }
            let view = storage.view(key, None).await.expect("view");
            assert_eq!((view.version, view.data.as_deref()), (2, Some(&b"two"[..])));
            storage.close().await.expect("close");
        }
    }

    /// An inline save whose write fails is answered as failed, and the
    /// thread is woken to reopen the database at once, without waiting for
    /// another write to find the failure.
    #[tokio::test]
    async fn a_failed_inline_save_wakes_the_committer_to_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let storage = buffered(&path);
        let key = ProfileKey::new("s", "k");
        assert_eq!(grant_epoch(&storage, &key, "a").await, 1);
        idle(&storage).await;
        durable::faults::refuse_writes(&path, 1);
        let failed = save_as_a(&storage, &key, b"lost");
        assert_eq!(
            failed.now_or_never(),
            Some(Err(WriteError::Storage(
                "an injected failed write".to_owned()
            ))),
            "answered inline, as failed"
        );
        let until = Instant::now() + Duration::from_secs(20);
        while storage.shared.db.times_taken() == 0 {
            assert!(
                Instant::now() < until,
                "the committer never reopened the database"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Saves carry on, committed inline again once the reopen is done.
        let until = Instant::now() + Duration::from_secs(20);
        loop {
            let saved = save_as_a(&storage, &key, b"kept");
            match saved.await {
                Ok(version) => {
                    assert_eq!(version, 1, "the failed save took no version");
                    break;
                }
                Err(WriteError::Storage(_)) => {
                    assert!(Instant::now() < until, "storage never recovered");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(err) => panic!("unexpected error while recovering: {err}"),
            }
        }
        // The thread may have batched the wake with a save; after a batch
        // of more than one, the next save goes to the thread too.
        let settled = save_as_a(&storage, &key, b"settled");
        assert_eq!(settled.await, Ok(2));
        idle(&storage).await;
        let inline = save_as_a(&storage, &key, b"again");
        assert_eq!(inline.now_or_never(), Some(Ok(3)), "inline again");
        let view = storage.view(key, None).await.expect("view");
        assert_eq!(view.data.as_deref(), Some(&b"again"[..]));
        storage.close().await.expect("close");
    }

    /// With `storage.sync` on, a save the idle committer would have synced
    /// by itself is written and synced on the caller's thread instead. If
    /// that sync fails, the save is in doubt like any batch whose sync
    /// failed: the thread is woken to reopen the database, and the save is
    /// answered by whether it survived, without waiting for another write.
    // Two workers: on one, a synced save is not committed inline (the
    // next test).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_synced_save_is_committed_inline_and_a_failed_sync_wakes_the_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let storage = open(&path, true);
        let key = ProfileKey::new("s", "k");
        let epoch = grant_epoch(&storage, &key, "a").await;
        idle(&storage).await;
        let syncs = storage.wal_syncs();
        let inline = storage.save(
            key.clone(),
            session("a"),
            epoch,
            b"one".to_vec(),
            Changes::default(),
        );
        assert_eq!(
            inline.now_or_never(),
            Some(Ok(1)),
            "written and synced on the spot"
        );
        assert_eq!(storage.wal_syncs(), syncs + 1, "with a sync of its own");

        idle(&storage).await;
        durable::faults::refuse_syncs(&path, 1);
        let in_doubt = storage.save(
            key.clone(),
            session("a"),
            epoch,
            b"two".to_vec(),
            Changes::default(),
        );
        let answer = tokio::time::timeout(Duration::from_secs(20), in_doubt)
            .await
            .expect("answered without another write");
        assert_eq!(answer, Ok(2), "in doubt, then found durable");
        assert!(
            storage.shared.db.times_taken() >= 1,
            "the database was reopened"
        );
        let view = storage.view(key, None).await.expect("view");
        assert_eq!(view.data.as_deref(), Some(&b"two"[..]));
        storage.close().await.expect("close");
    }

    /// On a runtime with one worker (as `#[tokio::test]` gives), a save
    /// that syncs goes to the thread, however idle the committer: its sync
    /// would stop every other task on the runtime.
    #[tokio::test]
    async fn a_synced_save_goes_to_the_thread_where_no_other_worker_serves() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = open(&dir.path().join("db"), true);
        let key = ProfileKey::new("s", "k");
        let epoch = grant_epoch(&storage, &key, "a").await;
        idle(&storage).await;
        let lane = &storage.shared.lane;
        let write = save_by_a(&key, epoch, b"one");
        {
            let mut state = lane.lock();
            assert!(
                matches!(lane.commit_inline(&mut state, &write), Inline::NotNow),
                "a synced save on the only worker goes to the thread"
            );
        }
        let answer = lane.save(&storage.shared.ops, write);
        assert_eq!(answer.await.expect("answered"), Ok(1));
        let view = storage.view(key, None).await.expect("view");
        assert_eq!(view.data.as_deref(), Some(&b"one"[..]));
        storage.close().await.expect("close");
    }

    #[tokio::test]
    async fn nothing_is_committed_inline_after_close() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let storage = buffered(&path);
        let key = ProfileKey::new("s", "k");
        assert_eq!(grant_epoch(&storage, &key, "a").await, 1);
        storage.close().await.expect("close");
        let late = save_as_a(&storage, &key, b"late");
        assert_eq!(late.await, Err(WriteError::Closed));
        drop(storage);
        let storage = buffered(&path);
        let view = storage.view(key, None).await.expect("view");
        assert_eq!(view.data, None, "the save after close was not written");
        storage.close().await.expect("close");
    }
}
