//! The daemon's resident memory with no held leases and with many, and the
//! difference per lease.
//!
//! The daemon binary runs as a child process on a temporary directory (on
//! the disk that holds `TMPDIR`), so `VmRSS` in `/proc/<pid>/status` is the
//! daemon's alone. 100 sessions connect first, so the baseline already
//! counts their connections; then each loads its share of the leases
//! (profiles with no data, so the figure is lease bookkeeping, not profile
//! data). Each figure is the smallest of a few samples taken after the
//! daemon settles. The difference includes whatever a grant costs in the
//! daemon, such as the lease records in RocksDB's memtable.
//!
//! ```sh
//! cargo bench --bench memory                                 # 100,000 leases
//! PROFILED_BENCH_LEASES=1000000 cargo bench --bench memory
//! PROFILED_BENCH_SYNC=false cargo bench --bench memory       # faster setup, same bookkeeping
//! ```

mod common;

use common::{ChildDaemon, env_or, rss_kib};
use std::time::{Duration, Instant};

use profiled_client::{Client, LoadPolicy, SessionId};

const SESSIONS: usize = 100;
const SETTLE: Duration = Duration::from_secs(2);
const SAMPLES: usize = 5;
const SAMPLE_EVERY: Duration = Duration::from_millis(200);

fn main() {
    let leases: usize = env_or("PROFILED_BENCH_LEASES", 100_000);
    let sync: bool = env_or("PROFILED_BENCH_SYNC", true);
    let per_session = leases.div_ceil(SESSIONS);
    let mut daemon = ChildDaemon::spawn(&format!("sync = {sync}\n"), "");
    let socket = daemon.socket.clone();
    let pid = daemon.pid();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "daemon RSS: {SESSIONS} sessions, 0 and {} held leases (no data), sync={sync}, {} cores",
        per_session * SESSIONS,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let (clients, held, idle_kib, held_kib, load_secs) = runtime.block_on(async {
        let mut clients = Vec::new();
        for s in 0..SESSIONS {
            let session = SessionId {
                place_id: 1,
                job_id: format!("holder-{s}"),
            };
            let client = loop {
                match Client::connect(&socket, session.clone()).await {
                    Ok(client) => break client,
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            };
            clients.push(client);
        }
        let idle_kib = settled_rss_kib(pid).await;

        let started = Instant::now();
        let mut loads = Vec::new();
        for (s, client) in clients.iter().enumerate() {
            let client = client.clone();
            loads.push(tokio::spawn(async move {
                let mut held = Vec::with_capacity(per_session);
                for p in 0..per_session {
                    let profile = client
                        .load("Bench", &format!("s{s}-{p}"), LoadPolicy::ForceLoad)
                        .await
                        .expect("load");
                    held.push(profile);
                }
                held
            }));
        }
        let mut held = Vec::new();
        for load in loads {
            held.extend(load.await.expect("loader"));
        }
        let load_secs = started.elapsed().as_secs_f64();
        let held_kib = settled_rss_kib(pid).await;
        (clients, held, idle_kib, held_kib, load_secs)
    });
    let count = held.len();
    let per_lease = (held_kib as f64 - idle_kib as f64) * 1024.0 / count.max(1) as f64;

    let (status, _) = daemon.terminate();
    drop(held);
    drop(clients);
    runtime.shutdown_timeout(Duration::from_secs(1));
    assert!(status.success(), "profiled exited with {status}");

    println!("{count} leases loaded in {load_secs:.1} s");
    println!(
        "{:>10} {:>12} {:>12} {:>16}",
        "leases", "idle KiB", "held KiB", "bytes per lease"
    );
    println!("{count:>10} {idle_kib:>12} {held_kib:>12} {per_lease:>16.0}");
    println!(
        "{{\"bench\":\"memory\",\"sessions\":{SESSIONS},\"leases\":{count},\"sync\":{sync},\"idle_rss_kib\":{idle_kib},\"held_rss_kib\":{held_kib},\"bytes_per_lease\":{per_lease:.0}}}"
    );
}

/// The daemon's RSS after it settles: the smallest of a few samples, so a
/// passing allocation spike does not count.
async fn settled_rss_kib(pid: u32) -> u64 {
    tokio::time::sleep(SETTLE).await;
    let mut least = u64::MAX;
    for _ in 0..SAMPLES {
        let rss = rss_kib(pid);
        if rss > 0 {
            least = least.min(rss);
        }
        tokio::time::sleep(SAMPLE_EVERY).await;
    }
    if least == u64::MAX { 0 } else { least }
}
