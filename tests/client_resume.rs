//! A client rides out a daemon crash: it reconnects with its session, the
//! restarted daemon resumes the lease with its epoch, and the same
//! `Profile` saves on as if nothing happened.

mod common;

use common::Daemon;
use profiled_client::{HeldLease, LoadPolicy};

const STORE: &str = "PlayerData";
const KEY: &str = "Player_2261";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_saves_under_its_epoch_after_the_daemon_is_killed_and_restarted() {
    let mut daemon = Daemon::start_with("[session]\nresume_grace = \"60s\"\n");
    let client = daemon.client("game").await;
    let profile = client
        .load(STORE, KEY, LoadPolicy::ForceLoad)
        .await
        .expect("load");
    profile
        .save(b"before".to_vec())
        .await
        .expect("save before the crash");
    let epoch = profile.epoch();

    // The harness blocks while the daemon dies and comes back; the client's
    // reconnect loop runs meanwhile on another worker.
    tokio::task::block_in_place(|| {
        daemon.kill();
        daemon.restart();
    });

    // The save waits for the reconnect, and the daemon takes it under the
    // epoch granted before the crash, so the lease was resumed, not
    // granted anew.
    profile
        .save(b"after".to_vec())
        .await
        .expect("save under the resumed lease");
    assert_eq!(
        client.welcome().leases,
        vec![HeldLease {
            store: STORE.into(),
            key: KEY.into(),
            epoch,
        }]
    );
    profile.release(None).await.expect("release");

    let reader = daemon.client("reader").await;
    let loaded = reader
        .load(STORE, KEY, LoadPolicy::Cancel)
        .await
        .expect("free once released");
    assert_eq!(loaded.data(), Some(&b"after"[..]));
    assert!(loaded.epoch() > epoch);
}
