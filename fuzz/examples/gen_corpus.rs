//! Writes the seed corpus: valid frames of several request kinds.
//!
//! `cargo run --manifest-path fuzz/Cargo.toml --example gen_corpus` from the
//! repository root rewrites `fuzz/corpus/{client_frame,frame_decoder}/seed-*`.

use std::collections::BTreeMap;
use std::path::Path;

use profiled_protocol::{
    Changes, ClientFrame, ExportedProfile, Hello, LoadPolicy, OverwriteSource, PROTOCOL_VERSION,
    Request, RequestBody, Role, SessionId, VersionQuery, encode_frame, encode_payload,
};

fn request(id: u64, body: RequestBody) -> ClientFrame {
    ClientFrame::Request(Request { id, body })
}

fn frames() -> Vec<(&'static str, ClientFrame)> {
    let store = || "PlayerData".to_owned();
    let key = || "Player_1".to_owned();
    let changes = Changes {
        meta_tags: Some(BTreeMap::from([("rank".to_owned(), b"gold".to_vec())])),
        user_ids: Some(vec![1, 2]),
        consumed_messages: vec![3],
    };
    vec![
        (
            "hello",
            ClientFrame::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                session: SessionId {
                    place_id: 1,
                    job_id: "job-1".into(),
                },
                role: Role::Game,
            }),
        ),
        ("ping", request(7, RequestBody::Ping)),
        (
            "load",
            request(
                1,
                RequestBody::Load {
                    store: store(),
                    key: key(),
                    policy: LoadPolicy::Steal,
                    deadline_ms: Some(500),
                },
            ),
        ),
        (
            "save",
            request(
                2,
                RequestBody::Save {
                    store: store(),
                    key: key(),
                    epoch: 3,
                    data: b"coins=10".to_vec(),
                    changes: changes.clone(),
                },
            ),
        ),
        (
            "release",
            request(
                3,
                RequestBody::Release {
                    store: store(),
                    key: key(),
                    epoch: 3,
                    data: None,
                    changes: Changes::default(),
                },
            ),
        ),
        (
            "send_message",
            request(
                4,
                RequestBody::SendMessage {
                    store: store(),
                    key: key(),
                    payload: b"gift".to_vec(),
                },
            ),
        ),
        (
            "list_versions",
            request(
                5,
                RequestBody::ListVersions {
                    store: store(),
                    key: key(),
                    query: VersionQuery {
                        newest_first: true,
                        from_ms: Some(1),
                        to_ms: None,
                        limit: 10,
                    },
                },
            ),
        ),
        (
            "overwrite",
            request(
                6,
                RequestBody::Overwrite {
                    store: store(),
                    key: key(),
                    source: OverwriteSource::Version(2),
                },
            ),
        ),
        (
            "import",
            request(
                8,
                RequestBody::Import {
                    store: store(),
                    profile: ExportedProfile {
                        key: key(),
                        version: 4,
                        updated_at_ms: 1_700_000_000_000,
                        data: Some(b"x".to_vec()),
                        meta_tags: BTreeMap::from([("a".to_owned(), vec![1])]),
                        user_ids: vec![9],
                    },
                },
            ),
        ),
    ]
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let payloads = root.join("client_frame");
    let streams = root.join("frame_decoder");
    std::fs::create_dir_all(&payloads).expect("create corpus/client_frame");
    std::fs::create_dir_all(&streams).expect("create corpus/frame_decoder");
    let frames = frames();
    let mut conversation = vec![3u8, 0x5a];
    for (name, frame) in &frames {
        let payload = encode_payload(frame).expect("encode payload");
        std::fs::write(payloads.join(format!("seed-{name}")), payload).expect("write seed");
        let bytes = encode_frame(frame).expect("encode frame");
        // Limit index 3 (64 KiB) and a chunking seed, then the frame.
        let mut stream = vec![3u8, name.len() as u8];
        stream.extend_from_slice(&bytes);
        std::fs::write(streams.join(format!("seed-{name}")), stream).expect("write seed");
        conversation.extend_from_slice(&bytes);
    }
    // A whole conversation in one stream, and one under a 100-byte limit
    // whose later frames are over it.
    std::fs::write(streams.join("seed-conversation"), &conversation).expect("write seed");
    conversation[0] = 1;
    std::fs::write(streams.join("seed-conversation-small-limit"), &conversation)
        .expect("write seed");
    println!(
        "wrote {} seeds per target under {}",
        frames.len(),
        root.display()
    );
}
