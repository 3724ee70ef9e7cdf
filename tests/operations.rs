//! Operating the real `profiled` binary: systemd readiness and watchdog,
//! socket activation, daemonizing, config reload on SIGHUP, config checks,
//! and the systemd units themselves.
//!
//! Tests that need a systemd tool (`systemd-socket-activate`,
//! `systemd-analyze`) print a note and pass when the tool is missing, so the
//! suite still runs on hosts without systemd.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::session;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use profiled_client::Client;
use tempfile::TempDir;

/// The most a test waits for something to happen before it fails instead
/// of hanging. Only a bound on failure; nothing asserts speed.
const PATIENCE: Duration = Duration::from_secs(30);

/// A foreground `profiled` child. Killed on drop.
struct Foreground {
    child: Option<Child>,
}

impl Foreground {
    /// Starts the binary with `--config config`, no `RUST_LOG` (so the
    /// config's level applies), and `env` added. Its output goes to
    /// `output` so failures can show it.
    fn spawn(config: &Path, output: &Path, env: &[(&str, &str)]) -> Self {
        let log = std::fs::File::create(output).expect("create output file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_profiled"));
        command
            .arg("--config")
            .arg(config)
            .env_remove("RUST_LOG")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("WATCHDOG_PID")
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone output handle"))
            .stderr(log);
        for (key, value) in env {
            command.env(key, value);
        }
        Self {
            child: Some(command.spawn().expect("spawn profiled")),
        }
    }

    /// Wraps an already spawned child.
    fn from_child(child: Child) -> Self {
        Self { child: Some(child) }
    }

    fn pid(&self) -> Pid {
        let child = self.child.as_ref().expect("running");
        Pid::from_raw(i32::try_from(child.id()).expect("pid fits"))
    }

    fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).expect("send signal");
    }

    /// Fails the test if the process has exited.
    fn assert_running(&mut self) {
        let child = self.child.as_mut().expect("running");
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("profiled exited unexpectedly: {status}");
        }
    }

    /// Waits for the process to exit on its own.
    fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let until = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > until {
                let _ = child.kill();
                panic!("profiled did not exit within {PATIENCE:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Foreground {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Writes a config for a daemon living in `dir`, with `extra` appended.
fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("config.toml");
    let text = format!(
        "[listen]\nsocket = {:?}\n[storage]\npath = {:?}\n{extra}\n",
        dir.join("profiled.sock"),
        dir.join("data"),
    );
    std::fs::write(&path, text).expect("write config");
    path
}

/// Polls `condition` until it holds, failing the test with `what` after
/// [`PATIENCE`].
fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let until = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether a daemon answers a ping on `socket`, over the real client.
fn serves(socket: &Path) -> bool {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let Ok(client) = Client::connect(socket, session("operations")).await else {
            return false;
        };
        let ok = client.ping().await.is_ok();
        client.close().await;
        ok
    })
}

/// Everything in the daily log files under `dir` (not the console file).
fn read_log_files(dir: &Path) -> String {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return String::new();
    };
    let mut names: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with("profiled.") && name.ends_with(".log") && !name.contains("console")
        })
        .collect();
    names.sort();
    names
        .iter()
        .map(|path| std::fs::read_to_string(path).unwrap_or_default())
        .collect()
}

/// Where a program is on PATH or in the usual system directories.
fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin", "/bin", "/usr/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Collects notify messages (one per line) into `seen` until `wanted`
/// holds, failing with the messages and the daemon's output otherwise.
fn receive_until(
    notify: &UnixDatagram,
    seen: &mut Vec<String>,
    daemon_output: &Path,
    what: &str,
    wanted: impl Fn(&[String]) -> bool,
) {
    let until = Instant::now() + PATIENCE;
    let mut buf = [0u8; 4096];
    while !wanted(seen) {
        if Instant::now() > until {
            let mut distinct = seen.to_vec();
            distinct.dedup();
            panic!(
                "timed out waiting for {what}; received {} messages: {distinct:?} (repeats folded); daemon output:\n{}",
                seen.len(),
                std::fs::read_to_string(daemon_output).unwrap_or_default()
            );
        }
        if let Ok(n) = notify.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]);
            seen.extend(text.lines().map(str::to_owned));
        }
    }
}

#[test]
fn notify_socket_receives_ready_watchdog_and_stopping() {
    let dir = TempDir::new().expect("tempdir");
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind notify socket");
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("set timeout");
    let config = write_config(dir.path(), "");
    let mut daemon = Foreground::spawn(
        &config,
        &dir.path().join("out.log"),
        &[
            ("NOTIFY_SOCKET", notify_path.to_str().expect("utf-8 path")),
            ("WATCHDOG_USEC", "200000"),
        ],
    );

    let out = dir.path().join("out.log");
    let mut seen: Vec<String> = Vec::new();
    receive_until(&notify, &mut seen, &out, "READY=1", |seen| {
        seen.iter().any(|m| m == "READY=1")
    });
    assert!(
        serves(&dir.path().join("profiled.sock")),
        "ready but not serving"
    );
    receive_until(
        &notify,
        &mut seen,
        &out,
        "WATCHDOG=1 after READY=1",
        |seen| {
            let ready = seen.iter().position(|m| m == "READY=1");
            ready.is_some_and(|at| seen[at..].iter().any(|m| m == "WATCHDOG=1"))
        },
    );
    daemon.signal(Signal::SIGTERM);
    receive_until(&notify, &mut seen, &out, "STOPPING=1", |seen| {
        seen.iter().any(|m| m == "STOPPING=1")
    });
    assert!(daemon.wait_exit().success());
}

#[test]
fn an_inherited_socket_is_used_instead_of_binding() {
    let Some(activate) = find_tool("systemd-socket-activate") else {
        println!(
            "note: systemd-socket-activate is not installed; skipping the socket activation test"
        );
        return;
    };
    let dir = TempDir::new().expect("tempdir");
    // The config names one socket; the service manager passes another.
    // Serving on the passed one, while the configured one never appears,
    // shows the daemon took the inherited descriptor.
    let config = write_config(dir.path(), "");
    let activated = dir.path().join("activated.sock");
    let child = socket_activate(&activate, &activated, &config, dir.path());
    let mut daemon = Foreground::from_child(child);

    wait_until("the activation socket to exist", || activated.exists());
    // Connecting may be what launches the daemon; the client waits in the
    // kernel's backlog meanwhile.
    wait_until("the daemon to serve on the inherited socket", || {
        daemon.assert_running();
        serves(&activated)
    });
    assert!(
        !dir.path().join("profiled.sock").exists(),
        "the daemon bound listen.socket although a socket was passed"
    );
    daemon.signal(Signal::SIGTERM);
    assert!(daemon.wait_exit().success());
}

/// Starts profiled under `systemd-socket-activate`, which binds `socket`,
/// then execs profiled in its own process (without --accept) with
/// LISTEN_FDS=1 and LISTEN_PID set to that pid, exactly as systemd does.
/// Output goes to `out.log` in `dir`.
fn socket_activate(activate: &Path, socket: &Path, config: &Path, dir: &Path) -> Child {
    let output = std::fs::File::create(dir.join("out.log")).expect("output file");
    Command::new(activate)
        .arg("--listen")
        .arg(socket)
        .arg("--setenv=RUST_LOG=info")
        .arg(env!("CARGO_BIN_EXE_profiled"))
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(output.try_clone().expect("clone"))
        .stderr(output)
        .spawn()
        .expect("spawn systemd-socket-activate")
}

/// Kills a daemonized process if a test fails before stopping it.
struct KillOnDrop(Option<Pid>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = kill(pid, Signal::SIGKILL);
        }
    }
}

#[test]
fn daemonize_writes_the_pid_file_refuses_a_second_start_and_cleans_up() {
    let dir = TempDir::new().expect("tempdir");
    let logs = dir.path().join("logs");
    let config = write_config(dir.path(), &format!("[log]\ndir = {logs:?}\n"));
    let pid_file = dir.path().join("profiled.pid");
    let socket = dir.path().join("profiled.sock");
    let start = || {
        Command::new(env!("CARGO_BIN_EXE_profiled"))
            .arg("--config")
            .arg(&config)
            .arg("--daemonize")
            .arg("--pid-file")
            .arg(&pid_file)
            .env_remove("NOTIFY_SOCKET")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .output()
            .expect("run profiled --daemonize")
    };

    // The command returns once the daemon has detached.
    let first = start();
    assert!(first.status.success(), "{first:?}");

    let mut guard = KillOnDrop(None);
    let mut pid = 0;
    wait_until("the pid file to name a live process", || {
        let Ok(text) = std::fs::read_to_string(&pid_file) else {
            return false;
        };
        let Ok(parsed) = text.trim().parse::<i32>() else {
            return false;
        };
        pid = parsed;
        Path::new("/proc").join(parsed.to_string()).exists()
    });
    guard.0 = Some(Pid::from_raw(pid));
    wait_until("the daemon to serve", || serves(&socket));

    let second = start();
    assert_eq!(second.status.code(), Some(1), "{second:?}");
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(stderr.contains("already running"), "{stderr}");
    assert!(
        stderr.contains(&pid.to_string()),
        "the refusal names the pid: {stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(&pid_file).expect("pid file").trim(),
        pid.to_string(),
        "the refused start left the pid file alone"
    );

    kill(Pid::from_raw(pid), Signal::SIGTERM).expect("SIGTERM the daemon");
    wait_until("the pid file to be removed", || !pid_file.exists());
    wait_until("the socket to be removed", || !socket.exists());
    guard.0 = None;
    // The daemon's log went to log.dir, since stdout is gone.
    let log = read_log_files(&logs);
    assert!(log.contains("SIGTERM"), "log:\n{log}");
}

#[test]
fn sighup_applies_a_new_log_level_and_survives_a_broken_file() {
    let dir = TempDir::new().expect("tempdir");
    let logs = dir.path().join("logs");
    let log_section = |level: &str| format!("[log]\nlevel = {level:?}\ndir = {logs:?}\n");
    let config = write_config(dir.path(), &log_section("warn"));
    let socket = dir.path().join("profiled.sock");
    let mut daemon = Foreground::spawn(&config, &dir.path().join("out.log"), &[]);
    wait_until("the daemon to serve", || {
        daemon.assert_running();
        serves(&socket)
    });
    assert!(
        !read_log_files(&logs).contains("profiled is ready"),
        "info lines are logged at level warn"
    );

    write_config(dir.path(), &log_section("info"));
    daemon.signal(Signal::SIGHUP);
    wait_until("the level change to be logged", || {
        read_log_files(&logs).contains("log.level changed")
    });
    let log = read_log_files(&logs);
    assert!(log.contains("warn") && log.contains("info"), "{log}");

    std::fs::write(&config, "[log]\nlevel = \n").expect("write a broken config");
    daemon.signal(Signal::SIGHUP);
    wait_until("the reload error to be logged", || {
        read_log_files(&logs).contains("config reload failed")
    });
    daemon.assert_running();
    assert!(
        serves(&socket),
        "the daemon stopped serving after a bad reload"
    );

    daemon.signal(Signal::SIGTERM);
    assert!(daemon.wait_exit().success());
}

#[test]
fn foreground_logs_go_to_stdout_without_log_dir() {
    let dir = TempDir::new().expect("tempdir");
    let config = write_config(dir.path(), "[log]\nlevel = \"info\"\n");
    let output = dir.path().join("out.log");
    let mut daemon = Foreground::spawn(&config, &output, &[]);
    wait_until("the daemon to serve", || {
        daemon.assert_running();
        serves(&dir.path().join("profiled.sock"))
    });
    daemon.signal(Signal::SIGTERM);
    assert!(daemon.wait_exit().success());
    let text = std::fs::read_to_string(&output).expect("read output");
    assert!(text.contains("SIGTERM"), "{text}");
}

#[test]
fn check_config_accepts_a_good_file() {
    let dir = TempDir::new().expect("tempdir");
    let config = write_config(dir.path(), "[log]\nlevel = \"debug\"\n");
    let output = Command::new(env!("CARGO_BIN_EXE_profiled"))
        .arg("--config")
        .arg(&config)
        .arg("--check-config")
        .output()
        .expect("run --check-config");
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("ok"));
    assert!(
        !dir.path().join("data").exists() && !dir.path().join("profiled.sock").exists(),
        "--check-config must not start the daemon"
    );
}

/// A path that does not exist means the defaults, but a check says so
/// rather than "ok", so a mistyped path is noticed.
#[test]
fn check_config_names_a_missing_file() {
    let dir = TempDir::new().expect("tempdir");
    let missing = dir.path().join("cofnig.toml");
    let output = Command::new(env!("CARGO_BIN_EXE_profiled"))
        .arg("--config")
        .arg(&missing)
        .arg("--check-config")
        .output()
        .expect("run --check-config");
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("no such file"), "{stdout}");
    assert!(stdout.contains("defaults"), "{stdout}");
}

#[test]
fn check_config_rejects_a_bad_file_with_exit_64() {
    let dir = TempDir::new().expect("tempdir");
    let config = write_config(dir.path(), "[log]\nfile_prefix = \"a/b\"\n");
    let output = Command::new(env!("CARGO_BIN_EXE_profiled"))
        .arg("--config")
        .arg(&config)
        .arg("--check-config")
        .output()
        .expect("run --check-config");
    assert_eq!(output.status.code(), Some(64), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("log.file_prefix"), "{stderr}");
    assert!(stderr.contains(&config.display().to_string()), "{stderr}");
}

#[test]
fn the_systemd_units_pass_systemd_analyze_verify() {
    let Some(analyze) = find_tool("systemd-analyze") else {
        println!("note: systemd-analyze is not installed; skipping the unit file check");
        return;
    };
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
    let dir = TempDir::new().expect("tempdir");
    // verify checks that ExecStart's program exists, so the copy points at
    // the binary under test instead of the installed path.
    let service = std::fs::read_to_string(units.join("profiled.service")).expect("read service");
    assert!(
        service.contains("ExecStart=/usr/bin/profiled "),
        "ExecStart moved"
    );
    let service = service.replace(
        "ExecStart=/usr/bin/profiled ",
        &format!("ExecStart={} ", env!("CARGO_BIN_EXE_profiled")),
    );
    std::fs::write(dir.path().join("profiled.service"), service).expect("write service");
    std::fs::copy(
        units.join("profiled.socket"),
        dir.path().join("profiled.socket"),
    )
    .expect("copy socket unit");

    let output = Command::new(analyze)
        .arg("verify")
        .arg(dir.path().join("profiled.service"))
        .arg(dir.path().join("profiled.socket"))
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "systemd-analyze verify failed:\n{stderr}"
    );
    let about_ours: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("profiled"))
        .collect();
    assert!(about_ours.is_empty(), "systemd-analyze verify:\n{stderr}");
}

#[test]
fn an_inherited_socket_file_outlives_the_daemon() {
    let Some(activate) = find_tool("systemd-socket-activate") else {
        println!(
            "note: systemd-socket-activate is not installed; skipping the socket activation test"
        );
        return;
    };
    // As deployed: the config and profiled.socket name the same path. The
    // file belongs to the service manager, which keeps listening on it
    // across the daemon's restarts, so the daemon must not remove it.
    let dir = TempDir::new().expect("tempdir");
    let config = write_config(dir.path(), "");
    let socket = dir.path().join("profiled.sock");
    let child = socket_activate(&activate, &socket, &config, dir.path());
    let mut daemon = Foreground::from_child(child);
    wait_until("the daemon to serve on the inherited socket", || {
        daemon.assert_running();
        serves(&socket)
    });
    daemon.signal(Signal::SIGTERM);
    assert!(daemon.wait_exit().success());
    assert!(
        socket.exists(),
        "the daemon removed the socket file the service manager owns"
    );
}
