//! The systemd notify protocol: readiness, stopping, status and watchdog
//! pings sent as datagrams to the socket named by `NOTIFY_SOCKET`.
//!
//! The protocol is a few `KEY=value` lines in one datagram, so it is spoken
//! here over [`UnixDatagram`] rather than through a crate: it needs no unsafe
//! code and no C library. Every call is a no-op when the daemon was not
//! started by systemd (no `NOTIFY_SOCKET`), so callers never have to ask.
//!
//! The free functions ([`ready`], [`stopping`], [`status`]) use a notifier
//! read once from the environment, for the server to call at the right
//! moments without threading a handle through.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

/// Why a notification could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `NOTIFY_SOCKET` names an address this platform cannot express, such
    /// as an abstract name off Linux.
    #[error("NOTIFY_SOCKET {0:?} is not a usable socket address: {1}")]
    Address(String, io::Error),
    /// Sending the datagram failed, usually because the manager is gone.
    #[error("cannot notify the service manager: {0}")]
    Send(#[from] io::Error),
}

/// A connection to the service manager's notify socket.
#[derive(Debug)]
pub struct Notifier {
    /// Where the manager listens. Resolved once, because abstract names
    /// cannot be written as paths.
    addr: SocketAddr,
    /// An unbound datagram socket, reused for every message so a watchdog
    /// ping does not open a file descriptor each time.
    socket: UnixDatagram,
}

impl Notifier {
    /// The notifier systemd asked for through `NOTIFY_SOCKET`, or `None`
    /// when it is unset or empty (the daemon was not started by systemd).
    ///
    /// A name starting with `@` is an abstract socket (Linux only). A value
    /// that cannot be used is logged and treated as unset, because a daemon
    /// that cannot notify still serves its clients; systemd will then report
    /// the start as timed out, which names the cause clearly enough.
    pub fn from_env() -> Option<Self> {
        let value = std::env::var_os("NOTIFY_SOCKET")?;
        let value = value.to_string_lossy().into_owned();
        if value.is_empty() {
            return None;
        }
        match Self::new(&value) {
            Ok(notifier) => Some(notifier),
            Err(err) => {
                tracing::warn!(error = %err, "ignoring NOTIFY_SOCKET");
                None
            }
        }
    }

    /// A notifier for the socket `name`: a path, or `@name` for an
    /// abstract socket.
    pub fn new(name: &str) -> Result<Self, NotifyError> {
        let addr = address(name).map_err(|err| NotifyError::Address(name.to_owned(), err))?;
        let socket = UnixDatagram::unbound()?;
        Ok(Self { addr, socket })
    }

    /// Sends raw protocol lines such as `"READY=1\nSTATUS=serving"`.
    pub fn send(&self, message: &str) -> Result<(), NotifyError> {
        self.socket.send_to_addr(message.as_bytes(), &self.addr)?;
        Ok(())
    }

    /// Tells the manager start-up is complete: the database is open and the
    /// socket accepts clients. With `Type=notify`, units ordered after
    /// profiled start only now.
    pub fn ready(&self) -> Result<(), NotifyError> {
        self.send("READY=1")
    }

    /// Tells the manager the daemon is stopping on its own accord, so the
    /// stop is shown as such rather than as a crash while it drains.
    pub fn stopping(&self) -> Result<(), NotifyError> {
        self.send("STOPPING=1")
    }

    /// Sets the one-line status `systemctl status` shows.
    pub fn status(&self, text: &str) -> Result<(), NotifyError> {
        // A newline would start a new protocol field, so the text is kept
        // on one line.
        let line = text.replace('\n', " ");
        self.send(&format!("STATUS={line}"))
    }

    /// Pings the watchdog: the daemon is alive and its runtime is turning.
    pub fn watchdog(&self) -> Result<(), NotifyError> {
        self.send("WATCHDOG=1")
    }
}

/// How often systemd expects a watchdog ping (`WATCHDOG_USEC`), or `None`
/// when the watchdog is off, malformed, or meant for another process
/// (`WATCHDOG_PID` names a different pid, as after a fork).
pub fn watchdog_interval() -> Option<Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID") {
        let pid: u32 = pid.to_str()?.parse().ok()?;
        if pid != std::process::id() {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if usec == 0 {
        return None;
    }
    Some(Duration::from_micros(usec))
}

/// Pings the watchdog at half the interval systemd asked for, on the
/// current tokio runtime, for the life of the process.
///
/// Half the interval is what `sd_watchdog_enabled(3)` recommends: one late
/// ping never trips the watchdog. Because the ping runs on the same runtime
/// as the server, a wedged runtime stops the pings and systemd restarts the
/// daemon. Returns `None`, spawning nothing, when the watchdog is off.
pub fn spawn_watchdog(notifier: Notifier) -> Option<tokio::task::JoinHandle<()>> {
    let interval = watchdog_interval()? / 2;
    Some(tokio::spawn(async move {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if let Err(err) = notifier.watchdog() {
                tracing::warn!(error = %err, "watchdog ping failed");
            }
        }
    }))
}

/// The notifier from the environment, read on first use.
fn global() -> Option<&'static Notifier> {
    static NOTIFIER: OnceLock<Option<Notifier>> = OnceLock::new();
    NOTIFIER.get_or_init(Notifier::from_env).as_ref()
}

/// Sends `READY=1` if systemd is listening; see [`Notifier::ready`].
/// Call once the database is open and the socket listens.
pub fn ready() {
    if let Some(notifier) = global() {
        log_failure(notifier.ready());
    }
}

/// Sends `STOPPING=1` if systemd is listening; see [`Notifier::stopping`].
/// Call as soon as shutdown starts.
pub fn stopping() {
    if let Some(notifier) = global() {
        log_failure(notifier.stopping());
    }
}

/// Sets the status line if systemd is listening; see [`Notifier::status`].
pub fn status(text: &str) {
    if let Some(notifier) = global() {
        log_failure(notifier.status(text));
    }
}

/// A failed notification is logged, not returned: the daemon's clients do
/// not depend on it, and systemd reports a missing `READY=1` itself.
fn log_failure(result: Result<(), NotifyError>) {
    if let Err(err) = result {
        tracing::warn!(error = %err, "systemd notification failed");
    }
}

/// Resolves a `NOTIFY_SOCKET` value to an address.
fn address(name: &str) -> io::Result<SocketAddr> {
    if let Some(abstract_name) = name.strip_prefix('@') {
        abstract_address(abstract_name)
    } else {
        SocketAddr::from_pathname(PathBuf::from(name))
    }
}

#[cfg(target_os = "linux")]
fn abstract_address(name: &str) -> io::Result<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name.as_bytes())
}

#[cfg(not(target_os = "linux"))]
fn abstract_address(_name: &str) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract sockets exist only on Linux",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_a_path_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).expect("bind");
        let notifier = Notifier::new(path.to_str().expect("utf-8 path")).expect("notifier");
        notifier.ready().expect("send");
        notifier.status("line one\nline two").expect("send");
        let mut buf = [0u8; 256];
        let n = listener.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"READY=1");
        let n = listener.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"STATUS=line one line two");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn messages_reach_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("profiled-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let listener = UnixDatagram::bind_addr(&addr).expect("bind");
        let notifier = Notifier::new(&format!("@{name}")).expect("notifier");
        notifier.stopping().expect("send");
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..n], b"STOPPING=1");
    }
}
