//! The daemon's counters, and their report as named metrics.
//!
//! Counters are plain atomics bumped where things happen (the lease driver,
//! the request handlers, the pruning sweep), so counting costs no lock and
//! no allocation. A `Stats` request, `profilectl stats` and the optional
//! Prometheus endpoint all read the same [`Stats::report`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use profiled_protocol::{LoadPolicy, Metric};

/// Every counter. One instance is shared by the whole daemon.
#[derive(Debug)]
pub struct Stats {
    /// When the daemon started, for uptime.
    started: Instant,
    /// Load outcomes, by policy then outcome.
    loads: [[AtomicU64; LoadOutcome::COUNT]; POLICIES],
    /// Acknowledged saves.
    saves: AtomicU64,
    /// Saves refused because the lease was lost.
    saves_fenced: AtomicU64,
    /// Releases acknowledged to clients.
    releases: AtomicU64,
    /// Releases the daemon made itself: expired resume graces, revokes and
    /// shutdown.
    daemon_releases: AtomicU64,
    /// Leases taken by a Steal.
    steals: AtomicU64,
    /// Leases taken from holders that did not answer a release request.
    force_timeouts: AtomicU64,
    /// ForceLoads of held profiles that were granted, and how long each
    /// took from request to grant.
    handoffs: Histogram,
    /// Messages accepted.
    messages_sent: AtomicU64,
    /// Messages refused because the profile had too many pending.
    messages_refused: AtomicU64,
    /// Overwrites, rollbacks and imports.
    overwrites: AtomicU64,
    /// Wipes.
    wipes: AtomicU64,
    /// Kept versions deleted by the pruning sweep.
    versions_pruned: AtomicU64,
    /// Storage operations that failed.
    storage_errors: AtomicU64,
    /// Connections accepted since start.
    connections_total: AtomicU64,
    /// Connections open now.
    connections: AtomicU64,
}

/// How a load ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadOutcome {
    /// The lease was granted.
    Granted,
    /// `Cancel` found the profile held.
    Taken,
    /// The session already held it.
    AlreadyLoaded,
    /// A newer ForceLoad replaced it.
    Superseded,
    /// Its deadline passed.
    Timeout,
    /// The daemon was stopping.
    ShuttingDown,
    /// Storage failed.
    StorageError,
    /// The session held the most leases allowed.
    TooManyLeases,
}

/// Gauges that live elsewhere, read when a report is made.
#[derive(Clone, Copy, Debug, Default)]
pub struct Gauges {
    /// Leases held.
    pub leases_held: u64,
    /// Loads waiting in queues.
    pub queued_loads: u64,
    /// Sessions connected or holding leases.
    pub sessions: u64,
    /// The database's size on disk.
    pub storage_bytes: u64,
    /// Whether storage is recovering from a failed write (a full disk,
    /// say) and refusing writes meanwhile.
    pub storage_degraded: bool,
    /// WAL syncs since the start. Against the count of writes it shows how
    /// many writes each sync carries.
    pub wal_syncs: u64,
    /// RocksDB's memtables in use, against `storage.memtable_bytes`.
    pub memtable_bytes: u64,
    /// RocksDB's block cache in use, against `storage.block_cache_bytes`.
    pub block_cache_bytes: u64,
}

/// A latency histogram with fixed buckets, in the Prometheus shape.
#[derive(Debug)]
struct Histogram {
    /// Counts of observations at or below each bound in [`BUCKETS_MS`],
    /// not cumulative; the last slot counts the rest.
    buckets: [AtomicU64; BUCKETS_MS.len() + 1],
    /// The sum of every observation, in microseconds.
    sum_us: AtomicU64,
}

const POLICIES: usize = 4;

/// Bucket bounds for handoff latency, in milliseconds: the target is a
/// few milliseconds, and anything near `force_load_timeout` means a holder
/// that did not cooperate.
const BUCKETS_MS: [u64; 12] = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 5000, 30000];

impl Stats {
    /// Zeroed counters, with uptime counted from now.
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            loads: Default::default(),
            saves: AtomicU64::new(0),
            saves_fenced: AtomicU64::new(0),
            releases: AtomicU64::new(0),
            daemon_releases: AtomicU64::new(0),
            steals: AtomicU64::new(0),
            force_timeouts: AtomicU64::new(0),
            handoffs: Histogram::default(),
            messages_sent: AtomicU64::new(0),
            messages_refused: AtomicU64::new(0),
            overwrites: AtomicU64::new(0),
            wipes: AtomicU64::new(0),
            versions_pruned: AtomicU64::new(0),
            storage_errors: AtomicU64::new(0),
            connections_total: AtomicU64::new(0),
            connections: AtomicU64::new(0),
        }
    }

    /// How long the daemon has run.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Counts a load's outcome.
    pub fn load(&self, policy: LoadPolicy, outcome: LoadOutcome) {
        if let Some(counter) = self.load_counter(policy, outcome) {
            bump(counter);
        }
    }

    /// The counter of one policy and outcome; every pair has one.
    fn load_counter(&self, policy: LoadPolicy, outcome: LoadOutcome) -> Option<&AtomicU64> {
        self.loads
            .get(policy_index(policy))
            .and_then(|row| row.get(outcome as usize))
    }

    /// Counts an acknowledged save.
    pub fn saved(&self) {
        bump(&self.saves);
    }

    /// Counts a save or release refused for a lost lease.
    pub fn fenced(&self) {
        bump(&self.saves_fenced);
    }

    /// Counts a release acknowledged to a client.
    pub fn released(&self) {
        bump(&self.releases);
    }

    /// Counts a release the daemon made itself.
    pub fn daemon_released(&self) {
        bump(&self.daemon_releases);
    }

    /// Counts a lease taken by a Steal.
    pub fn stolen(&self) {
        bump(&self.steals);
    }

    /// Counts a lease taken after `force_load_timeout`.
    pub fn force_timeout(&self) {
        bump(&self.force_timeouts);
    }

    /// Records a ForceLoad of a held profile that was granted after `took`.
    pub fn handoff(&self, took: Duration) {
        self.handoffs.observe(took);
    }

    /// Counts a message sent, or refused for a full queue.
    pub fn message(&self, accepted: bool) {
        bump(if accepted {
            &self.messages_sent
        } else {
            &self.messages_refused
        });
    }

    /// Counts an overwrite, rollback or import.
    pub fn overwritten(&self) {
        bump(&self.overwrites);
    }

    /// Counts a wipe.
    pub fn wiped(&self) {
        bump(&self.wipes);
    }

    /// Counts versions pruned by a sweep.
    pub fn pruned(&self, versions: u64) {
        self.versions_pruned.fetch_add(versions, Ordering::Relaxed);
    }

    /// Counts a failed storage operation.
    pub fn storage_error(&self) {
        bump(&self.storage_errors);
    }

    /// Counts an accepted connection; [`Stats::disconnected`] undoes the
    /// gauge part.
    pub fn connected(&self) {
        bump(&self.connections_total);
        bump(&self.connections);
    }

    /// Counts a closed connection.
    pub fn disconnected(&self) {
        let _ = self
            .connections
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Open connections.
    pub fn open_connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Every counter and gauge as named metrics, Prometheus style.
    pub fn report(&self, gauges: Gauges) -> Vec<Metric> {
        let mut out = Vec::with_capacity(64);
        let mut add = |name: &str, labels: &[(&str, &str)], value: f64| {
            out.push(Metric {
                name: name.to_owned(),
                labels: labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                value,
            });
        };
        let count = |counter: &AtomicU64| counter.load(Ordering::Relaxed) as f64;
        add("profiled_uptime_seconds", &[], self.uptime().as_secs_f64());
        for policy in ALL_POLICIES {
            for outcome in LoadOutcome::ALL {
                let value = self.load_counter(policy, outcome).map_or(0.0, count);
                add(
                    "profiled_loads_total",
                    &[("policy", policy_name(policy)), ("outcome", outcome.name())],
                    value,
                );
            }
        }
        add("profiled_saves_total", &[], count(&self.saves));
        add(
            "profiled_writes_fenced_total",
            &[],
            count(&self.saves_fenced),
        );
        add(
            "profiled_releases_total",
            &[("by", "client")],
            count(&self.releases),
        );
        add(
            "profiled_releases_total",
            &[("by", "daemon")],
            count(&self.daemon_releases),
        );
        add("profiled_steals_total", &[], count(&self.steals));
        add(
            "profiled_force_load_timeouts_total",
            &[],
            count(&self.force_timeouts),
        );
        let mut cumulative = 0.0;
        for (bucket, bound) in self.handoffs.buckets.iter().zip(BUCKETS_MS) {
            cumulative += count(bucket);
            let le = format!("{}", bound as f64 / 1000.0);
            add(
                "profiled_handoff_seconds_bucket",
                &[("le", &le)],
                cumulative,
            );
        }
        cumulative += self.handoffs.buckets.last().map_or(0.0, count);
        add(
            "profiled_handoff_seconds_bucket",
            &[("le", "+Inf")],
            cumulative,
        );
        add("profiled_handoff_seconds_count", &[], cumulative);
        add(
            "profiled_handoff_seconds_sum",
            &[],
            count(&self.handoffs.sum_us) / 1e6,
        );
        add(
            "profiled_messages_total",
            &[("outcome", "accepted")],
            count(&self.messages_sent),
        );
        add(
            "profiled_messages_total",
            &[("outcome", "refused")],
            count(&self.messages_refused),
        );
        add("profiled_overwrites_total", &[], count(&self.overwrites));
        add("profiled_wipes_total", &[], count(&self.wipes));
        add(
            "profiled_versions_pruned_total",
            &[],
            count(&self.versions_pruned),
        );
        add(
            "profiled_storage_errors_total",
            &[],
            count(&self.storage_errors),
        );
        add(
            "profiled_connections_total",
            &[],
            count(&self.connections_total),
        );
        add("profiled_connections", &[], count(&self.connections));
        add("profiled_leases_held", &[], gauges.leases_held as f64);
        add("profiled_queued_loads", &[], gauges.queued_loads as f64);
        add("profiled_sessions", &[], gauges.sessions as f64);
        add("profiled_storage_bytes", &[], gauges.storage_bytes as f64);
        add(
            "profiled_storage_degraded",
            &[],
            if gauges.storage_degraded { 1.0 } else { 0.0 },
        );
        add("profiled_wal_syncs_total", &[], gauges.wal_syncs as f64);
        add("profiled_memtable_bytes", &[], gauges.memtable_bytes as f64);
        add(
            "profiled_block_cache_bytes",
            &[],
            gauges.block_cache_bytes as f64,
        );
        out
    }
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

impl LoadOutcome {
    const COUNT: usize = 8;
    const ALL: [Self; Self::COUNT] = [
        Self::Granted,
        Self::Taken,
        Self::AlreadyLoaded,
        Self::Superseded,
        Self::Timeout,
        Self::ShuttingDown,
        Self::StorageError,
        Self::TooManyLeases,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Granted => "granted",
            Self::Taken => "taken",
            Self::AlreadyLoaded => "already_loaded",
            Self::Superseded => "superseded",
            Self::Timeout => "timeout",
            Self::ShuttingDown => "shutting_down",
            Self::StorageError => "storage_error",
            Self::TooManyLeases => "too_many_leases",
        }
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: Default::default(),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    fn observe(&self, took: Duration) {
        // Compared in microseconds: whole milliseconds would count 1.9 ms
        // as at most 1 ms.
        let us = took.as_micros();
        let slot = BUCKETS_MS
            .iter()
            .position(|&bound| us <= u128::from(bound) * 1000)
            .unwrap_or(BUCKETS_MS.len());
        if let Some(bucket) = self.buckets.get(slot) {
            bump(bucket);
        }
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }
}

const ALL_POLICIES: [LoadPolicy; POLICIES] = [
    LoadPolicy::ForceLoad,
    LoadPolicy::Steal,
    LoadPolicy::Repeat,
    LoadPolicy::Cancel,
];

fn policy_index(policy: LoadPolicy) -> usize {
    match policy {
        LoadPolicy::ForceLoad => 0,
        LoadPolicy::Steal => 1,
        LoadPolicy::Repeat => 2,
        LoadPolicy::Cancel => 3,
    }
}

fn policy_name(policy: LoadPolicy) -> &'static str {
    match policy {
        LoadPolicy::ForceLoad => "force_load",
        LoadPolicy::Steal => "steal",
        LoadPolicy::Repeat => "repeat",
        LoadPolicy::Cancel => "cancel",
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(report: &[Metric], name: &str, labels: &[(&str, &str)]) -> f64 {
        report
            .iter()
            .find(|m| {
                m.name == name
                    && m.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| m.labels.iter().any(|(mk, mv)| mk == k && mv == v))
            })
            .map(|m| m.value)
            .unwrap_or_else(|| panic!("no metric {name} {labels:?}"))
    }

    #[test]
    fn counters_are_reported_under_their_labels() {
        let stats = Stats::new();
        stats.load(LoadPolicy::Steal, LoadOutcome::Granted);
        stats.load(LoadPolicy::Steal, LoadOutcome::Granted);
        stats.load(LoadPolicy::Cancel, LoadOutcome::Taken);
        stats.saved();
        stats.connected();
        stats.connected();
        stats.disconnected();
        let gauges = Gauges {
            leases_held: 3,
            ..Gauges::default()
        };
        let report = stats.report(gauges);
        let loads = "profiled_loads_total";
        assert_eq!(
            value(
                &report,
                loads,
                &[("policy", "steal"), ("outcome", "granted")]
            ),
            2.0
        );
        assert_eq!(
            value(
                &report,
                loads,
                &[("policy", "cancel"), ("outcome", "taken")]
            ),
            1.0
        );
        assert_eq!(
            value(
                &report,
                loads,
                &[("policy", "repeat"), ("outcome", "granted")]
            ),
            0.0
        );
        assert_eq!(value(&report, "profiled_saves_total", &[]), 1.0);
        assert_eq!(value(&report, "profiled_connections_total", &[]), 2.0);
        assert_eq!(value(&report, "profiled_connections", &[]), 1.0);
        assert_eq!(value(&report, "profiled_leases_held", &[]), 3.0);
    }

    #[test]
    fn handoffs_fill_cumulative_buckets() {
        let stats = Stats::new();
        stats.handoff(Duration::from_micros(800));
        stats.handoff(Duration::from_millis(3));
        stats.handoff(Duration::from_secs(60));
        let report = stats.report(Gauges::default());
        let bucket = "profiled_handoff_seconds_bucket";
        assert_eq!(value(&report, bucket, &[("le", "0.001")]), 1.0);
        assert_eq!(value(&report, bucket, &[("le", "0.002")]), 1.0);
        assert_eq!(value(&report, bucket, &[("le", "0.005")]), 2.0);
        assert_eq!(value(&report, bucket, &[("le", "30")]), 2.0);
        assert_eq!(value(&report, bucket, &[("le", "+Inf")]), 3.0);
        assert_eq!(value(&report, "profiled_handoff_seconds_count", &[]), 3.0);
        let sum = value(&report, "profiled_handoff_seconds_sum", &[]);
        assert!((sum - 60.0038).abs() < 1e-6, "{sum}");
    }

    /// A bucket's bound is exact: 1.9 ms is not at most 1 ms.
    #[test]
    fn a_handoff_just_over_a_bound_is_counted_above_it() {
        let stats = Stats::new();
        stats.handoff(Duration::from_micros(1900));
        stats.handoff(Duration::from_micros(1000));
        let report = stats.report(Gauges::default());
        let bucket = "profiled_handoff_seconds_bucket";
        assert_eq!(value(&report, bucket, &[("le", "0.001")]), 1.0);
        assert_eq!(value(&report, bucket, &[("le", "0.002")]), 2.0);
    }
}
