//! What the benchmarks share: the daemon binary as a child process, its
//! resident memory and a process tree's CPU time, and settings from the
//! environment.

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
    server_command(env!("CARGO_BIN_EXE_profiled"))
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

/// A server's process tree, whose CPU time can be read from procfs: the
/// main process (all its threads) with the children it has reaped, plus its
/// live children. PostgreSQL's backends and helpers are children of the
/// postmaster, and once one exits and is reaped its time moves into the
/// postmaster's `cutime` and `cstime`, so the sum is continuous.
#[derive(Clone, Copy, Debug)]
pub struct ProcessTree {
    pid: u32,
    /// Clock ticks per second, the unit of procfs CPU times.
    ticks: u32,
}

impl ProcessTree {
    /// The tree under `pid`. Asks `getconf CLK_TCK` for the tick rate now
    /// (falling back to 100), so that reading the time later spawns nothing.
    pub fn new(pid: u32) -> Self {
        let ticks = Command::new("getconf")
            .arg("CLK_TCK")
            .stderr(Stdio::null())
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok()?.trim().parse().ok())
            .filter(|&ticks| ticks > 0)
            .unwrap_or(100);
        Self { pid, ticks }
    }

    /// The tree's CPU time so far: `utime + stime + cutime + cstime` of the
    /// main process and `utime + stime` of every live process whose parent
    /// it is. `None` if the main process's stat or `/proc` itself is
    /// unreadable; a child that exits while `/proc` is scanned is skipped.
    pub fn cpu_time(&self) -> Option<Duration> {
        let own = proc_stat(self.pid)?;
        let mut ticks = own.utime + own.stime + own.cutime + own.cstime;
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
                continue;
            };
            if pid == self.pid {
                continue;
            }
            if let Some(child) = proc_stat(pid).filter(|stat| stat.ppid == self.pid) {
                ticks += child.utime + child.stime;
            }
        }
        Some(self.duration(ticks))
    }

    /// The CPU time of the main process alone (all its threads), without
    /// its children: for the bench process itself, whose children are the
    /// servers it measures.
    pub fn main_cpu_time(&self) -> Option<Duration> {
        let own = proc_stat(self.pid)?;
        Some(self.duration(own.utime + own.stime))
    }

    fn duration(&self, ticks: u64) -> Duration {
        let ticks_per_sec = u64::from(self.ticks);
        Duration::from_secs(ticks / ticks_per_sec)
            + Duration::from_secs(ticks % ticks_per_sec) / self.ticks
    }
}

/// The fields of `/proc/<pid>/stat` that [`ProcessTree`] reads, CPU times
/// in clock ticks.
struct ProcStat {
    ppid: u32,
    utime: u64,
    stime: u64,
    cutime: u64,
    cstime: u64,
}

/// Reads `/proc/<pid>/stat`; `None` if it is unreadable or malformed. The
/// fields are taken after the last `)`, since the command name before it
/// may hold spaces and parentheses.
fn proc_stat(pid: u32) -> Option<ProcStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 3 (the state) is the first after the name, so field n is at n - 3.
    let fields: Vec<&str> = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(ProcStat {
        ppid: u32::try_from(field(4)?).ok()?,
        utime: field(14)?,
        stime: field(15)?,
        cutime: field(16)?,
        cstime: field(17)?,
    })
}

/// Whether `program --version` runs and succeeds: how the bench tells an
/// installed peer from a missing one.
pub fn runs(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// The environment variable naming the CPUs every server runs on.
pub const SERVER_CPUS: &str = "PROFILED_BENCH_SERVER_CPUS";

/// The environment variable naming the CPUs the bench's own clients run on.
pub const CLIENT_CPUS: &str = "PROFILED_BENCH_CLIENT_CPUS";

/// The CPU list (as `taskset -c` takes it: `0`, `2-3`, `0,4-7`) that the
/// environment variable `var` gives, if it gives one.
pub fn cpu_list(var: &str) -> Option<String> {
    std::env::var(var)
        .ok()
        .map(|list| list.trim().to_owned())
        .filter(|list| !list.is_empty())
}

/// A command that runs `program` as a server: on the CPUs of
/// [`SERVER_CPUS`] when it is set, so that servers and the bench's clients
/// need not share cores. `taskset` sets the affinity and then execs the
/// program, so the child's pid is the server's own (signals and procfs
/// figures reach it), and every thread or process it starts inherits the
/// affinity.
pub fn server_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    match cpu_list(SERVER_CPUS) {
        Some(cpus) => {
            let mut command = Command::new("taskset");
            command.arg("-c").arg(cpus).arg(program);
            command
        }
        None => Command::new(program),
    }
}

/// Pins the calling thread, and the threads it starts from now on, to the
/// CPUs that the environment variable `var` names; does nothing if it is
/// unset. Panics if `taskset` cannot apply the list, since figures from
/// the wrong CPUs would pass for the asked ones.
pub fn pin_this_thread(var: &str) {
    let Some(cpus) = cpu_list(var) else {
        return;
    };
    let thread = nix::unistd::gettid().to_string();
    let status = Command::new("taskset")
        .args(["-p", "-c", &cpus, &thread])
        .stdout(Stdio::null())
        .status()
        .unwrap_or_else(|err| panic!("{var}={cpus}: cannot run taskset: {err}"));
    assert!(status.success(), "{var}={cpus}: taskset failed: {status}");
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
