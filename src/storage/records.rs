//! How keys and records are laid out in RocksDB.
//!
//! A profile key is stored as `u16 BE store length, store bytes, key bytes`,
//! so all of a store's profiles are one contiguous range. Records are one
//! format byte followed by bincode (standard configuration), so the layout
//! can change without guessing what old bytes mean.

use profiled_protocol::SessionId;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::ProfileKey;

/// The record format written by this build.
const FORMAT: u8 = 1;

const CONFIG: bincode::config::Configuration = bincode::config::standard();

/// The per-profile bookkeeping kept in the `meta` column family.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaRecord {
    /// When the profile was first granted, in Unix milliseconds.
    pub created_at_ms: u64,
    /// When its data was last written, in Unix milliseconds; 0 if never.
    pub updated_at_ms: u64,
    /// How many leases have been granted on it.
    pub load_count: u64,
    /// How many data writes have been committed.
    pub version: u64,
    /// The last epoch granted. It is kept after a release, so the next
    /// grant's epoch is higher than every earlier one, across restarts.
    pub epoch: u64,
}

/// A held lease, kept in the `leases` column family while it lasts, so a
/// restart finds every lease without scanning all profiles.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// The holder.
    pub session: SessionId,
    /// The lease's fencing token.
    pub epoch: u64,
    /// When it was granted, in Unix milliseconds.
    pub since_ms: u64,
}

/// The database key of a profile.
pub fn encode_key(key: &ProfileKey) -> Vec<u8> {
    let store = key.store.as_bytes();
    let len = u16::try_from(store.len()).unwrap_or(u16::MAX);
    let mut out = Vec::with_capacity(2 + store.len() + key.key.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&store[..usize::from(len)]);
    out.extend_from_slice(key.key.as_bytes());
    out
}

/// The profile key of a database key, or `None` if the bytes were not
/// written by [`encode_key`].
pub fn decode_key(bytes: &[u8]) -> Option<ProfileKey> {
    let (len, rest) = bytes.split_first_chunk::<2>()?;
    let len = usize::from(u16::from_be_bytes(*len));
    let store = std::str::from_utf8(rest.get(..len)?).ok()?;
    let key = std::str::from_utf8(rest.get(len..)?).ok()?;
    Some(ProfileKey::new(store, key))
}

/// Encodes a record with its format byte.
pub fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    let mut out = vec![FORMAT];
    // Encoding plain structs into a Vec cannot fail.
    if let Err(err) = bincode::serde::encode_into_std_write(record, &mut out, CONFIG) {
        unreachable!("encoding a record into memory failed: {err}");
    }
    out
}

/// Decodes a record written by [`encode`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    match bytes.split_first() {
        Some((&FORMAT, rest)) => bincode::serde::decode_from_slice(rest, CONFIG)
            .map(|(record, _)| record)
            .map_err(|err| err.to_string()),
        Some((format, _)) => Err(format!("unknown record format {format}")),
        None => Err("empty record".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_prefixed_by_their_store() {
        let key = encode_key(&ProfileKey::new("PlayerData", "Player_1"));
        assert_eq!(&key[..2], &[0, 10]);
        assert_eq!(&key[2..], b"PlayerDataPlayer_1");
        assert_eq!(
            decode_key(&key),
            Some(ProfileKey::new("PlayerData", "Player_1"))
        );
        assert_eq!(decode_key(&[0, 9, b'x']), None);
        let other = encode_key(&ProfileKey::new("PlayerDataX", ""));
        assert!(!other.starts_with(&encode_key(&ProfileKey::new("PlayerData", ""))));
    }

    #[test]
    fn records_round_trip_and_unknown_formats_are_refused() {
        let meta = MetaRecord {
            created_at_ms: 1,
            updated_at_ms: 2,
            load_count: 3,
            version: 4,
            epoch: 5,
        };
        assert_eq!(decode::<MetaRecord>(&encode(&meta)), Ok(meta));
        assert!(decode::<MetaRecord>(&[9, 0]).is_err());
        assert!(decode::<MetaRecord>(&[]).is_err());
    }
}
