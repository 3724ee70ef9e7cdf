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
//! Refusals wait too: a later batch reads what earlier, not yet durable
//! batches wrote, so even a `LeaseLost` may rest on a grant that a crash
//! could still undo. Once a sync fails, every answer the syncer holds or
//! receives afterwards fails with it, and the committer stops at its next
//! batch so the database is reopened.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

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
}

/// The committer's handle on its syncer thread. Dropping it lets the
/// syncer answer what it holds, then joins it.
#[derive(Debug)]
pub(super) struct Syncer {
    /// Feeds the syncer thread, which holds the receiving end.
    queue: Option<Sender<Work>>,
    /// The first failed sync's error, set by the syncer thread and read by
    /// the committer before each batch.
    failed: Arc<Mutex<Option<String>>>,
    thread: Option<JoinHandle<()>>,
}

/// What the syncer is given.
#[derive(Debug)]
enum Work {
    /// A written batch's answers.
    Answers(Vec<Answer>),
    /// Signalled once everything queued before it is answered.
    Barrier(Sender<()>),
}

impl Syncer {
    /// Starts the syncer thread for `db`.
    pub(super) fn start(db: Arc<DB>, syncs: Arc<AtomicU64>) -> std::io::Result<Self> {
        let (queue, work) = std::sync::mpsc::channel();
        let failed = Arc::new(Mutex::new(None));
        let thread_failed = Arc::clone(&failed);
        let thread = std::thread::Builder::new()
            .name("profiled-sync".to_owned())
            .spawn(move || run(&db, &work, &thread_failed, &syncs))?;
        Ok(Self {
            queue: Some(queue),
            failed,
            thread: Some(thread),
        })
    }

    /// Hands a written batch's answers over, to be sent once the WAL holding
    /// the batch is synced.
    pub(super) fn answer_when_synced(&self, answers: Vec<Answer>) {
        let unsent = match &self.queue {
            Some(queue) => queue.send(Work::Answers(answers)).err(),
            None => None,
        };
        // The syncer only stops once this handle is dropped; should its
        // thread have died anyway, nothing it was given can be called durable.
        if let Some(std::sync::mpsc::SendError(Work::Answers(answers))) = unsent {
            deliver(
                answers,
                Some(&WriteError::Storage("the WAL syncer stopped".to_owned())),
            );
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

    /// The error of the first sync that failed, if one did.
    pub(super) fn failure(&self) -> Option<String> {
        self.failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
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
        }
    }
}

/// The syncer thread: takes everything queued, syncs once, answers it all.
fn run(db: &DB, work: &Receiver<Work>, failed: &Mutex<Option<String>>, syncs: &AtomicU64) {
    let mut taken = Vec::new();
    while let Ok(first) = work.recv() {
        taken.push(first);
        taken.extend(work.try_iter());
        let mut failure = failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if failure.is_none() {
            match db.flush_wal(true) {
                Ok(()) => {
                    syncs.fetch_add(1, Ordering::Relaxed);
                }
                Err(err) => {
                    let message = format!("syncing the WAL failed: {}", err.into_string());
                    tracing::error!(error = %message, "no write since the last sync was acknowledged");
                    *failed.lock().unwrap_or_else(PoisonError::into_inner) = Some(message.clone());
                    failure = Some(message);
                }
            }
        }
        let failure = failure.map(WriteError::Storage);
        for item in taken.drain(..) {
            match item {
                Work::Answers(answers) => deliver(answers, failure.as_ref()),
                Work::Barrier(done) => {
                    let _ = done.send(());
                }
            }
        }
    }
}

/// The outcome to report once the batch's fate is known: a failed batch
/// turns every success into that failure.
fn fail_if<T>(
    outcome: Result<T, WriteError>,
    failure: Option<&WriteError>,
) -> Result<T, WriteError> {
    match failure {
        Some(err) if outcome.is_ok() => Err(err.clone()),
        _ => outcome,
    }
}
