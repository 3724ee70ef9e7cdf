//! The command line, declared with clap's derive API.
//!
//! `--json` is accepted both before the subcommand (`profilectl --json
//! status`) and after it (`profilectl status --json`), except for `send`,
//! whose `--json` takes the message payload.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// The exit codes, shown at the end of `--help`.
const EXIT_CODES: &str = "\
Exit codes:
  0   success
  1   the daemon refused the request
  2   usage error (bad arguments, or a wipe without confirmation)
  3   timed out (a request took longer than --request-timeout, or the
      holder did not let go within release's --timeout)
  4   not found (no such profile or version)
  5   forbidden (the daemon does not grant this connection admin rights)
  65  bad input data (import: a malformed line)
  69  cannot reach the daemon, or no handshake within --connect-timeout

The socket is --socket, else $PROFILED_SOCKET, else ./profiled.sock.";

/// Operate a running profiled daemon: inspect and repair profiles, move
/// leases, back up, export and import.
#[derive(Debug, Parser)]
#[command(name = "profilectl", version, after_long_help = EXIT_CODES, after_help = EXIT_CODES)]
pub struct Cli {
    /// The daemon's socket [default: $PROFILED_SOCKET, else profiled.sock].
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print one JSON document on stdout instead of text.
    #[arg(long)]
    pub json: bool,
    /// How long to wait for the daemon to accept the connection and answer
    /// the handshake before exiting 69; 0 waits forever.
    #[arg(long, global = true, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// How long a command may wait for the daemon's answers before exiting
    /// 3; 0 waits forever. Export, import and backup, which take as long
    /// as the data is large, are not bounded; release gets it on top of its
    /// own --timeout.
    #[arg(long, global = true, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// `--json` for subcommands, so it may follow the subcommand's name too.
#[derive(Debug, Args, Clone, Copy, Default)]
pub struct Output {
    /// Print one JSON document on stdout instead of text.
    #[arg(long)]
    pub json: bool,
}

/// A profile's address, shared by the per-profile subcommands.
#[derive(Debug, Args, Clone)]
pub struct ProfileAddr {
    /// The profile's store, for example PlayerData.
    pub store: String,
    /// The profile's key, for example Player_2261.
    pub key: String,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show the daemon's version, uptime, sessions, leases and storage size.
    Status(Output),
    /// List every session with the leases it holds.
    Sessions(Output),
    /// Show a profile: data, metadata and pending messages.
    ///
    /// JSON and MessagePack data are shown as pretty JSON (binary strings
    /// and extension values as base64), UTF-8 text as text, anything else
    /// as hex (up to 64 bytes) or base64.
    View {
        #[command(flatten)]
        profile: ProfileAddr,
        /// Show this kept version instead of the current data.
        #[arg(long, value_name = "V")]
        version: Option<u64>,
        /// Write the data's raw bytes to stdout and nothing else.
        #[arg(long, conflicts_with = "json")]
        raw: bool,
        #[command(flatten)]
        output: Output,
    },
    /// List a profile's kept versions.
    Versions {
        #[command(flatten)]
        profile: ProfileAddr,
        /// Newest first rather than oldest first.
        #[arg(long)]
        newest_first: bool,
        /// Only versions saved at or after TIME (RFC 3339, or Unix milliseconds).
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        from: Option<u64>,
        /// Only versions saved at or before TIME (RFC 3339, or Unix milliseconds).
        #[arg(long, value_name = "TIME", value_parser = parse_time)]
        to: Option<u64>,
        /// The most versions to list.
        #[arg(long, value_name = "N", default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        output: Output,
    },
    /// Replace a profile's data with a kept version, ending any lease on it.
    Rollback {
        #[command(flatten)]
        profile: ProfileAddr,
        /// The version to restore.
        #[arg(long, value_name = "V")]
        to: u64,
        #[command(flatten)]
        output: Output,
    },
    /// Erase a profile's data, metadata, versions and messages, ending any
    /// lease on it.
    ///
    /// Asks to type the key on the terminal unless --yes is given; without
    /// a terminal and without --yes it refuses (exit 2).
    Wipe {
        #[command(flatten)]
        profile: ProfileAddr,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
        #[command(flatten)]
        output: Output,
    },
    /// Send a message to a profile, held or not.
    ///
    /// The holder receives it at once; otherwise the next loader does.
    Send {
        #[command(flatten)]
        profile: ProfileAddr,
        #[command(flatten)]
        payload: Payload,
    },
    /// Ask a profile's holder to save and release it, and wait until it has.
    ///
    /// Exits 3 if the holder still holds it after --timeout; `steal` then
    /// ends the lease at once.
    Release {
        #[command(flatten)]
        profile: ProfileAddr,
        /// How long to wait for the holder, like 30s or 500ms.
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
        timeout: Duration,
        #[command(flatten)]
        output: Output,
    },
    /// End the lease on a profile now, keeping its last saved data.
    ///
    /// The holder is told it lost the lease; its later saves are refused.
    Steal {
        #[command(flatten)]
        profile: ProfileAddr,
        #[command(flatten)]
        output: Output,
    },
    /// Have the daemon write a consistent copy of its database to DIR.
    ///
    /// DIR is on the daemon's host and must not exist yet; a relative DIR
    /// is taken from this command's working directory. Start a daemon with
    /// `storage.path` set to DIR to restore it.
    Backup {
        /// The directory to create.
        dir: PathBuf,
        #[command(flatten)]
        output: Output,
    },
    /// Write every profile of a store to stdout, one JSON object a line.
    ///
    /// Each line has store, key, version, updated_at_ms, data (base64, or
    /// null), meta_tags (name to base64) and user_ids.
    Export {
        /// The store to export.
        store: String,
    },
    /// Read profiles written by `export` from stdin into STORE.
    ///
    /// Each profile replaces any profile with its key and ends its lease.
    /// The first malformed line stops the import (exit 65); the lines
    /// before it are imported, and importing again is harmless.
    Import {
        /// The store to import into; the lines' own store is ignored.
        store: String,
        #[command(flatten)]
        output: Output,
    },
    /// Print the daemon's metrics, sorted, one `name{labels} value` a line.
    Stats(Output),
}

/// Where `send` takes its payload from: exactly one of the options.
#[derive(Debug, Args, Clone)]
#[group(required = true, multiple = false)]
pub struct Payload {
    /// A JSON value, sent encoded as MessagePack (what the game's typed
    /// layer reads).
    #[arg(long, value_name = "JSON")]
    pub json: Option<String>,
    /// A string, sent as its UTF-8 bytes.
    #[arg(long, value_name = "STRING")]
    pub raw: Option<String>,
    /// Bytes, given as standard base64.
    #[arg(long, value_name = "BASE64")]
    pub base64: Option<String>,
}

/// Parses a time given as Unix milliseconds or RFC 3339 into Unix
/// milliseconds.
pub fn parse_time(text: &str) -> Result<u64, String> {
    if let Ok(ms) = text.parse::<u64>() {
        return Ok(ms);
    }
    let time = humantime::parse_rfc3339_weak(text)
        .map_err(|err| format!("expected RFC 3339 or Unix milliseconds: {err}"))?;
    let since = time
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| "the time is before 1970".to_owned())?;
    u64::try_from(since.as_millis()).map_err(|_| "the time is too far away".to_owned())
}

/// Parses a duration like `30s`, `500ms` or `2m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|err| err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn json_goes_before_or_after_the_subcommand() {
        let cli = Cli::try_parse_from(["profilectl", "--json", "status"]).expect("parse");
        assert!(cli.json);
        let cli = Cli::try_parse_from(["profilectl", "status", "--json"]).expect("parse");
        assert!(matches!(
            cli.command,
            Command::Status(Output { json: true })
        ));
    }

    #[test]
    fn send_takes_exactly_one_payload() {
        let cli =
            Cli::try_parse_from(["profilectl", "send", "S", "K", "--json", "{}"]).expect("parse");
        assert!(matches!(cli.command, Command::Send { .. }));
        assert!(Cli::try_parse_from(["profilectl", "send", "S", "K"]).is_err());
        assert!(
            Cli::try_parse_from(["profilectl", "send", "S", "K", "--json", "1", "--raw", "x"])
                .is_err()
        );
    }

    #[test]
    fn times_are_unix_milliseconds_or_rfc3339() {
        assert_eq!(parse_time("1500"), Ok(1500));
        assert_eq!(parse_time("1970-01-01T00:00:01.5Z"), Ok(1500));
        assert!(parse_time("yesterday").is_err());
    }
}
