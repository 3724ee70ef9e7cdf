//! `profilectl`, the ops CLI for a running profiled daemon.
//!
//! Every subcommand opens one admin connection, makes its requests and
//! exits. Failures print one lowercase line prefixed `profilectl: ` on
//! stderr and exit with a code from the table in `--help` (see [`exit`]),
//! so scripts can tell a missing profile from a daemon that is down.

/// Writes to stdout like `print!`. A reader that went away (`profilectl
/// stats | head`) ends the program quietly with status 0 instead of a
/// panic; any other write failure exits 74 (EX_IOERR).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(err) = write!(std::io::stdout().lock(), $($arg)*) {
            crate::stdout_failed(&err);
        }
    }};
}

/// Like `println!`, through [`out!`].
macro_rules! outln {
    () => { out!("\n") };
    ($($arg:tt)*) => {{
        out!($($arg)*);
        out!("\n");
    }};
}

mod args;
mod commands;
mod output;
mod transfer;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use profiled_client::protocol::MAX_FRAME_CEILING;
use profiled_client::{Client, ClientError, ConnectOptions, ErrorCode, Role, SessionId};

use crate::args::{Cli, Command};

/// The exit codes, documented in `--help` and `docs/profilectl.md`.
pub mod exit {
    /// The daemon refused the request, or something else went wrong.
    pub const REFUSED: u8 = 1;
    /// Bad arguments, or a wipe without confirmation. clap uses it too.
    pub const USAGE: u8 = 2;
    /// The daemon did not answer within `--request-timeout`, or `release`
    /// gave up waiting for the holder.
    pub const TIMEOUT: u8 = 3;
    /// No such profile or version.
    pub const NOT_FOUND: u8 = 4;
    /// The daemon does not grant this connection admin rights.
    pub const FORBIDDEN: u8 = 5;
    /// Malformed input data (sysexits' `EX_DATAERR`).
    pub const DATA: u8 = 65;
    /// The daemon cannot be reached, or did not answer the handshake
    /// within `--connect-timeout` (sysexits' `EX_UNAVAILABLE`).
    pub const UNAVAILABLE: u8 = 69;
}

/// The socket used when neither `--socket` nor `PROFILED_SOCKET` is given:
/// the daemon's own default (`listen.socket` in `config.toml`).
const DEFAULT_SOCKET: &str = "profiled.sock";

/// Why a command failed: the message for stderr and the exit code.
#[derive(Debug)]
pub struct Failure {
    /// One of the [`exit`] codes.
    pub code: u8,
    /// Lowercase, no trailing period, without the `profilectl: ` prefix.
    pub message: String,
}

impl Failure {
    /// A failure with an explicit exit code.
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// A failed request, with `context` (what was being done) in front of
    /// the daemon's reason. The exit code follows the error code.
    pub fn request(context: &str, err: &ClientError) -> Self {
        let code = match err {
            ClientError::Daemon(_) | ClientError::Refused(_) => match err.code() {
                Some(ErrorCode::NotFound) => exit::NOT_FOUND,
                Some(ErrorCode::Forbidden) => exit::FORBIDDEN,
                _ => exit::REFUSED,
            },
            ClientError::Io(_) | ClientError::Disconnected => exit::UNAVAILABLE,
            _ => exit::REFUSED,
        };
        let reason = match err {
            // The daemon's error reads well alone: `not found: ...`.
            ClientError::Daemon(inner) => inner.to_string(),
            other => other.to_string(),
        };
        Self::new(code, format!("{context}: {reason}"))
    }
}

/// The result of a command.
pub type Outcome = Result<(), Failure>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => return report(&Failure::new(exit::REFUSED, format!("cannot start: {err}"))),
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => report(&failure),
    }
}

/// Prints a failure and turns it into the process's exit code.
fn report(failure: &Failure) -> ExitCode {
    eprintln!("profilectl: {}", failure.message);
    ExitCode::from(failure.code)
}

/// Runs one subcommand.
async fn run(cli: Cli) -> Outcome {
    let socket = socket_path(cli.socket);
    let json = cli.json;
    // Confirmation and payloads are checked before connecting, so a
    // refused wipe or a bad payload needs no daemon and touches nothing.
    let mut message = Vec::new();
    match &cli.command {
        Command::Wipe { profile, yes, .. } => commands::confirm_wipe(profile, *yes)?,
        Command::Send { payload, .. } => message = commands::payload_bytes(payload)?,
        _ => {}
    }
    let connect_timeout = cli.connect_timeout;
    let Some(client) = within(connect_timeout, connect(&socket)).await else {
        return Err(Failure::new(
            exit::UNAVAILABLE,
            format!(
                "the daemon at {} did not answer the handshake within {} (--connect-timeout)",
                socket.display(),
                humantime::format_duration(connect_timeout)
            ),
        ));
    };
    let client = client?;
    // Export and import stream for as long as the store is large, and a
    // backup copies the whole database. Every other command is a few
    // requests (release's spread over its own --timeout), so a daemon that
    // stops answering fails it.
    let (limit, what) = match &cli.command {
        Command::Export { .. } | Command::Import { .. } | Command::Backup { .. } => {
            (Duration::ZERO, String::new())
        }
        Command::Release { timeout, .. } => (
            timeout.saturating_add(cli.request_timeout),
            format!(
                "--timeout {} plus --request-timeout {}",
                humantime::format_duration(*timeout),
                humantime::format_duration(cli.request_timeout)
            ),
        ),
        _ => (
            cli.request_timeout,
            format!(
                "--request-timeout {}",
                humantime::format_duration(cli.request_timeout)
            ),
        ),
    };
    let limit = if cli.request_timeout.is_zero() {
        Duration::ZERO
    } else {
        limit
    };
    let Some(outcome) = within(limit, command(&client, cli.command, json, message)).await else {
        // A daemon that does not answer would not answer the goodbye
        // either; the process is about to exit, which closes the socket.
        // What was asked may still have been done.
        return Err(Failure::new(
            exit::TIMEOUT,
            format!("the daemon did not answer within {what}; what was asked may still be done"),
        ));
    };
    client.close().await;
    outcome
}

/// Runs `work`, or gives up with `None` once `limit` has passed; a zero
/// `limit` waits forever.
async fn within<T>(limit: Duration, work: impl std::future::Future<Output = T>) -> Option<T> {
    if limit.is_zero() {
        return Some(work.await);
    }
    tokio::time::timeout(limit, work).await.ok()
}

/// Carries out one subcommand on the open connection.
async fn command(client: &Client, command: Command, json: bool, message: Vec<u8>) -> Outcome {
    match command {
        Command::Status(out) => commands::status(client, json || out.json).await,
        Command::Sessions(out) => commands::sessions(client, json || out.json).await,
        Command::View {
            profile,
            version,
            raw,
            output: out,
        } => commands::view(client, &profile, version, raw, json || out.json).await,
        Command::Versions {
            profile,
            newest_first,
            from,
            to,
            limit,
            output: out,
        } => {
            let query = profiled_client::VersionQuery {
                newest_first,
                from_ms: from,
                to_ms: to,
                limit,
            };
            commands::versions(client, &profile, query, json || out.json).await
        }
        Command::Rollback {
            profile,
            to,
            output: out,
        } => commands::rollback(client, &profile, to, json || out.json).await,
        Command::Wipe {
            profile,
            output: out,
            ..
        } => commands::wipe(client, &profile, json || out.json).await,
        Command::Send { profile, .. } => commands::send(client, &profile, message, json).await,
        Command::Release {
            profile,
            timeout,
            output: out,
        } => commands::release(client, &profile, timeout, json || out.json).await,
        Command::Steal {
            profile,
            output: out,
        } => commands::steal(client, &profile, json || out.json).await,
        Command::Backup { dir, output: out } => {
            transfer::backup(client, &dir, json || out.json).await
        }
        Command::Export { store } => transfer::export(client, &store).await,
        Command::Import { store, output: out } => {
            transfer::import(client, &store, json || out.json).await
        }
        Command::Stats(out) => commands::stats(client, json || out.json).await,
    }
}

/// `--socket`, else `PROFILED_SOCKET`, else the daemon's default.
fn socket_path(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| {
        std::env::var_os("PROFILED_SOCKET")
            .filter(|value| !value.is_empty())
            .map(PathBuf::from)
    })
    .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// Opens the admin connection. The session is this process's own, so it
/// never takes over a game server's session, and reconnecting is off: a
/// daemon that goes away fails the command at once.
async fn connect(socket: &std::path::Path) -> Result<Client, Failure> {
    let session = SessionId {
        place_id: 0,
        job_id: format!("profilectl-{}", std::process::id()),
    };
    let options = ConnectOptions {
        role: Role::Admin,
        // Export pages may be large; the daemon's own limit still applies
        // to what it sends.
        max_frame: MAX_FRAME_CEILING,
        reconnect_for: Duration::ZERO,
    };
    Client::connect_with(socket, session, options)
        .await
        .map_err(|err| match err {
            ClientError::Io(io) => Failure::new(
                exit::UNAVAILABLE,
                format!(
                    "cannot connect to the daemon at {}: {io} (is profiled running? \
                     set --socket or PROFILED_SOCKET)",
                    socket.display()
                ),
            ),
            other => Failure::request("the daemon refused the connection", &other),
        })
}

/// Ends the program after stdout failed: quietly when its reader has gone.
fn stdout_failed(err: &std::io::Error) -> ! {
    if err.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("profilectl: cannot write to stdout: {err}");
    std::process::exit(74);
}
