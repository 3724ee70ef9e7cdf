//! Process-level behaviour of the real `profiled` binary: binding the
//! socket, reading the config and its flags, and stopping on SIGTERM.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, session};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use profiled_client::{Client, LoadPolicy};

/// The most a test waits for the daemon to start or exit before it fails
/// instead of hanging. Only a bound on failure; nothing asserts speed.
const PATIENCE: Duration = Duration::from_secs(30);

/// A config path that does not exist, which means the defaults.
const NO_CONFIG: &str = "/nonexistent/x.toml";

/// A `profiled` process started by a test with arguments of its choosing.
/// Killed on drop.
struct Process {
    child: Option<Child>,
}

impl Process {
    /// Starts the binary with `args`. Its stderr is captured so tests can
    /// read the messages of a failed start.
    fn spawn(config: &Path, socket: &Path, data: &Path) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_profiled"))
            .arg("--config")
            .arg(config)
            .arg("--socket")
            .arg(socket)
            .arg("--data-dir")
            .arg(data)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn profiled");
        Self { child: Some(child) }
    }

    /// Starts the binary with no config file, on `socket` and `data`.
    fn serve(socket: &Path, data: &Path) -> Self {
        let mut process = Self::spawn(Path::new(NO_CONFIG), socket, data);
        process.wait_listening(socket);
        process
    }

    /// Polls until `socket` accepts connections; fails if the process exits
    /// first.
    fn wait_listening(&mut self, socket: &Path) {
        let until = Instant::now() + PATIENCE;
        loop {
            if std::os::unix::net::UnixStream::connect(socket).is_ok() {
                return;
            }
            let child = self.child.as_mut().expect("running");
            if let Some(status) = child.try_wait().expect("try_wait") {
                panic!(
                    "profiled exited during start with {status}: {}",
                    read_stderr(child)
                );
            }
            assert!(Instant::now() < until, "profiled did not start listening");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the process to exit on its own and returns its status and
    /// everything it wrote to stderr.
    fn wait_exit(&mut self) -> (ExitStatus, String) {
        let mut child = self.child.take().expect("running");
        let until = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return (status, read_stderr(&mut child));
            }
            if Instant::now() > until {
                let _ = child.kill();
                let _ = child.wait();
                panic!("profiled did not exit: {}", read_stderr(&mut child));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGTERM.
    fn terminate(&self) {
        let child = self.child.as_ref().expect("running");
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits"));
        kill(pid, Signal::SIGTERM).expect("send SIGTERM");
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn read_stderr(child: &mut Child) -> String {
    let mut text = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        let _ = stderr.read_to_string(&mut text);
    }
    text
}

/// A client loads, saves and releases a profile over `socket`, and reads
/// back what it saved: the daemon there serves.
async fn assert_serves(socket: &Path, job: &str) {
    let client = Client::connect(socket, session(job))
        .await
        .expect("connect");
    let profile = client
        .load("PlayerData", job, LoadPolicy::ForceLoad)
        .await
        .expect("load");
    profile.save(job.as_bytes().to_vec()).await.expect("save");
    profile.release(None).await.expect("release");
    let again = client
        .load("PlayerData", job, LoadPolicy::Cancel)
        .await
        .expect("load again");
    assert_eq!(again.data(), Some(job.as_bytes()));
    again.release(None).await.expect("release again");
    client.close().await;
}

/// Runs the binary with a config file holding `text` (and socket and data
/// paths in the same temporary directory, so a daemon that wrongly starts
/// stays inside it), and expects it to exit. Returns the config path, the
/// exit status and stderr.
fn run_with_config(text: &str) -> (tempfile::TempDir, PathBuf, ExitStatus, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("bad-config.toml");
    std::fs::write(&config, text).expect("write config");
    let socket = dir.path().join("s.sock");
    let data = dir.path().join("d");
    let mut process = Process::spawn(&config, &socket, &data);
    let (status, stderr) = process.wait_exit();
    assert!(
        !socket.exists(),
        "a bad config must not get as far as binding"
    );
    (dir, config, status, stderr)
}

#[tokio::test]
async fn a_stale_socket_file_is_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("s.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind a listener"));
    assert!(socket.exists(), "the stale socket file remains");
    // Another test forking at the moment the listener was dropped keeps a
    // copy of it open until that child execs, so wait for the refusal.
    let until = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        match std::os::unix::net::UnixStream::connect(&socket) {
            Err(err) => break err,
            Ok(_) if Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(_) => panic!("something still listens on the stale socket"),
        }
    };
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);

    let _daemon = Process::serve(&socket, &dir.path().join("d"));
    assert_serves(&socket, "stale-socket").await;
}

#[tokio::test]
async fn a_second_daemon_on_a_live_socket_refuses_to_start() {
    let first = Daemon::start();
    let other_data = tempfile::tempdir().expect("tempdir");
    let mut second = Process::spawn(
        Path::new(NO_CONFIG),
        &first.socket(),
        &other_data.path().join("d"),
    );
    let (status, stderr) = second.wait_exit();
    assert!(
        !status.success(),
        "the second daemon exits with failure: {status}"
    );
    assert!(
        stderr.contains("already listening"),
        "stderr says why: {stderr:?}"
    );
    assert!(
        first.socket().exists(),
        "the live socket file is left alone"
    );
    assert_serves(&first.socket(), "first-daemon").await;
}

#[test]
fn a_path_that_is_not_a_socket_is_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("s.sock");
    std::fs::write(&socket, b"precious").expect("write a regular file");
    let mut process = Process::spawn(Path::new(NO_CONFIG), &socket, &dir.path().join("d"));
    let (status, stderr) = process.wait_exit();
    assert!(!status.success(), "exits with failure: {status}");
    assert!(
        stderr.contains("not a socket"),
        "stderr says why: {stderr:?}"
    );
    assert_eq!(
        std::fs::read(&socket).expect("the file is still there"),
        b"precious"
    );
}

#[test]
fn an_unknown_config_key_exits_64_naming_the_file_and_the_key() {
    let (_dir, config, status, stderr) = run_with_config("[storage]\nsink = true\n");
    assert_eq!(status.code(), Some(64), "stderr: {stderr}");
    assert!(
        stderr.contains(&config.display().to_string()),
        "stderr names the file: {stderr:?}"
    );
    assert!(stderr.contains("sink"), "stderr names the key: {stderr:?}");
}

#[test]
fn an_unknown_top_level_key_exits_64() {
    let (_dir, config, status, stderr) = run_with_config("colour = \"blue\"\n");
    assert_eq!(status.code(), Some(64), "stderr: {stderr}");
    assert!(stderr.contains(&config.display().to_string()), "{stderr:?}");
    assert!(stderr.contains("colour"), "{stderr:?}");
}

#[test]
fn a_bad_config_value_exits_64_naming_the_key() {
    let (_dir, config, status, stderr) = run_with_config("[limits]\nmax_name = 0\n");
    assert_eq!(status.code(), Some(64), "stderr: {stderr}");
    assert!(stderr.contains("limits.max_name"), "{stderr:?}");
    assert!(stderr.contains(&config.display().to_string()), "{stderr:?}");
}

#[test]
fn a_config_value_of_the_wrong_type_exits_64() {
    let (_dir, _config, status, stderr) = run_with_config("[limits]\nmax_name = \"big\"\n");
    assert_eq!(status.code(), Some(64), "stderr: {stderr}");
    assert!(stderr.contains("max_name"), "{stderr:?}");
}

#[tokio::test]
async fn socket_and_data_dir_flags_override_the_config_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config_socket = dir.path().join("from-config.sock");
    let config_data = dir.path().join("from-config-data");
    let flag_socket = dir.path().join("from-flag.sock");
    let flag_data = dir.path().join("from-flag-data");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!("[listen]\nsocket = {config_socket:?}\n[storage]\npath = {config_data:?}\n"),
    )
    .expect("write config");

    let mut process = Process::spawn(&config, &flag_socket, &flag_data);
    process.wait_listening(&flag_socket);
    assert_serves(&flag_socket, "flags").await;
    assert!(flag_data.is_dir(), "the data lives in the flag's directory");
    assert!(!config_socket.exists(), "the config's socket is not used");
    assert!(!config_data.exists(), "the config's data path is not used");

    process.terminate();
    let (status, stderr) = process.wait_exit();
    assert!(status.success(), "{status}: {stderr}");
}

#[tokio::test]
async fn a_missing_config_file_means_the_defaults() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("s.sock");
    let data = dir.path().join("d");
    let mut process = Process::serve(&socket, &data);
    let client = Client::connect(&socket, session("defaults-probe"))
        .await
        .expect("connect");
    assert_eq!(
        client.welcome().max_frame,
        profiled_protocol::DEFAULT_MAX_FRAME,
        "the default frame limit is in force"
    );
    client.close().await;
    assert_serves(&socket, "defaults").await;
    assert!(data.is_dir(), "the data directory was created");

    process.terminate();
    let (status, stderr) = process.wait_exit();
    assert!(status.success(), "{status}: {stderr}");
}

#[tokio::test]
async fn sigterm_exits_zero_and_removes_the_socket() {
    // The holder below never releases; a short grace keeps the test quick.
    let mut daemon = Daemon::start_with("[shutdown]\ngrace = \"200ms\"\n");
    // A connected client holding a lease must not keep the daemon up.
    let client = daemon.client("holder").await;
    let profile = client
        .load("PlayerData", "held", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    profile.save(b"kept".to_vec()).await.expect("save");
    assert!(daemon.socket().exists());

    daemon.signal(Signal::SIGTERM);
    let status = daemon.wait_exit(PATIENCE);
    assert!(status.success(), "SIGTERM exits 0: {status}");
    assert_eq!(status.code(), Some(0));
    assert!(!daemon.socket().exists(), "the socket file is removed");
    drop(profile);
    client.close().await;

    // The lease was released on the way out and the save kept.
    daemon.restart();
    let reader = daemon.client("reader").await;
    let again = reader
        .load("PlayerData", "held", LoadPolicy::Cancel)
        .await
        .expect("the profile is free after the restart");
    assert_eq!(again.data(), Some(&b"kept"[..]));
    again.release(None).await.expect("release");
    reader.close().await;
}
