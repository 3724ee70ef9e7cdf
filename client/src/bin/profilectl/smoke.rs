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

/// A socket that accepts connections but never answers: the connect
/// timeout ends the command, which exits 69 like a daemon that is down.
#[test]
fn a_daemon_that_never_answers_the_handshake_times_out() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("mute.sock");
    // Bound but never accepted: the kernel completes the connection and
    // holds it in the backlog, where nothing ever reads the handshake.
    let _listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
    let out = run(&[
        "--socket",
        socket.to_str().expect("utf-8 path"),
        "--connect-timeout",
        "200ms",
        "status",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(
        err.contains("did not answer the handshake within 200ms"),
        "{err}"
    );
}

/// A daemon that completes the handshake and then stops answering: the
/// request timeout ends the command with exit 3.
#[test]
fn a_daemon_that_stops_answering_times_the_request_out() {
    use profiled_client::protocol::{ServerFrame, Welcome, encode_frame};
    use std::io::{Read, Write};

    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("stuck.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
    let fake = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        let mut prefix = [0u8; 4];
        stream
            .read_exact(&mut prefix)
            .expect("read the hello's length");
        let mut hello = vec![0u8; u32::from_be_bytes(prefix) as usize];
        stream.read_exact(&mut hello).expect("read the hello");
        let welcome = ServerFrame::Welcome(Welcome {
            daemon_version: "0.0.0-fake".to_owned(),
            protocol_version: profiled_client::protocol::PROTOCOL_VERSION,
            max_frame: profiled_client::protocol::DEFAULT_MAX_FRAME,
            connection_id: 1,
            leases: Vec::new(),
        });
        stream
            .write_all(&encode_frame(&welcome).expect("encode"))
            .expect("answer the hello");
        // Read requests and answer none, until the client goes away.
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink);
        !sink.is_empty()
    });
    let out = run(&[
        "--socket",
        socket.to_str().expect("utf-8 path"),
        "--request-timeout",
        "300ms",
        "status",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("did not answer within --request-timeout 300ms"),
        "{err}"
    );
    assert!(
        fake.join().expect("the fake daemon"),
        "the command sent its request before giving up"
    );
}
