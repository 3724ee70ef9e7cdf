//! A held typed profile: the handle game code uses, and the task that keeps
//! the lease (auto-saves, answers the daemon, makes the last save).
//!
//! The data lives behind a mutex shared by the handle and the task; game
//! code reads and changes it through short-lived guards, and every save is
//! made by the task, one at a time, so saves reach the daemon in the order
//! their data was taken.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rmpv::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::codec::{self, SCHEMA_TAG};
use super::{EndReason, LastSaveReason, LifecycleEvent, ProfileData, Rules, SaveReason};
use crate::{Changes, ClientError, Message, Profile as RawProfile, ProfileEvent, ProfileMeta};

/// A held profile of `T`, loaded by [`ProfileStore::load`](super::ProfileStore::load).
///
/// Read the data with [`data`](Profile::data) and change it with
/// [`data_mut`](Profile::data_mut) or [`update`](Profile::update); the
/// profile's task saves it when it changed, every auto-save interval. Do not
/// hold a guard across an `.await`: the task needs the data to save it.
///
/// ```no_run
/// # use profiled_client::{Client, LoadPolicy};
/// # use profiled_client::typed::LifecycleEvent;
/// #[derive(Default, serde::Serialize, serde::Deserialize)]
/// struct PlayerData { coins: u64 }
/// # async fn run(client: Client) -> Result<(), profiled_client::ClientError> {
/// let mut profile = client.store::<PlayerData>("PlayerData").load("Player_1", LoadPolicy::ForceLoad).await?;
/// profile.update(|data| data.coins += 5);
/// assert_eq!(profile.data().coins, 5);
/// profile.save().await?;
/// while let Some(event) = profile.next_event().await {
///     if let LifecycleEvent::SessionEnded { reason } = event {
///         println!("session ended: {reason:?}");
///     }
/// }
/// # Ok(())
/// # }
/// ```
pub struct Profile<T: ProfileData> {
    /// What the handle and the task share.
    shared: Arc<Shared<T>>,
    /// Requests to the task, which holds the receiver; dropping it tells the
    /// task to make the last save and release.
    commands: mpsc::UnboundedSender<Command>,
    /// Events from the task, which holds the sender.
    events: mpsc::UnboundedReceiver<LifecycleEvent>,
    /// The profile's store, key and epoch, for display.
    store: String,
    key: String,
    epoch: u64,
}

/// Read access to a profile's data, from [`Profile::data`]. Dereferences
/// to `T`. It holds the profile's lock, so drop it before any `.await`.
///
/// ```no_run
/// # #[derive(Default, serde::Serialize, serde::Deserialize)] struct PlayerData { coins: u64 }
/// # fn run(profile: &profiled_client::typed::Profile<PlayerData>) {
/// let coins = profile.data().coins; // the guard is dropped at the `;`
/// # let _ = coins;
/// # }
/// ```
pub struct DataRef<'a, T>(MutexGuard<'a, State<T>>);

/// Write access to a profile's data, from [`Profile::data_mut`].
/// Dereferences to `T`; taking it marks the profile changed, so the next
/// auto-save writes it. It holds the profile's lock, so drop it before any
/// `.await`.
///
/// ```no_run
/// # #[derive(Default, serde::Serialize, serde::Deserialize)] struct PlayerData { coins: u64 }
/// # fn run(profile: &profiled_client::typed::Profile<PlayerData>) {
/// {
///     let mut data = profile.data_mut();
///     data.coins += 10;
/// } // the guard is dropped here, before anything awaits
/// # }
/// ```
pub struct DataMut<'a, T>(MutexGuard<'a, State<T>>);

/// What the handle and the task share.
struct Shared<T> {
    state: Mutex<State<T>>,
}

/// The profile as game code last left it.
struct State<T> {
    /// The data.
    data: T,
    /// The stored value the next save is laid over (see `codec`).
    base: Value,
    /// Counts changes; compared with `saved` to know if a save is due.
    changes: u64,
    /// The change count the last acknowledged save covered.
    saved: u64,
    /// The meta tags, including the schema tag.
    meta_tags: BTreeMap<String, Vec<u8>>,
    /// The user ids.
    user_ids: Vec<u64>,
    /// Messages received and not yet acknowledged by a save.
    pending: Vec<Message>,
    /// Ids the game acknowledged, carried by the next save.
    acked: BTreeSet<u64>,
    /// The metadata as loaded.
    meta: ProfileMeta,
    /// Whether the session is still held.
    active: bool,
}

/// Requests from the handle to the task.
enum Command {
    Save(oneshot::Sender<Result<u64, ClientError>>),
    Release(oneshot::Sender<Result<u64, ClientError>>),
}

/// The task that keeps one lease.
struct Keeper<T: ProfileData> {
    raw: RawProfile,
    shared: Arc<Shared<T>>,
    rules: Arc<Rules<T>>,
    events: mpsc::UnboundedSender<LifecycleEvent>,
    /// Consecutive failed saves, for backoff.
    failures: u32,
    /// Set once a save was refused for a lost lease: auto-saves stop, and
    /// the daemon's `LeaseLost` event ends the session.
    fenced: bool,
}

/// A save ready to send, and what it covers.
struct Prepared {
    bytes: Vec<u8>,
    changes: Changes,
    /// The change count the save covers.
    covered: u64,
    /// The new base, once acknowledged.
    merged: Value,
}

/// Decodes a freshly loaded profile and starts its task.
pub(super) async fn start<T: ProfileData>(
    raw: RawProfile,
    rules: Arc<Rules<T>>,
) -> Result<Profile<T>, ClientError> {
    let mut meta = raw.meta().clone();
    let decoded = codec::schema_of(&meta.meta_tags)
        .and_then(|schema| codec::decode::<T>(raw.data(), schema, &rules.migrations));
    let (data, base) = match decoded {
        Ok(decoded) => decoded,
        Err(err) => {
            // Nothing was changed; give the lease back so the profile is
            // not stuck with a server that cannot read it.
            if let Err(release) = raw.release(None).await {
                tracing::warn!(error = %release, "could not release an unreadable profile");
            }
            return Err(err);
        }
    };
    let schema = rules.migrations.len().to_string().into_bytes();
    meta.meta_tags.insert(SCHEMA_TAG.to_owned(), schema);
    let (events, receiver) = mpsc::unbounded_channel();
    // Messages that were pending at load go through the same event stream
    // as later ones, so a game handles them in one place.
    for message in raw.messages() {
        let _ = events.send(LifecycleEvent::Message(message.clone()));
    }
    let state = State {
        data,
        base,
        changes: 0,
        saved: 0,
        meta_tags: meta.meta_tags.clone(),
        user_ids: meta.user_ids.clone(),
        pending: raw.messages().to_vec(),
        acked: BTreeSet::new(),
        meta,
        active: true,
    };
    let shared = Arc::new(Shared {
        state: Mutex::new(state),
    });
    let (commands, requests) = mpsc::unbounded_channel();
    let (store, key, epoch) = (raw.store().to_owned(), raw.key().to_owned(), raw.epoch());
    let keeper = Keeper {
        raw,
        shared: Arc::clone(&shared),
        rules,
        events,
        failures: 0,
        fenced: false,
    };
    let client = keeper.raw.client.clone();
    client.spawn_keeper(keeper.run(requests));
    Ok(Profile {
        shared,
        commands,
        events: receiver,
        store,
        key,
        epoch,
    })
}

impl<T: ProfileData> Profile<T> {
    /// The profile's store, as given to [`Client::store`](crate::Client::store).
    ///
    /// ```no_run
    /// # #[derive(Default, serde::Serialize, serde::Deserialize)] struct PlayerData { coins: u64 }
    /// # fn run(profile: &profiled_client::typed::Profile<PlayerData>) {
    /// println!("holding {}/{}", profile.store(), profile.key());
    /// # }
    /// ```
    pub fn store(&self) -> &str {
        &self.store
    }

    /// The profile's key, as given to [`ProfileStore::load`](super::ProfileStore::load).
    ///
    /// ```no_run
    /// # #[derive(Default, serde::Serialize, serde::Deserialize)] struct PlayerData { coins: u64 }
    /// # fn run(profile: &profiled_client::typed::Profile<PlayerData>) {
    /// println!("holding {}/{}", profile.store(), profile.key());
    /// # }
    /// ```
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The lease's fencing token. It is worth logging, to match the profile
    /// with the daemon's logs.
    ///
    /// ```no_run
    /// # #[derive(Default, serde::Serialize, serde::Deserialize)] struct PlayerData { coins: u64 }
    /// # fn run(profile: &profiled_client::typed::Profile<PlayerData>) {
    /// println!("{} held at epoch {}", profile.key(), profile.epoch());
    /// # }
    /// ```
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Reads the data. The guard holds the profile's lock, which the task
    /// needs to save, so keep it short.
    ///
    /// ```no_run
    /// # #[derive(Default, serde::Serialize, serde::Deserialize)] struct PlayerData { coins: u64 }
    /// # fn run(profile: &profiled_client::typed::Profile<PlayerData>) {
    /// println!("{} coins", profile.data().coins);
    /// # }
    /// ```
    pub fn data(&self) -> DataRef<'_, T> {
        DataRef(self.shared.lock())
    }

    /// Changes the data; the profile counts as changed, so the next
    /// auto-save writes it. The guard holds the profile's lock, so keep it
    /// short and never across an `.await`.
    ///
    /// ```no_run
    /// # #[derive(Default, serde::Serialize, serde::Deserialize)] struct PlayerData { coins: u64 }
    /// # fn run(profile: &profiled_client::typed::Profile<PlayerData>) {
    /// profile.data_mut().coins += 10;
    /// # }
    /// ```
    pub fn data_mut(&self) -> DataMut<'_, T> {
        let mut state = self.shared.lock();
        state.changes += 1;
        DataMut(state)
    }

    /// Changes the data with `change`, and returns what it returns. The lock
    /// is held only while `change` runs, so it cannot be held across an
    /// `.await` by mistake.
    ///
    /// ```no_run
    /// # #[derive(Default, serde::Serialize, serde::Deserialize)] struct PlayerData { coins: u64 }
    /// # fn run(profile: &profiled_client::typed::Profile<PlayerData>) {
    /// let coins = profile.update(|data| {
    ///     data.coins += 10;
    ///     data.coins
    /// });
    /// # let _ = coins;
    /// # }
    /// ```
    pub fn update<R>(&self, change: impl FnOnce(&mut T) -> R) -> R {
        change(&mut self.data_mut())
    }

    /// Whether the lease is still held: not released, lost or expired, and
    /// no last save has begun. Changes made once it is false are not saved.
    ///
    /// ```no_run
    /// # #[derive(Default, serde::Serialize, serde::Deserialize)] struct PlayerData { coins: u64 }
    /// # fn run(profile: &profiled_client::typed::Profile<PlayerData>) {
    /// // A reward granted now would not be saved once the profile is inactive.
    /// if profile.is_active() {
    ///     profile.update(|data| data.coins += 100);
    /// }
    /// # }
    /// ```
    pub fn is_active(&self) -> bool {
        self.shared.lock().active
    }

    /// The profile's metadata as loaded; saving does not change it.
    ///
    /// ```no_run
    /// # #[derive(Default, serde::Serialize, serde::Deserialize)] struct PlayerData { coins: u64 }
    /// # fn run(profile: &profiled_client::typed::Profile<PlayerData>) {
    /// println!("loaded {} times", profile.meta().load_count);
    /// # }
    /// ```
    pub fn meta(&self) -> ProfileMeta {
        self.shared.lock().meta.clone()
    }

    /// The meta tags, as the next save will write them.
    ///
    /// ```no_run
    /// # #[derive(Default, serde::Serialize, serde::Deserialize)] struct PlayerData { coins: u64 }
    /// # fn run(profile: &profiled_client::typed::Profile<PlayerData>) {
    /// let region = profile.meta_tags().get("region").cloned();
    /// # let _ = region;
    /// # }
    /// ```
    pub fn meta_tags(&self) -> BTreeMap<String, Vec<u8>> {
        self.shared.lock().meta_tags.clone()
    }

    /// Sets a meta tag; the next save writes it with the data. Tags are
    /// visible in [`Client::view`](crate::Client::view) without taking the lease.
    ///
    /// ```no_run
    /// # #[derive(Default, serde::Serialize, serde::Deserialize)] struct PlayerData { coins: u64 }
    /// # fn run(profile: &profiled_client::typed::Profile<PlayerData>) {
    /// profile.set_meta_tag("region", b"eu".to_vec());
    /// # }
    /// ```
    pub fn set_meta_tag(&self, name: &str, value: Vec<u8>) {
        let mut state = self.shared.lock();
        state.meta_tags.insert(name.to_owned(), value);
        state.changes += 1;
    }

    /// The user ids, as the next save will write them.
    ///
    /// ```no_run
    /// # #[derive(Default, serde::Serialize, serde::Deserialize)] struct PlayerData { coins: u64 }
    /// # fn run(profile: &profiled_client::typed::Profile<PlayerData>) {
    /// let has_owner = profile.user_ids().contains(&2261);
    /// # let _ = has_owner;
    /// # }
    /// ```
    pub fn user_ids(&self) -> Vec<u64> {
        self.shared.lock().user_ids.clone()
    }

    /// Sets the user ids (the players whose data this is, for GDPR
    /// requests); the next save writes them with the data.
    ///
    /// ```no_run
    /// # #[derive(Default, serde::Serialize, serde::Deserialize)] struct PlayerData { coins: u64 }
    /// # fn run(profile: &profiled_client::typed::Profile<PlayerData>) {
    /// profile.set_user_ids(vec![2261]);
    /// # }
    /// ```
    pub fn set_user_ids(&self, ids: Vec<u64>) {
        let mut state = self.shared.lock();
        state.user_ids = ids;
        state.changes += 1;
    }

    /// Messages received and not yet acknowledged, oldest first, for a game
    /// that applies them later than their [`LifecycleEvent::Message`](super::LifecycleEvent::Message).
    ///
    /// ```no_run
    /// # #[derive(Default, serde::Serialize, serde::Deserialize)] struct PlayerData { coins: u64 }
    /// # fn run(profile: &profiled_client::typed::Profile<PlayerData>) {
    /// for message in profile.pending_messages() {
    ///     println!("message {} is not applied yet", message.id);
    /// }
    /// # }
    /// ```
    pub fn pending_messages(&self) -> Vec<Message> {
        self.shared.lock().pending.clone()
    }

    /// Acknowledges a message the game has applied to the data. The next
    /// save removes it, atomically with the data that includes its effect.
    ///
    /// ```no_run
    /// # #[derive(Default, serde::Serialize, serde::Deserialize)] struct PlayerData { coins: u64 }
    /// # use profiled_client::typed::LifecycleEvent;
    /// # async fn run(mut profile: profiled_client::typed::Profile<PlayerData>) {
    /// if let Some(LifecycleEvent::Message(message)) = profile.next_event().await {
    ///     profile.update(|data| data.coins += 100); // say every message is a gift
    ///     // The next save removes the message along with the coins it granted.
    ///     profile.ack(message.id);
    /// }
    /// # }
    /// ```
    pub fn ack(&self, message_id: u64) {
        let mut state = self.shared.lock();
        if state.pending.iter().any(|m| m.id == message_id) {
            state.acked.insert(message_id);
            state.changes += 1;
        }
    }

    /// Applies a message to the data and acknowledges it in one step. Prefer
    /// it to [`update`](Profile::update) then [`ack`](Profile::ack): between
    /// those two calls an auto-save could store the change without the ack,
    /// and the message would then be applied again by the next loader.
    ///
    /// ```no_run
    /// # #[derive(Default, serde::Serialize, serde::Deserialize)] struct PlayerData { coins: u64 }
    /// # use profiled_client::typed::LifecycleEvent;
    /// # async fn run(mut profile: profiled_client::typed::Profile<PlayerData>) {
    /// if let Some(LifecycleEvent::Message(message)) = profile.next_event().await {
    ///     profile.apply(message.id, |data| data.coins += 100);
    /// }
    /// # }
    /// ```
    pub fn apply<R>(&self, message_id: u64, change: impl FnOnce(&mut T) -> R) -> R {
        let mut state = self.shared.lock();
        state.changes += 1;
        let result = change(&mut state.data);
        if state.pending.iter().any(|m| m.id == message_id) {
            state.acked.insert(message_id);
        }
        result
    }

    /// Saves now, whether or not the data changed, and returns the version
    /// once durable, for changes that must not wait for the auto-save, such
    /// as a purchase. Fails with [`ClientError::Invalid`] if the validator
    /// refuses the data, and [`ClientError::Ended`] after the session ended.
    ///
    /// ```no_run
    /// # #[derive(Default, serde::Serialize, serde::Deserialize)] struct PlayerData { coins: u64 }
    /// # async fn run(profile: profiled_client::typed::Profile<PlayerData>) -> Result<(), profiled_client::ClientError> {
    /// profile.update(|data| data.coins -= 50);
    /// let version = profile.save().await?;
    /// println!("purchase saved as version {version}");
    /// # Ok(()) }
    /// ```
    pub async fn save(&self) -> Result<u64, ClientError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Save(reply))
            .map_err(|_| ClientError::Ended)?;
        answer.await.unwrap_or(Err(ClientError::Ended))
    }

    /// Makes the last save and releases the lease; returns the version.
    /// If the data is invalid, the lease is released keeping the last
    /// saved data, and the validator's error is returned.
    ///
    /// ```no_run
    /// # #[derive(Default, serde::Serialize, serde::Deserialize)] struct PlayerData { coins: u64 }
    /// # async fn run(profile: profiled_client::typed::Profile<PlayerData>) -> Result<(), profiled_client::ClientError> {
    /// // The player logged out.
    /// let version = profile.release().await?;
    /// println!("released at version {version}");
    /// # Ok(()) }
    /// ```
    pub async fn release(self) -> Result<u64, ClientError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Release(reply))
            .map_err(|_| ClientError::Ended)?;
        answer.await.unwrap_or(Err(ClientError::Ended))
    }

    /// The next event; `None` once the session has ended and every event
    /// was taken.
    ///
    /// ```no_run
    /// # #[derive(Default, serde::Serialize, serde::Deserialize)] struct PlayerData { coins: u64 }
    /// # async fn run(mut profile: profiled_client::typed::Profile<PlayerData>) {
    /// while let Some(event) = profile.next_event().await {
    ///     println!("{}: {event:?}", profile.key());
    /// }
    /// # }
    /// ```
    pub async fn next_event(&mut self) -> Option<LifecycleEvent> {
        self.events.recv().await
    }

    /// The next event if one has arrived, without waiting, for code such as
    /// a game loop's tick that must not block.
    ///
    /// ```no_run
    /// # #[derive(Default, serde::Serialize, serde::Deserialize)] struct PlayerData { coins: u64 }
    /// # fn tick(profile: &mut profiled_client::typed::Profile<PlayerData>) {
    /// while let Some(event) = profile.try_next_event() {
    ///     println!("{}: {event:?}", profile.key());
    /// }
    /// # }
    /// ```
    pub fn try_next_event(&mut self) -> Option<LifecycleEvent> {
        self.events.try_recv().ok()
    }
}

impl<T> Shared<T> {
    /// Locks the state. A panic in game code while holding a guard cannot
    /// leave the state half-changed in a way a save would make worse than
    /// what the game itself wrote, so a poisoned lock is used as is.
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<T: ProfileData> Keeper<T> {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let end = self.keep(&mut commands).await;
        self.shared.lock().active = false;
        let _ = self
            .events
            .send(LifecycleEvent::SessionEnded { reason: end });
        // The session is over. The task ends here, so `Client::close` need
        // not wait for the game to drop the profile; later requests find
        // the command queue closed and fail with `Ended`, without a round
        // trip, as those already queued do when it is dropped.
    }

    /// Keeps the lease until the session ends, and says why it ended.
    async fn keep(&mut self, commands: &mut mpsc::UnboundedReceiver<Command>) -> EndReason {
        let mut next_autosave = self.first_autosave();
        let closing = self.raw.client.keepers_stop();
        loop {
            let autosave_due = next_autosave.is_some();
            tokio::select! {
                () = closing.cancelled() => {
                    let (_, end) = self.last_save(LastSaveReason::ClientClosed).await;
                    return end;
                }
                command = commands.recv() => match command {
                    Some(Command::Save(reply)) => {
                        let result = self.save(SaveReason::Manual).await;
                        let _ = reply.send(result);
                    }
                    Some(Command::Release(reply)) => {
                        let (result, end) = self.last_save(LastSaveReason::Manual).await;
                        let _ = reply.send(result);
                        return end;
                    }
                    None => {
                        let (result, end) = self.last_save(LastSaveReason::Dropped).await;
                        if let Err(err) = result {
                            tracing::warn!(
                                store = self.raw.store(),
                                key = self.raw.key(),
                                error = %err,
                                "a dropped profile could not make its last save"
                            );
                        }
                        return end;
                    }
                },
                event = self.raw.next_event() => match event {
                    Some(ProfileEvent::Message(message)) => {
                        self.shared.lock().pending.push(message.clone());
                        let _ = self.events.send(LifecycleEvent::Message(message));
                    }
                    Some(ProfileEvent::ReleaseRequested { requester }) => {
                        let _ = self.events.send(LifecycleEvent::ReleaseRequested { requester });
                        if self.rules.release_on_request {
                            let (_, end) = self.last_save(LastSaveReason::ReleaseRequested).await;
                            return end;
                        }
                    }
                    Some(ProfileEvent::ShuttingDown { .. }) => {
                        let (_, end) = self.last_save(LastSaveReason::Shutdown).await;
                        return end;
                    }
                    Some(ProfileEvent::LeaseLost { reason, .. }) => {
                        return EndReason::LeaseLost(reason);
                    }
                    Some(ProfileEvent::LeaseExpired) => return EndReason::LeaseExpired,
                    None => return EndReason::ClientClosed,
                },
                () = sleep_until(next_autosave), if autosave_due => {
                    next_autosave = self.autosave().await;
                }
            }
        }
    }

    /// When the first auto-save is due: a fixed fraction of the interval
    /// that depends on the profile's key, so profiles loaded together do
    /// not all save together.
    fn first_autosave(&self) -> Option<Instant> {
        use std::hash::{Hash, Hasher};
        let interval = self.rules.autosave?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (self.raw.store(), self.raw.key()).hash(&mut hasher);
        let fraction = (hasher.finish() % 1000) as u32;
        let wait = Duration::try_from_secs_f64(
            interval.as_secs_f64() * f64::from(fraction.max(1)) / 1000.0,
        )
        .ok()?;
        from_now(wait)
    }

    /// Saves if the profile changed, and says when to look again: after
    /// the interval, or sooner after a failure, backing off.
    async fn autosave(&mut self) -> Option<Instant> {
        let interval = self.rules.autosave?;
        if self.fenced {
            return None;
        }
        let dirty = {
            let state = self.shared.lock();
            state.changes > state.saved
        };
        if !dirty {
            return from_now(interval);
        }
        match self.save(SaveReason::AutoSave).await {
            Ok(_) => from_now(interval),
            Err(ClientError::Invalid(_) | ClientError::Encode(_)) => {
                // Retrying cannot help until the game changes the data.
                from_now(interval)
            }
            Err(_) if self.fenced => None,
            Err(_) => {
                let backoff = Duration::from_millis(250)
                    .saturating_mul(1 << self.failures.min(10))
                    .min(interval);
                from_now(backoff)
            }
        }
    }

    /// Saves the data now, reporting the outcome as an event.
    async fn save(&mut self, reason: SaveReason) -> Result<u64, ClientError> {
        let prepared = match self.prepare(reason) {
            Ok(prepared) => prepared,
            Err(err) => {
                self.failed(reason, &err);
                return Err(err);
            }
        };
        let Prepared {
            bytes,
            changes,
            covered,
            merged,
        } = prepared;
        let acked = changes.consumed_messages.clone();
        let result = self.raw.save_with(bytes, changes).await;
        match &result {
            Ok(version) => self.saved(reason, *version, covered, merged, &acked),
            Err(err) => {
                if err.code() == Some(&crate::ErrorCode::LeaseLost) {
                    self.fenced = true;
                }
                self.failed(reason, err);
            }
        }
        result
    }

    /// Makes the last save and releases in one step. If the data cannot be
    /// saved (the validator refuses it), the lease is released keeping the
    /// last saved data, and the error is returned.
    async fn last_save(&mut self, why: LastSaveReason) -> (Result<u64, ClientError>, EndReason) {
        let reason = SaveReason::Last(why);
        let (store, key, epoch) = (
            self.raw.store().to_owned(),
            self.raw.key().to_owned(),
            self.raw.epoch(),
        );
        let client = self.raw.client.clone();
        match self.prepare(reason) {
            Ok(Prepared {
                bytes,
                changes,
                covered,
                merged,
            }) => {
                let acked = changes.consumed_messages.clone();
                // A brief failure (storage recovering from a full disk, a
                // reply lost to a reconnect) must not lose the last changes:
                // retry with backoff for a while. A retry after a release
                // that did land fails with `LeaseLost`, which ends it.
                let give_up = Instant::now() + LAST_SAVE_PATIENCE;
                let mut attempt = 0u32;
                // Whether an earlier attempt may have landed: its answer was
                // lost with the connection.
                let mut in_doubt = false;
                let result =
                    loop {
                        let result = client
                            .release_with(&store, &key, epoch, Some(bytes.clone()), changes.clone())
                            .await;
                        match &result {
                            Err(err) if transient(err) && Instant::now() < give_up => {
                                in_doubt |= matches!(err, ClientError::Disconnected);
                                self.failed(reason, err);
                                attempt = attempt.saturating_add(1);
                                let backoff =
                                    Duration::from_millis(250).saturating_mul(1 << attempt.min(4));
                                tokio::time::sleep(backoff).await;
                            }
                            Err(err) if in_doubt && lost(err) => {
                                // The lease is gone: perhaps by the attempt whose
                                // answer was lost. If the profile is what it
                                // carried (data, tags, user ids, and none of the
                                // messages it consumed still pending), it landed.
                                break match client.view(&store, &key, None).await {
                                    Ok(view)
                                        if view.data.as_deref() == Some(&bytes[..])
                                            && changes.meta_tags.as_ref().is_none_or(|tags| {
                                                *tags == view.meta.meta_tags
                                            })
                                            && changes
                                                .user_ids
                                                .as_ref()
                                                .is_none_or(|ids| *ids == view.meta.user_ids)
                                            && !view.messages.iter().any(|m| {
                                                changes.consumed_messages.contains(&m.id)
                                            }) =>
                                    {
                                        Ok(view.version)
                                    }
                                    _ => result,
                                };
                            }
                            _ => break result,
                        }
                    };
                match &result {
                    Ok(version) => {
                        self.saved(reason, *version, covered, merged, &acked);
                        (result, EndReason::Released(why))
                    }
                    Err(err) if transient(err) || lost(err) => {
                        self.failed(reason, err);
                        let end = ended_by(err);
                        (result, end)
                    }
                    Err(refused) => {
                        // Refused for what it carries (data or tags over the
                        // daemon's limits): the same release would always be
                        // refused, and nobody else can release the lease. It
                        // is handed back without the changes, as an invalid
                        // profile's is, so the player can be loaded again.
                        self.failed(reason, refused);
                        let end = release_unchanged(&client, &store, &key, epoch, why).await;
                        (result, end)
                    }
                }
            }
            Err(invalid) => {
                self.failed(reason, &invalid);
                let end = release_unchanged(&client, &store, &key, epoch, why).await;
                (Err(invalid), end)
            }
        }
    }

    /// Validates, runs the before-save hook, and encodes. The last save
    /// also marks the profile inactive under the same lock, so a change
    /// made after it was taken is never mistaken for a saved one: once
    /// [`Profile::is_active`] is false, changes are not saved.
    fn prepare(&self, reason: SaveReason) -> Result<Prepared, ClientError> {
        let mut state = self.shared.lock();
        if matches!(reason, SaveReason::Last(_)) {
            state.active = false;
        }
        // Game code runs here; a panic in it is a refusal of this save, not
        // the end of the keeper (which would leave the lease held with
        // nobody to release it). Caught here, it never unwinds past the lock.
        let game_code = |run: &mut dyn FnMut() -> Result<(), String>| {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
                .unwrap_or_else(|_| Err("game code panicked while saving".to_owned()))
                .map_err(ClientError::Invalid)
        };
        if let Some(validator) = &self.rules.validator {
            game_code(&mut || validator(&state.data))?;
        }
        if let Some(hook) = &self.rules.before_save {
            game_code(&mut || {
                hook(&mut state.data, reason);
                Ok(())
            })?;
        }
        let (merged, bytes) = codec::encode(&state.data, &state.base)?;
        let changes = Changes {
            meta_tags: Some(state.meta_tags.clone()),
            user_ids: Some(state.user_ids.clone()),
            consumed_messages: state.acked.iter().copied().collect(),
        };
        Ok(Prepared {
            bytes,
            changes,
            covered: state.changes,
            merged,
        })
    }

    /// Records an acknowledged save.
    fn saved(
        &mut self,
        reason: SaveReason,
        version: u64,
        covered: u64,
        merged: Value,
        acked: &[u64],
    ) {
        self.failures = 0;
        {
            let mut state = self.shared.lock();
            state.base = merged;
            state.saved = state.saved.max(covered);
            state.pending.retain(|m| !acked.contains(&m.id));
            for id in acked {
                state.acked.remove(id);
            }
        }
        let _ = self.events.send(LifecycleEvent::Saved { reason, version });
    }

    /// Records a failed save.
    fn failed(&mut self, reason: SaveReason, err: &ClientError) {
        self.failures = self.failures.saturating_add(1);
        tracing::warn!(
            store = self.raw.store(),
            key = self.raw.key(),
            ?reason,
            attempt = self.failures,
            error = %err,
            "saving a profile failed"
        );
        let _ = self.events.send(LifecycleEvent::SaveFailed {
            reason,
            error: err.to_string(),
            attempt: self.failures,
        });
    }
}

/// `wait` from now; `None` (never) past what an `Instant` can hold, for an
/// auto-save interval as long as `Duration::MAX`.
fn from_now(wait: Duration) -> Option<Instant> {
    Instant::now().checked_add(wait)
}

/// How long a last save keeps retrying a transient failure.
const LAST_SAVE_PATIENCE: Duration = Duration::from_secs(30);

/// Whether a failed save may succeed if tried again: the daemon's storage
/// failed (it recovers by itself), or the reply was lost to a reconnect.
fn transient(err: &ClientError) -> bool {
    matches!(err, ClientError::Disconnected) || err.code() == Some(&crate::ErrorCode::Storage)
}

/// Releases lease `epoch` without this session's unsaved changes, when the
/// last save cannot be made: the player can then be loaded again.
async fn release_unchanged(
    client: &crate::Client,
    store: &str,
    key: &str,
    epoch: u64,
    why: LastSaveReason,
) -> EndReason {
    match client
        .release_with(store, key, epoch, None, Changes::default())
        .await
    {
        Ok(_) => EndReason::Released(why),
        Err(err) => ended_by(&err),
    }
}

/// Whether the lease is gone, so nothing more can be written under it.
fn lost(err: &ClientError) -> bool {
    err.code() == Some(&crate::ErrorCode::LeaseLost)
}

/// How a failed last save ended the session.
fn ended_by(err: &ClientError) -> EndReason {
    match err.code() {
        Some(crate::ErrorCode::LeaseLost) => {
            EndReason::ReleaseFailed("the lease was lost".to_owned())
        }
        _ => EndReason::ReleaseFailed(err.to_string()),
    }
}

/// Sleeps until `at`, or forever without one.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl<T> std::ops::Deref for DataRef<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0.data
    }
}

impl<T> std::ops::Deref for DataMut<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0.data
    }
}

impl<T> std::ops::DerefMut for DataMut<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0.data
    }
}

impl<T: ProfileData> std::fmt::Debug for Profile<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Profile")
            .field("store", &self.store)
            .field("key", &self.key)
            .field("epoch", &self.epoch)
            .field("active", &self.is_active())
            .finish_non_exhaustive()
    }
}

impl<T> std::fmt::Debug for DataRef<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataRef")
    }
}

impl<T> std::fmt::Debug for DataMut<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataMut")
    }
}
