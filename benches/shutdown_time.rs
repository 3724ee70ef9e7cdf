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

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use profiled_client::{Client, LoadPolicy, SessionId};

const SESSIONS: usize = 10;

fn main() {
    let leases: usize = std::env::var("PROFILED_BENCH_LEASES")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(10_000);
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("bench.sock");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[listen]\nsocket = {:?}\n[storage]\npath = {:?}\n[shutdown]\ngrace = \"0s\"\n[log]\nlevel = \"warn\"\n",
            socket,
            dir.path().join("data")
        ),
    )
    .expect("write config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_profiled"))
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn profiled");
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
    let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    let sent = Instant::now();
    kill(pid, Signal::SIGTERM).expect("SIGTERM");
    let status = child.wait().expect("wait");
    let elapsed = sent.elapsed();
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
