//! profiled itself: the daemon binary as a child process on a temporary
//! directory (like the peers, so it has its own process and scheduler
//! share), driven through the client library over its Unix socket, one
//! connection per session.

use std::path::Path;
use std::time::{Duration, Instant};

use profiled_client::{Client, ErrorCode, LoadPolicy, Profile, SessionId};

use crate::common::ChildDaemon;
use crate::workload::{
    Durability, Outcome, Params, Rng, SAVE_STORE, SAVES_PER_SESSION, SESSION_STORE, SessionSamples,
    profile_data,
};

/// Starts the daemon at `durability` and waits until it answers.
pub async fn start(durability: Durability) -> ChildDaemon {
    let sync = durability == Durability::Fsync;
    let daemon = ChildDaemon::spawn(&format!("sync = {sync}\n"), "");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(client) = connect(&daemon.socket, "bench-ready".to_owned()).await {
            client.close().await;
            break daemon;
        }
        assert!(Instant::now() < deadline, "profiled did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs the sessions workload and then the saves workloads (one per entry
/// of `saves`, the number of sessions) on a fresh daemon.
pub async fn run(durability: Durability, params: Params, saves: &[usize]) -> Vec<Outcome> {
    let mut daemon = start(durability).await;
    eprintln!("profiled {} sessions ...", durability.name());
    let mut outcomes = vec![sessions(&daemon.socket, params).await];
    for &w in saves {
        eprintln!("profiled {} saves W={w} ...", durability.name());
        outcomes.push(saves_workload(&daemon.socket, params, w).await);
    }
    let (status, _) = daemon.terminate();
    assert!(status.success(), "profiled exited with {status}");
    outcomes
}

async fn connect(socket: &Path, name: String) -> Result<Client, profiled_client::ClientError> {
    let session = SessionId {
        place_id: 1,
        job_id: name,
    };
    Client::connect(socket, session).await
}

async fn sessions(socket: &Path, params: Params) -> Outcome {
    let start = Instant::now() + Duration::from_millis(200);
    let end = start + params.run_for;
    let mut tasks = Vec::new();
    for id in 0..params.sessions {
        let client = connect(socket, format!("sessions-{id}"))
            .await
            .expect("connect");
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(id as u64 + 1);
            let data = profile_data(&mut rng);
            let mut samples = SessionSamples::default();
            tokio::time::sleep_until(start.into()).await;
            while Instant::now() < end {
                let began = Instant::now();
                let profile = loop {
                    let key = format!("p{}", rng.below(params.profiles));
                    let sent = Instant::now();
                    match client.load(SESSION_STORE, &key, LoadPolicy::Cancel).await {
                        Ok(profile) => {
                            samples.load.push(sent.elapsed());
                            break profile;
                        }
                        Err(err) if matches!(err.code(), Some(ErrorCode::Taken { .. })) => {
                            samples.taken += 1;
                        }
                        Err(err) => panic!("load: {err}"),
                    }
                };
                for _ in 0..SAVES_PER_SESSION {
                    let sent = Instant::now();
                    profile.save(data.clone()).await.expect("save");
                    samples.save.push(sent.elapsed());
                }
                let sent = Instant::now();
                profile.release(None).await.expect("release");
                samples.release.push(sent.elapsed());
                samples.session.push(began.elapsed());
            }
            client.close().await;
            samples
        }));
    }
    let mut all = SessionSamples::default();
    for task in tasks {
        all.merge(task.await.expect("session task"));
    }
    all.outcome(start.elapsed())
}

async fn saves_workload(socket: &Path, params: Params, sessions: usize) -> Outcome {
    let start = Instant::now() + Duration::from_millis(500);
    let end = start + params.run_for;
    let mut tasks = Vec::new();
    for id in 0..sessions {
        let client = connect(socket, format!("saves{sessions}-{id}"))
            .await
            .expect("connect");
        let mut profiles: Vec<Profile> = Vec::with_capacity(params.leases);
        for lease in 0..params.leases {
            let key = format!("w{sessions}-s{id}-l{lease}");
            profiles.push(
                client
                    .load(SAVE_STORE, &key, LoadPolicy::Cancel)
                    .await
                    .expect("load"),
            );
        }
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(1000 + id as u64);
            let data = profile_data(&mut rng);
            let mut samples = Vec::new();
            tokio::time::sleep_until(start.into()).await;
            let mut next = 0;
            while Instant::now() < end {
                let sent = Instant::now();
                profiles[next].save(data.clone()).await.expect("save");
                samples.push(sent.elapsed());
                next = (next + 1) % profiles.len();
            }
            for profile in profiles {
                profile.release(None).await.expect("release");
            }
            client.close().await;
            samples
        }));
    }
    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await.expect("save task"));
    }
    Outcome::saves(samples, end - start)
}
