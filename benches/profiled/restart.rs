//! The restart workload: the time from starting the daemon to ready with
//! many stored profiles, after a clean stop and after a SIGKILL.
//!
//! Ready means what a game server needs: the socket accepts a client's
//! handshake *and* a load of a stored profile is granted with its data. The
//! clock starts just before the process is spawned, so it counts exec,
//! binding the socket, opening RocksDB (with WAL replay after a SIGKILL),
//! reloading the previous run's leases and the first read.
//!
//! The profiles are written through the admin `Import` request (the bench
//! runs as the daemon's own user, which is an admin), many at once over a
//! few connections, so group commit gathers them into few synced writes.
//! Each is 2 KiB, half random, as in every other workload. The daemon then
//! stops cleanly (SIGTERM), which flushes RocksDB, and is timed to ready.
//! Next, sessions hold leases on stored profiles and the daemon is killed
//! with SIGKILL, so the second start replays the WAL and reloads those
//! leases for their sessions to resume.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use profiled_client::{Client, ConnectOptions, ExportedProfile, LoadPolicy, Role, SessionId};

use crate::common::ChildDaemon;
use crate::report::Report;
use crate::shutdown::{connect, hold};
use crate::workload::{DATA_SIZE, Rng, profile_data};

const STORE: &str = "Restart";
/// Admin connections that import the profiles.
const IMPORTERS: usize = 8;
/// Imports in flight at once, across the importers.
const IN_FLIGHT: usize = 512;
/// Sessions holding leases when the daemon is killed.
const HOLDERS: usize = 10;

/// Stores `profiles` profiles, then times two starts to ready: after a
/// clean stop and after a SIGKILL with `leases` held. Records
/// `restart.clean.secs`, `restart.killed.secs` and how long populating took.
pub async fn run(profiles: usize, leases: usize, report: &mut Report) {
    let profiles = profiles.max(2);
    // The probe key is the last one; the held leases are the first ones.
    let leases = leases.min(profiles - 1);
    let probe = key(profiles - 1);
    println!();
    println!(
        "restart: spawn to handshake and a granted load, {profiles} stored profiles of \
         {DATA_SIZE} B (half random), sync = true; SIGKILL with {leases} held leases"
    );
    let mut daemon = ChildDaemon::spawn("", "");

    eprintln!("profiled restart: importing {profiles} profiles ...");
    let importers = connect(&daemon.socket, "importer", IMPORTERS, Role::Admin).await;
    let started = Instant::now();
    populate(&importers, profiles).await;
    let populate = started.elapsed();
    let status = importers[0].status().await.expect("status");
    for client in importers {
        client.close().await;
    }
    let storage_mib = status.storage_bytes as f64 / (1024.0 * 1024.0);
    eprintln!(
        "profiled restart: imported in {:.1} s ({:.0}/s), {storage_mib:.0} MiB on disk",
        populate.as_secs_f64(),
        profiles as f64 / populate.as_secs_f64().max(1e-9)
    );
    let (exit, stop) = daemon.terminate();
    assert!(exit.success(), "profiled exited with {exit}");

    eprintln!("profiled restart after a clean stop ...");
    let clean = ready(&mut daemon, &probe).await;

    let holders = connect(&daemon.socket, "holder", HOLDERS, Role::Game).await;
    let held = hold(&holders, STORE, leases, key).await;
    daemon.kill();
    drop(held);
    for client in holders {
        client.close().await;
    }

    eprintln!("profiled restart after SIGKILL ...");
    let killed = ready(&mut daemon, &probe).await;
    let admin = connect(&daemon.socket, "admin", 1, Role::Admin).await;
    let recovered = admin[0].status().await.expect("status").leases_held;
    for client in admin {
        client.close().await;
    }
    let (exit, _) = daemon.terminate();
    assert!(exit.success(), "profiled exited with {exit}");

    report.figure("restart.populate.secs", populate.as_secs_f64(), "s");
    report.figure("restart.storage_mib", storage_mib, "MiB");
    report.figure("restart.stop.secs", stop.as_secs_f64(), "s");
    report.figure("restart.clean.secs", clean.ready.as_secs_f64(), "s");
    report.figure(
        "restart.clean.handshake_secs",
        clean.handshake.as_secs_f64(),
        "s",
    );
    report.figure("restart.killed.secs", killed.ready.as_secs_f64(), "s");
    report.figure(
        "restart.killed.handshake_secs",
        killed.handshake.as_secs_f64(),
        "s",
    );
    report.figure(
        "restart.killed.recovered_leases",
        recovered as f64,
        "leases",
    );
    println!(
        "populated in {:.1} s ({:.0} imports/s), {storage_mib:.0} MiB on disk, SIGTERM to exit {:.2} s",
        populate.as_secs_f64(),
        profiles as f64 / populate.as_secs_f64().max(1e-9),
        stop.as_secs_f64()
    );
    println!(
        "{:<8} {:>10} {:>15} {:>11} {:>19}",
        "after", "profiles", "handshake secs", "ready secs", "leases recovered"
    );
    for (after, start, leases) in [("SIGTERM", &clean, 0), ("SIGKILL", &killed, recovered)] {
        println!(
            "{after:<8} {profiles:>10} {:>15.3} {:>11.3} {leases:>19}",
            start.handshake.as_secs_f64(),
            start.ready.as_secs_f64()
        );
    }
}

fn key(i: usize) -> String {
    format!("p{i}")
}

/// Imports profiles `p0` to `p<profiles - 1>`, each with its own 2 KiB.
async fn populate(importers: &[Client], profiles: usize) {
    let step = (profiles / 10).max(1);
    let started = Instant::now();
    let mut done = 0usize;
    let mut imports = futures::stream::iter(0..profiles)
        .map(|i| {
            let client = importers[i % importers.len()].clone();
            let profile = ExportedProfile {
                key: key(i),
                version: 0,
                updated_at_ms: 0,
                data: Some(profile_data(&mut Rng::new(i as u64 + 1))),
                meta_tags: BTreeMap::new(),
                user_ids: Vec::new(),
            };
            async move { client.import(STORE, profile).await.expect("import") }
        })
        .buffer_unordered(IN_FLIGHT);
    while imports.next().await.is_some() {
        done += 1;
        if done.is_multiple_of(step) {
            eprintln!(
                "  {done} imported, {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
    }
}

/// One start's times, from just before the spawn.
struct Start {
    /// Until a client's handshake completed.
    handshake: Duration,
    /// Until a load of a stored profile was granted.
    ready: Duration,
}

/// Starts the daemon again on its data and waits until it is ready, polling
/// every millisecond.
async fn ready(daemon: &mut ChildDaemon, probe: &str) -> Start {
    let options = ConnectOptions {
        reconnect_for: Duration::ZERO,
        ..ConnectOptions::default()
    };
    let session = SessionId {
        place_id: 1,
        job_id: "ready".to_owned(),
    };
    let spawned = Instant::now();
    daemon.respawn();
    let deadline = spawned + Duration::from_secs(120);
    let client = loop {
        match Client::connect_with(&daemon.socket, session.clone(), options.clone()).await {
            Ok(client) => break client,
            Err(err) => {
                assert!(Instant::now() < deadline, "profiled did not answer: {err}");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    };
    let handshake = spawned.elapsed();
    let profile = client
        .load(STORE, probe, LoadPolicy::Cancel)
        .await
        .expect("load a stored profile");
    let ready = spawned.elapsed();
    assert_eq!(
        profile.data().map(<[u8]>::len),
        Some(DATA_SIZE),
        "the stored profile came back without its data"
    );
    profile.release(None).await.expect("release");
    client.close().await;
    Start { handshake, ready }
}
