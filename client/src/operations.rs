//! Requests that need no lease: messages, reading and history, stats, and
//! the administrative requests `profilectl` makes.
//!
//! Administrative requests need a client connected with [`Role::Admin`]
//! (see [`ConnectOptions::role`]); others are refused with
//! [`ErrorCode::Forbidden`].
//!
//! [`Role::Admin`]: crate::Role::Admin
//! [`ConnectOptions::role`]: crate::ConnectOptions::role
//! [`ErrorCode::Forbidden`]: crate::ErrorCode::Forbidden

use profiled_protocol::{
    ActiveSession, DaemonStatus, ExportPage, ExportedProfile, Metric, OverwriteSource, ProfileView,
    Reply, RequestBody, SessionInfo, VersionInfo, VersionQuery,
};

use crate::client::unexpected;
use crate::connection::Effect;
use crate::{Client, ClientError};

impl Client {
    /// Queues a message for a profile, held or not, existing or not, and
    /// returns its id once it is durable. The holder receives it as
    /// [`ProfileEvent::Message`](crate::ProfileEvent::Message); otherwise
    /// the next loader finds it in [`Profile::messages`](crate::Profile::messages).
    pub async fn send_message(
        &self,
        store: &str,
        key: &str,
        payload: Vec<u8>,
    ) -> Result<u64, ClientError> {
        let body = RequestBody::SendMessage {
            store: store.to_owned(),
            key: key.to_owned(),
            payload,
        };
        match self.call(body).await? {
            Reply::MessageSent { id } => Ok(id),
            other => Err(unexpected("message sent", &other)),
        }
    }

    /// Reads a profile without a lease: its current data when `version` is
    /// `None`, or a kept version.
    pub async fn view(
        &self,
        store: &str,
        key: &str,
        version: Option<u64>,
    ) -> Result<ProfileView, ClientError> {
        let body = RequestBody::View {
            store: store.to_owned(),
            key: key.to_owned(),
            version,
        };
        match self.call(body).await? {
            Reply::Viewed(view) => Ok(view),
            other => Err(unexpected("viewed", &other)),
        }
    }

    /// Lists a profile's kept versions.
    pub async fn list_versions(
        &self,
        store: &str,
        key: &str,
        query: VersionQuery,
    ) -> Result<Vec<VersionInfo>, ClientError> {
        let body = RequestBody::ListVersions {
            store: store.to_owned(),
            key: key.to_owned(),
            query,
        };
        match self.call(body).await? {
            Reply::Versions(versions) => Ok(versions),
            other => Err(unexpected("versions", &other)),
        }
    }

    /// Admin: replaces a profile's data with new bytes or a kept version,
    /// ending any lease on it. Returns the profile's new version.
    pub async fn overwrite(
        &self,
        store: &str,
        key: &str,
        source: OverwriteSource,
    ) -> Result<u64, ClientError> {
        let body = RequestBody::Overwrite {
            store: store.to_owned(),
            key: key.to_owned(),
            source,
        };
        match self.call(body).await? {
            Reply::Overwritten { version } => Ok(version),
            other => Err(unexpected("overwritten", &other)),
        }
    }

    /// Admin: erases a profile's data, metadata, versions and messages,
    /// ending any lease on it.
    pub async fn wipe(&self, store: &str, key: &str) -> Result<(), ClientError> {
        let body = RequestBody::Wipe {
            store: store.to_owned(),
            key: key.to_owned(),
        };
        match self.call(body).await? {
            Reply::Wiped => Ok(()),
            other => Err(unexpected("wiped", &other)),
        }
    }

    /// The daemon's counters and gauges.
    pub async fn stats(&self) -> Result<Vec<Metric>, ClientError> {
        match self.call(RequestBody::Stats).await? {
            Reply::Stats(metrics) => Ok(metrics),
            other => Err(unexpected("stats", &other)),
        }
    }

    /// A summary of the daemon.
    pub async fn status(&self) -> Result<DaemonStatus, ClientError> {
        match self.call(RequestBody::Status).await? {
            Reply::Status(status) => Ok(status),
            other => Err(unexpected("status", &other)),
        }
    }

    /// Admin: every session the daemon knows, with its leases.
    pub async fn sessions(&self) -> Result<Vec<SessionInfo>, ClientError> {
        match self.call(RequestBody::Sessions).await? {
            Reply::Sessions(sessions) => Ok(sessions),
            other => Err(unexpected("sessions", &other)),
        }
    }

    /// Admin: ends the lease on a profile now, keeping its last saved data.
    /// Returns the lease that was ended, if there was one.
    pub async fn revoke(
        &self,
        store: &str,
        key: &str,
    ) -> Result<Option<ActiveSession>, ClientError> {
        let body = RequestBody::Revoke {
            store: store.to_owned(),
            key: key.to_owned(),
        };
        match self.call(body).await? {
            Reply::Revoked { lease } => Ok(lease),
            other => Err(unexpected("revoked", &other)),
        }
    }

    /// Admin: asks the holder of a profile to release it. Returns the lease
    /// whose holder was asked, if there was one.
    pub async fn ask_release(
        &self,
        store: &str,
        key: &str,
    ) -> Result<Option<ActiveSession>, ClientError> {
        let body = RequestBody::AskRelease {
            store: store.to_owned(),
            key: key.to_owned(),
        };
        match self.call(body).await? {
            Reply::ReleaseAsked { lease } => Ok(lease),
            other => Err(unexpected("release asked", &other)),
        }
    }

    /// Admin: has the daemon write a consistent copy of its database to
    /// `path`, a directory on the daemon's host that must not exist yet.
    /// Returns the size of the copy in bytes.
    pub async fn backup(&self, path: &str) -> Result<u64, ClientError> {
        let body = RequestBody::Backup {
            path: path.to_owned(),
        };
        match self.call(body).await? {
            Reply::BackedUp { bytes, .. } => Ok(bytes),
            other => Err(unexpected("backed up", &other)),
        }
    }

    /// Admin: reads up to `limit` profiles of `store` in key order, after
    /// the key `after`. Pass the page's `next` to get the following page.
    pub async fn export_page(
        &self,
        store: &str,
        after: Option<String>,
        limit: u32,
    ) -> Result<ExportPage, ClientError> {
        let body = RequestBody::Export {
            store: store.to_owned(),
            after,
            limit,
        };
        match self.call(body).await? {
            Reply::Exported(page) => Ok(page),
            other => Err(unexpected("exported", &other)),
        }
    }

    /// Admin: writes an exported profile into `store`, ending any lease on
    /// it. Returns the profile's new version.
    pub async fn import(&self, store: &str, profile: ExportedProfile) -> Result<u64, ClientError> {
        let body = RequestBody::Import {
            store: store.to_owned(),
            profile,
        };
        match self.call(body).await? {
            Reply::Overwritten { version } => Ok(version),
            other => Err(unexpected("overwritten", &other)),
        }
    }

    /// Sends a request that has no effect on the client's lease routing.
    async fn call(&self, body: RequestBody) -> Result<Reply, ClientError> {
        self.request(body, Effect::None).await
    }
}
