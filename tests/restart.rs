//! A daemon killed with SIGKILL loses no acknowledged save, and epochs keep
//! rising across the restart.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use common::Daemon;
use profiled_client::{ErrorCode, LoadPolicy};

const STORE: &str = "PlayerData";
const WRITERS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_loses_no_acknowledged_save_and_epochs_keep_rising() {
    let mut daemon = Daemon::start_with("[session]\nresume_grace = \"300ms\"\n");

    // Writers save an increasing counter as fast as they can, until the
    // daemon dies under them. Each records the last value the daemon
    // acknowledged and its lease's epoch.
    let acked: Arc<Mutex<BTreeMap<usize, (u64, u64)>>> = Arc::default();
    let mut writers = Vec::new();
    for id in 0..WRITERS {
        let client = daemon.client(&format!("writer-{id}")).await;
        let acked = Arc::clone(&acked);
        writers.push(tokio::spawn(async move {
            let profile = client
                .load(STORE, &format!("p{id}"), LoadPolicy::ForceLoad)
                .await
                .expect("load");
            let mut value = 0u64;
            loop {
                let saved = profile.save((value + 1).to_le_bytes().to_vec()).await;
                match saved {
                    Ok(_) => {
                        value += 1;
                        acked
                            .lock()
                            .expect("acked")
                            .insert(id, (value, profile.epoch()));
                    }
                    Err(_) => return value,
                }
            }
        }));
    }

    // Let every writer get some saves acknowledged, then kill the daemon
    // in the middle of the stream.
    loop {
        let progress = acked.lock().expect("acked").clone();
        if progress.len() == WRITERS && progress.values().all(|(value, _)| *value >= 20) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    daemon.kill();
    for writer in writers {
        writer.await.expect("writer ends when the daemon dies");
    }
    let acked = acked.lock().expect("acked").clone();

    daemon.restart();
    let client = daemon.client("after").await;
    for (id, (last_acked, epoch)) in acked {
        // The writers never come back: their recovered leases are released
        // when the resume grace runs out, and the ForceLoad gets them.
        let profile = client
            .load(STORE, &format!("p{id}"), LoadPolicy::ForceLoad)
            .await
            .expect("the recovered lease is freed after the grace");
        let stored = u64::from_le_bytes(
            profile
                .data()
                .expect("data survived")
                .try_into()
                .expect("8 bytes"),
        );
        // The save in flight at the kill may or may not have committed;
        // every acknowledged one must have.
        assert!(
            stored == last_acked || stored == last_acked + 1,
            "p{id}: acknowledged {last_acked}, found {stored}"
        );
        assert!(
            profile.epoch() > epoch,
            "p{id}: epoch went from {epoch} to {}",
            profile.epoch()
        );
    }
}

#[tokio::test]
async fn a_session_resumes_its_lease_after_a_restart_and_old_epochs_stay_fenced() {
    let mut daemon = Daemon::start_with("[session]\nresume_grace = \"60s\"\n");
    let client = daemon.client("a").await;
    let profile = client
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    profile.save(b"kept".to_vec()).await.expect("save");
    let epoch = profile.epoch();
    daemon.kill();
    daemon.restart();

    // Another session cannot have it while its owner may still come back.
    let other = daemon.client("b").await;
    let taken = other.load(STORE, "p", LoadPolicy::Cancel).await;
    assert_eq!(
        taken.expect_err("held").code(),
        Some(&ErrorCode::Taken {
            owner: common::session("a")
        })
    );

    // The owner reconnects and carries on under the same epoch.
    let client = daemon.client("a").await;
    let leases = &client.welcome().leases;
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].epoch, epoch);
    client
        .save(STORE, "p", epoch, b"resumed".to_vec())
        .await
        .expect("the resumed lease writes");

    // Once the lease moves on, the old epoch is refused.
    let stolen = other
        .load(STORE, "p", LoadPolicy::Steal)
        .await
        .expect("steal");
    assert_eq!(stolen.data(), Some(&b"resumed"[..]));
    assert!(stolen.epoch() > epoch);
    let stale = client.save(STORE, "p", epoch, b"zombie".to_vec()).await;
    assert_eq!(
        stale.expect_err("refused").code(),
        Some(&ErrorCode::LeaseLost)
    );
}

/// Leases recovered after a restart under lower limits than they were
/// granted under can be too many for one `Welcome`. The session is then
/// refused with `TooManyLeases`, which a client takes as final, instead of
/// having its connection closed without a word, again at every reconnect.
#[tokio::test]
async fn a_session_whose_recovered_leases_outgrow_the_welcome_is_refused() {
    const SMALL: &str = "max_data = 1024\nmax_message = 1024\nmax_name = 64\n";
    let mut daemon = Daemon::start_with(&format!(
        "[limits]\nmax_frame = 65536\n{SMALL}max_leases_per_session = 300\n"
    ));
    let holder = daemon.client("holder").await;
    let keys: Vec<String> = (0..300).map(|i| format!("{i:060}")).collect();
    let loads = keys
        .iter()
        .map(|key| holder.load(STORE, key, LoadPolicy::Cancel));
    let held = futures::future::join_all(loads).await;
    assert!(held.iter().all(Result::is_ok), "300 leases held");
    daemon.kill();

    // 300 leases with 60-byte keys take about 25 KiB of a Welcome.
    daemon.restart_with(&format!("[limits]\nmax_frame = 8192\n{SMALL}"));
    let refused =
        profiled_client::Client::connect(daemon.socket(), common::session("holder")).await;
    match refused {
        Err(profiled_client::ClientError::Refused(err)) => {
            assert_eq!(err.code, ErrorCode::TooManyLeases, "{err}");
            assert!(err.message.contains("300 leases"), "{err}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Other sessions are served.
    daemon.client("other").await.ping().await.expect("ping");
}
