//! Versions, views, rollbacks and wipes, end to end: the real daemon and the
//! real client.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::Daemon;
use profiled_client::{
    Changes, ClientError, ErrorCode, LoadPolicy, LossReason, OverwriteSource, Profile,
    ProfileEvent, VersionInfo, VersionQuery,
};

const STORE: &str = "PlayerData";

/// Every save is kept, so tests need not wait out an interval.
const KEEP_ALL: &str = "[history]\ninterval = \"0s\"\n";

/// Only releases (and the first save) are kept.
const KEEP_RELEASES: &str = "[history]\ninterval = \"1h\"\n";

fn all(newest_first: bool) -> VersionQuery {
    VersionQuery {
        newest_first,
        from_ms: None,
        to_ms: None,
        limit: 100,
    }
}

fn versions(list: &[VersionInfo]) -> Vec<u64> {
    list.iter().map(|v| v.version).collect()
}

fn code<T: std::fmt::Debug>(result: Result<T, ClientError>) -> ErrorCode {
    result
        .expect_err("expected an error")
        .code()
        .cloned()
        .expect("a daemon error code")
}

async fn lost(profile: &mut Profile) -> LossReason {
    let event = tokio::time::timeout(Duration::from_secs(5), profile.next_event())
        .await
        .expect("an event in time")
        .expect("the stream is open");
    match event {
        ProfileEvent::LeaseLost { reason, .. } => reason,
        other => panic!("expected LeaseLost, got {other:?}"),
    }
}

#[tokio::test]
async fn every_write_raises_the_version_and_old_versions_can_be_viewed() {
    let daemon = Daemon::start_with(KEEP_ALL);
    let game = daemon.client("game").await;
    let profile = game
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    for (i, data) in [b"v1", b"v2", b"v3"].iter().enumerate() {
        let version = profile.save(data.to_vec()).await.expect("save");
        assert_eq!(version, i as u64 + 1);
    }
    let oldest_first = game
        .list_versions(STORE, "p", all(false))
        .await
        .expect("list");
    assert_eq!(versions(&oldest_first), [1, 2, 3]);
    assert!(oldest_first.iter().all(|v| v.size == 2));
    let newest_first = game
        .list_versions(STORE, "p", all(true))
        .await
        .expect("list");
    assert_eq!(versions(&newest_first), [3, 2, 1]);
    let limited = game
        .list_versions(
            STORE,
            "p",
            VersionQuery {
                limit: 2,
                ..all(true)
            },
        )
        .await
        .expect("list");
    assert_eq!(versions(&limited), [3, 2]);
    let after_everything = game
        .list_versions(
            STORE,
            "p",
            VersionQuery {
                from_ms: Some(newest_first[0].saved_at_ms + 1),
                ..all(false)
            },
        )
        .await
        .expect("list");
    assert!(after_everything.is_empty(), "{after_everything:?}");

    let old = game.view(STORE, "p", Some(1)).await.expect("view v1");
    assert_eq!((old.version, old.data.as_deref()), (1, Some(&b"v1"[..])));
    let current = game.view(STORE, "p", None).await.expect("view");
    assert_eq!(current.version, 3);
    assert_eq!(current.data.as_deref(), Some(&b"v3"[..]));
    let active = current.meta.active.expect("held");
    assert_eq!(active.epoch, profile.epoch());
    assert_eq!(
        code(game.view(STORE, "p", Some(9)).await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(game.view(STORE, "nobody", None).await),
        ErrorCode::NotFound
    );
}

#[tokio::test]
async fn between_releases_saves_are_kept_at_most_once_per_interval() {
    let daemon = Daemon::start_with(KEEP_RELEASES);
    let game = daemon.client("game").await;
    let profile = game
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    profile.save(b"v1".to_vec()).await.expect("save");
    profile.save(b"v2".to_vec()).await.expect("save");
    profile.save(b"v3".to_vec()).await.expect("save");
    profile.release(None).await.expect("release");
    let profile = game
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("load again");
    profile.save(b"v4".to_vec()).await.expect("save");
    profile.save(b"v5".to_vec()).await.expect("save");
    let list = game
        .list_versions(STORE, "p", all(false))
        .await
        .expect("list");
    // v1 (the first keep), v3 (the release), v5 (current, always listed).
    assert_eq!(versions(&list), [1, 3, 5]);
    assert_eq!(
        code(game.view(STORE, "p", Some(2)).await),
        ErrorCode::NotFound
    );
}

#[tokio::test]
async fn saves_carry_meta_tags_and_user_ids_atomically_with_the_data() {
    let daemon = Daemon::start();
    let game = daemon.client("game").await;
    let profile = game
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    assert!(profile.meta().meta_tags.is_empty());
    let changes = Changes {
        meta_tags: Some(BTreeMap::from([("schema".to_owned(), b"3".to_vec())])),
        user_ids: Some(vec![2261, 77]),
        consumed_messages: vec![],
    };
    profile
        .save_with(b"data".to_vec(), changes)
        .await
        .expect("save");
    // A later save without changes keeps them.
    profile.save(b"data 2".to_vec()).await.expect("save");
    let first_load_count = profile.meta().load_count;
    profile.release(None).await.expect("release");

    let profile = game
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("load again");
    let meta = profile.meta();
    assert_eq!(
        meta.meta_tags.get("schema").map(Vec::as_slice),
        Some(&b"3"[..])
    );
    assert_eq!(meta.user_ids, [2261, 77]);
    assert_eq!(meta.load_count, first_load_count + 1);
    assert_eq!(meta.version, 2);
    assert!(meta.created_at_ms > 0 && meta.updated_at_ms >= meta.created_at_ms);
    assert_eq!(meta.active.as_ref().map(|a| a.epoch), Some(profile.epoch()));

    let err = profile
        .save_with(
            b"x".to_vec(),
            Changes {
                meta_tags: Some(BTreeMap::from([("t".to_owned(), vec![0; 5000])])),
                ..Changes::default()
            },
        )
        .await
        .expect_err("a tag over max_meta_tag_size");
    assert_eq!(err.code(), Some(&ErrorCode::TooLarge));
}

#[tokio::test]
async fn an_overwrite_ends_the_lease_and_a_rollback_restores_an_old_version() {
    let daemon = Daemon::start_with(KEEP_ALL);
    let game = daemon.client("game").await;
    let mut profile = game
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    profile.save(b"good".to_vec()).await.expect("save");
    profile.save(b"corrupt".to_vec()).await.expect("save");

    let admin = daemon.admin("ops").await;
    let version = admin
        .overwrite(STORE, "p", OverwriteSource::Version(1))
        .await
        .expect("rollback to version 1");
    assert_eq!(version, 3);
    assert_eq!(lost(&mut profile).await, LossReason::Overwritten);
    assert_eq!(
        code(profile.save(b"late".to_vec()).await),
        ErrorCode::LeaseLost,
        "the old holder is fenced off"
    );
    let view = admin.view(STORE, "p", None).await.expect("view");
    assert_eq!(view.data.as_deref(), Some(&b"good"[..]));
    assert!(view.meta.active.is_none());
    // The overwritten data is kept, so the rollback can be undone.
    let undo = admin
        .overwrite(STORE, "p", OverwriteSource::Version(2))
        .await
        .expect("undo the rollback");
    assert_eq!(undo, 4);
    let view = admin.view(STORE, "p", None).await.expect("view");
    assert_eq!(view.data.as_deref(), Some(&b"corrupt"[..]));

    let version = admin
        .overwrite(STORE, "p", OverwriteSource::Data(b"fixed".to_vec()))
        .await
        .expect("overwrite with new data");
    assert_eq!(version, 5);
    assert_eq!(
        code(
            admin
                .overwrite(STORE, "p", OverwriteSource::Version(99))
                .await
        ),
        ErrorCode::NotFound
    );

    let reload = game
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("load after the overwrite");
    assert_eq!(reload.data(), Some(&b"fixed"[..]));
    assert!(reload.epoch() > profile.epoch());
}

#[tokio::test]
async fn a_wipe_erases_everything_but_never_reuses_an_epoch() {
    let daemon = Daemon::start_with(KEEP_ALL);
    let game = daemon.client("game").await;
    let mut profile = game
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    let changes = Changes {
        user_ids: Some(vec![42]),
        ..Changes::default()
    };
    profile
        .save_with(b"personal data".to_vec(), changes)
        .await
        .expect("save");
    profile.save(b"more".to_vec()).await.expect("save");
    game.send_message(STORE, "p", b"hello".to_vec())
        .await
        .expect("send");
    let old_epoch = profile.epoch();

    let admin = daemon.admin("ops").await;
    admin.wipe(STORE, "p").await.expect("wipe");
    // The holder may first hear of the message; the loss follows.
    let reason = loop {
        match tokio::time::timeout(Duration::from_secs(5), profile.next_event())
            .await
            .expect("an event in time")
            .expect("the stream is open")
        {
            ProfileEvent::LeaseLost { reason, .. } => break reason,
            ProfileEvent::Message(_) => continue,
            other => panic!("unexpected event {other:?}"),
        }
    };
    assert_eq!(reason, LossReason::Wiped);
    assert_eq!(
        code(profile.save(b"x".to_vec()).await),
        ErrorCode::LeaseLost
    );
    assert_eq!(
        code(admin.view(STORE, "p", None).await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(admin.list_versions(STORE, "p", all(false)).await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(admin.view(STORE, "p", Some(1)).await),
        ErrorCode::NotFound
    );
    assert_eq!(code(admin.wipe(STORE, "p").await), ErrorCode::NotFound);

    let fresh = game
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("load after the wipe");
    assert_eq!(fresh.data(), None);
    assert!(fresh.messages().is_empty());
    assert!(fresh.meta().user_ids.is_empty());
    assert_eq!(fresh.meta().load_count, 1);
    assert!(fresh.epoch() > old_epoch, "epochs never go backwards");
}

#[tokio::test]
async fn admin_requests_need_the_admin_role() {
    let daemon = Daemon::start();
    let game = daemon.client("game").await;
    game.send_message(STORE, "p", b"m".to_vec())
        .await
        .expect("anyone may send");
    assert_eq!(code(game.wipe(STORE, "p").await), ErrorCode::Forbidden);
    assert_eq!(
        code(
            game.overwrite(STORE, "p", OverwriteSource::Data(vec![]))
                .await
        ),
        ErrorCode::Forbidden
    );
    assert_eq!(code(game.revoke(STORE, "p").await), ErrorCode::Forbidden);
    assert_eq!(code(game.sessions().await), ErrorCode::Forbidden);
    assert_eq!(code(game.backup("/tmp/x").await), ErrorCode::Forbidden);
    assert_eq!(
        code(game.export_page(STORE, None, 10).await),
        ErrorCode::Forbidden
    );
    let view = game
        .view(STORE, "p", None)
        .await
        .expect("views are allowed");
    assert_eq!(view.messages.len(), 1, "the refused wipe changed nothing");
}
