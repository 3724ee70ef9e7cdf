//! Where and how much the daemon logs, and changing how much while it runs.
//!
//! In the foreground the log is human-readable text on stdout, which
//! journald captures as it is when systemd runs the daemon. With `log.dir`
//! set, the log goes to files there that roll over daily, written by a
//! background thread so a slow disk never stalls a client's request.
//!
//! The level is a tracing filter from `log.level`, or from `RUST_LOG` when
//! that is set: an operator's explicit environment beats the file. The
//! filter sits behind a reload layer, so SIGHUP can change it in place.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tracing_appender::non_blocking::WorkerGuard;
use tracing_appender::rolling::{RollingFileAppender, Rotation};
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::LogConfig;

/// Why logging could not be set up or changed.
#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    /// `log.level` (or a reloaded one) is not a tracing filter.
    #[error("log.level {level:?} is not a valid tracing filter: {source}")]
    Filter {
        /// The filter text.
        level: String,
        /// The parser's complaint.
        source: tracing_subscriber::filter::ParseError,
    },
    /// `log.dir` could not be created.
    #[error("cannot create the log directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The rolling log file could not be opened.
    #[error("cannot open a log file in {path}: {source}")]
    File {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: tracing_appender::rolling::InitError,
    },
    /// A global subscriber was already installed; logging is set up once
    /// per process.
    #[error("logging is already set up: {0}")]
    AlreadySet(#[from] tracing_subscriber::util::TryInitError),
    /// The running filter could not be replaced, because the subscriber
    /// holding it is gone.
    #[error("cannot change the log level: {0}")]
    Reload(#[from] reload::Error),
}

/// The process's logging. Keep it alive until the process exits: dropping
/// it stops the background writer, and lines logged after that are lost.
#[derive(Debug)]
pub struct Logging {
    /// Flushes the file writer's queue when dropped; `None` on stdout,
    /// which is written directly.
    _guard: Option<WorkerGuard>,
    /// Changes the level while the daemon runs.
    level: LevelControl,
}

impl Logging {
    /// A handle for changing the level later, for the SIGHUP handler.
    pub fn level_control(&self) -> LevelControl {
        self.level.clone()
    }
}

/// Changes the log level of the running process.
#[derive(Clone, Debug)]
pub struct LevelControl {
    /// The filter slot inside the installed subscriber.
    handle: reload::Handle<EnvFilter, Registry>,
    /// Whether `RUST_LOG` chose the filter; then the config file's level is
    /// not applied, so a reload cannot quietly undo an operator's override.
    pinned_by_env: bool,
    /// The filter text now in force, to report what a reload changed.
    current: Arc<Mutex<String>>,
}

/// What [`LevelControl::set`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum LevelChange {
    /// The new level is the one already in force.
    Unchanged,
    /// The level changed.
    Changed {
        /// The filter before.
        from: String,
        /// The filter now.
        to: String,
    },
    /// `RUST_LOG` is set and keeps precedence; nothing changed.
    PinnedByEnv {
        /// The `RUST_LOG` filter still in force.
        env: String,
    },
}

impl LevelControl {
    /// Replaces the filter with `level` unless `RUST_LOG` pins it.
    pub fn set(&self, level: &str) -> Result<LevelChange, LoggingError> {
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.pinned_by_env {
            return Ok(LevelChange::PinnedByEnv {
                env: current.clone(),
            });
        }
        if *current == level {
            return Ok(LevelChange::Unchanged);
        }
        self.handle.reload(parse_filter(level)?)?;
        let from = std::mem::replace(&mut *current, level.to_owned());
        Ok(LevelChange::Changed {
            from,
            to: level.to_owned(),
        })
    }
}

/// Installs the global subscriber described by `config`.
///
/// Call it after daemonizing, because the file writer's background thread
/// would not survive the fork.
pub fn init(config: &LogConfig) -> Result<Logging, LoggingError> {
    let env = std::env::var("RUST_LOG")
        .ok()
        .filter(|value| !value.is_empty());
    let mut bad_env = None;
    let (filter, text, pinned_by_env) = match env.map(|text| (EnvFilter::try_new(&text), text)) {
        Some((Ok(filter), text)) => (filter, text, true),
        Some((Err(err), text)) => {
            // A typo in RUST_LOG should not stop the daemon; the config's
            // level is a sound fallback, and the mistake is logged below.
            bad_env = Some((text, err));
            (parse_filter(&config.level)?, config.level.clone(), false)
        }
        None => (parse_filter(&config.level)?, config.level.clone(), false),
    };
    let (filter, handle) = reload::Layer::new(filter);

    let (writer, ansi, guard) = match &config.dir {
        Some(dir) => {
            let appender = open_rolling(dir, &config.file_prefix)?;
            // The lossy default drops lines rather than block the server
            // when the disk cannot keep up; losing log lines is the lesser
            // harm next to stalling every client.
            let (writer, guard) = tracing_appender::non_blocking(appender);
            (BoxMakeWriter::new(writer), false, Some(guard))
        }
        None => (
            BoxMakeWriter::new(std::io::stdout),
            std::io::stdout().is_terminal(),
            None,
        ),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(writer)
                .with_ansi(ansi),
        )
        .try_init()?;

    if let Some((text, err)) = bad_env {
        tracing::warn!(rust_log = %text, error = %err, "ignoring RUST_LOG; using log.level");
    }
    Ok(Logging {
        _guard: guard,
        level: LevelControl {
            handle,
            pinned_by_env,
            current: Arc::new(Mutex::new(text)),
        },
    })
}

/// Where a daemonized process's stdout and stderr go when `log.dir` is
/// set: panics and anything else printed outside tracing land beside the
/// log files instead of vanishing.
pub fn console_path(config: &LogConfig) -> Option<PathBuf> {
    let dir = config.dir.as_ref()?;
    Some(dir.join(format!("{}.console.log", config.file_prefix)))
}

/// Opens the daily rolling file `<dir>/<prefix>.<date>.log`, creating the
/// directory if needed.
fn open_rolling(dir: &Path, prefix: &str) -> Result<RollingFileAppender, LoggingError> {
    std::fs::create_dir_all(dir).map_err(|source| LoggingError::Dir {
        path: dir.to_owned(),
        source,
    })?;
    RollingFileAppender::builder()
        .rotation(Rotation::DAILY)
        .filename_prefix(prefix)
        .filename_suffix("log")
        .build(dir)
        .map_err(|source| LoggingError::File {
            path: dir.to_owned(),
            source,
        })
}

/// Parses a tracing filter, naming it in the error.
fn parse_filter(level: &str) -> Result<EnvFilter, LoggingError> {
    EnvFilter::try_new(level).map_err(|source| LoggingError::Filter {
        level: level.to_owned(),
        source,
    })
}
