//! What each request does: its checks, its rights, and the work it starts.
//!
//! Every limit is checked here, before any work is queued, so an oversized
//! or malformed request costs the daemon nothing but its answer. A request
//! either answers at once, returns a future that answers when its work is
//! done, or is handed to the lease driver, which answers it itself.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use futures::FutureExt;
use futures::future::BoxFuture;
use profiled_protocol::{
    Changes, DaemonStatus, Error, ErrorCode, ExportPage, ExportedProfile, OverwriteSource,
    ProfileView, Reply, Request, RequestBody, Response, Role, ServerFrame, SessionInfo,
    VersionQuery,
};

use crate::ProfileKey;
use crate::config::LimitsConfig;
use crate::connection::Session;
use crate::replies::{self, active_session, profile_meta};
use crate::stats::Gauges;
use crate::storage::{AdminAction, AdminDone, VersionFilter, WriteError};

/// The releases a connection has sent and not yet had answered, each by
/// profile and epoch.
///
/// A release reaches storage through the lease driver, so it can hand the
/// profile straight to a waiting load, while a save goes to storage from
/// the connection. A save sent behind a release of the same lease could
/// therefore be applied first, and then be overwritten by the release it
/// followed; instead it is refused as storage would refuse it after the
/// release: `LeaseLost`.
#[derive(Clone, Debug, Default)]
pub(crate) struct Releasing(Arc<Mutex<HashMap<(ProfileKey, u64), usize>>>);

/// One release in flight; dropped when it is answered, or abandoned with
/// its connection.
struct ReleaseInFlight {
    releasing: Releasing,
    lease: (ProfileKey, u64),
}

/// How a request was started.
pub(crate) enum Started {
    /// Answered at once.
    Done(Result<Reply, Error>),
    /// Answered when the future resolves.
    Pending(BoxFuture<'static, ServerFrame>),
    /// Handed to the lease driver, which answers through the outbound queue.
    Queued,
}

impl Session {
    /// Validates a request and starts it.
    pub(crate) fn start(&self, request: Request) -> Started {
        let id = request.id;
        let limits = &self.context.limits;
        let context = Arc::clone(&self.context);
        match request.body {
            RequestBody::Ping => Started::Done(Ok(Reply::Pong)),
            RequestBody::Load {
                store,
                key,
                policy,
                deadline_ms,
            } => {
                let key = match profile_key(store, key, limits) {
                    Ok(key) => key,
                    Err(err) => return Started::Done(Err(err)),
                };
                let wait = deadline_ms.map(std::time::Duration::from_millis);
                self.context.leases.load(self.conn, id, key, policy, wait);
                Started::Queued
            }
            RequestBody::Save {
                store,
                key,
                epoch,
                data,
                changes,
            } => {
                let key = match write_target(store, key, data.len(), &changes, limits) {
                    Ok(key) => key,
                    Err(err) => return Started::Done(Err(err)),
                };
                if self.releasing.contains(&key, epoch) {
                    return Started::Done(Err(replies::storage_error(
                        WriteError::LeaseLost,
                        Some(epoch),
                    )));
                }
                let write = context
                    .storage
                    .save(key, self.session.clone(), epoch, data, changes);
                pending(id, async move {
                    let result = write.await;
                    count_write(&context, &result);
                    if result.is_ok() {
                        context.stats.saved();
                    }
                    result
                        .map(|version| Reply::Saved { version })
                        .map_err(|err| replies::storage_error(err, Some(epoch)))
                })
            }
            RequestBody::Release {
                store,
                key,
                epoch,
                data,
                changes,
            } => {
                let len = data.as_ref().map_or(0, Vec::len);
                let key = match write_target(store, key, len, &changes, limits) {
                    Ok(key) => key,
                    Err(err) => return Started::Done(Err(err)),
                };
                let in_flight = self.releasing.start(key.clone(), epoch);
                let write = context
                    .leases
                    .release(key, self.session.clone(), epoch, data, changes);
                pending(id, async move {
                    let result = write.await;
                    drop(in_flight);
                    count_write(&context, &result);
                    if result.is_ok() {
                        context.stats.released();
                    }
                    result
                        .map(|version| Reply::Released { version })
                        .map_err(|err| replies::storage_error(err, Some(epoch)))
                })
            }
            RequestBody::SendMessage {
                store,
                key,
                payload,
            } => {
                let key = match profile_key(store, key, limits) {
                    Ok(key) => key,
                    Err(err) => return Started::Done(Err(err)),
                };
                if payload.len() > limits.max_message {
                    return Started::Done(Err(too_large(
                        "message",
                        payload.len(),
                        limits.max_message,
                    )));
                }
                let max_pending = limits.max_pending_messages;
                pending(id, async move {
                    let result = context.leases.send_message(key, payload, max_pending).await;
                    count_write(&context, &result);
                    result
                        .map(|id| Reply::MessageSent { id })
                        .map_err(|err| replies::storage_error(err, None))
                })
            }
            RequestBody::View {
                store,
                key,
                version,
            } => {
                let key = match profile_key(store, key, limits) {
                    Ok(key) => key,
                    Err(err) => return Started::Done(Err(err)),
                };
                pending(id, async move {
                    let view = context.storage.view(key, version).await;
                    count_write(&context, &view);
                    let view = view.map_err(|err| replies::storage_error(err, None))?;
                    Ok(Reply::Viewed(ProfileView {
                        version: view.version,
                        saved_at_ms: view.saved_at_ms,
                        data: view.data,
                        meta: profile_meta(view.meta, view.lease),
                        messages: view.messages,
                    }))
                })
            }
            RequestBody::ListVersions { store, key, query } => {
                let key = match profile_key(store, key, limits) {
                    Ok(key) => key,
                    Err(err) => return Started::Done(Err(err)),
                };
                let VersionQuery {
                    newest_first,
                    from_ms,
                    to_ms,
                    limit,
                } = query;
                let filter = VersionFilter {
                    newest_first,
                    from_ms,
                    to_ms,
                    limit: page_limit(limit, limits),
                };
                pending(id, async move {
                    let versions = context.storage.list_versions(key, filter).await;
                    count_write(&context, &versions);
                    versions
                        .map(Reply::Versions)
                        .map_err(|err| replies::storage_error(err, None))
                })
            }
            RequestBody::Stats => pending(id, async move {
                let gauges = gauges(&context).await;
                Ok(Reply::Stats(context.stats.report(gauges)))
            }),
            RequestBody::Status => pending(id, async move {
                let gauges = gauges(&context).await;
                Ok(Reply::Status(DaemonStatus {
                    daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
                    uptime_ms: u64::try_from(context.stats.uptime().as_millis())
                        .unwrap_or(u64::MAX),
                    connections: context.stats.open_connections(),
                    sessions: gauges.sessions,
                    leases_held: gauges.leases_held,
                    queued_loads: gauges.queued_loads,
                    storage_bytes: gauges.storage_bytes,
                }))
            }),
            admin => self.start_admin(id, admin),
        }
    }

    /// Starts a request that needs the admin role.
    fn start_admin(&self, id: u64, body: RequestBody) -> Started {
        if self.role != Role::Admin {
            return Started::Done(Err(Error::new(
                ErrorCode::Forbidden,
                "this request needs a connection with the admin role",
            )));
        }
        let limits = &self.context.limits;
        let context = Arc::clone(&self.context);
        let target = |store, key, action| match profile_key(store, key, limits) {
            Ok(key) => Ok((key, action)),
            Err(err) => Err(err),
        };
        let chosen = match body {
            RequestBody::Overwrite { store, key, source } => {
                let action = match source {
                    OverwriteSource::Data(data) => {
                        if data.len() > limits.max_data {
                            return Started::Done(Err(too_large(
                                "data",
                                data.len(),
                                limits.max_data,
                            )));
                        }
                        AdminAction::Overwrite(data)
                    }
                    OverwriteSource::Version(version) => AdminAction::Rollback(version),
                };
                target(store, key, action)
            }
            RequestBody::Import { store, profile } => {
                let ExportedProfile {
                    key,
                    data,
                    meta_tags,
                    user_ids,
                    ..
                } = profile;
                let changes = Changes {
                    meta_tags: Some(meta_tags),
                    user_ids: Some(user_ids),
                    consumed_messages: Vec::new(),
                };
                let len = data.as_ref().map_or(0, Vec::len);
                if let Err(err) = check_write(len, &changes, limits) {
                    return Started::Done(Err(err));
                }
                let Changes {
                    meta_tags,
                    user_ids,
                    ..
                } = changes;
                target(
                    store,
                    key,
                    AdminAction::Import {
                        data,
                        meta_tags: meta_tags.unwrap_or_default(),
                        user_ids: user_ids.unwrap_or_default(),
                    },
                )
            }
            RequestBody::Wipe { store, key } => target(store, key, AdminAction::Wipe),
            RequestBody::Revoke { store, key } => target(store, key, AdminAction::Revoke),
            RequestBody::AskRelease { store, key } => {
                let key = match profile_key(store, key, limits) {
                    Ok(key) => key,
                    Err(err) => return Started::Done(Err(err)),
                };
                let requester = self.session.clone();
                return pending(id, async move {
                    let holder = context
                        .leases
                        .ask_release(key.clone(), requester)
                        .await
                        .map_err(|_| shutting_down())?;
                    let Some((session, epoch)) = holder else {
                        return Ok(Reply::ReleaseAsked { lease: None });
                    };
                    // The table does not keep when a lease began; storage does.
                    let since_ms = match context.storage.view(key, None).await {
                        Ok(view) => view
                            .lease
                            .filter(|lease| lease.epoch == epoch)
                            .map_or(0, |lease| lease.since_ms),
                        Err(_) => 0,
                    };
                    Ok(Reply::ReleaseAsked {
                        lease: Some(profiled_protocol::ActiveSession {
                            session,
                            epoch,
                            since_ms,
                        }),
                    })
                });
            }
            RequestBody::Sessions => {
                return pending(id, async move {
                    let sessions = context
                        .leases
                        .sessions()
                        .await
                        .map_err(|_| shutting_down())?;
                    Ok(Reply::Sessions(
                        sessions
                            .into_iter()
                            .map(|summary| SessionInfo {
                                session: summary.session,
                                connection_id: summary.conn,
                                leases: summary
                                    .leases
                                    .into_iter()
                                    .map(replies::held_lease)
                                    .collect(),
                            })
                            .collect(),
                    ))
                });
            }
            RequestBody::Backup { path } => {
                let path = PathBuf::from(path);
                if !path.is_absolute() {
                    return Started::Done(Err(Error::new(
                        ErrorCode::InvalidRequest,
                        "the backup path must be absolute",
                    )));
                }
                return pending(id, async move {
                    let shown = path.display().to_string();
                    let result = context.storage.backup(path).await;
                    count_write(&context, &result);
                    let bytes = result.map_err(|err| replies::storage_error(err, None))?;
                    tracing::info!(path = %shown, bytes, "backup written");
                    Ok(Reply::BackedUp { path: shown, bytes })
                });
            }
            RequestBody::Export {
                store,
                after,
                limit,
            } => {
                if let Err(err) = check_name("store", &store, limits.max_name) {
                    return Started::Done(Err(err));
                }
                let limit = page_limit(limit, limits);
                // A page must fit in a frame: profiles are added while the
                // page stays within this, and a page always has at least
                // one (which fits on its own, by `profile_bound`). 1 KiB
                // is left for the page's own fields.
                let budget = usize::try_from(limits.max_frame)
                    .unwrap_or(usize::MAX)
                    .saturating_sub(1024 + limits.max_name);
                return pending(id, async move {
                    let result = context.storage.export(store, after, limit, budget).await;
                    count_write(&context, &result);
                    let (records, next) =
                        result.map_err(|err| replies::storage_error(err, None))?;
                    let profiles = records
                        .into_iter()
                        .map(|record| ExportedProfile {
                            key: record.key,
                            version: record.meta.version,
                            updated_at_ms: record.meta.updated_at_ms,
                            data: record.data,
                            meta_tags: record.meta.meta_tags,
                            user_ids: record.meta.user_ids,
                        })
                        .collect();
                    Ok(Reply::Exported(ExportPage { profiles, next }))
                });
            }
            other => {
                // Every request kind is matched above or in `start`; this
                // answers one added to the protocol but not yet here.
                tracing::error!(request = ?std::mem::discriminant(&other), "unhandled request");
                return Started::Done(Err(Error::new(
                    ErrorCode::InvalidRequest,
                    "this daemon does not handle that request",
                )));
            }
        };
        let (key, action) = match chosen {
            Ok(target) => target,
            Err(err) => return Started::Done(Err(err)),
        };
        pending(id, async move {
            let revoke = matches!(action, AdminAction::Revoke);
            let wipe = matches!(action, AdminAction::Wipe);
            let shown = key.to_string();
            let result = context.leases.admin(key, action).await;
            count_write(&context, &result);
            let AdminDone { version, ended } =
                result.map_err(|err| replies::storage_error(err, None))?;
            tracing::info!(profile = %shown, version, ended = ?ended.as_ref().map(|l| l.epoch), "admin change");
            Ok(if revoke {
                Reply::Revoked {
                    lease: ended.map(active_session),
                }
            } else if wipe {
                Reply::Wiped
            } else {
                Reply::Overwritten { version }
            })
        })
    }
}

/// Names must be non-empty, within the length limit, and free of control
/// characters, so they print safely in logs and tools.
pub(crate) fn check_name(what: &str, name: &str, max: usize) -> Result<(), Error> {
    if name.is_empty() {
        return Err(Error::new(
            ErrorCode::InvalidRequest,
            format!("{what} is empty"),
        ));
    }
    if name.len() > max {
        return Err(Error::new(
            ErrorCode::TooLarge,
            format!("{what} is {} bytes, over the limit of {max}", name.len()),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(Error::new(
            ErrorCode::InvalidRequest,
            format!("{what} contains a control character"),
        ));
    }
    Ok(())
}

impl Releasing {
    /// Whether a release of `key` under `epoch` is in flight.
    fn contains(&self, key: &ProfileKey, epoch: u64) -> bool {
        let releases = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        // Most saves find nothing in flight; skip hashing the key then.
        !releases.is_empty() && releases.contains_key(&(key.clone(), epoch))
    }

    /// Records a release of `key` under `epoch` until the returned guard is
    /// dropped.
    fn start(&self, key: ProfileKey, epoch: u64) -> ReleaseInFlight {
        let lease = (key, epoch);
        let mut releases = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        *releases.entry(lease.clone()).or_default() += 1;
        ReleaseInFlight {
            releasing: self.clone(),
            lease,
        }
    }
}

impl Drop for ReleaseInFlight {
    fn drop(&mut self) {
        let mut releases = self
            .releasing
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = releases.get_mut(&self.lease) {
            *count -= 1;
            if *count == 0 {
                releases.remove(&self.lease);
            }
        }
    }
}

/// Wraps the work of a request into the future that answers it.
fn pending(id: u64, work: impl Future<Output = Result<Reply, Error>> + Send + 'static) -> Started {
    Started::Pending(
        work.map(move |result| ServerFrame::Response(Response { id, result }))
            .boxed(),
    )
}

/// Checks a store name and key and forms the profile key.
fn profile_key(store: String, key: String, limits: &LimitsConfig) -> Result<ProfileKey, Error> {
    check_name("store", &store, limits.max_name)?;
    check_name("key", &key, limits.max_name)?;
    Ok(ProfileKey::new(store, key))
}

/// Checks the names, data size and changes of a save or release.
fn write_target(
    store: String,
    key: String,
    data_len: usize,
    changes: &Changes,
    limits: &LimitsConfig,
) -> Result<ProfileKey, Error> {
    let key = profile_key(store, key, limits)?;
    check_write(data_len, changes, limits)?;
    Ok(key)
}

/// Checks a write's data size and metadata changes against the limits.
fn check_write(data_len: usize, changes: &Changes, limits: &LimitsConfig) -> Result<(), Error> {
    if data_len > limits.max_data {
        return Err(too_large("data", data_len, limits.max_data));
    }
    if let Some(tags) = &changes.meta_tags {
        if tags.len() > limits.max_meta_tags {
            return Err(too_large(
                "meta tag count",
                tags.len(),
                limits.max_meta_tags,
            ));
        }
        for (name, value) in tags {
            check_name("meta tag name", name, limits.max_name)?;
            if value.len() > limits.max_meta_tag_size {
                return Err(too_large(
                    "meta tag value",
                    value.len(),
                    limits.max_meta_tag_size,
                ));
            }
        }
    }
    if let Some(ids) = &changes.user_ids
        && ids.len() > limits.max_user_ids
    {
        return Err(too_large("user id count", ids.len(), limits.max_user_ids));
    }
    let max_consumed = usize::try_from(limits.max_pending_messages).unwrap_or(usize::MAX);
    if changes.consumed_messages.len() > max_consumed {
        return Err(too_large(
            "consumed message count",
            changes.consumed_messages.len(),
            max_consumed,
        ));
    }
    Ok(())
}

/// The error for a value over its limit.
fn too_large(what: &str, size: usize, limit: usize) -> Error {
    Error::new(
        ErrorCode::TooLarge,
        format!("{what} is {size}, over the limit of {limit}"),
    )
}

fn shutting_down() -> Error {
    Error::new(ErrorCode::ShuttingDown, "the daemon is shutting down")
}

/// The page size for a listing: what was asked, within the limit.
fn page_limit(asked: u32, limits: &LimitsConfig) -> usize {
    usize::try_from(asked.clamp(1, limits.max_page)).unwrap_or(1)
}

/// Counts a storage failure in the stats.
fn count_write<T>(context: &crate::connection::Context, result: &Result<T, WriteError>) {
    match result {
        Err(WriteError::Storage(_)) => context.stats.storage_error(),
        Err(WriteError::LeaseLost) => context.stats.fenced(),
        _ => {}
    }
}

/// The gauges a report needs from the lease driver and storage.
pub(crate) async fn gauges(context: &crate::connection::Context) -> Gauges {
    let counts = context.leases.counts().await;
    let as_u64 = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    let memory = context.storage.memory_use();
    Gauges {
        leases_held: as_u64(counts.held),
        queued_loads: as_u64(counts.queued),
        sessions: as_u64(counts.sessions),
        storage_bytes: context.storage.size_on_disk().await,
        storage_degraded: context.storage.is_degraded(),
        wal_syncs: context.storage.wal_syncs(),
        memtable_bytes: memory.memtables,
        block_cache_bytes: memory.block_cache,
    }
}
