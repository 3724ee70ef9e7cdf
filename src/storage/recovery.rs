//! Recovering from a failed write, such as a full disk, without a restart.
//!
//! Once a write fails, RocksDB refuses every later write (it records a
//! background error) until the database is reopened. So the committer
//! thread closes the database and reopens it, retrying about once a
//! second. Meanwhile every operation fails at once with a `Storage`
//! error, reads fail too, and nothing acknowledged is lost: a write is
//! acknowledged only once it is durable.
//!
//! The batch whose write failed is answered as failed at once: RocksDB did
//! not take it. The batches written before it but not yet synced are
//! *stranded*: the WAL file holds them, so the reopen may replay them.
//! Answering them as failed would leave storage holding grants and releases
//! the lease table was told had failed. So they wait: once a reopen
//! succeeds, everything it recovered is flushed to synced table files, and
//! each stranded batch is answered by whether the reopened database's
//! sequence number reaches its own, that is, by whether it survived. They
//! wait as long as the reopen takes. A stop before that answers them as in
//! doubt, and the next start rebuilds the lease table from storage.
//!
//! A failed WAL sync is different: the disk failed a write it had accepted,
//! and reopening on it (RocksDB's recovery writes and syncs new files) can
//! make matters worse: on a failing ext4 in a test, a database reopened
//! that way was found empty after the disk was repaired. So the committer
//! answers the batches in doubt as such, refuses everything from then on,
//! and marks storage failed for good
//! ([`DbSlot::failed_for_good`]); the server stops, and the next start,
//! once the disk is sound, rebuilds the lease table from what storage holds.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use rocksdb::DB;
use tokio::sync::watch;

use super::commit::{self, Committer, Ended, Queue};
use super::durable::{self, Stranded};
use super::lane::Lane;
use super::{Memory, WriteError, open_db};

/// The open database, shared by the committer thread and the readers.
#[derive(Debug)]
pub struct DbSlot {
    /// `None` while the database is being reopened.
    db: RwLock<Option<Arc<DB>>>,
    /// Set from a failed write until the reopen succeeds.
    degraded: AtomicBool,
    /// How many times the database was taken from readers, for a reopen or
    /// for good. Changed only under the `db` write lock, so a reader that
    /// reads it with the database ([`DbSlot::get_marked`]) and finds it
    /// unchanged later knows no reopen began in between.
    taken: AtomicU64,
    /// Set by the committer thread once a WAL sync failed, after which it
    /// refuses every operation; the server watches it and stops.
    fatal: watch::Sender<Option<String>>,
}

/// How long the committer waits between reopen attempts.
const RETRY: Duration = Duration::from_secs(1);

impl DbSlot {
    pub(super) fn new(db: Arc<DB>) -> Self {
        Self {
            db: RwLock::new(Some(db)),
            degraded: AtomicBool::new(false),
            taken: AtomicU64::new(0),
            fatal: watch::Sender::new(None),
        }
    }

    /// Resolves with the error once a WAL sync has failed.
    pub(super) async fn failed_for_good(&self) -> String {
        let mut fatal = self.fatal.subscribe();
        let failure = fatal
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|failure| failure.clone());
        match failure {
            Some(failure) => failure,
            // The sender lives as long as `self`, so this is never reached.
            None => std::future::pending().await,
        }
    }

    /// The database, unless it is being reopened.
    pub(super) fn get(&self) -> Result<Arc<DB>, WriteError> {
        self.db
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .ok_or_else(|| {
                WriteError::Storage("storage is recovering from a failed write".to_owned())
            })
    }

    /// The database, unless it is being reopened, with the count of times
    /// it was taken from readers so far.
    pub(super) fn get_marked(&self) -> Result<(Arc<DB>, u64), WriteError> {
        let db = self.db.read().unwrap_or_else(PoisonError::into_inner);
        let taken = self.taken.load(Ordering::SeqCst);
        let db = db.clone().ok_or_else(|| {
            WriteError::Storage("storage is recovering from a failed write".to_owned())
        })?;
        Ok((db, taken))
    }

    /// How many times the database was taken from readers so far.
    pub(super) fn times_taken(&self) -> u64 {
        self.taken.load(Ordering::SeqCst)
    }

    /// Whether a write failed and the database is not yet reopened.
    pub(super) fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    fn take(&self) -> Option<Arc<DB>> {
        let mut db = self.db.write().unwrap_or_else(PoisonError::into_inner);
        self.taken.fetch_add(1, Ordering::SeqCst);
        db.take()
    }

    fn put(&self, db: Arc<DB>) {
        *self.db.write().unwrap_or_else(PoisonError::into_inner) = Some(db);
    }
}

/// The committer thread: commits until closed, reopening the database
/// whenever a write fails.
pub(super) fn run_committer(
    lane: &Lane,
    ops: &mut Queue,
    slot: &DbSlot,
    path: &Path,
    memory: Memory,
) {
    // Reopens are at least `RETRY` apart, also across failures: on a disk
    // with room to open but not to write, each reopen would otherwise
    // follow the next failed batch at once and use up what space is left.
    let mut last_reopen: Option<Instant> = None;
    loop {
        let (mut failure, committer) = match lane.run(ops) {
            (Ended::Closed, _) => return,
            (Ended::Failed(message), Some(committer)) => (message, committer),
            (Ended::SyncFailed(message), committer) => {
                let stranded = committer
                    .as_ref()
                    .map(Committer::take_stranded)
                    .unwrap_or_default();
                drop(committer);
                fail_for_good(lane, slot, ops, stranded, &message);
                return;
            }
            // Not reached: the lane records a failure only while it holds
            // the committer, and gives it back with it. Without one there
            // is nothing to reopen with, so stop as after a failed sync.
            (Ended::Failed(message), None) => {
                tracing::error!(error = %message, "a write failed and the committer is gone; stopping");
                fail_for_good(lane, slot, ops, Vec::new(), &message);
                return;
            }
        };
        slot.degraded.store(true, Ordering::Relaxed);
        tracing::error!(error = %failure, "storage write failed; reopening the database");
        let stranded = committer.take_stranded();
        let settings = committer.settings();
        let progress = committer.progress();
        drop(committer);
        let (db, recovered) = loop {
            let not_before = last_reopen.map_or_else(Instant::now, |at| at + RETRY);
            let Some(db) = reopen(lane, slot, ops, path, memory, &failure, not_before) else {
                let doubt = WriteError::Storage(format!(
                    "storage stopped before it recovered from a failure, so this write may or may not have been kept: {failure}"
                ));
                durable::answer_in_doubt(stranded, &doubt);
                return;
            };
            last_reopen = Some(Instant::now());
            match recovered_durably(&db, &stranded) {
                Ok(recovered) => break (db, recovered),
                Err(err) if durable::is_sync_failure(&err) => {
                    abandon(db);
                    fail_for_good(lane, slot, ops, stranded, &err);
                    return;
                }
                Err(err) => {
                    tracing::error!(error = %err, "making the reopened database durable failed; reopening again");
                    failure = err;
                    // Closed here, unseen by readers and pruning, whose
                    // writes could otherwise take the sequence numbers of
                    // a batch that was lost.
                    drop(db);
                }
            }
        };
        let committer = Committer::new(Arc::clone(&db), settings, Arc::clone(&progress));
        // The reopened database numbers its writes from where it recovered,
        // which may be behind what was synced before; readers of it ask for
        // a sync until one is made.
        progress.synced_up_to.store(0, Ordering::SeqCst);
        slot.put(db);
        lane.put(committer);
        slot.degraded.store(false, Ordering::Relaxed);
        tracing::info!("storage reopened; writes carry on");
        // Answered only now, so a caller told its write survived can read
        // it back at once.
        answer_stranded(stranded, recovered);
    }
}

/// After a failed WAL sync: answers the batches in doubt as such, marks
/// storage failed for good (the server stops), and refuses everything
/// until closed, without touching the database again.
fn fail_for_good(
    lane: &Lane,
    slot: &DbSlot,
    ops: &mut Queue,
    stranded: Vec<Stranded>,
    failure: &str,
) {
    slot.degraded.store(true, Ordering::Relaxed);
    // Readers, pruning and backups stop using the database, whose memory
    // may hold what the disk lost; and it is never closed, since closing
    // flushes to the disk that failed. The process is about to exit.
    if let Some(db) = slot.take() {
        abandon(db);
    }
    tracing::error!(error = %failure, "syncing the WAL failed; nothing more is acknowledged, and the daemon stops so the next start recovers from what storage holds");
    let doubt = WriteError::Storage(format!(
        "the daemon is stopping after a failed WAL sync; this write may or may not have been kept: {failure}"
    ));
    durable::answer_in_doubt(stranded, &doubt);
    slot.fatal.send_replace(Some(failure.to_owned()));
    refuse_until_closed(lane, ops, failure);
}

/// Stops `db`'s flushes and compactions and leaves it open for good:
/// closing it would flush its memtables to a disk that failed a sync.
fn abandon(db: Arc<DB>) {
    db.cancel_all_background_work(false);
    std::mem::forget(db);
}

/// Fails every operation until a `Close` arrives or every sender is gone,
/// after a failed WAL sync.
fn refuse_until_closed(lane: &Lane, ops: &mut Queue, failure: &str) {
    let refusal = WriteError::Storage(format!("storage failed for good: {failure}"));
    while let Some(op) = ops.recv() {
        if let Some(reply) = lane.refuse(op, &refusal) {
            let _ = reply.send(Err(refusal.to_string()));
            return;
        }
    }
}

/// Makes what the reopened `db` recovered durable, if any batch is in
/// doubt, and returns the sequence number it recovered up to.
fn recovered_durably(db: &DB, stranded: &[Stranded]) -> Result<u64, String> {
    if !stranded.is_empty() {
        commit::flush_all(db)?;
    }
    Ok(db.latest_sequence_number())
}

/// Answers each batch in doubt by whether it survived the reopen: it did
/// if the database recovered up to its sequence number.
fn answer_stranded(stranded: Vec<Stranded>, recovered: u64) {
    if stranded.is_empty() {
        return;
    }
    let lost = WriteError::Storage(
        "the write was lost with a failed WAL sync or a failed write after it".to_owned(),
    );
    let total = stranded.len();
    let mut survived = 0;
    for batch in stranded {
        if batch.seq <= recovered {
            survived += 1;
            durable::deliver(batch.answers, None);
        } else {
            durable::deliver(batch.answers, Some(&lost));
        }
    }
    tracing::info!(
        survived,
        lost = total - survived,
        "answered the batches the failure had left in doubt"
    );
}

/// Closes the database once no reader holds it, and opens it again,
/// failing every operation that arrives meanwhile. Returns `None` if a
/// `Close` arrived or every sender is gone.
fn reopen(
    lane: &Lane,
    slot: &DbSlot,
    ops: &mut Queue,
    path: &Path,
    memory: Memory,
    failure: &str,
    not_before: Instant,
) -> Option<Arc<DB>> {
    let refusal = WriteError::Storage(format!(
        "storage is unavailable after a failed write: {failure}"
    ));
    let mut held = slot.take();
    let mut next_attempt = not_before;
    loop {
        // Readers hold the database only for one read; wait them out.
        if let Some(db) = held.take() {
            match Arc::try_unwrap(db) {
                Ok(db) => drop(db),
                Err(shared) => held = Some(shared),
            }
        }
        if held.is_none() && Instant::now() >= next_attempt {
            match open_db(path, memory) {
                Ok(db) => return Some(Arc::new(db)),
                Err(err) => tracing::warn!(error = %err, "reopening storage failed; retrying"),
            }
            next_attempt = Instant::now() + RETRY;
        }
        let wait = if held.is_some() {
            Duration::from_millis(10)
        } else {
            next_attempt.saturating_duration_since(Instant::now())
        };
        match ops.recv_timeout(wait) {
            Ok(op) => {
                if let Some(reply) = lane.refuse(op, &refusal) {
                    let _ = reply.send(Err(refusal.to_string()));
                    return None;
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return None,
        }
    }
}
