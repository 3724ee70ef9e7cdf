//! Soak: many sessions hold many leases on the real binary, save them back
//! to back and hand profiles over to each other, to show that errors stay
//! at zero and that the daemon's memory stays flat.
//!
//! The daemon runs as a child process on a temporary directory (on the disk
//! that holds `TMPDIR`), so its resident memory can be read from
//! `/proc/<pid>/status`. 1,000 sessions each load 10 profiles; then, for
//! the run's length, each session saves its profiles round robin (2 KiB
//! each), and now and then force-loads a profile another session holds.
//! That holder releases it with final data on `ReleaseRequested`, and the
//! loader then holds it, so 10,000 leases stay held throughout.
//!
//! Every unexpected client error or event counts as an error. A session
//! never saves a profile after it was asked to release it (a save already
//! in flight finishes first), and only one session at a time asks for a
//! given profile, so `LeaseLost` should never happen; it is counted
//! separately as "fenced" if it does, for example when a holder is too slow
//! to release before the daemon's `force_load_timeout`.
//!
//! ```sh
//! cargo bench --bench soak                           # 60 s, fsync on every save
//! PROFILED_SOAK_SYNC=false cargo bench --bench soak  # buffered WAL
//! PROFILED_SOAK_SECS=600 PROFILED_SOAK_HANDOFFS=200 cargo bench --bench soak
//! ```
//!
//! `PROFILED_SOAK_SESSIONS` (1000), `PROFILED_SOAK_PER_SESSION` (10) and
//! `PROFILED_SOAK_HANDOFFS` (handoffs asked for per second across all
//! sessions, 100) change the shape.

mod common;

use common::{ChildDaemon, env_or, rss_kib};
use std::collections::VecDeque;
use std::path::Path;
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use profiled_client::{
    Client, ClientError, ErrorCode, LoadPolicy, Profile, ProfileEvent, SessionId,
};
use tokio::sync::{mpsc, watch};

const STORE: &str = "Soak";
const DATA_SIZE: usize = 2048;
const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// The owner of a profile some session is force-loading.
const IN_TRANSIT: u32 = u32::MAX;
/// How many unexpected errors are printed as they happen.
const PRINT_ERRORS: u64 = 20;

/// An event about one lease, forwarded to the session holding it.
type Routed = (u32, u64, ProfileEvent);

fn main() {
    let sessions: usize = env_or("PROFILED_SOAK_SESSIONS", 1000);
    let per_session: usize = env_or("PROFILED_SOAK_PER_SESSION", 10);
    let secs: u64 = env_or("PROFILED_SOAK_SECS", 60);
    let sync: bool = env_or("PROFILED_SOAK_SYNC", true);
    let handoffs_per_sec: f64 = env_or("PROFILED_SOAK_HANDOFFS", 100.0);
    let leases = sessions * per_session;

    let limits = format!(
        "[limits]\nmax_connections = {}\n",
        (sessions + 64).max(2048)
    );
    let mut daemon = ChildDaemon::spawn(&format!("sync = {sync}\n"), &limits);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "soak: {sessions} sessions, {leases} leases, {DATA_SIZE} B saves, sync={sync}, {secs} s, \
         {handoffs_per_sec} handoffs/s asked, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let socket = daemon.socket.clone();
    let report = runtime.block_on(soak(
        &socket,
        &mut daemon.child,
        sessions,
        per_session,
        Duration::from_secs(secs),
        handoffs_per_sec,
    ));

    let (status, exit) = daemon.terminate();
    let exit_ms = exit.as_secs_f64() * 1e3;
    runtime.shutdown_timeout(Duration::from_secs(1));
    report.print(sessions, leases, secs, sync, exit_ms, status.success());
    let failed = report.errors > 0 || !status.success();
    drop(daemon);
    if failed {
        std::process::exit(1);
    }
}

/// The counters and targets every session shares.
struct Shared {
    /// Each profile's holder, by session index, or [`IN_TRANSIT`].
    owner: Vec<AtomicU32>,
    /// How many leases each session holds.
    held: Vec<AtomicU32>,
    per_session: u32,
    saves: AtomicU64,
    handoffs: AtomicU64,
    errors: AtomicU64,
    /// Saves and releases refused with `LeaseLost`.
    fenced: AtomicU64,
    /// `LeaseLost` events.
    lost: AtomicU64,
    /// Release requests for a lease this session no longer holds.
    stale: AtomicU64,
    /// When sessions stop starting new operations.
    end: Instant,
    /// Mean time between one session's handoffs.
    handoff_every: Duration,
    /// How many sessions have finished their last operation. Each keeps
    /// answering release requests until all have.
    finished: watch::Sender<usize>,
    sessions: usize,
}

impl Shared {
    fn error(&self, what: &str, err: &dyn std::fmt::Display) {
        let seen = self.errors.fetch_add(1, Ordering::Relaxed);
        if seen < PRINT_ERRORS {
            eprintln!("soak error: {what}: {err}");
        }
    }
}

/// What one session measured.
#[derive(Default)]
struct Outcome {
    save_us: Vec<u32>,
    handoff_us: Vec<u32>,
}

/// The one operation a session has in flight.
#[derive(Clone, Copy)]
enum Op {
    /// Save a held profile: key and epoch.
    Save(u32, u64),
    /// Force-load a profile: key and the session holding it.
    Load(u32, u32),
}

enum Done {
    Saved(Result<u64, ClientError>),
    Loaded(Result<Profile, ClientError>),
}

struct Session {
    me: u32,
    client: Client,
    shared: Arc<Shared>,
    /// Held leases, key and epoch, in the order they are saved.
    held: VecDeque<(u32, u64)>,
    /// Where the forwarding tasks send the held leases' events.
    route: mpsc::UnboundedSender<Routed>,
    rng: u64,
    data: Vec<u8>,
    out: Outcome,
}

impl Session {
    async fn run(mut self, mut events: mpsc::UnboundedReceiver<Routed>) -> Outcome {
        let shared = Arc::clone(&self.shared);
        let mut next_handoff = Instant::now() + shared.handoff_every.mul_f64(self.uniform());
        loop {
            let now = Instant::now();
            if now >= shared.end {
                break;
            }
            let mut op = None;
            if now >= next_handoff {
                next_handoff += shared.handoff_every.mul_f64(0.5 + self.uniform());
                op = self.pick_target().map(|(key, from)| Op::Load(key, from));
            }
            if op.is_none() {
                op = self
                    .held
                    .pop_front()
                    .map(|(key, epoch)| Op::Save(key, epoch));
            }
            match op {
                Some(op) => self.perform(op, &mut events).await,
                None => {
                    // Nothing held: wait for the next handoff.
                    let wake = next_handoff.min(shared.end);
                    tokio::select! {
                        Some(event) = events.recv() => {
                            self.on_event(event, None).await;
                        }
                        () = tokio::time::sleep_until(wake.into()) => {}
                    }
                }
            }
        }
        shared.finished.send_modify(|n| *n += 1);
        let mut finished = shared.finished.subscribe();
        loop {
            tokio::select! {
                biased;
                Some(event) = events.recv() => {
                    self.on_event(event, None).await;
                }
                () = async {
                    // The sender lives in `shared`, so this cannot fail.
                    let _ = finished.wait_for(|n| *n >= shared.sessions).await;
                } => break,
            }
        }
        self.out
    }

    /// Runs one operation, answering release requests while it is in flight.
    async fn perform(&mut self, op: Op, events: &mut mpsc::UnboundedReceiver<Routed>) {
        let client = self.client.clone();
        let data = self.data.clone();
        let started = Instant::now();
        let mut pending = Box::pin(async move {
            match op {
                Op::Save(key, epoch) => {
                    Done::Saved(client.save(STORE, &key_name(key), epoch, data).await)
                }
                Op::Load(key, _) => Done::Loaded(
                    client
                        .load(STORE, &key_name(key), LoadPolicy::ForceLoad)
                        .await,
                ),
            }
        });
        let saving = match op {
            Op::Save(key, epoch) => Some((key, epoch)),
            Op::Load(..) => None,
        };
        let mut release_after = false;
        let done = loop {
            tokio::select! {
                biased;
                Some(event) = events.recv() => {
                    release_after |= self.on_event(event, saving).await;
                }
                done = &mut pending => break done,
            }
        };
        let micros = u32::try_from(started.elapsed().as_micros()).unwrap_or(u32::MAX);
        match (op, done) {
            (Op::Save(key, epoch), Done::Saved(result)) => {
                match result {
                    Ok(_) => {
                        self.shared.saves.fetch_add(1, Ordering::Relaxed);
                        self.out.save_us.push(micros);
                    }
                    Err(err) if is_lease_lost(&err) => {
                        self.fenced();
                        return;
                    }
                    Err(err) => self.shared.error("save", &err),
                }
                if release_after {
                    self.release(key, epoch).await;
                } else {
                    self.held.push_back((key, epoch));
                }
            }
            (Op::Load(key, from), Done::Loaded(result)) => match result {
                Ok(profile) => {
                    self.shared.handoffs.fetch_add(1, Ordering::Relaxed);
                    self.out.handoff_us.push(micros);
                    self.adopt(key, profile);
                }
                Err(err) => {
                    self.shared.error("force load", &err);
                    self.shared.owner[key as usize].store(from, Ordering::Relaxed);
                }
            },
            _ => unreachable!("an operation's result matches it"),
        }
    }

    /// Acts on one lease event. Returns whether the lease being saved right
    /// now must be released once that save is done.
    async fn on_event(&mut self, (key, epoch, event): Routed, saving: Option<(u32, u64)>) -> bool {
        match event {
            ProfileEvent::ReleaseRequested { .. } => {
                if saving == Some((key, epoch)) {
                    return true;
                }
                match self.held.iter().position(|&held| held == (key, epoch)) {
                    Some(index) => {
                        self.held.remove(index);
                        self.release(key, epoch).await;
                    }
                    None => {
                        self.shared.stale.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            ProfileEvent::LeaseLost { reason, .. } => {
                let seen = self.shared.lost.fetch_add(1, Ordering::Relaxed);
                if seen < PRINT_ERRORS {
                    eprintln!("soak: lease on {} lost: {reason:?}", key_name(key));
                }
                // A lease being saved is forgotten when its save is refused.
                if let Some(index) = self.held.iter().position(|&held| held == (key, epoch)) {
                    self.held.remove(index);
                    self.shared.held[self.me as usize].fetch_sub(1, Ordering::Relaxed);
                }
            }
            other => self.shared.error("event", &format!("{other:?}")),
        }
        false
    }

    /// Releases a held lease with final data, as a handoff asks.
    async fn release(&mut self, key: u32, epoch: u64) {
        let result = self
            .client
            .release(STORE, &key_name(key), epoch, Some(self.data.clone()))
            .await;
        match result {
            Ok(_) => {
                self.shared.held[self.me as usize].fetch_sub(1, Ordering::Relaxed);
            }
            Err(err) if is_lease_lost(&err) => self.fenced(),
            Err(err) => self.shared.error("release", &err),
        }
    }

    /// Counts a save or release refused with `LeaseLost`. The lease is
    /// already out of `held`: it was the one in flight.
    fn fenced(&self) {
        self.shared.fenced.fetch_add(1, Ordering::Relaxed);
        self.shared.held[self.me as usize].fetch_sub(1, Ordering::Relaxed);
    }

    /// Takes on a freshly loaded lease, forwarding its events to this
    /// session until the lease ends.
    fn adopt(&mut self, key: u32, mut profile: Profile) {
        let epoch = profile.epoch();
        self.shared.owner[key as usize].store(self.me, Ordering::Relaxed);
        self.shared.held[self.me as usize].fetch_add(1, Ordering::Relaxed);
        self.held.push_back((key, epoch));
        let route = self.route.clone();
        tokio::spawn(async move {
            while let Some(event) = profile.next_event().await {
                if route.send((key, epoch, event)).is_err() {
                    break;
                }
            }
        });
    }

    /// Chooses a profile to force-load: one held by another session that
    /// holds at least its share, while this one holds at most its share,
    /// so every session keeps about `per_session`. Marks it in transit so
    /// no other session asks for it meanwhile.
    fn pick_target(&mut self) -> Option<(u32, u32)> {
        let shared = Arc::clone(&self.shared);
        if shared.held[self.me as usize].load(Ordering::Relaxed) > shared.per_session {
            return None;
        }
        for _ in 0..8 {
            let key = (self.next() % shared.owner.len() as u64) as usize;
            let from = shared.owner[key].load(Ordering::Relaxed);
            if from == self.me
                || from == IN_TRANSIT
                || shared.held[from as usize].load(Ordering::Relaxed) < shared.per_session
            {
                continue;
            }
            if shared.owner[key]
                .compare_exchange(from, IN_TRANSIT, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            {
                return Some((key as u32, from));
            }
        }
        None
    }

    /// splitmix64.
    fn next(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn key_name(key: u32) -> String {
    format!("p{key}")
}

fn is_lease_lost(err: &ClientError) -> bool {
    matches!(err.code(), Some(ErrorCode::LeaseLost))
}

/// One RSS sample during the run.
struct Sample {
    at_s: f64,
    rss_kib: u64,
    saves_per_sec: f64,
    handoffs_per_sec: f64,
    held: u64,
}

struct Report {
    connect_s: f64,
    load_s: f64,
    run_s: f64,
    errors: u64,
    fenced: u64,
    lost: u64,
    stale: u64,
    saves: u64,
    handoffs: u64,
    save_us: Vec<u32>,
    handoff_us: Vec<u32>,
    rss_start_kib: u64,
    rss_end_kib: u64,
    held_end: u64,
    series: Vec<Sample>,
}

async fn soak(
    socket: &Path,
    child: &mut Child,
    sessions: usize,
    per_session: usize,
    run_for: Duration,
    handoffs_per_sec: f64,
) -> Report {
    let pid = child.id();
    let leases = sessions * per_session;
    let connecting = Instant::now();
    let mut clients = Vec::with_capacity(sessions);
    for s in 0..sessions {
        let session = SessionId {
            place_id: 1,
            job_id: format!("soak-{s}"),
        };
        let client = loop {
            match Client::connect(socket, session.clone()).await {
                Ok(client) => break client,
                Err(err) => {
                    if let Some(status) = child.try_wait().expect("try_wait") {
                        panic!("profiled exited with {status} before accepting: {err}");
                    }
                    assert!(
                        connecting.elapsed() < Duration::from_secs(30),
                        "connect: {err}"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        clients.push(client);
    }
    let connect_s = connecting.elapsed().as_secs_f64();

    let loading = Instant::now();
    let mut loads = Vec::with_capacity(sessions);
    for (s, client) in clients.iter().enumerate() {
        let client = client.clone();
        loads.push(tokio::spawn(async move {
            let mut held = Vec::with_capacity(per_session);
            for p in 0..per_session {
                let key = (s * per_session + p) as u32;
                let profile = client
                    .load(STORE, &key_name(key), LoadPolicy::ForceLoad)
                    .await
                    .expect("initial load");
                held.push((key, profile));
            }
            held
        }));
    }
    let mut initial = Vec::with_capacity(sessions);
    for load in loads {
        initial.push(load.await.expect("loader"));
    }
    let load_s = loading.elapsed().as_secs_f64();
    let rss_start_kib = rss_kib(pid);

    let (finished, _) = watch::channel(0);
    let start = Instant::now();
    let shared = Arc::new(Shared {
        owner: (0..leases)
            .map(|key| AtomicU32::new((key / per_session) as u32))
            .collect(),
        held: (0..sessions).map(|_| AtomicU32::new(0)).collect(),
        per_session: per_session as u32,
        saves: AtomicU64::new(0),
        handoffs: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        fenced: AtomicU64::new(0),
        lost: AtomicU64::new(0),
        stale: AtomicU64::new(0),
        end: start + run_for,
        handoff_every: Duration::from_secs_f64(sessions as f64 / handoffs_per_sec.max(1e-3)),
        finished,
        sessions,
    });

    let mut tasks = Vec::with_capacity(sessions);
    for (s, (client, profiles)) in clients.into_iter().zip(initial).enumerate() {
        let (route, events) = mpsc::unbounded_channel();
        let mut session = Session {
            me: s as u32,
            client,
            shared: Arc::clone(&shared),
            held: VecDeque::with_capacity(per_session * 2),
            route,
            rng: 0x5EED ^ (s as u64).wrapping_mul(0x2545_F491_4F6C_DD1D),
            data: (0..DATA_SIZE).map(|i| ((i + s) % 251) as u8).collect(),
            out: Outcome::default(),
        };
        for (key, profile) in profiles {
            session.adopt(key, profile);
        }
        tasks.push(tokio::spawn(session.run(events)));
    }

    let sampler = {
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let mut series = Vec::new();
            let mut last = (0, 0);
            let mut at = start;
            while at + SAMPLE_EVERY <= shared.end {
                at += SAMPLE_EVERY;
                tokio::time::sleep_until(at.into()).await;
                let saves = shared.saves.load(Ordering::Relaxed);
                let handoffs = shared.handoffs.load(Ordering::Relaxed);
                let interval = SAMPLE_EVERY.as_secs_f64();
                let sample = Sample {
                    at_s: at.duration_since(start).as_secs_f64(),
                    rss_kib: rss_kib(pid),
                    saves_per_sec: (saves - last.0) as f64 / interval,
                    handoffs_per_sec: (handoffs - last.1) as f64 / interval,
                    held: total_held(&shared),
                };
                last = (saves, handoffs);
                eprintln!(
                    "soak: {:>4.0} s  rss {:>8} KiB  {:>8.0} saves/s  {:>6.1} handoffs/s  {} held  {} errors",
                    sample.at_s,
                    sample.rss_kib,
                    sample.saves_per_sec,
                    sample.handoffs_per_sec,
                    sample.held,
                    shared.errors.load(Ordering::Relaxed),
                );
                series.push(sample);
            }
            series
        })
    };

    let mut save_us = Vec::new();
    let mut handoff_us = Vec::new();
    for task in tasks {
        let out = task.await.expect("session");
        save_us.extend(out.save_us);
        handoff_us.extend(out.handoff_us);
    }
    let run_s = start.elapsed().as_secs_f64();
    let rss_end_kib = rss_kib(pid);
    let series = sampler.await.expect("sampler");
    save_us.sort_unstable();
    handoff_us.sort_unstable();
    Report {
        connect_s,
        load_s,
        run_s,
        errors: shared.errors.load(Ordering::Relaxed),
        fenced: shared.fenced.load(Ordering::Relaxed),
        lost: shared.lost.load(Ordering::Relaxed),
        stale: shared.stale.load(Ordering::Relaxed),
        saves: shared.saves.load(Ordering::Relaxed),
        handoffs: shared.handoffs.load(Ordering::Relaxed),
        save_us,
        handoff_us,
        rss_start_kib,
        rss_end_kib,
        held_end: total_held(&shared),
        series,
    }
}

impl Report {
    fn print(
        &self,
        sessions: usize,
        leases: usize,
        secs: u64,
        sync: bool,
        exit_ms: f64,
        clean: bool,
    ) {
        let saves_per_sec = self.saves as f64 / self.run_s;
        let handoffs_per_sec = self.handoffs as f64 / self.run_s;
        let save = |q| percentile(&self.save_us, q);
        let handoff = |q| percentile(&self.handoff_us, q);
        println!(
            "setup: {sessions} connections in {:.1} s, {leases} loads in {:.1} s; run {:.1} s; \
             SIGTERM to exit {exit_ms:.0} ms (clean: {clean})",
            self.connect_s, self.load_s, self.run_s
        );
        println!();
        println!(
            "{:>8} {:>8} {:>8} {:>8} {:>10} {:>10} {:>10} {:>12} {:>10}",
            "errors",
            "fenced",
            "lost",
            "stale",
            "saves",
            "saves/s",
            "handoffs",
            "handoffs/s",
            "held end"
        );
        println!(
            "{:>8} {:>8} {:>8} {:>8} {:>10} {:>10.0} {:>10} {:>12.1} {:>10}",
            self.errors,
            self.fenced,
            self.lost,
            self.stale,
            self.saves,
            saves_per_sec,
            self.handoffs,
            handoffs_per_sec,
            self.held_end
        );
        println!();
        println!(
            "{:>10} {:>10} {:>10} {:>10}",
            "latency", "p50 us", "p99 us", "p999 us"
        );
        println!(
            "{:>10} {:>10.0} {:>10.0} {:>10.0}",
            "save",
            save(0.50),
            save(0.99),
            save(0.999)
        );
        println!(
            "{:>10} {:>10.0} {:>10.0} {:>10.0}",
            "handoff",
            handoff(0.50),
            handoff(0.99),
            handoff(0.999)
        );
        println!();
        println!(
            "{:>8} {:>12} {:>10} {:>12} {:>8}",
            "t s", "rss KiB", "saves/s", "handoffs/s", "held"
        );
        println!(
            "{:>8} {:>12} {:>10} {:>12} {:>8}",
            "start", self.rss_start_kib, "-", "-", leases
        );
        for sample in &self.series {
            println!(
                "{:>8.0} {:>12} {:>10.0} {:>12.1} {:>8}",
                sample.at_s,
                sample.rss_kib,
                sample.saves_per_sec,
                sample.handoffs_per_sec,
                sample.held
            );
        }
        println!(
            "{:>8} {:>12} {:>10} {:>12} {:>8}",
            "end", self.rss_end_kib, "-", "-", self.held_end
        );
        println!();
        println!(
            "{{\"bench\":\"soak\",\"group\":\"run\",\"sessions\":{sessions},\"leases\":{leases},\"secs\":{secs},\"sync\":{sync},\"data_bytes\":{DATA_SIZE},\"run_s\":{:.1},\"exit_ms\":{exit_ms:.0},\"clean_exit\":{clean}}}",
            self.run_s
        );
        println!(
            "{{\"bench\":\"soak\",\"group\":\"errors\",\"errors\":{},\"fenced\":{},\"lease_lost_events\":{},\"stale_events\":{}}}",
            self.errors, self.fenced, self.lost, self.stale
        );
        println!(
            "{{\"bench\":\"soak\",\"group\":\"throughput\",\"saves\":{},\"saves_per_sec\":{saves_per_sec:.0},\"handoffs\":{},\"handoffs_per_sec\":{handoffs_per_sec:.1},\"held_end\":{}}}",
            self.saves, self.handoffs, self.held_end
        );
        println!(
            "{{\"bench\":\"soak\",\"group\":\"save_latency\",\"p50_us\":{:.0},\"p99_us\":{:.0},\"p999_us\":{:.0}}}",
            save(0.50),
            save(0.99),
            save(0.999)
        );
        println!(
            "{{\"bench\":\"soak\",\"group\":\"handoff_latency\",\"p50_us\":{:.0},\"p99_us\":{:.0},\"p999_us\":{:.0}}}",
            handoff(0.50),
            handoff(0.99),
            handoff(0.999)
        );
        let series: Vec<String> = self
            .series
            .iter()
            .map(|sample| format!("[{:.0},{}]", sample.at_s, sample.rss_kib))
            .collect();
        println!(
            "{{\"bench\":\"soak\",\"group\":\"rss\",\"start_kib\":{},\"end_kib\":{},\"series_s_kib\":[{}]}}",
            self.rss_start_kib,
            self.rss_end_kib,
            series.join(",")
        );
    }
}

fn total_held(shared: &Shared) -> u64 {
    shared
        .held
        .iter()
        .map(|held| u64::from(held.load(Ordering::Relaxed)))
        .sum()
}

/// The value at quantile `q` of sorted samples, in microseconds.
fn percentile(sorted: &[u32], q: f64) -> f64 {
    let index = ((sorted.len() as f64 * q) as usize).min(sorted.len().saturating_sub(1));
    sorted.get(index).map_or(0.0, |&us| f64::from(us))
}
