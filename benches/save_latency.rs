//! Save round trip of a 4 KiB profile, at 1 and at 32 concurrent sessions.
//!
//! Runs the real daemon in-process on a temporary directory (on the disk
//! that holds `TMPDIR`) and drives it through the client library over its
//! Unix socket. Each session holds one lease and saves back to back.
//!
//! ```sh
//! cargo bench --bench save_latency                       # fsync on every acknowledgement
//! PROFILED_BENCH_SYNC=false cargo bench --bench save_latency   # buffered WAL
//! PROFILED_BENCH_SECS=10 cargo bench --bench save_latency
//! ```

mod common;

use common::env_or;
use std::time::{Duration, Instant};

use profiled::Config;
use profiled_client::{Client, LoadPolicy, SessionId};

const DATA_SIZE: usize = 4096;

fn main() {
    let secs: u64 = env_or("PROFILED_BENCH_SECS", 5);
    let sync: bool = env_or("PROFILED_BENCH_SYNC", true);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        println!(
            "save round trip, {DATA_SIZE} B profile, sync={sync}, {secs} s per row, {} cores",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        println!("{:>8} {:>12} {:>10} {:>10} {:>10}", "sessions", "saves/s", "p50 us", "p99 us", "p999 us");
        for sessions in [1usize, 32] {
            let row = measure(sessions, Duration::from_secs(secs), sync).await;
            println!(
                "{:>8} {:>12.0} {:>10.1} {:>10.1} {:>10.1}",
                sessions, row.per_sec, row.p50, row.p99, row.p999
            );
            println!(
                "{{\"bench\":\"save_latency\",\"sessions\":{sessions},\"sync\":{sync},\"saves_per_sec\":{:.0},\"p50_us\":{:.1},\"p99_us\":{:.1},\"p999_us\":{:.1}}}",
                row.per_sec, row.p50, row.p99, row.p999
            );
        }
    });
}

struct Row {
    per_sec: f64,
    p50: f64,
    p99: f64,
    p999: f64,
}

async fn measure(sessions: usize, run_for: Duration, sync: bool) -> Row {
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

    let mut tasks = Vec::new();
    let start = Instant::now() + Duration::from_millis(200);
    for id in 0..sessions {
        let session = SessionId {
            place_id: 1,
            job_id: format!("bench-{id}"),
        };
        let client = Client::connect(&config.listen.socket, session)
            .await
            .expect("connect");
        let profile = client
            .load("Bench", &format!("p{id}"), LoadPolicy::ForceLoad)
            .await
            .expect("load");
        tasks.push(tokio::spawn(async move {
            let data: Vec<u8> = (0..DATA_SIZE).map(|i| (i % 251) as u8).collect();
            tokio::time::sleep_until(start.into()).await;
            let end = start + run_for;
            let mut samples = Vec::new();
            while Instant::now() < end {
                let sent = Instant::now();
                profile.save(data.clone()).await.expect("save");
                samples.push(sent.elapsed());
            }
            profile.release(None).await.expect("release");
            samples
        }));
    }
    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await.expect("session"));
    }
    let _ = stop.send(());
    server.await.expect("server task").expect("clean stop");

    samples.sort_unstable();
    let at = |q: f64| {
        let index = ((samples.len() as f64 * q) as usize).min(samples.len().saturating_sub(1));
        samples.get(index).map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    Row {
        per_sec: samples.len() as f64 / run_for.as_secs_f64(),
        p50: at(0.50),
        p99: at(0.99),
        p999: at(0.999),
    }
}
