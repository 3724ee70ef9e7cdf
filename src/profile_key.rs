//! The identity of a profile.

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// A profile's address: its store and its key within the store.
///
/// Both live in one shared allocation, so a copy costs a pointer rather
/// than two strings. The lease table keeps two copies of every held
/// profile's key (by profile, and in its holder's set), and timers and
/// queued loads keep more; with two strings each, a held lease cost about
/// 160 bytes more (docs/PERFORMANCE.md, fourth round).
#[derive(Clone)]
pub struct ProfileKey {
    /// The store followed by the key.
    text: Arc<str>,
    /// Where the store ends in `text`.
    split: usize,
}

impl ProfileKey {
    /// A key from its parts.
    pub fn new(store: impl AsRef<str>, key: impl AsRef<str>) -> Self {
        let (store, key) = (store.as_ref(), key.as_ref());
        let mut text = String::with_capacity(store.len() + key.len());
        text.push_str(store);
        text.push_str(key);
        Self {
            text: text.into(),
            split: store.len(),
        }
    }

    /// The store, e.g. `PlayerData`.
    pub fn store(&self) -> &str {
        self.text.get(..self.split).unwrap_or_default()
    }

    /// The key within the store, e.g. `Player_2261`.
    pub fn key(&self) -> &str {
        self.text.get(self.split..).unwrap_or_default()
    }
}

impl PartialEq for ProfileKey {
    fn eq(&self, other: &Self) -> bool {
        self.split == other.split && self.text == other.text
    }
}

impl Eq for ProfileKey {}

impl Hash for ProfileKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.split.hash(state);
        self.text.hash(state);
    }
}

/// By store, then by key: the order of the `(store, key)` pair.
impl Ord for ProfileKey {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.store(), self.key()).cmp(&(other.store(), other.key()))
    }
}

impl PartialOrd for ProfileKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Debug for ProfileKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProfileKey")
            .field("store", &self.store())
            .field("key", &self.key())
            .finish()
    }
}

impl fmt::Display for ProfileKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.store(), self.key())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parts_come_back_apart_and_order_by_store_then_key() {
        let a = ProfileKey::new("ab", "c");
        let b = ProfileKey::new("a", "bc");
        assert_eq!((a.store(), a.key()), ("ab", "c"));
        assert_eq!((b.store(), b.key()), ("a", "bc"));
        // The same text split differently is another profile.
        assert_ne!(a, b);
        assert!(b < a, "store a sorts before store ab");
        assert!(ProfileKey::new("s", "") < ProfileKey::new("s", "k"));
        assert_eq!(ProfileKey::new("s", "k"), ProfileKey::new("s", "k"));
        assert_eq!(a.to_string(), "ab/c");
    }
}
