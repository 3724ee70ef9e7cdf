//! A full disk, for real: the daemon's data directory is a small tmpfs.
//! Saves must fail with a clear `Storage` error, nothing acknowledged may be
//! lost, the fault must show in stats, and the daemon must recover by itself
//! once space returns. Mounting needs root (CI runs as root); without it the
//! test says so and checks nothing.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::Daemon;
use profiled_client::{Client, ErrorCode, LoadPolicy, Metric, Profile};

const STORE: &str = "PlayerData";

/// Unmounts the tmpfs when the test ends, however it ends.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn metric(metrics: &[Metric], name: &str) -> f64 {
    metrics
        .iter()
        .find(|m| m.name == name)
        .map(|m| m.value)
        .unwrap_or_else(|| panic!("no metric {name}"))
}

fn free_bytes(path: &Path) -> u64 {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()
        .expect("run df");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .expect("df prints the free bytes")
}

#[tokio::test]
async fn a_full_disk_fails_saves_clearly_loses_nothing_and_recovers_by_itself() {
    full_disk("").await;
}

/// Buffered, no save waits for a sync, so the failure comes from the
/// write itself; the same promises hold.
#[tokio::test]
async fn a_full_disk_with_buffered_writes_also_recovers_by_itself() {
    full_disk("sync = false").await;
}

/// With a memtable budget smaller than a few saves, the full disk also
/// fails RocksDB's flushes. The writes must still fail with a storage
/// error, not wait forever for memory that a failed flush never frees.
#[tokio::test]
async fn a_full_disk_under_a_small_memtable_budget_fails_writes_instead_of_hanging() {
    tokio::time::timeout(
        Duration::from_secs(60),
        full_disk("memtable_bytes = 1048576"),
    )
    .await
    .expect("the full-disk test finished rather than hung");
}

/// Fills the disk under a daemon started with `extra` storage settings.
async fn full_disk(extra: &str) {
    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    if !root {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let mut mount = None;
    let daemon = Daemon::start_prepared(extra, |data| {
        std::fs::create_dir_all(data).expect("create the mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=32m", "tmpfs"])
            .arg(data)
            .status()
            .expect("run mount");
        assert!(status.success(), "mount a tmpfs");
        mount = Some(Mount(data.to_owned()));
    });
    let _mount = mount.expect("mounted");
    let client = daemon.client("game").await;
    let mut profiles: Vec<Profile> = Vec::new();
    for i in 0..4 {
        profiles.push(
            client
                .load(STORE, &format!("p{i}"), LoadPolicy::ForceLoad)
                .await
                .expect("load"),
        );
    }

    // Leave about 3 MiB free, then save until the disk is full.
    let filler = daemon.data_dir().join("filler");
    let leave = 3 * 1024 * 1024;
    let fill = free_bytes(&daemon.data_dir()).saturating_sub(leave);
    std::fs::write(&filler, vec![0u8; usize::try_from(fill).expect("fits")]).expect("fill");
    let mut acknowledged: BTreeMap<usize, Vec<u8>> = BTreeMap::new();
    let mut failure = None;
    for round in 0..200u32 {
        let slot = usize::try_from(round).expect("small") % profiles.len();
        let data = vec![u8::try_from(round % 251).expect("small"); 256 * 1024];
        match profiles[slot].save(data.clone()).await {
            Ok(_) => {
                acknowledged.insert(slot, data);
            }
            Err(err) => {
                failure = Some(err);
                break;
            }
        }
    }
    let err = failure.expect("the disk filled up");
    assert_eq!(err.code(), Some(&ErrorCode::Storage), "{err}");
    assert!(
        err.to_string().contains("No space left"),
        "a clear error: {err}"
    );
    assert!(!acknowledged.is_empty(), "some saves landed first");
    // The fault is counted. (Whether `profiled_storage_degraded` still
    // reads 1 depends on how fast the reopen is; it is checked back at 0
    // below.)
    let stats = client.stats().await.expect("stats");
    assert!(metric(&stats, "profiled_storage_errors_total") >= 1.0);

    // Space returns; the daemon reopens storage on its own, and the same
    // leases save again.
    std::fs::remove_file(&filler).expect("free the space");
    let until = Instant::now() + Duration::from_secs(30);
    let data = b"after the fault".to_vec();
    loop {
        match profiles[0].save(data.clone()).await {
            Ok(_) => break,
            Err(err) if err.code() == Some(&ErrorCode::Storage) => {
                assert!(Instant::now() < until, "storage never recovered: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => panic!("unexpected error while recovering: {err}"),
        }
    }
    acknowledged.insert(0, data);
    let stats = client.stats().await.expect("stats");
    assert_eq!(metric(&stats, "profiled_storage_degraded"), 0.0);
    check(&client, &acknowledged).await;

    // And after a crash, too.
    drop(profiles);
    client.close().await;
    let mut daemon = daemon;
    daemon.kill();
    daemon.restart();
    let client = daemon.client("reader").await;
    check(&client, &acknowledged).await;
}

/// Every acknowledged save is what the daemon now holds.
async fn check(client: &Client, acknowledged: &BTreeMap<usize, Vec<u8>>) {
    for (slot, data) in acknowledged {
        let view = client
            .view(STORE, &format!("p{slot}"), None)
            .await
            .expect("view");
        assert_eq!(view.data.as_deref(), Some(&data[..]), "p{slot}");
    }
}
