//! The client against a scripted fake daemon on a temporary socket.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use profiled_protocol::{
    ClientFrame, DEFAULT_MAX_FRAME, Error, ErrorCode, Event, FrameCodec, FrameError, HeldLease,
    LoadPolicy, Loaded, LossReason, PROTOCOL_VERSION, ProfileMeta, Reply, Request, RequestBody,
    Response, Role, ServerFrame, SessionId, Welcome,
};
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::codec::Framed;

use crate::{Client, ClientError, ConnectOptions, LoadOptions, ProfileEvent};

/// The daemon's side of one connection.
type Conn = Framed<UnixStream, FrameCodec<ClientFrame, ServerFrame>>;

/// How long a test waits for something that should happen at once.
const PROMPTLY: Duration = Duration::from_secs(5);

/// A listening socket in a directory removed when the test ends.
struct FakeDaemon {
    /// Keeps the socket's directory alive.
    _dir: tempfile::TempDir,
    /// Where clients connect.
    path: PathBuf,
    /// Accepts the client's connection.
    listener: UnixListener,
}

impl FakeDaemon {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("profiled.sock");
        let listener = UnixListener::bind(&path).expect("bind the fake daemon");
        Self {
            _dir: dir,
            path,
            listener,
        }
    }

    /// Accepts one connection without reading from it.
    async fn accept(&self) -> Conn {
        let (stream, _) = self.listener.accept().await.expect("accept");
        Framed::new(stream, FrameCodec::new(DEFAULT_MAX_FRAME))
    }

    /// Accepts one connection and welcomes it with the given frame limit.
    async fn welcome(&self, max_frame: u32) -> Conn {
        let mut conn = self.accept().await;
        welcome(&mut conn, max_frame, Vec::new()).await;
        conn
    }

    /// Accepts a reconnect and welcomes it back, listing `leases` as the
    /// ones the session still holds.
    async fn welcome_back(&self, leases: Vec<HeldLease>) -> Conn {
        let mut conn = self.accept().await;
        welcome(&mut conn, DEFAULT_MAX_FRAME, leases).await;
        conn
    }
}

/// Reads the client's hello, which must be for the test session, and
/// answers with a welcome.
async fn welcome(conn: &mut Conn, max_frame: u32, leases: Vec<HeldLease>) {
    let hello = next(conn).await;
    assert!(
        matches!(&hello, ClientFrame::Hello(h)
            if h.protocol_version == PROTOCOL_VERSION && h.session == session()),
        "{hello:?}"
    );
    conn.send(ServerFrame::Welcome(Welcome {
        daemon_version: "test".into(),
        protocol_version: PROTOCOL_VERSION,
        max_frame,
        connection_id: 42,
        leases,
    }))
    .await
    .expect("send welcome");
}

fn session() -> SessionId {
    SessionId {
        place_id: 7,
        job_id: "job".into(),
    }
}

fn meta() -> ProfileMeta {
    ProfileMeta {
        created_at_ms: 1,
        updated_at_ms: 0,
        load_count: 1,
        version: 0,
        active: None,
        meta_tags: Default::default(),
        user_ids: Vec::new(),
    }
}

/// The next frame from the client, which must come.
async fn next(conn: &mut Conn) -> ClientFrame {
    tokio::time::timeout(PROMPTLY, conn.next())
        .await
        .expect("a frame in time")
        .expect("a frame before eof")
        .expect("a well-formed frame")
}

/// The next frame from the client, which must be a request.
async fn request(conn: &mut Conn) -> Request {
    match next(conn).await {
        ClientFrame::Request(request) => request,
        other => panic!("expected a request, got {other:?}"),
    }
}

/// Answers request `id` with `result`.
async fn reply(conn: &mut Conn, id: u64, result: Result<Reply, Error>) {
    conn.send(ServerFrame::Response(Response { id, result }))
        .await
        .expect("send a response");
}

/// Waits until the client closes its end.
async fn expect_eof(conn: &mut Conn) {
    let frame = tokio::time::timeout(PROMPTLY, conn.next())
        .await
        .expect("eof in time");
    assert!(frame.is_none(), "expected eof, got {frame:?}");
}

/// Connects a client to `daemon`, which welcomes it.
async fn connected(daemon: &FakeDaemon, max_frame: u32) -> (Client, Conn) {
    connected_with(daemon, max_frame, ConnectOptions::default()).await
}

/// Connects a client with `options` to `daemon`, which welcomes it.
async fn connected_with(
    daemon: &FakeDaemon,
    max_frame: u32,
    options: ConnectOptions,
) -> (Client, Conn) {
    let (client, conn) = tokio::join!(
        Client::connect_with(&daemon.path, session(), options),
        daemon.welcome(max_frame)
    );
    (client.expect("connect"), conn)
}

/// Options that end the link as soon as the connection drops.
fn no_reconnect() -> ConnectOptions {
    ConnectOptions {
        reconnect_for: Duration::ZERO,
        ..ConnectOptions::default()
    }
}

/// The lease on `s/key` at `epoch`, as a welcome lists it.
fn held(key: &str, epoch: u64) -> HeldLease {
    HeldLease {
        store: "s".into(),
        key: key.into(),
        epoch,
    }
}

/// Serves one load of `s/k` with the given epoch.
async fn serve_load(conn: &mut Conn, epoch: u64) {
    let Request { id, body } = request(conn).await;
    assert!(matches!(body, RequestBody::Load { .. }), "{body:?}");
    reply(
        conn,
        id,
        Ok(Reply::Loaded(Loaded {
            epoch,
            data: Some(b"old".to_vec()),
            meta: meta(),
            messages: Vec::new(),
        })),
    )
    .await;
}

#[tokio::test]
async fn the_handshake_sends_hello_and_keeps_the_welcome() {
    let daemon = FakeDaemon::new();
    let options = ConnectOptions {
        role: Role::Admin,
        ..ConnectOptions::default()
    };
    let server = async {
        let mut conn = daemon.accept().await;
        let hello = next(&mut conn).await;
        conn.send(ServerFrame::Welcome(Welcome {
            daemon_version: "9.9.9".into(),
            protocol_version: PROTOCOL_VERSION,
            max_frame: 1000,
            connection_id: 3,
            leases: Vec::new(),
        }))
        .await
        .expect("send welcome");
        (hello, conn)
    };
    let (client, (hello, _conn)) = tokio::join!(
        Client::connect_with(&daemon.path, session(), options),
        server
    );
    let client = client.expect("connect");
    let ClientFrame::Hello(hello) = hello else {
        panic!("expected hello, got {hello:?}");
    };
    assert_eq!(hello.session, session());
    assert_eq!(hello.role, Role::Admin);
    assert_eq!(client.session(), &session());
    assert_eq!(client.welcome().daemon_version, "9.9.9");
    assert_eq!(client.welcome().connection_id, 3);
}

#[tokio::test]
async fn a_refused_handshake_carries_the_daemons_code() {
    let daemon = FakeDaemon::new();
    let server = async {
        let mut conn = daemon.accept().await;
        next(&mut conn).await;
        let code = ErrorCode::UnsupportedVersion {
            client: PROTOCOL_VERSION,
            daemon: PROTOCOL_VERSION + 1,
        };
        conn.send(ServerFrame::Refused(Error::new(code, "upgrade the client")))
            .await
            .expect("send refusal");
    };
    let (client, ()) = tokio::join!(Client::connect(&daemon.path, session()), server);
    let err = client.expect_err("refused");
    assert!(matches!(err, ClientError::Refused(_)), "{err}");
    assert_eq!(
        err.code(),
        Some(&ErrorCode::UnsupportedVersion {
            client: PROTOCOL_VERSION,
            daemon: PROTOCOL_VERSION + 1
        })
    );
}

#[tokio::test]
async fn a_handshake_answered_with_something_else_is_a_protocol_error() {
    let daemon = FakeDaemon::new();
    let server = async {
        let mut conn = daemon.accept().await;
        next(&mut conn).await;
        conn.send(ServerFrame::Response(Response {
            id: 1,
            result: Ok(Reply::Pong),
        }))
        .await
        .expect("send response");
    };
    let (client, ()) = tokio::join!(Client::connect(&daemon.path, session()), server);
    assert!(
        matches!(client, Err(ClientError::Protocol(_))),
        "{client:?}"
    );
}

#[tokio::test]
async fn connecting_to_no_socket_is_an_io_error() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let client = Client::connect(dir.path().join("absent.sock"), session()).await;
    assert!(matches!(client, Err(ClientError::Io(_))), "{client:?}");
}

#[tokio::test]
async fn responses_out_of_order_reach_their_own_callers() {
    let daemon = FakeDaemon::new();
    let (client, mut conn) = connected(&daemon, DEFAULT_MAX_FRAME).await;
    let server = async {
        let mut requests = Vec::new();
        for _ in 0..3 {
            requests.push(request(&mut conn).await);
        }
        // A response to no request in flight is ignored.
        conn.feed(ServerFrame::Response(Response {
            id: u64::MAX,
            result: Ok(Reply::Pong),
        }))
        .await
        .expect("send stray response");
        for Request { id, body } in requests.into_iter().rev() {
            let reply = match body {
                RequestBody::Save { epoch, .. } => Reply::Saved {
                    version: epoch * 10,
                },
                RequestBody::Ping => Reply::Pong,
                other => panic!("unexpected request {other:?}"),
            };
            conn.feed(ServerFrame::Response(Response {
                id,
                result: Ok(reply),
            }))
            .await
            .expect("send response");
        }
        conn.flush().await.expect("flush");
    };
    let (first, second, ping, ()) = tokio::join!(
        client.save("s", "a", 1, b"one".to_vec()),
        client.save("s", "b", 2, b"two".to_vec()),
        client.ping(),
        server,
    );
    assert_eq!(first.expect("first save"), 10);
    assert_eq!(second.expect("second save"), 20);
    ping.expect("ping");
}

#[tokio::test]
async fn a_daemon_error_is_returned_with_its_code() {
    let daemon = FakeDaemon::new();
    let (client, mut conn) = connected(&daemon, DEFAULT_MAX_FRAME).await;
    let server = async {
        let Request { id, .. } = request(&mut conn).await;
        reply(
            &mut conn,
            id,
            Err(Error::new(ErrorCode::LeaseLost, "epoch 3 is not current")),
        )
        .await;
    };
    let (saved, ()) = tokio::join!(client.save("s", "k", 3, Vec::new()), server);
    let err = saved.expect_err("lease lost");
    assert_eq!(err.code(), Some(&ErrorCode::LeaseLost));
    assert_eq!(
        err.to_string(),
        "request failed: lease lost: epoch 3 is not current"
    );
}

#[tokio::test]
async fn a_wrong_kind_of_reply_is_a_protocol_error() {
    let daemon = FakeDaemon::new();
    let (client, mut conn) = connected(&daemon, DEFAULT_MAX_FRAME).await;
    let server = async {
        let Request { id, .. } = request(&mut conn).await;
        reply(&mut conn, id, Ok(Reply::Pong)).await;
    };
    let (saved, ()) = tokio::join!(client.save("s", "k", 3, Vec::new()), server);
    assert!(matches!(saved, Err(ClientError::Protocol(_))), "{saved:?}");
}

#[tokio::test]
async fn a_save_over_the_daemons_limit_fails_locally_and_the_connection_lives_on() {
    let daemon = FakeDaemon::new();
    let (client, mut conn) = connected(&daemon, 1000).await;
    let err = client
        .save("s", "k", 1, vec![0; 2000])
        .await
        .expect_err("too large");
    assert!(
        matches!(
            err,
            ClientError::Frame(FrameError::TooLarge { max: 1000, .. })
        ),
        "{err}"
    );
    let server = async {
        let Request { id, body } = request(&mut conn).await;
        assert_eq!(body, RequestBody::Ping, "the oversized save was never sent");
        reply(&mut conn, id, Ok(Reply::Pong)).await;
    };
    let (ping, ()) = tokio::join!(client.ping(), server);
    ping.expect("ping after the refused save");
}

#[tokio::test]
async fn the_load_deadline_is_sent_in_milliseconds() {
    let daemon = FakeDaemon::new();
    let (client, mut conn) = connected(&daemon, DEFAULT_MAX_FRAME).await;
    let options = LoadOptions {
        policy: LoadPolicy::Repeat,
        deadline: Some(Duration::from_micros(1500)),
    };
    let server = async {
        let Request { id, body } = request(&mut conn).await;
        reply(
            &mut conn,
            id,
            Err(Error::new(ErrorCode::Timeout, "deadline passed")),
        )
        .await;
        body
    };
    let (loaded, body) = tokio::join!(client.load_with("s", "k", options), server);
    assert_eq!(
        loaded.expect_err("timeout").code(),
        Some(&ErrorCode::Timeout)
    );
    assert_eq!(
        body,
        RequestBody::Load {
            store: "s".into(),
            key: "k".into(),
            policy: LoadPolicy::Repeat,
            deadline_ms: Some(2),
        }
    );
}

#[tokio::test]
async fn events_sent_right_behind_the_load_reach_the_profile() {
    let daemon = FakeDaemon::new();
    let (client, mut conn) = connected_with(&daemon, DEFAULT_MAX_FRAME, no_reconnect()).await;
    let thief = SessionId {
        place_id: 7,
        job_id: "thief".into(),
    };
    let server = async {
        let Request { id, .. } = request(&mut conn).await;
        // The response and the event leave in one write, so the client reads
        // them back to back.
        conn.feed(ServerFrame::Response(Response {
            id,
            result: Ok(Reply::Loaded(Loaded {
                epoch: 4,
                data: Some(b"old".to_vec()),
                meta: meta(),
                messages: Vec::new(),
            })),
        }))
        .await
        .expect("feed loaded");
        conn.feed(ServerFrame::Event(Event::ReleaseRequested {
            store: "s".into(),
            key: "k".into(),
            epoch: 4,
            requester: thief.clone(),
        }))
        .await
        .expect("feed event");
        conn.feed(ServerFrame::Event(Event::LeaseLost {
            store: "s".into(),
            key: "k".into(),
            epoch: 4,
            reason: LossReason::ForceLoadTimeout,
            new_owner: Some(thief.clone()),
        }))
        .await
        .expect("feed event");
        conn.flush().await.expect("flush");
    };
    let (profile, ()) = tokio::join!(client.load("s", "k", LoadPolicy::ForceLoad), server);
    let mut profile = profile.expect("load");
    assert_eq!(
        (profile.store(), profile.key(), profile.epoch()),
        ("s", "k", 4)
    );
    assert_eq!(profile.data(), Some(&b"old"[..]));
    assert_eq!(profile.meta(), &meta());
    assert_eq!(
        profile.next_event().await,
        Some(ProfileEvent::ReleaseRequested {
            requester: thief.clone()
        })
    );
    assert_eq!(
        profile.next_event().await,
        Some(ProfileEvent::LeaseLost {
            reason: LossReason::ForceLoadTimeout,
            new_owner: Some(thief)
        })
    );
    assert_eq!(profile.try_next_event(), None);

    // The daemon goes away and reconnecting is off: the stream ends and
    // requests fail.
    drop(conn);
    assert_eq!(profile.next_event().await, None);
    let saved = profile.save(Vec::new()).await;
    assert!(matches!(saved, Err(ClientError::Disconnected)), "{saved:?}");
}

#[tokio::test]
async fn releasing_a_profile_sends_its_epoch_and_data_and_ends_its_events() {
    let daemon = FakeDaemon::new();
    let (client, mut conn) = connected(&daemon, DEFAULT_MAX_FRAME).await;
    let (profile, ()) = tokio::join!(
        client.load("s", "k", LoadPolicy::Steal),
        serve_load(&mut conn, 9)
    );
    let mut profile = profile.expect("load");
    let server = async {
        let Request { id, body } = request(&mut conn).await;
        reply(&mut conn, id, Ok(Reply::Released { version: 5 })).await;
        body
    };
    let (released, body) = tokio::join!(client.release("s", "k", 9, Some(b"new".to_vec())), server);
    assert_eq!(released.expect("release"), 5);
    assert_eq!(
        body,
        RequestBody::Release {
            store: "s".into(),
            key: "k".into(),
            epoch: 9,
            data: Some(b"new".to_vec()),
            changes: Default::default(),
        }
    );
    assert_eq!(profile.next_event().await, None);
}

#[tokio::test]
async fn without_reconnecting_a_drop_fails_requests_in_flight_and_later() {
    let daemon = FakeDaemon::new();
    let (client, mut conn) = connected_with(&daemon, DEFAULT_MAX_FRAME, no_reconnect()).await;
    let server = async {
        request(&mut conn).await;
        drop(conn);
    };
    let (ping, ()) = tokio::join!(client.ping(), server);
    assert!(matches!(ping, Err(ClientError::Disconnected)), "{ping:?}");
    let ping = client.ping().await;
    assert!(matches!(ping, Err(ClientError::Disconnected)), "{ping:?}");
}

#[tokio::test]
async fn a_malformed_frame_closes_the_connection_without_panicking() {
    let daemon = FakeDaemon::new();
    let (client, conn) = connected(&daemon, DEFAULT_MAX_FRAME).await;
    let mut stream = conn.into_inner();
    let server = async {
        // An eight-byte payload holding a `ShuttingDown` event cut short
        // of its deadline. (An unknown frame kind is not malformed: a
        // newer daemon may send one, and it is skipped.)
        stream
            .write_all(&[0, 0, 0, 8, 0, 0, 0, 3, 0, 0, 0, 2])
            .await
            .expect("write garbage");
    };
    let (ping, ()) = tokio::join!(client.ping(), server);
    assert!(matches!(ping, Err(ClientError::Disconnected)), "{ping:?}");
}

#[tokio::test]
async fn close_shuts_the_socket_while_profiles_still_hold_the_client() {
    let daemon = FakeDaemon::new();
    let (client, mut conn) = connected(&daemon, DEFAULT_MAX_FRAME).await;
    let (profile, ()) = tokio::join!(
        client.load("s", "k", LoadPolicy::ForceLoad),
        serve_load(&mut conn, 1)
    );
    let mut profile = profile.expect("load");
    client.close().await;
    expect_eof(&mut conn).await;
    assert_eq!(profile.next_event().await, None);
    let saved = profile.save(Vec::new()).await;
    assert!(matches!(saved, Err(ClientError::Disconnected)), "{saved:?}");
}

#[tokio::test]
async fn dropping_every_handle_closes_the_socket() {
    let daemon = FakeDaemon::new();
    let (client, mut conn) = connected(&daemon, DEFAULT_MAX_FRAME).await;
    let (profile, ()) = tokio::join!(
        client.load("s", "k", LoadPolicy::ForceLoad),
        serve_load(&mut conn, 1)
    );
    let profile = profile.expect("load");
    drop(client);
    drop(profile);
    expect_eof(&mut conn).await;
}

/// Loads `s/key` through `client`, granted by `conn` with `epoch`.
async fn load_held(client: &Client, conn: &mut Conn, key: &str, epoch: u64) -> crate::Profile {
    let (profile, ()) = tokio::join!(
        client.load("s", key, LoadPolicy::ForceLoad),
        serve_load(conn, epoch)
    );
    profile.expect("load")
}

/// Answers the next request, which must be a save, with `version`, and
/// returns what was asked.
async fn serve_save(conn: &mut Conn, version: u64) -> RequestBody {
    let Request { id, body } = request(conn).await;
    assert!(matches!(body, RequestBody::Save { .. }), "{body:?}");
    reply(conn, id, Ok(Reply::Saved { version })).await;
    body
}

/// Has the client load `s/k` (epoch 5), then drops the load future once the
/// grant has reached it but before it is read: the session holds a lease
/// nobody has a profile for.
async fn grant_nobody_reads(client: &Client, conn: &mut Conn) {
    let mut load = Box::pin(client.load("s", "k", LoadPolicy::ForceLoad));
    assert!(
        futures::poll!(&mut load).is_pending(),
        "the request is sent"
    );
    serve_load(conn, 5).await;
    // The answer is read once a later one is: the reader takes them in order.
    let (pinged, ()) = tokio::join!(client.ping(), serve_ping(conn));
    pinged.expect("ping");
    drop(load);
}

/// Answers the next request, which must be a ping.
async fn serve_ping(conn: &mut Conn) {
    let Request { id, body } = request(conn).await;
    assert_eq!(body, RequestBody::Ping);
    reply(conn, id, Ok(Reply::Pong)).await;
}

#[tokio::test]
async fn a_dropped_connection_is_resumed_and_listed_leases_keep_their_epochs() {
    let daemon = FakeDaemon::new();
    let (client, mut conn) = connected(&daemon, DEFAULT_MAX_FRAME).await;
    let mut kept = load_held(&client, &mut conn, "kept", 4).await;
    let mut expired = load_held(&client, &mut conn, "expired", 5).await;

    // The daemon drops the connection, and welcomes the reconnect with the
    // one lease it kept for the session.
    drop(conn);
    let mut conn = daemon.welcome_back(vec![held("kept", 4)]).await;

    let (saved, body) = tokio::join!(kept.save(b"new".to_vec()), serve_save(&mut conn, 2));
    assert_eq!(saved.expect("save under the resumed lease"), 2);
    assert_eq!(
        body,
        RequestBody::Save {
            store: "s".into(),
            key: "kept".into(),
            epoch: 4,
            data: b"new".to_vec(),
            changes: Default::default(),
        }
    );
    assert_eq!(kept.epoch(), 4);
    assert_eq!(
        kept.try_next_event(),
        None,
        "the resumed profile saw nothing"
    );

    assert_eq!(expired.next_event().await, Some(ProfileEvent::LeaseExpired));
    assert_eq!(expired.next_event().await, None);
    assert_eq!(client.welcome().leases, vec![held("kept", 4)]);
}

#[tokio::test]
async fn requests_made_while_disconnected_wait_for_the_reconnect() {
    let daemon = FakeDaemon::new();
    let (client, mut conn) = connected(&daemon, DEFAULT_MAX_FRAME).await;

    // A request in flight when the connection drops fails: whether the
    // daemon applied it is unknown, so it is not sent again.
    let server = async {
        request(&mut conn).await;
        drop(conn);
    };
    let (ping, ()) = tokio::join!(client.ping(), server);
    assert!(matches!(ping, Err(ClientError::Disconnected)), "{ping:?}");

    // The reconnect's hello has arrived, so the client knows the link is
    // down; a request made now waits for the welcome and then goes through.
    let mut conn = daemon.accept().await;
    let server = async {
        welcome(&mut conn, DEFAULT_MAX_FRAME, Vec::new()).await;
        serve_ping(&mut conn).await;
    };
    let (ping, ()) = tokio::join!(client.ping(), server);
    ping.expect("ping after the reconnect");
}

#[tokio::test]
async fn a_shutdown_notice_reaches_every_profile_and_the_client() {
    let daemon = FakeDaemon::new();
    let (client, mut conn) = connected(&daemon, DEFAULT_MAX_FRAME).await;
    let mut notice = client.shutdown_notice();
    assert_eq!(*notice.borrow(), None);
    let mut first = load_held(&client, &mut conn, "a", 1).await;
    let mut second = load_held(&client, &mut conn, "b", 1).await;

    conn.send(ServerFrame::Event(Event::ShuttingDown {
        deadline_ms: 60_000,
    }))
    .await
    .expect("send shutting down");
    let Some(ProfileEvent::ShuttingDown { deadline }) = first.next_event().await else {
        panic!("expected a shutdown notice");
    };
    assert!(deadline > Instant::now(), "the deadline is ahead");
    assert_eq!(
        second.next_event().await,
        Some(ProfileEvent::ShuttingDown { deadline })
    );
    notice
        .wait_for(Option::is_some)
        .await
        .expect("the notice stays open");
    assert_eq!(*notice.borrow(), Some(deadline));

    // Saves still go through until the deadline.
    let (saved, _) = tokio::join!(first.save(b"last".to_vec()), serve_save(&mut conn, 3));
    assert_eq!(saved.expect("save during shutdown"), 3);

    // A daemon that is running again clears the notice.
    drop(conn);
    let _conn = daemon.welcome_back(vec![held("a", 1), held("b", 1)]).await;
    notice
        .wait_for(Option::is_none)
        .await
        .expect("the notice stays open");
}

#[tokio::test]
async fn close_stops_a_reconnect_under_way() {
    let daemon = FakeDaemon::new();
    let (client, mut conn) = connected(&daemon, DEFAULT_MAX_FRAME).await;
    let mut profile = load_held(&client, &mut conn, "k", 1).await;

    // The connection drops and the client starts a handshake that the
    // daemon leaves unanswered.
    drop(conn);
    let mut conn = daemon.accept().await;
    assert!(matches!(next(&mut conn).await, ClientFrame::Hello(_)));

    client.close().await;
    expect_eof(&mut conn).await;
    assert_eq!(profile.next_event().await, None);
    let saved = profile.save(Vec::new()).await;
    assert!(matches!(saved, Err(ClientError::Disconnected)), "{saved:?}");
}

#[tokio::test]
async fn without_reconnecting_a_drop_ends_the_link_at_once() {
    let daemon = FakeDaemon::new();
    let (client, mut conn) = connected_with(&daemon, DEFAULT_MAX_FRAME, no_reconnect()).await;
    let mut profile = load_held(&client, &mut conn, "k", 1).await;
    drop(conn);
    assert_eq!(profile.next_event().await, None);
    let ping = client.ping().await;
    assert!(matches!(ping, Err(ClientError::Disconnected)), "{ping:?}");
}

#[tokio::test]
async fn reconnecting_gives_up_after_reconnect_for() {
    let daemon = FakeDaemon::new();
    let (client, mut conn) = connected(&daemon, DEFAULT_MAX_FRAME).await;
    let mut profile = load_held(&client, &mut conn, "k", 1).await;

    // The daemon is gone for good. With the clock paused, the runtime skips
    // ahead through the backoff once every task is waiting on it.
    tokio::time::pause();
    drop(conn);
    drop(daemon);
    let ping = client.ping().await;
    assert!(matches!(ping, Err(ClientError::Disconnected)), "{ping:?}");
    assert_eq!(profile.next_event().await, None);
}

#[tokio::test]
async fn a_refused_reconnect_ends_the_link_with_the_refusal() {
    let daemon = FakeDaemon::new();
    let (client, mut conn) = connected(&daemon, DEFAULT_MAX_FRAME).await;
    let mut profile = load_held(&client, &mut conn, "k", 1).await;

    drop(conn);
    let mut conn = daemon.accept().await;
    next(&mut conn).await;
    let code = ErrorCode::UnsupportedVersion {
        client: PROTOCOL_VERSION,
        daemon: PROTOCOL_VERSION + 1,
    };
    conn.send(ServerFrame::Refused(Error::new(code.clone(), "upgrade")))
        .await
        .expect("send refusal");

    assert_eq!(profile.next_event().await, None);
    for _ in 0..2 {
        let err = client.ping().await.expect_err("refused");
        assert!(matches!(err, ClientError::Refused(_)), "{err}");
        assert_eq!(err.code(), Some(&code));
    }
}

#[tokio::test]
async fn a_reconnect_refused_by_a_daemon_shutting_down_tries_again() {
    let daemon = FakeDaemon::new();
    let (client, conn) = connected(&daemon, DEFAULT_MAX_FRAME).await;
    drop(conn);
    let mut conn = daemon.accept().await;
    next(&mut conn).await;
    conn.send(ServerFrame::Refused(Error::new(
        ErrorCode::ShuttingDown,
        "stopping",
    )))
    .await
    .expect("send refusal");

    let mut conn = daemon.welcome_back(Vec::new()).await;
    let (ping, ()) = tokio::join!(client.ping(), serve_ping(&mut conn));
    ping.expect("ping after the second reconnect");
}

#[tokio::test]
async fn a_connection_ended_with_a_refusal_is_not_reconnected() {
    let daemon = FakeDaemon::new();
    let (client, mut conn) = connected(&daemon, DEFAULT_MAX_FRAME).await;
    let mut profile = load_held(&client, &mut conn, "k", 1).await;

    // What a daemon would send to the older connection of a session that a
    // newer connection took over.
    conn.send(ServerFrame::Refused(Error::new(
        ErrorCode::Superseded,
        "session taken over by a newer connection",
    )))
    .await
    .expect("send refusal");
    drop(conn);

    assert_eq!(profile.next_event().await, None);
    let err = client.ping().await.expect_err("ended");
    assert_eq!(err.code(), Some(&ErrorCode::Superseded));
}

#[tokio::test]
async fn a_connection_ended_for_a_bad_frame_is_reconnected() {
    let daemon = FakeDaemon::new();
    let (client, mut conn) = connected(&daemon, DEFAULT_MAX_FRAME).await;
    conn.send(ServerFrame::Refused(Error::new(
        ErrorCode::InvalidRequest,
        "malformed frame",
    )))
    .await
    .expect("send refusal");
    drop(conn);

    let mut conn = daemon.welcome_back(Vec::new()).await;
    let (ping, ()) = tokio::join!(client.ping(), serve_ping(&mut conn));
    ping.expect("ping after the reconnect");
}

/// The shutdown notice is a watch whose waiters learn that the client
/// closed, instead of waiting for a notice that can no longer come.
#[tokio::test]
async fn the_shutdown_notice_fails_its_waiters_once_the_client_closes() {
    let daemon = FakeDaemon::new();
    let (client, _conn) = connected(&daemon, DEFAULT_MAX_FRAME).await;
    let mut before = client.shutdown_notice();
    let waiter = tokio::spawn(async move { before.wait_for(Option::is_some).await.is_err() });
    let keep = client.clone();
    client.close().await;
    let failed = tokio::time::timeout(PROMPTLY, waiter)
        .await
        .expect("the waiter is woken")
        .expect("task");
    assert!(failed, "the waiter learns that no notice will come");
    let mut after = keep.shutdown_notice();
    assert!(
        tokio::time::timeout(PROMPTLY, after.wait_for(Option::is_some))
            .await
            .expect("answered at once")
            .is_err()
    );
}

/// A load future dropped after its answer arrived, but before it was read,
/// leaves the session holding a lease with no profile. The typed store's
/// next load of that key, refused `AlreadyLoaded`, gives it back and loads
/// again, as it does for a lease whose answer a dropped connection lost.
#[tokio::test]
async fn a_lease_whose_answer_was_never_read_is_given_back_by_the_next_load() {
    #[derive(Default, serde::Serialize, serde::Deserialize)]
    struct Coins {
        coins: u64,
    }
    let daemon = FakeDaemon::new();
    let (client, mut conn) = connected(&daemon, DEFAULT_MAX_FRAME).await;
    grant_nobody_reads(&client, &mut conn).await;

    let store = client.store::<Coins>("s");
    let script = async {
        let Request { id, body } = request(&mut conn).await;
        assert!(matches!(body, RequestBody::Load { .. }), "{body:?}");
        let refusal = Error::new(ErrorCode::AlreadyLoaded, "already loaded");
        reply(&mut conn, id, Err(refusal)).await;
        let Request { id, body } = request(&mut conn).await;
        assert!(
            matches!(
                body,
                RequestBody::Release {
                    epoch: 5,
                    data: None,
                    ..
                }
            ),
            "the orphaned lease is released: {body:?}"
        );
        reply(&mut conn, id, Ok(Reply::Released { version: 1 })).await;
        let Request { id, body } = request(&mut conn).await;
        assert!(matches!(body, RequestBody::Load { .. }), "{body:?}");
        reply(
            &mut conn,
            id,
            Ok(Reply::Loaded(Loaded {
                epoch: 6,
                data: None,
                meta: meta(),
                messages: Vec::new(),
            })),
        )
        .await;
    };
    let (loaded, ()) = tokio::join!(store.load("k", LoadPolicy::ForceLoad), script);
    assert_eq!(loaded.expect("loaded again").epoch(), 6);
}

/// A last save whose answer was lost with the connection may have landed;
/// its retry then finds the lease gone. The keeper looks at the stored data
/// before calling the save lost, and finds its own.
#[tokio::test]
async fn a_last_save_that_landed_before_a_reconnect_is_reported_as_saved() {
    #[derive(Default, serde::Serialize, serde::Deserialize)]
    struct Coins {
        coins: u64,
    }
    let daemon = FakeDaemon::new();
    let (client, mut conn) = connected(&daemon, DEFAULT_MAX_FRAME).await;
    let store = client.store::<Coins>("s").with_autosave(None);
    let serve = async {
        let Request { id, .. } = request(&mut conn).await;
        reply(
            &mut conn,
            id,
            Ok(Reply::Loaded(Loaded {
                epoch: 3,
                data: None,
                meta: meta(),
                messages: Vec::new(),
            })),
        )
        .await;
    };
    let (profile, ()) = tokio::join!(store.load("k", LoadPolicy::ForceLoad), serve);
    let profile = profile.expect("load");
    profile.update(|data| data.coins = 9);

    let script = async move {
        // The daemon applies the release, then the connection drops before
        // its answer is sent.
        let Request { body, .. } = request(&mut conn).await;
        let RequestBody::Release {
            data: Some(data),
            changes,
            ..
        } = body
        else {
            panic!("expected a release with data, got {body:?}");
        };
        let mut stored = meta();
        stored.meta_tags = changes.meta_tags.unwrap_or_default();
        stored.user_ids = changes.user_ids.unwrap_or_default();
        drop(conn);
        let mut conn = daemon.welcome_back(Vec::new()).await;
        let Request { id, body } = request(&mut conn).await;
        assert!(matches!(body, RequestBody::Release { .. }), "{body:?}");
        reply(
            &mut conn,
            id,
            Err(Error::new(ErrorCode::LeaseLost, "lease lost")),
        )
        .await;
        let Request { id, body } = request(&mut conn).await;
        assert!(matches!(body, RequestBody::View { .. }), "{body:?}");
        reply(
            &mut conn,
            id,
            Ok(Reply::Viewed(profiled_protocol::ProfileView {
                version: 4,
                saved_at_ms: 0,
                data: Some(data),
                meta: stored,
                messages: Vec::new(),
            })),
        )
        .await;
        conn
    };
    let (released, _conn) = tokio::join!(profile.release(), script);
    assert_eq!(released.expect("the last save landed"), 4);
}

/// The messages that follow a grant as events may reach a load future that
/// was dropped with its answer unread: the lease is handed back then, as
/// the orphan it is, rather than its route being forgotten.
#[tokio::test]
async fn an_event_for_a_grant_nobody_read_hands_the_lease_back() {
    let daemon = FakeDaemon::new();
    let (client, mut conn) = connected(&daemon, DEFAULT_MAX_FRAME).await;
    grant_nobody_reads(&client, &mut conn).await;
    conn.send(ServerFrame::Event(Event::Message {
        store: "s".into(),
        key: "k".into(),
        epoch: 5,
        message: profiled_protocol::Message {
            id: 1,
            sent_at_ms: 0,
            payload: b"gift".to_vec(),
        },
    }))
    .await
    .expect("send the message");
    let Request { body, .. } = request(&mut conn).await;
    assert!(
        matches!(
            body,
            RequestBody::Release {
                epoch: 5,
                data: None,
                ..
            }
        ),
        "the orphaned lease is released: {body:?}"
    );
}

/// What a newer daemon may send that this client does not know: a frame
/// and an event of new kinds are skipped, a reply of a new kind fails its
/// request alone, and a new error code or loss reason arrives as
/// `Unknown` with the rest of its message. The connection carries on
/// throughout, so no reconnect is needed (and none is allowed here).
#[tokio::test]
async fn what_a_newer_daemon_appended_is_skipped_or_named_and_the_connection_lives_on() {
    /// Writes one frame of these already-encoded fields, as a newer daemon
    /// would encode what this build does not know.
    async fn send_raw(conn: &mut Conn, fields: &[&[u8]]) {
        let payload = fields.concat();
        let len = u32::try_from(payload.len()).expect("small");
        let stream = conn.get_mut();
        stream.write_all(&len.to_be_bytes()).await.expect("write");
        stream.write_all(&payload).await.expect("write");
    }
    fn string(text: &str) -> Vec<u8> {
        let mut bytes = (text.len() as u64).to_be_bytes().to_vec();
        bytes.extend_from_slice(text.as_bytes());
        bytes
    }

    let daemon = FakeDaemon::new();
    let (client, mut conn) = connected_with(&daemon, DEFAULT_MAX_FRAME, no_reconnect()).await;
    let mut profile = load_held(&client, &mut conn, "k", 5).await;

    // A frame kind and an event kind from the future, each with a body.
    send_raw(&mut conn, &[&ServerFrame::KINDS.to_be_bytes(), b"body"]).await;
    send_raw(
        &mut conn,
        &[&3u32.to_be_bytes(), &Event::KINDS.to_be_bytes(), b"body"],
    )
    .await;

    // A ping answered with a reply kind from the future fails alone.
    let serve_unknown_reply = async {
        let Request { id, .. } = request(&mut conn).await;
        let kind = Reply::KINDS + 1;
        send_raw(
            &mut conn,
            &[
                &2u32.to_be_bytes(),
                &id.to_be_bytes(),
                &0u32.to_be_bytes(),
                &kind.to_be_bytes(),
                b"body",
            ],
        )
        .await;
    };
    let (pinged, ()) = tokio::join!(client.ping(), serve_unknown_reply);
    let err = pinged.expect_err("an unreadable reply");
    assert!(
        matches!(&err, ClientError::Protocol(message) if message.contains(&format!("reply kind {}", Reply::KINDS + 1))),
        "{err:?}"
    );

    // A ping refused with an error code from the future keeps its message.
    let serve_unknown_code = async {
        let Request { id, .. } = request(&mut conn).await;
        let code = ErrorCode::KINDS + 4;
        send_raw(
            &mut conn,
            &[
                &2u32.to_be_bytes(),
                &id.to_be_bytes(),
                &1u32.to_be_bytes(),
                &code.to_be_bytes(),
                &string("try later"),
            ],
        )
        .await;
    };
    let (pinged, ()) = tokio::join!(client.ping(), serve_unknown_code);
    let err = pinged.expect_err("a refusal");
    assert_eq!(err.code(), Some(&ErrorCode::Unknown(ErrorCode::KINDS + 4)));
    assert!(
        matches!(&err, ClientError::Daemon(e) if e.message == "try later"),
        "{err:?}"
    );

    // The lease is lost for a reason from the future: the profile hears of
    // it, with the new owner that follows the reason.
    send_raw(
        &mut conn,
        &[
            &3u32.to_be_bytes(),
            &1u32.to_be_bytes(),
            &string("s"),
            &string("k"),
            &5u64.to_be_bytes(),
            &LossReason::KINDS.to_be_bytes(),
            &[1],
            &7u64.to_be_bytes(),
            &string("thief"),
        ],
    )
    .await;
    assert_eq!(
        tokio::time::timeout(PROMPTLY, profile.next_event())
            .await
            .expect("in time"),
        Some(ProfileEvent::LeaseLost {
            reason: LossReason::Unknown(LossReason::KINDS),
            new_owner: Some(SessionId {
                place_id: 7,
                job_id: "thief".into(),
            }),
        })
    );
    assert_eq!(
        profile.try_next_event(),
        None,
        "the skipped event reached nobody"
    );

    let (pinged, ()) = tokio::join!(client.ping(), serve_ping(&mut conn));
    pinged.expect("the same connection still answers");
}
