//! profiled itself: the daemon binary as a child process on a temporary
//! directory (like the peers, so it has its own process and scheduler
//! share), driven through the client library over its Unix socket, one
//! connection per session.

use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

use profiled_client::{Client, ErrorCode, LoadPolicy, Metric, Profile, SessionId};

use crate::common::{ChildDaemon, ProcessTree};
use crate::workload::{self, Durability, Leases, Outcome, Params, Server};

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
    let server = Probe {
        tree: ProcessTree::new(daemon.pid()),
        stats: connect(&daemon.socket, "bench-stats".to_owned())
            .await
            .expect("connect for stats"),
    };
    let outcomes = workload::run(
        "profiled",
        durability,
        params,
        saves,
        &server,
        async |name| connect(&daemon.socket, name).await.expect("connect"),
    )
    .await;
    server.stats.close().await;
    let (status, _) = daemon.terminate();
    assert!(status.success(), "profiled exited with {status}");
    outcomes
}

/// What the workloads read of the daemon: its process's CPU time, and its
/// WAL syncs through a connection of its own that the workloads never use.
struct Probe {
    tree: ProcessTree,
    stats: Client,
}

impl Server for Probe {
    fn cpu_time(&self) -> Option<Duration> {
        self.tree.cpu_time()
    }

    async fn syncs(&self) -> Option<f64> {
        let metrics = self.stats.stats().await.ok()?;
        metric(&metrics, "profiled_wal_syncs_total")
    }
}

/// The daemon's metric `name` as `client` reads it now; 0 if the daemon
/// does not report it. Panics if the stats cannot be read: the bench
/// itself is then broken.
pub async fn read_metric(client: &Client, name: &str) -> f64 {
    let metrics = client.stats().await.expect("stats");
    metric(&metrics, name).unwrap_or(0.0)
}

/// The value of metric `name` among `metrics`, if it is there.
fn metric(metrics: &[Metric], name: &str) -> Option<f64> {
    metrics
        .iter()
        .find(|metric| metric.name == name)
        .map(|metric| metric.value)
}

/// A session of profiled is one client connection, named for the session;
/// each lease is the client library's [`Profile`], which saves and releases
/// under the epoch it was granted.
impl Leases for Client {
    type Lease = Profile;

    /// The key is the name alone: profiled keeps its stores apart, and the
    /// store goes to the load on its own.
    fn key(_store: &'static str, name: fmt::Arguments<'_>) -> String {
        fmt::format(name)
    }

    /// Loads with [`LoadPolicy::Cancel`], so a held profile is refused at
    /// once with `Taken` instead of queueing the session behind the holder.
    async fn acquire(&mut self, store: &'static str, key: String) -> Option<Profile> {
        match self.load(store, &key, LoadPolicy::Cancel).await {
            Ok(profile) => Some(profile),
            Err(err) if matches!(err.code(), Some(ErrorCode::Taken { .. })) => None,
            Err(err) => panic!("load: {err}"),
        }
    }

    async fn save(&mut self, profile: &Profile, data: &[u8]) {
        profile.save(data.to_vec()).await.expect("save");
    }

    async fn release(&mut self, profile: Profile) {
        profile.release(None).await.expect("release");
    }

    async fn ping(&mut self) {
        Client::ping(self).await.expect("ping");
    }

    async fn close(self) {
        Client::close(self).await;
    }
}

/// Connects as session `name`, the job of place 1.
async fn connect(socket: &Path, name: String) -> Result<Client, profiled_client::ClientError> {
    let session = SessionId {
        place_id: 1,
        job_id: name,
    };
    Client::connect(socket, session).await
}
