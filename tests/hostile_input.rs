//! A bounded, seeded fuzz pass that CI runs with `cargo test`: the stable
//! counterpart of the cargo-fuzz targets under `fuzz/` (see
//! `docs/fuzzing.md`).
//!
//! 1. The frame decoder: mutated encodings of every request kind, fed in
//!    random chunks to the daemon's `FrameCodec<Incoming, ServerFrame>` and checked
//!    against a model of the documented framing, including that nothing is
//!    ever reserved beyond the frame limit.
//! 2. The request handler: the real daemon (in-process) answers a storm of
//!    well-framed requests with random and extreme fields, and hostile
//!    frames on other connections. Every request gets exactly one answer,
//!    nothing panics or hangs, and a normal client is served afterwards.
//!
//! `PROFILED_FUZZ_SEED` (decimal or 0x-hex) replays a run; the seed is
//! printed on every run. `PROFILED_FUZZ_INPUTS` sets the decoder inputs
//! (default 100,000) and `PROFILED_FUZZ_REQUESTS` the handler's requests
//! (default 24,000).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures::StreamExt;
use profiled::Config;
use profiled::testing::TestDaemon;
use profiled_client::{Client, ConnectOptions, LoadPolicy as ClientLoadPolicy};
use profiled_protocol::{
    Changes, ClientFrame, ErrorCode, ExportedProfile, FrameCodec, FrameError, Hello, Incoming,
    LENGTH_PREFIX, LoadPolicy, OverwriteSource, PROTOCOL_VERSION, Reply, Request, RequestBody,
    Response, Role, ServerFrame, SessionId, VersionQuery, decode_payload, encode_frame_into,
    encode_payload,
};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::Semaphore;
use tokio_util::codec::{Decoder, FramedRead};

/// The frame limit of the decoder pass's usual codec and of the daemon.
const MAX_FRAME: u32 = 64 * 1024;

/// The daemon's name limit in the handler pass.
const MAX_NAME: usize = 64;

/// The most the handler pass may take before it counts as a hang.
const HANDLER_DEADLINE: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------
// Randomness: a seeded xorshift, so a failure replays from its seed.

#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        // xorshift must not start at zero.
        Self(seed ^ 0x9e37_79b9_7f4a_7c15 | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n` (`n` > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }

    /// True `num` times in `den`.
    fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }

    /// A u64 biased towards the values that break arithmetic.
    fn extreme_u64(&mut self) -> u64 {
        match self.below(8) {
            0 => 0,
            1 => u64::MAX,
            2 => u64::MAX - self.below(4),
            3 => 1 << self.below(64),
            4 => i64::MAX as u64 + self.below(3),
            5 => self.below(16),
            _ => self.next(),
        }
    }
}

fn env_number(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    let value = value.trim();
    let parsed = match value.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => value.parse(),
    };
    Some(parsed.unwrap_or_else(|err| panic!("{name}={value:?} is not a number: {err}")))
}

/// The run's seed: `PROFILED_FUZZ_SEED`, or the clock. Printed either way
/// (`cargo test -- --nocapture` shows it; a failing test always does).
fn seed(pass: &str) -> u64 {
    let seed = env_number("PROFILED_FUZZ_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|since| since.as_nanos() as u64)
            .unwrap_or(1)
    });
    println!("{pass}: PROFILED_FUZZ_SEED=0x{seed:016x}");
    seed
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

// ---------------------------------------------------------------------------
// Random requests.

/// What the request generator may use for one connection.
struct Scope<'a> {
    /// Private keys are only ever loaded by this connection, so a load of
    /// one never waits for another connection.
    conn: usize,
    /// Admin requests are sent on purpose (they are `Forbidden` otherwise).
    admin: bool,
    /// Leases this connection was granted, for saves that succeed.
    held: &'a [(String, String, u64)],
    /// Where a backup may be written; none when backups are not wanted.
    backup_dir: Option<&'a Path>,
    /// The size of the occasional large data field.
    big: usize,
}

impl Scope<'_> {
    fn offline() -> Scope<'static> {
        Scope {
            conn: 0,
            admin: true,
            held: &[],
            backup_dir: None,
            // Small enough to keep the decoder pass fast, large enough to
            // cross its smaller frame limits.
            big: 3000,
        }
    }
}

/// A hostile or ordinary name: empty, at and over the limit, control
/// characters, non-ASCII, long, or one of a few ordinary ones.
fn nasty_name(rng: &mut Rng) -> String {
    match rng.below(8) {
        0 => String::new(),
        1 => "n".repeat(MAX_NAME),
        2 => "n".repeat(MAX_NAME + 1),
        3 => ["a\nb", "key\0", "\u{1b}[31mred", "tab\there", "\u{7f}", " "][rng.index(6)].into(),
        4 => "ünïcødé-😀-\u{202e}rtl".into(),
        5 => "L".repeat(1 + rng.index(4096)),
        6 => "../../etc/passwd".into(),
        _ => "x".repeat(1 + rng.index(8)),
    }
}

/// A store and key: mostly usable names (private, or shared with other
/// connections), sometimes hostile ones. The flag is false only for the
/// connection's private keys: hostile names may be valid ones, and every
/// connection uses them.
fn target(rng: &mut Rng, scope: &Scope<'_>) -> (String, String, bool) {
    let store = ["PlayerData", "Inventory"][rng.index(2)].to_owned();
    match rng.below(10) {
        0 | 1 => (nasty_name(rng), nasty_name(rng), true),
        2 => (store, nasty_name(rng), true),
        3 | 4 => (store, format!("shared-{}", rng.below(4)), true),
        _ => (store, format!("c{}-{}", scope.conn, rng.below(6)), false),
    }
}

fn data(rng: &mut Rng, big: usize) -> Vec<u8> {
    match rng.below(10) {
        0 => Vec::new(),
        1 => rng.bytes(big),
        _ => {
            let len = rng.index(64);
            rng.bytes(len)
        }
    }
}

fn changes(rng: &mut Rng) -> Changes {
    if rng.chance(1, 2) {
        return Changes::default();
    }
    let meta_tags = rng.chance(1, 2).then(|| {
        (0..rng.below(12))
            .map(|_| {
                let value_len = if rng.chance(1, 8) { 5000 } else { 8 };
                (nasty_name(rng), rng.bytes(value_len))
            })
            .collect::<BTreeMap<_, _>>()
    });
    let user_ids = rng
        .chance(1, 2)
        .then(|| (0..rng.below(12)).map(|_| rng.extreme_u64()).collect());
    let consumed_messages = (0..rng.below(6)).map(|_| rng.extreme_u64()).collect();
    Changes {
        meta_tags,
        user_ids,
        consumed_messages,
    }
}

fn epoch(rng: &mut Rng, scope: &Scope<'_>) -> Option<(String, String, u64)> {
    if !scope.held.is_empty() && rng.chance(2, 3) {
        let held = &scope.held[rng.index(scope.held.len())];
        return Some(held.clone());
    }
    None
}

fn policy(rng: &mut Rng) -> LoadPolicy {
    [
        LoadPolicy::ForceLoad,
        LoadPolicy::Steal,
        LoadPolicy::Repeat,
        LoadPolicy::Cancel,
    ][rng.index(4)]
}

/// One random request body of kind `kind` (0..17, the wire's variant
/// indexes). Admin kinds are only made on admin connections when the
/// scope says so; backups only into the scope's directory.
fn body(rng: &mut Rng, kind: u64, scope: &Scope<'_>) -> RequestBody {
    match kind {
        0 => {
            let (store, key, shared) = target(rng, scope);
            // A load that could queue behind another connection's lease
            // always has a short deadline, so connections never wait on
            // each other; private keys get the extreme ones.
            let deadline_ms = if shared {
                Some(rng.below(100))
            } else {
                rng.chance(1, 2).then(|| rng.extreme_u64())
            };
            RequestBody::Load {
                store,
                key,
                policy: policy(rng),
                deadline_ms,
            }
        }
        1 | 2 => {
            let (store, key, epoch) = match epoch(rng, scope) {
                Some(held) => held,
                None => {
                    let (store, key, _) = target(rng, scope);
                    (store, key, rng.extreme_u64())
                }
            };
            if kind == 1 {
                RequestBody::Save {
                    store,
                    key,
                    epoch,
                    data: data(rng, scope.big),
                    changes: changes(rng),
                }
            } else {
                RequestBody::Release {
                    store,
                    key,
                    epoch,
                    data: rng.chance(1, 2).then(|| data(rng, scope.big)),
                    changes: changes(rng),
                }
            }
        }
        3 => RequestBody::Ping,
        4 => {
            let (store, key, _) = target(rng, scope);
            RequestBody::SendMessage {
                store,
                key,
                payload: data(rng, 2000),
            }
        }
        5 => {
            let (store, key, _) = target(rng, scope);
            RequestBody::View {
                store,
                key,
                version: rng.chance(1, 2).then(|| rng.extreme_u64()),
            }
        }
        6 => {
            let (store, key, _) = target(rng, scope);
            RequestBody::ListVersions {
                store,
                key,
                query: VersionQuery {
                    newest_first: rng.chance(1, 2),
                    from_ms: rng.chance(1, 2).then(|| rng.extreme_u64()),
                    to_ms: rng.chance(1, 2).then(|| rng.extreme_u64()),
                    limit: rng.extreme_u64() as u32,
                },
            }
        }
        7 => {
            let (store, key, _) = target(rng, scope);
            let source = if rng.chance(1, 2) {
                OverwriteSource::Data(data(rng, scope.big))
            } else {
                OverwriteSource::Version(rng.extreme_u64())
            };
            RequestBody::Overwrite { store, key, source }
        }
        8 => {
            let (store, key, _) = target(rng, scope);
            RequestBody::Wipe { store, key }
        }
        9 => RequestBody::Stats,
        10 => RequestBody::Status,
        11 => RequestBody::Sessions,
        12 => {
            let (store, key, _) = target(rng, scope);
            RequestBody::Revoke { store, key }
        }
        13 => {
            let (store, key, _) = target(rng, scope);
            RequestBody::AskRelease { store, key }
        }
        14 => {
            let path = match scope.backup_dir {
                // Absolute, new, and inside the test's own directory.
                Some(dir) if scope.admin => dir
                    .join(format!("backup-{}-{}", scope.conn, rng.next()))
                    .display()
                    .to_string(),
                // Relative: refused before anything is touched.
                Some(_) => format!("relative/{}", rng.below(100)),
                // Never executed (decoder pass, or a game connection,
                // which is refused with `Forbidden` before the path is read).
                None => nasty_name(rng),
            };
            RequestBody::Backup { path }
        }
        15 => {
            let (store, _, _) = target(rng, scope);
            RequestBody::Export {
                store,
                after: rng.chance(1, 2).then(|| nasty_name(rng)),
                limit: rng.extreme_u64() as u32,
            }
        }
        _ => {
            let (store, key, _) = target(rng, scope);
            RequestBody::Import {
                store,
                profile: ExportedProfile {
                    key,
                    version: rng.extreme_u64(),
                    updated_at_ms: rng.extreme_u64(),
                    data: rng.chance(3, 4).then(|| data(rng, scope.big)),
                    meta_tags: changes(rng).meta_tags.unwrap_or_default(),
                    user_ids: (0..rng.below(12)).map(|_| rng.extreme_u64()).collect(),
                },
            }
        }
    }
}

fn hello_frame(job: &str, role: Role) -> ClientFrame {
    ClientFrame::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        session: SessionId {
            place_id: 1,
            job_id: job.to_owned(),
        },
        role,
    })
}

/// Any client frame: mostly requests of every kind, sometimes a hello.
fn any_frame(rng: &mut Rng) -> ClientFrame {
    if rng.chance(1, 20) {
        let job = if rng.chance(1, 2) {
            nasty_name(rng)
        } else {
            "job".into()
        };
        let mut hello = hello_frame(&job, [Role::Game, Role::Admin][rng.index(2)]);
        if let ClientFrame::Hello(hello) = &mut hello {
            hello.protocol_version = [PROTOCOL_VERSION, 0, u32::MAX][rng.index(3)];
            hello.session.place_id = rng.extreme_u64();
        }
        return hello;
    }
    ClientFrame::Request(Request {
        id: rng.extreme_u64(),
        body: {
            let kind = rng.below(17);
            body(rng, kind, &Scope::offline())
        },
    })
}

fn frame_bytes(frame: &ClientFrame) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode_frame_into(frame, &mut buf, u32::MAX).expect("a generated frame encodes");
    buf.to_vec()
}

// ---------------------------------------------------------------------------
// Mutations.

/// Applies one to four random mutations to `bytes`: bit flips, byte
/// writes, inserts, deletes, truncations, length-prefix rewrites (huge,
/// at and around the limit), forged inner lengths, and splices with a
/// second frame.
fn mutate(rng: &mut Rng, bytes: &mut Vec<u8>, max_frame: u32) {
    for _ in 0..1 + rng.below(4) {
        let len = bytes.len();
        match rng.below(10) {
            0 if len > 0 => {
                let at = rng.index(len);
                bytes[at] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let at = rng.index(len);
                bytes[at] = rng.next() as u8;
            }
            2 => {
                let at = rng.index(len + 1);
                let count = 1 + rng.index(16);
                let insert = rng.bytes(count);
                bytes.splice(at..at, insert);
            }
            3 if len > 0 => {
                let at = rng.index(len);
                let end = (at + 1 + rng.index(16)).min(len);
                bytes.drain(at..end);
            }
            4 => bytes.truncate(rng.index(len + 1)),
            5 if len >= LENGTH_PREFIX => {
                let prefix: u32 = match rng.below(8) {
                    0 => u32::MAX,
                    1 => 0,
                    2 => max_frame,
                    3 => max_frame.saturating_add(1),
                    4 => 1 << rng.below(32),
                    5 => (len - LENGTH_PREFIX) as u32 + 1,
                    6 => ((len - LENGTH_PREFIX) as u32).saturating_sub(1),
                    _ => rng.next() as u32,
                };
                bytes[..LENGTH_PREFIX].copy_from_slice(&prefix.to_be_bytes());
            }
            6 if len >= 8 => {
                // A forged u64 length or count inside the payload.
                let at = LENGTH_PREFIX + rng.index(len - LENGTH_PREFIX - 3);
                let forged = [u64::MAX, 1 << 40, 1 << 20, u64::from(max_frame)][rng.index(4)];
                let end = (at + 8).min(len);
                bytes[at..end].copy_from_slice(&forged.to_be_bytes()[..end - at]);
            }
            7 => {
                let other = frame_bytes(&any_frame(rng));
                let cut = rng.index(len + 1);
                let from = rng.index(other.len() + 1);
                bytes.truncate(cut);
                bytes.extend_from_slice(&other[from..]);
            }
            8 => bytes.extend_from_slice(&frame_bytes(&any_frame(rng))),
            _ if len > 0 => {
                let at = rng.index(len);
                let end = (at + 1 + rng.index(32)).min(len);
                let copy = bytes[at..end].to_vec();
                let to = rng.index(len + 1);
                bytes.splice(to..to, copy);
            }
            _ => bytes.push(rng.next() as u8),
        }
    }
}

// ---------------------------------------------------------------------------
// 1. The decoder pass.

/// Feeds `stream` to a fresh daemon-side codec in random chunks, checking
/// every step against the documented framing. Returns how many frames
/// decoded.
fn check_decoder(rng: &mut Rng, stream: &[u8], max: u32) -> usize {
    let mut codec = FrameCodec::<Incoming, ServerFrame>::new(max);
    let mut buf = BytesMut::new();
    let mut rest = stream;
    let mut frames = 0;
    // Bounded no matter what: what a connection may buffer is at most one
    // frame under the limit plus what a single read delivered, with
    // `Vec`-style doubling.
    let bound = 2 * (LENGTH_PREFIX + max as usize) + 2 * stream.len();
    while !rest.is_empty() {
        let take = match rng.below(4) {
            0 => 1,
            1 => rest.len(),
            _ => 1 + rng.index(64),
        }
        .min(rest.len());
        let (chunk, tail) = rest.split_at(take);
        buf.extend_from_slice(chunk);
        rest = tail;
        loop {
            let before = buf.len();
            let capacity = buf.capacity();
            let prefix = buf.first_chunk::<LENGTH_PREFIX>().copied();
            // The payload a whole frame under the limit is about to yield.
            let whole = prefix.and_then(|prefix| {
                let len = u32::from_be_bytes(prefix);
                let total = LENGTH_PREFIX + len as usize;
                (len <= max && before >= total).then(|| buf[LENGTH_PREFIX..total].to_vec())
            });
            let outcome = codec.decode(&mut buf);
            assert!(
                buf.capacity() <= bound,
                "the codec holds {} bytes of capacity under a {max}-byte limit",
                buf.capacity()
            );
            let Some(prefix) = prefix else {
                assert!(matches!(outcome, Ok(None)), "no prefix yet: {outcome:?}");
                break;
            };
            let len = u32::from_be_bytes(prefix);
            let total = LENGTH_PREFIX + len as usize;
            match outcome {
                Err(FrameError::TooLarge {
                    len: got,
                    max: limit,
                }) => {
                    assert!(len > max, "{len} <= {max} refused as too large");
                    assert_eq!((got, limit), (u64::from(len), max));
                    assert_eq!(buf.capacity(), capacity, "reserved for a refused frame");
                    return frames;
                }
                _ if len > max => panic!("a prefix of {len} over {max} was not refused"),
                Ok(None) => {
                    assert!(before < total, "a whole frame was left undecoded");
                    assert_eq!(buf.len(), before, "a partial frame was consumed");
                    break;
                }
                Ok(Some(Incoming::UnknownRequest { id, kind })) => {
                    // A request kind from a newer client: not a frame this
                    // side can read, and exactly the header it names.
                    let payload = whole.expect("only a whole frame decodes");
                    assert_eq!(buf.len(), before - total, "consumed other than one frame");
                    assert!(decode_payload::<ClientFrame>(&payload).is_err());
                    assert!(
                        kind >= RequestBody::KINDS,
                        "known kind {kind} called unknown"
                    );
                    let mut header = 1u32.to_be_bytes().to_vec();
                    header.extend_from_slice(&id.to_be_bytes());
                    header.extend_from_slice(&kind.to_be_bytes());
                    assert!(
                        payload.starts_with(&header),
                        "the header it names is not the frame's"
                    );
                    frames += 1;
                }
                Ok(Some(Incoming::Frame(frame))) => {
                    let payload = whole.expect("only a whole frame decodes");
                    assert_eq!(buf.len(), before - total, "consumed other than one frame");
                    let model = decode_payload::<ClientFrame>(&payload).ok();
                    assert_eq!(model.as_ref(), Some(&frame), "codec and model differ");
                    let again = encode_payload(&frame).expect("an accepted frame re-encodes");
                    assert!(again.len() <= payload.len(), "re-encoding grew");
                    let back = decode_payload::<ClientFrame>(&again).expect("re-decodes");
                    assert_eq!(back, frame, "the frame changed in a round trip");
                    frames += 1;
                }
                Err(FrameError::Malformed(_)) => {
                    let payload = whole.expect("only a whole frame is judged");
                    assert!(
                        decode_payload::<ClientFrame>(&payload).is_err(),
                        "the codec refused a payload that decodes"
                    );
                    // The daemon closes the connection here.
                    return frames;
                }
                Err(other) => panic!("unexpected error {other}"),
            }
        }
    }
    frames
}

#[test]
fn the_frame_decoder_survives_mutated_frames_in_random_chunks() {
    let seed = seed("decoder pass");
    let inputs = env_number("PROFILED_FUZZ_INPUTS").unwrap_or(100_000) as usize;
    let mut rng = Rng::new(seed);
    let started = Instant::now();
    let mut decoded = 0usize;
    let mut kinds = [0usize; 17];
    for input in 0..inputs {
        // Each input gets its own generator, so a failure names one input.
        let input_seed = rng.next();
        let mut rng = Rng::new(input_seed);
        let max = match rng.below(8) {
            0 => 64,
            1 => 1024,
            _ => MAX_FRAME,
        };
        // Every request kind in turn, then random frames behind it.
        let kind = (input % 17) as u64;
        kinds[kind as usize] += 1;
        let first = ClientFrame::Request(Request {
            id: rng.extreme_u64(),
            body: body(&mut rng, kind, &Scope::offline()),
        });
        let mut stream = frame_bytes(&first);
        for _ in 0..rng.below(3) {
            stream.extend_from_slice(&frame_bytes(&any_frame(&mut rng)));
        }
        // One input in ten is left intact: valid streams must decode whole.
        let intact = rng.chance(1, 10);
        if !intact {
            mutate(&mut rng, &mut stream, max);
        }
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check_decoder(&mut rng, &stream, max)
        }));
        match outcome {
            Ok(frames) => {
                decoded += frames;
                if intact && stream.len() <= max as usize {
                    assert!(
                        frames >= 1,
                        "an intact stream decoded nothing: {}",
                        hex(&stream)
                    );
                }
            }
            Err(panic) => {
                eprintln!(
                    "decoder input {input} (input seed 0x{input_seed:016x}, max_frame {max}) failed: {}",
                    hex(&stream)
                );
                std::panic::resume_unwind(panic);
            }
        }
    }
    println!(
        "decoder pass: {inputs} inputs ({} per request kind), {decoded} frames decoded, {:?}",
        kinds[0],
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------
// 2. The handler pass.

/// Panics on the daemon's threads (tokio workers), seen by a panic hook:
/// a panic in a connection task would otherwise only close a socket.
static DAEMON_PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_daemon_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current();
            // The daemon's tasks and this test's connection tasks run
            // there; the latter fail their test on their own anyway.
            if thread.name().is_some_and(|name| name.starts_with("tokio-")) {
                DAEMON_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

fn daemon_config() -> Config {
    let mut config = Config::default();
    config.shutdown.grace = Duration::from_millis(100);
    config.storage.sync = false;
    config.leases.force_load_timeout = Duration::from_millis(50);
    config.session.resume_grace = Duration::from_millis(100);
    config.limits.max_frame = MAX_FRAME;
    config.limits.max_data = 16 * 1024;
    config.limits.max_name = MAX_NAME;
    config.limits.max_message = 1024;
    config.limits.max_pending_messages = 16;
    config.limits.max_meta_tags = 8;
    config.limits.max_meta_tag_size = 1024;
    config.limits.max_user_ids = 8;
    config.limits.max_page = 32;
    config.limits.max_in_flight = 32;
    config
}

type Reader = FramedRead<tokio::net::unix::OwnedReadHalf, FrameCodec<ServerFrame, ClientFrame>>;

async fn connect(socket: &Path) -> (Reader, tokio::net::unix::OwnedWriteHalf) {
    let stream = UnixStream::connect(socket)
        .await
        .expect("connect a raw socket");
    let (read, write) = stream.into_split();
    (
        FramedRead::new(read, FrameCodec::new(profiled_protocol::DEFAULT_MAX_FRAME)),
        write,
    )
}

async fn handshake(
    socket: &Path,
    job: &str,
    role: Role,
) -> (Reader, tokio::net::unix::OwnedWriteHalf) {
    let (mut reader, mut writer) = connect(socket).await;
    writer
        .write_all(&frame_bytes(&hello_frame(job, role)))
        .await
        .expect("send hello");
    match reader.next().await {
        Some(Ok(ServerFrame::Welcome(_))) => {}
        other => panic!("{job}: expected a welcome, got {other:?}"),
    }
    (reader, writer)
}

/// The requests a storm connection still waits on: id -> the requests.
type Owed = Arc<Mutex<HashMap<u64, Vec<String>>>>;

/// Every storm connection's [`Owed`], for the report of a hang.
static OWED: Mutex<Vec<(usize, Owed)>> = Mutex::new(Vec::new());

fn report_owed() {
    for (conn, owed) in OWED.lock().expect("owed registry").iter() {
        let owed = owed.lock().expect("owed lock");
        let count: usize = owed.values().map(Vec::len).sum();
        if count > 0 {
            eprintln!("storm connection {conn} waits on {count} answers, e.g.:");
            for shown in owed.values().flatten().take(4) {
                eprintln!("  {shown}");
            }
        }
    }
}

/// What one storm connection saw.
#[derive(Debug, Default)]
struct Tally {
    requests: usize,
    ok: usize,
    errors: BTreeMap<String, usize>,
    events: usize,
}

/// One connection sending `count` random requests, pipelined up to a window,
/// while a reader task checks that each gets exactly one response.
async fn storm_connection(
    socket: PathBuf,
    conn: usize,
    admin: bool,
    count: usize,
    seed: u64,
    backup_dir: PathBuf,
) -> Tally {
    let role = if admin { Role::Admin } else { Role::Game };
    let (mut reader, mut writer) = handshake(&socket, &format!("storm-{conn}"), role).await;
    let window = Arc::new(Semaphore::new(64));
    // Request id -> the requests still owed an answer (ids repeat on
    // purpose), shown if the pass hangs.
    let owed: Owed = Arc::default();
    OWED.lock()
        .expect("owed registry")
        .push((conn, Arc::clone(&owed)));
    // Load id -> its store and key, to learn granted epochs.
    let loads: Arc<Mutex<HashMap<u64, (String, String)>>> = Arc::default();
    let held: Arc<Mutex<Vec<(String, String, u64)>>> = Arc::default();

    let read_task = {
        let window = Arc::clone(&window);
        let owed = Arc::clone(&owed);
        let loads = Arc::clone(&loads);
        let held = Arc::clone(&held);
        tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut answered = 0;
            while answered < count {
                let frame = match reader.next().await {
                    Some(Ok(frame)) => frame,
                    other => panic!(
                        "storm connection {conn}: the daemon ended the connection with \
                         {} answers owed: {other:?}",
                        count - answered
                    ),
                };
                let Response { id, result } = match frame {
                    ServerFrame::Response(response) => response,
                    ServerFrame::Event(_) => {
                        tally.events += 1;
                        continue;
                    }
                    other => panic!("storm connection {conn}: unexpected {other:?}"),
                };
                {
                    let mut owed = owed.lock().expect("owed lock");
                    let left = owed.get_mut(&id).unwrap_or_else(|| {
                        panic!("storm connection {conn}: an answer to id {id}, not asked")
                    });
                    left.pop();
                    if left.is_empty() {
                        owed.remove(&id);
                    }
                }
                let load = loads.lock().expect("loads lock").remove(&id);
                match result {
                    Ok(reply) => {
                        tally.ok += 1;
                        if let (Reply::Loaded(loaded), Some((store, key))) = (reply, load) {
                            held.lock()
                                .expect("held lock")
                                .push((store, key, loaded.epoch));
                        }
                    }
                    Err(err) => {
                        *tally
                            .errors
                            .entry(
                                format!("{:?}", err.code)
                                    .split([' ', '{'])
                                    .next()
                                    .unwrap_or_default()
                                    .to_owned(),
                            )
                            .or_default() += 1;
                    }
                }
                answered += 1;
                window.add_permits(1);
            }
            tally
        })
    };

    let mut rng = Rng::new(seed);
    let mut batch = BytesMut::new();
    let mut backups = 0;
    for _ in 0..count {
        if window.available_permits() == 0 && !batch.is_empty() {
            // The answers the reader waits for may be in this batch.
            writer
                .write_all(&batch)
                .await
                .expect("the daemon reads requests");
            batch.clear();
        }
        window
            .acquire()
            .await
            .expect("the window stays open")
            .forget();
        let held_now = held.lock().expect("held lock").clone();
        // Requests are cheap ones mostly; the writes and admin requests that
        // touch storage (wipes, overwrites, imports, backups) are rarer.
        let kind = loop {
            let kind = rng.below(17);
            match kind {
                7 | 8 | 16 if !rng.chance(1, 4) => continue,
                // One backup per admin connection; game connections are
                // refused them.
                14 if admin && backups >= 1 => continue,
                14 if !admin && !rng.chance(1, 4) => continue,
                _ => break kind,
            }
        };
        if kind == 14 && admin {
            backups += 1;
        }
        let scope = Scope {
            conn,
            admin,
            held: &held_now,
            backup_dir: Some(&backup_dir),
            big: 20_000,
        };
        let body = body(&mut rng, kind, &scope);
        // Ids: mostly fresh, some repeated while in flight, some extreme.
        let id = match rng.below(10) {
            0 => rng.below(4),
            1 => rng.extreme_u64(),
            _ => rng.next(),
        };
        let frame = ClientFrame::Request(Request { id, body });
        let before = batch.len();
        let frame = match encode_frame_into(&frame, &mut batch, MAX_FRAME) {
            Ok(()) => frame,
            // Over the frame limit: a Ping instead (oversized frames are
            // the malformed connections' business).
            Err(FrameError::TooLarge { .. }) => {
                batch.truncate(before);
                let ping = ClientFrame::Request(Request {
                    id,
                    body: RequestBody::Ping,
                });
                encode_frame_into(&ping, &mut batch, MAX_FRAME).expect("encode a ping");
                ping
            }
            Err(err) => panic!("encode: {err}"),
        };
        if let ClientFrame::Request(Request {
            id,
            body: RequestBody::Load { store, key, .. },
        }) = &frame
        {
            loads
                .lock()
                .expect("loads lock")
                .insert(*id, (store.clone(), key.clone()));
        }
        let shown: String = format!("{frame:?}").chars().take(300).collect();
        owed.lock()
            .expect("owed lock")
            .entry(id)
            .or_default()
            .push(shown);
        if batch.len() > 8 * 1024 || rng.chance(1, 8) {
            writer
                .write_all(&batch)
                .await
                .expect("the daemon reads requests");
            batch.clear();
        }
    }
    writer
        .write_all(&batch)
        .await
        .expect("write the last batch");
    let mut tally = read_task.await.expect("the reader saw every answer");
    assert!(
        owed.lock().expect("owed lock").is_empty(),
        "storm connection {conn}: answers still owed"
    );
    tally.requests = count;
    tally
}

/// How a hostile byte stream must end, by the model of the framing.
#[derive(Debug, PartialEq)]
enum Expect {
    /// Refused with this code, then closed.
    Refused(ErrorCode),
    /// Closed, perhaps after a refusal; the stream ended mid-frame or held
    /// requests before its fault whose answers may or may not come.
    Closed,
}

fn expectation(stream: &[u8], after_hello: bool) -> Expect {
    let mut codec = FrameCodec::<Incoming, ServerFrame>::new(MAX_FRAME);
    let mut buf = BytesMut::from(stream);
    match codec.decode(&mut buf) {
        Err(FrameError::TooLarge { .. }) => Expect::Refused(ErrorCode::TooLarge),
        Err(_) => Expect::Refused(ErrorCode::InvalidRequest),
        // A request before hello, or a second hello. A request of an
        // unknown kind after the handshake is answered, not refused.
        Ok(Some(Incoming::Frame(ClientFrame::Request(_)) | Incoming::UnknownRequest { .. }))
            if !after_hello =>
        {
            Expect::Refused(ErrorCode::InvalidRequest)
        }
        Ok(Some(Incoming::Frame(ClientFrame::Hello(_)))) if after_hello => {
            Expect::Refused(ErrorCode::InvalidRequest)
        }
        _ => Expect::Closed,
    }
}

/// One connection that sends a mutated frame (after a handshake and a ping,
/// or first), then closes its write side. The daemon must answer with the
/// refusal the framing model predicts, or just close, and never hang.
async fn malformed_connection(socket: PathBuf, conn: usize, seed: u64) -> Expect {
    let mut rng = Rng::new(seed);
    let after_hello = rng.chance(3, 4);
    let (mut reader, mut writer) = if after_hello {
        let (mut reader, mut writer) =
            handshake(&socket, &format!("malformed-{conn}"), Role::Game).await;
        let ping = ClientFrame::Request(Request {
            id: 1,
            body: RequestBody::Ping,
        });
        writer.write_all(&frame_bytes(&ping)).await.expect("ping");
        match reader.next().await {
            Some(Ok(ServerFrame::Response(Response {
                id: 1,
                result: Ok(Reply::Pong),
            }))) => {}
            other => panic!("malformed connection {conn}: expected a pong, got {other:?}"),
        }
        (reader, writer)
    } else {
        connect(&socket).await
    };
    let kind = rng.below(17);
    // Only game connections and keys of their own: whatever the mutation
    // makes of the request, it is refused or cheap and never waits.
    let scope = Scope {
        conn: 10_000 + conn,
        admin: false,
        held: &[],
        backup_dir: None,
        big: 20_000,
    };
    let mut frame = ClientFrame::Request(Request {
        id: rng.next(),
        body: body(&mut rng, kind, &scope),
    });
    if !after_hello && rng.chance(1, 2) {
        frame = hello_frame(&format!("malformed-{conn}"), Role::Game);
    }
    let mut stream = frame_bytes(&frame);
    mutate(&mut rng, &mut stream, MAX_FRAME);
    let expect = expectation(&stream, after_hello);
    // The daemon may close before reading it all.
    let _ = writer.write_all(&stream).await;
    let _ = writer.shutdown().await;
    let mut refused = None;
    loop {
        match reader.next().await {
            None | Some(Err(_)) => break,
            Some(Ok(ServerFrame::Refused(err))) => {
                assert!(refused.is_none(), "connection {conn}: refused twice");
                refused = Some(err.code);
            }
            Some(Ok(ServerFrame::Welcome(_))) if !after_hello => {}
            Some(Ok(ServerFrame::Response(_) | ServerFrame::Event(_))) if refused.is_none() => {}
            Some(Ok(other)) => panic!(
                "malformed connection {conn}: unexpected {other:?} for {}",
                hex(&stream)
            ),
        }
    }
    if let Expect::Refused(code) = &expect {
        assert_eq!(
            refused.as_ref(),
            Some(code),
            "malformed connection {conn}: wrong ending for {}",
            hex(&stream)
        );
    }
    expect
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_answers_a_storm_of_random_requests_and_hostile_frames() {
    count_daemon_panics();
    let seed = seed("handler pass");
    let requests = env_number("PROFILED_FUZZ_REQUESTS").unwrap_or(24_000) as usize;
    let started = Instant::now();
    let daemon = TestDaemon::start_with(daemon_config())
        .await
        .expect("start the daemon");
    let socket = daemon.socket().to_path_buf();
    let scratch = tempfile::tempdir().expect("a directory for backups");

    let storm = async {
        let mut rng = Rng::new(seed);
        let connections = 12;
        let mut tasks = tokio::task::JoinSet::new();
        for conn in 0..connections {
            let count = requests / connections + usize::from(conn < requests % connections);
            tasks.spawn(storm_connection(
                socket.clone(),
                conn,
                conn < 2,
                count,
                rng.next(),
                scratch.path().to_path_buf(),
            ));
        }
        let mut malformed = tokio::task::JoinSet::new();
        let hostile = 400;
        // A few dozen at a time, to stay well inside the open-file limit.
        let open = Arc::new(Semaphore::new(32));
        for conn in 0..hostile {
            let open = Arc::clone(&open);
            let socket = socket.clone();
            let seed = rng.next();
            malformed.spawn(async move {
                let _slot = open.acquire().await.expect("the semaphore stays open");
                malformed_connection(socket, conn, seed).await
            });
        }
        let mut total = Tally::default();
        while let Some(tally) = tasks.join_next().await {
            let tally = tally.expect("a storm connection got every answer");
            total.requests += tally.requests;
            total.ok += tally.ok;
            total.events += tally.events;
            for (code, n) in tally.errors {
                *total.errors.entry(code).or_default() += n;
            }
        }
        let mut refusals = 0;
        while let Some(expect) = malformed.join_next().await {
            if expect.expect("a malformed connection ended as predicted") != Expect::Closed {
                refusals += 1;
            }
        }
        (total, hostile, refusals)
    };
    let Ok((total, hostile, refusals)) = tokio::time::timeout(HANDLER_DEADLINE, storm).await else {
        report_owed();
        panic!(
            "the storm did not finish within {HANDLER_DEADLINE:?} ({} daemon panics)",
            DAEMON_PANICS.load(Ordering::SeqCst)
        );
    };
    let stormed = started.elapsed();

    // A normal client is still served.
    let client = Client::connect_with(
        &socket,
        SessionId {
            place_id: 1,
            job_id: "after-the-storm".into(),
        },
        ConnectOptions::default(),
    )
    .await
    .expect("connect after the storm");
    let profile = client
        .load("PlayerData", "after-the-storm", ClientLoadPolicy::ForceLoad)
        .await
        .expect("load after the storm");
    let saved = profile.save(b"fine".to_vec()).await.expect("save");
    let released = profile.release(None).await.expect("release");
    assert!(released >= saved);
    let again = client
        .load("PlayerData", "after-the-storm", ClientLoadPolicy::Cancel)
        .await
        .expect("load again");
    assert_eq!(again.data(), Some(&b"fine"[..]));
    again.release(None).await.expect("release again");
    client.close().await;

    daemon.stop().await.expect("the daemon stops cleanly");
    assert_eq!(
        DAEMON_PANICS.load(Ordering::SeqCst),
        0,
        "a tokio worker (the daemon's, or a connection task's) panicked; see above"
    );
    println!(
        "handler pass: {} requests on 12 connections ({} ok, errors {:?}, {} events), \
         {hostile} hostile connections ({refusals} refused as predicted), storm {stormed:?}, \
         total {:?}",
        total.requests,
        total.ok,
        total.errors,
        total.events,
        started.elapsed()
    );
}
