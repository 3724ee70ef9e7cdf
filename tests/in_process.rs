//! The daemon runs in-process through `profiled::run`, as game teams'
//! tests and our own can use it, and stops cleanly when told to.

use std::time::Duration;

use profiled::Config;
use profiled_client::{Client, ConnectOptions, ErrorCode, LoadPolicy, SessionId};

fn session(job: &str) -> SessionId {
    SessionId {
        place_id: 7,
        job_id: job.to_owned(),
    }
}

#[tokio::test]
async fn run_serves_until_shutdown_then_releases_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::default();
    config.listen.socket = dir.path().join("p.sock");
    config.storage.path = dir.path().join("data");
    // The client below never releases; the daemon releases for it once the
    // grace is over.
    config.shutdown.grace = Duration::from_millis(200);
    let listener = profiled::bind(&config.listen.socket, &config.access).expect("bind");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(profiled::run(config.clone(), listener, async {
        let _ = stopped.await;
    }));

    // This client must see the daemon go away rather than wait to
    // reconnect to it.
    let options = ConnectOptions {
        reconnect_for: Duration::ZERO,
        ..ConnectOptions::default()
    };
    let client = Client::connect_with(&config.listen.socket, session("a"), options)
        .await
        .expect("connect");
    let profile = client
        .load("S", "k", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    profile.save(b"saved".to_vec()).await.expect("save");
    let epoch = profile.epoch();

    stop.send(()).expect("server still running");
    tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("run returns after shutdown")
        .expect("server task")
        .expect("clean stop");
    assert!(!config.listen.socket.exists(), "the socket file is removed");
    let late = client.save("S", "k", epoch, b"late".to_vec()).await;
    assert!(late.is_err(), "the connection is gone after shutdown");

    // A second run on the same directory finds the profile free.
    let listener = profiled::bind(&config.listen.socket, &config.access).expect("bind again");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(profiled::run(config.clone(), listener, async {
        let _ = stopped.await;
    }));
    let client = Client::connect(&config.listen.socket, session("b"))
        .await
        .expect("connect");
    let profile = client
        .load("S", "k", LoadPolicy::Cancel)
        .await
        .expect("free at once");
    assert_eq!(profile.data(), Some(&b"saved"[..]));
    assert!(profile.epoch() > epoch);
    let other = Client::connect(&config.listen.socket, session("c"))
        .await
        .expect("connect");
    let taken = other.load("S", "k", LoadPolicy::Cancel).await;
    assert_eq!(
        taken.expect_err("held").code(),
        Some(&ErrorCode::Taken {
            owner: session("b")
        })
    );
    stop.send(()).expect("running");
    server.await.expect("task").expect("clean stop");
}
