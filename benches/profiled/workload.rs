//! What every system's workloads share: parameters, the data, the random
//! keys, the figures they report, and the sessions and saves loops
//! themselves, written once over [`Leases`] so that every system runs the
//! very same sequence of operations and is timed at the very same points,
//! its server's CPU time included.

use std::fmt;
use std::future::Future;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::common::ProcessTree;

/// The size of each profile's data.
pub const DATA_SIZE: usize = 2048;
/// Saves per session in the sessions workload.
pub const SAVES_PER_SESSION: usize = 5;
/// The store (or key prefix) of the sessions workload.
pub const SESSION_STORE: &str = "Sessions";
/// The store (or key prefix) of the saves workload.
pub const SAVE_STORE: &str = "Saves";

/// The shape of the sessions and saves workloads.
#[derive(Clone, Copy, Debug)]
pub struct Params {
    /// How long each workload runs.
    pub run_for: Duration,
    /// Concurrent sessions (W).
    pub sessions: usize,
    /// Profiles the sessions workload picks from (P).
    pub profiles: u64,
    /// Leases each session holds in the saves workload (L).
    pub leases: usize,
}

/// The two durability levels every system runs at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Every acknowledgement waits for an fsync.
    Fsync,
    /// Acknowledgements wait for the write, not the disk.
    Buffered,
}

impl Durability {
    pub fn name(self) -> &'static str {
        match self {
            Self::Fsync => "fsync",
            Self::Buffered => "buffered",
        }
    }
}

/// One session's connection to a system, as the workloads drive it: the
/// loops own the order of operations and the clocks, and a system says only
/// how its connection takes, writes and frees a lease.
///
/// The methods return `Send` futures so that the generic loops can run each
/// session on its own task. Any answer other than a grant, or a refusal
/// because another owner holds the profile, panics inside the
/// implementation: it means the bench itself is broken, and a figure
/// measured past it would hide that.
pub trait Leases: Sized + Send + 'static {
    /// What a granted lease leaves the session holding: enough to save to
    /// the profile and release it under the granted epoch.
    type Lease: Send + Sync;

    /// The key of the profile named `name` in `store`, as this system
    /// addresses it. The loops build it before the clock starts, so that
    /// naming a profile is not measured as part of a load, and the name
    /// comes as format arguments so that building it allocates once. The
    /// default, `store:name`, suits a system with a single key space.
    fn key(store: &'static str, name: fmt::Arguments<'_>) -> String {
        format!("{store}:{name}")
    }

    /// Takes the lease on `key` (made by [`Self::key`]) in `store` if the
    /// profile is free, or returns `None` if another owner holds it.
    fn acquire(
        &mut self,
        store: &'static str,
        key: String,
    ) -> impl Future<Output = Option<Self::Lease>> + Send;

    /// Writes `data` to the leased profile under the lease's epoch.
    fn save(&mut self, lease: &Self::Lease, data: &[u8]) -> impl Future<Output = ()> + Send;

    /// Frees the leased profile without writing data.
    fn release(&mut self, lease: Self::Lease) -> impl Future<Output = ()> + Send;

    /// A round trip through the server that reads and writes nothing: the
    /// system's own floor, from which the cost of its lease work can be
    /// told apart from the cost of its protocol and connection handling.
    fn ping(&mut self) -> impl Future<Output = ()> + Send;

    /// Ends the connection once the session is done. The default does
    /// nothing, for a system whose connection needs no goodbye beyond
    /// being dropped.
    fn close(self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// What the workloads read of a running server at each end of a measured
/// window.
pub trait Server {
    /// The server's CPU time so far (all its processes and threads), or
    /// `None` if it cannot be read.
    fn cpu_time(&self) -> Option<Duration>;

    /// How many times the server has synced its log to disk so far, for a
    /// server that counts them (profiled's `profiled_wal_syncs_total`);
    /// over a window it tells how many acknowledgements each sync carried.
    /// The default, `None`, is for a server that does not say.
    fn syncs(&self) -> impl Future<Output = Option<f64>> {
        async { None }
    }
}

/// A peer's server is its process tree, which counts no syncs.
impl Server for ProcessTree {
    fn cpu_time(&self) -> Option<Duration> {
        ProcessTree::cpu_time(self)
    }
}

/// One operation's figures within one workload, in operations per second
/// and microseconds.
#[derive(Clone, Debug, Default)]
pub struct Stat {
    pub per_sec: f64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub count: usize,
}

impl Stat {
    pub fn new(mut samples: Vec<Duration>, elapsed: Duration) -> Self {
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

    pub fn percentiles(&self) -> String {
        format!("{:.0}/{:.0}/{:.0}", self.p50, self.p99, self.p999)
    }
}

/// The figures of one workload on one system: `(operation, stat)` rows.
#[derive(Debug, Default)]
pub struct Outcome {
    pub rows: Vec<(&'static str, Stat)>,
    /// Loads refused because another session held the profile.
    pub taken: usize,
    /// The server's CPU time over the measured window (see [`run`]), if it
    /// could be read.
    pub server_cpu: Option<Duration>,
    /// The bench process's own CPU time over the same window: the clients
    /// (the profiled client library, or the bench's RESP or PostgreSQL wire
    /// code) share the machine's cores with the server.
    pub client_cpu: Option<Duration>,
    /// The server's log syncs over the measured window, if it counts them.
    pub syncs: Option<f64>,
    /// The operations completed in the measured window: every granted
    /// load, save and release (refused loads are not counted, though the
    /// server's work on them is in [`Self::server_cpu`]).
    pub ops: usize,
}

impl Outcome {
    /// The figures of one operation.
    pub fn op(&self, op: &str) -> Option<&Stat> {
        self.rows
            .iter()
            .find(|(name, _)| *name == op)
            .map(|(_, stat)| stat)
    }

    /// The server's CPU time per completed operation, in microseconds.
    pub fn cpu_us_per_op(&self) -> Option<f64> {
        self.per_op(self.server_cpu)
    }

    /// The clients' CPU time per completed operation, in microseconds.
    pub fn client_cpu_us_per_op(&self) -> Option<f64> {
        self.per_op(self.client_cpu)
    }

    /// Log syncs per completed operation, where the server made any: below
    /// one when a sync carries several acknowledgements.
    pub fn syncs_per_op(&self) -> Option<f64> {
        let syncs = self.syncs.filter(|&syncs| syncs > 0.0)?;
        (self.ops > 0).then(|| syncs / self.ops as f64)
    }

    fn per_op(&self, cpu: Option<Duration>) -> Option<f64> {
        // No CPU at all means a window shorter than a clock tick, which
        // measures nothing.
        let cpu = cpu.filter(|cpu| !cpu.is_zero())?;
        (self.ops > 0).then(|| cpu.as_secs_f64() * 1e6 / self.ops as f64)
    }

    /// A workload of one operation, `op`: saves or pings.
    pub fn single(
        op: &'static str,
        samples: Vec<Duration>,
        elapsed: Duration,
        usage: Usage,
    ) -> Self {
        Self {
            ops: samples.len(),
            rows: vec![(op, Stat::new(samples, elapsed))],
            taken: 0,
            server_cpu: usage.server,
            client_cpu: usage.client,
            syncs: usage.syncs,
        }
    }
}

/// What the server and the bench used over one measured window.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    /// The server's CPU time.
    pub server: Option<Duration>,
    /// The bench process's own CPU time.
    pub client: Option<Duration>,
    /// The server's log syncs, if it counts them.
    pub syncs: Option<f64>,
}

/// Latency samples from the sessions workload.
#[derive(Debug, Default)]
pub struct SessionSamples {
    pub session: Vec<Duration>,
    pub load: Vec<Duration>,
    pub save: Vec<Duration>,
    pub release: Vec<Duration>,
    pub taken: usize,
}

impl SessionSamples {
    pub fn merge(&mut self, other: Self) {
        self.session.extend(other.session);
        self.load.extend(other.load);
        self.save.extend(other.save);
        self.release.extend(other.release);
        self.taken += other.taken;
    }

    pub fn outcome(self, elapsed: Duration, usage: Usage) -> Outcome {
        Outcome {
            ops: self.load.len() + self.save.len() + self.release.len(),
            server_cpu: usage.server,
            client_cpu: usage.client,
            syncs: usage.syncs,
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

/// Runs the sessions workload and then the saves workloads (one per entry
/// of `saves`, the number of sessions) on `system`, which is already
/// running. `connect` opens one session's connection under the given
/// session name, which the system may use as the lease owner.
///
/// `server` reads the server's CPU time (and log syncs, if it counts them)
/// so far; each workload records the differences over its measured window
/// in [`Outcome::server_cpu`] and [`Outcome::syncs`]. The window opens
/// at the common start (every session connected and, for saves, holding
/// its leases) and closes once every session has had its last measured
/// operation acknowledged, before any session releases its leases or
/// closes its connection. So it holds the measured operations (and, in
/// sessions, the refused loads) with the server's background work meanwhile
/// (such as a flush thread or PostgreSQL's WAL writer), and no connecting,
/// setup or teardown.
pub async fn run<C: Leases>(
    system: &str,
    durability: Durability,
    params: Params,
    saves: &[usize],
    server: &impl Server,
    connect: impl AsyncFn(String) -> C,
) -> Vec<Outcome> {
    eprintln!("{system} {} sessions ...", durability.name());
    let mut outcomes = vec![sessions(params, server, &connect).await];
    for &w in saves {
        eprintln!("{system} {} saves W={w} ...", durability.name());
        outcomes.push(saves_workload(params, w, server, &connect).await);
    }
    eprintln!(
        "{system} {} pings W={} ...",
        durability.name(),
        params.sessions
    );
    outcomes.push(pings_workload(params, params.sessions, server, &connect).await);
    outcomes
}

/// The measured window of one workload, for sampling the server's CPU time
/// at its ends: at the common start, and once every session has passed the
/// end of its measured operations (see [`Window::pass`]). Sessions hold the
/// window's end back by a guard each, so a session that panics lets it
/// close instead of hanging the run.
struct Window {
    start: Instant,
    finished: mpsc::Sender<()>,
    finished_rx: mpsc::Receiver<()>,
    sampled: watch::Sender<bool>,
}

/// One session's hold on a [`Window`]'s end.
struct WindowGuard {
    _finished: mpsc::Sender<()>,
    sampled: watch::Receiver<bool>,
}

impl Window {
    fn new(start: Instant) -> Self {
        let (finished, finished_rx) = mpsc::channel(1);
        Self {
            start,
            finished,
            finished_rx,
            sampled: watch::channel(false).0,
        }
    }

    /// A guard for one session, taken before the session is spawned.
    fn guard(&self) -> WindowGuard {
        WindowGuard {
            _finished: self.finished.clone(),
            sampled: self.sampled.subscribe(),
        }
    }

    /// Samples `server` and the bench's own CPU time at the start, then
    /// again once every guard has passed or been dropped, and lets the
    /// sessions go on: what each used over the window, where both samples
    /// were read.
    async fn measure(self, server: &impl Server) -> Usage {
        let Self {
            start,
            finished,
            mut finished_rx,
            sampled,
        } = self;
        drop(finished);
        // Made before the start, since it asks `getconf` for the tick rate.
        let bench = ProcessTree::new(std::process::id());
        // The syncs are asked for before the start, while every session
        // waits for it, so that round trip is in neither window and no
        // operation is missed; at the end they are asked for after the
        // clocks are read.
        let syncs_before = server.syncs().await;
        tokio::time::sleep_until(start.into()).await;
        let before = (server.cpu_time(), bench.main_cpu_time());
        // Never sent to: `None` once every guard is gone.
        while finished_rx.recv().await.is_some() {}
        let after = (server.cpu_time(), bench.main_cpu_time());
        let syncs_after = server.syncs().await;
        sampled.send_replace(true);
        Usage {
            server: after.0.zip(before.0).and_then(|(a, b)| a.checked_sub(b)),
            client: after.1.zip(before.1).and_then(|(a, b)| a.checked_sub(b)),
            syncs: syncs_after.zip(syncs_before).map(|(a, b)| a - b),
        }
    }
}

impl WindowGuard {
    /// Ends the session's measured operations and waits until the window's
    /// end has been sampled, so the session's teardown is not in it.
    async fn pass(self) {
        let Self {
            _finished: finished,
            mut sampled,
        } = self;
        drop(finished);
        // An error means the window was dropped: nothing to wait for.
        let _ = sampled.wait_for(|&done| done).await;
    }
}

/// What [`measured`] returns.
struct Measured<T> {
    /// What each session's body returned.
    results: Vec<T>,
    /// What the server and the bench used over the measured window.
    usage: Usage,
    start: Instant,
    end: Instant,
}

/// Runs `body` for every session, each on its own task, all starting
/// together shortly after every session is ready (connected and, for
/// saves, holding its leases: a fixed head start from before the setup
/// could run out before it ends, and a late session would be measured for
/// only part of the window) and running until `run_for` has passed. Each
/// body gets its session, the end, and the [`WindowGuard`] it passes once
/// its measured operations are done, before any teardown; the CPU time is
/// sampled over that window.
async fn measured<S, T, Fut>(
    run_for: Duration,
    server: &impl Server,
    sessions: Vec<S>,
    body: impl Fn(S, Instant, WindowGuard) -> Fut,
) -> Measured<T>
where
    S: Send + 'static,
    T: Send + 'static,
    Fut: Future<Output = T> + Send + 'static,
{
    let start = Instant::now() + Duration::from_millis(50);
    let end = start + run_for;
    let window = Window::new(start);
    let tasks: Vec<_> = sessions
        .into_iter()
        .map(|session| {
            let run = body(session, end, window.guard());
            tokio::spawn(async move {
                tokio::time::sleep_until(start.into()).await;
                run.await
            })
        })
        .collect();
    let usage = window.measure(server).await;
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(task.await.expect("session task"));
    }
    Measured {
        results,
        usage,
        start,
        end,
    }
}

/// 2 KiB, the first half random bytes, the second zeros: about half
/// compressible.
pub fn profile_data(rng: &mut Rng) -> Vec<u8> {
    let mut data = vec![0u8; DATA_SIZE];
    for chunk in data[..DATA_SIZE / 2].chunks_mut(8) {
        let bytes = rng.next().to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    data
}

/// xorshift64*: enough to pick keys and fill data.
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// W sessions each loop until the end: load a random free profile (picking
/// another on a refusal, which is counted), save it [`SAVES_PER_SESSION`]
/// times, release it. Every session connects before the common start, so
/// connecting is not measured.
async fn sessions<C: Leases>(
    params: Params,
    server: &impl Server,
    connect: &impl AsyncFn(String) -> C,
) -> Outcome {
    let mut ready = Vec::with_capacity(params.sessions);
    for id in 0..params.sessions {
        let conn = connect(format!("sessions-{id}")).await;
        let mut rng = Rng::new(id as u64 + 1);
        let data = profile_data(&mut rng);
        ready.push((conn, rng, data));
    }
    let run = measured(
        params.run_for,
        server,
        ready,
        |(mut conn, mut rng, data), end, guard| async move {
            let mut samples = SessionSamples::default();
            while Instant::now() < end {
                let began = Instant::now();
                let lease = loop {
                    let key = C::key(
                        SESSION_STORE,
                        format_args!("p{}", rng.below(params.profiles)),
                    );
                    let sent = Instant::now();
                    match conn.acquire(SESSION_STORE, key).await {
                        Some(lease) => {
                            samples.load.push(sent.elapsed());
                            break lease;
                        }
                        None => samples.taken += 1,
                    }
                };
                for _ in 0..SAVES_PER_SESSION {
                    let sent = Instant::now();
                    conn.save(&lease, &data).await;
                    samples.save.push(sent.elapsed());
                }
                let sent = Instant::now();
                conn.release(lease).await;
                samples.release.push(sent.elapsed());
                samples.session.push(began.elapsed());
            }
            guard.pass().await;
            conn.close().await;
            samples
        },
    )
    .await;
    let mut all = SessionSamples::default();
    for samples in run.results {
        all.merge(samples);
    }
    all.outcome(run.start.elapsed(), run.usage)
}

/// `sessions` sessions each take L fresh profiles before the common start
/// and then save them round-robin until the end, so only saves are
/// measured; they release them afterwards.
async fn saves_workload<C: Leases>(
    params: Params,
    sessions: usize,
    server: &impl Server,
    connect: &impl AsyncFn(String) -> C,
) -> Outcome {
    let mut ready = Vec::with_capacity(sessions);
    for id in 0..sessions {
        let mut conn = connect(format!("saves{sessions}-{id}")).await;
        let mut leases = Vec::with_capacity(params.leases);
        for index in 0..params.leases {
            let key = C::key(SAVE_STORE, format_args!("w{sessions}-s{id}-l{index}"));
            let granted = conn.acquire(SAVE_STORE, key).await;
            leases.push(granted.expect("fresh key is free"));
        }
        let data = profile_data(&mut Rng::new(1000 + id as u64));
        ready.push((conn, leases, data));
    }
    let run = measured(
        params.run_for,
        server,
        ready,
        |(mut conn, leases, data), end, guard| async move {
            let mut samples = Vec::new();
            let mut next = 0;
            while Instant::now() < end {
                let lease = &leases[next];
                let sent = Instant::now();
                conn.save(lease, &data).await;
                samples.push(sent.elapsed());
                next = (next + 1) % leases.len();
            }
            guard.pass().await;
            for lease in leases {
                conn.release(lease).await;
            }
            conn.close().await;
            samples
        },
    )
    .await;
    Outcome::single("save", run.results.concat(), run.end - run.start, run.usage)
}

/// `sessions` sessions each ping the server in a loop until the end; the
/// clock starts once every session is connected.
async fn pings_workload<C: Leases>(
    params: Params,
    sessions: usize,
    server: &impl Server,
    connect: &impl AsyncFn(String) -> C,
) -> Outcome {
    let mut ready = Vec::with_capacity(sessions);
    for id in 0..sessions {
        ready.push(connect(format!("pings{sessions}-{id}")).await);
    }
    let run = measured(
        params.run_for,
        server,
        ready,
        |mut conn, end, guard| async move {
            let mut samples = Vec::new();
            while Instant::now() < end {
                let sent = Instant::now();
                conn.ping().await;
                samples.push(sent.elapsed());
            }
            guard.pass().await;
            conn.close().await;
            samples
        },
    )
    .await;
    Outcome::single("ping", run.results.concat(), run.end - run.start, run.usage)
}
