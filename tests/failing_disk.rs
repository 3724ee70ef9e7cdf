//! A disk that fails under the daemon, for real: its data directory is an
//! ext4 filesystem on a loop device whose backing file sits on a small
//! tmpfs. Filling that tmpfs makes the kernel's writeback fail, so
//! `fdatasync` on the WAL reports an error for data that `write` had
//! accepted.
//!
//! After such a failure the WAL file holds batches whose fate is unknown,
//! and a reopen would replay them from the page cache. The daemon must
//! therefore answer them as in doubt, acknowledge nothing more and stop,
//! leaving its leases recorded as after a crash; the next start rebuilds
//! its lease table from what storage holds. Mounting needs root, and loop
//! devices a kernel that offers them; without either the test says so and
//! checks nothing, unless `PROFILED_REQUIRE_DISK_TESTS` is set (CI sets it),
//! when it fails instead.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::Daemon;
use profiled_client::{ErrorCode, LoadPolicy};

const STORE: &str = "PlayerData";

/// The loop device and its two mounts, undone when the test ends, however
/// it ends.
struct Stack {
    /// The ext4 filesystem the daemon's data lives on.
    data: PathBuf,
    /// The tmpfs that holds the loop device's backing file.
    backing: PathBuf,
    /// The loop device, such as `/dev/loop0`.
    device: String,
}

impl Stack {
    /// Mounts a 40 MiB ext4 filesystem at `data`, on a loop device backed by
    /// a sparse file on a 48 MiB tmpfs beside it. `None` if that cannot be
    /// done here.
    fn build(data: &Path) -> Option<Self> {
        let backing = data.with_file_name("backing");
        std::fs::create_dir_all(&backing).ok()?;
        std::fs::create_dir_all(data).ok()?;
        if !run(
            "mount",
            &["-t", "tmpfs", "-o", "size=48m", "tmpfs", path(&backing)],
        ) {
            return None;
        }
        let mut stack = Self {
            data: data.to_owned(),
            backing,
            device: String::new(),
        };
        let image = stack.backing.join("disk.img");
        std::fs::File::create(&image)
            .and_then(|file| file.set_len(40 << 20))
            .ok()?;
        let out = Command::new("losetup")
            .args(["--find", "--show", path(&image)])
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        stack.device = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !run("mkfs.ext4", &["-q", &stack.device]) || !stack.mount() {
            return None;
        }
        Some(stack)
    }

    fn mount(&self) -> bool {
        run("mount", &[&self.device, path(&self.data)])
    }

    /// Fills the backing tmpfs, so blocks the filesystem has not written
    /// before can no longer be written.
    fn fail_writes(&self) {
        let filler = self.backing.join("filler");
        let mut file = std::fs::File::create(filler).expect("create the filler");
        let chunk = vec![0u8; 1 << 20];
        while std::io::Write::write_all(&mut file, &chunk).is_ok() {}
    }

    /// Frees the backing tmpfs and repairs and remounts the filesystem, as
    /// an operator would after replacing a failing disk's cause.
    fn repair(&self) {
        assert!(run("umount", &[path(&self.data)]), "unmount the data");
        std::fs::remove_file(self.backing.join("filler")).expect("free the backing");
        // e2fsck exits 1 when it fixed something; only 4 and up are failures.
        let fixed = Command::new("e2fsck")
            .args(["-f", "-y", &self.device])
            .output()
            .expect("run e2fsck");
        assert!(
            fixed.status.code().is_some_and(|code| code < 4),
            "{fixed:?}"
        );
        assert!(self.mount(), "mount the repaired filesystem");
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.data).status();
        if !self.device.is_empty() {
            let _ = Command::new("losetup").args(["-d", &self.device]).status();
        }
        let _ = Command::new("umount").arg("-l").arg(&self.backing).status();
    }
}

/// Runs a command quietly; whether it succeeded.
fn run(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|out| out.status.success())
}

fn path(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_wal_sync_stops_the_daemon_and_the_next_start_recovers_from_storage() {
    let mut stack = None;
    // Small memtables, so RocksDB's WAL preallocation fits the small
    // filesystem after a recovery too.
    let config = "memtable_bytes = 16777216\n[session]\nresume_grace = \"60s\"\n";
    let mut daemon = Daemon::start_prepared(config, |data| {
        stack = Stack::build(data);
        if stack.is_none() {
            // The daemon then starts on a plain directory; nothing is checked.
            let _ = std::fs::create_dir_all(data);
        }
    });
    let Some(stack) = stack else {
        assert!(
            std::env::var_os("PROFILED_REQUIRE_DISK_TESTS").is_none(),
            "cannot build the failing disk (root, loop devices, mkfs.ext4), \
             and PROFILED_REQUIRE_DISK_TESTS is set"
        );
        eprintln!("skipped: needs root, loop devices and mkfs.ext4");
        return;
    };

    let client = daemon.client("game").await;
    let profile = client
        .load(STORE, "p", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    let epoch = profile.epoch();
    profile
        .save(b"before the fault".to_vec())
        .await
        .expect("save");

    stack.fail_writes();
    let mut failure = None;
    for round in 0..100u8 {
        let data = vec![round; 64 * 1024];
        match profile.save(data.clone()).await {
            Ok(_) => {}
            Err(err) => {
                failure = Some((err, data));
                break;
            }
        }
    }
    let (err, in_doubt) = failure.expect("a save failed once writeback could not write");
    // The save whose sync failed is in doubt, and says so. (The daemon may
    // be gone before its answer is read; then the client has none to give.)
    assert!(
        err.code() == Some(&ErrorCode::Storage)
            && err.to_string().contains("may or may not have been kept")
            || err.code().is_none(),
        "a storage error that says the save is in doubt: {err}"
    );
    drop(profile);
    drop(client);

    let status = daemon.wait_exit(Duration::from_secs(30));
    assert!(
        !status.success(),
        "the daemon stops with an error: {status}"
    );
    let log = daemon.log();
    assert!(
        log.contains("syncing the WAL failed") && log.contains("storage failed for good"),
        "the log says why: {log}"
    );
    assert!(
        !log.contains("storage reopened"),
        "the database is not reopened in place: {log}"
    );

    stack.repair();
    daemon.restart();
    let resumed = daemon.client("game").await;
    let leases = resumed.welcome().leases;
    assert_eq!(leases.len(), 1, "the lease is recovered: {leases:?}");
    assert_eq!((leases[0].key.as_str(), leases[0].epoch), ("p", epoch));
    // The profile holds one of the versions written: this storage stack
    // may lose even data whose `fdatasync` reported success (ext4 logs
    // "failed to convert unwritten extents" when the loop device's backing
    // runs out), so nothing more can be promised here.
    let view = resumed.view(STORE, "p", None).await.expect("view");
    let kept = view.data.expect("the profile has data");
    assert!(
        kept == b"before the fault" || kept.len() == 64 * 1024 && kept[0] <= in_doubt[0],
        "a version that was written: {} bytes",
        kept.len()
    );
    // The lease table agrees with storage: the recovered lease takes a save
    // under its epoch, and the save lands.
    resumed
        .save(STORE, "p", epoch, b"after recovery".to_vec())
        .await
        .expect("a save under the recovered lease");
    let view = resumed.view(STORE, "p", None).await.expect("view");
    assert_eq!(view.data.as_deref(), Some(&b"after recovery"[..]));
}
