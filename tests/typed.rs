//! The typed client layer against the real daemon: MessagePack data,
//! Reconcile, unknown fields, migrations, validation, auto-save, hooks and
//! events, drop-release and shutdown.

mod common;

use std::time::Duration;

use common::Daemon;
use nix::sys::signal::Signal;
use profiled_client::typed::rmpv::Value;
use profiled_client::typed::{
    EndReason, LastSaveReason, LifecycleEvent, Migration, Profile, SCHEMA_TAG, SaveReason,
};
use profiled_client::{ClientError, LoadPolicy, LossReason};
use serde::{Deserialize, Serialize};

const STORE: &str = "PlayerData";

/// How long an event may take to arrive.
const PROMPTLY: Duration = Duration::from_secs(10);

/// The first version of a game's data.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct V1 {
    coins: u64,
    name: String,
}

/// The next version, which added a field.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct V2 {
    coins: u64,
    name: String,
    gems: u32,
}

/// A version from before a migration renamed `gold` to `coins`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct V0 {
    gold: u64,
}

async fn event<T: profiled_client::typed::ProfileData>(profile: &mut Profile<T>) -> LifecycleEvent {
    tokio::time::timeout(PROMPTLY, profile.next_event())
        .await
        .expect("an event in time")
        .expect("the event stream is open")
}

/// Waits for an event matching `wanted`, skipping others.
async fn until<T: profiled_client::typed::ProfileData>(
    profile: &mut Profile<T>,
    wanted: impl Fn(&LifecycleEvent) -> bool,
) -> LifecycleEvent {
    loop {
        let next = event(profile).await;
        if wanted(&next) {
            return next;
        }
    }
}

fn rename_gold_to_coins() -> Migration {
    Migration::new(|value| match value {
        Value::Map(entries) => Ok(Value::Map(
            entries
                .into_iter()
                .map(|(k, v)| {
                    if k.as_str() == Some("gold") {
                        (Value::from("coins"), v)
                    } else {
                        (k, v)
                    }
                })
                .collect(),
        )),
        other => Err(format!("expected a map, got {other}")),
    })
}

#[tokio::test]
async fn typed_data_round_trips_and_is_self_describing_messagepack() {
    let daemon = Daemon::start();
    let client = daemon.client("a").await;
    let store = client.store::<V1>(STORE).with_autosave(None);
    let profile = store.load("p", LoadPolicy::ForceLoad).await.expect("load");
    assert_eq!(
        *profile.data(),
        V1::default(),
        "a new profile is the default"
    );
    assert!(profile.is_active());
    profile.update(|data| {
        data.coins = 42;
        data.name = "ada".into();
    });
    profile.data_mut().coins += 1;
    profile.set_user_ids(vec![2261]);
    let version = profile.save().await.expect("save");
    assert_eq!(version, 1);
    profile.release().await.expect("release");

    // The stored bytes are a MessagePack map with field names.
    let view = client.view(STORE, "p", None).await.expect("view");
    let bytes = view.data.expect("data");
    let value =
        profiled_client::typed::rmpv::decode::read_value(&mut &bytes[..]).expect("messagepack");
    let Value::Map(entries) = value else {
        panic!("a map, not {value}");
    };
    let names: Vec<&str> = entries.iter().filter_map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["coins", "name"]);
    assert_eq!(view.meta.user_ids, [2261]);
    assert_eq!(
        view.meta.meta_tags.get(SCHEMA_TAG).map(Vec::as_slice),
        Some(&b"0"[..])
    );

    let again = store
        .load("p", LoadPolicy::ForceLoad)
        .await
        .expect("reload");
    assert_eq!(
        *again.data(),
        V1 {
            coins: 43,
            name: "ada".into()
        }
    );
    assert_eq!(again.user_ids(), [2261]);
}

#[tokio::test]
async fn missing_fields_reconcile_and_unknown_fields_survive_an_older_server() {
    let daemon = Daemon::start();
    let client = daemon.client("a").await;
    let old = client.store::<V1>(STORE).with_autosave(None);
    let new = client.store::<V2>(STORE).with_autosave(None);

    // Written by the old version, read by the new: `gems` reconciles to 0.
    let profile = old.load("p", LoadPolicy::ForceLoad).await.expect("load");
    profile.update(|d| d.coins = 5);
    profile.release().await.expect("release");
    let profile = new.load("p", LoadPolicy::ForceLoad).await.expect("load");
    assert_eq!(
        *profile.data(),
        V2 {
            coins: 5,
            name: String::new(),
            gems: 0
        }
    );

    // The new version adds gems; an old server in the rolling deploy then
    // changes coins and saves, and must not erase the gems.
    profile.update(|d| d.gems = 7);
    profile.release().await.expect("release");
    let profile = old.load("p", LoadPolicy::ForceLoad).await.expect("load");
    profile.update(|d| d.coins = 6);
    profile.release().await.expect("release");
    let profile = new.load("p", LoadPolicy::ForceLoad).await.expect("load");
    assert_eq!(
        *profile.data(),
        V2 {
            coins: 6,
            name: String::new(),
            gems: 7
        },
        "the field the older server did not know survived its save"
    );
}

#[tokio::test]
async fn migrations_upgrade_old_data_and_newer_schemas_are_refused() {
    let daemon = Daemon::start();
    let client = daemon.client("a").await;
    let v0 = client.store::<V0>(STORE).with_autosave(None);
    let profile = v0.load("p", LoadPolicy::ForceLoad).await.expect("load");
    profile.update(|d| d.gold = 9);
    profile.release().await.expect("release");

    let v1 = client
        .store::<V1>(STORE)
        .with_autosave(None)
        .with_migrations(vec![rename_gold_to_coins()]);
    let profile = v1.load("p", LoadPolicy::ForceLoad).await.expect("load");
    assert_eq!(profile.data().coins, 9, "the migration renamed the field");
    assert_eq!(
        profile.meta_tags().get(SCHEMA_TAG).map(Vec::as_slice),
        Some(&b"1"[..])
    );
    profile.release().await.expect("release at schema 1");

    // A server that knows no migrations must not downgrade it.
    let err = v0
        .load("p", LoadPolicy::ForceLoad)
        .await
        .expect_err("schema 1 is newer than an old server knows");
    assert!(
        matches!(
            err,
            ClientError::SchemaTooNew {
                stored: 1,
                supported: 0
            }
        ),
        "{err}"
    );
    // The refused load gave the lease back, and the data is untouched.
    let profile = v1
        .load("p", LoadPolicy::Cancel)
        .await
        .expect("the profile is free again");
    assert_eq!(profile.data().coins, 9);
}

#[tokio::test]
async fn an_invalid_save_is_refused_locally_and_nothing_is_sent() {
    let daemon = Daemon::start();
    let client = daemon.client("a").await;
    let store = client
        .store::<V1>(STORE)
        .with_autosave(None)
        .with_validator(|d| {
            if d.coins > 100 {
                Err(format!("{} coins is more than anyone can have", d.coins))
            } else {
                Ok(())
            }
        });
    let mut profile = store.load("p", LoadPolicy::ForceLoad).await.expect("load");
    profile.update(|d| d.coins = 10);
    assert_eq!(profile.save().await.expect("a valid save"), 1);
    profile.update(|d| d.coins = 1000);
    let err = profile.save().await.expect_err("invalid");
    let ClientError::Invalid(message) = err else {
        panic!("expected Invalid, got {err}");
    };
    assert!(message.contains("1000 coins"), "{message}");
    let view = client.view(STORE, "p", None).await.expect("view");
    assert_eq!(view.version, 1, "nothing was written");
    until(&mut profile, |e| {
        matches!(
            e,
            LifecycleEvent::SaveFailed {
                reason: SaveReason::Manual,
                ..
            }
        )
    })
    .await;
}

#[tokio::test]
async fn hooks_and_events_report_every_save_and_the_end() {
    let daemon = Daemon::start();
    let client = daemon.client("a").await;
    let store = client
        .store::<V1>(STORE)
        .with_autosave(None)
        .on_before_save(|data, reason| {
            data.name = format!("{reason:?}");
        });
    let mut profile = store.load("p", LoadPolicy::ForceLoad).await.expect("load");
    profile.save().await.expect("save");
    assert_eq!(
        event(&mut profile).await,
        LifecycleEvent::Saved {
            reason: SaveReason::Manual,
            version: 1
        }
    );
    assert_eq!(profile.data().name, "Manual", "the before-save hook ran");

    // A message arrives as an event; the ack rides on the next save.
    let sender = daemon.client("web").await;
    let id = sender
        .send_message(STORE, "p", b"+1".to_vec())
        .await
        .expect("send");
    let LifecycleEvent::Message(message) = event(&mut profile).await else {
        panic!("expected a message");
    };
    assert_eq!(message.id, id);
    assert_eq!(profile.pending_messages().len(), 1);
    profile.apply(id, |d| d.coins += 1);
    profile.save().await.expect("save with the ack");
    assert!(profile.pending_messages().is_empty());
    let view = sender.view(STORE, "p", None).await.expect("view");
    assert!(view.messages.is_empty(), "the save consumed the message");

    // The last save and the session's end.
    let mut watcher = store.load("q", LoadPolicy::ForceLoad).await.expect("load");
    let version = profile.release().await.expect("release");
    assert_eq!(version, 3);
    let stolen = daemon.client("thief").await;
    let _taken = stolen
        .load(STORE, "q", LoadPolicy::Steal)
        .await
        .expect("steal");
    assert_eq!(
        until(&mut watcher, |e| matches!(
            e,
            LifecycleEvent::SessionEnded { .. }
        ))
        .await,
        LifecycleEvent::SessionEnded {
            reason: EndReason::LeaseLost(LossReason::Stolen)
        }
    );
    assert!(!watcher.is_active());
    assert!(matches!(watcher.save().await, Err(ClientError::Ended)));
}

#[tokio::test]
async fn a_release_request_makes_a_last_save_then_hands_the_profile_over() {
    let daemon = Daemon::start();
    let first = daemon.client("server-1").await;
    let mut held = first
        .store::<V1>(STORE)
        .with_autosave(None)
        .load("p", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    held.update(|d| d.coins = 77);
    let second = daemon.client("server-2").await;
    let taken = second
        .store::<V1>(STORE)
        .load("p", LoadPolicy::ForceLoad)
        .await
        .expect("the force load is answered by a release");
    assert_eq!(
        taken.data().coins,
        77,
        "the unsaved change made the last save"
    );
    assert_eq!(
        until(&mut held, |e| matches!(
            e,
            LifecycleEvent::SessionEnded { .. }
        ))
        .await,
        LifecycleEvent::SessionEnded {
            reason: EndReason::Released(LastSaveReason::ReleaseRequested)
        }
    );

    // A game that handles release requests itself is told instead.
    let mut manual = first
        .store::<V1>(STORE)
        .with_autosave(None)
        .release_on_request(false)
        .load("m", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    let waiting = {
        let second = second.clone();
        tokio::spawn(async move {
            second
                .store::<V1>(STORE)
                .load("m", LoadPolicy::ForceLoad)
                .await
        })
    };
    let LifecycleEvent::ReleaseRequested { requester } = event(&mut manual).await else {
        panic!("expected ReleaseRequested");
    };
    assert_eq!(requester.job_id, "server-2");
    manual.release().await.expect("release");
    waiting
        .await
        .expect("task")
        .expect("load after the release");
}

#[tokio::test]
async fn auto_save_writes_changed_profiles_and_carries_on_through_a_daemon_restart() {
    let mut daemon = Daemon::start();
    let client = daemon.client("a").await;
    let store = client
        .store::<V1>(STORE)
        .with_autosave(Some(Duration::from_millis(100)));
    let mut profile = store.load("p", LoadPolicy::ForceLoad).await.expect("load");
    profile.update(|d| d.coins = 1);
    let saved = until(&mut profile, |e| matches!(e, LifecycleEvent::Saved { .. })).await;
    assert_eq!(
        saved,
        LifecycleEvent::Saved {
            reason: SaveReason::AutoSave,
            version: 1
        }
    );

    // The daemon dies and comes back: the client reconnects and resumes
    // the lease, and the pending auto-save goes through; the game sees
    // nothing but the save.
    daemon.kill();
    profile.update(|d| d.coins = 2);
    daemon.restart();
    let saved = until(&mut profile, |e| !matches!(e, LifecycleEvent::Message(_))).await;
    assert_eq!(
        saved,
        LifecycleEvent::Saved {
            reason: SaveReason::AutoSave,
            version: 2
        }
    );
    assert!(profile.is_active(), "the reconnect was invisible");
    let view = client.view(STORE, "p", None).await.expect("view");
    assert_eq!(view.version, 2);
}

#[tokio::test]
async fn a_failed_auto_save_is_reported_and_retried_until_it_succeeds() {
    let daemon = Daemon::start_with("[limits]\nmax_meta_tag_size = 16\n");
    let client = daemon.client("a").await;
    let store = client
        .store::<V1>(STORE)
        .with_autosave(Some(Duration::from_millis(100)));
    let mut profile = store.load("p", LoadPolicy::ForceLoad).await.expect("load");
    // The daemon refuses every save while this tag is over its limit.
    profile.set_meta_tag("note", vec![b'x'; 64]);
    profile.update(|d| d.coins = 5);
    let mut attempts = 0;
    while attempts < 3 {
        match event(&mut profile).await {
            LifecycleEvent::SaveFailed {
                reason: SaveReason::AutoSave,
                attempt,
                error,
            } => {
                attempts += 1;
                assert_eq!(attempt, attempts, "each retry counts: {error}");
                assert!(error.contains("too large"), "{error}");
            }
            other => panic!("expected a failed auto-save, got {other:?}"),
        }
    }
    assert_eq!(
        client.view(STORE, "p", None).await.expect("view").version,
        0
    );
    // Once the game fixes the cause, the next retry goes through.
    profile.set_meta_tag("note", b"ok".to_vec());
    let saved = until(&mut profile, |e| matches!(e, LifecycleEvent::Saved { .. })).await;
    assert_eq!(
        saved,
        LifecycleEvent::Saved {
            reason: SaveReason::AutoSave,
            version: 1
        }
    );
    let view = client.view(STORE, "p", None).await.expect("view");
    assert_eq!(
        view.meta.meta_tags.get("note").map(Vec::as_slice),
        Some(&b"ok"[..])
    );
}

#[tokio::test]
async fn dropping_a_held_profile_saves_and_releases_it() {
    let daemon = Daemon::start();
    let client = daemon.client("a").await;
    let store = client.store::<V1>(STORE).with_autosave(None);
    let profile = store.load("p", LoadPolicy::ForceLoad).await.expect("load");
    profile.update(|d| d.coins = 31);
    drop(profile);
    // A Repeat load waits for the release the drop makes, without asking.
    let other = daemon.client("b").await;
    let next = tokio::time::timeout(
        PROMPTLY,
        other.store::<V1>(STORE).load("p", LoadPolicy::Repeat),
    )
    .await
    .expect("released in time")
    .expect("load");
    assert_eq!(next.data().coins, 31, "the drop made a last save");
}

#[tokio::test]
async fn shutdown_makes_every_profile_save_and_release_within_the_grace() {
    let mut daemon = Daemon::start_with("[shutdown]\ngrace = \"20s\"\n");
    let client = daemon.client("a").await;
    let store = client.store::<V1>(STORE).with_autosave(None);
    let mut profiles = Vec::new();
    for key in ["x", "y", "z"] {
        let profile = store.load(key, LoadPolicy::ForceLoad).await.expect("load");
        profile.update(|d| d.coins = 9);
        profiles.push(profile);
    }
    daemon.signal(Signal::SIGTERM);
    for profile in &mut profiles {
        assert_eq!(
            until(profile, |e| matches!(
                e,
                LifecycleEvent::SessionEnded { .. }
            ))
            .await,
            LifecycleEvent::SessionEnded {
                reason: EndReason::Released(LastSaveReason::Shutdown)
            }
        );
    }
    // Every lease was released by its holder, so the daemon need not wait
    // out the 20 s grace.
    let status = daemon.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status}");
    daemon.restart();
    let reader = daemon.client("reader").await;
    for key in ["x", "y", "z"] {
        let view = reader.view(STORE, key, None).await.expect("view");
        assert!(view.meta.active.is_none(), "{key} was released");
        let profile = reader
            .store::<V1>(STORE)
            .load(key, LoadPolicy::Cancel)
            .await
            .expect("load");
        assert_eq!(profile.data().coins, 9, "{key} made its last save");
    }
}

#[tokio::test]
async fn a_lease_left_without_a_profile_by_a_lost_answer_is_adopted_by_the_next_load() {
    let mut daemon = Daemon::start();
    let client = daemon.client("a").await;
    // Stand-in for a load whose answer was lost: the session holds the
    // lease, but no profile does.
    let raw = client
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    raw.save(b"\x81\xa5coins\x07".to_vec())
        .await
        .expect("save coins = 7");
    drop(raw);
    // The daemon restarts and the client reconnects: the lease is resumed
    // and listed, with nobody holding it in this process.
    daemon.kill();
    daemon.restart();
    // A request caught by the crash fails with `Disconnected`; wait for the
    // reconnect, as a game retries.
    let until = std::time::Instant::now() + PROMPTLY;
    while client.ping().await.is_err() {
        assert!(
            std::time::Instant::now() < until,
            "the client never reconnected"
        );
    }
    let store = client.store::<V1>(STORE).with_autosave(None);
    let profile = tokio::time::timeout(PROMPTLY, store.load("p", LoadPolicy::ForceLoad))
        .await
        .expect("in time")
        .expect("the orphaned lease is given back and the profile loaded");
    assert_eq!(profile.data().coins, 7);
    assert!(profile.is_active());
}

/// A last save the daemon refuses for what it carries would be refused
/// every time: the failure is reported, and the lease is still released
/// (without the changes), not left held with nobody to release it.
#[tokio::test]
async fn a_refused_last_save_still_releases_the_lease() {
    let daemon = Daemon::start_with("[limits]\nmax_meta_tag_size = 16\n");
    let client = daemon.client("a").await;
    let store = client.store::<V1>(STORE).with_autosave(None);
    let profile = store.load("p", LoadPolicy::ForceLoad).await.expect("load");
    profile.update(|d| d.coins = 5);
    profile.set_meta_tag("note", vec![b'x'; 64]);
    let err = profile
        .release()
        .await
        .expect_err("the daemon refuses the tag");
    assert!(err.to_string().contains("too large"), "{err}");
    let other = daemon.client("b").await;
    let next = tokio::time::timeout(
        PROMPTLY,
        other.store::<V1>(STORE).load("p", LoadPolicy::Cancel),
    )
    .await
    .expect("answered in time")
    .expect("the lease was released, so a Cancel load gets it");
    assert_eq!(next.data().coins, 0, "the refused changes were not saved");
}

/// `Client::close` lets every typed profile make its last save and release
/// first: one still held, and one just dropped, whose keeper had not run
/// yet when `close` was called.
#[tokio::test]
async fn closing_the_client_makes_the_last_saves_of_held_and_dropped_profiles() {
    let daemon = Daemon::start();
    let client = daemon.client("a").await;
    let store = client.store::<V1>(STORE).with_autosave(None);
    let mut held = store
        .load("held", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    held.update(|d| d.coins = 7);
    let dropped = store
        .load("dropped", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    dropped.update(|d| d.coins = 8);
    drop(dropped);
    client.close().await;

    let ended = until(&mut held, |e| {
        matches!(e, LifecycleEvent::SessionEnded { .. })
    })
    .await;
    assert_eq!(
        ended,
        LifecycleEvent::SessionEnded {
            reason: EndReason::Released(LastSaveReason::ClientClosed)
        }
    );
    let other = daemon.client("b").await;
    for (key, coins) in [("held", 7), ("dropped", 8)] {
        let profile = tokio::time::timeout(
            PROMPTLY,
            other.store::<V1>(STORE).load(key, LoadPolicy::Cancel),
        )
        .await
        .expect("answered in time")
        .expect("released before the client closed");
        assert_eq!(profile.data().coins, coins, "{key} made its last save");
    }
}

/// Game code that panics while saving refuses that one save; the profile's
/// task carries on and the lease is still released. An auto-save interval
/// too long to schedule means no auto-save, not a panic in that task.
#[tokio::test]
async fn a_panicking_save_hook_or_an_endless_autosave_interval_does_not_strand_the_lease() {
    let daemon = Daemon::start();
    let client = daemon.client("a").await;
    let store = client
        .store::<V1>(STORE)
        .with_autosave(Some(Duration::MAX))
        .on_before_save(|data, _| {
            assert!(data.coins != 13, "unlucky number");
        });
    let profile = store.load("p", LoadPolicy::ForceLoad).await.expect("load");
    profile.update(|d| d.coins = 13);
    let err = profile.save().await.expect_err("the hook panicked");
    assert!(matches!(err, ClientError::Invalid(_)), "{err}");
    profile.update(|d| d.coins = 14);
    profile.save().await.expect("saves again");
    profile.release().await.expect("released");
    let view = client.view(STORE, "p", None).await.expect("view");
    assert!(view.meta.active.is_none(), "the lease was released");
}
