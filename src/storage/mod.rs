//! Durable profiles and leases, on RocksDB.
//!
//! This is the only module that knows RocksDB. It offers domain operations
//! (grant a lease, save under a lease, release a lease) and performs each as
//! one atomic check-and-write. Every write goes through a single committer
//! thread that gathers whatever is waiting into one `WriteBatch` and one WAL
//! sync (group commit), so durability costs one fsync per batch rather than
//! one per request, and writes to a profile apply in the order they were
//! submitted.
//!
//! The lease check lives here, next to the write it guards: a save or release
//! is applied only if the profile's stored lease has the caller's session and
//! epoch. Whatever the in-memory lease table believes, a fenced-off writer
//! cannot change a profile.
//!
//! Column families:
//! - `meta`: per-profile bookkeeping, including the last granted epoch, the
//!   meta tags and user ids, and message and history counters;
//! - `data`: the profile's bytes, compressed with LZ4;
//! - `leases`: the leases currently held, so a restart finds them without a
//!   full scan;
//! - `messages`: pending messages, by profile and id;
//! - `history`: kept versions, by profile and version, compressed with LZ4.
//!
//! Reads that need no lease (views, version listings, exports) and
//! maintenance (backups, pruning, sizes) run on the caller's blocking
//! thread against the database directly; they never wait for the committer.

mod commit;
mod durable;
mod lane;
mod maintenance;
mod read;
mod records;
mod recovery;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use profiled_protocol::{Changes, Message, SessionId};
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DB, Options, WriteBufferManager,
};
use tokio::sync::oneshot;

use crate::ProfileKey;
use crate::config::{HistoryConfig, StorageConfig};
pub use read::{ExportedRecord, VersionFilter, View};
pub use records::{LeaseRecord, MetaRecord};

/// A handle to the database and its committer. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Storage {
    shared: Arc<Shared>,
}

/// A lease that has been granted and made durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Granted {
    /// The lease, with its new epoch.
    pub lease: LeaseRecord,
    /// The profile's bookkeeping after the grant.
    pub meta: MetaRecord,
    /// The profile's data, `None` if it was never saved.
    pub data: Option<Vec<u8>>,
    /// The profile's pending messages, oldest first.
    pub messages: Vec<Message>,
}

/// Who a grant is for: the session, and the uid that connected it, which
/// is kept with the lease so that after a restart only that uid (or root)
/// may resume the session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grantee {
    /// The session that will hold the lease.
    pub session: SessionId,
    /// The uid that connected it; `None` if not known.
    pub uid: Option<u32>,
}

/// A message that has been made durable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sent {
    /// The message, with its id and time.
    pub message: Message,
    /// The lease on the profile when it was sent, whose holder should hear
    /// of it.
    pub lease: Option<LeaseRecord>,
}

/// An administrative change. Each ends any lease on the profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminAction {
    /// Write these bytes as the profile's data.
    Overwrite(Vec<u8>),
    /// Write a kept version's data as the profile's data.
    Rollback(u64),
    /// Write an exported profile: its data (if any), meta tags and user ids.
    Import {
        /// The data; `None` keeps the stored data.
        data: Option<Vec<u8>>,
        /// The meta tags, replacing the stored ones.
        meta_tags: BTreeMap<String, Vec<u8>>,
        /// The user ids, replacing the stored ones.
        user_ids: Vec<u64>,
    },
    /// Erase the data, metadata, versions and messages, keeping only the
    /// counters that must never go backwards.
    Wipe,
    /// Only end the lease.
    Revoke,
}

/// The outcome of an [`AdminAction`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminDone {
    /// The profile's version afterwards.
    pub version: u64,
    /// The lease that was ended, if one was held.
    pub ended: Option<LeaseRecord>,
}

/// What opening the database found.
#[derive(Clone, Debug, Default)]
pub struct Recovery {
    /// Leases still held when the previous run stopped (it crashed, or was
    /// killed). Their sessions may come back and resume them.
    pub leases: Vec<(ProfileKey, LeaseRecord)>,
}

/// Why a write was not applied.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WriteError {
    /// The profile's lease is not the caller's session and epoch.
    #[error("the lease is no longer held with this epoch")]
    LeaseLost,
    /// RocksDB failed; nothing in the batch was applied.
    #[error("storage failure: {0}")]
    Storage(String),
    /// The profile already has the most pending messages allowed.
    #[error("the profile has {0} pending messages, the most allowed")]
    TooManyMessages(u64),
    /// The profile, or the version asked for, does not exist.
    #[error("not found")]
    NotFound,
    /// The committer has stopped; the daemon is closing.
    #[error("storage is closed")]
    Closed,
    /// A grant handed over by a release found the profile still leased:
    /// the release did not happen.
    #[error("the profile is still leased")]
    Held,
    /// A backup's target path already exists; nothing was written.
    #[error("{0} already exists")]
    Exists(String),
}

/// Why the database could not be opened or closed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// RocksDB refused.
    #[error("rocksdb at {path}: {message}")]
    Db {
        /// The database directory.
        path: String,
        /// RocksDB's message.
        message: String,
    },
    /// A stored record could not be read.
    #[error("corrupt record in {path}: {message}")]
    Corrupt {
        /// The database directory.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The committer thread could not be started or did not stop cleanly.
    #[error("committer thread: {0}")]
    Committer(String),
    /// A WAL sync failed; see [`Storage::failed_for_good`].
    #[error(
        "syncing the WAL failed, so the daemon stopped; the next start recovers from what storage holds: {0}"
    )]
    SyncFailed(String),
}

/// State shared by every handle.
#[derive(Debug)]
struct Shared {
    /// The open database, for reads and maintenance, which bypass the
    /// committer. The committer thread empties and refills it when it
    /// reopens the database after a failed write.
    db: Arc<recovery::DbSlot>,
    /// The database directory, for messages and size reports.
    path: std::path::PathBuf,
    /// How long kept versions are shown before the sweep prunes them.
    retention_ms: u64,
    /// Feeds the committer thread, which holds the receiving end.
    ops: std::sync::mpsc::Sender<commit::Op>,
    /// The committer, shared with its thread, through which every write is
    /// submitted and saves may be committed inline.
    lane: Arc<lane::Lane>,
    /// WAL syncs made for acknowledgements, counted by the committer's
    /// syncer (or the committer, when each write syncs itself), and how far
    /// they made the WAL durable, which reads check.
    progress: Arc<durable::Progress>,
    /// Whether acknowledgements wait for a WAL sync (`storage.sync`); if
    /// so, reads wait for one too before they show a write.
    sync: bool,
    /// The committer, joined by [`Storage::close`].
    committer: Mutex<Option<JoinHandle<()>>>,
}

/// RocksDB's memory in use now, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryUse {
    /// Memtables of every column family, those being flushed included.
    pub memtables: u64,
    /// The shared table block cache.
    pub block_cache: u64,
}

/// What RocksDB may use of memory; a reopen after a failed write gets the
/// same.
#[derive(Clone, Copy, Debug)]
struct Memory {
    /// Every column family's memtables together (`storage.memtable_bytes`).
    memtables: usize,
    /// The table block cache that every family shares
    /// (`storage.block_cache_bytes`).
    block_cache: usize,
}

/// The column families, looked up once per use.
struct Families<'a> {
    meta: &'a ColumnFamily,
    data: &'a ColumnFamily,
    leases: &'a ColumnFamily,
    messages: &'a ColumnFamily,
    history: &'a ColumnFamily,
}

/// The most WAL kept before the oldest is flushed away; it bounds how much a
/// start after a crash replays.
const MAX_WAL_BYTES: u64 = 128 << 20;

/// The largest memtable of one column family: RocksDB's default, which a
/// generous `storage.memtable_bytes` keeps.
const MAX_FAMILY_MEMTABLE: usize = 64 << 20;

/// The most hash buckets of a `data` memtable. A 64 MiB memtable of 2 KiB
/// profiles holds about 30,000 distinct keys, so chains stay a few keys
/// long; the bucket array costs 512 KiB of that memtable.
const MAX_DATA_MEMTABLE_BUCKETS: usize = 1 << 16;

/// The hash buckets of a `data` memtable of `write_buffer` bytes: one per
/// KiB, within [`MAX_DATA_MEMTABLE_BUCKETS`], so that the bucket array
/// (eight bytes a bucket, allocated with the memtable) stays under 1% of
/// it. A fixed count would fill the smallest memtables allowed (256 KiB)
/// with the array alone, and every write would flush.
fn data_memtable_buckets(write_buffer: usize) -> usize {
    (write_buffer / 1024).clamp(1, MAX_DATA_MEMTABLE_BUCKETS)
}

const CF_META: &str = "meta";
const CF_DATA: &str = "data";
const CF_LEASES: &str = "leases";
const CF_MESSAGES: &str = "messages";
const CF_HISTORY: &str = "history";

impl Storage {
    /// Opens (or creates) the database and starts its committer. Leases
    /// recorded by a previous run are returned, still held.
    pub fn open(
        config: &StorageConfig,
        history: &HistoryConfig,
    ) -> Result<(Self, Recovery), StorageError> {
        let path = &config.path;
        let memory = Memory {
            memtables: config.memtable_bytes,
            block_cache: config.block_cache_bytes,
        };
        let db = open_db(path, memory)?;
        let recovery = Recovery {
            leases: read_leases(&db, path)?,
        };
        let db = Arc::new(db);
        let (ops, receiver) = std::sync::mpsc::channel();
        let rules = commit::HistoryRules {
            interval_ms: duration_ms(history.interval),
        };
        let progress = Arc::new(durable::Progress::default());
        let committer = commit::Committer::new(
            Arc::clone(&db),
            commit::Settings::of(config, rules),
            Arc::clone(&progress),
        );
        let lane = Arc::new(lane::Lane::new(committer));
        let slot = Arc::new(recovery::DbSlot::new(db));
        let thread_lane = Arc::clone(&lane);
        let thread_slot = Arc::clone(&slot);
        let thread_path = path.clone();
        let handle = std::thread::Builder::new()
            .name("profiled-commit".to_owned())
            .spawn(move || {
                let mut queue = commit::Queue::new(receiver);
                recovery::run_committer(
                    &thread_lane,
                    &mut queue,
                    &thread_slot,
                    &thread_path,
                    memory,
                );
            })
            .map_err(|err| StorageError::Committer(err.to_string()))?;
        let shared = Arc::new(Shared {
            db: slot,
            path: path.clone(),
            retention_ms: duration_ms(history.retention),
            ops,
            lane,
            progress,
            sync: config.sync,
            committer: Mutex::new(Some(handle)),
        });
        Ok((Self { shared }, recovery))
    }

    /// Grants `owner` a lease on `key` with the next epoch, taking it from
    /// any current holder; deciding whether that is allowed is the lease
    /// table's job. Resolves once the grant is durable.
    pub fn grant(
        &self,
        key: ProfileKey,
        to: Grantee,
    ) -> impl Future<Output = Result<Granted, WriteError>> + Send + 'static {
        let (reply, done) = oneshot::channel();
        self.submit(commit::Op::Grant { key, to, reply });
        async move { done.await.unwrap_or(Err(WriteError::Closed)) }
    }

    /// Ends `owner`'s lease on `key` under `epoch` as [`Storage::release`]
    /// does, and grants `next` a lease right behind it, in the same batch
    /// and so the same sync. The grant is refused with
    /// [`WriteError::Held`] if the profile is still leased once the release
    /// has been applied (the release failed): it never takes the profile
    /// from a holder. Resolves to both outcomes, the release's first.
    pub fn hand_over(
        &self,
        key: ProfileKey,
        owner: SessionId,
        epoch: u64,
        data: Option<Vec<u8>>,
        changes: Changes,
        next: Grantee,
    ) -> (
        impl Future<Output = Result<u64, WriteError>> + Send + 'static,
        impl Future<Output = Result<Granted, WriteError>> + Send + 'static,
    ) {
        let (released, release_done) = oneshot::channel();
        let (granted, grant_done) = oneshot::channel();
        self.submit(commit::Op::HandOver {
            release: commit::Write {
                key,
                owner,
                epoch,
                data,
                changes,
                release: true,
            },
            released,
            next,
            granted,
        });
        (
            async move { release_done.await.unwrap_or(Err(WriteError::Closed)) },
            async move { grant_done.await.unwrap_or(Err(WriteError::Closed)) },
        )
    }

    /// Writes `data` if `owner` holds `key` under `epoch`. Resolves to the
    /// profile's new version once the write is durable. In buffered mode,
    /// with the committer idle, the save is committed before this returns,
    /// on the caller's thread ([`lane`]).
    pub fn save(
        &self,
        key: ProfileKey,
        owner: SessionId,
        epoch: u64,
        data: Vec<u8>,
        changes: Changes,
    ) -> impl Future<Output = Result<u64, WriteError>> + Send + 'static {
        let write = commit::Write {
            key,
            owner,
            epoch,
            data: Some(data),
            changes,
            release: false,
        };
        let done = self.shared.lane.save(&self.shared.ops, write);
        async move { done.await.unwrap_or(Err(WriteError::Closed)) }
    }

    /// Ends `owner`'s lease on `key` under `epoch`, writing `data` first if
    /// given. Resolves to the profile's version once durable.
    pub fn release(
        &self,
        key: ProfileKey,
        owner: SessionId,
        epoch: u64,
        data: Option<Vec<u8>>,
        changes: Changes,
    ) -> impl Future<Output = Result<u64, WriteError>> + Send + 'static {
        self.write(commit::Write {
            key,
            owner,
            epoch,
            data,
            changes,
            release: true,
        })
    }

    /// Queues a message for `key`, unless it already has `max_pending`.
    /// Resolves once the message is durable.
    pub fn send_message(
        &self,
        key: ProfileKey,
        payload: Vec<u8>,
        max_pending: u64,
    ) -> impl Future<Output = Result<Sent, WriteError>> + Send + 'static {
        let (reply, done) = oneshot::channel();
        self.submit(commit::Op::Send {
            key,
            payload,
            max_pending,
            reply,
        });
        async move { done.await.unwrap_or(Err(WriteError::Closed)) }
    }

    /// Applies an administrative change to `key`, ending any lease on it.
    /// Resolves once the change is durable.
    pub fn admin(
        &self,
        key: ProfileKey,
        action: AdminAction,
    ) -> impl Future<Output = Result<AdminDone, WriteError>> + Send + 'static {
        let (reply, done) = oneshot::channel();
        self.submit(commit::Op::Admin { key, action, reply });
        async move { done.await.unwrap_or(Err(WriteError::Closed)) }
    }

    /// Reads `key`'s pending messages, oldest first, in the order of
    /// writes: the answer includes every message sent before this call,
    /// unless consumed, and none sent after it. Resolves once what it read
    /// is durable.
    pub fn pending_messages(
        &self,
        key: ProfileKey,
    ) -> impl Future<Output = Result<Vec<Message>, WriteError>> + Send + 'static {
        let (reply, done) = oneshot::channel();
        self.submit(commit::Op::Pending { key, reply });
        async move { done.await.unwrap_or(Err(WriteError::Closed)) }
    }

    /// Resolves once every write submitted before this call is durable.
    fn durable(&self) -> impl Future<Output = Result<(), WriteError>> + Send + 'static {
        let (reply, done) = oneshot::channel();
        self.submit(commit::Op::Durable { reply });
        async move { done.await.unwrap_or(Err(WriteError::Closed)) }
    }

    /// Resolves once storage has failed for good: a WAL sync failed, so
    /// nothing more can be acknowledged, and what the failed sync covered
    /// may or may not be on disk. Every operation fails from then on, and
    /// the database is not touched again: the daemon must stop, and the
    /// next start, once the disk is sound, recovers from what it holds.
    pub async fn failed_for_good(&self) -> String {
        self.shared.db.failed_for_good().await
    }

    /// Whether the last write failed and the database has not yet been
    /// reopened: every write fails meanwhile. Reported in stats.
    pub fn is_degraded(&self) -> bool {
        self.shared.db.is_degraded()
    }

    /// RocksDB's memtables and block cache in use now; zeros while the
    /// database is being reopened.
    pub fn memory_use(&self) -> MemoryUse {
        let Ok(db) = self.shared.db.get() else {
            return MemoryUse::default();
        };
        let Some(families) = Families::of(&db) else {
            return MemoryUse::default();
        };
        let property = |family: &ColumnFamily, name: &str| {
            db.property_int_value_cf(family, name)
                .ok()
                .flatten()
                .unwrap_or(0)
        };
        let memtables = families
            .all()
            .into_iter()
            .map(|family| property(family, "rocksdb.cur-size-all-mem-tables"))
            .sum();
        // Every family shares the one cache, so any family reports it.
        let block_cache = property(families.meta, "rocksdb.block-cache-usage");
        MemoryUse {
            memtables,
            block_cache,
        }
    }

    /// How many WAL syncs acknowledgements have waited for since the open.
    pub fn wal_syncs(&self) -> u64 {
        self.shared.progress.syncs.load(Ordering::Relaxed)
    }

    /// Applies every write submitted before this call, flushes the WAL and
    /// memtables, and stops the committer. Later writes fail with
    /// [`WriteError::Closed`]. The database itself closes when the last
    /// handle is dropped.
    pub async fn close(&self) -> Result<(), StorageError> {
        let (reply, done) = oneshot::channel();
        self.submit(commit::Op::Close { reply });
        let flushed = done.await.unwrap_or(Ok(()));
        let handle = self.shared.committer.lock().ok().and_then(|mut h| h.take());
        if let Some(handle) = handle {
            tokio::task::spawn_blocking(move || handle.join())
                .await
                .map_err(|err| StorageError::Committer(err.to_string()))?
                .map_err(|_| StorageError::Committer("the committer panicked".to_owned()))?;
        }
        flushed.map_err(StorageError::Committer)
    }

    fn write(
        &self,
        write: commit::Write,
    ) -> impl Future<Output = Result<u64, WriteError>> + Send + 'static {
        let (reply, done) = oneshot::channel();
        self.submit(commit::Op::Write { write, reply });
        async move { done.await.unwrap_or(Err(WriteError::Closed)) }
    }

    fn submit(&self, op: commit::Op) {
        self.shared.lane.submit(&self.shared.ops, op);
    }
}

impl<'a> Families<'a> {
    /// Looks the families up; `None` only if the database was opened
    /// without them, which [`open_db`] never does.
    fn of(db: &'a DB) -> Option<Self> {
        Some(Self {
            meta: db.cf_handle(CF_META)?,
            data: db.cf_handle(CF_DATA)?,
            leases: db.cf_handle(CF_LEASES)?,
            messages: db.cf_handle(CF_MESSAGES)?,
            history: db.cf_handle(CF_HISTORY)?,
        })
    }

    /// Every family.
    fn all(&self) -> [&'a ColumnFamily; 5] {
        [
            self.meta,
            self.data,
            self.leases,
            self.messages,
            self.history,
        ]
    }
}

/// Wall-clock time for the records' timestamps.
fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, duration_ms)
}

/// Whole milliseconds, saturating.
fn duration_ms(duration: std::time::Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Opens the database with the column families and tuning profiled uses.
fn open_db(path: &Path, memory: Memory) -> Result<DB, StorageError> {
    let db_err = |err: rocksdb::Error| StorageError::Db {
        path: path.display().to_string(),
        message: err.into_string(),
    };
    let mut options = Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    options.increase_parallelism(2);
    // A WAL file that is no longer needed is reused rather than deleted.
    // Appending to a new file makes every sync also write the file's size
    // to its inode; overwriting a reused one does not, which on ext4 took a
    // synced write from about 440 to 265 microseconds (docs/PERFORMANCE.md).
    options.set_recycle_log_file_num(4);
    // A column family written rarely (leases, messages) would otherwise pin
    // every WAL file since its last flush: with the default limit (four
    // times all write buffers, gigabytes here) a start after a crash
    // replayed that much. Past this size RocksDB flushes the families that
    // pin the oldest WAL file.
    options.set_max_total_wal_size(MAX_WAL_BYTES);
    // Only one batch is written at a time (one committer, or one inline
    // commit under the lane's lock), so RocksDB's concurrent memtable
    // inserts would buy nothing; and the hash memtable of `data` below
    // requires them off.
    options.set_allow_concurrent_memtable_write(false);

    // Every family's memtables share one budget, past which RocksDB
    // flushes the family whose memtable is oldest. Its stall (a write waits until a flush frees
    // memory) stays off, as a precaution: a stalled writer waits only for
    // memory to be freed, and a flush that keeps failing (a full disk)
    // frees none, where the committer must fail the write and reopen the
    // database. RocksDB's own limit of two memtables per family, each a
    // quarter of the budget, still makes writes wait for a flush, and
    // gives up on a background error; so memtables stay under about two
    // and a half times the budget (plus the batch being written), and near
    // it while flushes keep up.
    let write_buffers = WriteBufferManager::new_write_buffer_manager(memory.memtables, false);
    options.set_write_buffer_manager(&write_buffers);

    // Point lookups dominate, so every family gets a bloom filter. Every
    // family shares one block cache, and index and filter blocks are kept
    // in it too, so the cache's size bounds them; level 0's, which every
    // lookup reads, stay pinned there. The price: a database whose index
    // and filter blocks outgrow the cache reads some of them from disk
    // again, where they used to stay in memory however large.
    let cache = Cache::new_lru_cache(memory.block_cache);
    let mut table = BlockBasedOptions::default();
    table.set_bloom_filter(10.0, false);
    table.set_block_cache(&cache);
    table.set_cache_index_and_filter_blocks(true);
    table.set_pin_l0_filter_and_index_blocks_in_cache(true);
    let mut small = Options::default();
    small.set_block_based_table_factory(&table);
    // No one family may hold the whole budget: each flushes on its own at
    // a quarter of it (see the write buffer manager above).
    let write_buffer = (memory.memtables / 4).min(MAX_FAMILY_MEMTABLE);
    small.set_write_buffer_size(write_buffer);
    let mut history = small.clone();
    history.set_compression_type(rocksdb::DBCompressionType::Lz4);
    // `data` is only ever read and written one whole key at a time, never
    // iterated, so its memtable hashes each key to a bucket of its own
    // versions. In the default skip list every save's insert walked about
    // eight levels of nodes spread over a memtable far larger than the
    // CPU's cache: with meta's insert, a tenth of the daemon's CPU at
    // W = 32 (docs/PERFORMANCE.md, eighth round). The prefix extractor
    // that keys the buckets is the whole key. An iterator over `data`
    // would see only one key unless it asked for total order; a flush,
    // which does, sorts a copy of the memtable first, on a background
    // thread.
    let mut data = history.clone();
    data.set_prefix_extractor(rocksdb::SliceTransform::create_noop());
    data.set_memtable_factory(rocksdb::MemtableFactory::HashSkipList {
        bucket_count: data_memtable_buckets(write_buffer),
        height: 4,
        branching_factor: 4,
    });

    let families = vec![
        ColumnFamilyDescriptor::new(CF_META, small.clone()),
        ColumnFamilyDescriptor::new(CF_DATA, data),
        ColumnFamilyDescriptor::new(CF_LEASES, small.clone()),
        ColumnFamilyDescriptor::new(CF_MESSAGES, small),
        ColumnFamilyDescriptor::new(CF_HISTORY, history),
    ];
    DB::open_cf_descriptors(&options, path, families).map_err(db_err)
}

/// Reads every lease recorded in the `leases` column family.
fn read_leases(db: &DB, path: &Path) -> Result<Vec<(ProfileKey, LeaseRecord)>, StorageError> {
    let corrupt = |message: String| StorageError::Corrupt {
        path: path.display().to_string(),
        message,
    };
    let leases = db
        .cf_handle(CF_LEASES)
        .ok_or_else(|| corrupt("the leases column family is missing".to_owned()))?;
    let mut found = Vec::new();
    for entry in db.iterator_cf(leases, rocksdb::IteratorMode::Start) {
        let (key, value) = entry.map_err(|err| StorageError::Db {
            path: path.display().to_string(),
            message: err.into_string(),
        })?;
        let key = records::decode_key(&key)
            .ok_or_else(|| corrupt("a lease has an undecodable key".to_owned()))?;
        let lease = records::decode_lease(&value)
            .map_err(|err| corrupt(format!("the lease of {key}: {err}")))?;
        found.push((key, lease));
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::VersionFilter;
    use futures::future::BoxFuture;
    use tokio_util::sync::CancellationToken;

    fn open(dir: &Path) -> (Storage, Recovery) {
        open_at(&dir.join("db"))
    }

    fn open_at(path: &Path) -> (Storage, Recovery) {
        let config = StorageConfig {
            path: path.to_owned(),
            ..StorageConfig::default()
        };
        Storage::open(&config, &HistoryConfig::default()).expect("open")
    }

    pub(super) fn session(job: &str) -> SessionId {
        SessionId {
            place_id: 1,
            job_id: job.to_owned(),
        }
    }

    /// A grant to session `job`, with no uid recorded.
    fn grantee(job: &str) -> Grantee {
        Grantee {
            session: session(job),
            uid: None,
        }
    }

    /// Grants `key` to session `job` and returns the lease's epoch.
    pub(super) async fn grant_epoch(storage: &Storage, key: &ProfileKey, job: &str) -> u64 {
        storage
            .grant(key.clone(), grantee(job))
            .await
            .expect("grant")
            .lease
            .epoch
    }

    #[tokio::test]
    async fn a_save_needs_the_current_session_and_epoch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (storage, _) = open(dir.path());
        let key = ProfileKey::new("s", "k");
        let first = storage
            .grant(key.clone(), grantee("a"))
            .await
            .expect("grant");
        assert_eq!(first.lease.epoch, 1);
        assert_eq!(first.data, None);
        let version = storage
            .save(
                key.clone(),
                session("a"),
                1,
                b"one".to_vec(),
                Changes::default(),
            )
            .await
            .expect("save");
        assert_eq!(version, 1);
        let wrong_session = storage.save(
            key.clone(),
            session("b"),
            1,
            b"x".to_vec(),
            Changes::default(),
        );
        assert_eq!(wrong_session.await, Err(WriteError::LeaseLost));
        let wrong_epoch = storage.save(
            key.clone(),
            session("a"),
            2,
            b"x".to_vec(),
            Changes::default(),
        );
        assert_eq!(wrong_epoch.await, Err(WriteError::LeaseLost));

        let second = storage
            .grant(key.clone(), grantee("b"))
            .await
            .expect("steal");
        assert_eq!(second.lease.epoch, 2);
        assert_eq!(second.data.as_deref(), Some(&b"one"[..]));
        let fenced = storage.save(
            key.clone(),
            session("a"),
            1,
            b"late".to_vec(),
            Changes::default(),
        );
        assert_eq!(fenced.await, Err(WriteError::LeaseLost));
        storage.close().await.expect("close");
    }

    #[tokio::test]
    async fn epochs_and_leases_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = ProfileKey::new("s", "k");
        {
            let (storage, _) = open(dir.path());
            storage
                .grant(key.clone(), grantee("a"))
                .await
                .expect("grant");
            storage
                .grant(key.clone(), grantee("b"))
                .await
                .expect("grant");
            storage
                .save(
                    key.clone(),
                    session("b"),
                    2,
                    b"kept".to_vec(),
                    Changes::default(),
                )
                .await
                .expect("save");
            storage.close().await.expect("close");
        }
        let (storage, recovery) = open(dir.path());
        assert_eq!(recovery.leases.len(), 1);
        let (recovered_key, lease) = &recovery.leases[0];
        assert_eq!(recovered_key, &key);
        assert_eq!((lease.session.clone(), lease.epoch), (session("b"), 2));
        let granted = storage
            .grant(key.clone(), grantee("c"))
            .await
            .expect("grant");
        assert_eq!(granted.lease.epoch, 3);
        assert_eq!(granted.meta.load_count, 3);
        assert_eq!(granted.data.as_deref(), Some(&b"kept"[..]));
        storage.close().await.expect("close");
    }

    #[tokio::test]
    async fn writes_in_one_batch_see_each_other_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (storage, _) = open(dir.path());
        let key = ProfileKey::new("s", "k");
        // Submitted back to back, these usually land in one batch; the
        // outcome must be the same either way.
        let grant = storage.grant(key.clone(), grantee("a"));
        let save = storage.save(
            key.clone(),
            session("a"),
            1,
            b"v1".to_vec(),
            Changes::default(),
        );
        let release = storage.release(
            key.clone(),
            session("a"),
            1,
            Some(b"v2".to_vec()),
            Changes::default(),
        );
        let late = storage.save(
            key.clone(),
            session("a"),
            1,
            b"v3".to_vec(),
            Changes::default(),
        );
        let regrant = storage.grant(key.clone(), grantee("b"));
        assert_eq!(grant.await.expect("grant").lease.epoch, 1);
        assert_eq!(save.await, Ok(1));
        assert_eq!(release.await, Ok(2));
        assert_eq!(late.await, Err(WriteError::LeaseLost));
        let regrant = regrant.await.expect("regrant");
        assert_eq!(regrant.lease.epoch, 2);
        assert_eq!(regrant.data.as_deref(), Some(&b"v2"[..]));
        assert_eq!(regrant.meta.version, 2);
        storage.close().await.expect("close");
        assert_eq!(
            storage
                .save(key, session("b"), 2, vec![], Changes::default())
                .await,
            Err(WriteError::Closed)
        );
    }

    #[tokio::test]
    async fn a_hand_over_grants_behind_a_release_in_one_sync_and_never_takes_a_held_lease() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (storage, _) = open(dir.path());
        let key = ProfileKey::new("s", "k");
        assert_eq!(grant_epoch(&storage, &key, "a").await, 1);
        // A release that fails (a stale epoch here) leaves the profile
        // held, so the grant behind it is refused.
        let (released, granted) = storage.hand_over(
            key.clone(),
            session("a"),
            7,
            None,
            Changes::default(),
            grantee("b"),
        );
        assert_eq!(released.await, Err(WriteError::LeaseLost));
        assert_eq!(granted.await.map(|g| g.lease.epoch), Err(WriteError::Held));
        let save = storage.save(
            key.clone(),
            session("a"),
            1,
            b"v1".to_vec(),
            Changes::default(),
        );
        assert_eq!(save.await, Ok(1), "the holder kept its lease");
        // Behind a release that happens, the next holder is granted the
        // released data, and both wait for the same one sync.
        let before = storage.wal_syncs();
        let (released, granted) = storage.hand_over(
            key.clone(),
            session("a"),
            1,
            Some(b"v2".to_vec()),
            Changes::default(),
            grantee("b"),
        );
        assert_eq!(released.await, Ok(2));
        let granted = granted.await.expect("granted behind the release");
        assert_eq!(storage.wal_syncs() - before, 1);
        assert_eq!(granted.lease.epoch, 2);
        assert_eq!(granted.data.as_deref(), Some(&b"v2"[..]));
        storage.close().await.expect("close");
    }

    fn keep_all() -> HistoryConfig {
        HistoryConfig {
            interval: std::time::Duration::ZERO,
            ..HistoryConfig::default()
        }
    }

    fn all_versions() -> VersionFilter {
        VersionFilter {
            newest_first: false,
            from_ms: None,
            to_ms: None,
            limit: 100,
        }
    }

    #[tokio::test]
    async fn pruning_removes_kept_versions_older_than_the_cutoff_but_never_the_current() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = StorageConfig {
            path: dir.path().join("db"),
            ..StorageConfig::default()
        };
        let (storage, _) = Storage::open(&config, &keep_all()).expect("open");
        let key = ProfileKey::new("s", "k");
        storage
            .grant(key.clone(), grantee("a"))
            .await
            .expect("grant");
        for data in [b"v1", b"v2", b"v3"] {
            storage
                .save(
                    key.clone(),
                    session("a"),
                    1,
                    data.to_vec(),
                    Changes::default(),
                )
                .await
                .expect("save");
        }
        let listed = |list: Vec<profiled_protocol::VersionInfo>| {
            list.iter().map(|v| v.version).collect::<Vec<_>>()
        };
        let before = storage
            .list_versions(key.clone(), all_versions())
            .await
            .expect("list");
        assert_eq!(listed(before), [1, 2, 3]);

        let running = CancellationToken::new;
        assert_eq!(storage.prune_history(0, running()).await.expect("prune"), 0);
        // A sweep asked to stop before it starts prunes nothing.
        let stopped = CancellationToken::new();
        stopped.cancel();
        assert_eq!(
            storage
                .prune_history(u64::MAX, stopped)
                .await
                .expect("prune"),
            0,
            "a stopped sweep does nothing"
        );
        let pruned = storage
            .prune_history(u64::MAX, running())
            .await
            .expect("prune");
        assert_eq!(
            pruned, 2,
            "every kept version is older than the cutoff, but the newest stays"
        );
        let after = storage
            .list_versions(key.clone(), all_versions())
            .await
            .expect("list");
        assert_eq!(listed(after), [3], "the current version is always listed");
        assert_eq!(
            storage.view(key.clone(), Some(1)).await,
            Err(WriteError::NotFound)
        );
        let current = storage.view(key.clone(), Some(3)).await.expect("current");
        assert_eq!(current.data.as_deref(), Some(&b"v3"[..]));

        // The overwrite keeps the data it replaces only if its version is not
        // kept yet; pruning the newest kept version would have lost v3 here.
        storage
            .admin(key.clone(), AdminAction::Overwrite(b"admin".to_vec()))
            .await
            .expect("overwrite");
        let restorable = storage.view(key.clone(), Some(3)).await.expect("v3 kept");
        assert_eq!(restorable.data.as_deref(), Some(&b"v3"[..]));
        // A second sweep leaves the newest kept version (the overwrite's) and
        // prunes what is older.
        storage
            .prune_history(u64::MAX, running())
            .await
            .expect("prune");
        assert_eq!(
            listed(
                storage
                    .list_versions(key, all_versions())
                    .await
                    .expect("list")
            ),
            [4]
        );
        storage.close().await.expect("close");
    }

    #[tokio::test]
    async fn messages_and_wipes_in_one_batch_are_seen_by_a_later_grant() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (storage, _) = open(dir.path());
        let key = ProfileKey::new("s", "k");
        // Submitted back to back, these usually share a batch; the outcome
        // must be the same either way.
        let first = storage.send_message(key.clone(), b"one".to_vec(), 10);
        let grant = storage.grant(key.clone(), grantee("a"));
        let second = storage.send_message(key.clone(), b"two".to_vec(), 10);
        let consume = storage.save(
            key.clone(),
            session("a"),
            1,
            b"applied".to_vec(),
            Changes {
                consumed_messages: vec![1],
                ..Changes::default()
            },
        );
        let regrant = storage.grant(key.clone(), grantee("b"));
        let wipe = storage.admin(key.clone(), AdminAction::Wipe);
        let after_wipe = storage.grant(key.clone(), grantee("c"));

        assert_eq!(first.await.expect("send").message.id, 1);
        let granted = grant.await.expect("grant");
        assert_eq!(granted.messages.len(), 1);
        let sent = second.await.expect("send");
        assert_eq!(sent.message.id, 2);
        assert_eq!(sent.lease.map(|l| l.epoch), Some(1), "sent under a's lease");
        assert_eq!(consume.await, Ok(1));
        let regranted = regrant.await.expect("regrant");
        let ids: Vec<u64> = regranted.messages.iter().map(|m| m.id).collect();
        assert_eq!(
            ids,
            [2],
            "the consumed message is gone, the later one pending"
        );
        assert_eq!(regranted.data.as_deref(), Some(&b"applied"[..]));
        let wiped = wipe.await.expect("wipe");
        assert_eq!(wiped.ended.map(|l| l.epoch), Some(2));
        let fresh = after_wipe.await.expect("grant after the wipe");
        assert!(fresh.messages.is_empty());
        assert_eq!(fresh.data, None);
        assert_eq!(fresh.lease.epoch, 3, "the epoch counter survives the wipe");
        assert_eq!(fresh.meta.load_count, 1);
        storage.close().await.expect("close");
    }

    /// Storage at `dir` with profile s/k leased to session "a" at epoch 1
    /// and saved once (version 1).
    async fn saved_once(dir: &Path) -> (Storage, ProfileKey) {
        let (storage, _) = open(dir);
        let key = ProfileKey::new("s", "k");
        assert_eq!(grant_epoch(&storage, &key, "a").await, 1);
        assert_eq!(save_as_a(&storage, &key, b"v1").await, Ok(1));
        (storage, key)
    }

    /// Saves `data` to `key` as session `a`, under the first lease's epoch.
    pub(super) fn save_as_a(
        storage: &Storage,
        key: &ProfileKey,
        data: &[u8],
    ) -> impl Future<Output = Result<u64, WriteError>> + Send + 'static {
        storage.save(
            key.clone(),
            session("a"),
            1,
            data.to_vec(),
            Changes::default(),
        )
    }

    /// Holds the syncs of the database at `db_path` back and then starts
    /// the write `start` submits (storage submits when called, so the
    /// hold must come first); returns once it is written and its sync
    /// waits. The write is made by the committer thread: a save committed
    /// inline would wait for its sync on this test's own thread.
    async fn with_sync_held<T: Send + 'static, F: Future<Output = T> + Send + 'static>(
        storage: &Storage,
        db_path: &Path,
        start: impl FnOnce() -> F,
    ) -> tokio::task::JoinHandle<T> {
        durable::faults::hold_syncs(db_path);
        let written = {
            let _busy = storage.shared.lane.busy();
            tokio::spawn(start())
        };
        let held = db_path.to_owned();
        tokio::task::spawn_blocking(move || durable::faults::wait_for_held_sync(&held))
            .await
            .expect("wait for the held sync");
        written
    }

    fn spawn_view(
        storage: &Storage,
        key: &ProfileKey,
    ) -> tokio::task::JoinHandle<Result<View, WriteError>> {
        let storage = storage.clone();
        let key = key.clone();
        tokio::spawn(async move { storage.view(key, None).await })
    }

    /// Checks that `task`, which nothing can answer while the syncs are
    /// held, has not answered: the wait only gives a read that ignores
    /// durability the time to answer too soon.
    async fn still_waiting<T: std::fmt::Debug>(task: &mut tokio::task::JoinHandle<T>, what: &str) {
        let early = tokio::time::timeout(std::time::Duration::from_millis(300), task).await;
        assert!(early.is_err(), "{what} answered: {early:?}");
    }

    /// Lets the held sync of the database at `db_path` go, refused as after
    /// a failed write, and checks that the held save was then found to
    /// have survived the reopen, at `version`.
    async fn refuse_the_held_sync(
        db_path: &Path,
        saved: tokio::task::JoinHandle<Result<u64, WriteError>>,
        version: u64,
    ) {
        durable::faults::refuse_syncs(db_path, 1);
        durable::faults::release_syncs(db_path);
        assert_eq!(
            saved.await.expect("save task"),
            Ok(version),
            "in doubt, then found durable"
        );
    }

    /// Blocks until `count` reads of the database at `db_path` have waited
    /// for a sync.
    async fn reads_waited(db_path: &Path, count: usize) {
        let path = db_path.to_owned();
        tokio::task::spawn_blocking(move || durable::faults::wait_for_reads(&path, count))
            .await
            .expect("wait for the reads");
    }

    #[tokio::test]
    async fn a_read_shows_a_write_only_once_it_is_durable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db_path = dir.path().join("db");
        let (storage, key) = saved_once(dir.path()).await;

        // v2 is written to the database, and its sync held back.
        let saved = with_sync_held(&storage, &db_path, || save_as_a(&storage, &key, b"v2")).await;
        let mut viewed = spawn_view(&storage, &key);
        still_waiting(&mut viewed, "a view of a write not yet durable").await;
        assert!(!saved.is_finished(), "the save waits for its sync");
        durable::faults::release_syncs(&db_path);
        assert_eq!(saved.await.expect("save task"), Ok(2));
        let view = viewed.await.expect("view task").expect("view");
        assert_eq!(view.data.as_deref(), Some(&b"v2"[..]));

        // A read that sees nothing unsynced costs no sync.
        let before = storage.wal_syncs();
        let view = storage.view(key.clone(), None).await.expect("view");
        assert_eq!(view.data.as_deref(), Some(&b"v2"[..]));
        let versions = storage
            .list_versions(key.clone(), all_versions())
            .await
            .expect("versions");
        assert_eq!(versions.last().map(|v| v.version), Some(2));
        assert_eq!(storage.wal_syncs(), before);

        // A read that waits on a write whose sync fails is not answered
        // from the database the failure took away, even though the write
        // survives the reopen here: it might not have.
        let saved = with_sync_held(&storage, &db_path, || save_as_a(&storage, &key, b"v3")).await;
        let viewed = spawn_view(&storage, &key);
        reads_waited(&db_path, 2).await;
        refuse_the_held_sync(&db_path, saved, 3).await;
        match viewed.await.expect("view task") {
            Err(WriteError::Storage(_)) => {}
            other => panic!("a read of a database taken away answered: {other:?}"),
        }
        let view = storage.view(key.clone(), None).await.expect("view");
        assert_eq!(view.data.as_deref(), Some(&b"v3"[..]));

        // What a read did not find waits too: a wipe not yet synced.
        let wiped = with_sync_held(&storage, &db_path, || {
            storage.admin(key.clone(), AdminAction::Wipe)
        })
        .await;
        let mut viewed = spawn_view(&storage, &key);
        still_waiting(&mut viewed, "a view of a wipe not yet durable").await;
        durable::faults::release_syncs(&db_path);
        wiped.await.expect("wipe task").expect("wipe");
        assert_eq!(
            viewed.await.expect("view task").map(|view| view.data),
            Err(WriteError::NotFound)
        );
    }

    #[tokio::test]
    async fn a_backup_answers_once_what_it_holds_is_durable_and_is_removed_if_that_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db_path = dir.path().join("db");
        let (storage, key) = saved_once(dir.path()).await;

        // A backup taken while a save waits for its sync answers after it.
        let saved = with_sync_held(&storage, &db_path, || save_as_a(&storage, &key, b"v2")).await;
        let copy = dir.path().join("copy");
        let mut backed_up = tokio::spawn({
            let storage = storage.clone();
            let copy = copy.clone();
            async move { storage.backup(copy).await }
        });
        still_waiting(&mut backed_up, "a backup of a write not yet durable").await;
        durable::faults::release_syncs(&db_path);
        assert_eq!(saved.await.expect("save task"), Ok(2));
        assert!(backed_up.await.expect("backup task").expect("backup") > 0);
        let (copied, _) = open_at(&copy);
        let view = copied.view(key.clone(), None).await.expect("view the copy");
        assert_eq!(view.data.as_deref(), Some(&b"v2"[..]));
        copied.close().await.expect("close the copy");

        // One whose writes cannot be confirmed durable is removed.
        let saved = with_sync_held(&storage, &db_path, || save_as_a(&storage, &key, b"v3")).await;
        let doubtful = dir.path().join("doubtful");
        let backed_up = tokio::spawn({
            let storage = storage.clone();
            let doubtful = doubtful.clone();
            async move { storage.backup(doubtful).await }
        });
        reads_waited(&db_path, 2).await;
        refuse_the_held_sync(&db_path, saved, 3).await;
        match backed_up.await.expect("backup task") {
            Err(WriteError::Storage(message)) => assert!(message.contains("removed"), "{message}"),
            other => panic!("a backup whose writes were in doubt answered: {other:?}"),
        }
        assert!(!doubtful.exists(), "the doubtful backup was left behind");

        // A caller that stops waiting does not leave it unchecked either.
        let saved = with_sync_held(&storage, &db_path, || save_as_a(&storage, &key, b"v4")).await;
        let abandoned = dir.path().join("abandoned");
        let backed_up = tokio::spawn({
            let storage = storage.clone();
            let abandoned = abandoned.clone();
            async move { storage.backup(abandoned).await }
        });
        reads_waited(&db_path, 3).await;
        backed_up.abort();
        assert!(backed_up.await.is_err_and(|err| err.is_cancelled()));
        refuse_the_held_sync(&db_path, saved, 4).await;
        let removed = tokio::time::timeout(std::time::Duration::from_secs(20), async {
            while abandoned.exists() {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(
            removed.is_ok(),
            "an abandoned backup in doubt was left behind"
        );
    }

    /// A write left unsynced by a failed write after it is in doubt, not
    /// failed: the WAL holds it, so the reopen that follows replays it. It
    /// is answered once the reopened database is durable, by whether it
    /// survived; answering it as failed would leave storage holding a write
    /// its sender was told had not happened. The lease it was made under
    /// carries on.
    #[tokio::test]
    async fn a_write_in_doubt_is_answered_by_whether_it_survived_the_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (storage, key) = saved_once(dir.path()).await;
        let save = |data: &'static [u8]| save_as_a(&storage, &key, data);

        durable::faults::refuse_syncs(&dir.path().join("db"), 1);
        assert_eq!(save(b"v2").await, Ok(2), "in doubt, then found durable");
        let view = storage.view(key.clone(), None).await.expect("view");
        assert_eq!(view.data.as_deref(), Some(&b"v2"[..]));
        assert_eq!(save(b"v3").await, Ok(3), "the lease carries on");

        // Many writes in flight at once, so the syncer thread may hold some
        // of them when a sync is refused. Each answer is the truth: a write
        // answered as saved reads back, and one refused (it arrived while
        // the database was being reopened) left nothing.
        let keys: Vec<ProfileKey> = (0..16)
            .map(|i| ProfileKey::new("s", format!("m{i}")))
            .collect();
        for key in &keys {
            assert_eq!(grant_epoch(&storage, key, "a").await, 1);
        }
        durable::faults::refuse_syncs(&dir.path().join("db"), 1);
        let saves: Vec<_> = keys
            .iter()
            .map(|key| {
                storage.save(
                    key.clone(),
                    session("a"),
                    1,
                    key.key().as_bytes().to_vec(),
                    Changes::default(),
                )
            })
            .collect();
        let mut saved = 0;
        for (key, answer) in keys.iter().zip(futures::future::join_all(saves).await) {
            let view = storage.view(key.clone(), None).await.expect("view");
            match answer {
                Ok(version) => {
                    assert_eq!(version, 1, "{key}");
                    assert_eq!(view.data.as_deref(), Some(key.key().as_bytes()), "{key}");
                    saved += 1;
                }
                Err(err) => {
                    assert!(matches!(err, WriteError::Storage(_)), "{key}: {err}");
                    assert_eq!(view.data, None, "{key} was refused, and left nothing");
                }
            }
        }
        assert!(saved > 0, "the writes in doubt were answered as saved");
        storage.close().await.expect("close");
    }

    /// A read of pending messages sees exactly the messages sent and not
    /// consumed before it in the order of writes, batched with them or
    /// not.
    #[tokio::test]
    async fn pending_messages_are_read_in_the_order_of_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (storage, _) = open(dir.path());
        let key = ProfileKey::new("s", "k");
        let none = storage.pending_messages(key.clone());
        let first = storage.send_message(key.clone(), b"one".to_vec(), 10);
        let grant = storage.grant(key.clone(), grantee("a"));
        let second = storage.send_message(key.clone(), b"two".to_vec(), 10);
        let both = storage.pending_messages(key.clone());
        let consume = storage.save(
            key.clone(),
            session("a"),
            1,
            b"applied".to_vec(),
            Changes {
                consumed_messages: vec![1],
                ..Changes::default()
            },
        );
        let third = storage.send_message(key.clone(), b"three".to_vec(), 10);
        let rest = storage.pending_messages(key.clone());
        let after = storage.send_message(key.clone(), b"four".to_vec(), 10);

        let ids = |messages: Vec<Message>| messages.iter().map(|m| m.id).collect::<Vec<_>>();
        assert_eq!(none.await.map(ids), Ok(vec![]));
        assert_eq!(first.await.map(|sent| sent.message.id), Ok(1));
        assert!(grant.await.is_ok());
        assert_eq!(second.await.map(|sent| sent.message.id), Ok(2));
        assert_eq!(both.await.map(ids), Ok(vec![1, 2]));
        assert_eq!(consume.await, Ok(1));
        assert_eq!(third.await.map(|sent| sent.message.id), Ok(3));
        assert_eq!(
            rest.await.map(ids),
            Ok(vec![2, 3]),
            "not the consumed one, not the later one"
        );
        assert_eq!(after.await.map(|sent| sent.message.id), Ok(4));
        storage.close().await.expect("close");
    }

    /// A clean close flushes every column family's memtable, so the next
    /// start has nothing to replay. Flushing only the default family left
    /// a million-profile database replaying gigabytes of WAL (issue 7).
    #[tokio::test]
    async fn a_clean_close_leaves_no_column_family_unflushed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (storage, _) = open(dir.path());
        let key = ProfileKey::new("s", "k");
        storage
            .send_message(key.clone(), b"m".to_vec(), 10)
            .await
            .expect("send");
        let epoch = grant_epoch(&storage, &key, "a").await;
        storage
            .release(
                key,
                session("a"),
                epoch,
                Some(b"d".to_vec()),
                Changes::default(),
            )
            .await
            .expect("release");
        let db = storage.shared.db.get().expect("db");
        let unflushed = |db: &DB| {
            [CF_META, CF_DATA, CF_LEASES, CF_MESSAGES, CF_HISTORY].map(|name| {
                let family = db.cf_handle(name).expect("family");
                db.property_int_value_cf(family, "rocksdb.num-entries-active-mem-table")
                    .expect("property")
                    .unwrap_or(0)
            })
        };
        assert!(
            unflushed(&db).iter().all(|&entries| entries > 0),
            "every family should hold something before the close: {:?}",
            unflushed(&db)
        );
        storage.close().await.expect("close");
        assert_eq!(unflushed(&db), [0; 5]);
    }

    /// `data`'s memtable hashes whole keys. Profiles whose keys prefix one
    /// another, each saved many times, still read back their own latest
    /// data and version, and an export still lists them in key order: from
    /// the memtables, from table files after a flush, from both at once,
    /// and after a reopen.
    #[tokio::test]
    async fn profiles_whose_keys_prefix_each_other_read_back_their_own_latest_data() {
        fn data(key: &ProfileKey, round: usize) -> Vec<u8> {
            format!("{key} {round}").into_bytes()
        }
        async fn save_rounds(
            storage: &Storage,
            leases: &[(ProfileKey, u64)],
            rounds: std::ops::Range<usize>,
        ) {
            for round in rounds {
                for (key, epoch) in leases {
                    let saved = storage.save(
                        key.clone(),
                        session("a"),
                        *epoch,
                        data(key, round),
                        Changes::default(),
                    );
                    saved.await.expect("save");
                }
            }
        }
        async fn check(storage: &Storage, leases: &[(ProfileKey, u64)], round: usize, when: &str) {
            // Each round saves every profile once; the grant wrote no data.
            let version = u64::try_from(round + 1).expect("round");
            for (key, _) in leases {
                let view = storage.view(key.clone(), None).await.expect("view");
                assert_eq!(view.data, Some(data(key, round)), "{key} {when}");
                assert_eq!(view.meta.version, version, "{key} {when}");
            }
            let (exported, more) = storage
                .export("s".to_owned(), None, 10, usize::MAX)
                .await
                .expect("export");
            let listed: Vec<_> = exported
                .iter()
                .map(|record| (record.key.as_str(), record.meta.version))
                .collect();
            let expected = ["a", "ab", "abc", "b"].map(|key| (key, version));
            assert_eq!(listed, expected, "{when}");
            assert_eq!(more, None, "{when}");
        }

        let dir = tempfile::tempdir().expect("tempdir");
        let (storage, _) = open(dir.path());
        let mut leases = Vec::new();
        for (store, key) in [
            ("s", "a"),
            ("s", "ab"),
            ("s", "abc"),
            ("sa", "b"),
            ("s", "b"),
        ] {
            let key = ProfileKey::new(store, key);
            let epoch = grant_epoch(&storage, &key, "a").await;
            leases.push((key, epoch));
        }
        save_rounds(&storage, &leases, 0..4).await;
        check(&storage, &leases, 3, "in the memtable").await;
        let db = storage.shared.db.get().expect("db");
        for family in [CF_DATA, CF_META] {
            db.flush_cf(db.cf_handle(family).expect("family"))
                .expect("flush");
        }
        drop(db);
        check(&storage, &leases, 3, "after a flush").await;
        save_rounds(&storage, &leases, 4..6).await;
        check(&storage, &leases, 5, "over a flushed version").await;
        storage.close().await.expect("close");
        drop(storage);
        let (storage, _) = open(dir.path());
        check(&storage, &leases, 5, "after a reopen").await;
        storage.close().await.expect("close");
    }

    /// At the smallest memtable budget allowed a `data` memtable still
    /// holds many saves: its hash buckets are sized to it, where a fixed
    /// array could fill it alone and make every write flush.
    #[tokio::test]
    async fn the_smallest_memtable_budget_still_holds_many_saves() {
        const SAVES: u64 = 20;
        let dir = tempfile::tempdir().expect("tempdir");
        let config = StorageConfig {
            path: dir.path().join("db"),
            sync: false,
            memtable_bytes: 1 << 20,
            ..StorageConfig::default()
        };
        let (storage, _) = Storage::open(&config, &HistoryConfig::default()).expect("open");
        let key = ProfileKey::new("s", "k");
        let epoch = grant_epoch(&storage, &key, "a").await;
        for round in 0..SAVES {
            let saved = storage.save(
                key.clone(),
                session("a"),
                epoch,
                vec![0; 100],
                Changes::default(),
            );
            assert_eq!(saved.await, Ok(round + 1));
        }
        let db = storage.shared.db.get().expect("db");
        let family = db.cf_handle(CF_DATA).expect("family");
        let in_memtable = db
            .property_int_value_cf(family, "rocksdb.num-entries-active-mem-table")
            .expect("property");
        assert_eq!(in_memtable, Some(SAVES), "no save was flushed away");
        drop(db);
        storage.close().await.expect("close");
    }

    /// With `sync` on, no write is answered before a WAL sync that began
    /// after it was written; with it off, nothing is synced. Concurrent
    /// writes share syncs.
    #[tokio::test]
    async fn an_acknowledged_write_waits_for_a_sync_of_its_own_batch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (storage, _) = open(dir.path());
        let key = ProfileKey::new("s", "k");
        // Each count is taken before the write is submitted: the committer
        // may sync and answer before the test looks again.
        let before = storage.wal_syncs();
        let granted = storage.grant(key.clone(), grantee("a"));
        let epoch = granted.await.expect("grant").lease.epoch;
        assert!(
            storage.wal_syncs() > before,
            "the grant was answered unsynced"
        );
        for round in 0..20u8 {
            let before = storage.wal_syncs();
            let saved = storage.save(
                key.clone(),
                session("a"),
                epoch,
                vec![round],
                Changes::default(),
            );
            saved.await.expect("save");
            assert!(
                storage.wal_syncs() > before,
                "save {round} was answered unsynced"
            );
        }
        // A refusal rests on what earlier, maybe unsynced batches wrote, so
        // it waits for a sync too.
        let before = storage.wal_syncs();
        let refused = storage.save(
            key.clone(),
            session("b"),
            epoch,
            vec![0],
            Changes::default(),
        );
        assert_eq!(refused.await, Err(WriteError::LeaseLost));
        assert!(
            storage.wal_syncs() > before,
            "the refusal was answered unsynced"
        );

        let mut keys = Vec::new();
        for n in 0..64 {
            let key = ProfileKey::new("s", format!("many{n}"));
            let epoch = grant_epoch(&storage, &key, "a").await;
            keys.push((key, epoch));
        }
        let before = storage.wal_syncs();
        let saves = keys.iter().map(|(key, epoch)| {
            storage.save(
                key.clone(),
                session("a"),
                *epoch,
                vec![1],
                Changes::default(),
            )
        });
        for saved in futures::future::join_all(saves).await {
            saved.expect("concurrent save");
        }
        let syncs = storage.wal_syncs() - before;
        assert!(
            (1..64).contains(&syncs),
            "64 concurrent saves took {syncs} syncs"
        );
        storage.close().await.expect("close");

        let config = StorageConfig {
            path: dir.path().join("buffered"),
            sync: false,
            ..StorageConfig::default()
        };
        let (buffered, _) = Storage::open(&config, &HistoryConfig::default()).expect("open");
        let granted = buffered
            .grant(key.clone(), grantee("a"))
            .await
            .expect("grant");
        buffered
            .save(
                key,
                session("a"),
                granted.lease.epoch,
                vec![1],
                Changes::default(),
            )
            .await
            .expect("save");
        assert_eq!(buffered.wal_syncs(), 0);
        buffered.close().await.expect("close");
    }

    /// The lease cache changes how records are read, never what a write
    /// does: the same random run of grants, saves, releases, messages and
    /// admin changes, some submitted together so they share a batch, gets
    /// the same answers with the cache off, with room for one lease (so
    /// entries are also left out), and with room for all.
    #[tokio::test]
    async fn the_lease_cache_never_changes_an_answer() {
        let mut runs = Vec::new();
        for lease_cache in [0, 1, 64] {
            let dir = tempfile::tempdir().expect("tempdir");
            let config = StorageConfig {
                path: dir.path().join("db"),
                lease_cache,
                ..StorageConfig::default()
            };
            let (storage, _) = Storage::open(&config, &HistoryConfig::default()).expect("open");
            runs.push(random_run(&storage, 0x5eed).await);
            storage.close().await.expect("close");
        }
        let saved = runs[0].iter().filter(|a| a.starts_with("save Ok")).count();
        assert!(saved > 100, "the run should make many saves that succeed");
        assert!(
            runs[0].iter().any(|answer| answer.contains("LeaseLost")),
            "the run should make stale writes that are fenced"
        );
        assert_eq!(runs[0], runs[1]);
        assert_eq!(runs[0], runs[2]);
    }

    /// One answer of a random run, and for a grant, the profile, session
    /// number and epoch it granted.
    type Answer = (Option<(usize, u64, u64)>, String);

    /// Up to 600 operations on 3 profiles from 3 sessions, whose session
    /// and epoch are mostly the last grant's and sometimes stale; returns
    /// every answer, without timestamps.
    async fn random_run(storage: &Storage, seed: u64) -> Vec<String> {
        let mut rng = seed;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        // The last grant of each profile: (session number, epoch).
        let mut granted = [(0u64, 0u64); 3];
        let mut answers = Vec::new();
        for _ in 0..200 {
            // Up to three operations submitted at once share a batch.
            let mut pending: Vec<BoxFuture<Answer>> = Vec::new();
            for _ in 0..=next(3) {
                let k = usize::try_from(next(3)).expect("small");
                let key = ProfileKey::new("s", format!("k{k}"));
                let (holder, epoch) = granted.get(k).copied().unwrap_or_default();
                let who = if next(4) == 0 { next(3) } else { holder };
                let epoch = if next(4) == 0 {
                    epoch.saturating_sub(1)
                } else {
                    epoch
                };
                let owner = session(&format!("j{who}"));
                pending.push(match next(16) {
                    0 | 1 => {
                        let grant = storage.grant(
                            key,
                            Grantee {
                                session: owner,
                                uid: None,
                            },
                        );
                        Box::pin(async move {
                            match grant.await {
                                Ok(g) => (
                                    Some((k, who, g.lease.epoch)),
                                    format!(
                                        "grant {} {:?} {:?}",
                                        g.lease.epoch,
                                        g.data,
                                        g.messages.iter().map(|m| m.id).collect::<Vec<_>>()
                                    ),
                                ),
                                Err(err) => (None, format!("grant {err:?}")),
                            }
                        })
                    }
                    2 => {
                        let released = storage.release(key, owner, epoch, None, Changes::default());
                        Box::pin(async move { (None, format!("release {:?}", released.await)) })
                    }
                    3 => {
                        let sent = storage.send_message(key, b"m".to_vec(), 4);
                        Box::pin(async move {
                            let sent = sent.await.map(|s| (s.message.id, s.lease.map(|l| l.epoch)));
                            (None, format!("send {sent:?}"))
                        })
                    }
                    4 => {
                        let action = if next(2) == 0 {
                            AdminAction::Revoke
                        } else {
                            AdminAction::Wipe
                        };
                        let done = storage.admin(key, action);
                        Box::pin(async move {
                            let done = done.await.map(|d| (d.version, d.ended.map(|l| l.epoch)));
                            (None, format!("admin {done:?}"))
                        })
                    }
                    _ => {
                        let changes = Changes {
                            consumed_messages: vec![next(4)],
                            ..Changes::default()
                        };
                        let data = format!("d{}", next(1000)).into_bytes();
                        let saved = storage.save(key, owner, epoch, data, changes);
                        Box::pin(async move { (None, format!("save {:?}", saved.await)) })
                    }
                });
            }
            for (grant, answer) in futures::future::join_all(pending).await {
                if let Some((k, who, epoch)) = grant
                    && let Some(slot) = granted.get_mut(k)
                {
                    *slot = (who, epoch);
                }
                answers.push(answer);
            }
        }
        answers
    }

    #[tokio::test]
    async fn memtables_and_the_block_cache_stay_within_their_budgets() {
        const BUDGET: usize = 1 << 20;
        let dir = tempfile::tempdir().expect("tempdir");
        let config = StorageConfig {
            path: dir.path().join("db"),
            sync: false,
            memtable_bytes: BUDGET,
            block_cache_bytes: BUDGET,
            ..StorageConfig::default()
        };
        let (storage, _) = Storage::open(&config, &HistoryConfig::default()).expect("open");
        // 8 MiB of incompressible data over 2,000 profiles: eight times
        // either budget.
        let keys: Vec<ProfileKey> = (0..2000)
            .map(|i| ProfileKey::new("s", format!("k{i}")))
            .collect();
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        let mut peak = 0;
        for key in &keys {
            let epoch = grant_epoch(&storage, key, "a").await;
            let data = (0..4096)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state.to_le_bytes()[0]
                })
                .collect();
            storage
                .save(key.clone(), session("a"), epoch, data, Changes::default())
                .await
                .expect("save");
            peak = peak.max(storage.memory_use().memtables);
        }
        // Two memtables of a quarter of the budget per family, at most, with
        // an arena block's rounding.
        let budget = BUDGET as u64;
        assert!(
            peak <= 3 * budget,
            "memtables reached {peak} bytes on a budget of {budget}"
        );
        // Reading it all back goes through the block cache.
        for key in &keys {
            let view = storage.view(key.clone(), None).await.expect("view");
            assert_eq!(view.data.map(|data| data.len()), Some(4096));
        }
        let cache = storage.memory_use().block_cache;
        assert!(
            cache > 0 && cache <= 2 * budget,
            "the block cache holds {cache} bytes on a budget of {budget}"
        );
    }
}
