//! The `profiled` binary: reads the config, optionally daemonizes, sets up
//! logging and signals, then hands over to [`profiled::run_with`].
//!
//! The order matters: daemonizing forks, and threads do not survive a fork,
//! so the fork comes before anything that starts a thread (the log writer,
//! the signal thread, the async runtime).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use profiled::Config;
use profiled::daemonize::{daemonize, remove_pid_file};
use profiled::signals::{Reloader, nth_stop, spawn_signal_thread};

/// The daemon's Rust allocations go to jemalloc rather than the C
/// library's allocator. Every request allocates and frees small buffers,
/// often on different threads (frames, decoded payloads, records, batch
/// slots), and glibc's allocator spent 5 to 9% of the daemon's CPU on
/// them; with jemalloc the daemon's CPU per save at W = 32 fell 4 to 17%
/// in two sets of rounds, and its memory per held lease rose from 856
/// bytes to between 867 and 960, as freed pages are returned later
/// (docs/PERFORMANCE.md, ninth round). Only the binary sets it: the
/// library leaves the choice to whoever links it, and RocksDB's C++ keeps
/// the C library's.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// How long the stopped daemon waits for blocking work still running
/// before it exits anyway.
const LEFTOVER_WORK: std::time::Duration = std::time::Duration::from_secs(5);

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
        for warning in config.warnings() {
            println!("profiled: {}: warning: {warning}", args.config.display());
        }
        if args.config.exists() {
            println!("profiled: {}: ok", args.config.display());
        } else {
            println!(
                "profiled: {}: no such file; the built-in defaults apply, and they are ok",
                args.config.display()
            );
        }
        return ExitCode::SUCCESS;
    }
    if args.daemonize
        && let Err(err) = daemonize(args.pid_file.as_deref(), &config)
    {
        eprintln!("profiled: {err}");
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

/// Runs the daemon in this process until it is stopped: sets up logging and
/// signals, starts the runtime, and serves on the inherited or a new socket.
fn serve(args: &Args, config: Config) -> anyhow::Result<()> {
    // Taken before any thread starts, because taking it edits the
    // environment (see `profiled::activation::take_inherited`).
    let inherited = profiled::activation::take_inherited()?;
    let logging = profiled::logging::init(&config.log)?;
    if !args.config.exists() {
        tracing::warn!(config = %args.config.display(), "no config file there; running on the built-in defaults");
    }
    for warning in config.warnings() {
        tracing::warn!(config = %args.config.display(), "{warning}");
    }
    let stops = spawn_signal_thread(Reloader::new(
        args.config.clone(),
        args.socket.clone(),
        args.data_dir.clone(),
        config.clone(),
        logging.level_control(),
    ))?;
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
                let defaults = profiled::config::AccessConfig::default();
                if config.access.socket_mode != defaults.socket_mode
                    || config.access.socket_group.is_some()
                {
                    tracing::warn!("access.socket_mode and access.socket_group do not apply to a socket passed by the service manager; set SocketMode and SocketGroup in its socket unit");
                }
                profiled::Listener::inherited(profiled::activation::into_tokio(listener)?)
            }
            None => profiled::bind(&config.listen.socket, &config.access)?,
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
    // logged while stopping reaches the file. Blocking work still running
    // (a pruning sweep or a backup that outlived its step's deadline) gets
    // a bounded wait, not an unbounded one: storage is already closed.
    runtime.shutdown_timeout(LEFTOVER_WORK);
    drop(logging);
    result
}
