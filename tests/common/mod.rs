//! The harness shared by the integration tests: a real `profiled` process
//! on a temporary directory, reached through the real client library.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use profiled_client::{Client, ConnectOptions, Role, SessionId};
use profiled_protocol::{ClientFrame, FrameCodec, Hello, PROTOCOL_VERSION, ServerFrame, Welcome};
use tempfile::TempDir;
use tokio_util::codec::Framed;

/// How long a daemon may take to start listening before a test gives up.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A `profiled` child process. Killed on drop.
pub struct Daemon {
    /// The process; `None` after it exited.
    child: Option<Child>,
    /// Holds the socket, data directory and config; removed on drop.
    dir: TempDir,
    /// The extra TOML the daemon was started with, kept for restarts.
    extra_config: String,
}

impl Daemon {
    /// Starts a daemon with the test defaults.
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// Starts a daemon with `extra` TOML appended to the test defaults
    /// (which only set the socket and data paths, and a short
    /// `force_load_timeout` under `[leases]`).
    pub fn start_with(extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut daemon = Self {
            child: None,
            dir,
            extra_config: extra.to_owned(),
        };
        daemon.spawn();
        daemon
    }

    /// Starts a daemon with `extra` TOML, after `prepare` has been given the
    /// data directory's path (for example, to mount a small filesystem
    /// there).
    pub fn start_prepared(extra: &str, prepare: impl FnOnce(&Path)) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut daemon = Self {
            child: None,
            dir,
            extra_config: extra.to_owned(),
        };
        prepare(&daemon.data_dir());
        daemon.spawn();
        daemon
    }

    /// Starts a daemon on a copy of `data`, a database directory such as a
    /// backup, with the test defaults.
    pub fn start_on_copy_of(data: &Path) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut daemon = Self {
            child: None,
            dir,
            extra_config: String::new(),
        };
        copy_dir(data, &daemon.data_dir());
        daemon.spawn();
        daemon
    }

    /// The socket path.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("profiled.sock")
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The config file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    /// The daemon's log (stdout and stderr), across restarts.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("daemon.log")
    }

    /// What the daemon has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The temporary directory everything lives in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Connects a client for session `job` of place 1.
    pub async fn client(&self, job: &str) -> Client {
        Client::connect(self.socket(), session(job))
            .await
            .expect("connect to the daemon")
    }

    /// Connects an operator's client, with the admin role, for session
    /// `job` of place 1.
    pub async fn admin(&self, job: &str) -> Client {
        let options = ConnectOptions {
            role: Role::Admin,
            ..ConnectOptions::default()
        };
        Client::connect_with(self.socket(), session(job), options)
            .await
            .expect("connect to the daemon as an admin")
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: Signal) {
        let child = self.child.as_ref().expect("daemon is running");
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits"));
        kill(pid, signal).expect("send signal");
    }

    /// SIGKILLs the daemon and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for the daemon to exit on its own, up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("daemon is running");
        let until = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > until {
                let _ = child.kill();
                panic!("daemon did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts the daemon again on the same directory; it must not be running.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the daemon before restarting it");
        self.spawn();
    }

    /// Starts the daemon again on the same directory with `extra` TOML
    /// in place of what it was started with; it must not be running.
    #[allow(dead_code)] // Not every test binary restarts with new settings.
    pub fn restart_with(&mut self, extra: &str) {
        extra.clone_into(&mut self.extra_config);
        self.restart();
    }

    fn spawn(&mut self) {
        let config = format!(
            "[listen]\nsocket = {:?}\n[storage]\npath = {:?}\n{}\n",
            self.socket(),
            self.data_dir(),
            self.extra_config,
        );
        std::fs::write(self.config_path(), config).expect("write config");
        // The daemon's log goes to a file beside its data, so the expected
        // warnings of hostile-input tests do not drown the test output.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open daemon log");
        let child = Command::new(env!("CARGO_BIN_EXE_profiled"))
            .arg("--config")
            .arg(self.config_path())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log)
            .spawn()
            .expect("spawn profiled");
        self.child = Some(child);
        self.wait_ready();
    }

    /// Polls until the socket accepts connections.
    fn wait_ready(&mut self) {
        let until = Instant::now() + START_TIMEOUT;
        loop {
            if std::os::unix::net::UnixStream::connect(self.socket()).is_ok() {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().expect("try_wait"))
            {
                panic!("profiled exited during start: {status}");
            }
            assert!(Instant::now() < until, "profiled did not start listening");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A binary the workspace builds beside the test executables, such as
/// `profilectl` or `examples/game_server`.
pub fn built_binary(relative: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test executable is in target/<profile>/deps");
    let path = dir.join(relative);
    assert!(
        path.is_file(),
        "{} does not exist: build the workspace with `cargo test --workspace` first",
        path.display()
    );
    path
}

/// Copies a directory tree.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create a directory");
    for entry in std::fs::read_dir(from).expect("read a directory") {
        let entry = entry.expect("a directory entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("a file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).expect("copy a file");
        }
    }
}

/// The session id of test job `job`.
pub fn session(job: &str) -> SessionId {
    SessionId {
        place_id: 1,
        job_id: job.to_owned(),
    }
}

/// A handshaken connection that reads the daemon's frames as they are.
pub type RawSession = Framed<tokio::net::UnixStream, FrameCodec<ServerFrame, ClientFrame>>;

/// Connects to `daemon` as session `job` of place 1 without the client
/// library, for reading pushed frames directly; returns the connection and
/// the daemon's welcome.
pub async fn raw_session(daemon: &Daemon, job: &str) -> (RawSession, Welcome) {
    let stream = tokio::net::UnixStream::connect(daemon.socket())
        .await
        .expect("connect");
    let mut framed = Framed::new(
        stream,
        FrameCodec::new(profiled_protocol::DEFAULT_MAX_FRAME),
    );
    let hello = ClientFrame::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        session: session(job),
        role: Role::Game,
    });
    framed.send(hello).await.expect("send hello");
    match framed.next().await.expect("a frame").expect("decodes") {
        ServerFrame::Welcome(welcome) => (framed, welcome),
        other => panic!("expected Welcome, got {other:?}"),
    }
}
