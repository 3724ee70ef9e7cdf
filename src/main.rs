//! The `profiled` binary: reads the config, then hands over to [`profiled::run`].

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use profiled::Config;

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
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut config = match Config::load(&args.config) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("profiled: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(socket) = args.socket {
        config.listen.socket = socket;
    }
    if let Some(data_dir) = args.data_dir {
        config.storage.path = data_dir;
    }
    init_logging(&config);
    match serve(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("profiled: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let listener = profiled::bind(&config.listen.socket)?;
        profiled::run(config, listener, stop_signal()).await?;
        Ok(())
    })
}

/// Resolves on SIGTERM or SIGINT.
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL only");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("received SIGTERM"),
        _ = int.recv() => tracing::info!("received SIGINT"),
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    tracing_subscriber::fmt().with_env_filter(filter).init();
}
