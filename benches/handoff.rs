//! Handoff latency: the time from a `ForceLoad` request to its grant while
//! another session holds the profile and gives it up cooperatively.
//!
//! Runs the real daemon in-process on a temporary directory (on the disk
//! that holds `TMPDIR`) and drives it through the client library over its
//! Unix socket. Sessions A and B ping-pong one profile: the loader asks with
//! [`LoadPolicy::ForceLoad`], the holder receives
//! [`ProfileEvent::ReleaseRequested`] and releases with a final 2 KiB save,
//! and the loader's grant ends the sample. So each sample covers the
//! request, the release request to the holder, the holder's release (a
//! durable write when fsync is on) and the grant. One handoff is in flight
//! at a time.
//!
//! ```sh
//! cargo bench --bench handoff                                # 2,000 handoffs, fsync on
//! PROFILED_BENCH_SYNC=false cargo bench --bench handoff      # buffered WAL
//! PROFILED_BENCH_HANDOFFS=10000 cargo bench --bench handoff
//! ```

mod common;

use common::env_or;
use std::time::{Duration, Instant};

use profiled::Config;
use profiled_client::{Client, LoadOptions, LoadPolicy, Profile, ProfileEvent, SessionId};

const DATA_SIZE: usize = 2048;
const STORE: &str = "Bench";
const KEY: &str = "handoff";
/// Handoffs run first and not counted.
const WARMUP: usize = 50;

fn main() {
    let handoffs: usize = env_or("PROFILED_BENCH_HANDOFFS", 2000).max(1);
    let sync: bool = env_or("PROFILED_BENCH_SYNC", true);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        println!(
            "handoff: ForceLoad request to grant, holder releases with {DATA_SIZE} B on ReleaseRequested, \
             sync={sync}, {handoffs} handoffs (+{WARMUP} warm-up), {} cores",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        let row = measure(handoffs, sync).await;
        println!(
            "{:>9} {:>12} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "handoffs", "handoffs/s", "mean us", "p50 us", "p99 us", "p999 us", "max us"
        );
        println!(
            "{:>9} {:>12.0} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
            row.count, row.per_sec, row.mean, row.p50, row.p99, row.p999, row.max
        );
        println!(
            "{{\"bench\":\"handoff\",\"sync\":{sync},\"handoffs\":{},\"handoffs_per_sec\":{:.0},\"mean_us\":{:.1},\"p50_us\":{:.1},\"p99_us\":{:.1},\"p999_us\":{:.1},\"max_us\":{:.1}}}",
            row.count, row.per_sec, row.mean, row.p50, row.p99, row.p999, row.max
        );
    });
}

struct Row {
    count: usize,
    per_sec: f64,
    mean: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

async fn measure(handoffs: usize, sync: bool) -> Row {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::default();
    config.listen.socket = dir.path().join("bench.sock");
    config.storage.path = dir.path().join("data");
    config.storage.sync = sync;
    let listener = profiled::bind(&config.listen.socket, &config.access).expect("bind");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(profiled::run(config.clone(), listener, async {
        let _ = stopped.await;
    }));

    let mut clients = Vec::new();
    for name in ["a", "b"] {
        let session = SessionId {
            place_id: 1,
            job_id: format!("handoff-{name}"),
        };
        clients.push(
            Client::connect(&config.listen.socket, session)
                .await
                .expect("connect"),
        );
    }
    let force = LoadOptions {
        policy: LoadPolicy::ForceLoad,
        deadline: None,
    };
    let data: Vec<u8> = (0..DATA_SIZE).map(|i| (i % 251) as u8).collect();
    let mut holder = clients[0]
        .load_with(STORE, KEY, force.clone())
        .await
        .expect("first load");
    let mut side = 0;
    let mut samples = Vec::with_capacity(handoffs);
    let mut started = Instant::now();
    for round in 0..WARMUP + handoffs {
        if round == WARMUP {
            started = Instant::now();
        }
        let loader = 1 - side;
        let releaser = tokio::spawn(release_when_asked(holder, data.clone()));
        let sent = Instant::now();
        let granted = clients[loader]
            .load_with(STORE, KEY, force.clone())
            .await
            .expect("force load");
        let took = sent.elapsed();
        releaser.await.expect("releaser task");
        if round >= WARMUP {
            samples.push(took);
        }
        holder = granted;
        side = loader;
    }
    let elapsed = started.elapsed();
    holder.release(None).await.expect("last release");
    for client in clients {
        client.close().await;
    }
    let _ = stop.send(());
    server.await.expect("server task").expect("clean stop");

    samples.sort_unstable();
    let at = |q: f64| {
        let index = ((samples.len() as f64 * q) as usize).min(samples.len().saturating_sub(1));
        samples.get(index).map_or(0.0, micros)
    };
    let total: Duration = samples.iter().sum();
    Row {
        count: samples.len(),
        per_sec: samples.len() as f64 / elapsed.as_secs_f64(),
        mean: micros(&total) / samples.len().max(1) as f64,
        p50: at(0.50),
        p99: at(0.99),
        p999: at(0.999),
        max: samples.last().map_or(0.0, micros),
    }
}

/// The holder's side: waits for the daemon's release request, then releases
/// with final data.
async fn release_when_asked(mut profile: Profile, data: Vec<u8>) {
    match profile.next_event().await {
        Some(ProfileEvent::ReleaseRequested { .. }) => {
            profile.release(Some(data)).await.expect("release");
        }
        other => panic!("holder expected ReleaseRequested, got {other:?}"),
    }
}

fn micros(duration: &Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}
