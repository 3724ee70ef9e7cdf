//! The sweep that prunes kept versions older than `history.retention`.
//!
//! It runs beside the committer rather than through it, so saves never
//! wait for it. Versions past the retention are already hidden from views
//! and listings; the sweep only reclaims their space.

use std::sync::Arc;

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
        match storage.prune_expired(stop.clone()).await {
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
