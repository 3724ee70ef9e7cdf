//! Running in the background without systemd: forking away from the
//! terminal (`--daemonize`) and keeping a pid file (`--pid-file`).
//!
//! Under systemd none of this is used: systemd tracks the process itself.
//! The fork is done by the `daemonize` crate, named `::daemonize` here
//! because this module shares its name.

use std::io;
use std::path::{Path, PathBuf};

use crate::Config;

/// Why the daemon could not move into the background.
#[derive(Debug, thiserror::Error)]
pub enum DaemonizeError {
    /// The pid file names a live process, most likely a daemon already
    /// serving the same socket and data; starting a second one over it
    /// would be refused later anyway, with a less helpful message.
    #[error(
        "{path} names process {pid}, which is running; is profiled already running? \
         (stop it, or remove the pid file if that process is not profiled)"
    )]
    AlreadyRunning {
        /// The pid file.
        path: PathBuf,
        /// The live process it names.
        pid: u32,
    },
    /// The pid file exists but could not be read, so whether a daemon is
    /// already running is unknown.
    #[error("cannot read {path}: {source}")]
    ReadPidFile {
        /// The pid file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The working directory, which the daemon keeps so relative paths in
    /// the config keep their meaning, could not be read.
    #[error("cannot read the working directory: {0}")]
    WorkingDir(io::Error),
    /// The directory for the console log could not be created.
    #[error("cannot create {path}: {source}")]
    ConsoleDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The console log, which receives the daemon's stdout and stderr,
    /// could not be opened.
    #[error("cannot open {path}: {source}")]
    ConsoleFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The fork, the new session, or the pid file's lock failed.
    #[error("cannot daemonize: {0}")]
    Start(::daemonize::Error),
}

/// Forks into the background: the parent exits once the daemon is
/// detached, and the daemon continues from here.
///
/// Call it before anything starts a thread (the log writer, the signal
/// thread, the async runtime), because threads do not survive a fork.
///
/// Its stdout and stderr go to `<log.dir>/<log.file_prefix>.console.log`
/// when `log.dir` is set, else to /dev/null. The working directory stays
/// the same, so relative paths in the config keep their meaning. The
/// daemonize crate's umask of 027 applies, so the socket and data are not
/// world-readable.
pub fn daemonize(pid_file: Option<&Path>, config: &Config) -> Result<(), DaemonizeError> {
    if let Some(path) = pid_file
        && let Some(pid) = live_pid(path)?
    {
        return Err(DaemonizeError::AlreadyRunning {
            path: path.to_owned(),
            pid,
        });
    }
    let cwd = std::env::current_dir().map_err(DaemonizeError::WorkingDir)?;
    let (stdout, stderr) = match crate::logging::console_path(&config.log) {
        Some(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|source| DaemonizeError::ConsoleDir {
                    path: dir.to_owned(),
                    source,
                })?;
            }
            let open_error = |source: io::Error| DaemonizeError::ConsoleFile {
                path: path.clone(),
                source,
            };
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(open_error)?;
            let copy = file.try_clone().map_err(open_error)?;
            (
                ::daemonize::Stdio::from(file),
                ::daemonize::Stdio::from(copy),
            )
        }
        None => (::daemonize::Stdio::devnull(), ::daemonize::Stdio::devnull()),
    };
    let mut daemon = ::daemonize::Daemonize::new()
        .working_directory(cwd)
        .stdout(stdout)
        .stderr(stderr);
    if let Some(path) = pid_file {
        // The crate also holds an exclusive lock on the pid file for the
        // daemon's life, which catches two daemons started at once.
        daemon = daemon.pid_file(path);
    }
    daemon.start().map_err(DaemonizeError::Start)?;
    Ok(())
}

/// Removes the pid file if it still names this process, once the daemon
/// has fully stopped, so a supervisor polling it never starts a second
/// daemon over a live one. A failure is only logged: the daemon has already
/// stopped, and a stale pid file is harmless because [`daemonize()`] checks
/// whether the process it names is alive.
pub fn remove_pid_file(path: &Path) {
    let ours = std::fs::read_to_string(path)
        .is_ok_and(|text| text.trim() == std::process::id().to_string());
    if ours && let Err(err) = std::fs::remove_file(path) {
        tracing::warn!(path = %path.display(), error = %err, "cannot remove the pid file");
    }
}

/// The pid in the pid file at `path` if that process is alive.
///
/// Liveness is read from /proc, which needs no unsafe code or C library.
fn live_pid(path: &Path) -> Result<Option<u32>, DaemonizeError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(DaemonizeError::ReadPidFile {
                path: path.to_owned(),
                source,
            });
        }
    };
    // An empty or garbled pid file is left by a daemon that died while
    // writing it; it names nobody.
    let Ok(pid) = text.trim().parse::<u32>() else {
        return Ok(None);
    };
    Ok(Path::new("/proc")
        .join(pid.to_string())
        .exists()
        .then_some(pid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_pid_file_names_nobody() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("profiled.pid");
        assert_eq!(live_pid(&path).expect("live_pid"), None);
    }

    #[test]
    fn a_garbled_pid_file_names_nobody() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("profiled.pid");
        std::fs::write(&path, "not a pid\n").expect("write");
        assert_eq!(live_pid(&path).expect("live_pid"), None);
    }

    #[test]
    fn a_pid_file_naming_this_process_is_live() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("profiled.pid");
        std::fs::write(&path, format!("{}\n", std::process::id())).expect("write");
        assert_eq!(live_pid(&path).expect("live_pid"), Some(std::process::id()));
    }

    #[test]
    fn only_our_own_pid_file_is_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ours = dir.path().join("ours.pid");
        let theirs = dir.path().join("theirs.pid");
        std::fs::write(&ours, format!("{}\n", std::process::id())).expect("write");
        std::fs::write(&theirs, "1\n").expect("write");
        remove_pid_file(&ours);
        remove_pid_file(&theirs);
        assert!(!ours.exists());
        assert!(theirs.exists());
    }
}
