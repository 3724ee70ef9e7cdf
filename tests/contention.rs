//! Many sessions fight over a few profiles; a checker replays what every
//! session was told and proves that no two sessions ever wrote under one
//! lease and that no acknowledged save was lost.
//!
//! Each profile holds a counter. A session that is granted a profile reads
//! the counter and saves it incremented, one step per save, so every
//! acknowledged write names the value it wrote. If two sessions had written
//! while holding the same profile, two acknowledged writes would carry the
//! same value; if an acknowledged write had been lost, the next grant would
//! read less than the count of writes acknowledged before it.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Daemon;
use profiled_client::{Client, ClientError, ErrorCode, LoadOptions, LoadPolicy};

const STORE: &str = "Contention";
const KEYS: usize = 4;
const SESSIONS: usize = 32;
const RUN_FOR: Duration = Duration::from_secs(3);

/// What one session was told, in the order it was told.
#[derive(Debug, Clone)]
enum Record {
    /// A grant of `epoch` whose data held `value`.
    Granted { key: usize, epoch: u64, value: u64 },
    /// An acknowledged write of `value` under `epoch`.
    Wrote { key: usize, epoch: u64, value: u64 },
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_two_sessions_ever_hold_a_profile_and_no_acknowledged_save_is_lost() {
    let daemon = Daemon::start_with("[leases]\nforce_load_timeout = \"50ms\"\n");
    let history = Arc::new(Mutex::new(Vec::new()));
    let stop_at = Instant::now() + RUN_FOR;
    let mut sessions = Vec::new();
    for id in 0..SESSIONS {
        let client = daemon.client(&format!("fighter-{id}")).await;
        let history = Arc::clone(&history);
        sessions.push(tokio::spawn(fight(client, id as u64 + 1, stop_at, history)));
    }
    let mut outcomes = BTreeMap::new();
    for session in sessions {
        for (outcome, count) in session.await.expect("session task") {
            *outcomes.entry(outcome).or_insert(0u64) += count;
        }
    }

    // Read the final values with a fresh session.
    let reader = daemon.client("reader").await;
    let mut finals = Vec::new();
    for key in 0..KEYS {
        let profile = reader
            .load(STORE, &key_name(key), LoadPolicy::ForceLoad)
            .await
            .expect("final load");
        finals.push(counter(profile.data()));
        profile.release(None).await.expect("final release");
    }

    let history = history.lock().expect("history").clone();
    println!("outcomes: {outcomes:?}, final counters: {finals:?}");
    check(&history, &finals);
    let writes = history
        .iter()
        .filter(|r| matches!(r, Record::Wrote { .. }))
        .count();
    assert!(
        writes > 100,
        "the fight made progress: {writes} writes, {outcomes:?}"
    );
    assert!(
        outcomes.get("lease lost").copied().unwrap_or(0) > 0,
        "fencing was exercised: {outcomes:?}"
    );
}

/// One session's loop: load a random profile with a random policy, save a
/// few increments, release. Returns a count of outcomes for the report.
async fn fight(
    client: Client,
    seed: u64,
    stop_at: Instant,
    history: Arc<Mutex<Vec<Record>>>,
) -> BTreeMap<&'static str, u64> {
    let mut rng = XorShift(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut outcomes = BTreeMap::new();
    let mut count = |what| *outcomes.entry(what).or_insert(0) += 1;
    while Instant::now() < stop_at {
        let key = (rng.next() % KEYS as u64) as usize;
        let policy = match rng.next() % 10 {
            0..=3 => LoadPolicy::ForceLoad,
            4..=5 => LoadPolicy::Steal,
            6..=7 => LoadPolicy::Repeat,
            _ => LoadPolicy::Cancel,
        };
        let options = LoadOptions {
            policy,
            deadline: Some(Duration::from_millis(500)),
        };
        let profile = match client.load_with(STORE, &key_name(key), options).await {
            Ok(profile) => profile,
            Err(err) => {
                count(classify(&err));
                continue;
            }
        };
        let epoch = profile.epoch();
        let mut value = counter(profile.data());
        history
            .lock()
            .expect("history")
            .push(Record::Granted { key, epoch, value });
        count("granted");
        let saves = rng.next() % 4;
        let mut lost = false;
        for _ in 0..saves {
            match profile.save(value_bytes(value + 1)).await {
                Ok(_) => {
                    value += 1;
                    history
                        .lock()
                        .expect("history")
                        .push(Record::Wrote { key, epoch, value });
                }
                Err(err) => {
                    count(classify(&err));
                    lost = true;
                    break;
                }
            }
            tokio::task::yield_now().await;
        }
        if lost {
            continue;
        }
        let final_write = rng.next().is_multiple_of(2);
        let data = final_write.then(|| value_bytes(value + 1));
        match profile.release(data).await {
            Ok(_) => {
                if final_write {
                    history.lock().expect("history").push(Record::Wrote {
                        key,
                        epoch,
                        value: value + 1,
                    });
                }
                count("released");
            }
            Err(err) => count(classify(&err)),
        }
    }
    outcomes
}

/// Checks the recorded history against the model of one counter per
/// profile, incremented only by its current lease holder.
fn check(history: &[Record], finals: &[u64]) {
    for (key, &final_value) in finals.iter().enumerate() {
        let mut grants = Vec::new();
        let mut writes = Vec::new();
        for record in history {
            match *record {
                Record::Granted {
                    key: k,
                    epoch,
                    value,
                } if k == key => grants.push((epoch, value)),
                Record::Wrote {
                    key: k,
                    epoch,
                    value,
                } if k == key => writes.push((epoch, value)),
                _ => {}
            }
        }

        // Every grant had its own epoch: no two sessions shared a lease.
        let epochs: HashSet<u64> = grants.iter().map(|(epoch, _)| *epoch).collect();
        assert_eq!(
            epochs.len(),
            grants.len(),
            "key {key}: an epoch was granted twice"
        );

        // Every acknowledged write wrote a different value, and together
        // they account for the final counter exactly: none was lost and
        // none was made by a session that no longer held the lease.
        let values: HashSet<u64> = writes.iter().map(|(_, value)| *value).collect();
        assert_eq!(
            values.len(),
            writes.len(),
            "key {key}: two writes wrote the same value"
        );
        assert_eq!(
            writes.len() as u64,
            final_value,
            "key {key}: {} acknowledged writes but the counter is {final_value}",
            writes.len()
        );
        assert_eq!(
            values,
            (1..=final_value).collect(),
            "key {key}: a gap in the writes"
        );

        // Each grant saw every write acknowledged under an earlier epoch.
        for &(epoch, seen) in &grants {
            let before = writes.iter().filter(|(e, _)| *e < epoch).count() as u64;
            assert_eq!(
                seen, before,
                "key {key}: the grant of epoch {epoch} read {seen}, but {before} writes were acknowledged before it"
            );
        }

        // Writes under one epoch continue from what its grant read.
        for &(epoch, seen) in &grants {
            let mine: Vec<u64> = writes
                .iter()
                .filter(|(e, _)| *e == epoch)
                .map(|(_, value)| *value)
                .collect();
            let expected: Vec<u64> = (seen + 1..=seen + mine.len() as u64).collect();
            assert_eq!(
                mine, expected,
                "key {key}: epoch {epoch} wrote out of order"
            );
        }
    }
}

fn classify(err: &ClientError) -> &'static str {
    match err.code() {
        Some(ErrorCode::LeaseLost) => "lease lost",
        Some(ErrorCode::Taken { .. }) => "taken",
        Some(ErrorCode::Superseded) => "superseded",
        Some(ErrorCode::Timeout) => "timeout",
        other => panic!("unexpected error in the fight: {err} ({other:?})"),
    }
}

fn key_name(key: usize) -> String {
    format!("key-{key}")
}

fn counter(data: Option<&[u8]>) -> u64 {
    data.map_or(0, |bytes| {
        u64::from_le_bytes(bytes.try_into().expect("an 8-byte counter"))
    })
}

fn value_bytes(value: u64) -> Vec<u8> {
    value.to_le_bytes().to_vec()
}

/// A tiny deterministic generator, so a failing seed can be replayed.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
