//! Messages to profiles (global updates), end to end: the real daemon, the
//! real client, real crashes.

mod common;

use std::time::Duration;

use common::Daemon;
use profiled_client::{Changes, ErrorCode, LoadPolicy, Message, Profile, ProfileEvent};

const STORE: &str = "PlayerData";

/// How long an event may take to arrive.
const PROMPTLY: Duration = Duration::from_secs(5);

async fn next_event(profile: &mut Profile) -> ProfileEvent {
    tokio::time::timeout(PROMPTLY, profile.next_event())
        .await
        .expect("an event in time")
        .expect("the event stream is open")
}

/// The next frame on a raw connection.
async fn next_frame(raw: &mut common::RawSession) -> profiled_protocol::ServerFrame {
    use futures::StreamExt;
    tokio::time::timeout(PROMPTLY, raw.next())
        .await
        .expect("a frame in time")
        .expect("the connection is open")
        .expect("the frame decodes")
}

/// Force-loads `STORE/key` on a raw connection; the lease's epoch.
async fn raw_force_load(raw: &mut common::RawSession, key: &str) -> u64 {
    use futures::SinkExt;
    use profiled_protocol::{ClientFrame, Reply, Request, RequestBody, Response, ServerFrame};
    let load = RequestBody::Load {
        store: STORE.into(),
        key: key.into(),
        policy: profiled_protocol::LoadPolicy::ForceLoad,
        deadline_ms: None,
    };
    raw.send(ClientFrame::Request(Request { id: 1, body: load }))
        .await
        .expect("load");
    match next_frame(raw).await {
        ServerFrame::Response(Response {
            id: 1,
            result: Ok(Reply::Loaded(loaded)),
        }) => loaded.epoch,
        other => panic!("expected the grant, got {other:?}"),
    }
}

fn payloads(messages: &[Message]) -> Vec<&[u8]> {
    messages.iter().map(|m| m.payload.as_slice()).collect()
}

fn consumed(ids: &[u64]) -> Changes {
    Changes {
        consumed_messages: ids.to_vec(),
        ..Changes::default()
    }
}

#[tokio::test]
async fn a_message_to_a_profile_that_does_not_exist_waits_for_its_first_loader() {
    let daemon = Daemon::start();
    let sender = daemon.client("sender").await;
    let first = sender
        .send_message(STORE, "new", b"gift".to_vec())
        .await
        .expect("send to a missing profile");
    let second = sender
        .send_message(STORE, "new", b"gift 2".to_vec())
        .await
        .expect("send again");
    assert!(second > first, "ids rise: {first} then {second}");

    // The profile now exists as a record of messages only.
    let view = sender.view(STORE, "new", None).await.expect("view");
    assert_eq!(view.data, None);
    assert_eq!(payloads(&view.messages), [&b"gift"[..], b"gift 2"]);

    let loader = daemon.client("loader").await;
    let profile = loader
        .load(STORE, "new", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    assert_eq!(profile.data(), None);
    assert_eq!(payloads(profile.messages()), [&b"gift"[..], b"gift 2"]);
    assert_eq!(profile.messages()[0].id, first);
}

#[tokio::test]
async fn the_holder_hears_of_a_message_at_once_and_a_save_consumes_it() {
    let daemon = Daemon::start();
    let game = daemon.client("game").await;
    let mut profile = game
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    let sender = daemon.client("web").await;
    let id = sender
        .send_message(STORE, "p", b"+100 coins".to_vec())
        .await
        .expect("send");
    let ProfileEvent::Message(message) = next_event(&mut profile).await else {
        panic!("expected a message event");
    };
    assert_eq!(
        (message.id, message.payload.as_slice()),
        (id, &b"+100 coins"[..])
    );

    profile
        .save_with(b"coins=100".to_vec(), consumed(&[id]))
        .await
        .expect("save that applies the message");
    let view = sender.view(STORE, "p", None).await.expect("view");
    assert_eq!(view.data.as_deref(), Some(&b"coins=100"[..]));
    assert!(view.messages.is_empty(), "consumed with the save");
    // Consuming it again is harmless.
    profile
        .save_with(b"coins=100".to_vec(), consumed(&[id]))
        .await
        .expect("a repeated acknowledgement is ignored");
}

/// The exactly-once promise across crashes: a message received but not yet
/// saved survives a daemon crash, and one saved is never delivered again.
#[tokio::test]
async fn a_message_survives_a_crash_before_its_save_and_is_gone_after_it() {
    let mut daemon = Daemon::start();
    let game = daemon.client("game").await;
    let mut profile = game
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    profile.save(b"coins=0".to_vec()).await.expect("save");
    let sender = daemon.client("web").await;
    let id = sender
        .send_message(STORE, "p", b"+5".to_vec())
        .await
        .expect("send");
    let ProfileEvent::Message(received) = next_event(&mut profile).await else {
        panic!("expected a message event");
    };
    assert_eq!(received.id, id);

    // The game applied it in memory, and the daemon dies before the save.
    daemon.kill();
    drop(profile);
    game.close().await;
    sender.close().await;
    daemon.restart();

    // Steal rather than wait out the dead session's resume grace.
    let game = daemon.client("game-2").await;
    let profile = game
        .load(STORE, "p", LoadPolicy::Steal)
        .await
        .expect("load after the crash");
    assert_eq!(
        profile.data(),
        Some(&b"coins=0"[..]),
        "the unsaved change is gone"
    );
    assert_eq!(
        payloads(profile.messages()),
        [&b"+5"[..]],
        "so the message must still be pending"
    );

    // Now the save that applies it is acknowledged, and the daemon dies.
    profile
        .save_with(b"coins=5".to_vec(), consumed(&[id]))
        .await
        .expect("save that applies the message");
    daemon.kill();
    drop(profile);
    game.close().await;
    daemon.restart();

    let game = daemon.client("game-3").await;
    let profile = game
        .load(STORE, "p", LoadPolicy::Steal)
        .await
        .expect("load after the second crash");
    assert_eq!(profile.data(), Some(&b"coins=5"[..]));
    assert!(
        profile.messages().is_empty(),
        "an applied message is never delivered again: {:?}",
        profile.messages()
    );
}

#[tokio::test]
async fn a_write_under_a_lost_lease_consumes_nothing() {
    let daemon = Daemon::start();
    let old = daemon.client("old").await;
    let stale = old
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    let id = old
        .send_message(STORE, "p", b"m".to_vec())
        .await
        .expect("send");
    let new = daemon.client("new").await;
    let _taken = new
        .load(STORE, "p", LoadPolicy::Steal)
        .await
        .expect("steal");
    let err = stale
        .save_with(b"x".to_vec(), consumed(&[id]))
        .await
        .expect_err("a fenced save");
    assert_eq!(err.code(), Some(&ErrorCode::LeaseLost));
    let view = new.view(STORE, "p", None).await.expect("view");
    assert_eq!(view.messages.len(), 1, "the message is still pending");
}

#[tokio::test]
async fn sends_over_the_limits_fail_and_drop_nothing() {
    let daemon = Daemon::start_with("[limits]\nmax_pending_messages = 2\nmax_message = 1024\n");
    let sender = daemon.client("sender").await;
    for payload in [b"one", b"two"] {
        sender
            .send_message(STORE, "p", payload.to_vec())
            .await
            .expect("within the limit");
    }
    let err = sender
        .send_message(STORE, "p", b"three".to_vec())
        .await
        .expect_err("over the pending limit");
    assert_eq!(err.code(), Some(&ErrorCode::TooManyMessages { limit: 2 }));
    let err = sender
        .send_message(STORE, "q", vec![0; 1025])
        .await
        .expect_err("over the size limit");
    assert_eq!(err.code(), Some(&ErrorCode::TooLarge));

    let view = sender.view(STORE, "p", None).await.expect("view");
    assert_eq!(
        payloads(&view.messages),
        [&b"one"[..], b"two"],
        "the oldest message is not dropped to make room"
    );

    // Consuming one makes room for the next.
    let game = daemon.client("game").await;
    let profile = game
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    let first = profile.messages()[0].id;
    profile
        .save_with(b"applied one".to_vec(), consumed(&[first]))
        .await
        .expect("save");
    sender
        .send_message(STORE, "p", b"three".to_vec())
        .await
        .expect("room again");
}

/// Up to `max_pending_messages` may be pending, more than one frame holds:
/// the load's answer carries the oldest that fit and the rest follow it as
/// events, so the holder gets every one, in order, and the load succeeds.
/// A view cannot be split that way; it is refused with `TooLarge`, and the
/// connection stays usable.
#[tokio::test]
async fn messages_that_do_not_fit_in_the_load_answer_follow_it_as_events() {
    let daemon = Daemon::start_with(
        "[limits]\nmax_frame = 65536\nmax_data = 1024\nmax_meta_tags = 8\n\
         max_message = 16000\nmax_pending_messages = 16\n",
    );
    let sender = daemon.client("sender").await;
    let mut sent = Vec::new();
    for i in 0..10u8 {
        let payload = vec![i; 16000];
        let id = sender
            .send_message(STORE, "full", payload.clone())
            .await
            .expect("send");
        sent.push((id, payload));
    }

    let err = tokio::time::timeout(PROMPTLY, sender.view(STORE, "full", None))
        .await
        .expect("the view is answered")
        .expect_err("160 KB of messages do not fit in a 64 KiB frame");
    assert_eq!(err.code(), Some(&ErrorCode::TooLarge), "{err}");
    sender.ping().await.expect("the connection is still usable");

    let game = daemon.client("game").await;
    let mut profile =
        tokio::time::timeout(PROMPTLY, game.load(STORE, "full", LoadPolicy::ForceLoad))
            .await
            .expect("the load is answered")
            .expect("load");
    let mut received: Vec<Message> = profile.messages().to_vec();
    assert!(
        (1..sent.len()).contains(&received.len()),
        "some, not all, fit in the answer: {}",
        received.len()
    );
    while received.len() < sent.len() {
        match next_event(&mut profile).await {
            ProfileEvent::Message(message) => received.push(message),
            other => panic!("unexpected event {other:?}"),
        }
    }
    let received: Vec<(u64, Vec<u8>)> = received.into_iter().map(|m| (m.id, m.payload)).collect();
    assert_eq!(received, sent, "every message, once, oldest first");

    let ids: Vec<u64> = sent.iter().map(|(id, _)| *id).collect();
    profile
        .save_with(b"applied".to_vec(), consumed(&ids))
        .await
        .expect("save");
    let view = sender.view(STORE, "full", None).await.expect("view");
    assert!(view.messages.is_empty());
}

/// A profile stored under limits that let it outgrow a frame (the daemon
/// warns of such limits at startup) cannot be sent in a `Loaded` answer: the
/// load is refused with `TooLarge` and its lease given back, not left held
/// by a session that never learned of it.
#[tokio::test]
async fn a_profile_too_large_for_a_frame_is_refused_and_its_lease_given_back() {
    let daemon = Daemon::start_with(
        "[limits]\nmax_frame = 65536\nmax_data = 60000\nmax_message = 1024\n\
         max_meta_tags = 8\nmax_meta_tag_size = 4096\n",
    );
    let game = daemon.client("game").await;
    let profile = game
        .load(STORE, "big", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    profile.save(vec![1; 60_000]).await.expect("save the data");
    let tags = (0..8).map(|i| (format!("tag{i}"), vec![2; 4000])).collect();
    profile
        .release_with(
            None,
            Changes {
                meta_tags: Some(tags),
                ..Changes::default()
            },
        )
        .await
        .expect("release with the tags");

    // The second load waits for the first one's lease to be given back.
    for (job, policy) in [("again", LoadPolicy::Cancel), ("other", LoadPolicy::Repeat)] {
        let client = daemon.client(job).await;
        let err = tokio::time::timeout(PROMPTLY, client.load(STORE, "big", policy))
            .await
            .expect("answered")
            .expect_err("92 KB do not fit in a 64 KiB frame");
        assert_eq!(
            err.code(),
            Some(&ErrorCode::TooLarge),
            "{job}: refused for its size, not Taken by a stranded lease: {err}"
        );
    }
}

/// Messages stored while a holder's session was away reach it when it
/// resumes, right after the welcome and in id order, rather than waiting
/// for the profile's next loader. Raw frames, to see exactly what the
/// daemon pushes.
#[tokio::test]
async fn messages_sent_while_a_session_was_away_follow_its_welcome() {
    use futures::SinkExt;
    use profiled_protocol::{
        ClientFrame, Event, Reply, Request, RequestBody, Response, ServerFrame,
    };

    let daemon = Daemon::start_with("[session]\nresume_grace = \"60s\"\n");
    let (mut raw, _) = common::raw_session(&daemon, "away").await;
    let epoch = raw_force_load(&mut raw, "away").await;
    drop(raw);

    // Stored while the session has no connection: pushed to nobody.
    let sender = daemon.client("sender").await;
    let mut sent = Vec::new();
    for payload in [&b"first"[..], b"second"] {
        // The daemon may not have seen the close yet; a message stored
        // before it did is pushed to the dead connection, which is what the
        // resume must make up for too.
        sent.push(
            sender
                .send_message(STORE, "away", payload.to_vec())
                .await
                .expect("send"),
        );
    }

    let (mut raw, welcome) = common::raw_session(&daemon, "away").await;
    assert_eq!(welcome.leases.len(), 1, "the lease is resumed");
    assert_eq!(welcome.leases[0].epoch, epoch);
    raw.send(ClientFrame::Request(Request {
        id: 2,
        body: RequestBody::Ping,
    }))
    .await
    .expect("ping");
    let mut pushed = Vec::new();
    let mut ponged = false;
    while !(ponged && pushed.len() == sent.len()) {
        match next_frame(&mut raw).await {
            ServerFrame::Event(Event::Message {
                key,
                epoch: of,
                message,
                ..
            }) => {
                assert_eq!((key.as_str(), of), ("away", epoch));
                pushed.push(message.id);
            }
            ServerFrame::Response(Response {
                id: 2,
                result: Ok(Reply::Pong),
            }) => ponged = true,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(pushed, sent, "every message, once, in id order");
}

/// Through the client library and a real crash: a message handed to the
/// holder before the daemon died is not handed over again when the
/// restarted daemon pushes what is pending, and one sent around the
/// reconnect arrives exactly once, in order with the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_reconnect_each_pending_message_reaches_the_holder_once() {
    let mut daemon = Daemon::start_with("[session]\nresume_grace = \"60s\"\n");
    let game = daemon.client("game").await;
    let mut profile = game
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    let sender = daemon.client("web").await;
    let first = sender
        .send_message(STORE, "p", b"first".to_vec())
        .await
        .expect("send");
    let ProfileEvent::Message(message) = next_event(&mut profile).await else {
        panic!("expected the first message");
    };
    assert_eq!(message.id, first);
    drop(sender);

    // Not consumed, so still pending when the daemon comes back.
    tokio::task::block_in_place(|| {
        daemon.kill();
        daemon.restart();
    });
    let sender = daemon.client("web-again").await;
    // Sent around the reconnect: it may be stored before or after the
    // holder's session is back.
    let second = sender
        .send_message(STORE, "p", b"second".to_vec())
        .await
        .expect("send");
    // Once a save has gone through, the session is back, so the third is
    // pushed live, after whatever the resume pushed.
    profile
        .save(b"saved".to_vec())
        .await
        .expect("save after the reconnect");
    let third = sender
        .send_message(STORE, "p", b"third".to_vec())
        .await
        .expect("send");
    let mut received = Vec::new();
    while received.last() != Some(&third) {
        match next_event(&mut profile).await {
            ProfileEvent::Message(message) => received.push(message.id),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(received, [second, third], "no repeat of {first}, none lost");
}

/// Messages sent while their holder reconnects, again and again: on each
/// connection the holder gets every pending message exactly once, in id
/// order, whether it was stored before the reconnect (and comes with the
/// resume) or after it (and is pushed live), including one stored while
/// the resume's read was under way. Raw frames, so the client library's
/// own deduplication cannot hide a repeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_sent_during_reconnects_reach_each_connection_once_in_order() {
    use profiled_protocol::{Event, ServerFrame};

    const ROUNDS: usize = 10;
    const PER_ROUND: usize = 10;
    let daemon = Daemon::start_with("[session]\nresume_grace = \"60s\"\n");
    let (mut raw, _) = common::raw_session(&daemon, "holder").await;
    raw_force_load(&mut raw, "flood").await;
    let sender = std::sync::Arc::new(daemon.client("sender").await);
    let mut sent: Vec<u64> = Vec::new();
    for round in 0..ROUNDS {
        drop(raw);
        let sending = {
            let sender = std::sync::Arc::clone(&sender);
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..PER_ROUND {
                    let payload = format!("{round}.{i}").into_bytes();
                    ids.push(
                        sender
                            .send_message(STORE, "flood", payload)
                            .await
                            .expect("send"),
                    );
                }
                ids
            })
        };
        let (again, welcome) = common::raw_session(&daemon, "holder").await;
        raw = again;
        assert_eq!(welcome.leases.len(), 1, "the lease is resumed");
        sent.extend(sending.await.expect("sender"));
        // None is consumed, so every message sent so far is pending, and
        // this connection must get each of them once, in order.
        let mut pushed = Vec::new();
        while pushed.len() < sent.len() {
            match next_frame(&mut raw).await {
                ServerFrame::Event(Event::Message { message, .. }) => {
                    pushed.push(message.id);
                }
                other => {
                    panic!("round {round}: expected a message, got {other:?} after {pushed:?}")
                }
            }
        }
        assert_eq!(
            pushed, sent,
            "round {round}: each pending message once, in order"
        );
    }
}
