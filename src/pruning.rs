//! The sweep that prunes kept versions older than `history.retention`.
//!
//! It runs beside the committer rather than through it, so saves never
//! wait for it. Versions past the retention are already hidden from views
//! and listings; the sweep only reclaims their space.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use crate::config::HistoryConfig;
use crate::stats::Stats;
use crate::storage::Storage;

/// Prunes every `history.prune_every` until `stop` is cancelled. The first
/// sweep runs one period after start, so a restart loop does not rescan.
pub async fn run(
    storage: Storage,
    history: HistoryConfig,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval(history.prune_every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let retention_ms = u64::try_from(history.retention.as_millis()).unwrap_or(u64::MAX);
        let cutoff_ms = unix_ms().saturating_sub(retention_ms);
        match storage.prune_history(cutoff_ms).await {
            Ok(0) => {}
            Ok(pruned) => {
                stats.pruned(pruned);
                tracing::info!(pruned, "pruned expired versions");
            }
            Err(err) => {
                stats.storage_error();
                tracing::warn!(error = %err, "pruning expired versions failed");
            }
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}
