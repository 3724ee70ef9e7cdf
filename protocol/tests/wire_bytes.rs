//! Pins the wire format: every message is encoded and compared with the
//! bytes the crate docs promise. A failure here means the protocol changed;
//! if that was intended, bump `PROTOCOL_VERSION` and update the docs.

use profiled_protocol::{
    ActiveSession, ClientFrame, Error, ErrorCode, Event, HeldLease, Hello, LoadPolicy, Loaded,
    LossReason, ProfileMeta, Reply, Request, RequestBody, Response, Role, ServerFrame, SessionId,
    Welcome, decode_payload, encode_frame,
};

fn session() -> SessionId {
    SessionId {
        place_id: 0x0102,
        job_id: "j".to_owned(),
    }
}

/// Hex of `frame`'s full encoding, with its length prefix checked.
fn hex<T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(
    frame: &T,
) -> String {
    let bytes = encode_frame(frame).expect("encode");
    let (prefix, payload) = bytes.split_at(4);
    assert_eq!(
        u32::from_be_bytes(prefix.try_into().expect("4 bytes")) as usize,
        payload.len(),
        "the prefix counts the payload"
    );
    assert_eq!(
        &decode_payload::<T>(payload).expect("decode"),
        frame,
        "round trip"
    );
    payload.iter().map(|b| format!("{b:02x}")).collect()
}

/// Joins the expected pieces, so each field reads on its own.
fn bytes(parts: &[&str]) -> String {
    parts.concat()
}

const SESSION: &str = "0000000000000102" /* place_id */;
const JOB: &str = "0000000000000001" /* len */;

fn session_hex() -> String {
    bytes(&[SESSION, JOB, "6a"])
}

fn request(body: RequestBody) -> ClientFrame {
    ClientFrame::Request(Request { id: 7, body })
}

#[test]
fn the_ping_example_in_the_docs() {
    let bytes = encode_frame(&request(RequestBody::Ping)).expect("encode");
    assert_eq!(
        bytes,
        [0, 0, 0, 16, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 3]
    );
}

#[test]
fn hello() {
    let frame = ClientFrame::Hello(Hello {
        protocol_version: 1,
        session: session(),
        role: Role::Admin,
    });
    assert_eq!(
        hex(&frame),
        bytes(&["00000000", "00000001", &session_hex(), "00000001"])
    );
}

#[test]
fn requests() {
    let s = "0000000000000001" /* len 1 */;
    let load = request(RequestBody::Load {
        store: "s".into(),
        key: "k".into(),
        policy: LoadPolicy::Repeat,
        deadline_ms: Some(500),
    });
    assert_eq!(
        hex(&load),
        bytes(&[
            "00000001",
            "0000000000000007",
            "00000000",
            s,
            "73",
            s,
            "6b",
            "00000002",
            "01",
            "00000000000001f4",
        ])
    );
    let save = request(RequestBody::Save {
        store: "s".into(),
        key: "k".into(),
        epoch: 3,
        data: vec![0xaa, 0xbb],
    });
    assert_eq!(
        hex(&save),
        bytes(&[
            "00000001",
            "0000000000000007",
            "00000001",
            s,
            "73",
            s,
            "6b",
            "0000000000000003",
            "0000000000000002",
            "aabb",
        ])
    );
    let release = request(RequestBody::Release {
        store: "s".into(),
        key: "k".into(),
        epoch: 3,
        data: None,
    });
    assert_eq!(
        hex(&release),
        bytes(&[
            "00000001",
            "0000000000000007",
            "00000002",
            s,
            "73",
            s,
            "6b",
            "0000000000000003",
            "00",
        ])
    );
    let release_with_data = request(RequestBody::Release {
        store: "s".into(),
        key: "k".into(),
        epoch: 3,
        data: Some(vec![1]),
    });
    assert!(hex(&release_with_data).ends_with("01000000000000000101"));
    for (policy, index) in [
        (LoadPolicy::ForceLoad, 0u32),
        (LoadPolicy::Steal, 1),
        (LoadPolicy::Repeat, 2),
        (LoadPolicy::Cancel, 3),
    ] {
        let load = request(RequestBody::Load {
            store: "s".into(),
            key: "k".into(),
            policy,
            deadline_ms: None,
        });
        assert!(
            hex(&load).ends_with(&format!("{index:08x}00")),
            "{policy:?}"
        );
    }
}

#[test]
fn welcome_and_refusal() {
    let welcome = ServerFrame::Welcome(Welcome {
        daemon_version: "0.1".into(),
        protocol_version: 1,
        max_frame: 4096,
        connection_id: 9,
        leases: vec![HeldLease {
            store: "s".into(),
            key: "k".into(),
            epoch: 5,
        }],
    });
    assert_eq!(
        hex(&welcome),
        bytes(&[
            "00000000",
            "0000000000000003",
            "302e31",
            "00000001",
            "00001000",
            "0000000000000009",
            "0000000000000001", // one lease
            "0000000000000001",
            "73",
            "0000000000000001",
            "6b",
            "0000000000000005",
        ])
    );
    let refused = ServerFrame::Refused(Error::new(
        ErrorCode::UnsupportedVersion {
            client: 2,
            daemon: 1,
        },
        "v",
    ));
    assert_eq!(
        hex(&refused),
        bytes(&[
            "00000001",
            "00000000",
            "00000002",
            "00000001",
            "0000000000000001",
            "76"
        ])
    );
}

#[test]
fn responses() {
    let loaded = ServerFrame::Response(Response {
        id: 7,
        result: Ok(Reply::Loaded(Loaded {
            epoch: 2,
            data: Some(vec![0x01]),
            meta: ProfileMeta {
                created_at_ms: 10,
                updated_at_ms: 11,
                load_count: 12,
                version: 13,
                active: Some(ActiveSession {
                    session: session(),
                    epoch: 2,
                    since_ms: 14,
                }),
            },
        })),
    });
    assert_eq!(
        hex(&loaded),
        bytes(&[
            "00000002",
            "0000000000000007",
            "00000000", // Ok
            "00000000", // Reply::Loaded
            "0000000000000002",
            "01",
            "0000000000000001",
            "01",
            "000000000000000a",
            "000000000000000b",
            "000000000000000c",
            "000000000000000d",
            "01",
            &session_hex(),
            "0000000000000002",
            "000000000000000e",
        ])
    );
    let saved = ServerFrame::Response(Response {
        id: 7,
        result: Ok(Reply::Saved { version: 5 }),
    });
    assert_eq!(
        hex(&saved),
        bytes(&[
            "00000002",
            "0000000000000007",
            "00000000",
            "00000001",
            "0000000000000005"
        ])
    );
    let released = ServerFrame::Response(Response {
        id: 7,
        result: Ok(Reply::Released { version: 5 }),
    });
    assert!(hex(&released).ends_with("000000020000000000000005"));
    let pong = ServerFrame::Response(Response {
        id: 7,
        result: Ok(Reply::Pong),
    });
    assert_eq!(
        hex(&pong),
        bytes(&["00000002", "0000000000000007", "00000000", "00000003"])
    );
}

#[test]
fn error_codes() {
    let cases: Vec<(ErrorCode, String)> = vec![
        (
            ErrorCode::UnsupportedVersion {
                client: 2,
                daemon: 1,
            },
            "000000000000000200000001".into(),
        ),
        (ErrorCode::InvalidRequest, "00000001".into()),
        (ErrorCode::TooLarge, "00000002".into()),
        (ErrorCode::AlreadyLoaded, "00000003".into()),
        (
            ErrorCode::Taken { owner: session() },
            format!("00000004{}", session_hex()),
        ),
        (ErrorCode::LeaseLost, "00000005".into()),
        (ErrorCode::Superseded, "00000006".into()),
        (ErrorCode::Timeout, "00000007".into()),
        (ErrorCode::ShuttingDown, "00000008".into()),
        (ErrorCode::Storage, "00000009".into()),
    ];
    for (code, expected) in cases {
        let frame = ServerFrame::Response(Response {
            id: 7,
            result: Err(Error::new(code.clone(), "m")),
        });
        assert_eq!(
            hex(&frame),
            bytes(&[
                "00000002",
                "0000000000000007",
                "00000001", // Err
                &expected,
                "0000000000000001",
                "6d",
            ]),
            "{code:?}"
        );
    }
}

#[test]
fn events() {
    let s = "0000000000000001";
    let requested = ServerFrame::Event(Event::ReleaseRequested {
        store: "s".into(),
        key: "k".into(),
        epoch: 4,
        requester: session(),
    });
    assert_eq!(
        hex(&requested),
        bytes(&[
            "00000003",
            "00000000",
            s,
            "73",
            s,
            "6b",
            "0000000000000004",
            &session_hex(),
        ])
    );
    let lost = ServerFrame::Event(Event::LeaseLost {
        store: "s".into(),
        key: "k".into(),
        epoch: 4,
        reason: LossReason::ForceLoadTimeout,
        new_owner: None,
    });
    assert_eq!(
        hex(&lost),
        bytes(&[
            "00000003",
            "00000001",
            s,
            "73",
            s,
            "6b",
            "0000000000000004",
            "00000001",
            "00",
        ])
    );
    let stolen = ServerFrame::Event(Event::LeaseLost {
        store: "s".into(),
        key: "k".into(),
        epoch: 4,
        reason: LossReason::Stolen,
        new_owner: Some(session()),
    });
    assert!(hex(&stolen).ends_with(&format!("0000000001{}", session_hex())));
    let shutting_down = ServerFrame::Event(Event::ShuttingDown {
        deadline_ms: 10_000,
    });
    assert_eq!(
        hex(&shutting_down),
        bytes(&["00000003", "00000002", "0000000000002710"])
    );
}
