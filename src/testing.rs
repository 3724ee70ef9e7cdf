//! A real daemon for tests: what game teams use instead of ProfileService's
//! Mock store.
//!
//! [`TestDaemon`] runs this crate's own [`run`](crate::run) in-process, on a
//! temporary directory and socket, so tests exercise exactly the lease
//! logic and storage production uses, not a second implementation of them.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use profiled::testing::TestDaemon;
//! use profiled_client::{Client, LoadPolicy, SessionId};
//!
//! let daemon = TestDaemon::start().await?;
//! let session = SessionId { place_id: 1, job_id: "test-server".into() };
//! let client = Client::connect(daemon.socket(), session).await?;
//! let profile = client.load("PlayerData", "Player_1", LoadPolicy::ForceLoad).await?;
//! profile.save(b"coins=10".to_vec()).await?;
//! profile.release(None).await?;
//! daemon.stop().await?;
//! # Ok(())
//! # }
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::{Config, ServerError};

/// A daemon running in this process on a temporary directory. It stops
/// when [`TestDaemon::stop`] is awaited, or, less cleanly, when dropped.
#[derive(Debug)]
pub struct TestDaemon {
    /// Holds the socket and the database; deleted once the daemon is done.
    dir: Option<TempDir>,
    /// The socket clients connect to.
    socket: PathBuf,
    /// Tells the daemon's `run` to stop; it holds the receiving end.
    stop: Option<oneshot::Sender<()>>,
    /// The task running the daemon.
    task: Option<JoinHandle<Result<(), ServerError>>>,
}

/// Why a test daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum TestDaemonError {
    /// The temporary directory could not be made.
    #[error("cannot create a temporary directory: {0}")]
    TempDir(#[from] std::io::Error),
    /// The daemon refused to start.
    #[error(transparent)]
    Server(#[from] ServerError),
}

impl TestDaemon {
    /// Starts a daemon with the default configuration, except for a short
    /// shutdown grace so tests end quickly.
    pub async fn start() -> Result<Self, TestDaemonError> {
        let mut config = Config::default();
        config.shutdown.grace = Duration::from_millis(100);
        Self::start_with(config).await
    }

    /// Starts a daemon with `config`; its socket and storage paths are
    /// replaced by ones in a fresh temporary directory.
    pub async fn start_with(mut config: Config) -> Result<Self, TestDaemonError> {
        let dir = tempfile::Builder::new().prefix("profiled-test").tempdir()?;
        config.listen.socket = dir.path().join("profiled.sock");
        config.storage.path = dir.path().join("data");
        let socket = config.listen.socket.clone();
        let listener = crate::bind(&socket, &config.access)?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(crate::run(config, listener, async {
            let _ = stopped.await;
        }));
        Ok(Self {
            dir: Some(dir),
            socket,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// The socket to give `Client::connect`.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stops the daemon gracefully (every lease released, storage flushed)
    /// and removes its directory.
    pub async fn stop(mut self) -> Result<(), ServerError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let outcome = match self.task.take() {
            Some(task) => task
                .await
                .unwrap_or_else(|err| Err(ServerError::Stopped(err.to_string()))),
            None => Ok(()),
        };
        drop(self.dir.take());
        outcome
    }
}

impl Drop for TestDaemon {
    /// Asks the daemon to stop and, if a runtime is still around, removes
    /// the directory only once it has, so RocksDB is never deleted under a
    /// running daemon.
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let (Some(task), Some(dir)) = (self.task.take(), self.dir.take()) else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = task.await;
                drop(dir);
            });
        }
    }
}
