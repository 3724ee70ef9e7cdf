//! SIGTERM: the graceful-shutdown hook releases every lease cleanly, and
//! loses no acknowledged save, with the real binary and real signals.

mod common;

use std::time::Duration;

use common::Daemon;
use futures::StreamExt;
use nix::sys::signal::Signal;
use profiled_client::{ErrorCode, LoadPolicy};
use profiled_protocol::{Event, ServerFrame};

const STORE: &str = "PlayerData";
const SESSIONS: usize = 10;
const PER_SESSION: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_releases_a_thousand_held_leases_and_keeps_every_save() {
    let grace = Duration::from_secs(1);
    let mut daemon =
        Daemon::start_with("[shutdown]\ngrace = \"1s\"\n[session]\nresume_grace = \"60s\"\n");
    let mut clients = Vec::new();
    let mut profiles = Vec::new();
    for s in 0..SESSIONS {
        let client = daemon.client(&format!("server-{s}")).await;
        for p in 0..PER_SESSION {
            let key = format!("p{s}-{p}");
            let profile = client
                .load(STORE, &key, LoadPolicy::ForceLoad)
                .await
                .expect("load");
            profile.save(key.as_bytes().to_vec()).await.expect("save");
            profiles.push(profile);
        }
        clients.push(client);
    }
    assert_eq!(profiles.len(), 1000);

    // The clients hold on and never answer: the daemon must release
    // everything itself once the grace is over.
    daemon.signal(Signal::SIGTERM);
    let status = daemon.wait_exit(grace + Duration::from_secs(15));
    assert!(status.success(), "exit status {status}");
    assert!(!daemon.socket().exists(), "the socket file is removed");
    let log = daemon.log();
    assert!(
        log.contains("released_by_daemon=1000"),
        "the summary counts the daemon's releases: {log}"
    );

    daemon.restart();
    let after = daemon.client("after").await;
    for s in 0..SESSIONS {
        for p in 0..PER_SESSION {
            let key = format!("p{s}-{p}");
            // Cancel fails at once if anything still held the lease.
            let profile = after
                .load(STORE, &key, LoadPolicy::Cancel)
                .await
                .expect("free at once after a clean stop");
            assert_eq!(profile.data(), Some(key.as_bytes()));
            profile.release(None).await.expect("release");
        }
    }
}

#[tokio::test]
async fn saves_sent_during_the_grace_land_and_are_kept() {
    let mut daemon = Daemon::start_with("[shutdown]\ngrace = \"2s\"\n");
    let client = daemon.client("saver").await;
    let profile = client
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    profile
        .save(0u64.to_le_bytes().to_vec())
        .await
        .expect("save");

    // A raw connection shows the event every client is sent.
    let (mut watcher, _) = common::raw_session(&daemon, "watcher").await;

    daemon.signal(Signal::SIGTERM);
    let event = match watcher.next().await.expect("a frame").expect("decodes") {
        ServerFrame::Event(event) => event,
        other => panic!("unexpected frame {other:?}"),
    };
    let Event::ShuttingDown { deadline_ms } = event else {
        panic!("expected ShuttingDown, got {event:?}");
    };
    assert_eq!(deadline_ms, 2000);

    // New loads are refused, but the holder keeps saving until the daemon
    // releases its lease at the deadline.
    let refused = client.load(STORE, "other", LoadPolicy::ForceLoad).await;
    assert_eq!(
        refused.expect_err("no new loads").code(),
        Some(&ErrorCode::ShuttingDown)
    );
    let mut acked = 0u64;
    loop {
        match profile.save((acked + 1).to_le_bytes().to_vec()).await {
            Ok(_) => acked += 1,
            Err(err) => {
                assert!(
                    matches!(
                        err.code(),
                        Some(ErrorCode::LeaseLost | ErrorCode::ShuttingDown)
                    ) || err.code().is_none(),
                    "a save after the deadline fails cleanly: {err}"
                );
                break;
            }
        }
    }
    assert!(acked > 0, "saves during the grace were acknowledged");
    let status = daemon.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "exit status {status}");

    daemon.restart();
    let after = daemon.client("after").await;
    let profile = after
        .load(STORE, "p", LoadPolicy::Cancel)
        .await
        .expect("free");
    let stored = u64::from_le_bytes(profile.data().expect("data").try_into().expect("8 bytes"));
    assert_eq!(
        stored, acked,
        "every save acknowledged during the grace is there"
    );
}

#[tokio::test]
async fn a_cooperative_client_lets_the_daemon_stop_before_the_grace_is_over() {
    let mut daemon = Daemon::start_with("[shutdown]\ngrace = \"60s\"\n");
    let client = daemon.client("polite").await;
    let profile = client
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    daemon.signal(Signal::SIGTERM);
    profile
        .release(Some(b"bye".to_vec()))
        .await
        .expect("release during the grace");
    // Nothing is held any more, so the daemon does not wait out the grace.
    let status = daemon.wait_exit(Duration::from_secs(30));
    assert!(status.success());
    assert!(
        daemon.log().contains("released_by_daemon=0"),
        "{}",
        daemon.log()
    );
}

#[tokio::test]
async fn a_second_signal_cuts_the_grace_short_but_still_releases() {
    let mut daemon = Daemon::start_with("[shutdown]\ngrace = \"300s\"\n");
    let client = daemon.client("stubborn").await;
    let profile = client
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    profile.save(b"last".to_vec()).await.expect("save");
    daemon.signal(Signal::SIGTERM);
    // Wait until the first signal is being handled (loads are refused).
    loop {
        let probe = client.load(STORE, "probe", LoadPolicy::Cancel).await;
        match probe {
            Err(err) if err.code() == Some(&ErrorCode::ShuttingDown) => break,
            Ok(held) => {
                held.release(None).await.expect("release the probe");
            }
            Err(err) => panic!("unexpected {err}"),
        }
    }
    daemon.signal(Signal::SIGINT);
    let status = daemon.wait_exit(Duration::from_secs(30));
    assert!(status.success());
    daemon.restart();
    let after = daemon.client("after").await;
    let again = after
        .load(STORE, "p", LoadPolicy::Cancel)
        .await
        .expect("released");
    assert_eq!(again.data(), Some(&b"last"[..]));
}
