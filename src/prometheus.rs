//! The optional Prometheus endpoint (`metrics.prometheus`).
//!
//! Operators scrape Prometheus, and `profilectl stats` needs a shell on the
//! host, so the daemon can also serve its counters over HTTP. The numbers
//! are the same [`Stats::report`](crate::stats::Stats::report) that a
//! `Stats` request returns; the HTTP side is the `metrics-exporter-prometheus`
//! listener, so the daemon writes no HTTP of its own.
//!
//! The recorder is never installed as the process-wide `metrics` recorder:
//! one process may run several daemons (the tests do), each with its own
//! counters. Nothing in the daemon uses the `metrics` macros either; the
//! counters stay plain atomics, and a refresh task copies the report into
//! this daemon's recorder at start and then every [`REFRESH`], so a scrape
//! sees numbers at most that old.
//!
//! Each reported metric becomes one series. Names ending in `_total`,
//! `_count` or `_bucket` are counts that only grow: they are registered as
//! counters (set with `absolute`) and rendered as `# TYPE ... counter`.
//! Everything else (the gauges, uptime and the handoff `_sum`) is registered
//! as a gauge, which keeps fractional values. The handoff histogram is thus
//! exposed as its component series rather than under one
//! `# TYPE ... histogram` line; `histogram_quantile` works on its `_bucket`
//! series all the same.
//!
//! Two things the exporter spawns are outside the daemon's task tracker:
//! its upkeep loop (`PrometheusBuilder::build` spawns one that runs until
//! the runtime ends; it only holds the recorder, and has no work for
//! counters and gauges) and the tasks serving open HTTP connections. Neither
//! holds storage, so neither holds up a stop; the listener itself closes
//! when `stop` is cancelled.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics::{Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{ExporterFuture, PrometheusBuilder, PrometheusRecorder};
use profiled_protocol::Metric;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::connection::Context;
use crate::server::ServerError;

/// How often the recorder is refreshed from the daemon's counters.
const REFRESH: Duration = Duration::from_secs(1);

/// The metadata every metric is registered with. The Prometheus recorder
/// ignores it, but the `Recorder` API asks for it.
const METADATA: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, None);

/// A bound but not yet serving Prometheus endpoint.
pub(crate) struct Exporter {
    /// This daemon's own recorder, which the endpoint renders.
    recorder: PrometheusRecorder,
    /// Serves HTTP on the bound listener until dropped.
    serve: ExporterFuture,
    /// The address it listens on, for logs.
    addr: SocketAddr,
}

impl Exporter {
    /// Binds `addr`, so that a taken or forbidden address stops the daemon
    /// before it reports ready. Must run inside the Tokio runtime.
    pub(crate) fn bind(addr: SocketAddr) -> Result<Self, ServerError> {
        let (recorder, serve) = PrometheusBuilder::new()
            .with_http_listener(addr)
            .build()
            .map_err(|err| ServerError::Metrics {
                addr,
                reason: err.to_string(),
            })?;
        Ok(Self {
            recorder,
            serve,
            addr,
        })
    }

    /// Serves the endpoint and keeps its numbers fresh, both on `tracker`,
    /// until `stop` is cancelled.
    pub(crate) fn spawn(
        self,
        context: Arc<Context>,
        stop: &CancellationToken,
        tracker: &TaskTracker,
    ) {
        let Self {
            recorder,
            serve,
            addr,
        } = self;
        tracing::info!(%addr, "serving prometheus metrics");
        let serve_stop = stop.clone();
        tracker.spawn(async move {
            tokio::select! {
                () = serve_stop.cancelled() => {}
                result = serve => {
                    // The listener loops until dropped; it ends only on an
                    // error it cannot recover from.
                    tracing::error!(%addr, ?result, "the prometheus endpoint stopped");
                }
            }
        });
        tracker.spawn(refresh(recorder, context, stop.clone()));
    }
}

/// Copies the daemon's report into `recorder` now and every [`REFRESH`]
/// until `stop` is cancelled.
async fn refresh(recorder: PrometheusRecorder, context: Arc<Context>, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(REFRESH);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let report = tokio::select! {
            () = stop.cancelled() => return,
            report = async {
                // The first tick completes at once, so the endpoint has
                // numbers from the start.
                ticks.tick().await;
                context.stats.report(crate::requests::gauges(&context).await)
            } => report,
        };
        publish(&recorder, &report);
    }
}

/// Sets every metric of `report` in `recorder`.
fn publish(recorder: &PrometheusRecorder, report: &[Metric]) {
    for metric in report {
        let labels: Vec<Label> = metric
            .labels
            .iter()
            .map(|(name, value)| Label::new(name.clone(), value.clone()))
            .collect();
        let key = Key::from_parts(metric.name.clone(), labels);
        if is_count(&metric.name) {
            // Counts are whole and never negative; the cast saturates.
            recorder
                .register_counter(&key, &METADATA)
                .absolute(metric.value as u64);
        } else {
            recorder.register_gauge(&key, &METADATA).set(metric.value);
        }
    }
}

/// Whether `name` is a count that only grows, by Prometheus naming
/// conventions.
fn is_count(name: &str) -> bool {
    ["_total", "_count", "_bucket"]
        .iter()
        .any(|suffix| name.ends_with(suffix))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{Gauges, Stats};

    #[test]
    fn a_report_renders_with_prometheus_types() {
        let stats = Stats::new();
        stats.saved();
        stats.saved();
        stats.handoff(Duration::from_millis(3));
        let gauges = Gauges {
            leases_held: 1,
            storage_bytes: 4096,
            ..Gauges::default()
        };
        let recorder = PrometheusBuilder::new().build_recorder();
        publish(&recorder, &stats.report(gauges));
        let text = recorder.handle().render();
        let lines: Vec<&str> = text.lines().collect();
        for expected in [
            "# TYPE profiled_saves_total counter",
            "profiled_saves_total 2",
            "# TYPE profiled_leases_held gauge",
            "profiled_leases_held 1",
            "profiled_storage_bytes 4096",
            "profiled_releases_total{by=\"daemon\"} 0",
            "profiled_handoff_seconds_bucket{le=\"0.002\"} 0",
            "profiled_handoff_seconds_bucket{le=\"0.005\"} 1",
            "profiled_handoff_seconds_bucket{le=\"+Inf\"} 1",
            "profiled_handoff_seconds_count 1",
            "profiled_handoff_seconds_sum 0.003",
        ] {
            assert!(lines.contains(&expected), "no {expected:?} in:\n{text}");
        }
    }

    #[test]
    fn a_second_publish_replaces_the_values() {
        let stats = Stats::new();
        let recorder = PrometheusBuilder::new().build_recorder();
        publish(&recorder, &stats.report(Gauges::default()));
        stats.saved();
        publish(
            &recorder,
            &stats.report(Gauges {
                leases_held: 5,
                ..Gauges::default()
            }),
        );
        let text = recorder.handle().render();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.contains(&"profiled_saves_total 1"), "{text}");
        assert!(lines.contains(&"profiled_leases_held 5"), "{text}");
    }

    #[tokio::test]
    async fn a_taken_address_is_refused_naming_it() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = taken.local_addr().expect("local address");
        let Err(err) = Exporter::bind(addr) else {
            panic!("binding a taken address succeeded");
        };
        let message = err.to_string();
        assert!(message.contains(&addr.to_string()), "{message}");
        assert!(message.contains("metrics.prometheus"), "{message}");
    }
}
