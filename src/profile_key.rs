//! The identity of a profile.

use std::fmt;

/// A profile's address: its store and its key within the store.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProfileKey {
    /// The store, e.g. `PlayerData`.
    pub store: String,
    /// The key, e.g. `Player_2261`.
    pub key: String,
}

impl ProfileKey {
    /// A key from its parts.
    pub fn new(store: impl Into<String>, key: impl Into<String>) -> Self {
        Self {
            store: store.into(),
            key: key.into(),
        }
    }
}

impl fmt::Display for ProfileKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.store, self.key)
    }
}
