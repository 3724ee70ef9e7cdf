//! Crash loop: sessions load, save and release at full speed while the
//! daemon is SIGKILLed at random moments and restarted, round after round.
//! Every session records what it was told; at the end a checker replays the
//! records against everything the daemon stored and proves that no
//! acknowledged save was lost or reordered, that no epoch went backwards,
//! and that no two sessions ever held a profile at once.
//!
//! Each write's data names the write: `c<client>/<epoch>/<seq>`, where
//! `seq` counts the writes made under one lease. With `history.interval =
//! "0s"` the daemon keeps every data write as a version, and since a
//! profile's version is the count of its committed data writes, versions
//! `1..=current` are the profile's whole write history, in commit order.
//!
//! The seed comes from `CRASH_LOOP_SEED` (printed at the start, so a
//! failure can be replayed as far as timing allows), and the number of
//! rounds from `CRASH_LOOP_ROUNDS` (default 20).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::Daemon;
use nix::sys::signal::Signal;
use profiled_client::{
    Client, ClientError, ConnectOptions, ErrorCode, LoadOptions, LoadPolicy, ProfileEvent,
};

const STORE: &str = "CrashLoop";
const KEYS: usize = 4;
const CLIENTS: usize = 8;
const DEFAULT_ROUNDS: usize = 20;
/// How long a load may wait for its grant.
const LOAD_DEADLINE: Duration = Duration::from_millis(1000);
/// How long after a restart the sessions have to get anything acknowledged.
const PROGRESS_LIMIT: Duration = Duration::from_secs(15);

const CONFIG: &str = "\
[leases]
force_load_timeout = \"200ms\"
[session]
resume_grace = \"2s\"
[history]
interval = \"0s\"
[shutdown]
grace = \"1s\"
";

/// A write's identity, which is also its data: who wrote it, under which
/// lease, and its place among that lease's writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct WriteId {
    client: usize,
    epoch: u64,
    seq: u64,
}

impl WriteId {
    fn data(self) -> Vec<u8> {
        format!("c{}/{}/{}", self.client, self.epoch, self.seq).into_bytes()
    }

    fn parse(data: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(data).ok()?;
        let mut parts = text.strip_prefix('c')?.split('/');
        let id = Self {
            client: parts.next()?.parse().ok()?,
            epoch: parts.next()?.parse().ok()?,
            seq: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(id)
    }
}

/// An acknowledged grant of a lease.
#[derive(Clone, Debug)]
struct Grant {
    key: usize,
    client: usize,
    epoch: u64,
    /// The profile's version when it was granted.
    version: u64,
    /// The data it was granted with.
    data: Option<Vec<u8>>,
    /// Just before the load was sent.
    sent: Instant,
    /// Just after the grant arrived.
    acked: Instant,
}

/// What became of a write (a save, or a release with data).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// The daemon acknowledged it at `version`.
    Acked { version: u64, at: Instant },
    /// The connection dropped before the answer: it may or may not have
    /// been applied.
    Uncertain,
    /// The daemon refused it (`LeaseLost`): it must never be applied.
    Refused,
}

/// One write attempt.
#[derive(Clone, Debug)]
struct Write {
    key: usize,
    id: WriteId,
    /// A release with data rather than a save.
    release: bool,
    /// Just before it was sent.
    sent: Instant,
    outcome: Outcome,
}

/// What every session was told.
#[derive(Clone, Debug, Default)]
struct History {
    grants: Vec<Grant>,
    writes: Vec<Write>,
}

/// What one session saw, besides its history.
#[derive(Debug, Default)]
struct ClientLog {
    history: History,
    /// Loads whose answer was lost to a crash.
    uncertain_loads: u64,
    /// Outcomes by kind, for the report.
    outcomes: BTreeMap<&'static str, u64>,
    /// Errors no crash or lease race explains.
    unexpected: Vec<String>,
}

/// What the daemon stored for one profile after the run.
#[derive(Clone, Debug, Default)]
struct Stored {
    /// The current version.
    version: u64,
    /// The current data.
    data: Option<Vec<u8>>,
    /// The data of every kept version, `1..=version` when none is missing.
    versions: BTreeMap<u64, Option<Vec<u8>>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_loop_loses_no_acknowledged_save_and_never_shares_a_profile() {
    let started = Instant::now();
    let seed = std::env::var("CRASH_LOOP_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
        | 1;
    let rounds = std::env::var("CRASH_LOOP_ROUNDS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(DEFAULT_ROUNDS);
    eprintln!("crash loop: seed {seed} (CRASH_LOOP_SEED), {rounds} rounds");

    let mut daemon = Daemon::start_with(CONFIG);
    let stop = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for id in 0..CLIENTS {
        let options = ConnectOptions {
            reconnect_for: Duration::from_secs(60),
            ..ConnectOptions::default()
        };
        let client = Client::connect_with(daemon.socket(), common::session(&job(id)), options)
            .await
            .expect("connect");
        let rng = XorShift::new(seed ^ (id as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        tasks.push(tokio::spawn(run_client(
            id,
            client,
            rng,
            Arc::clone(&stop),
            Arc::clone(&acks),
        )));
    }

    let mut rng = XorShift::new(seed);
    for round in 0..rounds {
        // Wait for traffic on the new daemon, so every kill lands in the
        // middle of loads and saves rather than in the reconnect backoff.
        let before = acks.load(Ordering::SeqCst);
        let waiting = Instant::now();
        while acks.load(Ordering::SeqCst) < before + 1 {
            assert!(
                waiting.elapsed() < PROGRESS_LIMIT,
                "seed {seed}, round {round}: nothing acknowledged within {PROGRESS_LIMIT:?} of a restart"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let pause = Duration::from_millis(50 + rng.below(251));
        tokio::time::sleep(pause).await;
        // The harness blocks while the daemon dies and comes back; the
        // clients' reconnect loops run meanwhile on other workers.
        tokio::task::block_in_place(|| {
            daemon.kill();
            daemon.restart();
        });
    }

    // Let the sessions finish what they are doing on the last daemon.
    stop.store(true, Ordering::SeqCst);
    let mut history = History::default();
    let mut uncertain_loads = 0;
    let mut outcomes = BTreeMap::new();
    let mut unexpected = Vec::new();
    for task in tasks {
        let log = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("sessions stop within 30 s")
            .expect("session task");
        history.grants.extend(log.history.grants);
        history.writes.extend(log.history.writes);
        uncertain_loads += log.uncertain_loads;
        for (what, count) in log.outcomes {
            *outcomes.entry(what).or_insert(0u64) += count;
        }
        unexpected.extend(log.unexpected);
    }

    // A clean stop and start, then read everything back without a lease.
    daemon.signal(Signal::SIGTERM);
    let status = tokio::task::block_in_place(|| daemon.wait_exit(Duration::from_secs(30)));
    assert!(status.success(), "seed {seed}: clean stop exited {status}");
    tokio::task::block_in_place(|| daemon.restart());
    let reader = daemon.client("reader").await;
    let mut stored = Vec::new();
    for key in 0..KEYS {
        stored.push(read_stored(&reader, key).await);
    }

    let acked = history
        .writes
        .iter()
        .filter(|w| matches!(w.outcome, Outcome::Acked { .. }))
        .count();
    let uncertain = history
        .writes
        .iter()
        .filter(|w| w.outcome == Outcome::Uncertain)
        .count();
    let refused = history
        .writes
        .iter()
        .filter(|w| w.outcome == Outcome::Refused)
        .count();
    let applied: HashSet<(usize, WriteId)> = stored
        .iter()
        .enumerate()
        .flat_map(|(key, s)| {
            s.versions
                .values()
                .filter_map(move |d| d.as_deref().and_then(WriteId::parse).map(|id| (key, id)))
        })
        .collect();
    let uncertain_applied = history
        .writes
        .iter()
        .filter(|w| w.outcome == Outcome::Uncertain && applied.contains(&(w.key, w.id)))
        .count();
    let versions: Vec<u64> = stored.iter().map(|s| s.version).collect();
    eprintln!(
        "crash loop summary: seed {seed}, {rounds} rounds, {} grants, {acked} acknowledged writes, \
         {uncertain} uncertain writes ({uncertain_applied} applied), {refused} refused writes, {uncertain_loads} uncertain loads, \
         final versions {versions:?}, {:.1} s; outcomes {outcomes:?}",
        history.grants.len(),
        started.elapsed().as_secs_f64(),
    );

    assert!(
        unexpected.is_empty(),
        "seed {seed}: unexpected errors: {unexpected:#?}"
    );
    if let Err(violations) = check(&history, &stored) {
        panic!(
            "seed {seed}: {} violations:\n{}",
            violations.len(),
            violations.join("\n")
        );
    }
    assert!(
        acked >= 10 * rounds,
        "seed {seed}: too little traffic to prove anything: {acked} acknowledged writes"
    );

    // The checker is not vacuous: with the last acknowledged write of a
    // profile removed from what was stored, it must object.
    let last = history
        .writes
        .iter()
        .filter_map(|w| match w.outcome {
            Outcome::Acked { version, .. } => Some((w.key, version)),
            _ => None,
        })
        .max_by_key(|&(_, version)| version)
        .expect("some write was acknowledged");
    let mut lost = stored.clone();
    let profile = &mut lost[last.0];
    profile.versions.retain(|&v, _| v < last.1);
    profile.version = last.1 - 1;
    profile.data = profile.versions.get(&profile.version).cloned().flatten();
    assert!(
        check(&history, &lost).is_err(),
        "seed {seed}: the checker missed a lost acknowledged save"
    );
}

/// One session's loop, until `stop`: load a random profile (mostly with
/// `Steal` or `ForceLoad`, so leases move between sessions), save a few
/// times, then release it with or without data, or abandon it to be taken.
/// Now and then it writes again under a lease it abandoned, which the
/// daemon must refuse once the lease has moved on.
async fn run_client(
    client_id: usize,
    client: Client,
    mut rng: XorShift,
    stop: Arc<AtomicBool>,
    acks: Arc<AtomicU64>,
) -> ClientLog {
    let mut log = ClientLog::default();
    // Leases this session stopped using without releasing: (key, epoch,
    // next seq).
    let mut abandoned: Vec<(usize, u64, u64)> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        if !abandoned.is_empty() && rng.below(8) == 0 {
            let i = rng.below(abandoned.len() as u64) as usize;
            let (key, epoch, seq) = abandoned[i];
            let id = WriteId {
                client: client_id,
                epoch,
                seq,
            };
            let outcome = write(&client, &mut log, &acks, key, id, false).await;
            abandoned[i].2 += 1;
            if outcome == Outcome::Refused {
                abandoned.swap_remove(i);
            }
            continue;
        }

        let key = rng.below(KEYS as u64) as usize;
        let policy = match rng.below(10) {
            0..=3 => LoadPolicy::Steal,
            4..=7 => LoadPolicy::ForceLoad,
            _ => LoadPolicy::Repeat,
        };
        let options = LoadOptions {
            policy,
            deadline: Some(LOAD_DEADLINE),
        };
        let sent = Instant::now();
        let mut profile = match client.load_with(STORE, &key_name(key), options).await {
            Ok(profile) => profile,
            Err(ClientError::Disconnected) => {
                // It may have been granted; the lease then comes back in
                // the welcome, and the next load of the key cleans it up.
                log.uncertain_loads += 1;
                continue;
            }
            Err(err) if err.code() == Some(&ErrorCode::AlreadyLoaded) => {
                // A lease this session holds without a profile: abandoned,
                // or granted by a load whose answer was lost.
                count(&mut log, "already loaded");
                let mut epochs: Vec<u64> = abandoned
                    .iter()
                    .filter(|a| a.0 == key)
                    .map(|a| a.1)
                    .collect();
                abandoned.retain(|a| a.0 != key);
                epochs.extend(
                    client
                        .welcome()
                        .leases
                        .iter()
                        .filter(|l| l.store == STORE && l.key == key_name(key))
                        .map(|l| l.epoch),
                );
                for epoch in epochs {
                    match client.release(STORE, &key_name(key), epoch, None).await {
                        Ok(_) => count(&mut log, "cleanup release"),
                        Err(err) => classify(&mut log, "cleanup release", &err),
                    }
                }
                continue;
            }
            Err(err) => {
                classify(&mut log, "load", &err);
                continue;
            }
        };
        let acked = Instant::now();
        acks.fetch_add(1, Ordering::SeqCst);
        let epoch = profile.epoch();
        log.history.grants.push(Grant {
            key,
            client: client_id,
            epoch,
            version: profile.meta().version,
            data: profile.data().map(<[u8]>::to_vec),
            sent,
            acked,
        });
        count(&mut log, "granted");

        let mut seq = 0;
        let mut lost = false;
        let mut asked = false;
        for _ in 0..1 + rng.below(5) {
            while let Some(event) = profile.try_next_event() {
                if matches!(event, ProfileEvent::ReleaseRequested { .. }) {
                    asked = true;
                }
            }
            if asked && rng.below(2) == 0 {
                break;
            }
            seq += 1;
            let id = WriteId {
                client: client_id,
                epoch,
                seq,
            };
            // A save whose answer was lost leaves the lease as it was, so
            // the session carries on with it.
            if write(&client, &mut log, &acks, key, id, false).await == Outcome::Refused {
                lost = true;
                break;
            }
        }
        if lost {
            continue;
        }
        match rng.below(10) {
            0..=3 => {
                let id = WriteId {
                    client: client_id,
                    epoch,
                    seq: seq + 1,
                };
                write(&client, &mut log, &acks, key, id, true).await;
            }
            4..=6 => match client.release(STORE, &key_name(key), epoch, None).await {
                Ok(_) => {
                    acks.fetch_add(1, Ordering::SeqCst);
                    count(&mut log, "bare release");
                }
                Err(err) => classify(&mut log, "bare release", &err),
            },
            _ => {
                count(&mut log, "abandoned");
                abandoned.push((key, epoch, seq + 1));
            }
        }
    }
    client.close().await;
    log
}

/// Writes `id` as the data of `key` under its epoch, as a save or as a
/// release with data, and records the outcome.
async fn write(
    client: &Client,
    log: &mut ClientLog,
    acks: &AtomicU64,
    key: usize,
    id: WriteId,
    release: bool,
) -> Outcome {
    let what = if release { "release" } else { "save" };
    let sent = Instant::now();
    let name = key_name(key);
    let result = if release {
        client
            .release(STORE, &name, id.epoch, Some(id.data()))
            .await
    } else {
        client.save(STORE, &name, id.epoch, id.data()).await
    };
    let outcome = match result {
        Ok(version) => {
            acks.fetch_add(1, Ordering::SeqCst);
            count(log, what);
            Outcome::Acked {
                version,
                at: Instant::now(),
            }
        }
        Err(ClientError::Disconnected) => {
            count(log, "uncertain write");
            Outcome::Uncertain
        }
        Err(err) if err.code() == Some(&ErrorCode::LeaseLost) => {
            count(log, "lease lost");
            Outcome::Refused
        }
        Err(err) => {
            // Not a refusal the checker can rely on: treat it as maybe
            // applied, and fail the test for it.
            log.unexpected
                .push(format!("{what} {id:?} on key {key}: {err}"));
            Outcome::Uncertain
        }
    };
    log.history.writes.push(Write {
        key,
        id,
        release,
        sent,
        outcome,
    });
    outcome
}

fn count(log: &mut ClientLog, what: &'static str) {
    *log.outcomes.entry(what).or_insert(0) += 1;
}

/// Counts the refusals a lease race or a crash explains; anything else is
/// unexpected.
fn classify(log: &mut ClientLog, what: &str, err: &ClientError) {
    let kind = match (err, err.code()) {
        (ClientError::Disconnected, _) => "disconnected",
        (_, Some(ErrorCode::LeaseLost)) => "lease lost",
        (_, Some(ErrorCode::Timeout)) => "timeout",
        (_, Some(ErrorCode::Superseded)) => "superseded",
        (_, Some(ErrorCode::Taken { .. })) => "taken",
        _ => {
            log.unexpected.push(format!("{what}: {err}"));
            return;
        }
    };
    count(log, kind);
}

/// Reads a profile's current data and every version it kept.
async fn read_stored(reader: &Client, key: usize) -> Stored {
    let name = key_name(key);
    let current = match reader.view(STORE, &name, None).await {
        Ok(view) => view,
        Err(err) if err.code() == Some(&ErrorCode::NotFound) => return Stored::default(),
        Err(err) => panic!("view {name}: {err}"),
    };
    let mut stored = Stored {
        version: current.version,
        data: current.data,
        versions: BTreeMap::new(),
    };
    for version in 1..=stored.version {
        match reader.view(STORE, &name, Some(version)).await {
            Ok(view) => {
                stored.versions.insert(version, view.data);
            }
            Err(err) if err.code() == Some(&ErrorCode::NotFound) => {}
            Err(err) => panic!("view {name} version {version}: {err}"),
        }
    }
    stored
}

/// Checks the recorded history of every session against what the daemon
/// stored, and returns every violation found.
///
/// `stored[key]` holds the profile's current version and data and the data
/// of each kept version; the daemon runs with `history.interval = "0s"`, so
/// versions `1..=current` must all be there, and they are the profile's
/// writes in commit order. The checks, per profile:
///
/// - **Every acknowledged save is present, in order.** The stored history
///   is complete; each acknowledged write (save or release with data) sits
///   exactly at the version it was acknowledged with, so no two share a
///   version, and none was lost or overwritten in place; the current data
///   is that of the newest version, hence of the newest applied write. Each
///   stored version is a write some session attempted and that was
///   acknowledged or whose answer was lost to a crash (uncertain), applied
///   once: never a write the daemon refused, never one applied twice.
/// - **No epoch went backwards.** Every grant has its own epoch; a grant
///   whose load was sent after another grant was acknowledged has a higher
///   epoch (acknowledgement order alone is not enough: two grants' answers
///   may be read in either order by their sessions); and granted versions
///   rise with epochs.
/// - **No two sessions held the profile at once**, judged from the epochs,
///   the fencing tokens: along the stored history the writers' epochs never
///   decrease, and within one epoch all writes come from the granted
///   session in `seq` order; a grant of epoch `e` at version `g` read the
///   data of version `g`, every applied write under an older epoch is at or
///   below `g`, and every write under `e` or newer is above it; no write
///   under an older epoch sent after a newer grant was acknowledged was
///   applied; and every write acknowledged before a load was sent is seen
///   by its grant (a grant never reads data older than the last
///   acknowledged write).
fn check(history: &History, stored: &[Stored]) -> Result<(), Vec<String>> {
    let mut violations = Vec::new();
    for (key, profile) in stored.iter().enumerate() {
        let mut bad = |message: String| violations.push(format!("key {key}: {message}"));
        let grants: Vec<&Grant> = history.grants.iter().filter(|g| g.key == key).collect();
        let writes: Vec<&Write> = history.writes.iter().filter(|w| w.key == key).collect();
        let by_id: HashMap<WriteId, &Write> = writes.iter().map(|w| (w.id, *w)).collect();
        if by_id.len() != writes.len() {
            bad("a write id was attempted twice (test bug)".into());
        }

        // The stored history: complete, each version a known write, each
        // write applied at most once.
        let mut applied: BTreeMap<u64, WriteId> = BTreeMap::new();
        let mut version_of: HashMap<WriteId, u64> = HashMap::new();
        for version in 1..=profile.version {
            let Some(data) = profile.versions.get(&version) else {
                bad(format!(
                    "version {version} of {} is missing",
                    profile.version
                ));
                continue;
            };
            let Some(id) = data.as_deref().and_then(WriteId::parse) else {
                bad(format!("version {version} holds unknown data {data:?}"));
                continue;
            };
            match by_id.get(&id) {
                None => bad(format!(
                    "version {version} holds {id:?}, which no session wrote"
                )),
                Some(w) if w.outcome == Outcome::Refused => bad(format!(
                    "version {version} holds {id:?}, a write the daemon refused"
                )),
                Some(_) => {}
            }
            if let Some(first) = version_of.insert(id, version) {
                bad(format!(
                    "{id:?} was applied twice, at versions {first} and {version}"
                ));
            }
            applied.insert(version, id);
        }
        let newest = profile.versions.get(&profile.version).cloned().flatten();
        if profile.data != newest {
            bad(format!(
                "the current data {:?} is not that of the current version {}",
                profile.data.as_deref().map(String::from_utf8_lossy),
                profile.version
            ));
        }

        // Every acknowledged write is where it was acknowledged.
        let mut acked_versions: HashMap<u64, WriteId> = HashMap::new();
        for w in &writes {
            let Outcome::Acked { version, .. } = w.outcome else {
                continue;
            };
            if let Some(other) = acked_versions.insert(version, w.id) {
                bad(format!(
                    "{:?} and {other:?} were both acknowledged at version {version}",
                    w.id
                ));
            }
            let what = if w.release { "release" } else { "save" };
            if version > profile.version {
                bad(format!(
                    "acknowledged {what} {:?} at version {version}, but the profile is at version {}: lost",
                    w.id, profile.version
                ));
            } else if applied.get(&version) != Some(&w.id) {
                bad(format!(
                    "acknowledged {what} {:?} at version {version}, but that version holds {:?}: lost",
                    w.id,
                    applied.get(&version)
                ));
            }
        }

        // Along the stored history, epochs never go back, and one epoch's
        // writes come from one session in order.
        for (pair_v, pair) in applied.iter().zip(applied.iter().skip(1)) {
            let ((v1, a), (v2, b)) = (pair_v, pair);
            if b.epoch < a.epoch {
                bad(format!(
                    "version {v2} ({b:?}) was written under an older epoch than version {v1} ({a:?})"
                ));
            } else if b.epoch == a.epoch && (b.client != a.client || b.seq <= a.seq) {
                bad(format!(
                    "versions {v1} ({a:?}) and {v2} ({b:?}) share an epoch out of order or across sessions"
                ));
            }
        }

        // Grants: one per epoch, each reading the data of its version,
        // with older epochs' writes before it and its own and newer after.
        let mut epochs = HashSet::new();
        for g in &grants {
            if !epochs.insert(g.epoch) {
                bad(format!("epoch {} was granted twice", g.epoch));
            }
            let expected = if g.version == 0 {
                None
            } else {
                profile.versions.get(&g.version).cloned().flatten()
            };
            if g.data != expected {
                bad(format!(
                    "the grant of epoch {} read {:?} at version {}, but that version holds {:?}",
                    g.epoch,
                    g.data.as_deref().map(String::from_utf8_lossy),
                    g.version,
                    expected.as_deref().map(String::from_utf8_lossy)
                ));
            }
            for (&version, id) in &applied {
                if id.epoch < g.epoch && version > g.version {
                    bad(format!(
                        "{id:?} under an older epoch was applied at version {version}, after the grant of epoch {} at version {}",
                        g.epoch, g.version
                    ));
                }
                if id.epoch >= g.epoch && version <= g.version {
                    bad(format!(
                        "{id:?} was applied at version {version}, before the grant of epoch {} at version {}",
                        g.epoch, g.version
                    ));
                }
                if id.epoch == g.epoch && id.client != g.client {
                    bad(format!(
                        "{id:?} was written under epoch {}, granted to client {}",
                        g.epoch, g.client
                    ));
                }
            }
        }
        let mut by_epoch = grants.clone();
        by_epoch.sort_by_key(|g| g.epoch);
        for pair in by_epoch.windows(2) {
            if pair[1].version < pair[0].version {
                bad(format!(
                    "epoch {} was granted at version {}, below epoch {}'s version {}",
                    pair[1].epoch, pair[1].version, pair[0].epoch, pair[0].version
                ));
            }
        }

        // Real time. Grants by acknowledgement, with the highest epoch
        // acknowledged so far.
        let mut by_ack = grants.clone();
        by_ack.sort_by_key(|g| g.acked);
        let mut highest = Vec::with_capacity(by_ack.len());
        let mut top = 0;
        for g in &by_ack {
            top = top.max(g.epoch);
            highest.push(top);
        }
        let highest_before = |at: Instant| {
            let n = by_ack.partition_point(|g| g.acked < at);
            if n == 0 { 0 } else { highest[n - 1] }
        };
        for g in &grants {
            let before = highest_before(g.sent);
            if before >= g.epoch {
                bad(format!(
                    "epoch {} was granted to a load sent after epoch {before} was acknowledged: the epoch went back",
                    g.epoch
                ));
            }
        }
        for w in &writes {
            let applied_here =
                matches!(w.outcome, Outcome::Acked { .. }) || version_of.contains_key(&w.id);
            let before = highest_before(w.sent);
            if applied_here && before > w.id.epoch {
                bad(format!(
                    "{:?} was applied though it was sent after epoch {before} was acknowledged",
                    w.id
                ));
            }
        }
        // Acknowledged writes by acknowledgement, with the highest version
        // acknowledged so far: each grant must see them.
        let mut acked: Vec<(Instant, u64, WriteId)> = writes
            .iter()
            .filter_map(|w| match w.outcome {
                Outcome::Acked { version, at } => Some((at, version, w.id)),
                _ => None,
            })
            .collect();
        acked.sort();
        let mut newest = Vec::with_capacity(acked.len());
        let mut top = (0, None);
        for &(_, version, id) in &acked {
            if version > top.0 {
                top = (version, Some(id));
            }
            newest.push(top);
        }
        for g in &grants {
            let n = acked.partition_point(|a| a.0 < g.sent);
            if n > 0 && newest[n - 1].0 > g.version {
                bad(format!(
                    "the grant of epoch {} read version {}, older than {:?} acknowledged at version {} before the load was sent",
                    g.epoch,
                    g.version,
                    newest[n - 1].1,
                    newest[n - 1].0
                ));
            }
        }
    }
    if violations.is_empty() {
        Ok(())
    } else {
        Err(violations)
    }
}

fn job(id: usize) -> String {
    format!("crash-{id}")
}

fn key_name(key: usize) -> String {
    format!("key-{key}")
}

/// A tiny deterministic generator, so a failing seed can be replayed.
#[derive(Debug)]
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n`.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
