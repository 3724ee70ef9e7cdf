//! A held lease on one profile, and the events the daemon sends about it.

use std::time::Instant;

use profiled_protocol::{Changes, LossReason, Message, ProfileMeta, SessionId};
use tokio::sync::mpsc;

use crate::{Client, ClientError};

/// A lease on one profile, granted by [`Client::load`], with the data it
/// was loaded with.
///
/// Saves and the release carry the lease's [`epoch`](Profile::epoch); the
/// daemon refuses them with [`ErrorCode::LeaseLost`](crate::ErrorCode::LeaseLost)
/// once another session has taken the profile.
///
/// A `Profile` survives reconnects: if the daemon still lists its lease
/// after one, it keeps working with the same epoch, and otherwise it
/// receives [`ProfileEvent::LeaseExpired`].
///
/// Dropping a `Profile` only stops its events. It does not release the
/// lease, which stays held until [`Profile::release`] or until the client
/// closes (and the daemon's resume grace has passed).
///
/// ```no_run
/// use profiled_client::{LoadPolicy, ProfileEvent};
///
/// # async fn run(client: profiled_client::Client) -> Result<(), profiled_client::ClientError> {
/// let mut profile = client.load("PlayerData", "Player_2261", LoadPolicy::ForceLoad).await?;
/// let data = profile.data().map(<[u8]>::to_vec).unwrap_or_default();
/// // Hand the profile over as soon as another server asks for it.
/// if let Some(ProfileEvent::ReleaseRequested { .. }) = profile.next_event().await {
///     profile.release(Some(data)).await?;
/// }
/// # Ok(()) }
/// ```
pub struct Profile {
    /// The connection the lease belongs to; a lease is only valid on it.
    pub(crate) client: Client,
    /// The profile's store.
    pub(crate) store: String,
    /// The profile's key within the store.
    pub(crate) key: String,
    /// The lease's fencing token.
    pub(crate) epoch: u64,
    /// The data as loaded; `None` for a profile never saved.
    pub(crate) data: Option<Vec<u8>>,
    /// The metadata as loaded.
    pub(crate) meta: ProfileMeta,
    /// The messages pending when the profile was loaded.
    pub(crate) messages: Vec<Message>,
    /// The client's routing table holds the sender, and each connection's
    /// reader task routes this lease's events to it. The sender is dropped
    /// when the client closes, the lease is released, or a reconnect finds
    /// the lease expired, which ends the stream.
    pub(crate) events: mpsc::UnboundedReceiver<ProfileEvent>,
}

/// Something the daemon tells a lease holder without being asked.
///
/// ```no_run
/// use profiled_client::ProfileEvent;
///
/// # async fn run(mut profile: profiled_client::Profile) -> Result<(), profiled_client::ClientError> {
/// # let data = Vec::new();
/// while let Some(event) = profile.next_event().await {
///     match event {
///         ProfileEvent::ReleaseRequested { .. } | ProfileEvent::ShuttingDown { .. } => {
///             profile.release(Some(data)).await?;
///             break;
///         }
///         ProfileEvent::Message(message) => println!("message {} to apply", message.id),
///         _ => break, // The lease is gone; saving is pointless.
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProfileEvent {
    /// Another session force-loads the profile. Save and release it
    /// promptly, or it is taken once the daemon's `force_load_timeout`
    /// passes.
    ReleaseRequested {
        /// The session that wants the profile.
        requester: SessionId,
    },
    /// The lease was taken. Every later save or release under its epoch is
    /// refused.
    LeaseLost {
        /// Why it was taken.
        reason: LossReason,
        /// Who holds the profile now, if the daemon said.
        new_owner: Option<SessionId>,
    },
    /// The lease ended while the client was disconnected: the daemon did
    /// not list it when the client reconnected, because the resume grace
    /// ran out or another session took the profile meanwhile. Every later
    /// save or release under its epoch is refused, and the event stream
    /// ends after this event. Load the profile again to carry on.
    ///
    /// This is the client's own event, not the daemon's, so it has no
    /// [`LossReason`]: the client cannot tell why the lease went.
    LeaseExpired,
    /// A message was sent to the profile. Apply it, then list its id in
    /// [`Changes::consumed_messages`] of the next save; until then it stays
    /// pending, and the next loader receives it again. Each message is
    /// handed over once per lease, also across reconnects; messages sent
    /// while the client was reconnecting arrive once it is back. They come
    /// oldest first, except that one the daemon could not push at once (its
    /// queue was full) comes after newer ones.
    Message(Message),
    /// The daemon is stopping. It takes no more loads, and releases every
    /// remaining lease itself at `deadline`, keeping the last saved data;
    /// until then saves and releases still work. Save and release the
    /// profile before then. [`Client::shutdown_notice`] carries the same
    /// deadline for code that holds no profile.
    ShuttingDown {
        /// When the daemon releases the lease itself, by this process's
        /// clock (the daemon's relative deadline added to when the event
        /// arrived).
        deadline: Instant,
    },
}

impl Profile {
    /// The profile's store, as passed to [`Client::load`].
    ///
    /// ```no_run
    /// # fn run(profile: &profiled_client::Profile) {
    /// println!("holding {}/{}", profile.store(), profile.key());
    /// # }
    /// ```
    pub fn store(&self) -> &str {
        &self.store
    }

    /// The profile's key within its store, as passed to [`Client::load`].
    ///
    /// ```no_run
    /// # fn run(profile: &profiled_client::Profile) {
    /// println!("holding {}/{}", profile.store(), profile.key());
    /// # }
    /// ```
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The lease's fencing token, which every save and release carries. It is
    /// worth logging with saves, to tell which lease a refused save was made
    /// under.
    ///
    /// ```no_run
    /// # fn run(profile: &profiled_client::Profile) {
    /// println!("{} loaded at epoch {}", profile.key(), profile.epoch());
    /// # }
    /// ```
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The data as loaded, or `None` for a profile that was never saved.
    /// Saving does not change it.
    ///
    /// ```no_run
    /// # fn run(profile: &profiled_client::Profile) {
    /// // A profile that was never saved is a new player: start from defaults.
    /// let bytes = profile.data().unwrap_or(b"coins=0");
    /// # let _ = bytes;
    /// # }
    /// ```
    pub fn data(&self) -> Option<&[u8]> {
        self.data.as_deref()
    }

    /// The profile's metadata as loaded; saving does not change it.
    ///
    /// ```no_run
    /// # fn run(profile: &profiled_client::Profile) {
    /// let meta = profile.meta();
    /// println!("loaded {} times, at version {}", meta.load_count, meta.version);
    /// # }
    /// ```
    pub fn meta(&self) -> &ProfileMeta {
        &self.meta
    }

    /// The messages that were pending when the profile was loaded, oldest
    /// first, as many as fit in the load's answer. The rest, and later
    /// ones, arrive as [`ProfileEvent::Message`], in order.
    ///
    /// ```no_run
    /// use profiled_client::Changes;
    ///
    /// # async fn run(profile: profiled_client::Profile) -> Result<(), profiled_client::ClientError> {
    /// // Apply what arrived while nobody held the profile, then consume it with the save.
    /// let consumed = profile.messages().iter().map(|message| message.id).collect();
    /// # let data = Vec::new();
    /// profile.save_with(data, Changes { consumed_messages: consumed, ..Changes::default() }).await?;
    /// # Ok(()) }
    /// ```
    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// Writes the profile's data under this lease, and returns the
    /// profile's version after the write once it is durable. Each save sends
    /// the whole data.
    ///
    /// ```no_run
    /// # async fn run(profile: profiled_client::Profile) -> Result<(), profiled_client::ClientError> {
    /// let version = profile.save(b"coins=10".to_vec()).await?;
    /// println!("saved as version {version}");
    /// # Ok(()) }
    /// ```
    pub async fn save(&self, data: Vec<u8>) -> Result<u64, ClientError> {
        self.client
            .save(&self.store, &self.key, self.epoch, data)
            .await
    }

    /// Like [`Profile::save`], also applying `changes` (meta tags, user
    /// ids, consumed messages) in the same atomic step.
    ///
    /// ```no_run
    /// use std::collections::BTreeMap;
    /// use profiled_client::Changes;
    ///
    /// # async fn run(profile: profiled_client::Profile) -> Result<(), profiled_client::ClientError> {
    /// // Meta tags set here replace all of the profile's tags.
    /// let tags = BTreeMap::from([("region".to_owned(), b"eu".to_vec())]);
    /// let changes = Changes { meta_tags: Some(tags), ..Changes::default() };
    /// profile.save_with(b"coins=10".to_vec(), changes).await?;
    /// # Ok(()) }
    /// ```
    pub async fn save_with(&self, data: Vec<u8>, changes: Changes) -> Result<u64, ClientError> {
        self.client
            .save_with(&self.store, &self.key, self.epoch, data, changes)
            .await
    }

    /// Ends the lease, with a final write of `data` in the same atomic step
    /// if given, and returns the profile's version after it. Without `data`
    /// the last saved data is kept.
    ///
    /// ```no_run
    /// # async fn run(profile: profiled_client::Profile) -> Result<(), profiled_client::ClientError> {
    /// let version = profile.release(Some(b"coins=10".to_vec())).await?;
    /// println!("released at version {version}");
    /// # Ok(()) }
    /// ```
    pub async fn release(self, data: Option<Vec<u8>>) -> Result<u64, ClientError> {
        self.client
            .release(&self.store, &self.key, self.epoch, data)
            .await
    }

    /// Like [`Profile::release`], also applying `changes` in the same
    /// atomic step.
    ///
    /// ```no_run
    /// use profiled_client::Changes;
    ///
    /// # async fn run(profile: profiled_client::Profile) -> Result<(), profiled_client::ClientError> {
    /// // The final data includes message 7's effect, so consume it in the same step.
    /// let changes = Changes { consumed_messages: vec![7], ..Changes::default() };
    /// profile.release_with(Some(b"coins=17".to_vec()), changes).await?;
    /// # Ok(()) }
    /// ```
    pub async fn release_with(
        self,
        data: Option<Vec<u8>>,
        changes: Changes,
    ) -> Result<u64, ClientError> {
        self.client
            .release_with(&self.store, &self.key, self.epoch, data, changes)
            .await
    }

    /// Waits for the next event about this lease; `None` once the client
    /// is closed (or gave up reconnecting), the lease was released, or it
    /// expired while the client was disconnected.
    ///
    /// ```no_run
    /// # async fn run(mut profile: profiled_client::Profile) {
    /// while let Some(event) = profile.next_event().await {
    ///     println!("{}: {event:?}", profile.key());
    /// }
    /// // The stream ended: the lease is released, expired, or the client closed.
    /// # }
    /// ```
    pub async fn next_event(&mut self) -> Option<ProfileEvent> {
        self.events.recv().await
    }

    /// The next event about this lease if one has arrived, without waiting,
    /// for code such as a game loop's tick that must not block.
    ///
    /// ```no_run
    /// # fn tick(profile: &mut profiled_client::Profile) {
    /// while let Some(event) = profile.try_next_event() {
    ///     println!("{}: {event:?}", profile.key());
    /// }
    /// # }
    /// ```
    pub fn try_next_event(&mut self) -> Option<ProfileEvent> {
        self.events.try_recv().ok()
    }
}

impl std::fmt::Debug for Profile {
    /// Shows the data's length rather than its bytes, which may be megabytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Profile")
            .field("store", &self.store)
            .field("key", &self.key)
            .field("epoch", &self.epoch)
            .field("data_len", &self.data.as_ref().map(Vec::len))
            .field("meta", &self.meta)
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

impl Drop for Profile {
    /// Stops routing this lease's events, so a dropped profile leaves no
    /// route behind. A newer lease on the same key keeps its own.
    fn drop(&mut self) {
        self.client
            .shared()
            .unsubscribe(&self.store, &self.key, self.epoch);
    }
}
