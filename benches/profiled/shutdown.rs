//! The shutdown workload: the time from SIGTERM to exit with many held
//! leases and clients that never cooperate, on the daemon binary at its
//! default durability (synced WAL).
//!
//! The daemon's `shutdown.grace` is zero (as every bench daemon's), so the
//! figure is the time the daemon needs to stop loads, release every lease
//! with an epoch check, flush RocksDB and exit; a real deployment adds its
//! configured grace. The holders ignore the `ShuttingDown` notice and keep
//! their connections open until the daemon has exited.
//!
//! Also home to [`connect`] and [`hold`], which the memory and restart
//! workloads use to fill the lease table the same way.

use std::path::Path;
use std::time::{Duration, Instant};

use futures::StreamExt;
use profiled_client::{Client, ConnectOptions, LoadPolicy, Profile, Role, SessionId};

use crate::common::ChildDaemon;
use crate::report::Report;

/// The sessions that hold the leases, as the older shutdown bench had.
const SESSIONS: usize = 10;
/// Loads in flight at once while filling the lease table: enough that group
/// commit gathers many grants into each sync, so set-up stays short.
const IN_FLIGHT: usize = 256;

/// Measures SIGTERM to exit once per entry of `sizes` (held leases), each
/// on a fresh daemon, and records `shutdown.<leases>.secs`.
pub async fn run(sizes: &[usize], report: &mut Report) {
    println!();
    println!(
        "shutdown: SIGTERM to exit, {SESSIONS} sessions that never release, grace 0 s, sync = true"
    );
    let mut rows = Vec::new();
    for &leases in sizes {
        eprintln!("profiled shutdown with {leases} leases ...");
        // Each session holds a tenth of the leases, more than a session
        // may by default with 200-byte names; the bench's are short.
        let limits = format!(
            "[limits]\nmax_name = 64\nmax_leases_per_session = {}\n",
            leases.div_ceil(SESSIONS)
        );
        let mut daemon = ChildDaemon::spawn("", &limits);
        let clients = connect(&daemon.socket, "holder", SESSIONS, Role::Game).await;
        let started = Instant::now();
        let held = hold(&clients, "Shutdown", leases, |i| format!("k{i}")).await;
        let fill = started.elapsed();
        let (status, took) = daemon.terminate();
        assert!(status.success(), "profiled exited with {status}");
        report.figure(&format!("shutdown.{leases}.secs"), took.as_secs_f64(), "s");
        rows.push((held.len(), fill, took));
        drop(held);
        for client in clients {
            client.close().await;
        }
    }
    println!("{:>10} {:>14} {:>12}", "leases", "fill secs", "exit secs");
    for (leases, fill, took) in rows {
        println!(
            "{leases:>10} {:>14.2} {:>12.3}",
            fill.as_secs_f64(),
            took.as_secs_f64()
        );
    }
}

/// Connects `sessions` clients named `<prefix>-<n>` with `role`, waiting
/// for the daemon to answer. Reconnecting is off: a dropped connection must
/// end the client, not have it resume leases behind the bench's back (as it
/// would after a SIGKILL and restart).
pub async fn connect(socket: &Path, prefix: &str, sessions: usize, role: Role) -> Vec<Client> {
    let options = ConnectOptions {
        role,
        reconnect_for: Duration::ZERO,
        ..ConnectOptions::default()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut clients = Vec::with_capacity(sessions);
    for s in 0..sessions {
        let session = SessionId {
            place_id: 1,
            job_id: format!("{prefix}-{s}"),
        };
        let client = loop {
            match Client::connect_with(socket, session.clone(), options.clone()).await {
                Ok(client) => break client,
                Err(err) => {
                    assert!(Instant::now() < deadline, "profiled did not answer: {err}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        };
        clients.push(client);
    }
    clients
}

/// Loads `leases` profiles of `store`, the `i`th named `key(i)` and held by
/// client `i % clients.len()`, with up to [`IN_FLIGHT`] loads at once.
/// Returns the held profiles; they stay held until dropped or released.
pub async fn hold(
    clients: &[Client],
    store: &str,
    leases: usize,
    key: impl Fn(usize) -> String,
) -> Vec<Profile> {
    futures::stream::iter(0..leases)
        .map(|i| {
            let client = clients[i % clients.len()].clone();
            let store = store.to_owned();
            let key = key(i);
            async move {
                client
                    .load(&store, &key, LoadPolicy::Cancel)
                    .await
                    .expect("load")
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await
}
