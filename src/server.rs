//! The daemon: binding the socket, accepting connections, and stopping.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use profiled_protocol::{Error, ErrorCode, FrameCodec, ServerFrame};
use tokio::net::UnixListener;
use tokio::sync::Semaphore;
use tokio_util::codec::FramedWrite;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access::AccessPolicy;
use crate::config::AccessConfig;
use crate::config::Config;
use crate::connection::{self, Context};
use crate::leases::{LeaseRules, Leases, Released};
use crate::stats::Stats;
use crate::storage::{Storage, StorageError};

/// Why the daemon could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Another daemon answers on the socket path.
    #[error("another profiled is already listening on {0}")]
    AlreadyRunning(PathBuf),
    /// The socket path exists and is not a socket; it is left alone.
    #[error("{0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// Binding the socket failed.
    #[error("cannot listen on {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The Prometheus endpoint could not listen on `metrics.prometheus`.
    #[error("cannot serve metrics.prometheus on {addr}: {reason}")]
    Metrics {
        /// The configured address.
        addr: std::net::SocketAddr,
        /// Why, as the exporter put it.
        reason: String,
    },
    /// The database failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The access rules could not be resolved, or the socket file's mode
    /// or group could not be set.
    #[error("access: {0}")]
    Access(String),
    /// Storage failed to release some leases at shutdown. They stay
    /// recorded, and the next start recovers them for their sessions to
    /// resume within the grace.
    #[error("{0} leases could not be released; the next start recovers them")]
    LeasesKept(usize),
    /// A shutdown step ran out of time.
    #[error("shutdown step '{0}' did not finish in time")]
    ShutdownTimeout(&'static str),
    /// The task running the daemon ended abnormally.
    #[error("the daemon task stopped abnormally: {0}")]
    Stopped(String),
}

/// A listening socket, and the socket file the daemon must remove when it
/// stops: the file it bound itself, never one that systemd owns.
#[derive(Debug)]
pub struct Listener {
    socket: UnixListener,
    owned_path: Option<PathBuf>,
}

impl Listener {
    /// A socket handed over by the service manager (socket activation). Its
    /// file belongs to the manager and outlives the daemon, so clients can
    /// queue on it during a restart.
    pub fn inherited(socket: UnixListener) -> Self {
        Self {
            socket,
            owned_path: None,
        }
    }
}

/// How long each shutdown step after the grace period may take.
const STEP_DEADLINE: Duration = Duration::from_secs(10);

/// Binds the Unix socket at `path`, with the mode and group `access` gives.
///
/// A socket file nobody answers on is left over from a daemon that died,
/// and is replaced. A socket somebody answers on belongs to a live daemon,
/// and this one refuses to start rather than steal its clients.
pub fn bind(path: &Path, access: &AccessConfig) -> Result<Listener, ServerError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) => {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(ServerError::NotASocket(path.to_owned()));
            }
            match std::os::unix::net::UnixStream::connect(path) {
                Ok(_) => return Err(ServerError::AlreadyRunning(path.to_owned())),
                Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => {
                    tracing::info!(path = %path.display(), "replacing a stale socket file");
                    std::fs::remove_file(path).map_err(|source| ServerError::Bind {
                        path: path.to_owned(),
                        source,
                    })?;
                }
                Err(source) => {
                    return Err(ServerError::Bind {
                        path: path.to_owned(),
                        source,
                    });
                }
            }
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ServerError::Bind {
                path: path.to_owned(),
                source,
            });
        }
    }
    // The socket is bound under a temporary name, given its mode and group,
    // and only then renamed into place, so no client ever finds it with
    // looser permissions than configured.
    let bind_error = |source| ServerError::Bind {
        path: path.to_owned(),
        source,
    };
    let mut staging = path.as_os_str().to_owned();
    staging.push(format!(".{}.new", std::process::id()));
    let staging = PathBuf::from(staging);
    let _ = std::fs::remove_file(&staging);
    let socket = UnixListener::bind(&staging).map_err(bind_error)?;
    let secured = secure(&staging, access).and_then(|()| {
        std::fs::rename(&staging, path).map_err(|err| ServerError::Bind {
            path: path.to_owned(),
            source: err,
        })
    });
    if let Err(err) = secured {
        let _ = std::fs::remove_file(&staging);
        return Err(err);
    }
    Ok(Listener {
        socket,
        owned_path: Some(path.to_owned()),
    })
}

/// Gives a socket file the configured mode and group.
fn secure(path: &Path, access: &AccessConfig) -> Result<(), ServerError> {
    let mode = access
        .mode()
        .ok_or_else(|| ServerError::Access("access.socket_mode is not an octal mode".to_owned()))?;
    let group = match &access.socket_group {
        Some(group) => Some(
            crate::access::socket_group(group)
                .map_err(|err| ServerError::Access(err.to_string()))?,
        ),
        None => None,
    };
    crate::access::secure_socket(path, mode, group).map_err(|err| {
        ServerError::Access(format!("cannot set the mode of {}: {err}", path.display()))
    })
}

/// Runs the daemon on `listener` until `shutdown` resolves, then stops
/// gracefully (see [`run_with`]).
pub async fn run(
    config: Config,
    listener: Listener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    run_with(config, listener, shutdown, std::future::pending()).await
}

/// Runs the daemon on `listener` until `shutdown` resolves, then stops:
///
/// 1. new and queued loads end with `ShuttingDown`;
/// 2. every client is sent `ShuttingDown { deadline }`;
/// 3. clients get up to `shutdown.grace` to save and release (cut short
///    when `hurry` resolves, as on a second signal);
/// 4. every lease still held is released, keeping its last saved data;
/// 5. connections close and storage is flushed and closed;
/// 6. the socket file is removed.
///
/// Every step has a deadline.
pub async fn run_with(
    config: Config,
    listener: Listener,
    shutdown: impl Future<Output = ()>,
    hurry: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let Listener {
        socket: listener,
        owned_path,
    } = listener;
    // Bound before storage opens, so a taken address stops the start with
    // nothing to undo.
    let exporter = config
        .metrics
        .prometheus
        .map(crate::prometheus::Exporter::bind)
        .transpose()?;
    let storage_config = config.storage.clone();
    let history_config = config.history.clone();
    let (storage, recovery) =
        tokio::task::spawn_blocking(move || Storage::open(&storage_config, &history_config))
            .await
            .map_err(|err| StorageError::Committer(err.to_string()))??;
    if !recovery.leases.is_empty() {
        tracing::info!(
            leases = recovery.leases.len(),
            grace = ?config.session.resume_grace,
            "holding the previous run's leases for their sessions to resume"
        );
    }
    let rules = LeaseRules {
        force_load_timeout: config.leases.force_load_timeout,
        resume_grace: config.session.resume_grace,
        take_disconnected_at_once: config.session.take_disconnected_at_once,
        max_leases_per_session: config.limits.leases_per_session(),
    };
    let recovered = recovery
        .leases
        .into_iter()
        .map(|(key, lease)| (key, lease.session, lease.epoch, lease.uid))
        .collect();
    let access =
        AccessPolicy::new(&config.access).map_err(|err| ServerError::Access(err.to_string()))?;
    let stats = Arc::new(Stats::new());
    let leases = Leases::start(
        storage.clone(),
        rules,
        recovered,
        Arc::clone(&stats),
        config.limits.max_frame,
    );
    let context = Arc::new(Context {
        leases: leases.clone(),
        storage: storage.clone(),
        limits: config.limits.clone(),
        stats: Arc::clone(&stats),
        access,
    });
    let connections = TaskTracker::new();
    let stop = CancellationToken::new();
    // Background work that must end before storage closes.
    let background = TaskTracker::new();
    background.spawn(crate::pruning::run(
        storage.clone(),
        config.history.clone(),
        Arc::clone(&stats),
        stop.clone(),
    ));
    if let Some(exporter) = exporter {
        exporter.spawn(Arc::clone(&context), &stop, &background);
    }
    let slots = Arc::new(Semaphore::new(config.limits.max_connections));
    let next_conn = AtomicU64::new(1);
    tracing::info!(
        socket = %config.listen.socket.display(),
        data = %config.storage.path.display(),
        "profiled is ready"
    );
    crate::notify::ready();

    tokio::pin!(shutdown);
    let failed_for_good = storage.failed_for_good();
    tokio::pin!(failed_for_good);
    let failure = loop {
        tokio::select! {
            () = &mut shutdown => break None,
            failure = &mut failed_for_good => break Some(failure),
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                        connections.spawn(turn_away(stream, config.limits.max_frame));
                        continue;
                    };
                    let conn = next_conn.fetch_add(1, Ordering::Relaxed);
                    let context = Arc::clone(&context);
                    let stop = stop.clone();
                    connections.spawn(async move {
                        connection::serve(stream, conn, context, stop).await;
                        drop(slot);
                    });
                }
                Err(err) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    };
    drop(listener);
    if let Some(failure) = failure {
        // Nothing can be written, and what storage holds may differ from
        // what clients were told: leases are neither released nor
        // flushed, exactly as after a crash, and the next start rebuilds
        // the lease table from storage.
        tracing::error!(error = %failure, "storage failed for good; stopping without releasing leases");
        crate::notify::stopping();
        wind_down(&stop, &connections, &background).await;
        remove_socket(owned_path);
        return Err(StorageError::SyncFailed(failure).into());
    }

    let started = Instant::now();
    let grace = config.shutdown.grace;
    let held = leases.counts().await.held;
    tracing::info!(leases = held, ?grace, "shutting down");
    crate::notify::stopping();
    leases.stop_loads(grace);
    tokio::pin!(hurry);
    tokio::select! {
        () = leases.when_idle() => {}
        () = tokio::time::sleep(grace) => {}
        () = &mut hurry => tracing::info!("asked again to stop: releasing every lease now"),
    }
    // Past its deadline the rest still runs: the connections close, storage
    // is flushed and the socket removed, and the leases left are recovered
    // by the next start, for their sessions to resume.
    let released = tokio::time::timeout(STEP_DEADLINE, leases.release_all()).await;
    match released {
        Err(_) => tracing::error!(
            "not every lease was released in time; the next start recovers the rest"
        ),
        Ok(Released { failed, .. }) if failed > 0 => tracing::error!(
            failed,
            "storage failed to release some leases; the next start recovers them"
        ),
        Ok(_) => {}
    }
    wind_down(&stop, &connections, &background).await;
    drop(context);
    drop(leases);
    let closed = tokio::time::timeout(STEP_DEADLINE, storage.close()).await;
    remove_socket(owned_path);
    let released = released.map_err(|_| ServerError::ShutdownTimeout("release leases"))?;
    if released.failed > 0 {
        return Err(ServerError::LeasesKept(released.failed));
    }
    closed.map_err(|_| ServerError::ShutdownTimeout("flush storage"))??;
    tracing::info!(
        released_by_clients = held.saturating_sub(released.by_daemon),
        released_by_daemon = released.by_daemon,
        elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "stopped"
    );
    Ok(())
}

/// Stops the connections and the background work, waiting for each at
/// most [`STEP_DEADLINE`].
async fn wind_down(stop: &CancellationToken, connections: &TaskTracker, background: &TaskTracker) {
    stop.cancel();
    connections.close();
    background.close();
    if tokio::time::timeout(STEP_DEADLINE, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("some connections did not close in time");
    }
    if tokio::time::timeout(STEP_DEADLINE, background.wait())
        .await
        .is_err()
    {
        tracing::warn!("background work did not stop in time");
    }
}

/// Removes the socket file the daemon bound itself, if it did.
fn remove_socket(owned_path: Option<PathBuf>) {
    if let Some(path) = owned_path
        && let Err(err) = std::fs::remove_file(&path)
        && err.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(error = %err, "could not remove the socket file");
    }
}

/// Tells a client over the connection limit why it is refused.
async fn turn_away(stream: tokio::net::UnixStream, max_frame: u32) {
    use futures::SinkExt;
    let mut framed = FramedWrite::new(stream, FrameCodec::<(), ServerFrame>::new(max_frame));
    let refusal = ServerFrame::Refused(Error::new(
        ErrorCode::TooLarge,
        "too many connections; try again later",
    ));
    let _ = tokio::time::timeout(Duration::from_secs(1), framed.send(refusal)).await;
}
