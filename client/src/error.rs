//! The one error type every client call returns.

use profiled_protocol::{ErrorCode, FrameError};

/// Why a client call failed.
///
/// Each variant's message includes the error it wraps, so printing the
/// error alone says everything; no variant repeats it as a `source`.
///
/// [`ClientError::Daemon`] is the daemon answering a well-formed request
/// with a typed refusal, and is usually handled by matching on
/// [`ClientError::code`]. Every other variant means the call could not be
/// carried out at all.
///
/// ```
/// use profiled_client::ClientError;
///
/// // What a caller may conclude from a failure.
/// fn describe(err: &ClientError) -> &'static str {
///     match err {
///         ClientError::Daemon(_) => "the daemon refused it; see `err.code()`",
///         ClientError::Disconnected => "it may or may not have been applied",
///         ClientError::Invalid(_) => "the validator refused the data; nothing was sent",
///         _ => "it could not be carried out",
///     }
/// }
/// assert_eq!(describe(&ClientError::Disconnected), "it may or may not have been applied");
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Connecting failed, or the socket failed during the handshake.
    #[error("i/o error: {0}")]
    Io(std::io::Error),
    /// A frame could not be encoded or decoded. A request over the frame
    /// limit is refused locally with [`FrameError::TooLarge`] before anything
    /// is sent, and the connection stays usable.
    #[error(transparent)]
    Frame(FrameError),
    /// The daemon refused the handshake, for example with
    /// [`ErrorCode::UnsupportedVersion`]. After a refused reconnect, or a
    /// connection the daemon ended with a refusal, every request fails with
    /// it.
    #[error("handshake refused: {0}")]
    Refused(profiled_protocol::Error),
    /// The daemon answered the request with an error.
    #[error("request failed: {0}")]
    Daemon(profiled_protocol::Error),
    /// The connection dropped before the response arrived, or the client is
    /// closed (or gave up reconnecting). Whether a request in flight was
    /// applied is unknown, and it is not re-sent: a save may be sent again
    /// once the client has reconnected, since it carries its epoch and the
    /// full data; a release sent again fails with
    /// [`ErrorCode::LeaseLost`] if the first one was applied.
    #[error("connection closed before the response arrived")]
    Disconnected,
    /// The daemon sent something the protocol does not allow at that point.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// Typed profile data could not be encoded as MessagePack.
    #[error("cannot encode profile data: {0}")]
    Encode(String),
    /// Stored profile data could not be decoded into the profile's type, or
    /// a migration failed.
    #[error("cannot decode profile data: {0}")]
    Decode(String),
    /// The store's validator refused the data; nothing was sent.
    #[error("invalid profile data: {0}")]
    Invalid(String),
    /// The stored data was written by a newer schema than this server
    /// knows. It is refused rather than silently downgraded.
    #[error(
        "profile data has schema version {stored}, newer than the {supported} this server knows"
    )]
    SchemaTooNew {
        /// The stored data's schema version.
        stored: u32,
        /// The newest this server's migrations reach.
        supported: u32,
    },
    /// The typed profile's session has ended (it was released, or its lease
    /// was lost), so it can no longer be saved.
    #[error("the profile's session has ended")]
    Ended,
}

impl ClientError {
    /// The daemon's error code, for [`ClientError::Refused`] and
    /// [`ClientError::Daemon`]; `None` for failures the daemon did not name.
    /// Matching on the code rather than the variant handles a refusal the
    /// same way wherever it came from.
    ///
    /// ```
    /// use profiled_client::protocol::Error;
    /// use profiled_client::{ClientError, ErrorCode};
    ///
    /// let err = ClientError::Daemon(Error::new(ErrorCode::LeaseLost, "lease lost"));
    /// match err.code() {
    ///     Some(ErrorCode::LeaseLost) => println!("another server took the profile; stop saving it"),
    ///     Some(code) => println!("the daemon refused: {code}"),
    ///     None => println!("the call did not complete: {err}"),
    /// }
    /// assert_eq!(ClientError::Disconnected.code(), None);
    /// ```
    pub fn code(&self) -> Option<&ErrorCode> {
        match self {
            Self::Refused(err) | Self::Daemon(err) => Some(&err.code),
            _ => None,
        }
    }
}

impl From<std::io::Error> for ClientError {
    fn from(err: std::io::Error) -> Self {
        Self::Io(err)
    }
}

impl From<FrameError> for ClientError {
    /// Socket failures surface as [`ClientError::Io`] whichever layer saw
    /// them, so callers match on one variant for them.
    fn from(err: FrameError) -> Self {
        match err {
            FrameError::Io(err) => Self::Io(err),
            other => Self::Frame(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_exposed_for_daemon_answers_only() {
        let err = ClientError::Daemon(profiled_protocol::Error::new(ErrorCode::LeaseLost, "x"));
        assert_eq!(err.code(), Some(&ErrorCode::LeaseLost));
        assert_eq!(ClientError::Disconnected.code(), None);
    }

    #[test]
    fn socket_failures_inside_frame_errors_become_io_errors() {
        let err = ClientError::from(FrameError::Io(std::io::Error::other("gone")));
        assert!(matches!(err, ClientError::Io(_)));
        let err = ClientError::from(FrameError::TooLarge { len: 10, max: 5 });
        assert!(matches!(
            err,
            ClientError::Frame(FrameError::TooLarge { .. })
        ));
    }
}
