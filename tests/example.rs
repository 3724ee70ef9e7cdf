//! The `game_server` example of the client crate, run as two processes
//! against a real daemon: a player hops from server A to server B and takes
//! every coin earned on A along.
//!
//! The README walks through the same hop by hand; this test keeps that
//! walkthrough true. The example belongs to the `profiled-client` package,
//! so it is found next to the test executable, where
//! `cargo test --workspace` puts it. Selecting only this test
//! (`--test example`) does not rebuild the example; add
//! `--example game_server` to do so.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::Daemon;
use profiled_client::LoadPolicy;
use serde::{Deserialize, Serialize};

/// The most a test waits for a line or an exit before failing instead of
/// hanging. Only a bound on failure; nothing asserts speed.
const PATIENCE: Duration = Duration::from_secs(30);

/// How many ticks each player plays, in both servers.
const TICKS: u64 = 3;

/// How many coins a player earns per tick (as in the example).
const COINS_PER_TICK: u64 = 10;

/// The example's profile data, declared again as any other reader of the
/// store would.
#[derive(Debug, Default, Serialize, Deserialize)]
struct PlayerData {
    coins: u64,
    joins: u64,
    last_server: String,
}

/// The built example: `target/<profile>/examples/game_server`.
fn game_server() -> PathBuf {
    common::built_binary("examples/game_server")
}

/// A running `game_server`, its stdout read line by line on a thread.
struct Server {
    /// The server's name.
    name: String,
    /// The process; killed on drop if still running.
    child: Child,
    /// Lines as they are printed; closed at the end of stdout.
    lines: mpsc::Receiver<String>,
    /// Every line received so far.
    seen: Vec<String>,
}

impl Server {
    /// Starts server `name` for `players` against the daemon at `socket`.
    fn start(socket: &Path, name: &str, players: &str, hold: bool) -> Self {
        let mut command = Command::new(game_server());
        command
            .arg("--socket")
            .arg(socket)
            .args(["--server", name, "--players", players])
            .args(["--ticks", &TICKS.to_string(), "--tick-ms", "50"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if hold {
            command.arg("--hold");
        }
        let mut child = command.spawn().expect("spawn game_server");
        let stdout = child.stdout.take().expect("piped stdout");
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            name: name.to_owned(),
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Reads lines until one contains `needle`, and returns it.
    #[track_caller]
    fn wait_for(&mut self, needle: &str) -> String {
        let until = Instant::now() + PATIENCE;
        if let Some(line) = self.seen.iter().find(|l| l.contains(needle)) {
            return line.clone();
        }
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                    "server {} did not print {needle:?} within {PATIENCE:?}; it printed:\n{}",
                    self.name,
                    self.seen.join("\n")
                ),
                Err(mpsc::RecvTimeoutError::Disconnected) => panic!(
                    "server {} ended its output without printing {needle:?}; it printed:\n{}",
                    self.name,
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Reads the rest of the output and waits for the process to exit.
    #[track_caller]
    fn finish(&mut self) -> ExitStatus {
        let until = Instant::now() + PATIENCE;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                    "server {} did not finish within {PATIENCE:?}; it printed:\n{}",
                    self.name,
                    self.seen.join("\n")
                ),
            }
        }
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < until,
                "server {} closed its output but did not exit",
                self.name
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Everything printed so far, for failure messages.
    fn output(&self) -> String {
        self.seen.join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The number after `with` in a line such as
/// `[b] bob joined with 30 coins (join 2, last on a)`.
#[track_caller]
fn coins_in(line: &str) -> u64 {
    line.split_once(" with ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no coin count in {line:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_player_hops_servers_with_every_coin() {
    let daemon = Daemon::start();
    let socket = daemon.socket();

    // Server A plays alice and bob, and holds them once their ticks are
    // over, so bob is still on A when B asks for him.
    let mut a = Server::start(&socket, "a", "alice,bob", true);
    a.wait_for("[a] bob joined with 0 coins");
    a.wait_for("[a] bob is idle");
    let earned = TICKS * COINS_PER_TICK;
    let now = format!("[a] bob earned {COINS_PER_TICK} coins, now {earned}");
    assert!(a.seen.contains(&now), "{}", a.output());

    // Server B force-loads bob. A, by the typed layer's default rule, saves
    // and releases him on request, so B gets every coin bob earned on A.
    let mut b = Server::start(&socket, "b", "bob", false);
    let joined = b.wait_for("[b] bob joined with");
    assert_eq!(coins_in(&joined), earned, "{joined}");
    assert!(joined.contains("join 2, last on a"), "{joined}");
    a.wait_for("[a] bob is wanted by server b");
    a.wait_for("[a] released bob on request");
    let left = b.wait_for("[b] bob left with");
    let final_coins = coins_in(&left);
    assert_eq!(final_coins, earned + TICKS * COINS_PER_TICK, "{left}");
    let status = b.finish();
    assert!(
        status.success(),
        "server b exited {status}:\n{}",
        b.output()
    );

    // A still holds alice. Loading her here, as any other server would,
    // makes A release her too, and then A has no players left and exits.
    let client = daemon.client("checker").await;
    let store = client.store::<PlayerData>("PlayerData");
    let alice = tokio::time::timeout(PATIENCE, store.load("alice", LoadPolicy::ForceLoad))
        .await
        .expect("alice loads in time")
        .expect("load alice");
    a.wait_for("[a] released alice on request");
    let status = a.finish();
    assert!(
        status.success(),
        "server a exited {status}:\n{}",
        a.output()
    );
    {
        let data = alice.data();
        assert_eq!(data.coins, TICKS * COINS_PER_TICK, "{data:?}");
        assert_eq!(
            (data.joins, data.last_server.as_str()),
            (1, "a"),
            "{data:?}"
        );
    }
    alice.release().await.expect("release alice");

    // What B saved when bob left is what the daemon has.
    let bob = store
        .load("bob", LoadPolicy::ForceLoad)
        .await
        .expect("load bob");
    {
        let data = bob.data();
        assert_eq!(data.coins, final_coins, "{data:?}");
        assert_eq!(
            (data.joins, data.last_server.as_str()),
            (2, "b"),
            "{data:?}"
        );
    }
    bob.release().await.expect("release bob");
    client.close().await;
}

/// With no ticks to play (and no `--hold`), a player joins and leaves at
/// once, and the server exits.
#[test]
fn a_server_with_no_ticks_lets_its_player_leave_at_once() {
    let daemon = Daemon::start();
    let mut child = Command::new(game_server())
        .arg("--socket")
        .arg(daemon.socket())
        .args(["--server", "idle", "--players", "p0", "--ticks", "0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn game_server");
    let until = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > until {
            let _ = child.kill();
            panic!("game_server --ticks 0 did not exit within {PATIENCE:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut output = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().expect("stdout"), &mut output)
        .expect("read stdout");
    assert!(status.success(), "{status}: {output}");
    assert!(output.contains("p0 left with 0 coins"), "{output}");
}
