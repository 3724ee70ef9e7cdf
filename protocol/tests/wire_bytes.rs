//! Pins the wire format: every message is encoded and compared with the
//! bytes the crate docs promise. A failure here means the protocol changed;
//! if that was intended, bump `PROTOCOL_VERSION` and update the docs.

use std::collections::BTreeMap;

use profiled_protocol::{
    ActiveSession, Changes, ClientFrame, DaemonStatus, Error, ErrorCode, Event, ExportPage,
    ExportedProfile, HeldLease, Hello, LoadPolicy, Loaded, LossReason, Message, Metric,
    OverwriteSource, ProfileMeta, ProfileView, Reply, Request, RequestBody, Response, Role,
    ServerFrame, SessionId, SessionInfo, VersionInfo, VersionQuery, Welcome, decode_payload,
    encode_frame,
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
        changes: Changes {
            meta_tags: Some(BTreeMap::from([("t".to_owned(), vec![0xcc])])),
            user_ids: Some(vec![9]),
            consumed_messages: vec![4, 5],
        },
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
            "01", // meta tags set
            "0000000000000001",
            s,
            "74",
            "0000000000000001",
            "cc",
            "01", // user ids set
            "0000000000000001",
            "0000000000000009",
            "0000000000000002", // two consumed messages
            "0000000000000004",
            "0000000000000005",
        ])
    );
    let release = request(RequestBody::Release {
        store: "s".into(),
        key: "k".into(),
        epoch: 3,
        data: None,
        changes: Changes::default(),
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
            "00",               // no meta tags
            "00",               // no user ids
            "0000000000000000", // no consumed messages
        ])
    );
    let release_with_data = request(RequestBody::Release {
        store: "s".into(),
        key: "k".into(),
        epoch: 3,
        data: Some(vec![1]),
        changes: Changes::default(),
    });
    assert!(hex(&release_with_data).ends_with("0100000000000000010100000000000000000000"));
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
                meta_tags: BTreeMap::new(),
                user_ids: vec![3],
            },
            messages: vec![Message {
                id: 1,
                sent_at_ms: 2,
                payload: vec![0xee],
            }],
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
            "0000000000000000", // no meta tags
            "0000000000000001", // one user id
            "0000000000000003",
            "0000000000000001", // one message
            "0000000000000001",
            "0000000000000002",
            "0000000000000001",
            "ee",
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
        (ErrorCode::NotFound, "0000000a".into()),
        (ErrorCode::Forbidden, "0000000b".into()),
        (
            ErrorCode::TooManyMessages { limit: 3 },
            "0000000c0000000000000003".into(),
        ),
        (
            ErrorCode::TooManyLoads { limit: 4 },
            "0000000d0000000000000004".into(),
        ),
        (ErrorCode::TooManyLeases, "0000000e".into()),
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
    let message = ServerFrame::Event(Event::Message {
        store: "s".into(),
        key: "k".into(),
        epoch: 4,
        message: Message {
            id: 6,
            sent_at_ms: 7,
            payload: vec![0xab],
        },
    });
    assert_eq!(
        hex(&message),
        bytes(&[
            "00000003",
            "00000003",
            s,
            "73",
            s,
            "6b",
            "0000000000000004",
            "0000000000000006",
            "0000000000000007",
            "0000000000000001",
            "ab",
        ])
    );
    for (reason, index) in [
        (LossReason::Overwritten, "00000002"),
        (LossReason::Wiped, "00000003"),
        (LossReason::Revoked, "00000004"),
    ] {
        let lost = ServerFrame::Event(Event::LeaseLost {
            store: "s".into(),
            key: "k".into(),
            epoch: 4,
            reason,
            new_owner: None,
        });
        assert!(hex(&lost).ends_with(&format!("{index}00")), "{reason:?}");
    }
}

/// The variant index of each request kind, and the bytes of its fields.
#[test]
fn lease_free_and_admin_requests() {
    let s = "0000000000000001";
    let sk = bytes(&[s, "73", s, "6b"]);
    let cases: Vec<(RequestBody, String)> = vec![
        (
            RequestBody::SendMessage {
                store: "s".into(),
                key: "k".into(),
                payload: vec![0x01],
            },
            bytes(&["00000004", &sk, s, "01"]),
        ),
        (
            RequestBody::View {
                store: "s".into(),
                key: "k".into(),
                version: Some(2),
            },
            bytes(&["00000005", &sk, "01", "0000000000000002"]),
        ),
        (
            RequestBody::ListVersions {
                store: "s".into(),
                key: "k".into(),
                query: VersionQuery {
                    newest_first: true,
                    from_ms: None,
                    to_ms: Some(9),
                    limit: 10,
                },
            },
            bytes(&[
                "00000006",
                &sk,
                "01",
                "00",
                "01",
                "0000000000000009",
                "0000000a",
            ]),
        ),
        (
            RequestBody::Overwrite {
                store: "s".into(),
                key: "k".into(),
                source: OverwriteSource::Data(vec![0x02]),
            },
            bytes(&["00000007", &sk, "00000000", s, "02"]),
        ),
        (
            RequestBody::Overwrite {
                store: "s".into(),
                key: "k".into(),
                source: OverwriteSource::Version(3),
            },
            bytes(&["00000007", &sk, "00000001", "0000000000000003"]),
        ),
        (
            RequestBody::Wipe {
                store: "s".into(),
                key: "k".into(),
            },
            bytes(&["00000008", &sk]),
        ),
        (RequestBody::Stats, "00000009".into()),
        (RequestBody::Status, "0000000a".into()),
        (RequestBody::Sessions, "0000000b".into()),
        (
            RequestBody::Revoke {
                store: "s".into(),
                key: "k".into(),
            },
            bytes(&["0000000c", &sk]),
        ),
        (
            RequestBody::AskRelease {
                store: "s".into(),
                key: "k".into(),
            },
            bytes(&["0000000d", &sk]),
        ),
        (
            RequestBody::Backup { path: "/b".into() },
            bytes(&["0000000e", "0000000000000002", "2f62"]),
        ),
        (
            RequestBody::Export {
                store: "s".into(),
                after: None,
                limit: 5,
            },
            bytes(&["0000000f", s, "73", "00", "00000005"]),
        ),
        (
            RequestBody::Import {
                store: "s".into(),
                profile: ExportedProfile {
                    key: "k".into(),
                    version: 1,
                    updated_at_ms: 2,
                    data: None,
                    meta_tags: BTreeMap::new(),
                    user_ids: vec![],
                },
            },
            bytes(&[
                "00000010",
                s,
                "73",
                s,
                "6b",
                "0000000000000001",
                "0000000000000002",
                "00",
                "0000000000000000",
                "0000000000000000",
            ]),
        ),
    ];
    for (body, expected) in cases {
        let frame = request(body.clone());
        assert_eq!(
            hex(&frame),
            bytes(&["00000001", "0000000000000007", &expected]),
            "{body:?}"
        );
    }
}

/// The variant index of each new reply kind, and the bytes of its fields.
#[test]
fn lease_free_and_admin_replies() {
    let s = "0000000000000001";
    let meta = ProfileMeta {
        created_at_ms: 1,
        updated_at_ms: 2,
        load_count: 3,
        version: 4,
        active: None,
        meta_tags: BTreeMap::new(),
        user_ids: vec![],
    };
    let meta_hex = bytes(&[
        "0000000000000001",
        "0000000000000002",
        "0000000000000003",
        "0000000000000004",
        "00",
        "0000000000000000",
        "0000000000000000",
    ]);
    let cases: Vec<(Reply, String)> = vec![
        (
            Reply::MessageSent { id: 3 },
            bytes(&["00000004", "0000000000000003"]),
        ),
        (
            Reply::Viewed(ProfileView {
                version: 4,
                saved_at_ms: 2,
                data: None,
                meta: meta.clone(),
                messages: vec![],
            }),
            bytes(&[
                "00000005",
                "0000000000000004",
                "0000000000000002",
                "00",
                &meta_hex,
                "0000000000000000",
            ]),
        ),
        (
            Reply::Versions(vec![VersionInfo {
                version: 4,
                saved_at_ms: 2,
                size: 16,
            }]),
            bytes(&[
                "00000006",
                "0000000000000001",
                "0000000000000004",
                "0000000000000002",
                "0000000000000010",
            ]),
        ),
        (
            Reply::Overwritten { version: 5 },
            bytes(&["00000007", "0000000000000005"]),
        ),
        (Reply::Wiped, "00000008".into()),
        (
            Reply::Stats(vec![Metric {
                name: "m".into(),
                labels: vec![("l".into(), "v".into())],
                value: 1.5,
            }]),
            bytes(&[
                "00000009",
                "0000000000000001",
                s,
                "6d",
                "0000000000000001",
                s,
                "6c",
                s,
                "76",
                "3ff8000000000000",
            ]),
        ),
        (
            Reply::Status(DaemonStatus {
                daemon_version: "1".into(),
                uptime_ms: 2,
                connections: 3,
                sessions: 4,
                leases_held: 5,
                queued_loads: 6,
                storage_bytes: 7,
            }),
            bytes(&[
                "0000000a",
                s,
                "31",
                "0000000000000002",
                "0000000000000003",
                "0000000000000004",
                "0000000000000005",
                "0000000000000006",
                "0000000000000007",
            ]),
        ),
        (
            Reply::Sessions(vec![SessionInfo {
                session: session(),
                connection_id: Some(8),
                leases: vec![],
            }]),
            bytes(&[
                "0000000b",
                "0000000000000001",
                &session_hex(),
                "01",
                "0000000000000008",
                "0000000000000000",
            ]),
        ),
        (Reply::Revoked { lease: None }, bytes(&["0000000c", "00"])),
        (
            Reply::ReleaseAsked { lease: None },
            bytes(&["0000000d", "00"]),
        ),
        (
            Reply::BackedUp {
                path: "/b".into(),
                bytes: 9,
            },
            bytes(&["0000000e", "0000000000000002", "2f62", "0000000000000009"]),
        ),
        (
            Reply::Exported(ExportPage {
                profiles: vec![],
                next: Some("k".into()),
            }),
            bytes(&["0000000f", "0000000000000000", "01", s, "6b"]),
        ),
    ];
    for (reply, expected) in cases {
        let frame = ServerFrame::Response(Response {
            id: 7,
            result: Ok(reply.clone()),
        });
        assert_eq!(
            hex(&frame),
            bytes(&["00000002", "0000000000000007", "00000000", &expected]),
            "{reply:?}"
        );
    }
}
