//! Backups, pruning of old versions, and size reports.

use std::path::{Path, PathBuf};

use rocksdb::checkpoint::Checkpoint;
use rocksdb::{DB, IteratorMode, WriteBatch};

use super::{Families, Storage, WriteError, records};

impl Storage {
    /// Writes a consistent copy of the database (a RocksDB checkpoint) to
    /// `path`, which must not exist, and returns its size in bytes. A daemon
    /// started with `path` as its storage serves the profiles as they were.
    /// Files are hard-linked where the filesystem allows, so a backup on
    /// the same filesystem is fast and small until the originals change.
    pub async fn backup(&self, path: PathBuf) -> Result<u64, WriteError> {
        self.blocking(move |db| {
            if path.exists() {
                return Err(WriteError::Storage(format!(
                    "{} already exists",
                    path.display()
                )));
            }
            let checkpoint = Checkpoint::new(db).map_err(storage_error)?;
            checkpoint.create_checkpoint(&path).map_err(storage_error)?;
            Ok(dir_size(&path))
        })
        .await
    }

    /// Deletes kept versions written before `cutoff_ms` (Unix
    /// milliseconds), and returns how many. It reads with an iterator and
    /// deletes in small unsynced batches beside the committer, so saves
    /// never wait for it; losing a deletion to a crash only means it is
    /// done again by the next sweep.
    pub async fn prune_history(&self, cutoff_ms: u64) -> Result<u64, WriteError> {
        self.blocking(move |db| prune(db, cutoff_ms)).await
    }

    /// Deletes the kept versions older than `history.retention`, and
    /// returns how many.
    pub async fn prune_expired(&self) -> Result<u64, WriteError> {
        let cutoff_ms = super::unix_ms().saturating_sub(self.shared.retention_ms);
        self.prune_history(cutoff_ms).await
    }

    /// The database's size on disk, in bytes.
    pub async fn size_on_disk(&self) -> u64 {
        let path = self.shared.path.clone();
        tokio::task::spawn_blocking(move || dir_size(&path))
            .await
            .unwrap_or(0)
    }
}

fn prune(db: &DB, cutoff_ms: u64) -> Result<u64, WriteError> {
    const CHUNK: usize = 1024;
    let families = Families::of(db)
        .ok_or_else(|| WriteError::Storage("a column family is missing".to_owned()))?;
    let mut batch = WriteBatch::default();
    let mut pruned = 0u64;
    for entry in db.iterator_cf(families.history, IteratorMode::Start) {
        let (key, value) = entry.map_err(storage_error)?;
        if records::item_time(&value).is_some_and(|at| at < cutoff_ms) {
            batch.delete_cf(families.history, &key);
            pruned += 1;
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
