//! The `profilectl` binary against a real daemon: each test starts
//! `profiled` through the shared harness, prepares profiles with the game
//! client library, runs the CLI as a child process and checks its output,
//! its exit code and what the daemon did.
//!
//! The binary belongs to the `profiled-client` package, so Cargo gives no
//! `CARGO_BIN_EXE_` for it here; it is found next to the test executable,
//! where `cargo test --workspace` puts it.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::Daemon;
use profiled_client::{Changes, LoadPolicy, LossReason, ProfileEvent};

/// The most a test waits for the CLI or an event before failing instead of
/// hanging. Only a bound on failure; nothing asserts speed.
const PATIENCE: Duration = Duration::from_secs(30);

/// `{"gold": 5, "name": "ada"}` as MessagePack, as a game's typed layer
/// would save it.
const PACKED: &[u8] = &[
    0x82, 0xa4, b'g', b'o', b'l', b'd', 0x05, 0xa4, b'n', b'a', b'm', b'e', 0xa3, b'a', b'd', b'a',
];

/// Meta tags as [`seed`] takes them: names and values.
type Tags<'a> = &'a [(&'a str, &'a [u8])];

/// The built `profilectl`: `target/<profile>/profilectl`.
fn profilectl() -> PathBuf {
    common::built_binary("profilectl")
}

/// What one run of the CLI did.
#[derive(Debug)]
struct Run {
    /// The exit code; -1 if it was killed by a signal.
    code: i32,
    /// Stdout, raw.
    bytes: Vec<u8>,
    /// Stdout as text (lossy).
    stdout: String,
    /// Stderr as text (lossy).
    stderr: String,
}

impl Run {
    /// Fails the test with the output unless the exit code is `code`.
    #[track_caller]
    fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code, code,
            "profilectl exited {} instead of {code}\nstdout: {}\nstderr: {}",
            self.code, self.stdout, self.stderr
        );
        self
    }

    /// Fails the test unless the run succeeded.
    #[track_caller]
    fn ok(&self) -> &Self {
        self.expect_code(0)
    }

    /// Stdout parsed as one JSON document.
    #[track_caller]
    fn json(&self) -> Json {
        Json::parse(&self.stdout)
            .unwrap_or_else(|err| panic!("stdout is not json ({err}): {}", self.stdout))
    }
}

/// Runs `profilectl --socket <daemon's> args...` with `stdin` as its
/// standard input (none: not a terminal, and empty).
async fn ctl_in(socket: &Path, args: &[&str], stdin: Option<Vec<u8>>, cwd: Option<&Path>) -> Run {
    let mut command = Command::new(profilectl());
    command
        .arg("--socket")
        .arg(socket)
        .args(args)
        .env_remove("PROFILED_SOCKET")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(cwd) = cwd {
        command.current_dir(cwd);
    }
    let task = tokio::task::spawn_blocking(move || {
        let mut child = command.spawn().expect("spawn profilectl");
        if let Some(input) = stdin {
            use std::io::Write;
            let mut pipe = child.stdin.take().expect("stdin pipe");
            pipe.write_all(&input).expect("write profilectl's stdin");
        }
        child.wait_with_output().expect("wait for profilectl")
    });
    let output = tokio::time::timeout(PATIENCE, task)
        .await
        .expect("profilectl did not finish in time")
        .expect("join");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        bytes: output.stdout,
    }
}

/// Runs the CLI against `daemon` with no stdin.
async fn ctl(daemon: &Daemon, args: &[&str]) -> Run {
    ctl_in(&daemon.socket(), args, None, None).await
}

/// Saves `data` (with meta tags and user ids) to `store`/`key` as game
/// session `job` and releases it.
async fn seed(
    daemon: &Daemon,
    job: &str,
    store: &str,
    key: &str,
    data: &[u8],
    tags: Tags<'_>,
    user_ids: &[u64],
) -> u64 {
    let client = daemon.client(job).await;
    let profile = client
        .load(store, key, LoadPolicy::ForceLoad)
        .await
        .expect("load");
    let changes = Changes {
        meta_tags: Some(
            tags.iter()
                .map(|(name, value)| ((*name).to_owned(), value.to_vec()))
                .collect(),
        ),
        user_ids: Some(user_ids.to_vec()),
        consumed_messages: Vec::new(),
    };
    let version = profile
        .release_with(Some(data.to_vec()), changes)
        .await
        .expect("release");
    client.close().await;
    version
}

/// Waits for the next event of a held profile.
async fn next_event(profile: &mut profiled_client::Profile) -> ProfileEvent {
    tokio::time::timeout(PATIENCE, profile.next_event())
        .await
        .expect("an event in time")
        .expect("the event stream is open")
}

#[tokio::test]
async fn status_prints_text_and_json() {
    let daemon = Daemon::start();
    let client = daemon.client("server-7").await;
    let _held = client
        .load("PlayerData", "Player_1", LoadPolicy::ForceLoad)
        .await
        .expect("load");

    let run = ctl(&daemon, &["status"]).await;
    run.ok();
    for label in [
        "daemon version",
        "uptime",
        "sessions",
        "leases held",
        "queued loads",
        "storage",
    ] {
        assert!(run.stdout.contains(label), "no {label:?} in {}", run.stdout);
    }

    for args in [&["--json", "status"][..], &["status", "--json"][..]] {
        let status = ctl(&daemon, args).await.ok().json();
        assert!(
            status.get("daemon_version").as_str().is_some(),
            "{status:?}"
        );
        assert_eq!(status.get("leases_held").as_u64(), Some(1));
        assert_eq!(status.get("queued_loads").as_u64(), Some(0));
        assert!(status.get("uptime_ms").as_u64().is_some());
        assert!(status.get("storage_bytes").as_u64().is_some());
    }
}

#[tokio::test]
async fn sessions_lists_each_session_with_its_leases() {
    let daemon = Daemon::start();
    let client = daemon.client("server-7").await;
    let _held = client
        .load("PlayerData", "Player_1", LoadPolicy::ForceLoad)
        .await
        .expect("load");

    let run = ctl(&daemon, &["sessions"]).await;
    run.ok();
    assert!(run.stdout.contains("1/server-7"), "{}", run.stdout);
    assert!(run.stdout.contains("PlayerData/Player_1"), "{}", run.stdout);

    let sessions = ctl(&daemon, &["sessions", "--json"]).await.ok().json();
    let game = sessions
        .items()
        .iter()
        .find(|s| s.get("job_id").as_str() == Some("server-7"))
        .expect("the game session is listed")
        .clone();
    let leases = game.get("leases").items();
    assert_eq!(leases.len(), 1);
    assert_eq!(leases[0].get("key").as_str(), Some("Player_1"));
}

#[tokio::test]
async fn view_shows_messagepack_and_json_data_as_json() {
    let daemon = Daemon::start();
    seed(
        &daemon,
        "server-7",
        "PlayerData",
        "Player_1",
        PACKED,
        &[("level", &b"7"[..])],
        &[42],
    )
    .await;
    let client = daemon.client("admin-test").await;
    client
        .send_message("PlayerData", "Player_1", br#"{"gift": "sword"}"#.to_vec())
        .await
        .expect("send");

    let run = ctl(&daemon, &["view", "PlayerData", "Player_1"]).await;
    run.ok();
    for needle in [
        "messagepack",
        "\"gold\": 5",
        "\"name\": \"ada\"",
        "42",
        "level",
        "1 pending",
        "sword",
    ] {
        assert!(
            run.stdout.contains(needle),
            "no {needle:?} in {}",
            run.stdout
        );
    }

    let view = ctl(&daemon, &["--json", "view", "PlayerData", "Player_1"])
        .await
        .ok()
        .json();
    assert_eq!(view.get("data_format").as_str(), Some("messagepack"));
    assert_eq!(view.get("data").get("gold").as_u64(), Some(5));
    assert_eq!(view.get("data").get("name").as_str(), Some("ada"));
    let meta = view.get("meta");
    assert_eq!(meta.get("user_ids").items()[0].as_u64(), Some(42));
    assert_eq!(meta.get("meta_tags").get("level").as_str(), Some("Nw=="));
    assert_eq!(meta.get("active"), &Json::Null);
    let messages = view.get("messages").items();
    assert_eq!(messages.len(), 1);
    assert_eq!(
        messages[0].get("payload").get("gift").as_str(),
        Some("sword")
    );

    let raw = ctl(&daemon, &["view", "PlayerData", "Player_1", "--raw"]).await;
    raw.ok();
    assert_eq!(raw.bytes, PACKED);

    seed(
        &daemon,
        "server-7",
        "PlayerData",
        "Player_2",
        br#"{"hp":10}"#,
        &[],
        &[],
    )
    .await;
    let run = ctl(&daemon, &["view", "PlayerData", "Player_2"]).await;
    run.ok();
    assert!(run.stdout.contains("\"hp\": 10"), "{}", run.stdout);
    let view = ctl(&daemon, &["view", "PlayerData", "Player_2", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(view.get("data_format").as_str(), Some("json"));
    assert_eq!(view.get("data").get("hp").as_u64(), Some(10));
}

#[tokio::test]
async fn versions_are_listed_and_rollback_restores_one() {
    let daemon = Daemon::start();
    // Every release is kept as a version, whatever `history.interval` is.
    let mut kept = Vec::new();
    for n in 1..=3 {
        let data = format!("{{\"n\":{n}}}");
        kept.push(
            seed(
                &daemon,
                "server-7",
                "PlayerData",
                "Player_1",
                data.as_bytes(),
                &[],
                &[],
            )
            .await,
        );
    }
    let [first, second, third] = kept[..] else {
        unreachable!("three versions were saved")
    };
    let client = daemon.client("admin-test").await;

    let run = ctl(&daemon, &["versions", "PlayerData", "Player_1"]).await;
    run.ok();
    assert!(run.stdout.contains("VERSION"), "{}", run.stdout);

    let versions = ctl(&daemon, &["--json", "versions", "PlayerData", "Player_1"])
        .await
        .ok()
        .json();
    let listed: Vec<u64> = versions
        .items()
        .iter()
        .filter_map(|v| v.get("version").as_u64())
        .collect();
    for version in [first, second, third] {
        assert!(listed.contains(&version), "{version} not in {listed:?}");
    }

    let newest = ctl(
        &daemon,
        &[
            "versions",
            "PlayerData",
            "Player_1",
            "--newest-first",
            "--limit",
            "1",
            "--json",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(newest.items().len(), 1);
    assert_eq!(newest.items()[0].get("version").as_u64(), Some(third));

    // Nothing was saved before 1970-01-01T00:00:01Z.
    let none = ctl(
        &daemon,
        &[
            "versions",
            "PlayerData",
            "Player_1",
            "--to",
            "1970-01-01T00:00:01Z",
            "--json",
        ],
    )
    .await
    .ok()
    .json();
    assert!(none.items().is_empty(), "{none:?}");

    let first_text = first.to_string();
    let run = ctl(
        &daemon,
        &["rollback", "PlayerData", "Player_1", "--to", &first_text],
    )
    .await;
    run.ok();
    let view = client
        .view("PlayerData", "Player_1", None)
        .await
        .expect("view");
    assert_eq!(view.data.as_deref(), Some(&br#"{"n":1}"#[..]));
    assert!(view.version > third, "a rollback is a new version");

    let old = ctl(
        &daemon,
        &[
            "view",
            "PlayerData",
            "Player_1",
            "--version",
            &second.to_string(),
            "--json",
        ],
    )
    .await
    .ok()
    .json();
    assert_eq!(old.get("data").get("n").as_u64(), Some(2));
}

#[tokio::test]
async fn wipe_needs_yes_without_a_terminal() {
    let daemon = Daemon::start();
    seed(
        &daemon,
        "server-7",
        "PlayerData",
        "Player_1",
        b"{}",
        &[],
        &[],
    )
    .await;

    let refused = ctl(&daemon, &["wipe", "PlayerData", "Player_1"]).await;
    refused.expect_code(2);
    assert!(
        refused.stderr.starts_with("profilectl: "),
        "{}",
        refused.stderr
    );
    assert!(refused.stderr.contains("--yes"), "{}", refused.stderr);
    ctl(&daemon, &["view", "PlayerData", "Player_1"]).await.ok();

    ctl(&daemon, &["wipe", "PlayerData", "Player_1", "--yes"])
        .await
        .ok();
    ctl(&daemon, &["view", "PlayerData", "Player_1"])
        .await
        .expect_code(4);
}

#[tokio::test]
async fn sent_json_reaches_the_holder_and_the_next_loader_as_messagepack() {
    let daemon = Daemon::start();
    let client = daemon.client("server-7").await;
    let mut profile = client
        .load("PlayerData", "Player_1", LoadPolicy::ForceLoad)
        .await
        .expect("load");

    let run = ctl(
        &daemon,
        &[
            "send",
            "PlayerData",
            "Player_1",
            "--json",
            r#"{"gift":"sword"}"#,
        ],
    )
    .await;
    run.ok();
    assert!(run.stdout.contains("sent message"), "{}", run.stdout);

    // {"gift": "sword"} as MessagePack.
    let expected = [&[0x81, 0xa4][..], b"gift", &[0xa5][..], b"sword"].concat();
    match next_event(&mut profile).await {
        ProfileEvent::Message(message) => assert_eq!(message.payload, expected),
        other => panic!("expected a message, got {other:?}"),
    }
    // Not consumed, so it stays pending for the next loader.
    profile.release(None).await.expect("release");
    let next = daemon
        .client("server-8")
        .await
        .load("PlayerData", "Player_1", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    assert_eq!(next.messages().len(), 1);
    assert_eq!(next.messages()[0].payload, expected);

    ctl(
        &daemon,
        &["send", "PlayerData", "Player_2", "--raw", "hello"],
    )
    .await
    .ok();
    ctl(
        &daemon,
        &["send", "PlayerData", "Player_2", "--json", "{not json"],
    )
    .await
    .expect_code(2);
}

#[tokio::test]
async fn steal_ends_the_lease_and_the_holder_is_told() {
    let daemon = Daemon::start();
    let client = daemon.client("server-7").await;
    let mut profile = client
        .load("PlayerData", "Player_1", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    profile.save(b"{}".to_vec()).await.expect("save");

    let run = ctl(&daemon, &["steal", "PlayerData", "Player_1"]).await;
    run.ok();
    assert!(run.stdout.contains("1/server-7"), "{}", run.stdout);
    match next_event(&mut profile).await {
        ProfileEvent::LeaseLost { reason, .. } => assert_eq!(reason, LossReason::Revoked),
        other => panic!("expected LeaseLost, got {other:?}"),
    }
    let err = profile.save(b"late".to_vec()).await.expect_err("fenced");
    assert_eq!(err.code(), Some(&profiled_client::ErrorCode::LeaseLost));

    let again = ctl(&daemon, &["steal", "PlayerData", "Player_1"]).await;
    again.ok();
    assert!(again.stdout.contains("not held"), "{}", again.stdout);
}

#[tokio::test]
async fn release_waits_for_a_cooperative_holder() {
    let daemon = Daemon::start();
    let client = daemon.client("server-7").await;
    let mut profile = client
        .load("PlayerData", "Player_1", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    let holder = tokio::spawn(async move {
        loop {
            match next_event(&mut profile).await {
                ProfileEvent::ReleaseRequested { .. } => {
                    return profile
                        .release(Some(b"{\"saved\":true}".to_vec()))
                        .await
                        .expect("release");
                }
                ProfileEvent::Message(_) => {}
                other => panic!("unexpected event {other:?}"),
            }
        }
    });

    let run = ctl(
        &daemon,
        &["release", "PlayerData", "Player_1", "--timeout", "20s"],
    )
    .await;
    run.ok();
    assert!(run.stdout.contains("released"), "{}", run.stdout);
    tokio::time::timeout(PATIENCE, holder)
        .await
        .expect("holder done")
        .expect("holder task");
    let view = client
        .view("PlayerData", "Player_1", None)
        .await
        .expect("view");
    assert_eq!(view.meta.active, None);
    assert_eq!(view.data.as_deref(), Some(&b"{\"saved\":true}"[..]));

    let free = ctl(&daemon, &["release", "PlayerData", "Player_1"]).await;
    free.ok();
    assert!(free.stdout.contains("not held"), "{}", free.stdout);
}

#[tokio::test]
async fn release_times_out_on_a_holder_that_ignores_it() {
    let daemon = Daemon::start();
    let client = daemon.client("server-7").await;
    let _stubborn = client
        .load("PlayerData", "Player_1", LoadPolicy::ForceLoad)
        .await
        .expect("load");

    let run = ctl(
        &daemon,
        &["release", "PlayerData", "Player_1", "--timeout", "300ms"],
    )
    .await;
    run.expect_code(3);
    assert!(run.stderr.contains("steal"), "{}", run.stderr);
}

#[tokio::test]
async fn a_backup_starts_a_second_daemon() {
    let daemon = Daemon::start();
    seed(
        &daemon,
        "server-7",
        "PlayerData",
        "Player_1",
        PACKED,
        &[],
        &[7],
    )
    .await;

    // A relative directory is the CLI's, not the daemon's.
    let run = ctl_in(
        &daemon.socket(),
        &["backup", "snapshot"],
        None,
        Some(daemon.dir()),
    )
    .await;
    run.ok();
    assert!(run.stdout.contains("backed up"), "{}", run.stdout);
    let backup = daemon.dir().join("snapshot");
    assert!(backup.is_dir(), "no backup at {}", backup.display());

    let exists = ctl_in(
        &daemon.socket(),
        &["backup", "snapshot"],
        None,
        Some(daemon.dir()),
    )
    .await;
    assert_ne!(
        exists.code, 0,
        "a backup over an existing directory must fail"
    );

    let second = Daemon::start_on_copy_of(&backup);
    let profile = second
        .client("server-8")
        .await
        .load("PlayerData", "Player_1", LoadPolicy::ForceLoad)
        .await
        .expect("load from the backup");
    assert_eq!(profile.data(), Some(PACKED));
    assert_eq!(profile.meta().user_ids, vec![7]);
}

#[tokio::test]
async fn export_then_import_copies_a_store() {
    let daemon = Daemon::start();
    let profiles: [(&str, &[u8], Tags<'_>, &[u64]); 3] = [
        ("Player_1", PACKED, &[("level", &b"7"[..])], &[1]),
        ("Player_2", &br#"{"hp":10}"#[..], &[], &[2, 3]),
        (
            "Player_3",
            &[0, 1, 2, 255][..],
            &[("a", &b""[..]), ("b", &[9][..])],
            &[],
        ),
    ];
    for (key, data, tags, ids) in profiles {
        seed(&daemon, "server-7", "Src", key, data, tags, ids).await;
    }

    let export = ctl(&daemon, &["export", "Src"]).await;
    export.ok();
    assert!(export.stderr.contains("exported 3"), "{}", export.stderr);
    let lines: Vec<Json> = export
        .stdout
        .lines()
        .map(|line| Json::parse(line).expect("each line is json"))
        .collect();
    assert_eq!(lines.len(), 3, "{}", export.stdout);
    assert_eq!(lines[0].get("store").as_str(), Some("Src"));
    assert_eq!(lines[0].get("key").as_str(), Some("Player_1"));

    let import = ctl_in(
        &daemon.socket(),
        &["import", "Dst"],
        Some(export.bytes.clone()),
        None,
    )
    .await;
    import.ok();
    assert!(import.stderr.contains("imported 3"), "{}", import.stderr);

    let client = daemon.client("admin-test").await;
    for (key, ..) in profiles {
        let src = client.view("Src", key, None).await.expect("view source");
        let dst = client.view("Dst", key, None).await.expect("view copy");
        assert_eq!(dst.data, src.data, "{key}");
        assert_eq!(dst.meta.meta_tags, src.meta.meta_tags, "{key}");
        assert_eq!(dst.meta.user_ids, src.meta.user_ids, "{key}");
    }

    // The first malformed line stops the import with EX_DATAERR.
    let mut input = export.stdout.lines().next().expect("a line").to_owned();
    input.push_str("\n{not json\n");
    let bad = ctl_in(
        &daemon.socket(),
        &["import", "Bad"],
        Some(input.into_bytes()),
        None,
    )
    .await;
    bad.expect_code(65);
    assert!(bad.stderr.contains("line 2"), "{}", bad.stderr);
    assert!(bad.stderr.contains("imported 1"), "{}", bad.stderr);
}

#[tokio::test]
async fn stats_are_sorted() {
    let daemon = Daemon::start();
    seed(
        &daemon,
        "server-7",
        "PlayerData",
        "Player_1",
        b"{}",
        &[],
        &[],
    )
    .await;

    let run = ctl(&daemon, &["stats"]).await;
    run.ok();
    let names: Vec<&str> = run
        .stdout
        .lines()
        .map(|line| {
            let (name, value) = line.rsplit_once(' ').expect("name and value");
            value.parse::<f64>().expect("a number");
            name
        })
        .collect();
    assert!(!names.is_empty(), "no metrics");
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(names, sorted);

    let metrics = ctl(&daemon, &["--json", "stats"]).await.ok().json();
    assert_eq!(metrics.items().len(), names.len());
    assert!(metrics.items()[0].get("name").as_str().is_some());
}

#[tokio::test]
async fn exit_codes_tell_failures_apart() {
    let daemon = Daemon::start();
    let missing = ctl(&daemon, &["view", "PlayerData", "Nobody"]).await;
    missing.expect_code(4);
    assert!(
        missing.stderr.starts_with("profilectl: "),
        "{}",
        missing.stderr
    );
    assert!(
        !missing.stderr.trim_end().ends_with('.'),
        "{}",
        missing.stderr
    );

    seed(
        &daemon,
        "server-7",
        "PlayerData",
        "Player_1",
        b"{}",
        &[],
        &[],
    )
    .await;
    ctl(
        &daemon,
        &["view", "PlayerData", "Player_1", "--version", "999999"],
    )
    .await
    .expect_code(4);

    let nowhere = daemon.dir().join("no-such.sock");
    let down = ctl_in(&nowhere, &["status"], None, None).await;
    down.expect_code(69);
    assert!(
        down.stderr.starts_with("profilectl: cannot connect"),
        "{}",
        down.stderr
    );

    ctl(&daemon, &["no-such-command"]).await.expect_code(2);
    let help = ctl(&daemon, &["--help"]).await;
    help.ok();
    assert!(help.stdout.contains("Exit codes"), "{}", help.stdout);
}

/// A JSON value, parsed by the few lines below so these tests need no JSON
/// crate of their own.
#[derive(Debug, Clone, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Number(f64),
    String(String),
    Array(Vec<Json>),
    Object(BTreeMap<String, Json>),
}

/// Stands in for a missing member, so lookups chain.
static NULL: Json = Json::Null;

impl Json {
    fn parse(text: &str) -> Result<Json, String> {
        let mut parser = Parser {
            chars: text.chars().collect(),
            at: 0,
        };
        let value = parser.value()?;
        parser.space();
        if parser.at == parser.chars.len() {
            Ok(value)
        } else {
            Err(format!("trailing characters at {}", parser.at))
        }
    }

    /// The member `name`, or null.
    fn get(&self, name: &str) -> &Json {
        match self {
            Json::Object(map) => map.get(name).unwrap_or(&NULL),
            _ => &NULL,
        }
    }

    /// The items of an array; empty for anything else.
    fn items(&self) -> &[Json] {
        match self {
            Json::Array(items) => items,
            _ => &[],
        }
    }

    fn as_str(&self) -> Option<&str> {
        match self {
            Json::String(text) => Some(text),
            _ => None,
        }
    }

    fn as_u64(&self) -> Option<u64> {
        match self {
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            Json::Number(n) if *n >= 0.0 && n.fract() == 0.0 => Some(*n as u64),
            _ => None,
        }
    }
}

/// A recursive-descent JSON parser over characters.
struct Parser {
    chars: Vec<char>,
    at: usize,
}

impl Parser {
    fn space(&mut self) {
        while self.chars.get(self.at).is_some_and(|c| c.is_whitespace()) {
            self.at += 1;
        }
    }

    fn eat(&mut self, c: char) -> Result<(), String> {
        self.space();
        if self.chars.get(self.at) == Some(&c) {
            self.at += 1;
            Ok(())
        } else {
            Err(format!("expected {c:?} at {}", self.at))
        }
    }

    fn literal(&mut self, word: &str, value: Json) -> Result<Json, String> {
        for c in word.chars() {
            self.eat(c)?;
        }
        Ok(value)
    }

    fn value(&mut self) -> Result<Json, String> {
        self.space();
        match self.chars.get(self.at) {
            Some('n') => self.literal("null", Json::Null),
            Some('t') => self.literal("true", Json::Bool(true)),
            Some('f') => self.literal("false", Json::Bool(false)),
            Some('"') => self.string().map(Json::String),
            Some('[') => {
                self.at += 1;
                let mut items = Vec::new();
                self.space();
                if self.chars.get(self.at) == Some(&']') {
                    self.at += 1;
                    return Ok(Json::Array(items));
                }
                loop {
                    items.push(self.value()?);
                    self.space();
                    match self.chars.get(self.at) {
                        Some(',') => self.at += 1,
                        Some(']') => {
                            self.at += 1;
                            return Ok(Json::Array(items));
                        }
                        _ => return Err(format!("expected , or ] at {}", self.at)),
                    }
                }
            }
            Some('{') => {
                self.at += 1;
                let mut map = BTreeMap::new();
                self.space();
                if self.chars.get(self.at) == Some(&'}') {
                    self.at += 1;
                    return Ok(Json::Object(map));
                }
                loop {
                    self.space();
                    let name = self.string()?;
                    self.eat(':')?;
                    map.insert(name, self.value()?);
                    self.space();
                    match self.chars.get(self.at) {
                        Some(',') => self.at += 1,
                        Some('}') => {
                            self.at += 1;
                            return Ok(Json::Object(map));
                        }
                        _ => return Err(format!("expected , or }} at {}", self.at)),
                    }
                }
            }
            _ => {
                let start = self.at;
                while self
                    .chars
                    .get(self.at)
                    .is_some_and(|c| c.is_ascii_digit() || "+-.eE".contains(*c))
                {
                    self.at += 1;
                }
                let text: String = self.chars[start..self.at].iter().collect();
                text.parse()
                    .map(Json::Number)
                    .map_err(|_| format!("bad value at {start}"))
            }
        }
    }

    fn string(&mut self) -> Result<String, String> {
        self.eat('"')?;
        let mut text = String::new();
        loop {
            let c = *self.chars.get(self.at).ok_or("unterminated string")?;
            self.at += 1;
            match c {
                '"' => return Ok(text),
                '\\' => {
                    let escaped = *self.chars.get(self.at).ok_or("unterminated escape")?;
                    self.at += 1;
                    text.push(match escaped {
                        'n' => '\n',
                        't' => '\t',
                        'r' => '\r',
                        'b' => '\u{8}',
                        'f' => '\u{c}',
                        'u' => {
                            let hex: String = self
                                .chars
                                .get(self.at..self.at + 4)
                                .ok_or("short \\u")?
                                .iter()
                                .collect();
                            self.at += 4;
                            let code = u32::from_str_radix(&hex, 16).map_err(|e| e.to_string())?;
                            char::from_u32(code).unwrap_or('\u{fffd}')
                        }
                        other => other,
                    });
                }
                other => text.push(other),
            }
        }
    }
}

#[tokio::test]
async fn a_reader_that_goes_away_ends_the_output_quietly() {
    let daemon = Daemon::start();
    let game = daemon.client("game").await;
    let profile = game
        .load("PlayerData", "p", profiled_client::LoadPolicy::ForceLoad)
        .await
        .expect("load");
    profile
        .release(Some(b"data".to_vec()))
        .await
        .expect("release");
    // The table output, the raw bytes of a view, and an export's lines.
    let commands: [&[&str]; 3] = [
        &["stats"],
        &["view", "PlayerData", "p", "--raw"],
        &["export", "PlayerData"],
    ];
    for args in commands {
        let mut child = std::process::Command::new(profilectl())
            .arg("--socket")
            .arg(daemon.socket())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn profilectl");
        // Close the reading end before profilectl has connected and printed,
        // as `profilectl stats | head -1` does once head has its line.
        drop(child.stdout.take());
        let output = child.wait_with_output().expect("wait");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "{args:?}: {}: {stderr}",
            output.status
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
