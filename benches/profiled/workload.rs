//! What every system's workloads share: parameters, the data, the random
//! keys, and the figures they report.

use std::time::Duration;

/// The size of each profile's data.
pub const DATA_SIZE: usize = 2048;
/// Saves per session in the sessions workload.
pub const SAVES_PER_SESSION: usize = 5;
/// The store (or key prefix) of the sessions workload.
pub const SESSION_STORE: &str = "Sessions";
/// The store (or key prefix) of the saves workload.
pub const SAVE_STORE: &str = "Saves";

/// The shape of the sessions and saves workloads.
#[derive(Clone, Copy, Debug)]
pub struct Params {
    /// How long each workload runs.
    pub run_for: Duration,
    /// Concurrent sessions (W).
    pub sessions: usize,
    /// Profiles the sessions workload picks from (P).
    pub profiles: u64,
    /// Leases each session holds in the saves workload (L).
    pub leases: usize,
}

/// The two durability levels every system runs at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Every acknowledgement waits for an fsync.
    Fsync,
    /// Acknowledgements wait for the write, not the disk.
    Buffered,
}

impl Durability {
    pub fn name(self) -> &'static str {
        match self {
            Self::Fsync => "fsync",
            Self::Buffered => "buffered",
        }
    }
}

/// One operation's figures within one workload, in operations per second
/// and microseconds.
#[derive(Clone, Debug, Default)]
pub struct Stat {
    pub per_sec: f64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub count: usize,
}

impl Stat {
    pub fn new(mut samples: Vec<Duration>, elapsed: Duration) -> Self {
        samples.sort_unstable();
        let at = |q: f64| {
            let index = ((samples.len() as f64 * q) as usize).min(samples.len().saturating_sub(1));
            samples.get(index).map_or(0.0, |d| d.as_secs_f64() * 1e6)
        };
        Self {
            per_sec: samples.len() as f64 / elapsed.as_secs_f64().max(1e-9),
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
            count: samples.len(),
        }
    }

    pub fn percentiles(&self) -> String {
        format!("{:.0}/{:.0}/{:.0}", self.p50, self.p99, self.p999)
    }
}

/// The figures of one workload on one system: `(operation, stat)` rows.
#[derive(Debug, Default)]
pub struct Outcome {
    pub rows: Vec<(&'static str, Stat)>,
    /// Loads refused because another session held the profile.
    pub taken: usize,
}

impl Outcome {
    /// The figures of one operation.
    pub fn op(&self, op: &str) -> Option<&Stat> {
        self.rows
            .iter()
            .find(|(name, _)| *name == op)
            .map(|(_, stat)| stat)
    }

    /// The saves workload's single row.
    pub fn saves(samples: Vec<Duration>, elapsed: Duration) -> Self {
        Self {
            rows: vec![("save", Stat::new(samples, elapsed))],
            taken: 0,
        }
    }
}

/// Latency samples from the sessions workload.
#[derive(Debug, Default)]
pub struct SessionSamples {
    pub session: Vec<Duration>,
    pub load: Vec<Duration>,
    pub save: Vec<Duration>,
    pub release: Vec<Duration>,
    pub taken: usize,
}

impl SessionSamples {
    pub fn merge(&mut self, other: Self) {
        self.session.extend(other.session);
        self.load.extend(other.load);
        self.save.extend(other.save);
        self.release.extend(other.release);
        self.taken += other.taken;
    }

    pub fn outcome(self, elapsed: Duration) -> Outcome {
        Outcome {
            rows: vec![
                ("session", Stat::new(self.session, elapsed)),
                ("load", Stat::new(self.load, elapsed)),
                ("save", Stat::new(self.save, elapsed)),
                ("release", Stat::new(self.release, elapsed)),
            ],
            taken: self.taken,
        }
    }
}

/// 2 KiB, the first half random bytes, the second zeros: about half
/// compressible.
pub fn profile_data(rng: &mut Rng) -> Vec<u8> {
    let mut data = vec![0u8; DATA_SIZE];
    for chunk in data[..DATA_SIZE / 2].chunks_mut(8) {
        let bytes = rng.next().to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    data
}

/// xorshift64*: enough to pick keys and fill data.
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}
