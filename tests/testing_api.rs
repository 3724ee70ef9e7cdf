//! `profiled::testing::TestDaemon`, the real daemon that game teams start in
//! their own tests.

use profiled::testing::TestDaemon;
use profiled_client::{Client, ErrorCode, LoadPolicy, SessionId};

fn session(job: &str) -> SessionId {
    SessionId {
        place_id: 3,
        job_id: job.to_owned(),
    }
}

#[tokio::test]
async fn a_test_daemon_enforces_the_real_lease_rules_and_cleans_up() {
    let daemon = TestDaemon::start().await.expect("start");
    let socket = daemon.socket().to_owned();
    let a = Client::connect(daemon.socket(), session("a"))
        .await
        .expect("connect");
    let b = Client::connect(daemon.socket(), session("b"))
        .await
        .expect("connect");
    let profile = a
        .load("PlayerData", "p", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    profile.save(b"coins=1".to_vec()).await.expect("save");
    let taken = b.load("PlayerData", "p", LoadPolicy::Cancel).await;
    assert_eq!(
        taken.expect_err("held").code(),
        Some(&ErrorCode::Taken {
            owner: session("a")
        })
    );
    profile.release(None).await.expect("release");
    let reloaded = b
        .load("PlayerData", "p", LoadPolicy::Cancel)
        .await
        .expect("free");
    assert_eq!(reloaded.data(), Some(&b"coins=1"[..]));

    daemon.stop().await.expect("clean stop");
    assert!(!socket.exists(), "the directory is gone after stop");
}

#[tokio::test]
async fn two_test_daemons_are_independent() {
    let first = TestDaemon::start().await.expect("start");
    let second = TestDaemon::start().await.expect("start");
    assert_ne!(first.socket(), second.socket());
    let a = Client::connect(first.socket(), session("a"))
        .await
        .expect("connect");
    let b = Client::connect(second.socket(), session("b"))
        .await
        .expect("connect");
    let _held = a.load("S", "k", LoadPolicy::ForceLoad).await.expect("load");
    b.load("S", "k", LoadPolicy::Cancel)
        .await
        .expect("the other daemon's profile is its own");
}
