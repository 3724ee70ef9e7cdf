//! Socket activation: taking the listening socket systemd (or
//! `systemd-socket-activate`) passed down, instead of binding one.
//!
//! With `profiled.socket`, systemd owns the socket across daemon restarts,
//! so clients connecting during a restart wait in the kernel's backlog
//! instead of failing. The daemon then takes the inherited descriptor 3 when
//! `LISTEN_FDS=1` and `LISTEN_PID` is its own pid, and ignores
//! `listen.socket` for listening. The `listenfd` crate does the part that
//! needs unsafe code (turning the raw descriptor into a listener), after
//! checking that it really is a Unix stream socket.

use std::io;

/// Why an inherited socket could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// The daemon serves one socket; more would be silently ignored, which
    /// hides a mistake in the socket unit.
    #[error("LISTEN_FDS passes {0} sockets; profiled takes exactly one")]
    TooMany(usize),
    /// Descriptor 3 is not a listening Unix stream socket.
    #[error("the inherited descriptor is not a Unix stream socket: {0}")]
    NotUnixListener(io::Error),
    /// The socket could not be switched to non-blocking mode or handed to
    /// the async runtime.
    #[error("cannot use the inherited socket: {0}")]
    Setup(io::Error),
}

/// Takes the inherited listening socket, if the environment passes one to
/// this process, as a standard (blocking-free) listener.
///
/// Call it early, before other threads start: the `listenfd` crate clears
/// `LISTEN_FDS` and `LISTEN_PID` from the environment so that child
/// processes do not take the socket too, and changing the environment is
/// only sound while no other thread reads it. The result is converted with
/// [`into_tokio`] once the runtime runs.
pub fn take_inherited() -> Result<Option<std::os::unix::net::UnixListener>, ActivationError> {
    let mut fds = listenfd::ListenFd::from_env();
    match fds.len() {
        0 => return Ok(None),
        1 => {}
        n => return Err(ActivationError::TooMany(n)),
    }
    let Some(listener) = fds
        .take_unix_listener(0)
        .map_err(ActivationError::NotUnixListener)?
    else {
        return Ok(None);
    };
    // Tokio requires a non-blocking socket; systemd passes a blocking one.
    listener
        .set_nonblocking(true)
        .map_err(ActivationError::Setup)?;
    Ok(Some(listener))
}

/// Hands a listener from [`take_inherited`] to the tokio runtime. Must be
/// called from within the runtime.
pub fn into_tokio(
    listener: std::os::unix::net::UnixListener,
) -> Result<tokio::net::UnixListener, ActivationError> {
    tokio::net::UnixListener::from_std(listener).map_err(ActivationError::Setup)
}

/// [`take_inherited`] and [`into_tokio`] in one step, for callers already
/// inside the runtime that start no other threads touching the environment.
pub fn listener_from_env() -> Result<Option<tokio::net::UnixListener>, ActivationError> {
    take_inherited()?.map(into_tokio).transpose()
}
