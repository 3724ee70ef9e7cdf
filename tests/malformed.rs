//! Hostile input against the real daemon: bytes written by hand to its
//! socket, and requests the client library sends faithfully but the daemon
//! must refuse. After each, the daemon must still serve a well-behaved
//! client.

mod common;

use std::time::Duration;

use common::{Daemon, session};
use profiled_client::{Client, ClientError, ErrorCode, LoadPolicy};
use profiled_protocol::{
    ClientFrame, Hello, PROTOCOL_VERSION, Reply, Request, RequestBody, Response, Role, ServerFrame,
    decode_payload, encode_frame,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// The most a test waits for a frame or a close before it fails instead of
/// hanging. Only a bound on failure; nothing asserts how fast the daemon is.
const PATIENCE: Duration = Duration::from_secs(30);

/// What the daemon did next on a raw connection.
#[derive(Debug)]
enum Next {
    /// It sent this frame.
    Frame(ServerFrame),
    /// It closed the connection (EOF or reset) at a frame boundary.
    Closed,
}

/// Reads the daemon's next frame, or notices that it closed the connection.
async fn next(stream: &mut UnixStream) -> Next {
    tokio::time::timeout(PATIENCE, read_next(stream))
        .await
        .expect("the daemon neither answered nor closed the connection")
}

async fn read_next(stream: &mut UnixStream) -> Next {
    let mut prefix = [0u8; 4];
    match stream.read_exact(&mut prefix).await {
        Ok(_) => {}
        Err(err) if is_closed(&err) => return Next::Closed,
        Err(err) => panic!("reading a length prefix: {err}"),
    }
    let len = u32::from_be_bytes(prefix) as usize;
    assert!(
        len <= profiled_protocol::DEFAULT_MAX_FRAME as usize,
        "the daemon sent a frame of {len} bytes"
    );
    let mut payload = vec![0u8; len];
    stream
        .read_exact(&mut payload)
        .await
        .expect("the daemon sent a whole frame");
    Next::Frame(decode_payload(&payload).expect("the daemon's frame decodes"))
}

fn is_closed(err: &std::io::Error) -> bool {
    matches!(
        err.kind(),
        std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe
    )
}

/// Reads a `Refused` frame and returns its error code, then checks that the
/// daemon closed the connection after it.
async fn expect_refused_then_closed(stream: &mut UnixStream) -> ErrorCode {
    let code = match next(stream).await {
        Next::Frame(ServerFrame::Refused(err)) => err.code,
        other => panic!("expected a refusal, got {other:?}"),
    };
    expect_closed(stream).await;
    code
}

/// Checks that the daemon sends nothing more and closes the connection.
async fn expect_closed(stream: &mut UnixStream) {
    match next(stream).await {
        Next::Closed => {}
        Next::Frame(frame) => panic!("expected the connection closed, got {frame:?}"),
    }
}

/// Connects a raw socket to the daemon.
async fn raw(daemon: &Daemon) -> UnixStream {
    UnixStream::connect(daemon.socket())
        .await
        .expect("connect a raw socket")
}

/// Writes bytes; a daemon that already closed the connection may make this
/// fail, which the caller's read then shows.
async fn send(stream: &mut UnixStream, bytes: &[u8]) {
    let _ = stream.write_all(bytes).await;
}

fn hello(version: u32, job: &str) -> Vec<u8> {
    encode_frame(&ClientFrame::Hello(Hello {
        protocol_version: version,
        session: session(job),
        role: Role::Game,
    }))
    .expect("encode hello")
}

fn ping(id: u64) -> Vec<u8> {
    encode_frame(&ClientFrame::Request(Request {
        id,
        body: RequestBody::Ping,
    }))
    .expect("encode ping")
}

/// A frame whose payload cannot decode: its variant index is out of range.
fn garbage_frame(seed: u32) -> Vec<u8> {
    let mut payload = vec![0xff, 0xff, 0xff, 0xff];
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(12_345);
    for _ in 0..60 {
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        payload.push((state >> 16) as u8);
    }
    let mut frame = u32::try_from(payload.len())
        .expect("small")
        .to_be_bytes()
        .to_vec();
    frame.extend_from_slice(&payload);
    frame
}

/// Completes the handshake on a raw socket.
async fn handshake(stream: &mut UnixStream, job: &str) {
    send(stream, &hello(PROTOCOL_VERSION, job)).await;
    match next(stream).await {
        Next::Frame(ServerFrame::Welcome(welcome)) => {
            assert_eq!(welcome.protocol_version, PROTOCOL_VERSION);
        }
        other => panic!("expected a welcome, got {other:?}"),
    }
}

/// A fresh client loads, saves, reads back and releases a profile: the
/// daemon is still serving normally.
async fn assert_serves(daemon: &Daemon, job: &str) {
    let client = daemon.client(job).await;
    client.ping().await.expect("ping");
    let key = format!("after-{job}");
    let profile = client
        .load("PlayerData", &key, LoadPolicy::ForceLoad)
        .await
        .expect("load");
    let saved = profile.save(b"first".to_vec()).await.expect("save");
    let released = profile
        .release(Some(b"second".to_vec()))
        .await
        .expect("release");
    assert!(
        released > saved,
        "versions increase: {saved} then {released}"
    );
    let again = client
        .load("PlayerData", &key, LoadPolicy::Cancel)
        .await
        .expect("load again after the release");
    assert_eq!(again.data(), Some(&b"second"[..]));
    again.release(None).await.expect("release again");
    client.close().await;
}

#[tokio::test]
async fn garbage_as_the_first_frame_is_refused() {
    let daemon = Daemon::start();
    let mut stream = raw(&daemon).await;
    send(&mut stream, &garbage_frame(1)).await;
    assert_eq!(
        expect_refused_then_closed(&mut stream).await,
        ErrorCode::InvalidRequest
    );
    assert_serves(&daemon, "after-garbage").await;
}

#[tokio::test]
async fn bytes_that_are_not_even_a_frame_are_refused() {
    let daemon = Daemon::start();
    let mut stream = raw(&daemon).await;
    // A plausible prefix (40 bytes) and text that is no message at all.
    let mut bytes = 40u32.to_be_bytes().to_vec();
    bytes.extend_from_slice(b"GET / HTTP/1.1\r\nHost: profiled\r\n\r\n\0\0\0\0\0\0");
    send(&mut stream, &bytes).await;
    assert_eq!(
        expect_refused_then_closed(&mut stream).await,
        ErrorCode::InvalidRequest
    );
    assert_serves(&daemon, "after-text").await;
}

#[tokio::test]
async fn an_oversized_length_prefix_is_refused_before_its_payload() {
    let daemon = Daemon::start();
    let mut stream = raw(&daemon).await;
    // Only the prefix is sent and the write side stays open: the refusal
    // must come without the daemon waiting for (or allocating) 4 GiB.
    send(&mut stream, &0xFFFF_FFF0u32.to_be_bytes()).await;
    assert_eq!(
        expect_refused_then_closed(&mut stream).await,
        ErrorCode::TooLarge
    );
    assert_serves(&daemon, "after-oversized").await;
}

#[tokio::test]
async fn an_oversized_prefix_after_the_handshake_is_refused() {
    let daemon = Daemon::start();
    let mut stream = raw(&daemon).await;
    handshake(&mut stream, "oversized-later").await;
    send(&mut stream, &0xFFFF_FFF0u32.to_be_bytes()).await;
    assert_eq!(
        expect_refused_then_closed(&mut stream).await,
        ErrorCode::TooLarge
    );
    assert_serves(&daemon, "after-oversized-later").await;
}

#[tokio::test]
async fn a_truncated_payload_then_eof_closes_the_connection() {
    let daemon = Daemon::start();
    let mut stream = raw(&daemon).await;
    let mut bytes = 100u32.to_be_bytes().to_vec();
    bytes.extend_from_slice(&[0u8; 10]);
    send(&mut stream, &bytes).await;
    stream.shutdown().await.expect("shut down the write side");
    // The daemon may explain itself, but must not answer with anything else,
    // and must close.
    match next(&mut stream).await {
        Next::Closed => {}
        Next::Frame(ServerFrame::Refused(_)) => expect_closed(&mut stream).await,
        Next::Frame(other) => panic!("expected a close, got {other:?}"),
    }
    assert_serves(&daemon, "after-truncated").await;
}

#[tokio::test]
async fn garbage_after_the_handshake_is_refused_and_closes_the_connection() {
    let daemon = Daemon::start();
    let mut stream = raw(&daemon).await;
    handshake(&mut stream, "garbage-later").await;
    // The connection works before the garbage...
    send(&mut stream, &ping(5)).await;
    match next(&mut stream).await {
        Next::Frame(ServerFrame::Response(Response {
            id: 5,
            result: Ok(Reply::Pong),
        })) => {}
        other => panic!("expected pong 5, got {other:?}"),
    }
    // ...and is closed with a reason after it, even with a valid request
    // right behind the garbage.
    let mut bytes = garbage_frame(2);
    bytes.extend_from_slice(&ping(6));
    send(&mut stream, &bytes).await;
    assert_eq!(
        expect_refused_then_closed(&mut stream).await,
        ErrorCode::InvalidRequest
    );
    assert_serves(&daemon, "after-garbage-later").await;
}

/// A request kind appended after this daemon was built, as a newer client
/// would send it, is refused on its own: the frame is skipped whole, and the
/// requests on either side of it are served on the same connection.
#[tokio::test]
async fn a_request_of_a_kind_newer_than_the_daemon_is_refused_alone() {
    let daemon = Daemon::start();
    let mut stream = raw(&daemon).await;
    handshake(&mut stream, "newer-client").await;
    let mut payload = Vec::new();
    payload.extend_from_slice(&1u32.to_be_bytes()); // ClientFrame::Request
    payload.extend_from_slice(&8u64.to_be_bytes()); // id
    payload.extend_from_slice(&RequestBody::KINDS.to_be_bytes());
    payload.extend_from_slice(b"fields only a newer daemon could read");
    let mut bytes = ping(7);
    bytes.extend_from_slice(&u32::try_from(payload.len()).expect("small").to_be_bytes());
    bytes.extend_from_slice(&payload);
    bytes.extend_from_slice(&ping(9));
    send(&mut stream, &bytes).await;
    let mut answered = Vec::new();
    for _ in 0..3 {
        match next(&mut stream).await {
            Next::Frame(ServerFrame::Response(Response { id, result })) => {
                answered.push((id, result));
            }
            other => panic!("expected three answers, got {other:?}"),
        }
    }
    answered.sort_by_key(|(id, _)| *id);
    assert!(matches!(answered[0], (7, Ok(Reply::Pong))), "{answered:?}");
    match &answered[1] {
        (8, Err(err)) => {
            assert_eq!(err.code, ErrorCode::InvalidRequest);
            assert!(
                err.message
                    .contains(&format!("unknown request kind {}", RequestBody::KINDS)),
                "{err:?}"
            );
        }
        other => panic!("expected request 8 refused, got {other:?}"),
    }
    assert!(matches!(answered[2], (9, Ok(Reply::Pong))), "{answered:?}");
    // Still the same open connection.
    send(&mut stream, &ping(10)).await;
    assert!(matches!(
        next(&mut stream).await,
        Next::Frame(ServerFrame::Response(Response {
            id: 10,
            result: Ok(Reply::Pong)
        }))
    ));
}

/// A save read before a malformed frame is answered before the refusal:
/// it may have committed, and its sender must not be left in doubt.
#[tokio::test]
async fn requests_before_a_malformed_frame_are_answered_before_the_refusal() {
    let daemon = Daemon::start();
    let mut stream = raw(&daemon).await;
    handshake(&mut stream, "before-garbage").await;
    let request =
        |id, body| encode_frame(&ClientFrame::Request(Request { id, body })).expect("encode");
    send(
        &mut stream,
        &request(
            1,
            RequestBody::Load {
                store: "PlayerData".to_owned(),
                key: "doubt".to_owned(),
                policy: LoadPolicy::ForceLoad,
                deadline_ms: None,
            },
        ),
    )
    .await;
    let epoch = match next(&mut stream).await {
        Next::Frame(ServerFrame::Response(Response {
            id: 1,
            result: Ok(Reply::Loaded(loaded)),
        })) => loaded.epoch,
        other => panic!("expected the grant, got {other:?}"),
    };
    let mut bytes = request(
        2,
        RequestBody::Save {
            store: "PlayerData".to_owned(),
            key: "doubt".to_owned(),
            epoch,
            data: b"kept".to_vec(),
            changes: Default::default(),
        },
    );
    bytes.extend_from_slice(&garbage_frame(3));
    send(&mut stream, &bytes).await;
    match next(&mut stream).await {
        Next::Frame(ServerFrame::Response(Response {
            id: 2,
            result: Ok(Reply::Saved { .. }),
        })) => {}
        other => panic!("expected the save's answer first, got {other:?}"),
    }
    assert_eq!(
        expect_refused_then_closed(&mut stream).await,
        ErrorCode::InvalidRequest
    );
}

#[tokio::test]
async fn trailing_bytes_after_a_valid_request_are_refused() {
    let daemon = Daemon::start();
    let mut stream = raw(&daemon).await;
    handshake(&mut stream, "trailing").await;
    // A ping whose prefix claims one byte more than the message, with that
    // byte present: not exactly one message, so malformed.
    let mut frame = ping(1);
    let len = u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) + 1;
    frame[..4].copy_from_slice(&len.to_be_bytes());
    frame.push(0);
    send(&mut stream, &frame).await;
    assert_eq!(
        expect_refused_then_closed(&mut stream).await,
        ErrorCode::InvalidRequest
    );
    assert_serves(&daemon, "after-trailing").await;
}

#[tokio::test]
async fn a_request_before_hello_is_refused() {
    let daemon = Daemon::start();
    let mut stream = raw(&daemon).await;
    send(&mut stream, &ping(1)).await;
    assert_eq!(
        expect_refused_then_closed(&mut stream).await,
        ErrorCode::InvalidRequest
    );
    assert_serves(&daemon, "after-early-request").await;
}

#[tokio::test]
async fn a_second_hello_is_refused() {
    let daemon = Daemon::start();
    let mut stream = raw(&daemon).await;
    handshake(&mut stream, "twice").await;
    send(&mut stream, &hello(PROTOCOL_VERSION, "twice-again")).await;
    assert_eq!(
        expect_refused_then_closed(&mut stream).await,
        ErrorCode::InvalidRequest
    );
    assert_serves(&daemon, "after-second-hello").await;
}

#[tokio::test]
async fn a_hello_with_another_protocol_version_is_refused_naming_both() {
    let daemon = Daemon::start();
    let other = PROTOCOL_VERSION + 41;
    let mut stream = raw(&daemon).await;
    send(&mut stream, &hello(other, "future-client")).await;
    assert_eq!(
        expect_refused_then_closed(&mut stream).await,
        ErrorCode::UnsupportedVersion {
            client: other,
            daemon: PROTOCOL_VERSION,
        }
    );
    assert_serves(&daemon, "after-version").await;
}

#[tokio::test]
async fn a_bad_job_id_in_hello_is_refused() {
    let daemon = Daemon::start();
    let empty = Client::connect(daemon.socket(), session(""))
        .await
        .expect_err("an empty job id is refused");
    assert!(
        matches!(empty, ClientError::Refused(_)),
        "refused at the handshake: {empty}"
    );
    assert_eq!(empty.code(), Some(&ErrorCode::InvalidRequest));

    let control = Client::connect(daemon.socket(), session("job\u{1b}[31m"))
        .await
        .expect_err("a control character in the job id is refused");
    assert_eq!(control.code(), Some(&ErrorCode::InvalidRequest));
    assert_serves(&daemon, "after-bad-job").await;
}

#[tokio::test]
async fn a_save_over_max_data_is_refused_and_the_connection_stays_usable() {
    let daemon = Daemon::start_with(
        "[limits]\nmax_frame = 65536\nmax_data = 1024\nmax_message = 1024\nmax_meta_tags = 8\n",
    );
    let client = daemon.client("big-saver").await;
    assert_eq!(client.welcome().max_frame, 65536);
    let profile = client
        .load("PlayerData", "big", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    let first = profile.save(b"small".to_vec()).await.expect("a small save");

    // Fits in a frame, but over the data limit.
    let err = profile
        .save(vec![7; 1025])
        .await
        .expect_err("a save over max_data fails");
    assert_eq!(err.code(), Some(&ErrorCode::TooLarge), "{err}");
    let err = client
        .release("PlayerData", "big", profile.epoch(), Some(vec![7; 4096]))
        .await
        .expect_err("a release with data over max_data fails");
    assert_eq!(err.code(), Some(&ErrorCode::TooLarge), "{err}");

    // The same connection still works, the lease is still held, and a save
    // of exactly the limit is allowed.
    client.ping().await.expect("ping after the refusals");
    let second = profile
        .save(vec![9; 1024])
        .await
        .expect("a save at the limit");
    assert_eq!(second, first + 1, "the refused writes changed nothing");
    profile.release(None).await.expect("release");

    let reread = client
        .load("PlayerData", "big", LoadPolicy::Cancel)
        .await
        .expect("load again");
    assert_eq!(reread.data(), Some(&[9u8; 1024][..]));
    reread.release(None).await.expect("release again");
    client.close().await;
    assert_serves(&daemon, "after-big-save").await;
}

#[tokio::test]
async fn bad_store_and_key_names_get_typed_errors_and_the_connection_stays_usable() {
    let daemon = Daemon::start_with("[limits]\nmax_name = 16\n");
    let client = daemon.client("namer").await;
    let at_limit = "k".repeat(16);
    let over_limit = "k".repeat(17);

    let bad_names: [(&str, &str, ErrorCode); 6] = [
        ("", "key", ErrorCode::InvalidRequest),
        ("PlayerData", "", ErrorCode::InvalidRequest),
        (&over_limit, "key", ErrorCode::TooLarge),
        ("PlayerData", &over_limit, ErrorCode::TooLarge),
        ("Player\nData", "key", ErrorCode::InvalidRequest),
        ("PlayerData", "key\u{0}", ErrorCode::InvalidRequest),
    ];
    for (store, key, code) in &bad_names {
        let err = client
            .load(store, key, LoadPolicy::ForceLoad)
            .await
            .expect_err("a bad name fails the load");
        assert_eq!(err.code(), Some(code), "load {store:?}/{key:?}: {err}");
        let err = client
            .save(store, key, 1, b"x".to_vec())
            .await
            .expect_err("a bad name fails the save");
        assert_eq!(err.code(), Some(code), "save {store:?}/{key:?}: {err}");
        let err = client
            .release(store, key, 1, None)
            .await
            .expect_err("a bad name fails the release");
        assert_eq!(err.code(), Some(code), "release {store:?}/{key:?}: {err}");
    }

    // The same connection still works, and a name of exactly the limit is
    // fine.
    let profile = client
        .load(&at_limit, &at_limit, LoadPolicy::ForceLoad)
        .await
        .expect("names at the limit load");
    profile.save(b"ok".to_vec()).await.expect("save");
    profile.release(None).await.expect("release");
    client.close().await;
    assert_serves(&daemon, "names").await;
}

#[tokio::test]
async fn fifty_connections_sending_junk_at_once_leave_the_daemon_serving() {
    let daemon = Daemon::start();
    // A client that holds a lease through the storm keeps its connection.
    let bystander = daemon.client("bystander").await;
    let held = bystander
        .load("PlayerData", "bystander", LoadPolicy::ForceLoad)
        .await
        .expect("load before the storm");

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..50u32 {
        let socket = daemon.socket();
        tasks.spawn(async move {
            let mut stream = UnixStream::connect(socket).await.expect("connect");
            let (bytes, expected) = match i % 4 {
                0 => (garbage_frame(i), ErrorCode::InvalidRequest),
                1 => (0xFFFF_FFF0u32.to_be_bytes().to_vec(), ErrorCode::TooLarge),
                2 => (ping(u64::from(i)), ErrorCode::InvalidRequest),
                _ => {
                    let mut bytes = hello(PROTOCOL_VERSION, &format!("junk-{i}"));
                    bytes.extend_from_slice(&garbage_frame(i));
                    (bytes, ErrorCode::InvalidRequest)
                }
            };
            send(&mut stream, &bytes).await;
            if i % 4 == 3 {
                match next(&mut stream).await {
                    Next::Frame(ServerFrame::Welcome(_)) => {}
                    other => panic!("connection {i}: expected a welcome, got {other:?}"),
                }
            }
            let code = expect_refused_then_closed(&mut stream).await;
            assert_eq!(code, expected, "connection {i}");
        });
    }
    while let Some(joined) = tasks.join_next().await {
        joined.expect("a junk connection got the refusal it expected");
    }

    held.save(b"still mine".to_vec())
        .await
        .expect("the bystander's lease survived the storm");
    held.release(None).await.expect("release");
    bystander.close().await;
    assert_serves(&daemon, "after-storm").await;
}

#[tokio::test]
async fn a_connection_that_never_says_hello_is_refused_after_the_handshake_timeout() {
    let daemon = Daemon::start_with("[limits]\nhandshake_timeout = \"200ms\"\n");
    let mut silent = raw(&daemon).await;
    // Nothing is sent; the daemon gives up on its own.
    assert_eq!(
        expect_refused_then_closed(&mut silent).await,
        ErrorCode::InvalidRequest
    );
    assert_serves(&daemon, "after-silence").await;
}

#[tokio::test]
async fn connections_over_the_limit_are_refused_until_one_closes() {
    let daemon = Daemon::start_with("[limits]\nmax_connections = 2\n");
    let first = daemon.client("first").await;
    let mut second = raw(&daemon).await;
    handshake(&mut second, "second").await;
    let mut third = raw(&daemon).await;
    assert_eq!(
        expect_refused_then_closed(&mut third).await,
        ErrorCode::TooLarge,
        "a third connection is turned away"
    );
    first.ping().await.expect("the first still works");
    drop(second);
    // The slot frees once the daemon has seen the close; retry briefly.
    let until = tokio::time::Instant::now() + PATIENCE;
    loop {
        let mut fourth = raw(&daemon).await;
        send(&mut fourth, &hello(PROTOCOL_VERSION, "fourth")).await;
        match next(&mut fourth).await {
            Next::Frame(ServerFrame::Welcome(_)) => break,
            Next::Frame(ServerFrame::Refused(_)) | Next::Closed => {
                assert!(tokio::time::Instant::now() < until, "the slot never freed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// A client that writes requests and never reads the answers is pushed
/// back by its socket: the daemon stops reading once its bounded queues
/// are full, instead of buffering without bound.
#[tokio::test]
async fn a_client_that_does_not_read_is_pushed_back_not_buffered() {
    let daemon = Daemon::start_with("[limits]\nmax_in_flight = 4\n");
    let stream = raw(&daemon).await;
    let mut stream = stream;
    handshake(&mut stream, "flooder").await;
    let std_stream = stream.into_std().expect("into std");
    std_stream.set_nonblocking(true).expect("nonblocking");
    let mut writer = std_stream.try_clone().expect("clone");
    let batch: Vec<u8> = (0..1024).flat_map(ping).collect();
    // Far more than the kernel's buffers and the daemon's queues hold.
    const CAP: usize = 512 * 1024 * 1024;
    let mut accepted = 0usize;
    let mut blocked_polls = 0;
    let until = std::time::Instant::now() + PATIENCE;
    while accepted < CAP && blocked_polls < 20 {
        assert!(std::time::Instant::now() < until, "the flood never settled");
        match std::io::Write::write(&mut writer, &batch) {
            Ok(n) => {
                accepted += n;
                blocked_polls = 0;
            }
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                // Give the daemon time to drain what it will; it must stop.
                blocked_polls += 1;
                std::thread::sleep(Duration::from_millis(25));
            }
            Err(err) => panic!("write failed: {err}"),
        }
    }
    assert!(
        accepted < CAP,
        "the daemon kept reading {accepted} bytes from a client that never reads"
    );
    // Meanwhile everyone else is served.
    assert_serves(&daemon, "beside-the-flood").await;
    drop(writer);
    drop(std_stream);
}

/// A client that stops reading cannot hold the daemon's shutdown up: the
/// connection stuck writing to it gives up shortly after SIGTERM, well
/// before the daemon's last-resort step deadline (10 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_does_not_hold_up_shutdown() {
    let mut daemon =
        Daemon::start_with("[limits]\nmax_in_flight = 4\n[shutdown]\ngrace = \"0s\"\n");
    let mut stream = raw(&daemon).await;
    handshake(&mut stream, "stuck").await;
    let std_stream = stream.into_std().expect("into std");
    std_stream.set_nonblocking(true).expect("nonblocking");
    let mut writer = std_stream.try_clone().expect("clone");
    let batch: Vec<u8> = (0..1024).flat_map(ping).collect();
    // Write until the daemon stops reading: its answers have filled this
    // socket's buffers, so it is stuck writing to a client that never reads.
    let mut blocked_polls = 0;
    let until = std::time::Instant::now() + PATIENCE;
    while blocked_polls < 20 {
        assert!(std::time::Instant::now() < until, "the flood never settled");
        match std::io::Write::write(&mut writer, &batch) {
            Ok(_) => blocked_polls = 0,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                blocked_polls += 1;
                std::thread::sleep(Duration::from_millis(25));
            }
            Err(err) => panic!("write failed: {err}"),
        }
    }
    let stopping = std::time::Instant::now();
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    let status = tokio::task::block_in_place(|| daemon.wait_exit(Duration::from_secs(30)));
    let took = stopping.elapsed();
    assert!(status.success(), "the daemon exited with {status}");
    assert!(
        took < Duration::from_secs(6),
        "the daemon took {took:?} to stop beside a client that does not read"
    );
    drop(writer);
    drop(std_stream);
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_idle_timeout() {
    let daemon = Daemon::start_with("[limits]\nidle_timeout = \"300ms\"\n");
    let mut idle = raw(&daemon).await;
    handshake(&mut idle, "idle").await;
    assert_eq!(
        expect_refused_then_closed(&mut idle).await,
        ErrorCode::Timeout
    );
    // A client that keeps talking is not cut off: ten pings, each well
    // inside the timeout, span more than it.
    let mut busy = raw(&daemon).await;
    handshake(&mut busy, "busy").await;
    for id in 0..10 {
        send(&mut busy, &ping(id)).await;
        match next(&mut busy).await {
            Next::Frame(ServerFrame::Response(Response { id: got, .. })) => assert_eq!(got, id),
            other => panic!("expected a pong, got {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
}

/// A load waiting in a queue is a request in flight: its connection is not
/// idle, however long the holder takes.
#[tokio::test]
async fn a_connection_with_a_load_waiting_is_not_idle() {
    let daemon = Daemon::start_with("[limits]\nidle_timeout = \"300ms\"\n");
    let holder = daemon.client("holder").await;
    let held = holder
        .load("PlayerData", "wanted", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    let mut waiter = raw(&daemon).await;
    handshake(&mut waiter, "waiter").await;
    let load = encode_frame(&ClientFrame::Request(Request {
        id: 7,
        body: RequestBody::Load {
            store: "PlayerData".to_owned(),
            key: "wanted".to_owned(),
            policy: LoadPolicy::Repeat,
            deadline_ms: None,
        },
    }))
    .expect("encode load");
    send(&mut waiter, &load).await;
    // Three idle timeouts pass with the load waiting and nothing sent.
    tokio::time::sleep(Duration::from_millis(900)).await;
    held.release(None).await.expect("release");
    match next(&mut waiter).await {
        Next::Frame(ServerFrame::Response(Response { id: 7, result })) => {
            assert!(matches!(result, Ok(Reply::Loaded(_))), "{result:?}");
        }
        other => panic!("expected the load's grant, got {other:?}"),
    }
}
