//! The memory workload: the daemon's resident memory with no held leases
//! and with many, and the difference per lease.
//!
//! The daemon binary runs as a child process, so `VmRSS` in
//! `/proc/<pid>/status` is the daemon's alone. 100 sessions connect first,
//! so the baseline already counts their connections; then they load the
//! leases between them (profiles with no data, so the figure is lease
//! bookkeeping, not profile data). Each figure is the smallest of a few
//! samples taken after the daemon settles, so a passing allocation spike
//! does not count. The difference includes whatever a grant costs in the
//! daemon, such as the lease records in RocksDB's memtable.

use std::time::{Duration, Instant};

use profiled_client::Role;

use crate::common::{ChildDaemon, rss_kib};
use crate::report::Report;
use crate::shutdown::{connect, hold};

const SESSIONS: usize = 100;
/// How long the daemon gets to settle before its RSS is sampled.
const SETTLE: Duration = Duration::from_secs(2);
const SAMPLES: usize = 5;
const SAMPLE_EVERY: Duration = Duration::from_millis(200);

/// Reads the daemon's RSS with 0 and with `leases` held leases and records
/// `memory.idle_mib`, `memory.loaded_mib` and `memory.per_lease_bytes`.
pub async fn run(leases: usize, report: &mut Report) {
    println!();
    println!(
        "memory: daemon RSS, {SESSIONS} sessions, 0 and {leases} held leases (no data), sync = true"
    );
    eprintln!("profiled memory with {leases} leases ...");
    let mut daemon = ChildDaemon::spawn("", "");
    let pid = daemon.pid();
    let clients = connect(&daemon.socket, "holder", SESSIONS, Role::Game).await;
    let idle_kib = settled_rss_kib(pid).await;
    let idle_memtables = memtable_bytes(&clients[0]).await;
    let started = Instant::now();
    let held = hold(&clients, "Memory", leases, |i| format!("k{i}")).await;
    let fill = started.elapsed();
    let loaded_kib = settled_rss_kib(pid).await;
    let loaded_memtables = memtable_bytes(&clients[0]).await;
    let count = held.len();
    let per_lease = (loaded_kib as f64 - idle_kib as f64) * 1024.0 / count.max(1) as f64;
    let memtables_per_lease = (loaded_memtables - idle_memtables) / count.max(1) as f64;
    let (status, _) = daemon.terminate();
    assert!(status.success(), "profiled exited with {status}");
    drop(held);
    for client in clients {
        client.close().await;
    }

    let mib = |kib: u64| kib as f64 / 1024.0;
    report.figure("memory.idle_mib", mib(idle_kib), "MiB");
    report.figure("memory.loaded_mib", mib(loaded_kib), "MiB");
    report.figure("memory.per_lease_bytes", per_lease, "B");
    report.figure("memory.memtable_per_lease_bytes", memtables_per_lease, "B");
    println!(
        "{:>10} {:>10} {:>10} {:>12} {:>16} {:>20}",
        "leases", "fill secs", "idle MiB", "loaded MiB", "bytes per lease", "of which memtables"
    );
    println!(
        "{count:>10} {:>10.2} {:>10.1} {:>12.1} {per_lease:>16.0} {memtables_per_lease:>20.0}",
        fill.as_secs_f64(),
        mib(idle_kib),
        mib(loaded_kib)
    );
}

/// The daemon's RocksDB memtables in use, in bytes (its
/// `profiled_memtable_bytes`): the lease records a grant writes sit there
/// until a flush.
async fn memtable_bytes(client: &profiled_client::Client) -> f64 {
    crate::daemon::read_metric(client, "profiled_memtable_bytes").await
}

/// The daemon's RSS after it settles: the smallest of a few samples.
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
