//! Reads that need no lease: views, version listings and exports.
//!
//! Each runs on a blocking thread against one RocksDB snapshot, so what it
//! returns is one consistent state of the profile even while the committer
//! writes. With `storage.sync`, each also answers only once everything it
//! could have seen is durable: a write the committer has applied but not
//! yet synced is visible in the database, and a reader shown it could act
//! on a write that a crash then takes back, one its writer was never told
//! had succeeded. So a read that saw past the last sync waits for the next
//! one ([`Storage::durable_read`]).

use std::sync::atomic::Ordering;

use profiled_protocol::{Message, VersionInfo};
use rocksdb::{DB, Direction, IteratorMode, ReadOptions};

use super::records::{self, LeaseRecord, MetaRecord};
use super::{Families, Storage, WriteError, unix_ms};
use crate::ProfileKey;

/// A profile as read by [`Storage::view`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    /// The version shown.
    pub version: u64,
    /// When that version was written, in Unix milliseconds.
    pub saved_at_ms: u64,
    /// Its data; `None` if the profile was never saved.
    pub data: Option<Vec<u8>>,
    /// The profile's current bookkeeping.
    pub meta: MetaRecord,
    /// The lease on it, if one is held.
    pub lease: Option<LeaseRecord>,
    /// Its pending messages, oldest first.
    pub messages: Vec<Message>,
}

/// How far the database was written when a read ended, and which opening
/// of it the read used.
#[derive(Clone, Copy, Debug)]
pub(super) struct ReadMark {
    /// The database's latest sequence number after the read.
    seen: u64,
    /// How many times the database had been taken from readers.
    taken: u64,
}

impl ReadMark {
    /// The mark of a read that may have copied WAL records not yet
    /// numbered: a write is appended to the WAL before its sequence number
    /// is published, so a copy of the WAL files (a backup) can hold one
    /// past the number read after it. It always waits for a sync.
    pub(super) fn whole_wal(self) -> Self {
        Self {
            seen: u64::MAX,
            ..self
        }
    }
}

/// Which versions [`Storage::list_versions`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VersionFilter {
    /// Newest first rather than oldest first.
    pub newest_first: bool,
    /// Only versions written at or after this Unix millisecond.
    pub from_ms: Option<u64>,
    /// Only versions written at or before this Unix millisecond.
    pub to_ms: Option<u64>,
    /// The most versions returned.
    pub limit: usize,
}

/// A profile as read by [`Storage::export`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportedRecord {
    /// The profile's key within the store.
    pub key: String,
    /// Its bookkeeping.
    pub meta: MetaRecord,
    /// Its data, `None` if never saved.
    pub data: Option<Vec<u8>>,
}

impl Storage {
    /// Reads a profile's current data, or the kept `version`, with its
    /// metadata and pending messages.
    pub async fn view(&self, key: ProfileKey, version: Option<u64>) -> Result<View, WriteError> {
        let retention_ms = self.shared.retention_ms;
        self.durable_read(move |db| view(db, &key, version, retention_ms))
            .await
    }

    /// Lists a profile's versions: the kept ones within the retention, and
    /// the current one.
    pub async fn list_versions(
        &self,
        key: ProfileKey,
        filter: VersionFilter,
    ) -> Result<Vec<VersionInfo>, WriteError> {
        let retention_ms = self.shared.retention_ms;
        self.durable_read(move |db| list_versions(db, &key, filter, retention_ms))
            .await
    }

    /// Reads up to `limit` existing profiles of `store` in key order, after
    /// the key `after`, stopping early once their data passes `budget`
    /// bytes (at least one is read). Also returns the key to continue
    /// after, if more remain.
    pub async fn export(
        &self,
        store: String,
        after: Option<String>,
        limit: usize,
        budget: usize,
    ) -> Result<(Vec<ExportedRecord>, Option<String>), WriteError> {
        self.durable_read(move |db| export(db, &store, after, limit, budget))
            .await
    }

    /// Runs `read` like [`Self::blocking`], and with `storage.sync` answers
    /// only once everything it could have seen is durable
    /// ([`Self::until_durable`]). That holds for what it did not find too:
    /// a `NotFound` may rest on a wipe not yet synced.
    async fn durable_read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&DB) -> Result<T, WriteError> + Send + 'static,
    ) -> Result<T, WriteError> {
        if !self.shared.sync {
            return self.blocking(read).await;
        }
        let (outcome, mark) = self.marked_read(read).await?;
        if let Err(err @ WriteError::Storage(_)) = outcome {
            // Nothing was read, so nothing can be shown too soon.
            return Err(err);
        }
        self.until_durable(mark).await?;
        outcome
    }

    /// Runs `read` on a blocking thread with the database, and marks how
    /// far the database was written when it ended, for
    /// [`Self::until_durable`]. The error is the database's being away or
    /// the task's failing; the read's own outcome comes back as it is.
    pub(super) async fn marked_read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&DB) -> Result<T, WriteError> + Send + 'static,
    ) -> Result<(Result<T, WriteError>, ReadMark), WriteError> {
        let (db, taken) = self.shared.db.get_marked()?;
        tokio::task::spawn_blocking(move || {
            let outcome = read(&db);
            let seen = db.latest_sequence_number();
            (outcome, ReadMark { seen, taken })
        })
        .await
        .map_err(|err| WriteError::Storage(format!("a read task failed: {err}")))
    }

    /// Resolves once everything a read marked with `mark` could have seen
    /// is durable.
    ///
    /// A read sees at most the writes numbered up to the database's latest
    /// sequence number taken after it. If a sync has reached that far, this
    /// resolves at once; otherwise the committer is asked for a sync behind
    /// every write so far. If the database was taken away after a failure
    /// meanwhile, what the read saw may be gone, and this fails with a
    /// storage error that asks to read again. Without `storage.sync`
    /// nothing waits.
    pub(super) async fn until_durable(&self, mark: ReadMark) -> Result<(), WriteError> {
        if !self.shared.sync {
            return Ok(());
        }
        let synced = self.shared.progress.synced_up_to.load(Ordering::SeqCst);
        if mark.seen > synced {
            #[cfg(test)]
            super::durable::faults::read_waits(&self.shared.path);
            self.durable().await?;
        }
        if self.shared.db.times_taken() != mark.taken {
            return Err(WriteError::Storage(
                "storage was taken away after a failure while this read ran, so what it saw may be gone; read again"
                    .to_owned(),
            ));
        }
        Ok(())
    }

    /// Runs `read` on a blocking thread with the database.
    pub(super) async fn blocking<T: Send + 'static>(
        &self,
        read: impl FnOnce(&DB) -> Result<T, WriteError> + Send + 'static,
    ) -> Result<T, WriteError> {
        let db = self.shared.db.get()?;
        tokio::task::spawn_blocking(move || read(&db))
            .await
            .map_err(|err| WriteError::Storage(format!("a read task failed: {err}")))?
    }
}

fn view(
    db: &DB,
    key: &ProfileKey,
    version: Option<u64>,
    retention_ms: u64,
) -> Result<View, WriteError> {
    let families = families(db)?;
    let snapshot = db.snapshot();
    let db_key = records::encode_key(key);
    let meta = existing_meta(&snapshot, &families, &db_key)?;
    let lease = snapshot
        .get_cf(families.leases, &db_key)
        .map_err(storage_error)?
        .map(|bytes| records::decode_lease(&bytes))
        .transpose()
        .map_err(WriteError::Storage)?;
    let (version, saved_at_ms, data) = match version {
        None => {
            let data = snapshot
                .get_cf(families.data, &db_key)
                .map_err(storage_error)?;
            (meta.version, meta.updated_at_ms, data)
        }
        Some(v) if v == meta.version => {
            let data = snapshot
                .get_cf(families.data, &db_key)
                .map_err(storage_error)?
                .ok_or(WriteError::NotFound)?;
            (v, meta.updated_at_ms, Some(data))
        }
        Some(v) => {
            let item = snapshot
                .get_cf(families.history, records::item_key(key, v))
                .map_err(storage_error)?
                .map(|value| records::decode_item(&value))
                .transpose()
                .map_err(WriteError::Storage)?
                .filter(|item| item.at_ms >= cutoff(retention_ms))
                .ok_or(WriteError::NotFound)?;
            (v, item.at_ms, Some(item.bytes))
        }
    };
    let messages = read_messages(db, families.messages, key, Some(&snapshot))?;
    Ok(View {
        version,
        saved_at_ms,
        data,
        meta,
        lease,
        messages,
    })
}

fn list_versions(
    db: &DB,
    key: &ProfileKey,
    filter: VersionFilter,
    retention_ms: u64,
) -> Result<Vec<VersionInfo>, WriteError> {
    let families = families(db)?;
    let snapshot = db.snapshot();
    let db_key = records::encode_key(key);
    let meta = existing_meta(&snapshot, &families, &db_key)?;
    // The current version is always listed, kept or not, with the data
    // column's copy: its history entry may be pruned or not yet written.
    let current = snapshot
        .get_cf(families.data, &db_key)
        .map_err(storage_error)?
        .filter(|_| meta.version > 0)
        .map(|data| VersionInfo {
            version: meta.version,
            saved_at_ms: meta.updated_at_ms,
            size: len_u64(data.len()),
        });
    let oldest_shown = cutoff(retention_ms);
    let wanted = |info: &VersionInfo| {
        filter.from_ms.is_none_or(|from| info.saved_at_ms >= from)
            && filter.to_ms.is_none_or(|to| info.saved_at_ms <= to)
    };
    let mut found = Vec::new();
    if filter.newest_first {
        found.extend(current.clone().filter(wanted));
    }
    let prefix = records::item_prefix(key);
    let (from, to) = super::commit::item_range(&prefix);
    let mut options = ReadOptions::default();
    options.set_iterate_lower_bound(from.clone());
    options.set_iterate_upper_bound(to.clone());
    let mode = if filter.newest_first {
        IteratorMode::From(&to, Direction::Reverse)
    } else {
        IteratorMode::From(&from, Direction::Forward)
    };
    for entry in snapshot.iterator_cf_opt(families.history, options, mode) {
        if found.len() >= filter.limit {
            break;
        }
        let (item_key, value) = entry.map_err(storage_error)?;
        let Some(version) = records::item_id(&item_key) else {
            continue;
        };
        let Some(at_ms) = records::item_time(&value) else {
            continue;
        };
        let info = VersionInfo {
            version,
            saved_at_ms: at_ms,
            size: len_u64(value.len().saturating_sub(9)),
        };
        if version == meta.version || at_ms < oldest_shown || !wanted(&info) {
            continue;
        }
        found.push(info);
    }
    if !filter.newest_first {
        found.extend(current.filter(wanted));
    }
    found.truncate(filter.limit);
    Ok(found)
}

fn export(
    db: &DB,
    store: &str,
    after: Option<String>,
    limit: usize,
    budget: usize,
) -> Result<(Vec<ExportedRecord>, Option<String>), WriteError> {
    let families = families(db)?;
    let mut used = 0usize;
    let snapshot = db.snapshot();
    // A store's keys share `u16 length, store`; UTF-8 never contains 0xFF,
    // so appending it bounds the range.
    let mut prefix = records::encode_key(&ProfileKey::new(store, ""));
    let start = match &after {
        Some(after) => {
            let mut start = records::encode_key(&ProfileKey::new(store, after.as_str()));
            // Just past `after` itself.
            start.push(0);
            start
        }
        None => prefix.clone(),
    };
    prefix.push(0xFF);
    let mut options = ReadOptions::default();
    options.set_iterate_upper_bound(prefix);
    let mut found = Vec::new();
    let mut more = false;
    for entry in snapshot.iterator_cf_opt(
        families.meta,
        options,
        IteratorMode::From(&start, Direction::Forward),
    ) {
        let (db_key, value) = entry.map_err(storage_error)?;
        let meta = records::decode_meta(&value).map_err(WriteError::Storage)?;
        if !meta.exists() {
            continue;
        }
        if found.len() >= limit {
            more = true;
            break;
        }
        let key = records::decode_key(&db_key)
            .ok_or_else(|| WriteError::Storage("a profile has an undecodable key".to_owned()))?;
        let data = snapshot
            .get_cf(families.data, &db_key)
            .map_err(storage_error)?;
        // Checked before the profile is added, so that no page but one of a
        // single profile passes the budget.
        let cost = export_cost(key.key(), &meta, data.as_deref());
        if !found.is_empty() && used.saturating_add(cost) > budget {
            more = true;
            break;
        }
        used = used.saturating_add(cost);
        found.push(ExportedRecord {
            key: key.key().to_owned(),
            meta,
            data,
        });
    }
    let next = more
        .then(|| found.last().map(|record| record.key.clone()))
        .flatten();
    Ok((found, next))
}

/// At least the bytes a profile takes in an export page: every field, and
/// every length and number counted at its largest varint (nine bytes).
fn export_cost(key: &str, meta: &records::MetaRecord, data: Option<&[u8]>) -> usize {
    const VARINT: usize = 9;
    let tags: usize = meta
        .meta_tags
        .iter()
        .map(|(name, value)| name.len() + value.len() + 2 * VARINT)
        .sum();
    key.len() + data.map_or(0, <[u8]>::len) + tags + meta.user_ids.len() * VARINT + 8 * VARINT
}

/// Reads a profile's pending messages, oldest first, from `snapshot` if
/// given.
pub(super) fn read_messages(
    db: &DB,
    family: &rocksdb::ColumnFamily,
    key: &ProfileKey,
    snapshot: Option<&rocksdb::Snapshot<'_>>,
) -> Result<Vec<Message>, WriteError> {
    let prefix = records::item_prefix(key);
    let (from, to) = super::commit::item_range(&prefix);
    let mut options = ReadOptions::default();
    options.set_iterate_upper_bound(to);
    if let Some(snapshot) = snapshot {
        options.set_snapshot(snapshot);
    }
    let mut messages = Vec::new();
    for entry in db.iterator_cf_opt(
        family,
        options,
        IteratorMode::From(&from, Direction::Forward),
    ) {
        let (item_key, value) = entry.map_err(storage_error)?;
        let id = records::item_id(&item_key)
            .ok_or_else(|| WriteError::Storage("a message has a short key".to_owned()))?;
        let item = records::decode_item(&value).map_err(WriteError::Storage)?;
        messages.push(Message {
            id,
            sent_at_ms: item.at_ms,
            payload: item.bytes,
        });
    }
    Ok(messages)
}

/// A profile's meta record, or `NotFound` if it does not exist.
fn existing_meta(
    snapshot: &rocksdb::Snapshot<'_>,
    families: &Families<'_>,
    db_key: &[u8],
) -> Result<MetaRecord, WriteError> {
    snapshot
        .get_cf(families.meta, db_key)
        .map_err(storage_error)?
        .map(|bytes| records::decode_meta(&bytes))
        .transpose()
        .map_err(WriteError::Storage)?
        .filter(MetaRecord::exists)
        .ok_or(WriteError::NotFound)
}

/// The oldest time a kept version may have and still be shown.
fn cutoff(retention_ms: u64) -> u64 {
    unix_ms().saturating_sub(retention_ms)
}

fn families(db: &DB) -> Result<Families<'_>, WriteError> {
    Families::of(db).ok_or_else(|| WriteError::Storage("a column family is missing".to_owned()))
}

fn len_u64(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

fn storage_error(err: rocksdb::Error) -> WriteError {
    WriteError::Storage(err.into_string())
}
