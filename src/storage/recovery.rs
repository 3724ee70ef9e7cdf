//! Recovering from a failed write, such as a full disk, without a restart.
//!
//! Once a write fails, RocksDB refuses every later write (it records a
//! background error) until the database is reopened. So when a batch's
//! write fails, the committer thread closes the database and reopens it,
//! retrying about once a second. Meanwhile every write fails at once with a
//! `Storage` error, reads fail too, and nothing acknowledged is lost: a
//! write is acknowledged only after RocksDB accepted it, and the reopen
//! replays the synced WAL. When space returns, the next reopen succeeds and
//! writes carry on.
//!
//! A failed WAL sync is different: the batches it covered are in the WAL
//! file, answered as failed, and a reopen would replay them from the page
//! cache. So the committer refuses everything from then on and marks
//! storage failed for good ([`DbSlot::failed_for_good`]); the server stops,
//! and the next start rebuilds the lease table from what storage holds.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use rocksdb::DB;
use tokio::sync::watch;

use super::commit::{self, Committer, Ended, Queue};
use super::{Memory, WriteError, open_db};

/// The open database, shared by the committer thread and the readers.
#[derive(Debug)]
pub struct DbSlot {
    /// `None` while the database is being reopened.
    db: RwLock<Option<Arc<DB>>>,
    /// Set from a failed write until the reopen succeeds.
    degraded: AtomicBool,
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

    /// Whether a write failed and the database is not yet reopened.
    pub(super) fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    fn take(&self) -> Option<Arc<DB>> {
        self.db
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    fn put(&self, db: Arc<DB>) {
        *self.db.write().unwrap_or_else(PoisonError::into_inner) = Some(db);
    }
}

/// The committer thread: commits until closed, reopening the database
/// whenever a write fails.
pub(super) fn run_committer(
    mut committer: Committer,
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
        let failure = match committer.run(ops) {
            Ended::Closed => return,
            Ended::Failed(message) => message,
            Ended::SyncFailed(message) => {
                slot.degraded.store(true, Ordering::Relaxed);
                tracing::error!(error = %message, "syncing the WAL failed; nothing more is acknowledged, and the daemon stops so the next start recovers from what storage holds");
                drop(committer);
                slot.fatal.send_replace(Some(message.clone()));
                refuse_until_closed(ops, &message);
                return;
            }
        };
        slot.degraded.store(true, Ordering::Relaxed);
        tracing::error!(error = %failure, "storage write failed; reopening the database");
        let settings = committer.settings();
        let committer_syncs = committer.sync_counter();
        drop(committer);
        let not_before = last_reopen.map_or_else(Instant::now, |at| at + RETRY);
        let Some(db) = reopen(slot, ops, path, memory, &failure, not_before) else {
            return;
        };
        last_reopen = Some(Instant::now());
        committer = Committer::new(Arc::clone(&db), settings, committer_syncs);
        slot.put(db);
        slot.degraded.store(false, Ordering::Relaxed);
        tracing::info!("storage reopened; writes carry on");
    }
}

/// Fails every operation until a `Close` arrives or every sender is gone,
/// after a failed WAL sync.
fn refuse_until_closed(ops: &mut Queue, failure: &str) {
    let refusal = WriteError::Storage(format!("storage failed for good: {failure}"));
    while let Some(op) = ops.recv() {
        if let Some(reply) = commit::refuse(op, &refusal) {
            let _ = reply.send(Err(refusal.to_string()));
            return;
        }
    }
}

/// Closes the database once no reader holds it, and opens it again,
/// failing every operation that arrives meanwhile. Returns `None` if a
/// `Close` arrived or every sender is gone.
fn reopen(
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
                if let Some(reply) = commit::refuse(op, &refusal) {
                    let _ = reply.send(Err(refusal.to_string()));
                    return None;
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return None,
        }
    }
}
