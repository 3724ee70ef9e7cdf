//! The committer: one thread that applies every write, in batches.
//!
//! It blocks for the first pending operation, then takes every other one
//! already waiting (up to `max_batch`). Each operation is checked and applied
//! against the database as updated by the operations before it in the same
//! batch, the batch is written with one WAL sync, and only then is any
//! operation answered. If the write fails, every operation in the batch
//! fails and none is acknowledged.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::{SystemTime, UNIX_EPOCH};

use profiled_protocol::SessionId;
use rocksdb::{ColumnFamily, DB, WriteBatch, WriteOptions};
use tokio::sync::oneshot;

use super::records::{self, LeaseRecord, MetaRecord};
use super::{CF_DATA, CF_LEASES, CF_META, Granted, WriteError};
use crate::ProfileKey;

/// A write waiting for the committer. Each carries the sender its caller
/// awaits.
#[derive(Debug)]
pub(super) enum Op {
    Grant {
        key: ProfileKey,
        owner: SessionId,
        reply: oneshot::Sender<Result<Granted, WriteError>>,
    },
    /// A save (`release: false`) or a release, checked against the lease.
    Write {
        write: Write,
        reply: oneshot::Sender<Result<u64, WriteError>>,
    },
    /// Flush and stop after everything submitted before it.
    Close {
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// The committer's state; it lives on its own thread.
pub(super) struct Committer {
    db: Arc<DB>,
    write_options: WriteOptions,
    max_batch: usize,
}

/// A profile as seen part-way through a batch: what was read from the
/// database, with this batch's earlier writes applied.
struct Slot {
    meta: Option<MetaRecord>,
    lease: Option<LeaseRecord>,
    /// Data written earlier in this batch, which a later grant must return.
    written: Option<Vec<u8>>,
}

/// An answer held back until the batch is durable.
enum Answer {
    Granted(
        oneshot::Sender<Result<Granted, WriteError>>,
        Result<Granted, WriteError>,
    ),
    Version(
        oneshot::Sender<Result<u64, WriteError>>,
        Result<u64, WriteError>,
    ),
}

/// The column families, looked up once per batch.
struct Families<'a> {
    meta: &'a ColumnFamily,
    data: &'a ColumnFamily,
    leases: &'a ColumnFamily,
}

impl Committer {
    pub(super) fn new(db: Arc<DB>, sync: bool, max_batch: usize) -> Self {
        let mut write_options = WriteOptions::default();
        write_options.set_sync(sync);
        Self {
            db,
            write_options,
            max_batch,
        }
    }

    /// Runs until a `Close` op or until every sender is gone.
    pub(super) fn run(self, ops: Receiver<Op>) {
        let mut batch = Vec::with_capacity(self.max_batch);
        while let Ok(first) = ops.recv() {
            batch.push(first);
            while batch.len() < self.max_batch {
                match ops.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            if let Some(reply) = self.commit(&mut batch) {
                let flushed = self.flush();
                let _ = reply.send(flushed);
                return;
            }
        }
    }

    /// Applies and answers one batch. Returns the `Close` reply if the batch
    /// held one; operations after it in the batch fail with `Closed`.
    fn commit(&self, ops: &mut Vec<Op>) -> Option<oneshot::Sender<Result<(), String>>> {
        let Some(families) = self.families() else {
            // Unreachable after a successful open; fail the batch rather
            // than panic in the daemon.
            ops.clear();
            return None;
        };
        let now_ms = unix_ms();
        let mut batch = WriteBatch::default();
        let mut slots: HashMap<Vec<u8>, Slot> = HashMap::new();
        let mut answers = Vec::with_capacity(ops.len());
        let mut close = None;
        for op in ops.drain(..) {
            if close.is_some() {
                // Dropping the op's reply sender tells its caller `Closed`.
                continue;
            }
            match op {
                Op::Grant { key, owner, reply } => {
                    let outcome = self.grant(&families, &mut slots, &mut batch, key, owner, now_ms);
                    answers.push(Answer::Granted(reply, outcome));
                }
                Op::Write { write, reply } => {
                    let outcome = self.write(&families, &mut slots, &mut batch, write, now_ms);
                    answers.push(Answer::Version(reply, outcome));
                }
                Op::Close { reply } => close = Some(reply),
            }
        }
        let failure = if batch.is_empty() {
            None
        } else {
            self.db
                .write_opt(batch, &self.write_options)
                .err()
                .map(|err| WriteError::Storage(err.into_string()))
        };
        if let Some(err) = &failure {
            tracing::error!(error = %err, "a batch of writes failed; none was acknowledged");
        }
        for answer in answers {
            match answer {
                Answer::Granted(reply, outcome) => {
                    let _ = reply.send(fail_if(outcome, &failure));
                }
                Answer::Version(reply, outcome) => {
                    let _ = reply.send(fail_if(outcome, &failure));
                }
            }
        }
        close
    }

    fn grant(
        &self,
        families: &Families<'_>,
        slots: &mut HashMap<Vec<u8>, Slot>,
        batch: &mut WriteBatch,
        key: ProfileKey,
        owner: SessionId,
        now_ms: u64,
    ) -> Result<Granted, WriteError> {
        let db_key = records::encode_key(&key);
        let slot = self.slot(families, slots, &db_key)?;
        let data = match slot.written.clone() {
            Some(data) => Some(data),
            None => self
                .db
                .get_cf(families.data, &db_key)
                .map_err(|err| WriteError::Storage(err.into_string()))?,
        };
        let mut meta = slot.meta.clone().unwrap_or(MetaRecord {
            created_at_ms: now_ms,
            ..MetaRecord::default()
        });
        meta.epoch += 1;
        meta.load_count += 1;
        let lease = LeaseRecord {
            session: owner,
            epoch: meta.epoch,
            since_ms: now_ms,
        };
        batch.put_cf(families.meta, &db_key, records::encode(&meta));
        batch.put_cf(families.leases, &db_key, records::encode(&lease));
        slot.meta = Some(meta.clone());
        slot.lease = Some(lease.clone());
        Ok(Granted { lease, meta, data })
    }

    fn write(
        &self,
        families: &Families<'_>,
        slots: &mut HashMap<Vec<u8>, Slot>,
        batch: &mut WriteBatch,
        write: Write,
        now_ms: u64,
    ) -> Result<u64, WriteError> {
        let db_key = records::encode_key(&write.key);
        let slot = self.slot(families, slots, &db_key)?;
        let holds = slot
            .lease
            .as_ref()
            .is_some_and(|lease| lease.epoch == write.epoch && lease.session == write.owner);
        let Some(meta) = slot.meta.as_mut().filter(|_| holds) else {
            return Err(WriteError::LeaseLost);
        };
        if let Some(data) = write.data {
            meta.version += 1;
            meta.updated_at_ms = now_ms;
            batch.put_cf(families.data, &db_key, &data);
            batch.put_cf(families.meta, &db_key, records::encode(&*meta));
            slot.written = Some(data);
        }
        let version = meta.version;
        if write.release {
            batch.delete_cf(families.leases, &db_key);
            slot.lease = None;
        }
        Ok(version)
    }

    /// The profile's slot in this batch, read from the database on first use.
    fn slot<'s>(
        &self,
        families: &Families<'_>,
        slots: &'s mut HashMap<Vec<u8>, Slot>,
        db_key: &[u8],
    ) -> Result<&'s mut Slot, WriteError> {
        if !slots.contains_key(db_key) {
            let read = |family| {
                self.db
                    .get_pinned_cf(family, db_key)
                    .map_err(|err| WriteError::Storage(err.into_string()))
            };
            let meta = read(families.meta)?
                .map(|bytes| records::decode::<MetaRecord>(&bytes))
                .transpose()
                .map_err(WriteError::Storage)?;
            let lease = read(families.leases)?
                .map(|bytes| records::decode::<LeaseRecord>(&bytes))
                .transpose()
                .map_err(WriteError::Storage)?;
            slots.insert(
                db_key.to_vec(),
                Slot {
                    meta,
                    lease,
                    written: None,
                },
            );
        }
        slots
            .get_mut(db_key)
            .ok_or_else(|| WriteError::Storage("batch slot vanished".to_owned()))
    }

    fn families(&self) -> Option<Families<'_>> {
        Some(Families {
            meta: self.db.cf_handle(CF_META)?,
            data: self.db.cf_handle(CF_DATA)?,
            leases: self.db.cf_handle(CF_LEASES)?,
        })
    }

    /// Makes everything written durable and leaves little WAL to replay.
    fn flush(&self) -> Result<(), String> {
        self.db.flush_wal(true).map_err(|err| err.into_string())?;
        self.db.flush().map_err(|err| err.into_string())
    }
}

/// A save or release, checked against the stored lease.
#[derive(Debug)]
pub(super) struct Write {
    /// The profile.
    pub(super) key: ProfileKey,
    /// The session the lease must belong to.
    pub(super) owner: SessionId,
    /// The epoch the lease must have.
    pub(super) epoch: u64,
    /// The new data; `None` keeps the stored data (a bare release).
    pub(super) data: Option<Vec<u8>>,
    /// Whether the lease ends with this write.
    pub(super) release: bool,
}

/// The outcome to report once the batch's fate is known: a failed batch
/// turns every success into that failure.
fn fail_if<T>(
    outcome: Result<T, WriteError>,
    failure: &Option<WriteError>,
) -> Result<T, WriteError> {
    match failure {
        Some(err) if outcome.is_ok() => Err(err.clone()),
        _ => outcome,
    }
}

/// Wall-clock time for the records' timestamps.
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

impl std::fmt::Debug for Committer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Committer")
            .field("max_batch", &self.max_batch)
            .finish_non_exhaustive()
    }
}
