//! Who may connect: the socket file's mode and the peers' credentials,
//! checked with real processes running as other users.
//!
//! The test creates two system users (CI runs as root). Without root, it
//! says so and checks nothing, since it cannot create users or switch to
//! them.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output};

use common::{Daemon, built_binary};
use profiled_client::{ErrorCode, LoadPolicy};

const GAME_USER: &str = "pd-test-game";
const STRANGER: &str = "pd-test-stranger";

/// The uid and gid of `name`, creating the user if it does not exist.
fn user(name: &str) -> (u32, u32) {
    let id = |flag: &str| {
        let out = Command::new("id")
            .arg(flag)
            .arg(name)
            .output()
            .expect("run id");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<u32>()
            .ok()
    };
    if id("-u").is_none() {
        let status = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                name,
            ])
            .status()
            .expect("run useradd");
        // Another test process may have created it meanwhile.
        assert!(
            status.success() || id("-u").is_some(),
            "useradd {name} failed"
        );
    }
    (id("-u").expect("uid"), id("-g").expect("gid"))
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Runs a built binary as `name`.
fn run_as(name: &str, binary: &str, args: &[&str]) -> Output {
    let (uid, gid) = user(name);
    Command::new(built_binary(binary))
        .args(args)
        .uid(uid)
        .gid(gid)
        .env_remove("PROFILED_SOCKET")
        .output()
        .expect("run the binary as another user")
}

fn text(output: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test]
async fn peers_are_admitted_by_their_credentials() {
    if !is_root() {
        eprintln!("skipped: creating users and switching to them needs root");
        return;
    }
    let _ = (user(GAME_USER), user(STRANGER));
    let daemon = Daemon::start_with(&format!(
        "[access]\nsocket_mode = \"0666\"\ngame_users = [\"{GAME_USER}\"]\n"
    ));
    // The other users must be able to reach the socket at all.
    std::fs::set_permissions(daemon.dir(), std::fs::Permissions::from_mode(0o755))
        .expect("open the test directory");
    let mode = std::fs::metadata(daemon.socket())
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o666, "the socket has the configured mode");
    let socket = daemon.socket();
    let socket = socket.to_str().expect("utf-8 path");

    // A listed game user plays.
    let played = run_as(
        GAME_USER,
        "examples/game_server",
        &[
            "--socket",
            socket,
            "--server",
            "allowed",
            "--players",
            "p1",
            "--ticks",
            "1",
            "--tick-ms",
            "10",
        ],
    );
    assert!(played.status.success(), "{}", text(&played));

    // The same user may not administer.
    let admin = run_as(GAME_USER, "profilectl", &["--socket", socket, "status"]);
    assert!(!admin.status.success(), "{}", text(&admin));
    let said = text(&admin);
    assert!(said.contains("may not connect as an admin"), "{said}");

    // A user not listed may not even play.
    let stranger = run_as(
        STRANGER,
        "examples/game_server",
        &[
            "--socket",
            socket,
            "--server",
            "stranger",
            "--players",
            "p2",
            "--ticks",
            "1",
        ],
    );
    assert!(!stranger.status.success(), "{}", text(&stranger));
    assert!(
        text(&stranger).contains("may not connect"),
        "{}",
        text(&stranger)
    );

    // Each refusal is logged with the peer's uid and pid.
    let (stranger_uid, _) = user(STRANGER);
    let log = daemon.log();
    assert!(
        log.lines().any(|l| l.contains("refused a connection")
            && l.contains(&format!("uid={stranger_uid}"))
            && l.contains("pid=")),
        "{log}"
    );

    // A session live under one user cannot be taken over by another.
    let root_session = daemon.client("shared-name").await;
    let _held = root_session
        .load("PlayerData", "held", LoadPolicy::ForceLoad)
        .await
        .expect("root holds a lease in its session");
    let hijack = run_as(
        GAME_USER,
        "examples/game_server",
        &[
            "--socket",
            socket,
            "--server",
            "shared-name",
            "--players",
            "p9",
            "--ticks",
            "1",
        ],
    );
    assert!(!hijack.status.success(), "{}", text(&hijack));
    assert!(
        text(&hijack).contains("in use by uid 0"),
        "{}",
        text(&hijack)
    );

    // Root is an admin; the game user's profile was saved.
    let admin = daemon.admin("ops").await;
    let view = admin.view("PlayerData", "p1", None).await.expect("view");
    assert!(view.version >= 1);
    let err = daemon
        .client("x")
        .await
        .wipe("PlayerData", "p1")
        .await
        .expect_err("the game role cannot wipe");
    assert_eq!(err.code(), Some(&ErrorCode::Forbidden));
    let _ = admin
        .load("PlayerData", "p3", LoadPolicy::ForceLoad)
        .await
        .expect("root may play too");
}

#[tokio::test]
async fn the_socket_is_not_world_writable_by_default() {
    let daemon = Daemon::start();
    let mode = std::fs::metadata(daemon.socket())
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660);
}

#[test]
fn an_unknown_user_name_in_the_config_stops_the_start_with_its_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, "[access]\nadmin_users = [\"no-such-user-here\"]\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_profiled"))
        .arg("--config")
        .arg(&config)
        .arg("--check-config")
        .output()
        .expect("run profiled");
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("access.admin_users") && said.contains("no-such-user-here"),
        "{said}"
    );
}

/// The uid a session was connected by is kept with its leases, so after a
/// crash and restart the recovered session still belongs to it: another
/// allowed user cannot resume it and take its epochs.
#[tokio::test]
async fn a_recovered_session_still_belongs_to_the_uid_that_connected_it() {
    if !is_root() {
        eprintln!("skipped: creating users and switching to them needs root");
        return;
    }
    let _ = user(GAME_USER);
    let mut daemon = Daemon::start_with(&format!(
        "[access]\nsocket_mode = \"0666\"\ngame_users = [\"{GAME_USER}\"]\n\
         [session]\nresume_grace = \"60s\"\n"
    ));
    std::fs::set_permissions(daemon.dir(), std::fs::Permissions::from_mode(0o755))
        .expect("open the test directory");
    let root_session = daemon.client("survives-restart").await;
    let held = root_session
        .load("PlayerData", "kept", LoadPolicy::ForceLoad)
        .await
        .expect("root holds a lease");
    drop(held);
    // Closing keeps the lease for the resume grace; the crash keeps it in
    // storage for the next start to recover.
    root_session.close().await;
    daemon.kill();
    daemon.restart();

    let socket = daemon.socket();
    let socket = socket.to_str().expect("utf-8 path");
    let hijack = run_as(
        GAME_USER,
        "examples/game_server",
        &[
            "--socket",
            socket,
            "--server",
            "survives-restart",
            "--players",
            "p1",
            "--ticks",
            "1",
        ],
    );
    assert!(!hijack.status.success(), "{}", text(&hijack));
    assert!(
        text(&hijack).contains("in use by uid 0"),
        "{}",
        text(&hijack)
    );
    // Its own uid resumes it, with the lease.
    let resumed = daemon.client("survives-restart").await;
    assert_eq!(resumed.welcome().leases.len(), 1, "{:?}", resumed.welcome());
}
