//! Checks of the built `profilectl` that need no daemon: help, usage
//! errors and an unreachable socket.
//!
//! This is the `profiled-client` package's integration test named
//! `profilectl`. Being an integration test makes Cargo build the binary
//! itself (as `target/<profile>/profilectl`) whenever the tests are built,
//! including for `cargo test --workspace --test profilectl`, where the root
//! package's tests of the same name run it against a real daemon.

use std::process::{Command, Output, Stdio};

/// Runs the binary with `args`, no stdin and no `PROFILED_SOCKET`.
fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_profilectl"))
        .args(args)
        .env_remove("PROFILED_SOCKET")
        .stdin(Stdio::null())
        .output()
        .expect("run profilectl")
}

#[test]
fn help_lists_the_exit_codes() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for line in ["Exit codes", "69", "65", "not found", "forbidden"] {
        assert!(text.contains(line), "no {line:?} in {text}");
    }
}

#[test]
fn an_unreachable_socket_exits_69() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("none.sock");
    let socket = socket.to_str().expect("utf-8 path");
    let out = run(&["--socket", socket, "status"]);
    assert_eq!(out.status.code(), Some(69));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("profilectl: cannot connect"), "{err}");
}

#[test]
fn the_socket_comes_from_the_environment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("env.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_profilectl"))
        .arg("status")
        .env("PROFILED_SOCKET", &socket)
        .stdin(Stdio::null())
        .output()
        .expect("run profilectl");
    assert_eq!(out.status.code(), Some(69));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&*socket.to_string_lossy()), "{err}");
}

#[test]
fn a_wipe_without_a_terminal_or_yes_is_a_usage_error() {
    // Refused before connecting, so no daemon is needed.
    let out = run(&[
        "--socket",
        "/nonexistent.sock",
        "wipe",
        "PlayerData",
        "Player_1",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--yes"), "{err}");
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(run(&["no-such-command"]).status.code(), Some(2));
    assert_eq!(run(&["send", "S", "K"]).status.code(), Some(2));
    // A bad payload is refused before connecting.
    let bad = run(&[
        "--socket",
        "/nonexistent.sock",
        "send",
        "S",
        "K",
        "--json",
        "{x",
    ]);
    assert_eq!(bad.status.code(), Some(2));
    assert_eq!(
        run(&["versions", "S", "K", "--from", "yesterday"])
            .status
            .code(),
        Some(2)
    );
}
