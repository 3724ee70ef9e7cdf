//! A client for profiled, the daemon that grants session leases on game
//! player profiles.
//!
//! A [`Client`] is one connection to the daemon's Unix socket, opened for
//! one [`SessionId`]. [`Client::load`] acquires a profile's lease and
//! returns a [`Profile`] holding its data and fencing epoch; saves and the
//! release go through it. The daemon may tell a holder that another session
//! wants the profile, or that it was taken, and [`Profile::next_event`]
//! yields those [`ProfileEvent`]s.
//!
//! Clones of a `Client` share its connection, and calls from many tasks run
//! concurrently over it. When the connection drops without
//! [`Client::close`], the client reconnects with the same session and the
//! daemon resumes its leases with the same epochs, so profiles carry on;
//! see [Reconnecting](Client#reconnecting). When the daemon is stopping,
//! profiles receive [`ProfileEvent::ShuttingDown`] and
//! [`Client::shutdown_notice`] says by when to save and release.
//!
//! Most games want the [`typed`] layer on top: [`Client::store`] gives a
//! [`typed::ProfileStore<T>`] whose profiles hold a `T` encoded as
//! MessagePack, with Reconcile, migrations, validation, auto-save, hooks
//! and a lifecycle event stream. The raw layer ([`Client::load`] and
//! [`Profile`]) stays available for games that bring their own encoding.
//!
//! Requests that need no lease (messages, views, version history, stats)
//! and the admin requests are methods on [`Client`] too.
//!
//! The wire format is documented in the [`protocol`] crate.
//!
//! # Example
//!
//! ```no_run
//! use profiled_client::{Client, LoadPolicy, ProfileEvent, SessionId};
//!
//! # async fn run() -> Result<(), profiled_client::ClientError> {
//! let session = SessionId { place_id: 1818, job_id: "server-7".into() };
//! let client = Client::connect("/run/profiled/profiled.sock", session).await?;
//!
//! let mut profile = client.load("PlayerData", "Player_2261", LoadPolicy::ForceLoad).await?;
//! let mut data = profile.data().map(<[u8]>::to_vec).unwrap_or_default();
//! data.extend_from_slice(b"+1 gold");
//! profile.save(data.clone()).await?;
//!
//! if let Some(ProfileEvent::ReleaseRequested { requester }) = profile.try_next_event() {
//!     println!("{requester} wants the profile");
//! }
//! let version = profile.release(Some(data)).await?;
//! println!("released at version {version}");
//!
//! client.close().await;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod client;
mod connection;
mod error;
mod operations;
mod outbox;
mod profile;
mod reconnect;
pub mod typed;

pub use client::{Client, ConnectOptions, LoadOptions};
pub use error::ClientError;
pub use profile::{Profile, ProfileEvent};
pub use profiled_protocol as protocol;
pub use profiled_protocol::{
    ActiveSession, Changes, DaemonStatus, ErrorCode, ExportPage, ExportedProfile, HeldLease,
    LoadPolicy, LossReason, Message, Metric, OverwriteSource, ProfileMeta, ProfileView, Role,
    SessionId, SessionInfo, VersionInfo, VersionQuery, Welcome,
};

#[cfg(test)]
mod tests;
