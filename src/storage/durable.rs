//! Answers held back until what they report is durable, and the syncer
//! thread that makes it so.
//!
//! With `storage.sync` on, the committer writes each batch to the WAL
//! without syncing and hands the batch's answers to the syncer, which syncs
//! the WAL and only then answers. One sync covers every batch written
//! before it began, so while the syncer waits on the disk the committer
//! already applies the next batch: the disk and the CPU work at the same
//! time, and a busy daemon makes one sync per disk round trip however many
//! batches arrive meanwhile.
//!
//! When the syncer is idle and no other write is waiting, the committer
//! syncs the batch itself instead ([`Syncer::sync_and_answer`]): there is
//! nothing to overlap with, and handing over would only add a thread hop to
//! a lone write's round trip.
//!
//! Refusals wait too: a later batch reads what earlier, not yet durable
//! batches wrote, so even a `LeaseLost` may rest on a grant that a crash
//! could still undo. Once a sync fails, every answer the syncer holds or
//! receives afterwards is *stranded*: written to the WAL but not known to be
//! durable. A batch's write that fails first is recorded the same way (RocksDB
//! refuses to sync after a failed write), and the committer stops at its
//! next batch. Stranded batches are not simply answered as failed, since the
//! WAL holds them and reopening the database replays them: after a failed
//! write, `recovery` answers them once a reopen has made durable what it
//! recovered, each by whether its sequence number was recovered
//! ([`Stranded`]); after a failed sync it answers them as in doubt.
//!
//! Reads that bypass the committer (views, version listings, exports) must
//! not show a write a crash could still take back either. Each sync
//! records how far it made the WAL durable ([`Progress::synced_up_to`]); a
//! read that saw past that asks the committer for a sync
//! ([`Answer::Durable`]) before it answers.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use profiled_protocol::Message;
use rocksdb::DB;
use tokio::sync::oneshot;

use super::{AdminDone, Granted, Sent, WriteError};

/// An answer held back until its batch is durable.
#[derive(Debug)]
pub(super) enum Answer {
    Granted(
        oneshot::Sender<Result<Granted, WriteError>>,
        Result<Granted, WriteError>,
    ),
    Version(
        oneshot::Sender<Result<u64, WriteError>>,
        Result<u64, WriteError>,
    ),
    Sent(
        oneshot::Sender<Result<Sent, WriteError>>,
        Result<Sent, WriteError>,
    ),
    Admin(
        oneshot::Sender<Result<AdminDone, WriteError>>,
        Result<AdminDone, WriteError>,
    ),
    Messages(
        oneshot::Sender<Result<Vec<Message>, WriteError>>,
        Result<Vec<Message>, WriteError>,
    ),
    /// Nothing but the news that every earlier write is durable.
    Durable(
        oneshot::Sender<Result<(), WriteError>>,
        Result<(), WriteError>,
    ),
}

/// How far the WAL is synced, shared by the committer, its syncer, and the
/// readers through [`super::Storage`]; it outlives reopens.
#[derive(Debug, Default)]
pub(super) struct Progress {
    /// WAL syncs made for acknowledgements, and for reads that asked for
    /// one; reported in stats.
    pub(super) syncs: AtomicU64,
    /// Every write numbered up to this one is in a synced WAL. Written by
    /// whichever thread synced; reset to 0 before a reopened database is
    /// handed to readers, since its numbers may run behind the old one's.
    /// Where each write syncs itself (no syncer thread), a write sets it
    /// to what was written before it, so a read of the latest write still
    /// asks for a sync.
    pub(super) synced_up_to: AtomicU64,
}

impl Progress {
    /// Records a successful WAL sync that covered every write numbered up
    /// to `reached`.
    pub(super) fn synced(&self, reached: u64) {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.synced_up_to.fetch_max(reached, Ordering::SeqCst);
    }
}

/// The first thing that failed, once something has.
#[derive(Clone, Debug)]
pub(super) struct Failure {
    /// The error.
    pub(super) message: String,
    /// Whether a WAL sync failed in the disk, here or in any failure
    /// recorded after this one. A failed sync means the disk failed a
    /// write it had accepted; a failed write (a full disk) is refused
    /// before its batch reaches the WAL, and a sync RocksDB refuses after
    /// it ("Writer has previous error") is only its consequence.
    pub(super) sync: bool,
}

/// Whether RocksDB's `message` reports an `fsync` or `fdatasync` that
/// failed in the operating system ("While fdatasync: <file>"), as opposed
/// to a write that failed or a sync refused after one.
pub(super) fn is_sync_failure(message: &str) -> bool {
    message.contains("While fdatasync") || message.contains("While fsync")
}

/// A written batch's answers, held from a failure until a reopen tells
/// whether the batch survived it.
#[derive(Debug)]
pub(super) struct Stranded {
    /// The database's sequence number once the batch was written: the
    /// batch survived if a reopen recovers at least this far.
    pub(super) seq: u64,
    pub(super) answers: Vec<Answer>,
}

/// The committer's handle on its syncer thread. Dropping it lets the
/// syncer answer what it holds, then joins it.
#[derive(Debug)]
pub(super) struct Syncer {
    /// Feeds the syncer thread, which holds the receiving end.
    queue: Option<Sender<Work>>,
    /// What the committer and the syncer thread both use.
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// The state the committer and the syncer thread share.
#[derive(Debug)]
struct Shared {
    db: Arc<DB>,
    /// The first failure, a sync's (set by whichever thread synced) or a
    /// batch's write (set by the committer); read by the committer before
    /// each batch. No sync is attempted after it.
    failed: Mutex<Option<Failure>>,
    /// Written batches whose answers wait for a reopen, after a failure.
    stranded: Mutex<Vec<Stranded>>,
    /// Counts WAL syncs and how far they reached; shared with
    /// [`super::Storage`] for stats and reads.
    progress: Arc<Progress>,
    /// Batches handed to the syncer thread and not yet answered. The
    /// committer syncs by itself only when this is zero, so it never
    /// answers a batch before an earlier one is durable.
    queued: AtomicUsize,
    /// How many answers the last sync sent: more than one means writers
    /// are sharing syncs, and a save should not take a sync of its own
    /// ([`super::lane`]).
    last_answered: AtomicUsize,
}

/// What the syncer is given.
#[derive(Debug)]
enum Work {
    /// A written batch's sequence number and answers.
    Answers(u64, Vec<Answer>),
    /// Signalled once everything queued before it is answered.
    Barrier(Sender<()>),
}

/// What the committer thread watches of its syncer while it waits for work,
/// without holding the committer, which inline writers may be using
/// ([`super::lane`]).
#[derive(Clone, Debug)]
pub(super) struct SyncWatch(Arc<Shared>);

impl Syncer {
    /// Starts the syncer thread for `db`.
    pub(super) fn start(db: Arc<DB>, progress: Arc<Progress>) -> std::io::Result<Self> {
        let (queue, work) = std::sync::mpsc::channel();
        let shared = Arc::new(Shared {
            db,
            failed: Mutex::new(None),
            stranded: Mutex::new(Vec::new()),
            progress,
            queued: AtomicUsize::new(0),
            last_answered: AtomicUsize::new(0),
        });
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("profiled-sync".to_owned())
            .spawn(move || run(&thread_shared, &work))?;
        Ok(Self {
            queue: Some(queue),
            shared,
            thread: Some(thread),
        })
    }

    /// Hands the answers of a batch written up to sequence number `seq`
    /// over, to be sent once the WAL holding the batch is synced.
    pub(super) fn answer_when_synced(&self, seq: u64, answers: Vec<Answer>) {
        self.shared.queued.fetch_add(1, Ordering::AcqRel);
        let unsent = match &self.queue {
            Some(queue) => queue.send(Work::Answers(seq, answers)).err(),
            None => None,
        };
        // The syncer only stops once this handle is dropped; should its
        // thread have died anyway, nothing it was given can be called
        // durable yet.
        if let Some(std::sync::mpsc::SendError(Work::Answers(seq, answers))) = unsent {
            self.shared.fail(Failure {
                message: "the WAL syncer stopped".to_owned(),
                sync: false,
            });
            self.shared.strand(seq, answers);
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Whether every batch handed over so far is answered, so that a sync
    /// made now on the caller's thread cannot answer a batch ahead of an
    /// earlier one.
    pub(super) fn is_idle(&self) -> bool {
        self.shared.queued.load(Ordering::Acquire) == 0
    }

    /// Syncs the WAL on the caller's thread, then answers: for a batch
    /// written while the syncer [`is_idle`](Self::is_idle), with no other
    /// write waiting to overlap the sync with.
    pub(super) fn sync_and_answer(&self, seq: u64, answers: Vec<Answer>) {
        self.shared
            .last_answered
            .store(answers.len(), Ordering::Relaxed);
        if self.shared.sync() {
            deliver(answers, None);
        } else {
            self.shared.strand(seq, answers);
        }
    }

    /// Waits until everything handed over so far is answered.
    pub(super) fn wait_for_answers(&self) {
        let (done, wait) = std::sync::mpsc::channel();
        if let Some(queue) = &self.queue
            && queue.send(Work::Barrier(done)).is_ok()
        {
            let _ = wait.recv();
        }
    }

    /// The first failure, if any.
    pub(super) fn failure(&self) -> Option<Failure> {
        self.shared.failure()
    }

    /// How many answers the last sync sent.
    pub(super) fn last_answered(&self) -> usize {
        self.shared.last_answered.load(Ordering::Relaxed)
    }

    /// A watch on this syncer for the committer thread.
    pub(super) fn watch(&self) -> SyncWatch {
        SyncWatch(Arc::clone(&self.shared))
    }

    /// Records that a batch's write failed, unless something failed
    /// before: no sync is attempted after it, and the batches still
    /// waiting are stranded.
    pub(super) fn write_failed(&self, message: &str) {
        self.shared.fail(Failure {
            message: message.to_owned(),
            sync: is_sync_failure(message),
        });
    }

    /// Takes the stranded batches, once everything handed over is answered
    /// or stranded, oldest first.
    pub(super) fn take_stranded(&self) -> Vec<Stranded> {
        self.wait_for_answers();
        std::mem::take(
            &mut *self
                .shared
                .stranded
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }
}

impl SyncWatch {
    /// As [`Syncer::is_idle`].
    pub(super) fn is_idle(&self) -> bool {
        self.0.queued.load(Ordering::Acquire) == 0
    }

    /// As [`Syncer::failure`].
    pub(super) fn failure(&self) -> Option<Failure> {
        self.0.failure()
    }
}

impl Shared {
    fn failure(&self) -> Option<Failure> {
        self.failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Records `failure` unless an earlier one is recorded; a failed sync
    /// marks the recorded failure as one, whichever came first.
    fn fail(&self, failure: Failure) {
        let mut failed = self.failed.lock().unwrap_or_else(PoisonError::into_inner);
        match &mut *failed {
            Some(first) => first.sync |= failure.sync,
            None => *failed = Some(failure),
        }
    }

    /// Holds a written batch's answers for the reopen to judge.
    fn strand(&self, seq: u64, answers: Vec<Answer>) {
        self.stranded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Stranded { seq, answers });
    }

    /// Syncs the WAL unless something already failed; whether what was
    /// written is now durable. A failure is recorded for the committer.
    fn sync(&self) -> bool {
        #[cfg(test)]
        faults::wait_while_held(self.db.path());
        if self.failure().is_some() {
            return false;
        }
        #[cfg(test)]
        if faults::syncs_refused(self.db.path()) {
            // As RocksDB refuses a sync after a batch's write failed.
            self.fail(Failure {
                message: "an injected failed write".to_owned(),
                sync: false,
            });
            return false;
        }
        // Read before the sync, so it counts only writes the sync covers.
        let reached = self.db.latest_sequence_number();
        match self.db.flush_wal(true) {
            Ok(()) => {
                self.progress.synced(reached);
                true
            }
            Err(err) => {
                let message = format!("syncing the WAL failed: {}", err.into_string());
                // Recorded before anything else, so a write failing behind
                // it finds it.
                self.fail(Failure {
                    message: message.clone(),
                    sync: is_sync_failure(&message),
                });
                tracing::error!(error = %message, "no write since the last sync is acknowledged");
                false
            }
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        // Closing the queue ends the thread once it has answered the rest.
        drop(self.queue.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Sends every answer, turning each success into `failure` if there is
/// one: a batch that is not durable acknowledges nothing.
pub(super) fn deliver(answers: Vec<Answer>, failure: Option<&WriteError>) {
    for answer in answers {
        match answer {
            Answer::Granted(reply, outcome) => {
                let _ = reply.send(fail_if(outcome, failure));
            }
            Answer::Version(reply, outcome) => {
                let _ = reply.send(fail_if(outcome, failure));
            }
            Answer::Sent(reply, outcome) => {
                let _ = reply.send(fail_if(outcome, failure));
            }
            Answer::Admin(reply, outcome) => {
                let _ = reply.send(fail_if(outcome, failure));
            }
            Answer::Messages(reply, outcome) => {
                let _ = reply.send(fail_if(outcome, failure));
            }
            Answer::Durable(reply, outcome) => {
                let _ = reply.send(fail_if(outcome, failure));
            }
        }
    }
}

/// Answers every batch in doubt with `err`: no reopen will tell whether it
/// survived, and the next start reads that from storage.
pub(super) fn answer_in_doubt(stranded: Vec<Stranded>, err: &WriteError) {
    for batch in stranded {
        deliver(batch.answers, Some(err));
    }
}

/// The syncer thread: takes everything queued, syncs once, answers it all.
fn run(shared: &Shared, work: &Receiver<Work>) {
    let mut taken = Vec::new();
    while let Ok(first) = work.recv() {
        taken.push(first);
        taken.extend(work.try_iter());
        let answering = taken
            .iter()
            .map(|item| match item {
                Work::Answers(_, answers) => answers.len(),
                Work::Barrier(_) => 0,
            })
            .sum();
        shared.last_answered.store(answering, Ordering::Relaxed);
        let synced = shared.sync();
        for item in taken.drain(..) {
            match item {
                Work::Answers(seq, answers) => {
                    if synced {
                        deliver(answers, None);
                    } else {
                        shared.strand(seq, answers);
                    }
                    shared.queued.fetch_sub(1, Ordering::AcqRel);
                }
                Work::Barrier(done) => {
                    let _ = done.send(());
                }
            }
        }
    }
}

/// The outcome to report once the batch's fate is known: a failed batch
/// turns every outcome into that failure, refusals too. A refusal may
/// rest on an earlier operation of the same batch (a release refused with
/// `LeaseLost` behind a steal that the failure undid), and a client takes
/// `LeaseLost` as final where it retries a storage error; the retry then
/// gets whatever refusal is still true.
fn fail_if<T>(
    outcome: Result<T, WriteError>,
    failure: Option<&WriteError>,
) -> Result<T, WriteError> {
    match failure {
        Some(err) => Err(err.clone()),
        None => outcome,
    }
}

/// Failed and slow syncs on demand, for tests of what follows one: the
/// disk's own failures cannot be had at will. A sync is refused as RocksDB
/// refuses it once a batch's write has failed, after the batch it covers
/// was written: the moment that leaves written batches in doubt. A sync
/// held back leaves written batches not yet durable for as long as a test
/// needs to look at them.
#[cfg(test)]
pub(super) mod faults {
    use std::path::{Path, PathBuf};
    use std::sync::{Condvar, Mutex, PoisonError};
    use std::time::Duration;

    /// Databases, by path, and how many of their next syncs are refused.
    static FAILING: Mutex<Vec<(PathBuf, usize)>> = Mutex::new(Vec::new());

    /// Databases whose syncs wait, by path, with how many syncs are waiting.
    static HELD: Mutex<Vec<(PathBuf, usize)>> = Mutex::new(Vec::new());
    /// Signalled whenever `HELD` changes.
    static HELD_CHANGED: Condvar = Condvar::new();

    /// Holds every WAL sync of the database at `path` back, before it
    /// starts, until [`release_syncs`].
    pub(in crate::storage) fn hold_syncs(path: &Path) {
        HELD.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((path.to_owned(), 0));
        HELD_CHANGED.notify_all();
    }

    /// How long a test waits for what a hook waits for before it fails,
    /// rather than hang the suite.
    const PATIENCE: Duration = Duration::from_secs(20);

    /// Blocks until a sync of the database at `path` is held back.
    pub(in crate::storage) fn wait_for_held_sync(path: &Path) {
        let held = HELD.lock().unwrap_or_else(PoisonError::into_inner);
        let (_held, waited) = HELD_CHANGED
            .wait_timeout_while(held, PATIENCE, |held| {
                !held.iter().any(|(at, waiting)| at == path && *waiting > 0)
            })
            .unwrap_or_else(PoisonError::into_inner);
        assert!(!waited.timed_out(), "no sync was held back");
    }

    /// Lets the syncs of the database at `path` go.
    pub(in crate::storage) fn release_syncs(path: &Path) {
        HELD.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|(at, _)| at != path);
        HELD_CHANGED.notify_all();
    }

    /// Reads of each database, by path, that found what they saw unsynced.
    static UNSYNCED_READS: Mutex<Vec<(PathBuf, usize)>> = Mutex::new(Vec::new());

    /// Counts a read of the database at `path` that must wait for a sync.
    pub(in crate::storage) fn read_waits(path: &Path) {
        let mut reads = UNSYNCED_READS
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match reads.iter_mut().find(|(at, _)| at == path) {
            Some(entry) => entry.1 += 1,
            None => reads.push((path.to_owned(), 1)),
        }
        drop(reads);
        // Taken so a waiter between its check and its wait cannot miss it.
        drop(HELD.lock().unwrap_or_else(PoisonError::into_inner));
        HELD_CHANGED.notify_all();
    }

    /// Blocks until `count` reads of the database at `path` have waited
    /// for a sync.
    pub(in crate::storage) fn wait_for_reads(path: &Path, count: usize) {
        let held = HELD.lock().unwrap_or_else(PoisonError::into_inner);
        let (_held, waited) = HELD_CHANGED
            .wait_timeout_while(held, PATIENCE, |_| count_for(&UNSYNCED_READS, path) < count)
            .unwrap_or_else(PoisonError::into_inner);
        assert!(
            !waited.timed_out(),
            "fewer than {count} reads waited for a sync"
        );
    }

    /// Waits while the syncs of the database at `path` are held back.
    pub(super) fn wait_while_held(path: &Path) {
        let mut held = HELD.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(entry) = held.iter_mut().find(|(at, _)| at == path) else {
            return;
        };
        entry.1 += 1;
        HELD_CHANGED.notify_all();
        let _held = HELD_CHANGED
            .wait_while(held, |held| held.iter().any(|(at, _)| at == path))
            .unwrap_or_else(PoisonError::into_inner);
    }

    /// Makes the next `count` WAL syncs of the database at `path` be
    /// refused, as after a failed write.
    pub(in crate::storage) fn refuse_syncs(path: &Path, count: usize) {
        add(&FAILING, path, count);
    }

    /// Databases, by path, and how many of their next batch writes fail.
    static FAILING_WRITES: Mutex<Vec<(PathBuf, usize)>> = Mutex::new(Vec::new());

    /// Fails the next `count` batch writes of the database at `path`, each
    /// before RocksDB sees it, as a full disk would.
    pub(in crate::storage) fn refuse_writes(path: &Path, count: usize) {
        add(&FAILING_WRITES, path, count);
    }

    /// Whether the next batch write of the database at `path` is to fail.
    pub(in crate::storage) fn writes_refused(path: &Path) -> bool {
        take_one(&FAILING_WRITES, path)
    }

    /// Whether this sync of the database at `path` is to be refused.
    pub(super) fn syncs_refused(path: &Path) -> bool {
        take_one(&FAILING, path)
    }

    /// Databases, by path, and how many of their next inline writes stall.
    static STALLING: Mutex<Vec<(PathBuf, usize)>> = Mutex::new(Vec::new());

    /// Makes the next `count` inline writes of the database at `path` be
    /// refused as RocksDB refuses a write it would stall (with
    /// `no_slowdown`): before anything is written.
    pub(in crate::storage) fn stall_inline_writes(path: &Path, count: usize) {
        add(&STALLING, path, count);
    }

    /// Whether this inline write of the database at `path` is to stall.
    pub(in crate::storage) fn inline_write_stalls(path: &Path) -> bool {
        take_one(&STALLING, path)
    }

    /// How many injected stalls the database at `path` has not met yet.
    pub(in crate::storage) fn stalls_left(path: &Path) -> usize {
        count_for(&STALLING, path)
    }

    /// Adds `count` faults for `path` to `faults`.
    fn add(faults: &Mutex<Vec<(PathBuf, usize)>>, path: &Path, count: usize) {
        faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((path.to_owned(), count));
    }

    /// The total that `counts` holds for `path`.
    fn count_for(counts: &Mutex<Vec<(PathBuf, usize)>>, path: &Path) -> usize {
        counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(at, _)| at == path)
            .map(|(_, n)| n)
            .sum()
    }

    /// Takes one of the faults left for `path` in `faults`, if any is.
    fn take_one(faults: &Mutex<Vec<(PathBuf, usize)>>, path: &Path) -> bool {
        let mut faults = faults.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(entry) = faults.iter_mut().find(|(at, left)| at == path && *left > 0) else {
            return false;
        };
        entry.1 -= 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_batch_fails_its_refusals_too() {
        let failure = WriteError::Storage("no space left on device".to_owned());
        for outcome in [Ok(7), Err(WriteError::LeaseLost), Err(WriteError::Held)] {
            assert_eq!(fail_if(outcome, Some(&failure)), Err(failure.clone()));
        }
        assert_eq!(
            fail_if(Err::<u64, _>(WriteError::LeaseLost), None),
            Err(WriteError::LeaseLost)
        );
        assert_eq!(fail_if(Ok(7), None), Ok(7));
    }
}
