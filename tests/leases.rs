//! The lease rules, end to end: the real daemon binary, the real client.

mod common;

use std::time::Duration;

use common::{Daemon, session};
use profiled_client::{
    Client, ClientError, ErrorCode, LoadOptions, LoadPolicy, LossReason, Profile, ProfileEvent,
};

const STORE: &str = "PlayerData";

/// Starts `client.load(key, policy)` and returns once the daemon has read
/// the request: a ping sent after it on the same connection has come back.
async fn queued_load(
    client: &Client,
    key: &str,
    options: LoadOptions,
) -> tokio::task::JoinHandle<Result<Profile, ClientError>> {
    let loader = client.clone();
    let key = key.to_owned();
    let (sent, was_sent) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let mut load = Box::pin(loader.load_with(STORE, &key, options));
        // The first poll puts the request in the connection's queue.
        let first = futures::poll!(&mut load);
        let _ = sent.send(());
        match first {
            std::task::Poll::Ready(result) => result,
            std::task::Poll::Pending => load.await,
        }
    });
    was_sent.await.expect("load task started");
    client.ping().await.expect("ping after the load");
    task
}

fn policy(policy: LoadPolicy) -> LoadOptions {
    LoadOptions {
        policy,
        deadline: None,
    }
}

fn code(result: Result<impl std::fmt::Debug, ClientError>) -> ErrorCode {
    result
        .expect_err("expected an error")
        .code()
        .cloned()
        .expect("a daemon error code")
}

#[tokio::test]
async fn load_save_release_then_reload_keeps_the_data_and_raises_the_epoch() {
    let daemon = Daemon::start();
    let client = daemon.client("a").await;
    let profile = client
        .load(STORE, "p1", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    assert_eq!(profile.data(), None, "a new profile has no data");
    assert_eq!(profile.meta().load_count, 1);
    let first_epoch = profile.epoch();
    assert_eq!(profile.save(b"gold=1".to_vec()).await.expect("save"), 1);
    assert_eq!(profile.save(b"gold=2".to_vec()).await.expect("save"), 2);
    profile.release(None).await.expect("release");

    let again = client
        .load(STORE, "p1", LoadPolicy::ForceLoad)
        .await
        .expect("reload");
    assert_eq!(again.data(), Some(&b"gold=2"[..]));
    assert!(again.epoch() > first_epoch);
    assert_eq!(again.meta().load_count, 2);
    assert_eq!(again.meta().version, 2);
    let active = again.meta().active.as_ref().expect("active session");
    assert_eq!(active.session, session("a"));
    assert_eq!(active.epoch, again.epoch());
}

#[tokio::test]
async fn release_with_data_writes_it_atomically() {
    let daemon = Daemon::start();
    let client = daemon.client("a").await;
    let profile = client
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    profile
        .release(Some(b"final".to_vec()))
        .await
        .expect("release");
    let other = daemon.client("b").await;
    let again = other
        .load(STORE, "p", LoadPolicy::Cancel)
        .await
        .expect("free again");
    assert_eq!(again.data(), Some(&b"final"[..]));
}

#[tokio::test]
async fn loading_a_profile_this_session_holds_is_already_loaded() {
    let daemon = Daemon::start();
    let client = daemon.client("a").await;
    let _held = client
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    for policy in [
        LoadPolicy::ForceLoad,
        LoadPolicy::Steal,
        LoadPolicy::Repeat,
        LoadPolicy::Cancel,
    ] {
        assert_eq!(
            code(client.load(STORE, "p", policy).await),
            ErrorCode::AlreadyLoaded,
            "{policy:?}"
        );
    }
}

/// A save sent behind an unanswered release of the same lease must not be
/// applied ahead of it (and then be overwritten by the release's data): it
/// is refused, as it would be once the release is applied.
#[tokio::test]
async fn a_save_sent_behind_an_unanswered_release_is_refused() {
    let daemon = Daemon::start();
    let client = daemon.client("a").await;
    for round in 0..20u32 {
        let key = format!("pipelined-{round}");
        let profile = client
            .load(STORE, &key, LoadPolicy::Cancel)
            .await
            .expect("load");
        let epoch = profile.epoch();
        // `join!` polls the release first, so its frame is sent first.
        let (released, saved) = tokio::join!(
            client.release(STORE, &key, epoch, Some(b"final".to_vec())),
            client.save(STORE, &key, epoch, b"late".to_vec()),
        );
        released.expect("release");
        assert_eq!(code(saved), ErrorCode::LeaseLost, "round {round}");
        let again = client
            .load(STORE, &key, LoadPolicy::Cancel)
            .await
            .expect("load again");
        assert_eq!(again.data(), Some(&b"final"[..]), "round {round}");
        again.release(None).await.expect("release again");
    }
}

#[tokio::test]
async fn a_stale_epoch_is_refused_and_changes_nothing() {
    let daemon = Daemon::start();
    let client = daemon.client("a").await;
    let profile = client
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    let old_epoch = profile.epoch();
    profile.save(b"good".to_vec()).await.expect("save");
    profile.release(None).await.expect("release");
    let again = client
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("reload");

    let stale = client.save(STORE, "p", old_epoch, b"stale".to_vec()).await;
    assert_eq!(code(stale), ErrorCode::LeaseLost);
    let stale_release = client
        .release(STORE, "p", old_epoch, Some(b"stale".to_vec()))
        .await;
    assert_eq!(code(stale_release), ErrorCode::LeaseLost);
    let guessed = client
        .save(STORE, "p", again.epoch() + 1, b"guess".to_vec())
        .await;
    assert_eq!(code(guessed), ErrorCode::LeaseLost);

    // Another session cannot write under this session's epoch either.
    let intruder = daemon.client("b").await;
    let foreign = intruder
        .save(STORE, "p", again.epoch(), b"foreign".to_vec())
        .await;
    assert_eq!(code(foreign), ErrorCode::LeaseLost);

    again.release(None).await.expect("release");
    let check = client
        .load(STORE, "p", LoadPolicy::Cancel)
        .await
        .expect("load");
    assert_eq!(check.data(), Some(&b"good"[..]));
}

#[tokio::test]
async fn cancel_fails_at_once_naming_the_owner() {
    let daemon = Daemon::start();
    let a = daemon.client("a").await;
    let b = daemon.client("b").await;
    let _held = a
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    let err = b
        .load(STORE, "p", LoadPolicy::Cancel)
        .await
        .expect_err("taken");
    assert_eq!(
        err.code(),
        Some(&ErrorCode::Taken {
            owner: session("a")
        })
    );
}

#[tokio::test]
async fn force_load_with_a_cooperative_owner_hands_over_the_saved_data() {
    let daemon = Daemon::start_with("[leases]\nforce_load_timeout = \"60s\"\n");
    let a = daemon.client("a").await;
    let b = daemon.client("b").await;
    let mut held = a
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    held.save(b"v1".to_vec()).await.expect("save");

    let taking = queued_load(&b, "p", policy(LoadPolicy::ForceLoad)).await;
    let event = held.next_event().await.expect("an event");
    assert_eq!(
        event,
        ProfileEvent::ReleaseRequested {
            requester: session("b")
        }
    );
    let held_epoch = held.epoch();
    let syncs = wal_syncs(&a).await;
    held.release(Some(b"v2".to_vec()))
        .await
        .expect("cooperative release");

    let taken = taking.await.expect("task").expect("force load");
    assert_eq!(taken.data(), Some(&b"v2"[..]));
    assert!(taken.epoch() > held_epoch);
    // The release and the grant were written together: one WAL sync.
    assert_eq!(wal_syncs(&a).await - syncs, 1.0);
}

/// The daemon's count of WAL syncs made for acknowledgements.
async fn wal_syncs(client: &Client) -> f64 {
    client
        .stats()
        .await
        .expect("stats")
        .iter()
        .find(|metric| metric.name == "profiled_wal_syncs_total")
        .map(|metric| metric.value)
        .expect("the daemon reports its WAL syncs")
}

#[tokio::test]
async fn force_load_with_a_silent_owner_takes_the_lease_after_the_timeout() {
    let daemon = Daemon::start_with("[leases]\nforce_load_timeout = \"300ms\"\n");
    let a = daemon.client("a").await;
    let b = daemon.client("b").await;
    let mut held = a
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    held.save(b"before".to_vec()).await.expect("save");

    let taken = b
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("force load");
    assert_eq!(taken.data(), Some(&b"before"[..]));
    assert!(taken.epoch() > held.epoch());

    assert_eq!(
        held.next_event().await.expect("event"),
        ProfileEvent::ReleaseRequested {
            requester: session("b")
        }
    );
    assert_eq!(
        held.next_event().await.expect("event"),
        ProfileEvent::LeaseLost {
            reason: LossReason::ForceLoadTimeout,
            new_owner: Some(session("b")),
        }
    );
    assert_eq!(
        code(held.save(b"late".to_vec()).await),
        ErrorCode::LeaseLost
    );

    taken.release(None).await.expect("release");
    let check = a.load(STORE, "p", LoadPolicy::Cancel).await.expect("load");
    assert_eq!(
        check.data(),
        Some(&b"before"[..]),
        "the late save changed nothing"
    );
}

#[tokio::test]
async fn steal_takes_the_lease_at_once_and_fences_the_owner() {
    let daemon = Daemon::start_with("[leases]\nforce_load_timeout = \"60s\"\n");
    let a = daemon.client("a").await;
    let b = daemon.client("b").await;
    let mut held = a
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    held.save(b"mine".to_vec()).await.expect("save");

    let stolen = b.load(STORE, "p", LoadPolicy::Steal).await.expect("steal");
    assert_eq!(stolen.data(), Some(&b"mine"[..]));
    assert_eq!(
        held.next_event().await.expect("event"),
        ProfileEvent::LeaseLost {
            reason: LossReason::Stolen,
            new_owner: Some(session("b")),
        }
    );
    assert_eq!(
        code(held.save(b"after".to_vec()).await),
        ErrorCode::LeaseLost
    );
    assert_eq!(code(held.release(None).await), ErrorCode::LeaseLost);
    stolen
        .save(b"thief".to_vec())
        .await
        .expect("the new owner saves");
}

#[tokio::test]
async fn repeat_waits_for_the_release_without_asking_the_owner() {
    let daemon = Daemon::start_with("[leases]\nforce_load_timeout = \"300ms\"\n");
    let a = daemon.client("a").await;
    let b = daemon.client("b").await;
    let mut held = a
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("load");

    let waiting = queued_load(&b, "p", policy(LoadPolicy::Repeat)).await;
    // The owner keeps the lease well past force_load_timeout: Repeat never
    // takes it and never asks.
    held.save(b"one".to_vec()).await.expect("save");
    tokio::time::sleep(Duration::from_millis(600)).await;
    held.save(b"two".to_vec()).await.expect("still the owner");
    assert_eq!(held.try_next_event(), None, "no release request for Repeat");
    assert!(!waiting.is_finished());
    held.release(None).await.expect("release");

    let granted = waiting.await.expect("task").expect("repeat load");
    assert_eq!(granted.data(), Some(&b"two"[..]));
}

#[tokio::test]
async fn a_load_deadline_ends_the_wait_with_timeout() {
    let daemon = Daemon::start();
    let a = daemon.client("a").await;
    let b = daemon.client("b").await;
    let _held = a
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    let options = LoadOptions {
        policy: LoadPolicy::Repeat,
        deadline: Some(Duration::from_millis(100)),
    };
    assert_eq!(
        code(b.load_with(STORE, "p", options).await),
        ErrorCode::Timeout
    );
}

#[tokio::test]
async fn the_newest_force_load_supersedes_older_ones() {
    let daemon = Daemon::start_with("[leases]\nforce_load_timeout = \"60s\"\n");
    let a = daemon.client("a").await;
    let b = daemon.client("b").await;
    let c = daemon.client("c").await;
    let held = a
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("load");

    let older = queued_load(&b, "p", policy(LoadPolicy::ForceLoad)).await;
    let newer = queued_load(&c, "p", policy(LoadPolicy::ForceLoad)).await;
    let older = older.await.expect("task");
    assert_eq!(code(older), ErrorCode::Superseded);

    held.release(Some(b"handed".to_vec()))
        .await
        .expect("release");
    let granted = newer.await.expect("task").expect("newest wins");
    assert_eq!(granted.data(), Some(&b"handed"[..]));
    assert_eq!(
        granted.meta().active.as_ref().map(|a| &a.session),
        Some(&session("c"))
    );
}

#[tokio::test]
async fn a_session_that_never_comes_back_loses_its_leases_after_the_resume_grace() {
    let daemon = Daemon::start_with(
        "[leases]\nforce_load_timeout = \"60s\"\n[session]\nresume_grace = \"300ms\"\n",
    );
    let a = daemon.client("a").await;
    let b = daemon.client("b").await;
    let held = a
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    held.save(b"saved".to_vec()).await.expect("save");
    let waiting = queued_load(&b, "p", policy(LoadPolicy::Repeat)).await;
    drop(held);
    a.close().await;
    // Within the grace the lease is still held by the absent session.
    let c = daemon.client("c").await;
    let err = c
        .load(STORE, "p", LoadPolicy::Cancel)
        .await
        .expect_err("held");
    assert_eq!(
        err.code(),
        Some(&ErrorCode::Taken {
            owner: session("a")
        })
    );
    let granted = waiting
        .await
        .expect("task")
        .expect("granted after the grace");
    assert_eq!(granted.data(), Some(&b"saved"[..]));
}

#[tokio::test]
async fn force_load_does_not_wait_for_an_answer_from_a_disconnected_owner() {
    // The force-load timeout is far longer than the grace: the ForceLoad is
    // granted when the absent owner's grace runs out, not after asking.
    let daemon = Daemon::start_with(
        "[leases]\nforce_load_timeout = \"60s\"\n[session]\nresume_grace = \"300ms\"\n",
    );
    let a = daemon.client("a").await;
    let held = a
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    held.save(b"kept".to_vec()).await.expect("save");
    drop(held);
    a.close().await;
    let b = daemon.client("b").await;
    let taken = b
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("force load");
    assert_eq!(taken.data(), Some(&b"kept"[..]));
}

#[tokio::test]
async fn force_load_can_take_a_disconnected_owner_s_lease_at_once() {
    let daemon = Daemon::start_with(
        "[leases]\nforce_load_timeout = \"60s\"\n[session]\nresume_grace = \"60s\"\ntake_disconnected_at_once = true\n",
    );
    let a = daemon.client("a").await;
    let held = a
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    let epoch = held.epoch();
    drop(held);
    a.close().await;
    let b = daemon.client("b").await;
    let taken = b
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("force load");
    assert!(taken.epoch() > epoch);
}

#[tokio::test]
async fn a_reconnecting_session_resumes_its_leases_with_the_same_epochs() {
    let daemon = Daemon::start_with("[session]\nresume_grace = \"60s\"\n");
    let a = daemon.client("a").await;
    let held = a
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    let epoch = held.epoch();
    drop(held);
    a.close().await;

    let again = daemon.client("a").await;
    let leases = &again.welcome().leases;
    assert_eq!(leases.len(), 1);
    assert_eq!((leases[0].key.as_str(), leases[0].epoch), ("p", epoch));
    let version = again
        .save(STORE, "p", epoch, b"after the reconnect".to_vec())
        .await
        .expect("the resumed lease still writes");
    assert_eq!(version, 1);
    again
        .release(STORE, "p", epoch, None)
        .await
        .expect("release the resumed lease");
}

#[tokio::test]
async fn a_load_abandoned_by_its_caller_is_released_when_granted() {
    let daemon = Daemon::start_with("[leases]\nforce_load_timeout = \"60s\"\n");
    let a = daemon.client("a").await;
    let b = daemon.client("b").await;
    let c = daemon.client("c").await;
    let held = a
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("load");

    // B waits in line, then gives up (as a timeout around the call would)
    // after the daemon has queued the load.
    let abandoned = queued_load(&b, "p", policy(LoadPolicy::Repeat)).await;
    abandoned.abort();
    let _ = abandoned.await;

    // When A releases, the daemon grants B's load; nobody on B's side
    // holds a Profile for it, so B's client hands it straight back and C,
    // waiting behind it, gets the profile.
    let waiting = queued_load(
        &c,
        "p",
        LoadOptions {
            policy: LoadPolicy::Repeat,
            deadline: Some(Duration::from_secs(20)),
        },
    )
    .await;
    held.release(Some(b"handed on".to_vec()))
        .await
        .expect("release");
    let granted = waiting.await.expect("task").expect("c gets the profile");
    assert_eq!(granted.data(), Some(&b"handed on"[..]));
    assert_eq!(
        granted.meta().load_count,
        3,
        "b's grant happened and was released"
    );
}

/// Loads waiting on one connection are bounded: past
/// `limits.max_queued_loads` a load is refused at once, and the connection
/// may queue again once one is answered.
#[tokio::test]
async fn loads_waiting_on_one_connection_are_bounded() {
    let daemon = Daemon::start_with("[limits]\nmax_queued_loads = 2\n");
    let holder = daemon.client("holder").await;
    let waiter = daemon.client("waiter").await;
    let mut held = Vec::new();
    for key in ["p1", "p2", "p3"] {
        held.push(
            holder
                .load(STORE, key, LoadPolicy::ForceLoad)
                .await
                .expect("load"),
        );
    }
    let first = queued_load(&waiter, "p1", policy(LoadPolicy::Repeat)).await;
    let _second = queued_load(&waiter, "p2", policy(LoadPolicy::Repeat)).await;
    let refused = tokio::time::timeout(
        Duration::from_secs(5),
        waiter.load_with(STORE, "p3", policy(LoadPolicy::Repeat)),
    )
    .await
    .expect("refused at once, not queued");
    assert_eq!(code(refused), ErrorCode::TooManyLoads { limit: 2 });
    // Other connections are not affected, nor are other requests.
    let other = daemon.client("other").await;
    let third = queued_load(&other, "p3", policy(LoadPolicy::Repeat)).await;
    waiter.ping().await.expect("ping");

    let p1 = held.remove(0);
    p1.release(None).await.expect("release");
    first.await.expect("task").expect("granted once p1 is free");
    let again = queued_load(&waiter, "p3", policy(LoadPolicy::Cancel)).await;
    assert_eq!(
        code(again.await.expect("task")),
        ErrorCode::Taken {
            owner: holder.session().clone()
        },
        "room again: the load is judged on its merits"
    );
    drop(third);
}

/// Leases held by one session are bounded: past
/// `limits.max_leases_per_session` a load is refused with `TooManyLeases`
/// (other sessions are not affected), and a release makes room again.
#[tokio::test]
async fn leases_held_by_one_session_are_bounded() {
    let daemon = Daemon::start_with("[limits]\nmax_leases_per_session = 2\n");
    let holder = daemon.client("holder").await;
    let p1 = holder
        .load(STORE, "p1", LoadPolicy::ForceLoad)
        .await
        .expect("load p1");
    let _p2 = holder
        .load(STORE, "p2", LoadPolicy::ForceLoad)
        .await
        .expect("load p2");
    let refused = holder.load(STORE, "p3", LoadPolicy::ForceLoad).await;
    assert_eq!(code(refused), ErrorCode::TooManyLeases);
    let other = daemon.client("other").await;
    let p3 = other
        .load(STORE, "p3", LoadPolicy::ForceLoad)
        .await
        .expect("another session may");
    p3.release(None).await.expect("release p3");

    p1.release(None).await.expect("release p1");
    holder
        .load(STORE, "p3", LoadPolicy::ForceLoad)
        .await
        .expect("room again after a release");
}

/// A session taken over by a newer connection is fenced on the older one
/// at once: of the saves the older connection still has unread or unstarted
/// when the newer one connects, none is applied behind the newer one's
/// acknowledged save. Each round pipelines 2,000 saves on the older
/// connection and takes the session over while they are being read.
/// Without the driver's gate, four of five runs of this test failed.
#[tokio::test]
async fn a_taken_over_connection_starts_nothing_after_the_takeover() {
    use profiled_protocol::{
        ClientFrame, Hello, Reply, Request, RequestBody, Response, Role, ServerFrame,
        decode_payload, encode_frame,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn read_frame(reader: &mut (impl AsyncReadExt + Unpin)) -> Option<ServerFrame> {
        let mut prefix = [0u8; 4];
        reader.read_exact(&mut prefix).await.ok()?;
        let mut payload = vec![0; u32::from_be_bytes(prefix) as usize];
        reader.read_exact(&mut payload).await.ok()?;
        Some(decode_payload(&payload).expect("a frame from the daemon"))
    }
    fn request(id: u64, body: RequestBody) -> Vec<u8> {
        encode_frame(&ClientFrame::Request(Request { id, body })).expect("encode")
    }

    let daemon = Daemon::start();
    for round in 0..30 {
        let job = format!("twin-{round}");
        let key = format!("fenced-{round}");
        let stream = tokio::net::UnixStream::connect(daemon.socket())
            .await
            .expect("connect");
        let (mut reader, mut writer) = stream.into_split();
        let hello = ClientFrame::Hello(Hello {
            protocol_version: profiled_protocol::PROTOCOL_VERSION,
            session: session(&job),
            role: Role::Game,
        });
        writer
            .write_all(&encode_frame(&hello).expect("encode"))
            .await
            .expect("hello");
        assert!(matches!(
            read_frame(&mut reader).await,
            Some(ServerFrame::Welcome(_))
        ));
        let load = RequestBody::Load {
            store: STORE.to_owned(),
            key: key.clone(),
            policy: LoadPolicy::ForceLoad,
            deadline_ms: None,
        };
        writer.write_all(&request(1, load)).await.expect("load");
        let epoch = match read_frame(&mut reader).await {
            Some(ServerFrame::Response(Response {
                result: Ok(Reply::Loaded(loaded)),
                ..
            })) => loaded.epoch,
            other => panic!("expected the grant, got {other:?}"),
        };
        let saves: Vec<u8> = (0..2000)
            .flat_map(|i| {
                let save = RequestBody::Save {
                    store: STORE.to_owned(),
                    key: key.clone(),
                    epoch,
                    data: b"older".to_vec(),
                    changes: Default::default(),
                };
                request(10 + i, save)
            })
            .collect();
        let writing = tokio::spawn(async move {
            let _ = writer.write_all(&saves).await;
            writer
        });
        // Some of the saves have been applied: the daemon is reading them.
        assert!(matches!(
            read_frame(&mut reader).await,
            Some(ServerFrame::Response(_))
        ));

        let newer = daemon.client(&job).await;
        newer
            .save(STORE, &key, epoch, b"newer".to_vec())
            .await
            .expect("the newer connection holds the lease");
        // The older connection answers what it started, is refused, and
        // closes.
        let refused = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match read_frame(&mut reader).await {
                    Some(ServerFrame::Response(_)) => {}
                    other => return other,
                }
            }
        })
        .await
        .expect("the older connection closes");
        assert!(
            matches!(&refused, Some(ServerFrame::Refused(err)) if err.code == ErrorCode::Superseded),
            "{refused:?}"
        );
        drop(writing.await);
        let view = newer.view(STORE, &key, None).await.expect("view");
        assert_eq!(
            view.data.as_deref(),
            Some(&b"newer"[..]),
            "round {round}: a save of the older connection was applied after the takeover"
        );
    }
}

/// A load's answer is counted however the connection takes it from the
/// driver, also when it goes out in a burst behind other answers: with a
/// limit of one waiting load, every round of pipelined saves and one load
/// must still be able to load.
#[tokio::test]
async fn load_answers_sent_in_a_burst_free_their_place_in_the_limit() {
    let daemon = Daemon::start_with("[limits]\nmax_queued_loads = 1\n");
    let client = daemon.client("burst").await;
    let held = client
        .load(STORE, "held", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    for round in 0..30 {
        let saves = futures::future::join_all((0..20).map(|i| held.save(vec![i; 64])));
        let key = format!("free-{round}");
        let load = client.load(STORE, &key, LoadPolicy::ForceLoad);
        let (saved, loaded) = tokio::join!(saves, load);
        assert!(saved.iter().all(Result::is_ok), "round {round}: {saved:?}");
        let loaded = loaded.unwrap_or_else(|err| panic!("round {round}: {err}"));
        loaded.release(None).await.expect("release");
    }
}
