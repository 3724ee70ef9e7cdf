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
    ///
    /// ```no_run
    /// # async fn run(client: profiled_client::Client) -> Result<(), profiled_client::ClientError> {
    /// // A gift for a player who may be offline: whoever holds or next loads
    /// // the profile applies it.
    /// let id = client.send_message("PlayerData", "Player_2261", b"gift:100".to_vec()).await?;
    /// println!("queued message {id}");
    /// # Ok(()) }
    /// ```
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
    /// `None`, or a kept version. It does not disturb the holder, so it suits
    /// looking at other players' profiles and support tools.
    ///
    /// ```no_run
    /// # async fn run(client: profiled_client::Client) -> Result<(), profiled_client::ClientError> {
    /// let view = client.view("PlayerData", "Player_2261", None).await?;
    /// println!("version {} holds {} bytes", view.version, view.data.map_or(0, |d| d.len()));
    /// # Ok(()) }
    /// ```
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

    /// Lists a profile's kept versions, for example to pick one to
    /// [`view`](Client::view) or roll back to with [`Client::overwrite`].
    ///
    /// ```no_run
    /// use profiled_client::VersionQuery;
    ///
    /// # async fn run(client: profiled_client::Client) -> Result<(), profiled_client::ClientError> {
    /// let query = VersionQuery { newest_first: true, from_ms: None, to_ms: None, limit: 10 };
    /// for info in client.list_versions("PlayerData", "Player_2261", query).await? {
    ///     println!("version {} at {} ms: {} bytes", info.version, info.saved_at_ms, info.size);
    /// }
    /// # Ok(()) }
    /// ```
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
    ///
    /// ```no_run
    /// use profiled_client::OverwriteSource;
    ///
    /// # async fn run(admin: profiled_client::Client) -> Result<(), profiled_client::ClientError> {
    /// // Roll a corrupted profile back to a version known to be good.
    /// let version = admin.overwrite("PlayerData", "Player_2261", OverwriteSource::Version(41)).await?;
    /// println!("restored as version {version}");
    /// # Ok(()) }
    /// ```
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
    /// ending any lease on it. This is how a GDPR erasure request is carried
    /// out, since nothing of the profile is kept.
    ///
    /// ```no_run
    /// # async fn run(admin: profiled_client::Client) -> Result<(), profiled_client::ClientError> {
    /// admin.wipe("PlayerData", "Player_2261").await?;
    /// # Ok(()) }
    /// ```
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

    /// The daemon's counters and gauges, for monitoring. Names and labels
    /// follow Prometheus conventions.
    ///
    /// ```no_run
    /// # async fn run(client: profiled_client::Client) -> Result<(), profiled_client::ClientError> {
    /// for metric in client.stats().await? {
    ///     println!("{} {:?} = {}", metric.name, metric.labels, metric.value);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn stats(&self) -> Result<Vec<Metric>, ClientError> {
        match self.call(RequestBody::Stats).await? {
            Reply::Stats(metrics) => Ok(metrics),
            other => Err(unexpected("stats", &other)),
        }
    }

    /// A summary of the daemon, for dashboards and for checking which
    /// version is running.
    ///
    /// ```no_run
    /// # async fn run(client: profiled_client::Client) -> Result<(), profiled_client::ClientError> {
    /// let status = client.status().await?;
    /// println!("profiled {} holds {} leases", status.daemon_version, status.leases_held);
    /// # Ok(()) }
    /// ```
    pub async fn status(&self) -> Result<DaemonStatus, ClientError> {
        match self.call(RequestBody::Status).await? {
            Reply::Status(status) => Ok(status),
            other => Err(unexpected("status", &other)),
        }
    }

    /// Admin: every session the daemon knows, with its leases, for finding
    /// which server holds what.
    ///
    /// ```no_run
    /// # async fn run(admin: profiled_client::Client) -> Result<(), profiled_client::ClientError> {
    /// for info in admin.sessions().await? {
    ///     println!("{}: {} leases", info.session, info.leases.len());
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn sessions(&self) -> Result<Vec<SessionInfo>, ClientError> {
        match self.call(RequestBody::Sessions).await? {
            Reply::Sessions(sessions) => Ok(sessions),
            other => Err(unexpected("sessions", &other)),
        }
    }

    /// Admin: ends the lease on a profile now, keeping its last saved data.
    /// Returns the lease that was ended, if there was one. The holder is not
    /// asked first, so this is for a holder that is stuck; prefer
    /// [`Client::ask_release`] otherwise.
    ///
    /// ```no_run
    /// # async fn run(admin: profiled_client::Client) -> Result<(), profiled_client::ClientError> {
    /// if let Some(lease) = admin.revoke("PlayerData", "Player_2261").await? {
    ///     println!("ended the lease of {} at epoch {}", lease.session, lease.epoch);
    /// }
    /// # Ok(()) }
    /// ```
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
    /// whose holder was asked, if there was one. Unlike [`Client::revoke`],
    /// this lets the holder save its latest changes first.
    ///
    /// ```no_run
    /// # async fn run(admin: profiled_client::Client) -> Result<(), profiled_client::ClientError> {
    /// match admin.ask_release("PlayerData", "Player_2261").await? {
    ///     Some(lease) => println!("asked {} to release", lease.session),
    ///     None => println!("nobody holds the profile"),
    /// }
    /// # Ok(()) }
    /// ```
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
    ///
    /// ```no_run
    /// # async fn run(admin: profiled_client::Client) -> Result<(), profiled_client::ClientError> {
    /// let bytes = admin.backup("/var/backups/profiled/2024-06-01").await?;
    /// println!("backup written: {bytes} bytes");
    /// # Ok(()) }
    /// ```
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
    ///
    /// ```no_run
    /// # async fn run(admin: profiled_client::Client) -> Result<(), profiled_client::ClientError> {
    /// // Walk a whole store, one page at a time.
    /// let mut after = None;
    /// loop {
    ///     let page = admin.export_page("PlayerData", after, 500).await?;
    ///     for profile in &page.profiles {
    ///         println!("{} at version {}", profile.key, profile.version);
    ///     }
    ///     match page.next {
    ///         Some(next) => after = Some(next),
    ///         None => break,
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
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
    /// it. Returns the profile's new version. With [`Client::export_page`]
    /// it copies profiles between stores or daemons.
    ///
    /// ```no_run
    /// # async fn run(source: profiled_client::Client, admin: profiled_client::Client) -> Result<(), profiled_client::ClientError> {
    /// // Seed a test store with the first page of the live one.
    /// let page = source.export_page("PlayerData", None, 100).await?;
    /// for profile in page.profiles {
    ///     admin.import("PlayerData_Test", profile).await?;
    /// }
    /// # Ok(()) }
    /// ```
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
