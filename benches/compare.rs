//! profiled against Redis on the same machine, same workloads, same
//! durability, in one run.
//!
//! Workloads, each for `PROFILED_BENCH_SECS` (default 10 s):
//!
//! - **sessions**: `PROFILED_BENCH_SESSIONS` (default 32) concurrent
//!   sessions over `PROFILED_BENCH_PROFILES` (default 10,000) profiles of
//!   2 KiB (half random bytes, half zeros). Each session loops: load a
//!   random free profile, save it 5 times, release it. profiled loads with
//!   [`LoadPolicy::Cancel`] and picks another key on `Taken`; Redis's
//!   acquire script fails if the profile is owned.
//! - **saves**: each session holds `PROFILED_BENCH_LEASES` (default 100)
//!   leases and saves them round-robin, at 1 and at 32 sessions.
//!
//! Durability levels, both run: **fsync** (profiled `storage.sync = true`;
//! Redis `appendfsync always`) and **buffered** (profiled `sync = false`;
//! Redis `appendfsync everysec`).
//!
//! profiled runs in-process on a temporary directory, driven through the
//! client library over its Unix socket, one connection per session. Redis
//! is a `redis-server` child process on its own temporary directory and
//! Unix socket, one connection per session speaking RESP, one hash per
//! profile `{owner, epoch, data}` and each operation one Lua script called
//! with `EVALSHA`. Without `redis-server` on `PATH` the Redis columns are
//! left empty.
//!
//! ```sh
//! cargo bench --bench compare
//! PROFILED_BENCH_SECS=3 PROFILED_BENCH_SESSIONS=64 cargo bench --bench compare
//! ```

mod common;

use common::env_or;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use profiled::Config;
use profiled_client::{Client, ErrorCode, LoadPolicy, Profile, SessionId};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

const DATA_SIZE: usize = 2048;
const SAVES_PER_SESSION: usize = 5;
const SESSION_STORE: &str = "Sessions";
const SAVE_STORE: &str = "Saves";

#[derive(Clone, Copy, Debug)]
struct Params {
    run_for: Duration,
    sessions: usize,
    profiles: u64,
    leases: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Durability {
    Fsync,
    Buffered,
}

impl Durability {
    fn name(self) -> &'static str {
        match self {
            Self::Fsync => "fsync",
            Self::Buffered => "buffered",
        }
    }
}

/// One operation's figures within one workload.
#[derive(Clone, Debug, Default)]
struct Stat {
    per_sec: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    count: usize,
}

impl Stat {
    fn new(mut samples: Vec<Duration>, elapsed: Duration) -> Self {
        samples.sort_unstable();
        let at = |q: f64| {
            let index = ((samples.len() as f64 * q) as usize).min(samples.len().saturating_sub(1));
            samples.get(index).map_or(0.0, |d| d.as_secs_f64() * 1e6)
        };
        Self {
            per_sec: samples.len() as f64 / elapsed.as_secs_f64().max(1e-9),
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
            count: samples.len(),
        }
    }
}

/// The figures of one workload on one system: `(operation, stat)` rows.
#[derive(Debug, Default)]
struct Outcome {
    rows: Vec<(&'static str, Stat)>,
    /// Loads refused because another session held the profile.
    taken: usize,
}

#[derive(Debug, Default)]
struct SessionSamples {
    session: Vec<Duration>,
    load: Vec<Duration>,
    save: Vec<Duration>,
    release: Vec<Duration>,
    taken: usize,
}

impl SessionSamples {
    fn merge(&mut self, other: Self) {
        self.session.extend(other.session);
        self.load.extend(other.load);
        self.save.extend(other.save);
        self.release.extend(other.release);
        self.taken += other.taken;
    }

    fn outcome(self, elapsed: Duration) -> Outcome {
        Outcome {
            rows: vec![
                ("session", Stat::new(self.session, elapsed)),
                ("load", Stat::new(self.load, elapsed)),
                ("save", Stat::new(self.save, elapsed)),
                ("release", Stat::new(self.release, elapsed)),
            ],
            taken: self.taken,
        }
    }
}

/// 2 KiB, the first half random bytes, the second zeros.
fn profile_data(rng: &mut Rng) -> Vec<u8> {
    let mut data = vec![0u8; DATA_SIZE];
    for chunk in data[..DATA_SIZE / 2].chunks_mut(8) {
        let bytes = rng.next().to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    data
}

/// xorshift64*: enough to pick keys and fill data.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn main() {
    let params = Params {
        run_for: Duration::from_secs(env_or("PROFILED_BENCH_SECS", 10)),
        sessions: env_or("PROFILED_BENCH_SESSIONS", 32usize).max(1),
        profiles: env_or("PROFILED_BENCH_PROFILES", 10_000u64).max(1),
        leases: env_or("PROFILED_BENCH_LEASES", 100usize).max(1),
    };
    let redis_available = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "profiled vs Redis: {DATA_SIZE} B profiles (half random), {} s per workload, \
         {} sessions, {} profiles, {} leases per session in saves, {} cores",
        params.run_for.as_secs(),
        params.sessions,
        params.profiles,
        params.leases,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if !redis_available {
        println!("note: redis-server not found on PATH; Redis is skipped");
    }

    let workloads: [(String, usize); 3] = [
        (format!("sessions W={}", params.sessions), params.sessions),
        ("saves W=1".to_owned(), 1),
        (format!("saves W={}", params.sessions), params.sessions),
    ];
    // (workload, durability, profiled, redis)
    let mut results: Vec<(String, Durability, Outcome, Option<Outcome>)> = Vec::new();
    runtime.block_on(async {
        for durability in [Durability::Fsync, Durability::Buffered] {
            let mut profiled_outcomes = Vec::new();
            {
                let daemon = ProfiledServer::start(durability).await;
                for (index, (name, sessions)) in workloads.iter().enumerate() {
                    eprintln!("profiled {} {name} ...", durability.name());
                    let outcome = if index == 0 {
                        profiled_sessions(&daemon.socket, params).await
                    } else {
                        profiled_saves(&daemon.socket, params, *sessions).await
                    };
                    profiled_outcomes.push(outcome);
                }
                daemon.stop().await;
            }
            let mut redis_outcomes: Vec<Option<Outcome>> = Vec::new();
            if redis_available {
                let server = RedisServer::start(durability).await;
                let shas = server.load_scripts().await;
                for (index, (name, sessions)) in workloads.iter().enumerate() {
                    eprintln!("redis {} {name} ...", durability.name());
                    let outcome = if index == 0 {
                        redis_sessions(&server.socket, &shas, params).await
                    } else {
                        redis_saves(&server.socket, &shas, params, *sessions).await
                    };
                    redis_outcomes.push(Some(outcome));
                }
            } else {
                redis_outcomes.extend(workloads.iter().map(|_| None));
            }
            for ((name, _), (profiled, redis)) in workloads
                .iter()
                .zip(profiled_outcomes.into_iter().zip(redis_outcomes))
            {
                results.push((name.clone(), durability, profiled, redis));
            }
        }
    });
    print_results(&results);
}

fn print_results(results: &[(String, Durability, Outcome, Option<Outcome>)]) {
    println!();
    println!(
        "{:<14} {:<9} {:<8} | {:>10} {:>10} {:>6} | {:>24} | {:>24} | {:>6}",
        "workload",
        "sync",
        "op",
        "profiled/s",
        "redis/s",
        "ratio",
        "profiled p50/p99/p999 us",
        "redis p50/p99/p999 us",
        "p99 x"
    );
    let mut json = Vec::new();
    for (name, durability, profiled, redis) in results {
        for (index, (op, p)) in profiled.rows.iter().enumerate() {
            let r = redis
                .as_ref()
                .and_then(|outcome| outcome.rows.get(index))
                .map(|(_, stat)| stat);
            let ratio = r.map(|r| p.per_sec / r.per_sec.max(1e-9));
            let p99_ratio = r.map(|r| p.p99 / r.p99.max(1e-9));
            let percentiles = |s: &Stat| format!("{:.0}/{:.0}/{:.0}", s.p50, s.p99, s.p999);
            println!(
                "{:<14} {:<9} {:<8} | {:>10.0} {:>10} {:>6} | {:>24} | {:>24} | {:>6}",
                name,
                durability.name(),
                op,
                p.per_sec,
                r.map_or("-".to_owned(), |r| format!("{:.0}", r.per_sec)),
                ratio.map_or("-".to_owned(), |x| format!("{x:.2}")),
                percentiles(p),
                r.map_or("-".to_owned(), percentiles),
                p99_ratio.map_or("-".to_owned(), |x| format!("{x:.2}")),
            );
            let num = |value: Option<f64>, digits: usize| {
                value.map_or("null".to_owned(), |x| format!("{x:.digits$}"))
            };
            json.push(format!(
                "{{\"bench\":\"compare\",\"workload\":\"{name}\",\"sync\":\"{}\",\"op\":\"{op}\",\
                 \"profiled_per_sec\":{:.0},\"profiled_p50_us\":{:.1},\"profiled_p99_us\":{:.1},\"profiled_p999_us\":{:.1},\"profiled_count\":{},\
                 \"redis_per_sec\":{},\"redis_p50_us\":{},\"redis_p99_us\":{},\"redis_p999_us\":{},\"redis_count\":{},\
                 \"ratio_per_sec\":{},\"ratio_p99\":{}}}",
                durability.name(),
                p.per_sec,
                p.p50,
                p.p99,
                p.p999,
                p.count,
                num(r.map(|r| r.per_sec), 0),
                num(r.map(|r| r.p50), 1),
                num(r.map(|r| r.p99), 1),
                num(r.map(|r| r.p999), 1),
                r.map_or("null".to_owned(), |r| r.count.to_string()),
                num(ratio, 3),
                num(p99_ratio, 3),
            ));
        }
        if profiled.taken > 0 || redis.as_ref().is_some_and(|r| r.taken > 0) {
            println!(
                "{:<14} {:<9} loads refused as taken: profiled {}, redis {}",
                name,
                durability.name(),
                profiled.taken,
                redis
                    .as_ref()
                    .map_or("-".to_owned(), |r| r.taken.to_string())
            );
        }
    }
    println!("ratio = profiled/Redis throughput; p99 x = profiled/Redis p99 latency");
    println!();
    for line in json {
        println!("{line}");
    }
}

// ---------------------------------------------------------------- profiled

struct ProfiledServer {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<(), profiled::ServerError>>,
}

impl ProfiledServer {
    async fn start(durability: Durability) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::default();
        config.listen.socket = dir.path().join("bench.sock");
        config.storage.path = dir.path().join("data");
        config.storage.sync = durability == Durability::Fsync;
        let listener = profiled::bind(&config.listen.socket, &config.access).expect("bind");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let socket = config.listen.socket.clone();
        let server = tokio::spawn(profiled::run(config, listener, async {
            let _ = stopped.await;
        }));
        Self {
            _dir: dir,
            socket,
            stop,
            server,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.server.await.expect("server task").expect("clean stop");
    }
}

async fn profiled_client(socket: &Path, name: String) -> Client {
    let session = SessionId {
        place_id: 1,
        job_id: name,
    };
    Client::connect(socket, session).await.expect("connect")
}

async fn profiled_sessions(socket: &Path, params: Params) -> Outcome {
    let start = Instant::now() + Duration::from_millis(200);
    let end = start + params.run_for;
    let mut tasks = Vec::new();
    for id in 0..params.sessions {
        let client = profiled_client(socket, format!("sessions-{id}")).await;
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(id as u64 + 1);
            let data = profile_data(&mut rng);
            let mut samples = SessionSamples::default();
            tokio::time::sleep_until(start.into()).await;
            while Instant::now() < end {
                let began = Instant::now();
                let profile = loop {
                    let key = format!("p{}", rng.below(params.profiles));
                    let sent = Instant::now();
                    match client.load(SESSION_STORE, &key, LoadPolicy::Cancel).await {
                        Ok(profile) => {
                            samples.load.push(sent.elapsed());
                            break profile;
                        }
                        Err(err) if matches!(err.code(), Some(ErrorCode::Taken { .. })) => {
                            samples.taken += 1;
                        }
                        Err(err) => panic!("load: {err}"),
                    }
                };
                for _ in 0..SAVES_PER_SESSION {
                    let sent = Instant::now();
                    profile.save(data.clone()).await.expect("save");
                    samples.save.push(sent.elapsed());
                }
                let sent = Instant::now();
                profile.release(None).await.expect("release");
                samples.release.push(sent.elapsed());
                samples.session.push(began.elapsed());
            }
            client.close().await;
            samples
        }));
    }
    let mut all = SessionSamples::default();
    for task in tasks {
        all.merge(task.await.expect("session task"));
    }
    all.outcome(start.elapsed())
}

async fn profiled_saves(socket: &Path, params: Params, sessions: usize) -> Outcome {
    let start = Instant::now() + Duration::from_millis(500);
    let end = start + params.run_for;
    let mut tasks = Vec::new();
    for id in 0..sessions {
        let client = profiled_client(socket, format!("saves{sessions}-{id}")).await;
        let mut profiles: Vec<Profile> = Vec::with_capacity(params.leases);
        for lease in 0..params.leases {
            let key = format!("w{sessions}-s{id}-l{lease}");
            profiles.push(
                client
                    .load(SAVE_STORE, &key, LoadPolicy::Cancel)
                    .await
                    .expect("load"),
            );
        }
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(1000 + id as u64);
            let data = profile_data(&mut rng);
            let mut samples = Vec::new();
            tokio::time::sleep_until(start.into()).await;
            let mut next = 0;
            while Instant::now() < end {
                let sent = Instant::now();
                profiles[next].save(data.clone()).await.expect("save");
                samples.push(sent.elapsed());
                next = (next + 1) % profiles.len();
            }
            for profile in profiles {
                profile.release(None).await.expect("release");
            }
            client.close().await;
            samples
        }));
    }
    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await.expect("save task"));
    }
    Outcome {
        rows: vec![("save", Stat::new(samples, end - start))],
        taken: 0,
    }
}

// ------------------------------------------------------------------- Redis

const ACQUIRE: &str = r"
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and owner ~= '' then
  return redis.error_reply('TAKEN')
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1])
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
local data = redis.call('HGET', KEYS[1], 'data')
return {epoch, data}
";

const SAVE: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'owner', 'epoch')
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then
  return redis.error_reply('LEASE_LOST')
end
redis.call('HSET', KEYS[1], 'data', ARGV[3])
return 1
";

const RELEASE: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'owner', 'epoch')
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then
  return redis.error_reply('LEASE_LOST')
end
if ARGV[3] then
  redis.call('HSET', KEYS[1], 'owner', '', 'data', ARGV[3])
else
  redis.call('HSET', KEYS[1], 'owner', '')
end
return 1
";

#[derive(Clone, Debug)]
struct Shas {
    acquire: String,
    save: String,
    release: String,
}

/// A `redis-server` child on a temporary directory, killed on drop.
struct RedisServer {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RedisServer {
    async fn start(durability: Durability) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("redis.sock");
        let fsync = match durability {
            Durability::Fsync => "always",
            Durability::Buffered => "everysec",
        };
        let child = Command::new("redis-server")
            .arg("--port")
            .arg("0")
            .arg("--unixsocket")
            .arg(&socket)
            .arg("--dir")
            .arg(dir.path())
            .args(["--appendonly", "yes", "--appendfsync", fsync, "--save", ""])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start redis-server");
        let server = Self {
            child,
            socket,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut conn) = Resp::connect(&server.socket).await
                && let Ok(Reply::Simple(pong)) = conn.call(&[b"PING"]).await
                && pong == "PONG"
            {
                break;
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server
    }

    async fn load_scripts(&self) -> Shas {
        let mut conn = Resp::connect(&self.socket).await.expect("connect redis");
        Shas {
            acquire: conn.script_load(ACQUIRE).await,
            save: conn.script_load(SAVE).await,
            release: conn.script_load(RELEASE).await,
        }
    }
}

#[derive(Debug)]
enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

/// One RESP connection: requests are arrays of bulk strings.
struct Resp {
    io: BufReader<UnixStream>,
    out: Vec<u8>,
}

impl Resp {
    async fn connect(socket: &Path) -> io::Result<Self> {
        Ok(Self {
            io: BufReader::new(UnixStream::connect(socket).await?),
            out: Vec::with_capacity(4096),
        })
    }

    async fn call(&mut self, args: &[&[u8]]) -> io::Result<Reply> {
        self.out.clear();
        self.out
            .extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for arg in args {
            self.out
                .extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            self.out.extend_from_slice(arg);
            self.out.extend_from_slice(b"\r\n");
        }
        self.io.get_mut().write_all(&self.out).await?;
        read_reply(&mut self.io).await
    }

    async fn script_load(&mut self, script: &str) -> String {
        match self
            .call(&[b"SCRIPT", b"LOAD", script.as_bytes()])
            .await
            .expect("script load")
        {
            Reply::Bulk(Some(sha)) => String::from_utf8(sha).expect("sha"),
            other => panic!("SCRIPT LOAD: {other:?}"),
        }
    }

    /// `EVALSHA sha 1 key args...`, with a Redis error turned into `Err`.
    async fn evalsha(
        &mut self,
        sha: &str,
        key: &[u8],
        args: &[&[u8]],
    ) -> io::Result<Result<Reply, String>> {
        let mut all: Vec<&[u8]> = vec![b"EVALSHA", sha.as_bytes(), b"1", key];
        all.extend_from_slice(args);
        Ok(match self.call(&all).await? {
            Reply::Error(err) => Err(err),
            reply => Ok(reply),
        })
    }

    /// Acquires `key` for `me`; `None` if another owner holds it.
    async fn acquire(&mut self, shas: &Shas, key: &[u8], me: &[u8]) -> Option<u64> {
        match self
            .evalsha(&shas.acquire, key, &[me])
            .await
            .expect("redis acquire")
        {
            Ok(Reply::Array(Some(items))) => match items.first() {
                Some(Reply::Int(epoch)) => Some(u64::try_from(*epoch).expect("epoch")),
                other => panic!("acquire reply: {other:?}"),
            },
            Err(err) if err.contains("TAKEN") => None,
            other => panic!("acquire reply: {other:?}"),
        }
    }

    async fn save(&mut self, shas: &Shas, key: &[u8], me: &[u8], epoch: u64, data: &[u8]) {
        let epoch = epoch.to_string();
        match self
            .evalsha(&shas.save, key, &[me, epoch.as_bytes(), data])
            .await
            .expect("redis save")
        {
            Ok(Reply::Int(1)) => {}
            other => panic!("save reply: {other:?}"),
        }
    }

    async fn release(&mut self, shas: &Shas, key: &[u8], me: &[u8], epoch: u64) {
        let epoch = epoch.to_string();
        match self
            .evalsha(&shas.release, key, &[me, epoch.as_bytes()])
            .await
            .expect("redis release")
        {
            Ok(Reply::Int(1)) => {}
            other => panic!("release reply: {other:?}"),
        }
    }
}

fn read_reply<'a>(
    io: &'a mut BufReader<UnixStream>,
) -> Pin<Box<dyn Future<Output = io::Result<Reply>> + Send + 'a>> {
    Box::pin(async move {
        let mut line = Vec::new();
        io.read_until(b'\n', &mut line).await?;
        if line.len() < 3 || !line.ends_with(b"\r\n") {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "short RESP line",
            ));
        }
        let kind = line[0];
        let body = String::from_utf8_lossy(&line[1..line.len() - 2]).into_owned();
        let number = || {
            body.parse::<i64>()
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad RESP number"))
        };
        Ok(match kind {
            b'+' => Reply::Simple(body),
            b'-' => Reply::Error(body),
            b':' => Reply::Int(number()?),
            b'$' => {
                let len = number()?;
                if len < 0 {
                    Reply::Bulk(None)
                } else {
                    let mut buf = vec![0; usize::try_from(len).expect("len") + 2];
                    io.read_exact(&mut buf).await?;
                    buf.truncate(buf.len() - 2);
                    Reply::Bulk(Some(buf))
                }
            }
            b'*' => {
                let len = number()?;
                if len < 0 {
                    Reply::Array(None)
                } else {
                    let mut items = Vec::new();
                    for _ in 0..len {
                        items.push(read_reply(io).await?);
                    }
                    Reply::Array(Some(items))
                }
            }
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unknown RESP type {:?}", other as char),
                ));
            }
        })
    })
}

async fn redis_sessions(socket: &Path, shas: &Shas, params: Params) -> Outcome {
    let start = Instant::now() + Duration::from_millis(200);
    let end = start + params.run_for;
    let mut tasks = Vec::new();
    for id in 0..params.sessions {
        let mut conn = Resp::connect(socket).await.expect("connect redis");
        let shas = shas.clone();
        tasks.push(tokio::spawn(async move {
            let me = format!("sessions-{id}");
            let mut rng = Rng::new(id as u64 + 1);
            let data = profile_data(&mut rng);
            let mut samples = SessionSamples::default();
            tokio::time::sleep_until(start.into()).await;
            while Instant::now() < end {
                let began = Instant::now();
                let (key, epoch) = loop {
                    let key = format!("{SESSION_STORE}:p{}", rng.below(params.profiles));
                    let sent = Instant::now();
                    match conn.acquire(&shas, key.as_bytes(), me.as_bytes()).await {
                        Some(epoch) => {
                            samples.load.push(sent.elapsed());
                            break (key, epoch);
                        }
                        None => samples.taken += 1,
                    }
                };
                for _ in 0..SAVES_PER_SESSION {
                    let sent = Instant::now();
                    conn.save(&shas, key.as_bytes(), me.as_bytes(), epoch, &data)
                        .await;
                    samples.save.push(sent.elapsed());
                }
                let sent = Instant::now();
                conn.release(&shas, key.as_bytes(), me.as_bytes(), epoch)
                    .await;
                samples.release.push(sent.elapsed());
                samples.session.push(began.elapsed());
            }
            samples
        }));
    }
    let mut all = SessionSamples::default();
    for task in tasks {
        all.merge(task.await.expect("session task"));
    }
    all.outcome(start.elapsed())
}

async fn redis_saves(socket: &Path, shas: &Shas, params: Params, sessions: usize) -> Outcome {
    let start = Instant::now() + Duration::from_millis(500);
    let end = start + params.run_for;
    let mut tasks = Vec::new();
    for id in 0..sessions {
        let mut conn = Resp::connect(socket).await.expect("connect redis");
        let me = format!("saves{sessions}-{id}");
        let mut leases = Vec::with_capacity(params.leases);
        for lease in 0..params.leases {
            let key = format!("{SAVE_STORE}:w{sessions}-s{id}-l{lease}");
            let epoch = conn
                .acquire(shas, key.as_bytes(), me.as_bytes())
                .await
                .expect("fresh key is free");
            leases.push((key, epoch));
        }
        let shas = shas.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(1000 + id as u64);
            let data = profile_data(&mut rng);
            let mut samples = Vec::new();
            tokio::time::sleep_until(start.into()).await;
            let mut next = 0;
            while Instant::now() < end {
                let (key, epoch) = &leases[next];
                let sent = Instant::now();
                conn.save(&shas, key.as_bytes(), me.as_bytes(), *epoch, &data)
                    .await;
                samples.push(sent.elapsed());
                next = (next + 1) % leases.len();
            }
            for (key, epoch) in &leases {
                conn.release(&shas, key.as_bytes(), me.as_bytes(), *epoch)
                    .await;
            }
            samples
        }));
    }
    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await.expect("save task"));
    }
    Outcome {
        rows: vec![("save", Stat::new(samples, end - start))],
        taken: 0,
    }
}
