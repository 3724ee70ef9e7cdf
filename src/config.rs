//! The daemon's configuration, read from a TOML file.
//!
//! Every section and field has a default, so a missing file means defaults
//! and a file only names what it changes. Unknown keys are errors, so a typo
//! is caught at start instead of silently ignored. `config.toml` at the root
//! of the repository documents every setting.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// The least memory either of RocksDB's budgets may be given: below it
/// RocksDB would flush or evict on almost every write.
const MIN_STORAGE_MEMORY: usize = 1 << 20;

/// What a `Welcome` takes besides its leases: the frame's tag, the daemon
/// version string, three numbers and the list's length, generously.
const WELCOME_AROUND: u64 = 256;

/// How far below `max_frame` the largest `Welcome` must stay.
const WELCOME_MARGIN: u64 = 1024;

/// The whole configuration.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where clients connect.
    pub listen: ListenConfig,
    /// Where and how profiles are kept.
    pub storage: StorageConfig,
    /// The rules of session leases.
    pub leases: LeaseConfig,
    /// What happens to a session's leases when its connection drops.
    pub session: SessionConfig,
    /// Who may connect, and as what.
    pub access: AccessConfig,
    /// Bounds on what a client may send.
    pub limits: LimitsConfig,
    /// Which versions of each profile are kept.
    pub history: HistoryConfig,
    /// Where counters are exported.
    pub metrics: MetricsConfig,
    /// How the daemon stops.
    pub shutdown: ShutdownConfig,
    /// What the daemon logs.
    pub log: LogConfig,
}

/// The Unix socket.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenConfig {
    /// The socket's path. A stale socket file left by a dead daemon is
    /// replaced; a live daemon on the same path stops this one from starting.
    pub socket: PathBuf,
}

/// The RocksDB database.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// The database directory, created if missing.
    pub path: PathBuf,
    /// Whether a write is acknowledged only after the write-ahead log is
    /// synced to disk. Turning it off trades the last moments of
    /// acknowledged writes on power loss for latency.
    pub sync: bool,
    /// The most writes gathered into one commit and one sync.
    pub max_batch: usize,
    /// The most held leases whose lease and meta records the committer
    /// keeps in memory, so a save need not read them from RocksDB first.
    /// Leases beyond it still work; their writes read the records. 0 turns
    /// the cache off.
    pub lease_cache: usize,
    /// The memory, in bytes, that RocksDB's memtables (writes not yet
    /// flushed to table files, across every column family) may use
    /// together. Past it the oldest is flushed. Each family's memtable is
    /// at most a quarter of it (and 64 MiB), two per family at most while
    /// one flushes, so a burst that outruns the disk can take about two
    /// and a half times this (plus the batch being written) before writes
    /// wait.
    pub memtable_bytes: usize,
    /// The memory, in bytes, of the cache of table blocks that every column
    /// family shares, their index and filter blocks included.
    pub block_cache_bytes: usize,
}

/// Lease rules.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LeaseConfig {
    /// How long a ForceLoad waits for the owner to release after asking it,
    /// before taking the lease anyway.
    #[serde(with = "humantime_serde")]
    pub force_load_timeout: Duration,
}

/// Session liveness.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    /// How long a disconnected session keeps its leases, so a game server
    /// that reconnects (or whose daemon restarted) resumes them with the
    /// same epochs. After it, the leases are released with their last
    /// saved data.
    #[serde(with = "humantime_serde")]
    pub resume_grace: Duration,
    /// Whether a ForceLoad takes a disconnected holder's lease at once,
    /// rather than when the holder's resume grace runs out.
    pub take_disconnected_at_once: bool,
}

/// Limits on client input. Each is checked before the work it bounds.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// The largest frame payload, in bytes, in either direction.
    pub max_frame: u32,
    /// The largest profile data, in bytes. With the largest meta tags,
    /// user ids and names ([`LimitsConfig::profile_bound`]) it should stay
    /// 1 KiB below `max_frame`, so every loaded profile fits in one frame;
    /// the daemon warns at startup otherwise.
    pub max_data: usize,
    /// The longest store name or key, in bytes.
    pub max_name: usize,
    /// The most requests a connection may have in flight before the daemon
    /// stops reading from it. Loads waiting in queues are counted apart
    /// (`max_queued_loads`): a game server waiting for many profiles must
    /// still be read, to save and release the ones it holds.
    pub max_in_flight: usize,
    /// The most loads one connection may have waiting for their answers
    /// (mostly in queues, for profiles other sessions hold); a load beyond
    /// it is refused at once with `TooManyLoads`. Each waiting load takes
    /// memory in the lease table until it is answered.
    pub max_queued_loads: usize,
    /// The most leases one session may hold, counting grants being
    /// written; a load that finds its session at the limit once it is
    /// first in line for its profile is refused with `TooManyLeases`. The
    /// `Welcome` lists every lease of a resuming session in one frame, so
    /// this many leases with the longest names must fit in `max_frame`
    /// ([`LimitsConfig::welcome_bound`]). Unset, it is as many as fit
    /// ([`LimitsConfig::leases_per_session`]).
    pub max_leases_per_session: Option<usize>,
    /// The most client connections at once.
    pub max_connections: usize,
    /// How long a new connection has to send its `Hello`.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// How long a connection may send nothing, with no request in flight,
    /// before the daemon closes it; 0 never closes one. Off by default: a
    /// game server may hold leases for hours without a request, and its
    /// liveness is its open connection.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// The largest message payload, in bytes.
    pub max_message: usize,
    /// The most messages pending for one profile. A send beyond it fails;
    /// no pending message is ever dropped to make room.
    pub max_pending_messages: u64,
    /// The most meta tags on one profile.
    pub max_meta_tags: usize,
    /// The largest meta tag value, in bytes.
    pub max_meta_tag_size: usize,
    /// The most user ids on one profile.
    pub max_user_ids: usize,
    /// The most entries in one answer to a version listing or an export
    /// page; larger requests are answered with this many.
    pub max_page: u32,
}

/// Access control: the socket file's permissions, and which peers (by the
/// credentials the kernel reports) may use each role.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccessConfig {
    /// The socket file's mode, in octal, such as `"0660"`. A process needs
    /// write permission on the file to connect.
    pub socket_mode: String,
    /// The socket file's group (a name or a gid); unset keeps the daemon's.
    pub socket_group: Option<String>,
    /// Users (names or uids) allowed to connect as game servers. With both
    /// this and `game_groups` empty, anyone who can open the socket may.
    pub game_users: Vec<String>,
    /// Groups (names or gids) whose members may connect as game servers.
    pub game_groups: Vec<String>,
    /// Users allowed the admin role, besides root and the daemon's own user.
    pub admin_users: Vec<String>,
    /// Groups whose members are allowed the admin role.
    pub admin_groups: Vec<String>,
}

/// Version history.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HistoryConfig {
    /// Between releases, a save is kept as a version only if the last kept
    /// version is at least this old. Every release is kept.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Versions older than this are pruned, except each profile's newest:
    /// it may be the current data, which an admin overwrite relies on
    /// finding in history.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// How often the background sweep prunes expired versions.
    #[serde(with = "humantime_serde")]
    pub prune_every: Duration,
}

/// Metrics export.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// A loopback address such as `127.0.0.1:9184` on which to serve
    /// Prometheus metrics at `/metrics`. Unset, nothing is served; the
    /// same numbers are always available through `profilectl stats`.
    pub prometheus: Option<std::net::SocketAddr>,
}

/// Shutdown.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// The longest the daemon waits, after a stop signal, for in-flight
    /// work before it releases the remaining leases itself.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
}

/// Logging.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter such as `info` or `profiled=debug`. `RUST_LOG`
    /// overrides it. It is the one setting SIGHUP applies without a
    /// restart, because raising it is how an incident is investigated.
    pub level: String,
    /// A directory for daily rolling log files. Unset means stdout, which
    /// suits systemd (journald keeps it) and a foreground run; a daemonized
    /// process without systemd needs files, or its log is lost.
    pub dir: Option<PathBuf>,
    /// The log files' name prefix: `<prefix>.<date>.log`, and
    /// `<prefix>.console.log` for a daemonized process's stdout and stderr.
    /// Distinct prefixes let several daemons share one directory.
    pub file_prefix: String,
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, or a value of the
    /// wrong type; the message names the key.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, which names the key and the line.
        message: String,
    },
    /// A value is well-formed but unusable.
    #[error("{path}: {key}: {problem}")]
    Invalid {
        /// The file, or `<defaults>`.
        path: PathBuf,
        /// The dotted key.
        key: &'static str,
        /// What is wrong with it.
        problem: String,
    },
}

impl Config {
    /// Reads `path`. A missing file yields the defaults.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_owned(),
                    source,
                });
            }
        };
        Self::parse(&text, path)
    }

    /// Parses TOML text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|err| ConfigError::Parse {
            path: path.to_owned(),
            message: err.to_string().trim_end().to_owned(),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    /// Checks what types alone cannot.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key, problem: &str| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            problem: problem.to_owned(),
        };
        let limits = &self.limits;
        if limits.max_frame < 1024 || limits.max_frame > profiled_protocol::MAX_FRAME_CEILING {
            return Err(invalid(
                "limits.max_frame",
                "must be between 1024 and 1073741824 bytes",
            ));
        }
        if limits.max_data == 0 || limits.max_data as u64 + 1024 > u64::from(limits.max_frame) {
            return Err(invalid(
                "limits.max_data",
                "must be above zero and at least 1 KiB below limits.max_frame",
            ));
        }
        if limits.max_name == 0 || limits.max_name > 1024 {
            return Err(invalid("limits.max_name", "must be between 1 and 1024"));
        }
        if limits.max_in_flight == 0 {
            return Err(invalid("limits.max_in_flight", "must be above zero"));
        }
        if limits.max_queued_loads == 0 {
            return Err(invalid("limits.max_queued_loads", "must be above zero"));
        }
        if limits.max_connections == 0 {
            return Err(invalid("limits.max_connections", "must be above zero"));
        }
        if limits.max_leases_per_session.is_none() && limits.leases_per_session() == 0 {
            return Err(invalid(
                "limits.max_frame",
                "must leave room, 1 KiB below it, for a Welcome that lists one lease with names of limits.max_name bytes",
            ));
        }
        if limits.max_leases_per_session == Some(0)
            || limits.welcome_bound() + WELCOME_MARGIN > u64::from(limits.max_frame)
        {
            return Err(invalid(
                "limits.max_leases_per_session",
                "must be above zero, and that many leases with the longest names (limits.max_name) must fit in a Welcome at least 1 KiB below limits.max_frame",
            ));
        }
        if limits.handshake_timeout.is_zero() {
            return Err(invalid("limits.handshake_timeout", "must be above zero"));
        }
        // A message travels in an event with its profile's store and key.
        let message_frame = limits.max_message as u64 + 2 * limits.max_name as u64 + 1024;
        if limits.max_message == 0 || message_frame > u64::from(limits.max_frame) {
            return Err(invalid(
                "limits.max_message",
                "must be above zero, and with two names (limits.max_name) at least 1 KiB below limits.max_frame",
            ));
        }
        if limits.max_pending_messages == 0 {
            return Err(invalid("limits.max_pending_messages", "must be above zero"));
        }
        if limits.max_page == 0 {
            return Err(invalid("limits.max_page", "must be above zero"));
        }

        let history = &self.history;
        if history.retention < history.interval {
            return Err(invalid(
                "history.retention",
                "must be at least history.interval",
            ));
        }
        if history.prune_every.is_zero() {
            return Err(invalid("history.prune_every", "must be above zero"));
        }
        if let Some(addr) = self.metrics.prometheus
            && !addr.ip().is_loopback()
        {
            return Err(invalid(
                "metrics.prometheus",
                "must be a loopback address; put a proxy in front to expose it further",
            ));
        }
        if self.access.mode().is_none() {
            return Err(invalid(
                "access.socket_mode",
                "must be an octal file mode such as \"0660\"",
            ));
        }
        if let Err(err) = crate::access::AccessPolicy::new(&self.access) {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                key: err.key,
                problem: err.problem,
            });
        }
        if let Some(group) = &self.access.socket_group
            && let Err(err) = crate::access::socket_group(group)
        {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                key: err.key,
                problem: err.problem,
            });
        }
        if self.storage.max_batch == 0 {
            return Err(invalid("storage.max_batch", "must be above zero"));
        }
        if self.storage.memtable_bytes < MIN_STORAGE_MEMORY {
            return Err(invalid(
                "storage.memtable_bytes",
                "must be at least 1 MiB (1048576)",
            ));
        }
        if self.storage.block_cache_bytes < MIN_STORAGE_MEMORY {
            return Err(invalid(
                "storage.block_cache_bytes",
                "must be at least 1 MiB (1048576)",
            ));
        }
        if self.listen.socket.as_os_str().is_empty() {
            return Err(invalid("listen.socket", "must not be empty"));
        }
        if self.storage.path.as_os_str().is_empty() {
            return Err(invalid("storage.path", "must not be empty"));
        }
        if self
            .log
            .level
            .parse::<tracing_subscriber::EnvFilter>()
            .is_err()
        {
            return Err(invalid("log.level", "is not a valid tracing filter"));
        }
        if self.log.file_prefix.is_empty() || self.log.file_prefix.contains('/') {
            return Err(invalid(
                "log.file_prefix",
                "must be a non-empty file name without '/'",
            ));
        }
        Ok(())
    }
}

impl AccessConfig {
    /// The socket mode as a number, or `None` if it is not octal or has
    /// bits beyond the permission bits.
    pub fn mode(&self) -> Option<u32> {
        u32::from_str_radix(self.socket_mode.trim_start_matches("0o"), 8)
            .ok()
            .filter(|mode| *mode <= 0o777)
    }
}

impl Default for AccessConfig {
    fn default() -> Self {
        Self {
            socket_mode: "0660".to_owned(),
            socket_group: None,
            game_users: Vec::new(),
            game_groups: Vec::new(),
            admin_users: Vec::new(),
            admin_groups: Vec::new(),
        }
    }
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            socket: PathBuf::from("profiled.sock"),
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("data"),
            sync: true,
            max_batch: 1024,
            lease_cache: 16_384,
            memtable_bytes: 256 << 20,
            block_cache_bytes: 64 << 20,
        }
    }
}

impl Default for LeaseConfig {
    fn default() -> Self {
        Self {
            force_load_timeout: Duration::from_secs(5),
        }
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            resume_grace: Duration::from_secs(5),
            take_disconnected_at_once: false,
        }
    }
}

impl Config {
    /// What is allowed but unwise, to be logged at startup: each names its
    /// key.
    pub fn warnings(&self) -> Vec<String> {
        let limits = &self.limits;
        let bound = limits.profile_bound();
        let mut warnings = Vec::new();
        if bound.saturating_add(1024) > u64::from(limits.max_frame) {
            warnings.push(format!(
                "limits.max_data: with the largest meta tags (limits.max_meta_tags, \
                 max_meta_tag_size, max_name) and user ids (limits.max_user_ids), a profile \
                 may take {bound} bytes, more than fits in limits.max_frame ({}); a load of \
                 such a profile is refused with TooLarge",
                limits.max_frame
            ));
        }
        warnings
    }
}

impl LimitsConfig {
    /// The most bytes a profile's data and metadata can take, encoded, in
    /// a `Loaded` or `Viewed` answer under these limits, pending messages
    /// aside (those that do not fit follow a `Loaded` as events). Every
    /// bincode varint is counted at its largest, nine bytes.
    pub fn profile_bound(&self) -> u64 {
        const VARINT: u64 = 9;
        let name = self.max_name as u64 + VARINT;
        let tag = name
            .saturating_add(self.max_meta_tag_size as u64)
            .saturating_add(VARINT);
        let tags = (self.max_meta_tags as u64).saturating_mul(tag);
        let user_ids = (self.max_user_ids as u64).saturating_mul(VARINT);
        // The store, key and holder's job id, and some twenty numbers,
        // lengths and tags around them.
        let around = 3 * name + 20 * VARINT;
        (self.max_data as u64)
            .saturating_add(tags)
            .saturating_add(user_ids)
            .saturating_add(around)
    }

    /// The most bytes a `Welcome` can take under these limits: a session
    /// holding `max_leases_per_session` leases, each listed with a store
    /// and key of `max_name` bytes (two `u64` lengths and its `u64`
    /// epoch around them), plus the frame's own fields. Unlike
    /// [`LimitsConfig::profile_bound`] it is checked at startup, since a
    /// Welcome that does not fit would lock its session out.
    pub fn welcome_bound(&self) -> u64 {
        (self.leases_per_session() as u64)
            .saturating_mul(self.welcome_lease_bound())
            .saturating_add(WELCOME_AROUND)
    }

    /// `max_leases_per_session`, or if unset as many leases with names of
    /// `max_name` bytes as a `Welcome` 1 KiB below `max_frame` can list:
    /// 9,889 with the default frame and names.
    pub fn leases_per_session(&self) -> usize {
        self.max_leases_per_session.unwrap_or_else(|| {
            let room = u64::from(self.max_frame).saturating_sub(WELCOME_MARGIN + WELCOME_AROUND);
            usize::try_from(room / self.welcome_lease_bound()).unwrap_or(usize::MAX)
        })
    }

    /// The most bytes one lease takes in a `Welcome`: a store and key of
    /// `max_name` bytes, their two `u64` lengths, and the `u64` epoch.
    fn welcome_lease_bound(&self) -> u64 {
        3 * 8 + 2 * self.max_name as u64
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_frame: profiled_protocol::DEFAULT_MAX_FRAME,
            // Not all of the frame: meta tags, user ids and names take
            // some of it. All of them at their largest at once do not fit
            // (see `Config::warnings`); the defaults of earlier releases
            // are kept so that stored profiles stay loadable and savable.
            max_data: profiled_protocol::DEFAULT_MAX_FRAME as usize - 64 * 1024,
            max_name: 200,
            max_in_flight: 256,
            max_queued_loads: 1024,
            max_leases_per_session: None,
            max_connections: 4096,
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::ZERO,
            max_message: 64 * 1024,
            max_pending_messages: 1000,
            max_meta_tags: 64,
            max_meta_tag_size: 4096,
            max_user_ids: 64,
            max_page: 1000,
        }
    }
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5 * 60),
            retention: Duration::from_secs(30 * 24 * 3600),
            prune_every: Duration::from_secs(10 * 60),
        }
    }
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            grace: Duration::from_secs(10),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".to_owned(),
            dir: None,
            file_prefix: "profiled".to_owned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_text_is_the_defaults() {
        let config = Config::parse("", Path::new("x.toml")).expect("defaults");
        assert_eq!(config.listen.socket, PathBuf::from("profiled.sock"));
        assert!(config.storage.sync);
        assert_eq!(config.leases.force_load_timeout, Duration::from_secs(5));
    }

    #[test]
    fn durations_are_human_readable() {
        let config = Config::parse("[leases]\nforce_load_timeout = \"250ms\"\n", Path::new("x"))
            .expect("valid");
        assert_eq!(config.leases.force_load_timeout, Duration::from_millis(250));
    }

    #[test]
    fn an_unknown_key_names_the_file_and_the_key() {
        let err = Config::parse("[storage]\nsink = true\n", Path::new("/etc/p.toml"))
            .expect_err("unknown key");
        let text = err.to_string();
        assert!(text.contains("/etc/p.toml"), "{text}");
        assert!(text.contains("sink"), "{text}");
    }

    #[test]
    fn a_bad_value_names_the_key() {
        let err = Config::parse("[limits]\nmax_name = 0\n", Path::new("p.toml")).expect_err("zero");
        assert!(err.to_string().contains("limits.max_name"), "{err}");
    }

    #[test]
    fn a_storage_memory_budget_below_1_mib_names_its_key() {
        for key in ["memtable_bytes", "block_cache_bytes"] {
            let text = format!("[storage]\n{key} = 1000\n");
            let err = Config::parse(&text, Path::new("p.toml")).expect_err("too small");
            assert!(err.to_string().contains(&format!("storage.{key}")), "{err}");
            let text = format!("[storage]\n{key} = 1048576\n");
            Config::parse(&text, Path::new("p.toml")).expect("1 MiB is enough");
        }
    }

    #[test]
    fn limits_under_which_a_profile_outgrows_the_frame_are_warned_of() {
        // 64 meta tags of 4 KiB do not fit in a 64 KiB frame with the data.
        let text = "[limits]\nmax_frame = 65536\nmax_data = 1024\nmax_message = 1024\n";
        let config = Config::parse(text, Path::new("p.toml")).expect("allowed");
        let warnings = config.warnings();
        assert!(
            warnings.iter().any(|w| w.starts_with("limits.max_data")),
            "{warnings:?}"
        );
        let text =
            "[limits]\nmax_frame = 65536\nmax_data = 1024\nmax_message = 1024\nmax_meta_tags = 8\n";
        let config = Config::parse(text, Path::new("p.toml")).expect("eight tags fit");
        assert_eq!(config.warnings(), Vec::<String>::new());
    }

    #[test]
    fn a_message_must_fit_in_an_event_with_its_names() {
        let text =
            "[limits]\nmax_frame = 65536\nmax_data = 1024\nmax_name = 1024\nmax_message = 63000\n";
        let err = Config::parse(text, Path::new("p.toml")).expect_err("too large");
        assert!(err.to_string().contains("limits.max_message"), "{err}");
    }

    #[test]
    fn a_welcome_must_fit_every_lease_a_session_may_hold() {
        let text = "[limits]\nmax_leases_per_session = 10000\n";
        let err = Config::parse(text, Path::new("p.toml")).expect_err("too large");
        assert!(
            err.to_string().contains("limits.max_leases_per_session"),
            "{err}"
        );
        let shorter = "[limits]\nmax_leases_per_session = 10000\nmax_name = 64\n";
        Config::parse(shorter, Path::new("p.toml")).expect("fits with shorter names");
    }

    /// `welcome_bound` must bound the real encoding, or a session could
    /// hold more leases than its `Welcome` can list.
    #[test]
    fn the_welcome_bound_covers_the_largest_welcome() {
        use profiled_protocol::{HeldLease, ServerFrame, Welcome, payload_len};
        let limits = LimitsConfig::default();
        let name = |c: char| c.to_string().repeat(limits.max_name);
        let welcome = ServerFrame::Welcome(Welcome {
            daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
            protocol_version: u32::MAX,
            max_frame: u32::MAX,
            connection_id: u64::MAX,
            leases: vec![
                HeldLease {
                    store: name('s'),
                    key: name('k'),
                    epoch: u64::MAX,
                };
                limits.leases_per_session()
            ],
        });
        assert_eq!(limits.leases_per_session(), 9889, "as the docs say");
        let len = payload_len(&welcome).expect("encodes") as u64;
        assert!(
            len <= limits.welcome_bound(),
            "{len} > {}",
            limits.welcome_bound()
        );
    }

    /// `profile_bound` must bound the real encoding, or a `Loaded` answer
    /// could outgrow its frame while the config check passes.
    #[test]
    fn the_profile_bound_covers_the_largest_answers() {
        use profiled_protocol::{
            ActiveSession, Loaded, ProfileMeta, ProfileView, Reply, Response, ServerFrame,
            SessionId, payload_len,
        };
        let limits = LimitsConfig::default();
        let name = |c: char| c.to_string().repeat(limits.max_name);
        let meta = ProfileMeta {
            created_at_ms: u64::MAX,
            updated_at_ms: u64::MAX,
            load_count: u64::MAX,
            version: u64::MAX,
            active: Some(ActiveSession {
                session: SessionId {
                    place_id: u64::MAX,
                    job_id: name('j'),
                },
                epoch: u64::MAX,
                since_ms: u64::MAX,
            }),
            meta_tags: (0..limits.max_meta_tags)
                .map(|i| {
                    let mut tag = name('t');
                    tag.replace_range(..8, &format!("{i:08}"));
                    (tag, vec![0xff; limits.max_meta_tag_size])
                })
                .collect(),
            user_ids: vec![u64::MAX; limits.max_user_ids],
        };
        let data = Some(vec![0xff; limits.max_data]);
        let answers = [
            Reply::Loaded(Loaded {
                epoch: u64::MAX,
                data: data.clone(),
                meta: meta.clone(),
                messages: Vec::new(),
            }),
            Reply::Viewed(ProfileView {
                version: u64::MAX,
                saved_at_ms: u64::MAX,
                data,
                meta,
                messages: Vec::new(),
            }),
        ];
        for answer in answers {
            let frame = ServerFrame::Response(Response {
                id: u64::MAX,
                result: Ok(answer),
            });
            let len = payload_len(&frame).expect("encodes") as u64;
            assert!(
                len <= limits.profile_bound(),
                "{len} > {}",
                limits.profile_bound()
            );
        }
    }

    #[test]
    fn the_shipped_config_file_is_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
        let shipped = Config::load(&path).expect("config.toml parses");
        let defaults = Config::default();
        assert_eq!(format!("{shipped:?}"), format!("{defaults:?}"));
    }
}
