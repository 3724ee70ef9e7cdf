//! The `profiled` binary: reads the config, optionally daemonizes, sets up
//! logging and signals, then hands over to [`profiled::run_with`].
//!
//! The order matters: daemonizing forks, and threads do not survive a fork,
//! so the fork comes before anything that starts a thread (the log writer,
//! the signal thread, the async runtime).

use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::Parser;
use profiled::Config;
use profiled::logging::{LevelChange, LevelControl};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tokio::sync::watch;

/// The exit code for a bad configuration (EX_CONFIG from sysexits.h).
const EXIT_CONFIG: u8 = 64;

/// A sidecar daemon that grants fenced session leases on player profiles.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The config file. A missing file means the built-in defaults.
    #[arg(long, default_value = "config.toml")]
    config: PathBuf,
    /// Overrides `listen.socket`.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Overrides `storage.path`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Validates the config file and exits: 0 if it is usable, 64 if not.
    #[arg(long)]
    check_config: bool,
    /// Detaches from the terminal and runs in the background, for hosts
    /// without systemd. Under systemd, do not use it.
    #[arg(long)]
    daemonize: bool,
    /// With --daemonize: where to write the daemon's pid. A pid file naming
    /// a live process stops the start.
    #[arg(long, requires = "daemonize")]
    pid_file: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match load_config(&args) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("profiled: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if args.check_config {
        println!("profiled: {}: ok", args.config.display());
        return ExitCode::SUCCESS;
    }
    if args.daemonize
        && let Err(err) = daemonize(args.pid_file.as_deref(), &config)
    {
        eprintln!("profiled: {err:#}");
        return ExitCode::FAILURE;
    }
    let result = serve(&args, config);
    // The pid file goes only after the daemon has fully stopped, so a
    // supervisor polling it never starts a second daemon over a live one.
    if let Some(path) = &args.pid_file {
        remove_pid_file(path);
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("profiled: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Reads the config file and applies the command-line overrides, at start
/// and on every SIGHUP.
fn load_config(args: &Args) -> Result<Config, profiled::config::ConfigError> {
    let mut config = Config::load(&args.config)?;
    if let Some(socket) = &args.socket {
        config.listen.socket = socket.clone();
    }
    if let Some(data_dir) = &args.data_dir {
        config.storage.path = data_dir.clone();
    }
    config.validate(&args.config)?;
    Ok(config)
}

fn serve(args: &Args, config: Config) -> anyhow::Result<()> {
    // Taken before any thread starts, because taking it edits the
    // environment (see `profiled::activation::take_inherited`).
    let inherited = profiled::activation::take_inherited()?;
    let logging = profiled::logging::init(&config.log)?;
    let stops = spawn_signal_thread(args, &config, logging.level_control())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(async {
        let listener = match inherited {
            Some(listener) => {
                tracing::info!(
                    socket = ?listener.local_addr().ok().and_then(|a| a.as_pathname().map(Path::to_owned)),
                    "using the socket passed by the service manager; ignoring listen.socket"
                );
                profiled::Listener::inherited(profiled::activation::into_tokio(listener)?)
            }
            None => profiled::bind(&config.listen.socket)?,
        };
        if let Some(notifier) = profiled::notify::Notifier::from_env() {
            profiled::notify::spawn_watchdog(notifier);
        }
        profiled::run_with(config, listener, nth_stop(stops.clone(), 1), nth_stop(stops, 2))
            .await?;
        anyhow::Ok(())
    });
    if let Err(err) = &result {
        tracing::error!("{err:#}");
    }
    // The runtime stops before the log writer's guard drops, so every line
    // logged while stopping reaches the file.
    drop(runtime);
    drop(logging);
    result
}

/// Resolves once `n` stop signals have arrived: the first starts the
/// graceful shutdown, the second hurries it.
async fn nth_stop(mut stops: watch::Receiver<u32>, n: u32) {
    if stops.wait_for(|count| *count >= n).await.is_err() {
        // The signal thread never ends, so the sender is never dropped
        // while the daemon runs; if it were, waiting forever is right.
        std::future::pending::<()>().await;
    }
}

/// Handles signals on a dedicated thread: SIGTERM and SIGINT count up the
/// returned stop counter; SIGHUP reloads the config.
///
/// A plain thread (signal-hook's iterator) rather than the async runtime
/// handles them, so a config reload's file read never blocks a runtime
/// worker and signals are handled even while the runtime is busy.
fn spawn_signal_thread(
    args: &Args,
    config: &Config,
    level: LevelControl,
) -> anyhow::Result<watch::Receiver<u32>> {
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .context("cannot install signal handlers")?;
    let (stops_tx, stops_rx) = watch::channel(0u32);
    let mut reloader = Reloader {
        config_path: args.config.clone(),
        socket: args.socket.clone(),
        data_dir: args.data_dir.clone(),
        running: config.clone(),
        level,
    };
    std::thread::Builder::new()
        .name("signals".to_owned())
        .spawn(move || {
            for signal in signals.forever() {
                let name = match signal {
                    SIGTERM => "SIGTERM",
                    SIGINT => "SIGINT",
                    SIGHUP => {
                        reloader.reload();
                        continue;
                    }
                    _ => continue,
                };
                stops_tx.send_modify(|count| *count += 1);
                if *stops_tx.borrow() == 1 {
                    tracing::info!("received {name}; stopping gracefully (send again to hurry)");
                } else {
                    tracing::info!("received {name} again; hurrying the shutdown");
                }
            }
        })
        .context("cannot start the signal thread")?;
    Ok(stops_rx)
}

/// Applies a re-read config file to the running daemon.
struct Reloader {
    /// The file to re-read.
    config_path: PathBuf,
    /// The `--socket` override, applied again to the re-read file.
    socket: Option<PathBuf>,
    /// The `--data-dir` override, applied again to the re-read file.
    data_dir: Option<PathBuf>,
    /// The settings in force: the start-up config with every applied
    /// reload, so a setting that needs a restart is reported on every
    /// reload until the restart.
    running: Config,
    /// Changes the log level.
    level: LevelControl,
}

impl Reloader {
    fn reload(&mut self) {
        tracing::info!(config = %self.config_path.display(), "received SIGHUP; re-reading the config");
        let mut new = match Config::load(&self.config_path) {
            Ok(config) => config,
            Err(err) => {
                tracing::error!(error = %err, "config reload failed; still running on the previous config");
                return;
            }
        };
        if let Some(socket) = &self.socket {
            new.listen.socket = socket.clone();
        }
        if let Some(data_dir) = &self.data_dir {
            new.storage.path = data_dir.clone();
        }
        match self.level.set(&new.log.level) {
            Ok(LevelChange::Changed { from, to }) => {
                tracing::info!(%from, %to, "log.level changed");
                self.running.log.level = to;
            }
            Ok(LevelChange::Unchanged) => {}
            Ok(LevelChange::PinnedByEnv { env }) => {
                if new.log.level != self.running.log.level {
                    tracing::warn!(rust_log = %env, level = %new.log.level, "log.level changed in the file, but RUST_LOG takes precedence");
                }
            }
            Err(err) => tracing::error!(error = %err, "cannot apply log.level"),
        }
        let pending = restart_only_changes(&self.running, &new);
        if pending.is_empty() {
            tracing::info!("config reloaded");
        } else {
            tracing::warn!(
                settings = ?pending,
                "config reloaded; these changed settings take effect only at the next restart"
            );
        }
    }
}

/// The settings that differ between `running` and `new` and that cannot
/// change while the daemon runs.
fn restart_only_changes(running: &Config, new: &Config) -> Vec<&'static str> {
    // Sections are compared through Debug, which shows every field, so a
    // field added to a section later is covered without changes here.
    fn differs(a: &impl Debug, b: &impl Debug) -> bool {
        format!("{a:?}") != format!("{b:?}")
    }
    let mut changed = Vec::new();
    let named: [(&'static str, bool); 8] = [
        ("listen", differs(&running.listen, &new.listen)),
        ("storage", differs(&running.storage, &new.storage)),
        ("leases", differs(&running.leases, &new.leases)),
        ("session", differs(&running.session, &new.session)),
        ("limits", differs(&running.limits, &new.limits)),
        ("shutdown", differs(&running.shutdown, &new.shutdown)),
        ("log.dir", running.log.dir != new.log.dir),
        (
            "log.file_prefix",
            running.log.file_prefix != new.log.file_prefix,
        ),
    ];
    changed.extend(named.iter().filter(|(_, d)| *d).map(|(name, _)| *name));
    // Any other section (one added after this list was written) is
    // reported as a whole: copy the named parts over and compare the rest.
    let mut rest = new.clone();
    rest.listen = running.listen.clone();
    rest.storage = running.storage.clone();
    rest.leases = running.leases.clone();
    rest.session = running.session.clone();
    rest.limits = running.limits.clone();
    rest.shutdown = running.shutdown.clone();
    rest.log = running.log.clone();
    if differs(running, &rest) {
        changed.push("other sections");
    }
    changed
}

/// Forks into the background: the parent exits once the daemon is
/// detached, and the daemon continues from here.
///
/// Its stdout and stderr go to `<log.dir>/<log.file_prefix>.console.log`
/// when `log.dir` is set, else to /dev/null. The working directory stays
/// the same, so relative paths in the config keep their meaning. The
/// daemonize crate's umask of 027 applies, so the socket and data are not
/// world-readable.
fn daemonize(pid_file: Option<&Path>, config: &Config) -> anyhow::Result<()> {
    if let Some(path) = pid_file
        && let Some(pid) = live_pid(path)?
    {
        bail!(
            "{} names process {pid}, which is running; is profiled already running? \
             (stop it, or remove the pid file if that process is not profiled)",
            path.display()
        );
    }
    let cwd = std::env::current_dir().context("cannot read the working directory")?;
    let (stdout, stderr) = match profiled::logging::console_path(&config.log) {
        Some(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .with_context(|| format!("cannot open {}", path.display()))?;
            let copy = file
                .try_clone()
                .with_context(|| format!("cannot open {}", path.display()))?;
            (daemonize::Stdio::from(file), daemonize::Stdio::from(copy))
        }
        None => (daemonize::Stdio::devnull(), daemonize::Stdio::devnull()),
    };
    let mut daemon = daemonize::Daemonize::new()
        .working_directory(cwd)
        .stdout(stdout)
        .stderr(stderr);
    if let Some(path) = pid_file {
        // The crate also holds an exclusive lock on the pid file for the
        // daemon's life, which catches two daemons started at once.
        daemon = daemon.pid_file(path);
    }
    daemon.start().context("cannot daemonize")?;
    Ok(())
}

/// The pid in the pid file at `path` if that process is alive.
///
/// Liveness is read from /proc, which needs no unsafe code or C library.
fn live_pid(path: &Path) -> anyhow::Result<Option<u32>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err).with_context(|| format!("cannot read {}", path.display())),
    };
    // An empty or garbled pid file is left by a daemon that died while
    // writing it; it names nobody.
    let Ok(pid) = text.trim().parse::<u32>() else {
        return Ok(None);
    };
    Ok(Path::new("/proc")
        .join(pid.to_string())
        .exists()
        .then_some(pid))
}

/// Removes the pid file if it still names this process.
fn remove_pid_file(path: &Path) {
    let ours = std::fs::read_to_string(path)
        .is_ok_and(|text| text.trim() == std::process::id().to_string());
    if ours && let Err(err) = std::fs::remove_file(path) {
        tracing::warn!(path = %path.display(), error = %err, "cannot remove the pid file");
    }
}
