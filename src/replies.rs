//! How the daemon's records become the protocol's replies.

use profiled_protocol::{ActiveSession, Error, ErrorCode, HeldLease, ProfileMeta};

use crate::ProfileKey;
use crate::storage::{LeaseRecord, MetaRecord, WriteError};

/// A profile's metadata as clients see it.
pub fn profile_meta(meta: MetaRecord, lease: Option<LeaseRecord>) -> ProfileMeta {
    ProfileMeta {
        created_at_ms: meta.created_at_ms,
        updated_at_ms: meta.updated_at_ms,
        load_count: meta.load_count,
        version: meta.version,
        active: lease.map(active_session),
        meta_tags: meta.meta_tags,
        user_ids: meta.user_ids,
    }
}

/// A lease as clients see it.
pub fn active_session(lease: LeaseRecord) -> ActiveSession {
    ActiveSession {
        session: lease.session,
        epoch: lease.epoch,
        since_ms: lease.since_ms,
    }
}

/// A session's lease as listed in `Welcome` and `Sessions`.
pub fn held_lease((key, epoch): (ProfileKey, u64)) -> HeldLease {
    HeldLease {
        store: key.store().to_owned(),
        key: key.key().to_owned(),
        epoch,
    }
}

/// The wire form of a failed storage operation. `epoch` is the lease the
/// operation was made under, if any, for the message of a refused write.
pub fn storage_error(err: WriteError, epoch: Option<u64>) -> Error {
    match err {
        WriteError::LeaseLost => Error::new(
            ErrorCode::LeaseLost,
            match epoch {
                Some(epoch) => format!("epoch {epoch} is not the current lease of this session"),
                None => "the lease is no longer held".to_owned(),
            },
        ),
        WriteError::Storage(message) => Error::new(ErrorCode::Storage, message),
        WriteError::Closed => Error::new(ErrorCode::ShuttingDown, "storage is closed"),
        WriteError::TooManyMessages(limit) => Error::new(
            ErrorCode::TooManyMessages { limit },
            format!("the profile already has {limit} pending messages, the most allowed"),
        ),
        WriteError::NotFound => Error::new(ErrorCode::NotFound, "no such profile or version"),
        WriteError::Held => Error::new(ErrorCode::Storage, "the profile is still leased"),
        WriteError::Exists(path) => Error::new(
            ErrorCode::InvalidRequest,
            format!("the backup path {path} already exists"),
        ),
    }
}
