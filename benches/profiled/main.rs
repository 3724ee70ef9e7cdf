//! The profiled benchmark: every workload of issue 7 in one run, with
//! Redis and PostgreSQL as peers on the same machine, at the same
//! durability, and the floors that a Unix socket and the disk allow.
//!
//! ```sh
//! cargo bench --bench profiled                                   # everything, about N minutes
//! PROFILED_BENCH_ONLY=compare,handoff cargo bench --bench profiled
//! PROFILED_BENCH_SECS=3 PROFILED_BENCH_SESSIONS=64 cargo bench --bench profiled
//! ```
//!
//! Sections (`PROFILED_BENCH_ONLY`, comma-separated; all by default):
//!
//! - **floor**: what the machine allows at best, run first: a Unix-socket
//!   echo of save-sized requests at W = 1 and W = N (the server on its own
//!   runtime and threads), 2 KiB appends each followed by fdatasync on a
//!   file under `TMPDIR`, the same overwriting blocks written beforehand
//!   (as a recycled write-ahead log does), and the echo at W = 1 with a
//!   server that writes each request that way and fdatasyncs it before it
//!   replies (the floor of a durable save's round trip). The targets table prints the floor beside each
//!   latency target that has one.
//! - **compare**: the sessions and saves workloads on profiled and on each
//!   peer, at fsync and at buffered durability. Each workload runs for
//!   `PROFILED_BENCH_SECS` (default 10 s).
//!   - *sessions*: `PROFILED_BENCH_SESSIONS` (W, default 32) concurrent
//!     sessions over `PROFILED_BENCH_PROFILES` (P, default 10,000)
//!     profiles of 2 KiB (half random bytes, half zeros). Each session
//!     loops: load a random free profile, save it 5 times, release it.
//!     profiled loads with `LoadPolicy::Cancel` and picks another key on
//!     `Taken`; the peers' acquire fails if the profile is owned.
//!   - *saves*: each session holds `PROFILED_BENCH_LEASES` (L, default
//!     100) leases and saves them round-robin, at W = 1 and at W = 32.
//!   - *pings*: W sessions each make round trips that touch no data
//!     (profiled's `Ping`, Redis's `PING`, PostgreSQL's empty query): each
//!     system's own floor, which tells its protocol and connection costs
//!     from its lease work.
//!
//!   After each workload's table, `server CPU per op` gives each system's
//!   server CPU time (user and system, from `/proc/<pid>/stat`) over the
//!   measured window divided by the operations completed in it, in µs: a
//!   figure that a noisy machine sways far less than throughput. The
//!   server is the whole process tree: profiled's and Redis's one process
//!   with all its threads and any child it forks, and PostgreSQL's
//!   postmaster with every backend and helper (WAL writer, checkpointer).
//!   The window runs from the common start until every session's last
//!   measured operation is acknowledged, before leases are released and
//!   connections closed. Operations are every granted load, save and
//!   release (refused loads are not counted, but the server's work on them
//!   is); the ratio is profiled's over the peer's, so below 1 is better for
//!   profiled. JSON: `compare.<durability>.<workload>.cpu_us_per_op.<system>`.
//!   `client CPU per op` is the same for the bench process itself (its own
//!   threads, not the servers it spawned): the client library or wire code
//!   that drives each system, which shares the cores with the server
//!   (`...client_cpu_us_per_op.<system>`). The figures are left out where
//!   procfs cannot be read. CPU times come in clock ticks (`getconf
//!   CLK_TCK`, usually 10 ms), so a short run makes it coarse.
//!
//!   `WAL syncs per op` (profiled at fsync; the peers do not count theirs)
//!   is the daemon's `profiled_wal_syncs_total` over the same window, read
//!   through a connection of the bench's own, divided by the operations:
//!   its inverse is how many acknowledgements one sync carried
//!   (`...wal_syncs_per_op.profiled`).
//!
//!   `PROFILED_BENCH_PEERS` (comma-separated, default `redis,postgres`;
//!   empty for none) picks the peers, for comparing two builds of profiled
//!   alone.
//!
//!   The peers are Redis (a hash per profile, a Lua script per operation,
//!   AOF with `appendfsync always` or `everysec`) and PostgreSQL (a row
//!   per profile, a prepared statement per operation over a hand-written
//!   wire-protocol client, `synchronous_commit` on or off).
//! - **handoff**: sessions A and B ping-pong one profile; the loader
//!   force-loads, the holder releases with 2 KiB on `ReleaseRequested`.
//!   p50/p99/p999 from request to grant over `PROFILED_BENCH_HANDOFFS`
//!   (default 2,000) handoffs, at fsync and at buffered durability.
//! - **shutdown**: SIGTERM to exit with held leases whose 10 sessions never
//!   release, at each size in `PROFILED_BENCH_SHUTDOWN_LEASES` (a comma
//!   list, default `10000,100000`), on a fresh daemon each.
//! - **memory**: daemon RSS with 100 sessions holding 0 and then
//!   `PROFILED_BENCH_MEMORY_LEASES` (default 100,000) leases without data,
//!   and the difference per lease.
//! - **restart**: spawn to ready (a handshake and a granted load of a stored
//!   profile) with `PROFILED_BENCH_RESTART_PROFILES` (default 1,000,000)
//!   profiles of 2 KiB, imported first, after a clean stop and after a
//!   SIGKILL with `PROFILED_BENCH_RESTART_LEASES` (default 10,000) leases
//!   held. Populating takes most of this section's time.
//!
//! A CI smoke run: `PROFILED_BENCH_SECS=1 PROFILED_BENCH_HANDOFFS=100
//! PROFILED_BENCH_SHUTDOWN_LEASES=1000 PROFILED_BENCH_MEMORY_LEASES=1000
//! PROFILED_BENCH_RESTART_PROFILES=10000 PROFILED_BENCH_RESTART_LEASES=100`.
//!
//! Every system is a child process on its own temporary directory and
//! Unix socket; the bench's clients share one tokio runtime, with
//! `PROFILED_BENCH_CLIENT_WORKERS` worker threads (default: one per core
//! the bench may run on). By default servers and clients share every core,
//! so each system's figures include the cost of its client. To compare the
//! servers alone, give them cores of their own: `PROFILED_BENCH_SERVER_CPUS`
//! and `PROFILED_BENCH_CLIENT_CPUS` take CPU lists as `taskset -c` does
//! (`0`, `2-3`), and pin every server (profiled, Redis, PostgreSQL, the
//! floor's echo) and the bench's own threads to them.
//! A peer that is not installed is skipped with a note. The last lines are JSON, one
//! object per figure, for scripts.

#[path = "../common/mod.rs"]
mod common;
mod daemon;
mod floor;
mod handoff;
mod memory;
mod postgres;
mod redis;
mod report;
mod restart;
mod shutdown;
mod workload;

use std::time::Duration;

use common::env_or;
use report::Report;
use workload::{Durability, Outcome, Params};

fn main() {
    let only: Option<Vec<String>> = std::env::var("PROFILED_BENCH_ONLY")
        .ok()
        .map(|list| list.split(',').map(|s| s.trim().to_owned()).collect());
    let wants = |section: &str| {
        only.as_ref()
            .is_none_or(|list| list.iter().any(|s| s == section))
    };
    let params = Params {
        run_for: Duration::from_secs_f64(
            env_or("PROFILED_BENCH_SECS", 10.0f64).clamp(0.01, 86_400.0),
        ),
        sessions: env_or("PROFILED_BENCH_SESSIONS", 32usize).max(1),
        profiles: env_or("PROFILED_BENCH_PROFILES", 10_000u64).max(1),
        leases: env_or("PROFILED_BENCH_LEASES", 100usize).max(1),
    };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    // Before the runtime starts, so that its workers inherit the pinning.
    common::pin_this_thread(common::CLIENT_CPUS);
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Ok(workers) = std::env::var("PROFILED_BENCH_CLIENT_WORKERS") {
        let workers = workers
            .parse()
            .expect("PROFILED_BENCH_CLIENT_WORKERS is a count");
        runtime.worker_threads(workers);
    }
    let runtime = runtime.enable_all().build().expect("runtime");
    let mut report = Report::new();
    println!(
        "profiled bench: {} cores, {} GiB memory, TMPDIR on {}, idle CPUs {}",
        cores,
        common::memory_gib(),
        std::env::temp_dir().display(),
        idle_cpus(),
    );
    if let Some(cpus) = common::cpu_list(common::SERVER_CPUS) {
        println!("servers pinned to CPUs {cpus}");
    }
    if let Some(cpus) = common::cpu_list(common::CLIENT_CPUS) {
        println!("the bench's clients pinned to CPUs {cpus}");
    }
    if wants("floor") {
        runtime.block_on(floor::run(params, &mut report));
    }
    if wants("compare") {
        runtime.block_on(compare(params, &mut report));
    }
    if wants("handoff") {
        let handoffs = env_or("PROFILED_BENCH_HANDOFFS", 2000usize).max(1);
        runtime.block_on(handoff::run(handoffs, &mut report));
    }
    if wants("shutdown") {
        let sizes: Vec<usize> = std::env::var("PROFILED_BENCH_SHUTDOWN_LEASES")
            .ok()
            .map(|list| {
                list.split(',')
                    .filter_map(|s| s.trim().parse().ok())
                    .collect()
            })
            .unwrap_or_else(|| vec![10_000, 100_000]);
        runtime.block_on(shutdown::run(&sizes, &mut report));
    }
    if wants("memory") {
        let leases = env_or("PROFILED_BENCH_MEMORY_LEASES", 100_000usize).max(1);
        runtime.block_on(memory::run(leases, &mut report));
    }
    if wants("restart") {
        let profiles = env_or("PROFILED_BENCH_RESTART_PROFILES", 1_000_000usize);
        let leases = env_or("PROFILED_BENCH_RESTART_LEASES", 10_000usize);
        runtime.block_on(restart::run(profiles, leases, &mut report));
    }
    report.print();
}

/// The sessions and saves workloads on profiled and each peer.
async fn compare(params: Params, report: &mut Report) {
    println!(
        "compare: {} B profiles (half random), {:.1} s per workload, W={} sessions, P={} profiles, \
         L={} leases per session in saves",
        workload::DATA_SIZE,
        params.run_for.as_secs_f64(),
        params.sessions,
        params.profiles,
        params.leases,
    );
    let peers = std::env::var("PROFILED_BENCH_PEERS").unwrap_or_else(|_| "redis,postgres".into());
    let wanted = |peer: &str| peers.split(',').any(|p| p.trim() == peer);
    let redis = wanted("redis") && redis::available();
    if wanted("redis") && !redis {
        println!("note: redis-server not found on PATH; Redis is skipped");
    }
    let postgres = wanted("postgres") && postgres::available();
    if wanted("postgres") && !postgres {
        println!("note: initdb or postgres not found on PATH; PostgreSQL is skipped");
    }
    let saves = [1, params.sessions];
    let mut names = vec![format!("sessions W={}", params.sessions)];
    names.extend(saves.iter().map(|w| format!("saves W={w}")));
    names.push(format!("pings W={}", params.sessions));
    for durability in [Durability::Fsync, Durability::Buffered] {
        // (system, one outcome per workload)
        let mut systems: Vec<(&'static str, Vec<Outcome>)> = Vec::new();
        systems.push(("profiled", daemon::run(durability, params, &saves).await));
        if redis {
            systems.push(("redis", redis::run(durability, params, &saves).await));
        }
        if postgres {
            systems.push(("postgres", postgres::run(durability, params, &saves).await));
        }
        for (index, name) in names.iter().enumerate() {
            let outcomes: Vec<(&'static str, &Outcome)> = systems
                .iter()
                .filter_map(|(system, outcomes)| outcomes.get(index).map(|o| (*system, o)))
                .collect();
            report.comparison(name, durability, &outcomes);
        }
    }
}

/// How this machine's idle CPUs wait, which sets what waking a thread
/// costs: the cpuidle driver, and for a virtual machine's `haltpoll` how
/// long an idle CPU polls before it halts. A halted virtual CPU is woken
/// through the hypervisor, tens of microseconds on the machine of the
/// README's table, where the poll is 0; every thread hop pays that.
fn idle_cpus() -> String {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .ok()
            .map(|text| text.trim().to_owned())
    };
    let driver = read("/sys/devices/system/cpu/cpuidle/current_driver")
        .unwrap_or_else(|| "unknown".to_owned());
    match read("/sys/module/haltpoll/parameters/guest_halt_poll_ns") {
        Some(ns) if driver == "haltpoll" => format!("haltpoll (polls {ns} ns before halting)"),
        _ => driver,
    }
}
