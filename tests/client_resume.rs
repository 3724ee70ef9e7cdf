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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writers_ride_out_a_crash_in_the_middle_of_their_saves_and_lose_no_acknowledged_one() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    const WRITERS: usize = 4;
    let mut daemon = Daemon::start_with("[session]\nresume_grace = \"60s\"\n");
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..WRITERS).map(|_| AtomicU64::new(0)).collect());
    let mut writers = Vec::new();
    for id in 0..WRITERS {
        let client = daemon.client(&format!("writer-{id}")).await;
        let (stop, acked) = (Arc::clone(&stop), Arc::clone(&acked));
        writers.push(tokio::spawn(async move {
            let profile = client
                .load(STORE, &format!("w{id}"), LoadPolicy::ForceLoad)
                .await
                .expect("load");
            let mut value = 0u64;
            let mut failed = 0;
            while !stop.load(Ordering::SeqCst) {
                value += 1;
                match profile.save(value.to_le_bytes().to_vec()).await {
                    Ok(_) => acked[id].store(value, Ordering::SeqCst),
                    // A save in flight when the daemon died has an unknown
                    // outcome; the next one overwrites it either way.
                    Err(_) => failed += 1,
                }
            }
            profile
                .release(None)
                .await
                .expect("release under the resumed lease");
            failed
        }));
    }
    let all_past = |at: u64| acked.iter().all(|a| a.load(Ordering::SeqCst) >= at);
    while !all_past(20) {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let before: Vec<u64> = acked.iter().map(|a| a.load(Ordering::SeqCst)).collect();
    tokio::task::block_in_place(|| {
        daemon.kill();
        daemon.restart();
    });
    // Every writer gets 20 more saves acknowledged after the restart.
    let target = before.iter().max().copied().unwrap_or(0) + 20;
    while !all_past(target) {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let mut failures = 0;
    for writer in writers {
        failures += writer.await.expect("writer");
    }
    assert!(
        failures <= WRITERS,
        "at most the save in flight at the crash failed, per writer"
    );

    let reader = daemon.client("reader").await;
    for (id, last) in acked.iter().enumerate() {
        let last = last.load(Ordering::SeqCst);
        let profile = reader
            .load(STORE, &format!("w{id}"), LoadPolicy::Cancel)
            .await
            .expect("released");
        let stored = u64::from_le_bytes(profile.data().expect("data").try_into().expect("8 bytes"));
        assert_eq!(
            stored, last,
            "w{id}: the last acknowledged save is the stored one"
        );
    }
}
