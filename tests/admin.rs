//! Operator requests, end to end: revoking and asking for releases, listing
//! sessions, stats and status, exports, imports and backups.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{Daemon, session};
use profiled_client::{
    Client, ErrorCode, ExportedProfile, LoadPolicy, LossReason, Metric, Profile, ProfileEvent,
};

const STORE: &str = "PlayerData";

async fn next_event(profile: &mut Profile) -> ProfileEvent {
    tokio::time::timeout(Duration::from_secs(5), profile.next_event())
        .await
        .expect("an event in time")
        .expect("the stream is open")
}

fn metric(metrics: &[Metric], name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .iter()
        .find(|m| {
            m.name == name
                && m.labels.len() == labels.len()
                && labels
                    .iter()
                    .all(|(k, v)| m.labels.iter().any(|(mk, mv)| mk == k && mv == v))
        })
        .map(|m| m.value)
        .unwrap_or_else(|| panic!("no metric {name} {labels:?}"))
}

/// The daemon's count of storage errors.
async fn storage_errors(client: &Client) -> f64 {
    metric(
        &client.stats().await.expect("stats"),
        "profiled_storage_errors_total",
        &[],
    )
}

#[tokio::test]
async fn a_revoke_ends_the_lease_and_hands_the_profile_to_the_queue() {
    let daemon = Daemon::start();
    let holder = daemon.client("stuck").await;
    let mut profile = holder
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    profile.save(b"kept".to_vec()).await.expect("save");
    let waiter = daemon.client("waiter").await;
    let queued = {
        let waiter = waiter.clone();
        tokio::spawn(async move { waiter.load(STORE, "p", LoadPolicy::Repeat).await })
    };

    let admin = daemon.admin("ops").await;
    let ended = admin.revoke(STORE, "p").await.expect("revoke");
    let ended = ended.expect("a lease was held");
    assert_eq!(
        (ended.session, ended.epoch),
        (session("stuck"), profile.epoch())
    );
    let ProfileEvent::LeaseLost { reason, .. } = next_event(&mut profile).await else {
        panic!("expected LeaseLost");
    };
    assert_eq!(reason, LossReason::Revoked);
    let granted = tokio::time::timeout(Duration::from_secs(5), queued)
        .await
        .expect("the waiter is granted promptly")
        .expect("task")
        .expect("load");
    assert_eq!(
        granted.data(),
        Some(&b"kept"[..]),
        "a revoke keeps the data"
    );
    assert!(granted.epoch() > profile.epoch());

    let again = admin
        .revoke(STORE, "free")
        .await
        .expect("revoke a free profile");
    assert_eq!(again, None);
}

#[tokio::test]
async fn asking_for_a_release_reaches_the_holder() {
    let daemon = Daemon::start();
    let holder = daemon.client("game").await;
    let mut profile = holder
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    let admin = daemon.admin("ops").await;
    let lease = admin
        .ask_release(STORE, "p")
        .await
        .expect("ask")
        .expect("held");
    assert_eq!(lease.session, session("game"));
    assert!(lease.since_ms > 0);
    let ProfileEvent::ReleaseRequested { requester } = next_event(&mut profile).await else {
        panic!("expected ReleaseRequested");
    };
    assert_eq!(requester, session("ops"));
    profile.release(None).await.expect("release on request");
    assert_eq!(admin.ask_release(STORE, "p").await.expect("ask"), None);
}

#[tokio::test]
async fn sessions_list_who_holds_what() {
    let daemon = Daemon::start();
    let a = daemon.client("a").await;
    let _one = a
        .load(STORE, "1", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    let _two = a
        .load(STORE, "2", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    let b = daemon.client("b").await;
    let _three = b
        .load(STORE, "3", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    let admin = daemon.admin("ops").await;
    let sessions = admin.sessions().await.expect("sessions");
    let summary: Vec<(String, Vec<String>)> = sessions
        .iter()
        .map(|s| {
            (
                s.session.job_id.clone(),
                s.leases.iter().map(|l| l.key.clone()).collect(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("a".to_owned(), vec!["1".to_owned(), "2".to_owned()]),
            ("b".to_owned(), vec!["3".to_owned()]),
            ("ops".to_owned(), vec![]),
        ]
    );
    assert!(sessions.iter().all(|s| s.connection_id.is_some()));
}

#[tokio::test]
async fn stats_and_status_count_what_happened() {
    let daemon = Daemon::start();
    let a = daemon.client("a").await;
    let mut held = a
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    held.save(b"1".to_vec()).await.expect("save");
    held.save(b"2".to_vec()).await.expect("save");
    let b = daemon.client("b").await;
    let err = b
        .load(STORE, "p", LoadPolicy::Cancel)
        .await
        .expect_err("taken");
    assert!(err.code().is_some());
    // A cooperative handoff: b force-loads, a releases on request.
    let handoff = {
        let b = b.clone();
        tokio::spawn(async move { b.load(STORE, "p", LoadPolicy::ForceLoad).await })
    };
    let ProfileEvent::ReleaseRequested { .. } = next_event(&mut held).await else {
        panic!("expected ReleaseRequested");
    };
    held.release(None).await.expect("release");
    let _taken = handoff.await.expect("task").expect("handed off");
    a.send_message(STORE, "p", b"m".to_vec())
        .await
        .expect("send");

    let metrics = a.stats().await.expect("stats");
    let loads = "profiled_loads_total";
    assert_eq!(
        metric(
            &metrics,
            loads,
            &[("policy", "force_load"), ("outcome", "granted")]
        ),
        2.0
    );
    assert_eq!(
        metric(
            &metrics,
            loads,
            &[("policy", "cancel"), ("outcome", "taken")]
        ),
        1.0
    );
    assert_eq!(metric(&metrics, "profiled_saves_total", &[]), 2.0);
    assert_eq!(
        metric(&metrics, "profiled_releases_total", &[("by", "client")]),
        1.0
    );
    assert_eq!(metric(&metrics, "profiled_handoff_seconds_count", &[]), 1.0);
    assert_eq!(
        metric(
            &metrics,
            "profiled_messages_total",
            &[("outcome", "accepted")]
        ),
        1.0
    );
    assert_eq!(metric(&metrics, "profiled_leases_held", &[]), 1.0);
    assert_eq!(metric(&metrics, "profiled_connections", &[]), 2.0);
    assert_eq!(metric(&metrics, "profiled_storage_errors_total", &[]), 0.0);
    assert!(metric(&metrics, "profiled_storage_bytes", &[]) > 0.0);

    let status = a.status().await.expect("status");
    assert_eq!(status.daemon_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(status.leases_held, 1);
    assert_eq!(status.connections, 2);
    assert_eq!(status.sessions, 2);
    assert_eq!(status.queued_loads, 0);
    assert!(status.storage_bytes > 0);
}

#[tokio::test]
async fn an_export_pages_through_a_store_and_an_import_restores_it() {
    let daemon = Daemon::start();
    let game = daemon.client("game").await;
    for i in 0..5 {
        let profile = game
            .load(STORE, &format!("k{i}"), LoadPolicy::ForceLoad)
            .await
            .expect("load");
        profile
            .release(Some(format!("data {i}").into_bytes()))
            .await
            .expect("release");
    }
    // Another store, and a key that sorts right after the store's range.
    let other = game
        .load("PlayerDataX", "k0", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    other
        .release(Some(b"other".to_vec()))
        .await
        .expect("release");

    let admin = daemon.admin("ops").await;
    let mut exported = Vec::new();
    let mut after = None;
    let mut pages = 0;
    loop {
        let page = admin
            .export_page(STORE, after.clone(), 2)
            .await
            .expect("page");
        assert!(page.profiles.len() <= 2);
        pages += 1;
        exported.extend(page.profiles);
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let keys: Vec<&str> = exported.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, ["k0", "k1", "k2", "k3", "k4"]);
    assert_eq!(exported[3].data.as_deref(), Some(&b"data 3"[..]));

    for profile in exported {
        admin.import("Restored", profile).await.expect("import");
    }
    let restored = admin.view("Restored", "k4", None).await.expect("view");
    assert_eq!(restored.data.as_deref(), Some(&b"data 4"[..]));

    let tagged = ExportedProfile {
        key: "tagged".into(),
        version: 9,
        updated_at_ms: 0,
        data: Some(b"t".to_vec()),
        meta_tags: BTreeMap::from([("a".to_owned(), b"b".to_vec())]),
        user_ids: vec![5],
    };
    let version = admin.import(STORE, tagged).await.expect("import");
    assert_eq!(
        version, 1,
        "an import is a new write, whatever it was exported at"
    );
    let view = admin.view(STORE, "tagged", None).await.expect("view");
    assert_eq!(view.meta.user_ids, [5]);
    assert_eq!(
        view.meta.meta_tags.get("a").map(Vec::as_slice),
        Some(&b"b"[..])
    );
}

#[tokio::test]
async fn a_backup_taken_while_serving_starts_a_second_daemon() {
    let daemon = Daemon::start();
    let game = daemon.client("game").await;
    let profile = game
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    profile
        .save(b"before the backup".to_vec())
        .await
        .expect("save");

    let admin = daemon.admin("ops").await;
    let target = daemon.dir().join("backup");
    let bytes = admin
        .backup(target.to_str().expect("utf-8 path"))
        .await
        .expect("backup");
    assert!(bytes > 0);
    // Writes after the backup are not in it.
    profile
        .save(b"after the backup".to_vec())
        .await
        .expect("save");
    let errors_before = storage_errors(&admin).await;
    let err = admin
        .backup(target.to_str().expect("utf-8 path"))
        .await
        .expect_err("the target exists");
    assert_eq!(err.code(), Some(&ErrorCode::InvalidRequest), "{err}");
    assert!(err.to_string().contains("already exists"), "{err}");
    assert_eq!(
        storage_errors(&admin).await,
        errors_before,
        "a refused backup is not a storage error"
    );
    let err = admin.backup("relative").await.expect_err("relative path");
    assert!(err.code().is_some());

    let second = Daemon::start_on_copy_of(&target);
    let reader = second.client("reader").await;
    // The backup holds the lease the game had; stealing shows the data.
    let restored = reader
        .load(STORE, "p", LoadPolicy::Steal)
        .await
        .expect("load from the backup");
    assert_eq!(restored.data(), Some(&b"before the backup"[..]));
}

/// A page is cut before the profile that would take it past the frame,
/// not after: a large profile behind a mid-sized one goes to the next page
/// instead of making this one too large to send.
#[tokio::test]
async fn an_export_page_never_outgrows_the_frame() {
    let daemon = Daemon::start_with(
        "[limits]\nmax_frame = 65536\nmax_data = 60000\nmax_meta_tags = 1\nmax_message = 1024\n",
    );
    let game = daemon.client("game").await;
    let sizes = [("a", 32_000), ("b", 60_000), ("c", 10)];
    for (key, size) in sizes {
        let profile = game
            .load(STORE, key, LoadPolicy::ForceLoad)
            .await
            .expect("load");
        profile.release(Some(vec![7; size])).await.expect("release");
    }
    let admin = daemon.admin("ops").await;
    let mut pages = Vec::new();
    let mut after = None;
    loop {
        let page = admin
            .export_page(STORE, after.clone(), 100)
            .await
            .expect("every page fits in a frame");
        pages.push(
            page.profiles
                .iter()
                .map(|p| (p.key.clone(), p.data.as_ref().map_or(0, Vec::len)))
                .collect::<Vec<_>>(),
        );
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let exported: Vec<(String, usize)> = pages.concat();
    let expected: Vec<(String, usize)> = sizes.iter().map(|(k, n)| (k.to_string(), *n)).collect();
    assert_eq!(exported, expected);
    assert_eq!(
        pages[0].len(),
        1,
        "the 60 KB profile is not added to a page that holds 32 KB"
    );
}
