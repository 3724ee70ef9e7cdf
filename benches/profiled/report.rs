//! What the bench prints: a table per workload as it finishes, then every
//! issue-7 target with its measured value, then one JSON object per figure.

use std::collections::BTreeMap;

use crate::workload::{Durability, Outcome, Stat};

/// Every figure of the run, by name, and the JSON lines to print last.
#[derive(Debug, Default)]
pub struct Report {
    /// Figures by dotted name, for the targets.
    figures: BTreeMap<String, f64>,
    /// One JSON object per figure, in the order measured.
    json: Vec<String>,
}

/// A goal: `value` of the figure (or ratio of figures) against a bound.
struct Target {
    what: &'static str,
    /// The figure's name, or a ratio `a / b` of two figure names.
    numerator: String,
    denominator: Option<String>,
    /// Whether the value must be at least (true) or at most (false) `bound`.
    at_least: bool,
    bound: f64,
    /// The same value for a server that does nothing but the socket's work
    /// (and the sync, at fsync), where the floors measure one: no daemon
    /// can do better on this machine, so a bound beyond it cannot be met
    /// here. A figure name, or a ratio of two, like the target's own.
    floor: Option<(String, Option<String>)>,
}

impl Report {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one named figure and its JSON line.
    pub fn figure(&mut self, name: &str, value: f64, unit: &str) {
        self.figures.insert(name.to_owned(), value);
        self.json.push(format!(
            "{{\"figure\":\"{name}\",\"value\":{value:.3},\"unit\":\"{unit}\"}}"
        ));
    }

    /// Looks a figure up.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.figures.get(name).copied()
    }

    /// Prints one workload's table across systems (the first is profiled,
    /// and ratios are profiled over each other system) and records its
    /// figures as `compare.<sync>.<workload>.<op>.<system>.<stat>`; then
    /// the line of server CPU per operation (see [`Self::cpu_per_op`]).
    pub fn comparison(
        &mut self,
        workload: &str,
        durability: Durability,
        outcomes: &[(&'static str, &Outcome)],
    ) {
        let Some((_, profiled)) = outcomes.first() else {
            return;
        };
        let slug = workload_slug(workload);
        println!();
        let mut header = format!("{workload:<16} {:<8} {:<8}", durability.name(), "op");
        for (system, _) in outcomes {
            header.push_str(&format!(" | {system:>10}/s"));
            if *system != "profiled" {
                header.push_str(&format!(" {:>7}", "ratio"));
            }
        }
        for (system, _) in outcomes {
            header.push_str(&format!(" | {system:>10} p50/p99/p999 us"));
        }
        println!("{header}");
        for (op, stat) in &profiled.rows {
            let mut line = format!("{:<16} {:<8} {op:<8}", "", "");
            let stats: Vec<Option<&Stat>> = outcomes.iter().map(|(_, o)| o.op(op)).collect();
            for ((system, _), other) in outcomes.iter().zip(&stats) {
                line.push_str(&format!(
                    " | {:>12}",
                    other.map_or("-".to_owned(), |s| format!("{:.0}", s.per_sec))
                ));
                if *system != "profiled" {
                    let ratio = other.map(|s| stat.per_sec / s.per_sec.max(1e-9));
                    line.push_str(&format!(
                        " {:>7}",
                        ratio.map_or("-".to_owned(), |r| format!("{r:.2}x"))
                    ));
                }
            }
            for other in &stats {
                line.push_str(&format!(
                    " | {:>29}",
                    other.map_or("-".to_owned(), Stat::percentiles)
                ));
            }
            println!("{line}");
            for ((system, _), other) in outcomes.iter().zip(&stats) {
                if let Some(s) = other {
                    let base = format!("compare.{}.{slug}.{op}.{system}", durability.name());
                    self.figure(&format!("{base}.per_sec"), s.per_sec, "1/s");
                    self.figure(&format!("{base}.p50_us"), s.p50, "us");
                    self.figure(&format!("{base}.p99_us"), s.p99, "us");
                    self.figure(&format!("{base}.p999_us"), s.p999, "us");
                    self.figure(&format!("{base}.count"), s.count as f64, "ops");
                }
            }
        }
        let taken: Vec<String> = outcomes
            .iter()
            .filter(|(_, o)| o.taken > 0)
            .map(|(system, o)| format!("{system} {}", o.taken))
            .collect();
        if !taken.is_empty() {
            println!("loads refused as taken: {}", taken.join(", "));
        }
        let base = format!("compare.{}.{slug}", durability.name());
        let server = format!("{base}.cpu_us_per_op");
        let client = format!("{base}.client_cpu_us_per_op");
        self.cpu_per_op(&server, "server", outcomes, Outcome::cpu_us_per_op);
        self.cpu_per_op(&client, "client", outcomes, Outcome::client_cpu_us_per_op);
        self.syncs_per_op(&format!("{base}.wal_syncs_per_op"), outcomes);
    }

    /// Prints the log syncs per operation of each system that counts them
    /// and made any (profiled at fsync), with the operations each sync
    /// carried, and records each as `<figure>.<system>`.
    fn syncs_per_op(&mut self, figure: &str, outcomes: &[(&'static str, &Outcome)]) {
        let mut parts = Vec::new();
        for (system, outcome) in outcomes {
            if let Some(per_op) = outcome.syncs_per_op() {
                parts.push(format!(
                    "{system} {per_op:.3} ({:.1} ops per sync)",
                    1.0 / per_op.max(1e-9)
                ));
                self.figure(&format!("{figure}.{system}"), per_op, "syncs");
            }
        }
        if !parts.is_empty() {
            println!("WAL syncs per op: {}", parts.join(", "));
        }
    }

    /// Prints the `side`'s (server or client) CPU time per operation of
    /// each system whose figure was read, with the ratio profiled over that
    /// peer (so, unlike the throughput ratios, lower is better for
    /// profiled), and records each as `<figure>.<system>`. Prints nothing
    /// if no system's figure was read.
    fn cpu_per_op(
        &mut self,
        figure: &str,
        side: &str,
        outcomes: &[(&'static str, &Outcome)],
        per_op: fn(&Outcome) -> Option<f64>,
    ) {
        let figures: Vec<(&str, f64)> = outcomes
            .iter()
            .filter_map(|(system, o)| Some((*system, per_op(o)?)))
            .collect();
        if figures.is_empty() {
            return;
        }
        let profiled = figures
            .iter()
            .find(|(system, _)| *system == "profiled")
            .map(|&(_, us)| us);
        let mut parts = Vec::new();
        for &(system, us) in &figures {
            let mut part = format!("{system} {us:.1} us");
            if system != "profiled"
                && let Some(profiled) = profiled
            {
                part.push_str(&format!(" ({:.2}x)", profiled / us.max(1e-9)));
            }
            parts.push(part);
            self.figure(&format!("{figure}.{system}"), us, "us");
        }
        println!(
            "{side} CPU per op: {} (ratio profiled / peer, lower is better)",
            parts.join(", ")
        );
    }

    /// Prints every target with its measured value and, where the floors
    /// give one, the best any server could do here; then the JSON lines.
    pub fn print(&self) {
        println!();
        println!(
            "{:<58} {:>12} {:>10}  met  {:>10}",
            "target", "measured", "goal", "floor"
        );
        for target in targets() {
            let value = self.value(&target.numerator, target.denominator.as_deref());
            let floor = target
                .floor
                .as_ref()
                .and_then(|(numerator, denominator)| self.value(numerator, denominator.as_deref()))
                .map_or(String::new(), trim);
            let goal = format!(
                "{} {}",
                if target.at_least { ">=" } else { "<=" },
                trim(target.bound)
            );
            match value {
                Some(value) => {
                    let met = if target.at_least {
                        value >= target.bound
                    } else {
                        value <= target.bound
                    };
                    println!(
                        "{:<58} {:>12} {:>10}  {:<3}  {floor:>10}",
                        target.what,
                        trim(value),
                        goal,
                        if met { "yes" } else { "NO" }
                    );
                }
                None => println!(
                    "{:<58} {:>12} {:>10}  {:<3}  {floor:>10}",
                    target.what, "not run", goal, "-"
                ),
            }
        }
        println!();
        for line in &self.json {
            println!("{line}");
        }
    }

    /// A figure, or the ratio of two; `None` if one was not measured.
    fn value(&self, numerator: &str, denominator: Option<&str>) -> Option<f64> {
        match denominator {
            None => self.get(numerator),
            Some(denominator) => self
                .get(numerator)
                .zip(self.get(denominator))
                .map(|(a, b)| a / b.max(1e-9)),
        }
    }
}

/// `sessions W=32` → `sessions`, `pings W=32` → `pings`, `saves W=1` →
/// `saves_w1`, the larger saves workload → `saves_wN`, so targets need not
/// know W. Each workload has its own slug, or one's per-workload figures
/// (CPU per operation) would overwrite another's.
fn workload_slug(workload: &str) -> String {
    if workload.starts_with("sessions") {
        "sessions".to_owned()
    } else if workload.starts_with("pings") {
        "pings".to_owned()
    } else if workload == "saves W=1" {
        "saves_w1".to_owned()
    } else {
        "saves_wN".to_owned()
    }
}

fn trim(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}

/// Issue 7's targets, in its order.
fn targets() -> Vec<Target> {
    let ratio = |what, a: &str, b: &str, bound| Target {
        what,
        numerator: a.to_owned(),
        denominator: Some(b.to_owned()),
        at_least: true,
        bound,
        floor: None,
    };
    let at_most = |what, a: &str, bound| Target {
        what,
        numerator: a.to_owned(),
        denominator: None,
        at_least: false,
        bound,
        floor: None,
    };
    vec![
        ratio(
            "fsync sessions/s, x Redis",
            "compare.fsync.sessions.session.profiled.per_sec",
            "compare.fsync.sessions.session.redis.per_sec",
            2.0,
        ),
        ratio(
            "fsync sessions/s, x PostgreSQL",
            "compare.fsync.sessions.session.profiled.per_sec",
            "compare.fsync.sessions.session.postgres.per_sec",
            4.0,
        ),
        ratio(
            "fsync saves/s at W=N, x Redis",
            "compare.fsync.saves_wN.save.profiled.per_sec",
            "compare.fsync.saves_wN.save.redis.per_sec",
            1.3,
        ),
        ratio(
            "buffered sessions/s, x Redis",
            "compare.buffered.sessions.session.profiled.per_sec",
            "compare.buffered.sessions.session.redis.per_sec",
            2.5,
        ),
        ratio(
            "buffered saves/s at W=N, x Redis",
            "compare.buffered.saves_wN.save.profiled.per_sec",
            "compare.buffered.saves_wN.save.redis.per_sec",
            2.0,
        ),
        ratio(
            "buffered saves/s at W=N, x Unix-socket echo at W=N",
            "compare.buffered.saves_wN.save.profiled.per_sec",
            "floor.echo.wN.per_sec",
            0.5,
        ),
        Target {
            what: "fsync save p50 at W=1, x one fdatasync over p50",
            numerator: "compare.fsync.saves_w1.save.profiled.p50_us".to_owned(),
            denominator: Some("floor.fdatasync_over.p50_us".to_owned()),
            at_least: false,
            bound: 1.2,
            floor: Some((
                "floor.synced_echo.w1.p50_us".to_owned(),
                Some("floor.fdatasync_over.p50_us".to_owned()),
            )),
        },
        Target {
            floor: Some(("floor.echo.w1.p50_us".to_owned(), None)),
            ..at_most(
                "buffered save p50 at W=1, us",
                "compare.buffered.saves_w1.save.profiled.p50_us",
                30.0,
            )
        },
        at_most("handoff p99 at fsync, ms", "handoff.fsync.p99_ms", 5.0),
        at_most(
            "SIGTERM to exit with 100,000 leases, s",
            "shutdown.100000.secs",
            2.0,
        ),
        at_most(
            "start to ready with 1,000,000 profiles after a clean stop, s",
            "restart.clean.secs",
            2.0,
        ),
        at_most(
            "start to ready with 1,000,000 profiles after SIGKILL, s",
            "restart.killed.secs",
            2.0,
        ),
        at_most(
            "daemon memory per held lease, bytes",
            "memory.per_lease_bytes",
            1024.0,
        ),
    ]
}
