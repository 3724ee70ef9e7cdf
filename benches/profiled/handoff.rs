//! The handoff workload: the time from a `ForceLoad` request to its grant
//! while another session holds the profile and gives it up when asked.
//!
//! Sessions A and B ping-pong one profile on a daemon that runs as a child
//! process: the loader asks with [`LoadPolicy::ForceLoad`], the holder
//! receives [`ProfileEvent::ReleaseRequested`] and releases with a final
//! 2 KiB save, and the loader's grant ends the sample. So each sample
//! covers the request, the release request to the holder, the holder's
//! release (a durable write at fsync durability) and the grant. One handoff
//! is in flight at a time, so the figure is latency, not throughput.

use std::time::{Duration, Instant};

use profiled_client::{
    Client, ConnectOptions, LoadOptions, LoadPolicy, Profile, ProfileEvent, SessionId,
};

use crate::daemon;
use crate::report::Report;
use crate::workload::{DATA_SIZE, Durability, Rng, profile_data};

const STORE: &str = "Handoff";
const KEY: &str = "handoff";
/// Handoffs run first and not counted, so connection set-up and the first
/// RocksDB writes do not land in the tail.
const WARMUP: usize = 50;

/// One durability level's figures, in milliseconds.
struct Row {
    count: usize,
    per_sec: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
    /// WAL syncs per measured handoff, from the daemon's own counter: 1.0
    /// when the holder's release and the grant behind it share one sync.
    syncs: f64,
}

/// Runs `handoffs` handoffs at fsync and at buffered durability, each on a
/// fresh daemon, and records `handoff.<sync>.p50_ms`, `.p99_ms` and
/// `.p999_ms`.
pub async fn run(handoffs: usize, report: &mut Report) {
    println!();
    println!(
        "handoff: ForceLoad request to grant, holder releases with {DATA_SIZE} B on \
         ReleaseRequested, {handoffs} handoffs (+{WARMUP} warm-up) per durability"
    );
    let mut rows = Vec::new();
    for durability in [Durability::Fsync, Durability::Buffered] {
        eprintln!("profiled {} handoffs ...", durability.name());
        let row = measure(durability, handoffs).await;
        let base = format!("handoff.{}", durability.name());
        report.figure(&format!("{base}.p50_ms"), row.p50, "ms");
        report.figure(&format!("{base}.p99_ms"), row.p99, "ms");
        report.figure(&format!("{base}.p999_ms"), row.p999, "ms");
        report.figure(&format!("{base}.max_ms"), row.max, "ms");
        report.figure(&format!("{base}.per_sec"), row.per_sec, "1/s");
        report.figure(&format!("{base}.syncs_per_handoff"), row.syncs, "1");
        rows.push((durability, row));
    }
    println!(
        "{:<9} {:>9} {:>12} {:>9} {:>9} {:>9} {:>9} {:>8}",
        "sync", "handoffs", "handoffs/s", "p50 ms", "p99 ms", "p999 ms", "max ms", "syncs"
    );
    for (durability, row) in rows {
        println!(
            "{:<9} {:>9} {:>12.0} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>8.2}",
            durability.name(),
            row.count,
            row.per_sec,
            row.p50,
            row.p99,
            row.p999,
            row.max,
            row.syncs
        );
    }
}

async fn measure(durability: Durability, handoffs: usize) -> Row {
    let mut daemon = daemon::start(durability).await;
    // Reconnecting is off: a handoff must never hide a dropped connection.
    let options = ConnectOptions {
        reconnect_for: Duration::ZERO,
        ..ConnectOptions::default()
    };
    let mut clients = Vec::new();
    for name in ["a", "b"] {
        let session = SessionId {
            place_id: 1,
            job_id: format!("handoff-{name}"),
        };
        clients.push(
            Client::connect_with(&daemon.socket, session, options.clone())
                .await
                .expect("connect"),
        );
    }
    let force = LoadOptions {
        policy: LoadPolicy::ForceLoad,
        deadline: None,
    };
    let data = profile_data(&mut Rng::new(7));
    let mut holder = clients[0]
        .load_with(STORE, KEY, force.clone())
        .await
        .expect("first load");
    let mut side = 0;
    let mut samples = Vec::with_capacity(handoffs);
    let mut started = Instant::now();
    let mut syncs_before = 0.0;
    for round in 0..WARMUP + handoffs {
        if round == WARMUP {
            started = Instant::now();
            syncs_before = wal_syncs(&clients[0]).await;
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
    let syncs = wal_syncs(&clients[0]).await - syncs_before;
    holder.release(None).await.expect("last release");
    for client in clients {
        client.close().await;
    }
    let (status, _) = daemon.terminate();
    assert!(status.success(), "profiled exited with {status}");

    samples.sort_unstable();
    let millis = |d: &Duration| d.as_secs_f64() * 1e3;
    let at = |q: f64| {
        let index = ((samples.len() as f64 * q) as usize).min(samples.len().saturating_sub(1));
        samples.get(index).map_or(0.0, millis)
    };
    Row {
        count: samples.len(),
        per_sec: samples.len() as f64 / elapsed.as_secs_f64().max(1e-9),
        p50: at(0.50),
        p99: at(0.99),
        p999: at(0.999),
        max: samples.last().map_or(0.0, millis),
        syncs: syncs / samples.len().max(1) as f64,
    }
}

/// The daemon's count of WAL syncs made for acknowledgements.
async fn wal_syncs(client: &Client) -> f64 {
    daemon::read_metric(client, "profiled_wal_syncs_total").await
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
