//! What the benchmarks share: the daemon binary as a child process, its
//! resident memory, and settings from the environment.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;

/// The built `profiled` running on a temporary directory (on the disk that
/// holds `TMPDIR`), so its memory and its exit can be measured alone.
pub struct ChildDaemon {
    /// Holds the socket, the data and the config; removed on drop.
    pub dir: TempDir,
    /// Where clients connect.
    pub socket: PathBuf,
    /// The daemon process.
    pub child: Child,
}

impl ChildDaemon {
    /// Starts the daemon with `storage` lines added to its `[storage]`
    /// section and `extra` TOML sections appended. Shutdown grace is zero and
    /// logging is at `warn`, so neither colours the figures.
    pub fn spawn(storage: &str, extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("bench.sock");
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            format!(
                "[listen]\nsocket = {:?}\n[storage]\npath = {:?}\n{storage}{extra}[shutdown]\ngrace = \"0s\"\n[log]\nlevel = \"warn\"\n",
                socket,
                dir.path().join("data"),
            ),
        )
        .expect("write config");
        let child = start(&config);
        Self { dir, socket, child }
    }

    /// Starts the daemon again on the same directory and config, after the
    /// previous process exited (by [`Self::terminate`] or [`Self::kill`]),
    /// so a restart finds the previous run's data.
    pub fn respawn(&mut self) {
        assert!(
            self.child.try_wait().expect("try_wait").is_some(),
            "respawn while the daemon still runs"
        );
        self.child = start(&self.dir.path().join("config.toml"));
    }

    /// Sends SIGKILL and waits for the exit, as a crash would end the
    /// daemon: nothing is flushed and no lease is released.
    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("wait");
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit; returns its status and how
    /// long it took.
    pub fn terminate(&mut self) -> (ExitStatus, Duration) {
        let pid = Pid::from_raw(i32::try_from(self.pid()).expect("pid"));
        let sent = Instant::now();
        kill(pid, Signal::SIGTERM).expect("SIGTERM");
        let status = self.child.wait().expect("wait");
        (status, sent.elapsed())
    }
}

/// A bench that panics must not leave a daemon running on a directory that
/// is about to be removed.
impl Drop for ChildDaemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs the built daemon binary on `config`, its stdout discarded so logs
/// do not mix with the figures.
fn start(config: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_profiled"))
        .arg("--config")
        .arg(config)
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn profiled")
}

/// A process's resident set, from `/proc/<pid>/status`; 0 if unreadable.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                line.strip_prefix("VmRSS:")
                    .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            })
        })
        .unwrap_or(0)
}

/// A setting from the environment, or `default` if unset or unparsable.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// This machine's memory in GiB, from `/proc/meminfo`; 0 if unreadable.
pub fn memory_gib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines().find_map(|line| {
                line.strip_prefix("MemTotal:").and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
            })
        })
        .map_or(0, |kib| kib / (1024 * 1024))
}
