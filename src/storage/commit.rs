//! The committer: one thread that applies every write, in batches.
//!
//! It blocks for the first pending operation, then takes every other one
//! already waiting (up to `max_batch`). Each operation is checked and applied
//! against the database as updated by the operations before it in the same
//! batch, the batch is written as one `WriteBatch`, and only once it is
//! durable is any operation answered: with `sync` on, after a WAL sync that
//! the syncer thread makes ([`super::durable`]), or the committer itself when
//! the syncer is idle and nothing waits behind the batch. If the write
//! fails, every operation in the batch fails and none is acknowledged.
//!
//! The thread's loop, and the saves a caller commits itself while the
//! thread is idle, are in [`super::lane`].

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;

use profiled_protocol::{Changes, Message, SessionId};
use rocksdb::{DB, WriteBatch, WriteOptions};
use tokio::sync::oneshot;

use super::durable::{self, Answer, Progress, Stranded, SyncWatch, Syncer};
use super::records::{self, LeaseRecord, MetaRecord};
use super::{AdminAction, AdminDone, Families, Granted, Grantee, Sent, WriteError, unix_ms};
use crate::ProfileKey;

/// A write waiting for the committer. Each carries the sender its caller
/// awaits.
#[derive(Debug)]
pub(super) enum Op {
    Grant {
        key: ProfileKey,
        to: Grantee,
        reply: oneshot::Sender<Result<Granted, WriteError>>,
    },
    /// A save (`release: false`) or a release, checked against the lease.
    Write {
        write: Write,
        reply: oneshot::Sender<Result<u64, WriteError>>,
    },
    /// A holder's release and the grant to the next holder, applied in
    /// that order in one batch. The grant is refused with
    /// [`WriteError::Held`] if the release left the profile leased.
    HandOver {
        release: Write,
        released: oneshot::Sender<Result<u64, WriteError>>,
        next: Grantee,
        granted: oneshot::Sender<Result<Granted, WriteError>>,
    },
    /// A message for a profile.
    Send {
        key: ProfileKey,
        payload: Vec<u8>,
        max_pending: u64,
        reply: oneshot::Sender<Result<Sent, WriteError>>,
    },
    /// An administrative change that ends any lease.
    Admin {
        key: ProfileKey,
        action: AdminAction,
        reply: oneshot::Sender<Result<AdminDone, WriteError>>,
    },
    /// Reads a profile's pending messages at this point in the order of
    /// writes: every message sent before it is included, unless consumed,
    /// and none sent after it.
    Pending {
        key: ProfileKey,
        reply: oneshot::Sender<Result<Vec<Message>, WriteError>>,
    },
    /// Answers once every write submitted before it is durable: with
    /// `storage.sync`, after a WAL sync that began after those writes.
    Durable {
        reply: oneshot::Sender<Result<(), WriteError>>,
    },
    /// Flush and stop after everything submitted before it.
    Close {
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Wakes the committer thread to find the failure an inline write
    /// recorded ([`super::lane`]); it changes nothing and has no answer.
    Wake,
}

/// A save or release, checked against the stored lease.
#[derive(Clone, Debug)]
pub(super) struct Write {
    /// The profile.
    pub(super) key: ProfileKey,
    /// The session the lease must belong to.
    pub(super) owner: SessionId,
    /// The epoch the lease must have.
    pub(super) epoch: u64,
    /// The new data; `None` keeps the stored data (a bare release).
    pub(super) data: Option<Vec<u8>>,
    /// Metadata changes and consumed messages.
    pub(super) changes: Changes,
    /// Whether the lease ends with this write.
    pub(super) release: bool,
}

/// How the committer keeps history.
#[derive(Clone, Copy, Debug)]
pub(super) struct HistoryRules {
    /// The least time between two versions kept by saves.
    pub(super) interval_ms: u64,
}

/// The committer's end of the operation channel, able to look one
/// operation ahead: the committer asks whether anything waits behind a
/// batch before deciding who syncs it. The operation looked at stays here
/// for the next batch, or for the reopen after a failure.
#[derive(Debug)]
pub(super) struct Queue {
    ops: Receiver<Op>,
    /// An operation taken off the channel by [`Queue::is_empty`] and not
    /// yet handed out.
    ahead: Option<Op>,
}

impl Queue {
    pub(super) fn new(ops: Receiver<Op>) -> Self {
        Self { ops, ahead: None }
    }

    /// The next operation, waiting for one; `None` once every sender is
    /// gone.
    pub(super) fn recv(&mut self) -> Option<Op> {
        self.ahead.take().or_else(|| self.ops.recv().ok())
    }

    /// The next operation if one is waiting.
    pub(super) fn try_recv(&mut self) -> Option<Op> {
        self.ahead.take().or_else(|| self.ops.try_recv().ok())
    }

    /// The next operation, waiting at most `wait` for one.
    pub(super) fn recv_timeout(&mut self, wait: Duration) -> Result<Op, RecvTimeoutError> {
        match self.ahead.take() {
            Some(op) => Ok(op),
            None => self.ops.recv_timeout(wait),
        }
    }

    /// Puts `op`, just taken, back in front, for whatever reads the queue
    /// next.
    pub(super) fn put_back(&mut self, op: Op) {
        debug_assert!(self.ahead.is_none(), "an operation was taken first");
        self.ahead = Some(op);
    }

    /// Whether no operation is waiting.
    pub(super) fn is_empty(&mut self) -> bool {
        if self.ahead.is_none() {
            self.ahead = self.ops.try_recv().ok();
        }
        self.ahead.is_none()
    }
}

/// Why a committer stopped.
#[derive(Debug)]
pub(super) enum Ended {
    /// It was closed, or every sender is gone.
    Closed,
    /// A batch's write failed (the disk is full, say). RocksDB refuses
    /// every later write until the database is reopened; the written
    /// batches not known to be durable are stranded
    /// ([`Committer::take_stranded`]) for the reopen to judge.
    Failed(String),
    /// A WAL sync failed: the disk failed a write it had accepted. The
    /// database is not reopened (a reopen on a failing disk can make
    /// matters worse); the daemon stops, and the next start recovers from
    /// what storage holds.
    SyncFailed(String),
}

/// What a batch did.
pub(super) enum Outcome {
    /// It was written, or every operation in it was refused on its own.
    Committed,
    /// It held a `Close`.
    Close(oneshot::Sender<Result<(), String>>, Option<String>),
    /// Its write failed; every operation in it was failed.
    WriteFailed(String),
}

/// An inline write that RocksDB would have held back for a stall, so was
/// not applied ([`Committer::commit_inline`]).
#[derive(Debug)]
pub(super) struct Stalled;

/// How a committer works; a replacement committer after a reopen gets the
/// same.
#[derive(Clone, Copy, Debug)]
pub(super) struct Settings {
    /// Whether each batch's write syncs the WAL.
    pub(super) sync: bool,
    /// The most operations in one batch.
    pub(super) max_batch: usize,
    /// The most held leases kept in the [`RecordCache`].
    pub(super) lease_cache: usize,
    /// How history is kept.
    pub(super) history: HistoryRules,
}

impl Settings {
    pub(super) fn of(config: &crate::config::StorageConfig, history: HistoryRules) -> Self {
        Self {
            sync: config.sync,
            max_batch: config.max_batch,
            lease_cache: config.lease_cache,
            history,
        }
    }
}

/// The committer's state; it lives on its own thread.
pub(super) struct Committer {
    db: Arc<DB>,
    write_options: WriteOptions,
    /// For inline writes ([`Committer::commit_inline`]): refused at once,
    /// rather than slowed down, while RocksDB stalls writes.
    inline_options: WriteOptions,
    settings: Settings,
    /// The records of held leases as the last committed batch left them.
    /// Only the committer writes meta and lease records, so this copy is
    /// exact; it spares a save the two point reads it would otherwise make.
    /// A batch moves its profiles' entries out and puts them back only once
    /// its write succeeded; a replacement committer starts empty.
    cache: RefCell<RecordCache>,
    /// Syncs the WAL and answers, when writes must be durable before they
    /// are acknowledged; `None` when they need not be, or when its thread
    /// could not start (each write then syncs itself).
    syncer: Option<Syncer>,
    /// Counts WAL syncs and how far they reached; shared with
    /// [`super::Storage`] for stats and reads.
    progress: Arc<Progress>,
}

/// Meta and lease records of held leases, by database key, up to a
/// capacity.
#[derive(Debug, Default)]
struct RecordCache {
    entries: HashMap<Vec<u8>, (MetaRecord, LeaseRecord)>,
    capacity: usize,
}

/// A profile as seen part-way through a batch: what was read from the
/// database, with this batch's earlier writes applied.
struct Slot {
    meta: Option<MetaRecord>,
    lease: Option<LeaseRecord>,
    /// The data as this batch left it, once the batch has changed it:
    /// `Some(None)` after a wipe.
    written: Option<Option<Vec<u8>>>,
    /// Messages sent earlier in this batch, which a later grant must return.
    sent: Vec<Message>,
    /// Message ids consumed earlier in this batch.
    consumed: HashSet<u64>,
    /// Versions kept earlier in this batch.
    kept: Vec<(u64, Vec<u8>)>,
    /// Whether this batch wiped the profile, so its stored messages and
    /// versions no longer count.
    wiped: bool,
}

/// One batch in the making.
struct Batch<'a> {
    families: Families<'a>,
    slots: HashMap<Vec<u8>, Slot>,
    batch: WriteBatch,
    now_ms: u64,
}

impl Committer {
    pub(super) fn new(db: Arc<DB>, settings: Settings, progress: Arc<Progress>) -> Self {
        let syncer = if settings.sync {
            Syncer::start(Arc::clone(&db), Arc::clone(&progress))
                .inspect_err(|err| {
                    tracing::warn!(error = %err, "no WAL syncer thread; each write will sync itself");
                })
                .ok()
        } else {
            None
        };
        let mut write_options = WriteOptions::default();
        write_options.set_sync(settings.sync && syncer.is_none());
        let mut inline_options = WriteOptions::default();
        inline_options.set_sync(settings.sync && syncer.is_none());
        inline_options.set_no_slowdown(true);
        Self {
            db,
            write_options,
            inline_options,
            settings,
            syncer,
            progress,
            cache: RefCell::new(RecordCache {
                entries: HashMap::new(),
                capacity: settings.lease_cache,
            }),
        }
    }

    /// Finishes a `Close` once its batch is committed: answers what a
    /// failure left in doubt as such, since no reopen will judge it, and
    /// flushes everything unless something failed (`write_failure`, or a
    /// failure the syncer recorded), in which case the disk is not written
    /// again. Says how the flush went, for the `Close`'s answer.
    pub(super) fn close(&self, write_failure: Option<String>) -> Result<(), String> {
        let mut failure = write_failure;
        if let Some(syncer) = &self.syncer {
            if let Some(message) = &failure {
                syncer.write_failed(message);
            }
            let stranded = syncer.take_stranded();
            failure = syncer.failure().map(|failure| failure.message);
            let doubt = WriteError::Storage(format!(
                "the daemon is stopping after a storage failure; this write may or may not have been kept: {}",
                failure.as_deref().unwrap_or_default()
            ));
            durable::answer_in_doubt(stranded, &doubt);
        }
        match failure {
            Some(message) => Err(message),
            None => self.flush(),
        }
    }

    /// How the committer ends after a batch's write failed with `message`.
    /// RocksDB refuses to sync after a failed write, so the batches still
    /// with the syncer are stranded. A write that failed because a sync had
    /// failed is the sync's failure: whichever was recorded first decides.
    pub(super) fn failed(&self, message: String) -> Ended {
        match &self.syncer {
            Some(syncer) => {
                syncer.write_failed(&message);
                syncer.failure().map_or(Ended::Failed(message), ended)
            }
            // Each write syncs itself without a syncer thread.
            None if durable::is_sync_failure(&message) => Ended::SyncFailed(message),
            None => Ended::Failed(message),
        }
    }

    /// What the committer thread watches of the syncer between batches;
    /// `None` without one.
    pub(super) fn sync_watch(&self) -> Option<SyncWatch> {
        self.syncer.as_ref().map(Syncer::watch)
    }

    /// The written batches whose answers wait, after a failure, for a reopen
    /// to tell whether they survived; oldest first.
    pub(super) fn take_stranded(&self) -> Vec<Stranded> {
        self.syncer
            .as_ref()
            .map(Syncer::take_stranded)
            .unwrap_or_default()
    }

    /// The settings a replacement committer needs after a reopen.
    pub(super) fn settings(&self) -> Settings {
        self.settings
    }

    /// The sync progress a replacement committer carries on.
    pub(super) fn progress(&self) -> Arc<Progress> {
        Arc::clone(&self.progress)
    }

    /// Applies and answers one batch. Operations after a `Close` in the
    /// batch fail with `Closed`. `more_waiting` says whether another
    /// operation is already waiting; it is asked only when the syncer is
    /// idle, to decide who syncs.
    pub(super) fn commit(&self, ops: &mut Vec<Op>, more_waiting: impl FnOnce() -> bool) -> Outcome {
        match self.commit_with(ops, false, more_waiting) {
            Ok(outcome) => outcome,
            // Only an inline write is refused for a stall; this one waited.
            Err(Stalled) => Outcome::Committed,
        }
    }

    /// Applies one save on the caller's thread and says what happened
    /// ([`super::lane`]); `reply` is answered as for any batch. The save is
    /// not applied, and `reply` dropped unanswered, if RocksDB would have
    /// held the write back for a stall (`Err(Stalled)`): the caller's
    /// thread must not sleep in RocksDB, so the caller hands the save to the
    /// committer thread.
    pub(super) fn commit_inline(
        &self,
        write: Write,
        reply: oneshot::Sender<Result<u64, WriteError>>,
    ) -> Result<Outcome, Stalled> {
        self.commit_with(&mut vec![Op::Write { write, reply }], true, || false)
    }

    /// How many answers the syncer's last sync sent; 0 without a syncer.
    pub(super) fn last_sync_answered(&self) -> usize {
        self.syncer.as_ref().map_or(0, Syncer::last_answered)
    }

    /// The failure the syncer recorded, if any: a sync that failed, or
    /// failed to run, after a batch's write had succeeded.
    pub(super) fn sync_failure(&self) -> Option<String> {
        self.syncer
            .as_ref()
            .and_then(Syncer::failure)
            .map(|failure| failure.message)
    }

    /// [`Committer::commit`], and for `inline` writes
    /// [`Committer::commit_inline`].
    fn commit_with(
        &self,
        ops: &mut Vec<Op>,
        inline: bool,
        more_waiting: impl FnOnce() -> bool,
    ) -> Result<Outcome, Stalled> {
        let Some(families) = Families::of(&self.db) else {
            // Unreachable after a successful open; fail the batch rather
            // than panic in the daemon.
            ops.clear();
            return Ok(Outcome::Committed);
        };
        let mut cache = self.cache.borrow_mut();
        let mut batch = Batch {
            families,
            slots: cache.take_for(ops),
            batch: WriteBatch::default(),
            now_ms: unix_ms(),
        };
        let mut answers = Vec::with_capacity(ops.len());
        let mut close = None;
        let mut durable_asked = false;
        for op in ops.drain(..) {
            if close.is_some() {
                // Dropping the op's reply sender tells its caller `Closed`.
                continue;
            }
            match op {
                Op::Grant { key, to, reply } => {
                    let outcome = self.grant(&mut batch, key, to, false);
                    answers.push(Answer::Granted(reply, outcome));
                }
                Op::HandOver {
                    release,
                    released,
                    next,
                    granted,
                } => {
                    let key = release.key.clone();
                    let outcome = self.write(&mut batch, release);
                    answers.push(Answer::Version(released, outcome));
                    let outcome = self.grant(&mut batch, key, next, true);
                    answers.push(Answer::Granted(granted, outcome));
                }
                Op::Write { write, reply } => {
                    let outcome = self.write(&mut batch, write);
                    answers.push(Answer::Version(reply, outcome));
                }
                Op::Send {
                    key,
                    payload,
                    max_pending,
                    reply,
                } => {
                    let outcome = self.send(&mut batch, key, payload, max_pending);
                    answers.push(Answer::Sent(reply, outcome));
                }
                Op::Admin { key, action, reply } => {
                    let outcome = self.admin(&mut batch, key, action);
                    answers.push(Answer::Admin(reply, outcome));
                }
                Op::Pending { key, reply } => {
                    let db_key = records::encode_key(&key);
                    let outcome = self.pending_messages(&mut batch, &key, &db_key);
                    answers.push(Answer::Messages(reply, outcome));
                }
                Op::Durable { reply } => {
                    durable_asked = true;
                    answers.push(Answer::Durable(reply, Ok(())));
                }
                Op::Close { reply } => close = Some(reply),
                Op::Wake => {}
            }
        }
        // Without a syncer each write syncs itself, so a batch that wrote
        // nothing must sync by itself for an `Op::Durable` in it.
        let self_synced = self.settings.sync && self.syncer.is_none();
        // Everything written before this batch; a sync made by its write
        // covers at least that far, so reads of it need not ask for one.
        let before = if self_synced {
            self.db.latest_sequence_number()
        } else {
            0
        };
        let failure = if batch.batch.is_empty() {
            if self_synced && durable_asked {
                match self.db.flush_wal(true) {
                    Ok(()) => {
                        self.progress.synced(before);
                        None
                    }
                    Err(err) => Some(WriteError::Storage(format!(
                        "syncing the WAL failed: {}",
                        err.into_string()
                    ))),
                }
            } else {
                None
            }
        } else {
            // On a stall nothing was written. The answers are dropped
            // unsent (the caller has kept the save to hand on), and so are
            // the batch's cache entries, which later reads refill.
            let written = self.write_batch(batch.batch, inline)?;
            if written.is_ok() && self_synced {
                self.progress.synced(before);
            }
            written.err().map(WriteError::Storage)
        };
        if failure.is_none() {
            cache.put_back(batch.slots);
        }
        if let Some(err) = &failure {
            tracing::error!(error = %err, "a batch of writes failed; none was acknowledged");
        }
        let outcome = match (&failure, close) {
            (failure, Some(reply)) => {
                Outcome::Close(reply, failure.as_ref().map(ToString::to_string))
            }
            (Some(err), None) => Outcome::WriteFailed(err.to_string()),
            (None, None) => Outcome::Committed,
        };
        // The batch survived a failure later on if a reopen recovers this
        // far. Pruning writes beside the committer, so this may be past the
        // batch's own last number; that errs only towards calling a batch
        // that survived lost, if a pruning write right behind it did not.
        let seq = self.db.latest_sequence_number();
        match (&failure, &self.syncer) {
            // Alone, the batch is answered soonest by syncing right here;
            // with more waiting, the syncer overlaps its sync with the next
            // batch's work.
            (None, Some(syncer)) if syncer.is_idle() && !more_waiting() => {
                syncer.sync_and_answer(seq, answers);
            }
            (None, Some(syncer)) => syncer.answer_when_synced(seq, answers),
            (failure, _) => durable::deliver(answers, failure.as_ref()),
        }
        Ok(outcome)
    }

    /// Writes `batch`, as an inline write if `inline`: then a write
    /// RocksDB would hold back for a stall is refused, unapplied.
    fn write_batch(&self, batch: WriteBatch, inline: bool) -> Result<Result<(), String>, Stalled> {
        #[cfg(test)]
        if durable::faults::writes_refused(self.db.path()) {
            return Ok(Err("an injected failed write".to_owned()));
        }
        #[cfg(test)]
        if inline && durable::faults::inline_write_stalls(self.db.path()) {
            return Err(Stalled);
        }
        let options = if inline {
            &self.inline_options
        } else {
            &self.write_options
        };
        match self.db.write_opt(batch, options) {
            Ok(()) => Ok(Ok(())),
            Err(err) if inline && err.kind() == rocksdb::ErrorKind::Incomplete => Err(Stalled),
            Err(err) => Ok(Err(err.into_string())),
        }
    }

    fn grant(
        &self,
        batch: &mut Batch<'_>,
        key: ProfileKey,
        to: Grantee,
        if_free: bool,
    ) -> Result<Granted, WriteError> {
        let db_key = records::encode_key(&key);
        let now_ms = batch.now_ms;
        if if_free
            && slot_of(&self.db, &mut batch.slots, &batch.families, &db_key)?
                .lease
                .is_some()
        {
            return Err(WriteError::Held);
        }
        let data = self.current_data(batch, &db_key)?;
        let messages = self.pending_messages(batch, &key, &db_key)?;
        let slot = slot_of(&self.db, &mut batch.slots, &batch.families, &db_key)?;
        let mut meta = slot.meta.clone().unwrap_or_default();
        if !meta.exists() {
            meta.created_at_ms = now_ms;
        }
        meta.epoch += 1;
        meta.load_count += 1;
        let lease = LeaseRecord {
            session: to.session,
            epoch: meta.epoch,
            since_ms: now_ms,
            uid: to.uid,
        };
        slot.meta = Some(meta.clone());
        slot.lease = Some(lease.clone());
        let families = &batch.families;
        batch
            .batch
            .put_cf(families.meta, &db_key, records::encode(&meta));
        batch
            .batch
            .put_cf(families.leases, &db_key, records::encode_lease(&lease));
        Ok(Granted {
            lease,
            meta,
            data,
            messages,
        })
    }

    fn write(&self, batch: &mut Batch<'_>, write: Write) -> Result<u64, WriteError> {
        let db_key = records::encode_key(&write.key);
        let slot = slot_of(&self.db, &mut batch.slots, &batch.families, &db_key)?;
        let holds = slot
            .lease
            .as_ref()
            .is_some_and(|lease| lease.epoch == write.epoch && lease.session == write.owner);
        if !holds || slot.meta.is_none() {
            return Err(WriteError::LeaseLost);
        }
        let changed_data = write.data.is_some();
        let Changes {
            meta_tags,
            user_ids,
            consumed_messages,
        } = write.changes;
        let now_ms = batch.now_ms;
        let interval_ms = self.settings.history.interval_ms;
        // A bare release keeps the stored data, which history needs if this
        // release is the one that keeps it. It is read before anything is
        // added to the batch, so a failed read leaves no half-done write.
        let data = match write.data {
            Some(data) => Some(data),
            None if write.release => self.current_data(batch, &db_key)?,
            None => None,
        };
        self.consume(batch, &write.key, &db_key, &consumed_messages)?;
        let slot = slot_of(&self.db, &mut batch.slots, &batch.families, &db_key)?;
        let Some(meta) = slot.meta.as_mut() else {
            return Err(WriteError::LeaseLost);
        };
        let families = &batch.families;
        if let Some(tags) = meta_tags {
            meta.meta_tags = tags;
        }
        if let Some(ids) = user_ids {
            meta.user_ids = ids;
        }
        if changed_data {
            meta.version += 1;
            meta.updated_at_ms = now_ms;
        }
        if let Some(data) = data {
            let due = now_ms.saturating_sub(meta.kept_at_ms) >= interval_ms;
            let unkept = meta.kept_version != meta.version;
            if unkept && (write.release || due) {
                keep(&mut batch.batch, families, &write.key, meta, &data, now_ms);
                slot.kept.push((meta.version, data.clone()));
            }
            if changed_data {
                // The batch copies the bytes; the slot takes the buffer
                // itself, for later writes in this batch to read.
                batch.batch.put_cf(families.data, &db_key, &data);
                slot.written = Some(Some(data));
            }
        }
        batch
            .batch
            .put_cf(families.meta, &db_key, records::encode(&*meta));
        let version = meta.version;
        if write.release {
            batch.batch.delete_cf(families.leases, &db_key);
            slot.lease = None;
        }
        Ok(version)
    }

    fn send(
        &self,
        batch: &mut Batch<'_>,
        key: ProfileKey,
        payload: Vec<u8>,
        max_pending: u64,
    ) -> Result<Sent, WriteError> {
        let db_key = records::encode_key(&key);
        let now_ms = batch.now_ms;
        let slot = slot_of(&self.db, &mut batch.slots, &batch.families, &db_key)?;
        let mut meta = slot.meta.clone().unwrap_or_default();
        if meta.pending_messages >= max_pending {
            return Err(WriteError::TooManyMessages(max_pending));
        }
        if !meta.exists() {
            meta.created_at_ms = now_ms;
        }
        meta.last_message_id += 1;
        meta.pending_messages += 1;
        let id = meta.last_message_id;
        let families = &batch.families;
        batch.batch.put_cf(
            families.messages,
            records::item_key(&key, id),
            records::encode_item(now_ms, &payload),
        );
        batch
            .batch
            .put_cf(families.meta, &db_key, records::encode(&meta));
        slot.meta = Some(meta);
        let message = Message {
            id,
            sent_at_ms: now_ms,
            payload,
        };
        slot.sent.push(message.clone());
        Ok(Sent {
            message,
            lease: slot.lease.clone(),
        })
    }

    fn admin(
        &self,
        batch: &mut Batch<'_>,
        key: ProfileKey,
        action: AdminAction,
    ) -> Result<AdminDone, WriteError> {
        let db_key = records::encode_key(&key);
        let now_ms = batch.now_ms;
        let exists = slot_of(&self.db, &mut batch.slots, &batch.families, &db_key)?
            .meta
            .as_ref()
            .is_some_and(MetaRecord::exists);
        // Find the new data first: a rollback needs the version it names.
        let replacement: Option<Vec<u8>> = match &action {
            AdminAction::Revoke | AdminAction::Wipe => None,
            AdminAction::Overwrite(data) => Some(data.clone()),
            AdminAction::Import { data, .. } => data.clone(),
            AdminAction::Rollback(version) => {
                let data = exists
                    .then(|| self.version_data(batch, &key, &db_key, *version))
                    .transpose()?
                    .flatten();
                Some(data.ok_or(WriteError::NotFound)?)
            }
        };
        let current = self.current_data(batch, &db_key)?;
        let slot = slot_of(&self.db, &mut batch.slots, &batch.families, &db_key)?;
        let families = &batch.families;
        if matches!(action, AdminAction::Revoke) {
            let ended = slot.lease.take();
            if ended.is_some() {
                batch.batch.delete_cf(families.leases, &db_key);
            }
            let version = slot.meta.as_ref().map_or(0, |meta| meta.version);
            return Ok(AdminDone { version, ended });
        }
        if matches!(action, AdminAction::Wipe) && !exists && slot.lease.is_none() {
            return Err(WriteError::NotFound);
        }
        let ended = slot.lease.take();
        if ended.is_some() {
            batch.batch.delete_cf(families.leases, &db_key);
        }
        let mut meta = slot.meta.clone().unwrap_or_default();
        match action {
            // Handled above: a revoke touches nothing but the lease.
            AdminAction::Revoke => {}
            AdminAction::Wipe => {
                let prefix = records::item_prefix(&key);
                let (from, to) = item_range(&prefix);
                batch.batch.delete_range_cf(families.messages, &from, &to);
                batch.batch.delete_range_cf(families.history, &from, &to);
                batch.batch.delete_cf(families.data, &db_key);
                // The counters stay, so epochs, versions and message ids
                // keep rising; everything the profile said is gone.
                meta = MetaRecord {
                    epoch: meta.epoch,
                    version: meta.version,
                    last_message_id: meta.last_message_id,
                    kept_version: meta.version,
                    ..MetaRecord::default()
                };
                slot.written = Some(None);
                slot.sent.clear();
                slot.kept.clear();
                slot.wiped = true;
            }
            AdminAction::Overwrite(_) | AdminAction::Rollback(_) | AdminAction::Import { .. } => {
                // The data being replaced is kept first, so the overwrite
                // itself can be undone.
                if let Some(current) = &current
                    && meta.kept_version != meta.version
                {
                    keep(&mut batch.batch, families, &key, &mut meta, current, now_ms);
                    slot.kept.push((meta.version, current.clone()));
                }
                if let AdminAction::Import {
                    meta_tags,
                    user_ids,
                    ..
                } = action
                {
                    meta.meta_tags = meta_tags;
                    meta.user_ids = user_ids;
                }
                if !meta.exists() {
                    meta.created_at_ms = now_ms;
                }
                if let Some(data) = replacement {
                    meta.version += 1;
                    meta.updated_at_ms = now_ms;
                    keep(&mut batch.batch, families, &key, &mut meta, &data, now_ms);
                    slot.kept.push((meta.version, data.clone()));
                    batch.batch.put_cf(families.data, &db_key, &data);
                    slot.written = Some(Some(data));
                }
            }
        }
        batch
            .batch
            .put_cf(families.meta, &db_key, records::encode(&meta));
        let version = meta.version;
        slot.meta = Some(meta);
        Ok(AdminDone { version, ended })
    }

    /// Removes consumed messages that are pending, counting only those.
    fn consume(
        &self,
        batch: &mut Batch<'_>,
        key: &ProfileKey,
        db_key: &[u8],
        ids: &[u64],
    ) -> Result<(), WriteError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut removed = Vec::with_capacity(ids.len());
        for &id in ids {
            let slot = slot_of(&self.db, &mut batch.slots, &batch.families, db_key)?;
            if slot.consumed.contains(&id) || removed.contains(&id) {
                continue;
            }
            let in_batch = slot.sent.iter().any(|m| m.id == id);
            let stored = !slot.wiped
                && !in_batch
                && self
                    .db
                    .get_pinned_cf(batch.families.messages, records::item_key(key, id))
                    .map_err(storage_error)?
                    .is_some();
            if in_batch || stored {
                removed.push(id);
            }
        }
        let slot = slot_of(&self.db, &mut batch.slots, &batch.families, db_key)?;
        for &id in &removed {
            batch
                .batch
                .delete_cf(batch.families.messages, records::item_key(key, id));
            slot.consumed.insert(id);
            slot.sent.retain(|m| m.id != id);
        }
        if let Some(meta) = slot.meta.as_mut() {
            let count = u64::try_from(removed.len()).unwrap_or(u64::MAX);
            meta.pending_messages = meta.pending_messages.saturating_sub(count);
        }
        Ok(())
    }

    /// The profile's data as of this point in the batch.
    fn current_data(
        &self,
        batch: &mut Batch<'_>,
        db_key: &[u8],
    ) -> Result<Option<Vec<u8>>, WriteError> {
        if let Some(written) =
            &slot_of(&self.db, &mut batch.slots, &batch.families, db_key)?.written
        {
            return Ok(written.clone());
        }
        self.db
            .get_cf(batch.families.data, db_key)
            .map_err(storage_error)
    }

    /// The data of a version, current or kept, as of this point in the batch.
    fn version_data(
        &self,
        batch: &mut Batch<'_>,
        key: &ProfileKey,
        db_key: &[u8],
        version: u64,
    ) -> Result<Option<Vec<u8>>, WriteError> {
        let current_version = slot_of(&self.db, &mut batch.slots, &batch.families, db_key)?
            .meta
            .as_ref()
            .map_or(0, |meta| meta.version);
        if version == current_version {
            return self.current_data(batch, db_key);
        }
        let slot = slot_of(&self.db, &mut batch.slots, &batch.families, db_key)?;
        if let Some((_, data)) = slot.kept.iter().find(|(v, _)| *v == version) {
            return Ok(Some(data.clone()));
        }
        if slot.wiped {
            return Ok(None);
        }
        let stored = self
            .db
            .get_pinned_cf(batch.families.history, records::item_key(key, version))
            .map_err(storage_error)?;
        stored
            .map(|value| records::decode_item(&value).map(|item| item.bytes))
            .transpose()
            .map_err(WriteError::Storage)
    }

    /// The profile's pending messages as of this point in the batch, oldest
    /// first.
    fn pending_messages(
        &self,
        batch: &mut Batch<'_>,
        key: &ProfileKey,
        db_key: &[u8],
    ) -> Result<Vec<Message>, WriteError> {
        let slot = slot_of(&self.db, &mut batch.slots, &batch.families, db_key)?;
        let mut messages = Vec::new();
        // The meta record counts pending messages, so the common case of
        // none costs no scan.
        let stored = slot
            .meta
            .as_ref()
            .is_some_and(|meta| meta.pending_messages > 0);
        if stored && !slot.wiped {
            messages = super::read::read_messages(&self.db, batch.families.messages, key, None)?;
            messages.retain(|m| !slot.consumed.contains(&m.id));
        }
        messages.extend(slot.sent.iter().cloned());
        Ok(messages)
    }

    /// Makes everything written durable and leaves no WAL to replay: every
    /// column family's memtable is flushed, not just the default family's,
    /// so the next start opens without replaying this run's writes.
    fn flush(&self) -> Result<(), String> {
        flush_all(&self.db)
    }
}

/// How a committer that recorded `failure` ends.
pub(super) fn ended(failure: durable::Failure) -> Ended {
    if failure.sync {
        Ended::SyncFailed(failure.message)
    } else {
        Ended::Failed(failure.message)
    }
}

/// Syncs the WAL and flushes every column family's memtable to synced
/// table files.
pub(super) fn flush_all(db: &DB) -> Result<(), String> {
    db.flush_wal(true).map_err(|err| err.into_string())?;
    let families = Families::of(db).ok_or_else(|| "a column family is missing".to_owned())?;
    db.flush_cfs_opt(
        &[
            families.meta,
            families.data,
            families.leases,
            families.messages,
            families.history,
        ],
        &rocksdb::FlushOptions::default(),
    )
    .map_err(|err| err.into_string())
}

impl Op {
    /// The profile the operation writes, if any.
    fn key(&self) -> Option<&ProfileKey> {
        match self {
            Self::Grant { key, .. }
            | Self::Send { key, .. }
            | Self::Admin { key, .. }
            | Self::Pending { key, .. } => Some(key),
            Self::Write { write, .. } => Some(&write.key),
            Self::HandOver { release, .. } => Some(&release.key),
            Self::Durable { .. } | Self::Close { .. } | Self::Wake => None,
        }
    }
}

impl RecordCache {
    /// Moves the cached records of the profiles `ops` touch out of the
    /// cache, as the batch's starting slots.
    fn take_for(&mut self, ops: &[Op]) -> HashMap<Vec<u8>, Slot> {
        // Sized once: growing it entry by entry rehashed several times in
        // every large batch.
        let mut slots = HashMap::with_capacity(ops.len());
        if self.entries.is_empty() {
            return slots;
        }
        for key in ops.iter().filter_map(Op::key) {
            let db_key = records::encode_key(key);
            if let Some((meta, lease)) = self.entries.remove(&db_key) {
                slots.insert(db_key, Slot::read(Some(meta), Some(lease)));
            }
        }
        slots
    }

    /// Keeps the records of every profile a committed batch left held, as
    /// room allows; profiles it left unheld are not cached.
    fn put_back(&mut self, slots: HashMap<Vec<u8>, Slot>) {
        for (db_key, slot) in slots {
            if let (Some(meta), Some(lease)) = (slot.meta, slot.lease)
                && self.entries.len() < self.capacity
            {
                self.entries.insert(db_key, (meta, lease));
            }
        }
    }
}

impl Slot {
    /// A slot holding records as read, before the batch changed anything.
    fn read(meta: Option<MetaRecord>, lease: Option<LeaseRecord>) -> Self {
        Self {
            meta,
            lease,
            written: None,
            sent: Vec::new(),
            consumed: HashSet::new(),
            kept: Vec::new(),
            wiped: false,
        }
    }
}

/// The profile's slot in this batch, read from the database on first use.
fn slot_of<'s>(
    db: &DB,
    slots: &'s mut HashMap<Vec<u8>, Slot>,
    families: &Families<'_>,
    db_key: &[u8],
) -> Result<&'s mut Slot, WriteError> {
    if !slots.contains_key(db_key) {
        let read = |family| db.get_pinned_cf(family, db_key).map_err(storage_error);
        let meta = read(families.meta)?
            .map(|bytes| records::decode_meta(&bytes))
            .transpose()
            .map_err(WriteError::Storage)?;
        let lease = read(families.leases)?
            .map(|bytes| records::decode_lease(&bytes))
            .transpose()
            .map_err(WriteError::Storage)?;
        slots.insert(db_key.to_vec(), Slot::read(meta, lease));
    }
    slots
        .get_mut(db_key)
        .ok_or_else(|| WriteError::Storage("batch slot vanished".to_owned()))
}

/// The key range holding every item under `prefix`: from id 0 up to, not
/// including, id `u64::MAX`, which is never given out.
pub(super) fn item_range(prefix: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut from = prefix.to_vec();
    from.extend_from_slice(&0u64.to_be_bytes());
    let mut to = prefix.to_vec();
    to.extend_from_slice(&u64::MAX.to_be_bytes());
    (from, to)
}

/// Keeps `data` as the profile's current version in history.
fn keep(
    batch: &mut WriteBatch,
    families: &Families<'_>,
    key: &ProfileKey,
    meta: &mut MetaRecord,
    data: &[u8],
    now_ms: u64,
) {
    batch.put_cf(
        families.history,
        records::item_key(key, meta.version),
        records::encode_item(now_ms, data),
    );
    meta.kept_version = meta.version;
    meta.kept_at_ms = now_ms;
}

/// Fails an operation without applying it, while the database is being
/// reopened. A `Close` is answered and returned, so the caller can stop.
pub(super) fn refuse(op: Op, err: &WriteError) -> Option<oneshot::Sender<Result<(), String>>> {
    match op {
        Op::Grant { reply, .. } => {
            let _ = reply.send(Err(err.clone()));
        }
        Op::Write { reply, .. } => {
            let _ = reply.send(Err(err.clone()));
        }
        Op::HandOver {
            released, granted, ..
        } => {
            let _ = released.send(Err(err.clone()));
            let _ = granted.send(Err(err.clone()));
        }
        Op::Send { reply, .. } => {
            let _ = reply.send(Err(err.clone()));
        }
        Op::Admin { reply, .. } => {
            let _ = reply.send(Err(err.clone()));
        }
        Op::Pending { reply, .. } => {
            let _ = reply.send(Err(err.clone()));
        }
        Op::Durable { reply } => {
            let _ = reply.send(Err(err.clone()));
        }
        Op::Close { reply } => return Some(reply),
        Op::Wake => {}
    }
    None
}

fn storage_error(err: rocksdb::Error) -> WriteError {
    WriteError::Storage(err.into_string())
}

impl std::fmt::Debug for Committer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Committer")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}
