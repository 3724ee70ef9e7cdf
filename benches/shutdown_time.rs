//! Time from SIGTERM to exit with many held leases and clients that never
//! cooperate, on the real binary.
//!
//! The daemon's `shutdown.grace` is set to zero so the figure is the time
//! the daemon needs to stop loads, release every lease with an epoch check,
//! flush RocksDB and exit; a real deployment adds its configured grace.
//!
//! ```sh
//! cargo bench --bench shutdown_time                              # 10,000 leases
//! PROFILED_BENCH_LEASES=100000 cargo bench --bench shutdown_time
//! ```

mod common;

use common::{ChildDaemon, env_or};
use std::time::Duration;

use profiled_client::{Client, LoadPolicy, SessionId};

const SESSIONS: usize = 10;

fn main() {
    let leases: usize = env_or("PROFILED_BENCH_LEASES", 10_000);
    let mut daemon = ChildDaemon::spawn("", "");
    let socket = daemon.socket.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let clients = runtime.block_on(async {
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
        let mut loads = Vec::new();
        for (s, client) in clients.iter().enumerate() {
            let client = client.clone();
            let per = leases / SESSIONS;
            loads.push(tokio::spawn(async move {
                let mut held = Vec::with_capacity(per);
                for p in 0..per {
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
        (clients, held)
    });
    let held = clients.1.len();
    let (status, elapsed) = daemon.terminate();
    assert!(status.success(), "profiled exited with {status}");
    println!("SIGTERM to exit, {held} held leases, no cooperating clients, grace 0 s");
    println!("{:>10} {:>12}", "leases", "exit ms");
    println!("{held:>10} {:>12.1}", elapsed.as_secs_f64() * 1e3);
    println!(
        "{{\"bench\":\"shutdown_time\",\"leases\":{held},\"exit_ms\":{:.1}}}",
        elapsed.as_secs_f64() * 1e3
    );
    drop(clients);
}
