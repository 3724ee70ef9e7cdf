//! Backups, pruning of old versions, and size reports.

use std::path::{Path, PathBuf};

use rocksdb::checkpoint::Checkpoint;
use rocksdb::{DB, IteratorMode, WriteBatch};
use tokio_util::sync::CancellationToken;

use super::{Families, Storage, WriteError, records};

impl Storage {
    /// Writes a consistent copy of the database (a RocksDB checkpoint) to
    /// `path`, which must not exist, and returns its size in bytes. A daemon
    /// started with `path` as its storage serves the profiles as they were.
    /// Files are hard-linked where the filesystem allows, so a backup on
    /// the same filesystem is fast and small until the originals change.
    ///
    /// With `storage.sync` it answers only once everything the copy holds
    /// is durable here too: the copy takes the WAL as it is, so it may hold
    /// writes not yet synced, and restoring it must not bring back a write
    /// whose sync then failed. If that cannot be confirmed, the copy is
    /// removed and the backup fails.
    pub async fn backup(&self, path: PathBuf) -> Result<u64, WriteError> {
        // A task of its own, so a caller that stops waiting (a client
        // that disconnects) does not leave a copy that was never checked.
        let storage = self.clone();
        tokio::spawn(async move { storage.checked_backup(path).await })
            .await
            .map_err(|err| WriteError::Storage(format!("a backup task failed: {err}")))?
    }

    /// The backup itself: the copy, then the wait for what it holds.
    async fn checked_backup(&self, path: PathBuf) -> Result<u64, WriteError> {
        let target = path.clone();
        let (copied, mark) = self
            .marked_read(move |db| {
                if path.exists() {
                    return Err(WriteError::Exists(path.display().to_string()));
                }
                let checkpoint = Checkpoint::new(db).map_err(storage_error)?;
                checkpoint.create_checkpoint(&path).map_err(storage_error)?;
                Ok(dir_size(&path))
            })
            .await?;
        let bytes = copied?;
        if let Err(err) = self.until_durable(mark.whole_wal()).await {
            let removed = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&target))
                .await
                .map_err(|join| std::io::Error::other(join.to_string()))
                .and_then(|removed| removed);
            return Err(WriteError::Storage(match removed {
                Ok(()) => format!(
                    "the backup was removed, since the writes it holds could not be confirmed durable: {err}"
                ),
                Err(io) => format!(
                    "the writes the backup holds could not be confirmed durable ({err}), and removing it failed, so do not restore it: {io}"
                ),
            }));
        }
        Ok(bytes)
    }

    /// Deletes kept versions written before `cutoff_ms` (Unix
    /// milliseconds), and returns how many. It reads with an iterator and
    /// deletes in small unsynced batches beside the committer, so saves
    /// never wait for it; losing a deletion to a crash only means it is
    /// done again by the next sweep. It stops early, keeping what it did,
    /// once `stop` is cancelled, so a sweep over a large history does not
    /// hold up the daemon's exit.
    pub async fn prune_history(
        &self,
        cutoff_ms: u64,
        stop: CancellationToken,
    ) -> Result<u64, WriteError> {
        self.blocking(move |db| prune(db, cutoff_ms, &stop)).await
    }

    /// Deletes the kept versions older than `history.retention`, and
    /// returns how many; stops early once `stop` is cancelled.
    pub async fn prune_expired(&self, stop: CancellationToken) -> Result<u64, WriteError> {
        let cutoff_ms = super::unix_ms().saturating_sub(self.shared.retention_ms);
        self.prune_history(cutoff_ms, stop).await
    }

    /// The database's size on disk, in bytes.
    pub async fn size_on_disk(&self) -> u64 {
        let path = self.shared.path.clone();
        tokio::task::spawn_blocking(move || dir_size(&path))
            .await
            .unwrap_or(0)
    }
}

/// Deletes the kept versions written before `cutoff_ms`, except each
/// profile's newest. That one may be the profile's current data, which an
/// admin overwrite relies on finding in history (it keeps the data it
/// replaces only when the current version is not kept yet); pruning it
/// would let an overwrite destroy the only copy. Versions are only ever
/// added above a profile's newest, so one seen with a newer one behind it
/// is never the newest again.
fn prune(db: &DB, cutoff_ms: u64, stop: &CancellationToken) -> Result<u64, WriteError> {
    const CHUNK: usize = 1024;
    /// How many versions are read between two looks at `stop`.
    const STOP_EVERY: u64 = 4096;
    /// An item key is its profile's prefix and a `u64` id.
    const ID: usize = 8;
    let families = Families::of(db)
        .ok_or_else(|| WriteError::Storage("a column family is missing".to_owned()))?;
    let mut batch = WriteBatch::default();
    let mut pruned = 0u64;
    // The previous item, if it expired: deleted once an item of the same
    // profile follows it.
    let mut expired: Option<Box<[u8]>> = None;
    for (read, entry) in (0u64..).zip(db.iterator_cf(families.history, IteratorMode::Start)) {
        if read % STOP_EVERY == 0 && stop.is_cancelled() {
            break;
        }
        let (key, value) = entry.map_err(storage_error)?;
        if let Some(previous) = expired.take()
            && previous.len() == key.len()
            && previous.get(..previous.len().saturating_sub(ID))
                == key.get(..key.len().saturating_sub(ID))
        {
            batch.delete_cf(families.history, &previous);
            pruned += 1;
        }
        if records::item_time(&value).is_some_and(|at| at < cutoff_ms) {
            expired = Some(key);
        }
        if batch.len() >= CHUNK {
            db.write(std::mem::take(&mut batch))
                .map_err(storage_error)?;
        }
    }
    if !batch.is_empty() {
        db.write(batch).map_err(storage_error)?;
    }
    Ok(pruned)
}

/// The total size of the files under `path`; unreadable entries count as 0.
fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => dir_size(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}

fn storage_error(err: rocksdb::Error) -> WriteError {
    WriteError::Storage(err.into_string())
}
