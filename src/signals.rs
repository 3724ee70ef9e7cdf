//! Stopping and reloading the daemon on Unix signals.
//!
//! SIGTERM and SIGINT count up a stop counter: the first stop starts the
//! graceful shutdown, the second hurries it. SIGHUP re-reads the config
//! file; only `log.level` takes effect at once, and every other changed
//! setting is reported as waiting for the next restart.
//!
//! A plain thread (signal-hook's iterator) rather than the async runtime
//! handles the signals, so a config reload's file read never blocks a
//! runtime worker and signals are handled even while the runtime is busy.

use std::fmt::Debug;
use std::io;
use std::path::PathBuf;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tokio::sync::watch;

use crate::Config;
use crate::logging::{LevelChange, LevelControl};

/// Why signal handling could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    /// The process-wide handlers could not be registered, so the daemon
    /// could not be stopped or reloaded cleanly.
    #[error("cannot install signal handlers: {0}")]
    Install(io::Error),
    /// The thread that waits for signals could not be started.
    #[error("cannot start the signal thread: {0}")]
    Thread(io::Error),
}

/// Applies a re-read config file to the running daemon on SIGHUP.
///
/// It keeps the command-line overrides so that a reload applies them again,
/// exactly as at start-up, and the settings in force so that it can tell
/// which changes wait for a restart.
#[derive(Debug)]
pub struct Reloader {
    /// The file to re-read.
    config_path: PathBuf,
    /// The `--socket` override, applied again to the re-read file.
    socket: Option<PathBuf>,
    /// The `--data-dir` override, applied again to the re-read file.
    data_dir: Option<PathBuf>,
    /// The settings in force: the start-up config with every applied
    /// reload, so a setting that needs a restart is reported on every
    /// reload until the restart.
    running: Config,
    /// Changes the log level.
    level: LevelControl,
}

impl Reloader {
    /// A reloader for a daemon started with `running`, which was read from
    /// `config_path` and then given the `socket` and `data_dir` overrides
    /// from the command line.
    pub fn new(
        config_path: PathBuf,
        socket: Option<PathBuf>,
        data_dir: Option<PathBuf>,
        running: Config,
        level: LevelControl,
    ) -> Self {
        Self {
            config_path,
            socket,
            data_dir,
            running,
            level,
        }
    }

    /// Re-reads the config file and applies what can change while the
    /// daemon runs (the log level). Failures are logged rather than
    /// returned, because a bad edit to the file must never stop a running
    /// daemon: it keeps running on the previous config.
    pub fn reload(&mut self) {
        tracing::info!(config = %self.config_path.display(), "received SIGHUP; re-reading the config");
        // A file deleted or renamed since the start is more likely a
        // mistake than a wish for the built-in defaults.
        if !self.config_path.exists() {
            tracing::error!(config = %self.config_path.display(), "the config file is gone; still running on the previous config");
            return;
        }
        let mut new = match Config::load(&self.config_path) {
            Ok(config) => config,
            Err(err) => {
                tracing::error!(error = %err, "config reload failed; still running on the previous config");
                return;
            }
        };
        if let Some(socket) = &self.socket {
            new.listen.socket = socket.clone();
        }
        if let Some(data_dir) = &self.data_dir {
            new.storage.path = data_dir.clone();
        }
        match self.level.set(&new.log.level) {
            Ok(LevelChange::Changed { from, to }) => {
                tracing::info!(%from, %to, "log.level changed");
                self.running.log.level = to;
            }
            Ok(LevelChange::Unchanged) => {}
            Ok(LevelChange::PinnedByEnv { env }) => {
                if new.log.level != self.running.log.level {
                    tracing::warn!(rust_log = %env, level = %new.log.level, "log.level changed in the file, but RUST_LOG takes precedence");
                }
            }
            Err(err) => tracing::error!(error = %err, "cannot apply log.level"),
        }
        let pending = restart_only_changes(&self.running, &new);
        if pending.is_empty() {
            tracing::info!("config reloaded");
        } else {
            tracing::warn!(
                settings = ?pending,
                "config reloaded; these changed settings take effect only at the next restart"
            );
        }
    }
}

/// Handles signals on a dedicated thread: SIGTERM and SIGINT count up the
/// returned stop counter; SIGHUP calls [`Reloader::reload`].
///
/// Call it after daemonizing, because threads do not survive a fork. The
/// thread runs for the rest of the process's life, so the counter's sender
/// is never dropped.
pub fn spawn_signal_thread(mut reloader: Reloader) -> Result<watch::Receiver<u32>, SignalError> {
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(SignalError::Install)?;
    let (stops_tx, stops_rx) = watch::channel(0u32);
    std::thread::Builder::new()
        .name("signals".to_owned())
        .spawn(move || {
            for signal in signals.forever() {
                let name = match signal {
                    SIGTERM => "SIGTERM",
                    SIGINT => "SIGINT",
                    SIGHUP => {
                        reloader.reload();
                        continue;
                    }
                    _ => continue,
                };
                stops_tx.send_modify(|count| *count += 1);
                if *stops_tx.borrow() == 1 {
                    tracing::info!("received {name}; stopping gracefully (send again to hurry)");
                } else {
                    tracing::info!("received {name} again; hurrying the shutdown");
                }
            }
        })
        .map_err(SignalError::Thread)?;
    Ok(stops_rx)
}

/// Resolves once `n` stop signals have arrived on the counter from
/// [`spawn_signal_thread`], so `n = 1` can start the graceful shutdown and
/// `n = 2` can hurry it.
pub async fn nth_stop(mut stops: watch::Receiver<u32>, n: u32) {
    if stops.wait_for(|count| *count >= n).await.is_err() {
        // The signal thread never ends, so the sender is never dropped
        // while the daemon runs; if it were, waiting forever is right.
        std::future::pending::<()>().await;
    }
}

/// The settings that differ between `running` and `new` and that cannot
/// change while the daemon runs.
fn restart_only_changes(running: &Config, new: &Config) -> Vec<&'static str> {
    // Sections are compared through Debug, which shows every field, so a
    // field added to a section later is covered without changes here.
    fn differs(a: &impl Debug, b: &impl Debug) -> bool {
        format!("{a:?}") != format!("{b:?}")
    }
    let mut changed = Vec::new();
    let named: [(&'static str, bool); 8] = [
        ("listen", differs(&running.listen, &new.listen)),
        ("storage", differs(&running.storage, &new.storage)),
        ("leases", differs(&running.leases, &new.leases)),
        ("session", differs(&running.session, &new.session)),
        ("limits", differs(&running.limits, &new.limits)),
        ("shutdown", differs(&running.shutdown, &new.shutdown)),
        ("log.dir", running.log.dir != new.log.dir),
        (
            "log.file_prefix",
            running.log.file_prefix != new.log.file_prefix,
        ),
    ];
    changed.extend(named.iter().filter(|(_, d)| *d).map(|(name, _)| *name));
    // Any other section (one added after this list was written) is
    // reported as a whole: copy the named parts over and compare the rest.
    let mut rest = new.clone();
    rest.listen = running.listen.clone();
    rest.storage = running.storage.clone();
    rest.leases = running.leases.clone();
    rest.session = running.session.clone();
    rest.limits = running.limits.clone();
    rest.shutdown = running.shutdown.clone();
    rest.log = running.log.clone();
    if differs(running, &rest) {
        changed.push("other sections");
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_config_needs_no_restart() {
        let config = Config::default();
        assert!(restart_only_changes(&config, &config.clone()).is_empty());
    }

    #[test]
    fn the_log_level_needs_no_restart() {
        let running = Config::default();
        let mut new = running.clone();
        new.log.level = format!("{},profiled=trace", running.log.level);
        assert!(restart_only_changes(&running, &new).is_empty());
    }

    #[test]
    fn restart_only_settings_are_named() {
        let running = Config::default();
        let mut new = running.clone();
        new.storage.path = running.storage.path.join("elsewhere");
        new.log.file_prefix = format!("{}-other", running.log.file_prefix);
        assert_eq!(
            restart_only_changes(&running, &new),
            ["storage", "log.file_prefix"]
        );
    }
}
