//! Typed profiles: a store of `T`s, each held profile kept alive by a task
//! that auto-saves it, applies the daemon's requests, and reports what
//! happened.
//!
//! [`Client::store`] gives a [`ProfileStore<T>`]; its [`ProfileStore::load`]
//! gives a [`Profile<T>`]. Data is MessagePack with field names (see
//! [`codec`](self) below): fields missing from stored data take their
//! `Default`, and top-level fields this version of `T` does not know are
//! kept through its saves.
//!
//! # Hooks and events
//!
//! Two shapes, each where it fits:
//!
//! - **Hooks** are closures on the store, called by the profile's task at
//!   the moment something happens, because they must act before it goes on:
//!   [`ProfileStore::on_before_save`] can change the data just before every
//!   save is encoded, and [`ProfileStore::with_validator`] can refuse it.
//! - **Events** are everything a game reacts to in its own time:
//!   [`Profile::next_event`] yields [`LifecycleEvent`]s: a message received
//!   (apply it, then [`Profile::ack`] it; the ack is carried by the next
//!   save), a save done (after save), a save failed, the last save with its
//!   [`LastSaveReason`], and the end of the session with its [`EndReason`],
//!   including a lost lease.
//!
//! # What the profile's task does on its own
//!
//! - Every `autosave` interval it saves the profile if it changed, spread
//!   over the interval so that many profiles do not save at once; a failed
//!   auto-save is retried with backoff and reported as
//!   [`LifecycleEvent::SaveFailed`], never dropped.
//! - On `ReleaseRequested` (another server force-loads the profile) it makes
//!   a final save and releases, unless [`ProfileStore::release_on_request`]
//!   is off, in which case the request is passed on as an event.
//! - On the daemon's `ShuttingDown` it makes a final save and releases.
//! - When the [`Profile`] is dropped while still held, it makes a final save
//!   and releases in the background, and logs a warning if it cannot. That
//!   background task dies with the runtime, so release profiles (or wait
//!   for their `SessionEnded`) before the process exits.
//! - Once a last save has begun, [`Profile::is_active`] is false and later
//!   changes to the data are not saved.
//! - A reconnect that resumes the lease is invisible; the game sees
//!   [`EndReason::LeaseLost`] only if the lease really was lost.

mod codec;
mod keeper;

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{Client, ClientError, LoadOptions, LoadPolicy, LossReason, SessionId};
pub use codec::SCHEMA_TAG;
pub use keeper::{DataMut, DataRef, Profile};
/// The MessagePack value type migrations work on, re-exported so a game
/// need not depend on a matching `rmpv` itself.
pub use rmpv;

/// What a typed profile's data must be: MessagePack-encodable with serde,
/// with a `Default` for new profiles and missing fields. It is implemented
/// for every such type, so a game only derives the traits.
///
/// ```
/// use std::collections::BTreeMap;
/// use profiled_client::typed::ProfileData;
///
/// #[derive(Default, serde::Serialize, serde::Deserialize)]
/// struct PlayerData {
///     coins: u64,
///     inventory: BTreeMap<String, u32>,
/// }
///
/// fn is_profile_data<T: ProfileData>() {}
/// is_profile_data::<PlayerData>();
/// ```
pub trait ProfileData: Serialize + DeserializeOwned + Default + Send + 'static {}

impl<T: Serialize + DeserializeOwned + Default + Send + 'static> ProfileData for T {}

/// One upgrade step of stored data, from schema version `n` to `n + 1`,
/// on the raw MessagePack value. A store's migrations are applied in order
/// at load, starting from the version recorded in the profile's
/// [`SCHEMA_TAG`] meta tag.
///
/// ```
/// use profiled_client::typed::Migration;
/// use profiled_client::typed::rmpv::Value;
///
/// // Version 1 renamed `gold` to `coins`.
/// let rename = Migration::new(|value| match value {
///     Value::Map(entries) => Ok(Value::Map(
///         entries
///             .into_iter()
///             .map(|(k, v)| if k.as_str() == Some("gold") { (Value::from("coins"), v) } else { (k, v) })
///             .collect(),
///     )),
///     other => Err(format!("expected a map, got {other}")),
/// });
/// # let _ = rename;
/// ```
#[derive(Clone)]
pub struct Migration(Arc<codec::MigrationFn>);

/// Why a save was made, passed to the
/// [before-save hook](ProfileStore::on_before_save) and reported in
/// [`LifecycleEvent`]s, so a game can treat the final save differently.
///
/// ```no_run
/// use profiled_client::typed::SaveReason;
/// use std::time::{SystemTime, UNIX_EPOCH};
///
/// #[derive(Default, serde::Serialize, serde::Deserialize)]
/// struct PlayerData { last_seen_s: u64 }
///
/// # fn run(client: profiled_client::Client) {
/// let store = client.store::<PlayerData>("PlayerData").on_before_save(|data, reason| {
///     // Only the final save marks when the player left.
///     if let SaveReason::Last(_) = reason {
///         data.last_seen_s = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
///     }
/// });
/// # let _ = store;
/// # }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SaveReason {
    /// [`Profile::save`].
    Manual,
    /// The auto-save timer.
    AutoSave,
    /// The final save before a release.
    Last(LastSaveReason),
}

/// Why a profile made its final save and released. It tells a game whether
/// the player left on purpose or the profile was taken over.
///
/// ```no_run
/// use profiled_client::typed::{EndReason, LastSaveReason, LifecycleEvent};
///
/// # #[derive(Default, serde::Serialize, serde::Deserialize)] struct PlayerData { coins: u64 }
/// # async fn run(mut profile: profiled_client::typed::Profile<PlayerData>) {
/// while let Some(event) = profile.next_event().await {
///     if let LifecycleEvent::SessionEnded { reason: EndReason::Released(LastSaveReason::ReleaseRequested) } = event {
///         println!("the player moved to another server");
///     }
/// }
/// # }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LastSaveReason {
    /// [`Profile::release`].
    Manual,
    /// Another server force-loaded the profile.
    ReleaseRequested,
    /// The daemon is shutting down.
    Shutdown,
    /// The [`Profile`] was dropped while still held.
    Dropped,
    /// Its client was closed with [`Client::close`](crate::Client::close),
    /// which waits for every typed profile's last save.
    ClientClosed,
}

/// Why a profile's session ended, carried by
/// [`LifecycleEvent::SessionEnded`]. It tells a game whether the player's
/// latest changes were kept: after [`EndReason::Released`] the last save
/// was made unless a [`LifecycleEvent::SaveFailed`] just before it says
/// otherwise, and after any other reason changes since the last save are
/// lost.
///
/// ```no_run
/// use profiled_client::typed::{EndReason, LifecycleEvent};
///
/// # #[derive(Default, serde::Serialize, serde::Deserialize)] struct PlayerData { coins: u64 }
/// # async fn run(mut profile: profiled_client::typed::Profile<PlayerData>) {
/// while let Some(event) = profile.next_event().await {
///     if let LifecycleEvent::SessionEnded { reason } = event {
///         match reason {
///             EndReason::Released(why) => println!("released ({why:?})"),
///             EndReason::LeaseLost(why) => eprintln!("lost ({why:?}); unsaved changes are gone"),
///             other => eprintln!("ended: {other:?}"),
///         }
///     }
/// }
/// # }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EndReason {
    /// It was released, after its last save.
    Released(LastSaveReason),
    /// The lease was taken: stolen, force-loaded after the timeout, or ended
    /// by an operator. Changes since the last save are lost.
    LeaseLost(LossReason),
    /// The lease ended while the client was disconnected.
    LeaseExpired,
    /// The client was closed.
    ClientClosed,
    /// The final release failed; the daemon releases the lease itself once
    /// the session's resume grace has passed after it disconnects. (A last
    /// save the daemon refuses for its size or tags is reported as
    /// `SaveFailed`, and the lease is released without it.)
    ReleaseFailed(String),
}

/// What happened to a profile, in order. See the [module docs](self).
///
/// ```no_run
/// use profiled_client::typed::LifecycleEvent;
///
/// # #[derive(Default, serde::Serialize, serde::Deserialize)] struct PlayerData { coins: u64 }
/// # async fn run(mut profile: profiled_client::typed::Profile<PlayerData>) {
/// while let Some(event) = profile.next_event().await {
///     match event {
///         LifecycleEvent::Message(message) => {
///             profile.update(|data| data.coins += 100); // say every message is a gift
///             profile.ack(message.id);
///         }
///         LifecycleEvent::SaveFailed { error, attempt, .. } => eprintln!("save failed ({attempt} in a row): {error}"),
///         LifecycleEvent::SessionEnded { reason } => println!("ended: {reason:?}"),
///         _ => {}
///     }
/// }
/// # }
/// ```
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum LifecycleEvent {
    /// A message was sent to the profile. Apply it to the data, then call
    /// [`Profile::ack`] with its id; the next save removes it. Until then it
    /// stays pending, and a later loader receives it again.
    Message(crate::Message),
    /// Another server wants the profile. With
    /// [`ProfileStore::release_on_request`] on (the default) the profile
    /// then saves and releases itself, and this event only says who asked;
    /// with it off, the game must save and release.
    ReleaseRequested {
        /// Who asks.
        requester: SessionId,
    },
    /// A save is durable (the after-save hook).
    Saved {
        /// Why it was made.
        reason: SaveReason,
        /// The profile's version after it.
        version: u64,
    },
    /// A save failed. Auto-saves are retried with backoff.
    SaveFailed {
        /// Why it was made.
        reason: SaveReason,
        /// What went wrong.
        error: String,
        /// How many times in a row saving has failed.
        attempt: u32,
    },
    /// The session ended. No event follows.
    SessionEnded {
        /// Why.
        reason: EndReason,
    },
}

/// A named store of typed profiles, with the rules its profiles follow.
/// Cheap to clone.
///
/// ```no_run
/// use std::time::Duration;
/// use profiled_client::{Client, LoadPolicy, SessionId};
///
/// #[derive(Default, serde::Serialize, serde::Deserialize)]
/// struct PlayerData { coins: u64 }
///
/// # async fn run() -> Result<(), profiled_client::ClientError> {
/// let client = Client::connect("profiled.sock", SessionId { place_id: 1, job_id: "s1".into() }).await?;
/// let store = client
///     .store::<PlayerData>("PlayerData")
///     .with_autosave(Some(Duration::from_secs(30)))
///     .with_validator(|data| if data.coins > 1_000_000 { Err("too rich".into()) } else { Ok(()) });
/// let profile = store.load("Player_2261", LoadPolicy::ForceLoad).await?;
/// profile.update(|data| data.coins += 10);
/// profile.release().await?;
/// # Ok(())
/// # }
/// ```
pub struct ProfileStore<T: ProfileData> {
    client: Client,
    name: String,
    rules: Arc<Rules<T>>,
}

/// A store's validator: `Err` carries the reason the data is refused.
type Validator<T> = dyn Fn(&T) -> Result<(), String> + Send + Sync;

/// A store's before-save hook.
type BeforeSave<T> = dyn Fn(&mut T, SaveReason) + Send + Sync;

/// A store's rules, shared by its profiles' tasks.
pub(crate) struct Rules<T> {
    /// Upgrade steps, in schema order.
    migrations: Vec<Migration>,
    /// Refuses invalid data before any save.
    validator: Option<Arc<Validator<T>>>,
    /// Changes data just before every save.
    before_save: Option<Arc<BeforeSave<T>>>,
    /// How often a changed profile is saved; `None` never.
    autosave: Option<Duration>,
    /// Whether a release request is answered by saving and releasing.
    release_on_request: bool,
}

impl Client {
    /// The store `name` of typed profiles of `T`, with the default rules:
    /// auto-save every 30 seconds, release on request, no migrations, no
    /// validator.
    ///
    /// ```no_run
    /// # use profiled_client::{Client, SessionId};
    /// #[derive(Default, serde::Serialize, serde::Deserialize)]
    /// struct PlayerData { coins: u64 }
    /// # async fn run(client: Client) {
    /// let store = client.store::<PlayerData>("PlayerData");
    /// assert_eq!(store.name(), "PlayerData");
    /// # }
    /// ```
    pub fn store<T: ProfileData>(&self, name: &str) -> ProfileStore<T> {
        ProfileStore {
            client: self.clone(),
            name: name.to_owned(),
            rules: Arc::new(Rules {
                migrations: Vec::new(),
                validator: None,
                before_save: None,
                autosave: Some(Duration::from_secs(30)),
                release_on_request: true,
            }),
        }
    }
}

impl<T: ProfileData> ProfileStore<T> {
    /// The store's name, as given to [`Client::store`]; handy in logs.
    ///
    /// ```no_run
    /// # #[derive(Default, serde::Serialize, serde::Deserialize)] struct PlayerData { coins: u64 }
    /// # fn run(store: profiled_client::typed::ProfileStore<PlayerData>) {
    /// println!("using store {}", store.name());
    /// # }
    /// ```
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets the migrations, in schema order: stored data at schema version
    /// `n` runs `migrations[n..]` at load. Data written by a newer schema
    /// than `migrations.len()` is refused with
    /// [`ClientError::SchemaTooNew`].
    ///
    /// ```no_run
    /// use profiled_client::typed::Migration;
    /// use profiled_client::typed::rmpv::Value;
    ///
    /// # #[derive(Default, serde::Serialize, serde::Deserialize)] struct PlayerData { coins: u64 }
    /// # fn run(client: profiled_client::Client) {
    /// // Data saved before the typed layer was a bare coin count; schema 1 is a map.
    /// let to_v1 = Migration::new(|coins| Ok(Value::Map(vec![(Value::from("coins"), coins)])));
    /// let store = client.store::<PlayerData>("PlayerData").with_migrations(vec![to_v1]);
    /// # let _ = store;
    /// # }
    /// ```
    pub fn with_migrations(self, migrations: Vec<Migration>) -> Self {
        self.with_rules(|rules| rules.migrations = migrations)
    }

    /// Sets a validator that runs before every save; an invalid save is
    /// refused locally with [`ClientError::Invalid`] and nothing is sent. It
    /// keeps a bug from overwriting good data with impossible values.
    ///
    /// ```no_run
    /// # #[derive(Default, serde::Serialize, serde::Deserialize)] struct PlayerData { coins: u64 }
    /// # fn run(client: profiled_client::Client) {
    /// let store = client.store::<PlayerData>("PlayerData").with_validator(|data| {
    ///     if data.coins <= 1_000_000 { Ok(()) } else { Err(format!("{} coins is over the cap", data.coins)) }
    /// });
    /// # let _ = store;
    /// # }
    /// ```
    pub fn with_validator(
        self,
        validator: impl Fn(&T) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.with_rules(|rules| rules.validator = Some(Arc::new(validator)))
    }

    /// Sets a hook that may change the data just before every save is
    /// encoded (after the validator has accepted it), for bookkeeping that
    /// must be in every save, such as a save counter.
    ///
    /// ```no_run
    /// # #[derive(Default, serde::Serialize, serde::Deserialize)] struct PlayerData { saves: u64 }
    /// # fn run(client: profiled_client::Client) {
    /// let store = client.store::<PlayerData>("PlayerData").on_before_save(|data, _reason| data.saves += 1);
    /// # let _ = store;
    /// # }
    /// ```
    pub fn on_before_save(self, hook: impl Fn(&mut T, SaveReason) + Send + Sync + 'static) -> Self {
        self.with_rules(|rules| rules.before_save = Some(Arc::new(hook)))
    }

    /// Sets the auto-save interval; `None` turns auto-save off. A shorter
    /// interval loses less on a crash, at the cost of more writes.
    ///
    /// ```no_run
    /// use std::time::Duration;
    ///
    /// # #[derive(Default, serde::Serialize, serde::Deserialize)] struct PlayerData { coins: u64 }
    /// # fn run(client: profiled_client::Client) {
    /// let store = client.store::<PlayerData>("PlayerData").with_autosave(Some(Duration::from_secs(10)));
    /// # let _ = store;
    /// # }
    /// ```
    pub fn with_autosave(self, interval: Option<Duration>) -> Self {
        self.with_rules(|rules| rules.autosave = interval.filter(|i| !i.is_zero()))
    }

    /// Whether a release request (another server force-loading a profile)
    /// is answered by a final save and a release (the default), or passed
    /// on as [`LifecycleEvent::ReleaseRequested`] for the game to handle.
    ///
    /// ```no_run
    /// # #[derive(Default, serde::Serialize, serde::Deserialize)] struct PlayerData { coins: u64 }
    /// # fn run(client: profiled_client::Client) {
    /// // Let the current match finish before handing the profile over.
    /// let store = client.store::<PlayerData>("PlayerData").release_on_request(false);
    /// # let _ = store;
    /// # }
    /// ```
    pub fn release_on_request(self, release: bool) -> Self {
        self.with_rules(|rules| rules.release_on_request = release)
    }

    /// Loads the profile `key` with `policy` and starts its task.
    ///
    /// ```no_run
    /// use profiled_client::LoadPolicy;
    ///
    /// # #[derive(Default, serde::Serialize, serde::Deserialize)] struct PlayerData { coins: u64 }
    /// # async fn run(store: profiled_client::typed::ProfileStore<PlayerData>) -> Result<(), profiled_client::ClientError> {
    /// let profile = store.load("Player_2261", LoadPolicy::ForceLoad).await?;
    /// println!("{} coins", profile.data().coins);
    /// # Ok(()) }
    /// ```
    pub async fn load(&self, key: &str, policy: LoadPolicy) -> Result<Profile<T>, ClientError> {
        let options = LoadOptions {
            policy,
            deadline: None,
        };
        self.load_with(key, options).await
    }

    /// Loads the profile `key` with a deadline if given, and starts its task.
    /// A profile whose data cannot be decoded (or is of a newer schema) is
    /// released again at once, keeping its data, and the error returned.
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use profiled_client::{ClientError, LoadOptions, LoadPolicy};
    ///
    /// # #[derive(Default, serde::Serialize, serde::Deserialize)] struct PlayerData { coins: u64 }
    /// # async fn run(store: profiled_client::typed::ProfileStore<PlayerData>) -> Result<(), ClientError> {
    /// let options = LoadOptions { policy: LoadPolicy::Repeat, deadline: Some(Duration::from_secs(5)) };
    /// match store.load_with("Player_2261", options).await {
    ///     Ok(profile) => println!("{} coins", profile.data().coins),
    ///     Err(ClientError::SchemaTooNew { stored, .. }) => eprintln!("saved by a newer server (schema {stored})"),
    ///     Err(err) => return Err(err),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn load_with(
        &self,
        key: &str,
        options: LoadOptions,
    ) -> Result<Profile<T>, ClientError> {
        let raw = match self
            .client
            .load_with(&self.name, key, options.clone())
            .await
        {
            Err(err) if err.code() == Some(&crate::ErrorCode::AlreadyLoaded) => {
                // A load whose answer was lost to a dropped connection left
                // this session holding the lease with no profile for it.
                // Give it back and load again, rather than leave the game
                // stuck on `AlreadyLoaded`.
                let Some(epoch) = self.client.shared().orphaned_lease(&self.name, key) else {
                    return Err(err);
                };
                tracing::info!(
                    store = self.name,
                    key,
                    epoch,
                    "releasing a lease whose load answer was lost, then loading again"
                );
                let _ = self.client.release(&self.name, key, epoch, None).await;
                self.client.load_with(&self.name, key, options).await?
            }
            other => other?,
        };
        keeper::start(raw, Arc::clone(&self.rules)).await
    }

    /// Changes the rules. Profiles already loaded keep the rules they
    /// were loaded with.
    fn with_rules(mut self, change: impl FnOnce(&mut Rules<T>)) -> Self {
        change(Arc::make_mut(&mut self.rules));
        self
    }
}

impl Migration {
    /// A migration from a function on the raw MessagePack value. The
    /// function returns `Err` with a reason for data it cannot upgrade, which
    /// fails the load with [`ClientError::Decode`].
    ///
    /// ```
    /// use profiled_client::typed::Migration;
    /// use profiled_client::typed::rmpv::Value;
    ///
    /// // Every player starts with 50 gems; a missing field would default to 0.
    /// let add_gems = Migration::new(|value| match value {
    ///     Value::Map(mut fields) => {
    ///         fields.push((Value::from("gems"), Value::from(50)));
    ///         Ok(Value::Map(fields))
    ///     }
    ///     other => Err(format!("expected a map, got {other}")),
    /// });
    /// # let _ = add_gems;
    /// ```
    pub fn new(
        step: impl Fn(rmpv::Value) -> Result<rmpv::Value, String> + Send + Sync + 'static,
    ) -> Self {
        Self(Arc::new(step))
    }
}

impl<T> Clone for Rules<T> {
    fn clone(&self) -> Self {
        Self {
            migrations: self.migrations.clone(),
            validator: self.validator.clone(),
            before_save: self.before_save.clone(),
            autosave: self.autosave,
            release_on_request: self.release_on_request,
        }
    }
}

impl<T: ProfileData> Clone for ProfileStore<T> {
    fn clone(&self) -> Self {
        Self {
            client: self.client.clone(),
            name: self.name.clone(),
            rules: Arc::clone(&self.rules),
        }
    }
}

impl<T: ProfileData> std::fmt::Debug for ProfileStore<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProfileStore")
            .field("name", &self.name)
            .field("migrations", &self.rules.migrations.len())
            .field("autosave", &self.rules.autosave)
            .field("release_on_request", &self.rules.release_on_request)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Migration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Migration")
    }
}
