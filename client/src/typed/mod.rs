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
/// with a `Default` for new profiles and missing fields.
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

/// Why a save was made.
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

/// Why a profile made its final save and released.
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
}

/// Why a profile's session ended.
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
    /// the session's resume grace has passed.
    ReleaseFailed(String),
}

/// What happened to a profile, in order. See the [module docs](self).
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
    /// The store's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets the migrations, in schema order: stored data at schema version
    /// `n` runs `migrations[n..]` at load. Data written by a newer schema
    /// than `migrations.len()` is refused with
    /// [`ClientError::SchemaTooNew`].
    pub fn with_migrations(self, migrations: Vec<Migration>) -> Self {
        self.with_rules(|rules| rules.migrations = migrations)
    }

    /// Sets a validator that runs before every save; an invalid save is
    /// refused locally with [`ClientError::Invalid`] and nothing is sent.
    pub fn with_validator(
        self,
        validator: impl Fn(&T) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.with_rules(|rules| rules.validator = Some(Arc::new(validator)))
    }

    /// Sets a hook that may change the data just before every save is
    /// encoded (after the validator has accepted it).
    pub fn on_before_save(self, hook: impl Fn(&mut T, SaveReason) + Send + Sync + 'static) -> Self {
        self.with_rules(|rules| rules.before_save = Some(Arc::new(hook)))
    }

    /// Sets the auto-save interval; `None` turns auto-save off.
    pub fn with_autosave(self, interval: Option<Duration>) -> Self {
        self.with_rules(|rules| rules.autosave = interval.filter(|i| !i.is_zero()))
    }

    /// Whether a release request (another server force-loading a profile)
    /// is answered by a final save and a release (the default), or passed
    /// on as [`LifecycleEvent::ReleaseRequested`] for the game to handle.
    pub fn release_on_request(self, release: bool) -> Self {
        self.with_rules(|rules| rules.release_on_request = release)
    }

    /// Loads the profile `key` with `policy` and starts its task.
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
    pub async fn load_with(
        &self,
        key: &str,
        options: LoadOptions,
    ) -> Result<Profile<T>, ClientError> {
        let raw = self.client.load_with(&self.name, key, options).await?;
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
    /// A migration from a function on the raw MessagePack value.
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
