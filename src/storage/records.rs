//! How keys and records are laid out in RocksDB.
//!
//! A profile key is stored as `u16 BE store length, store bytes, key bytes`,
//! so all of a store's profiles are one contiguous range. A profile's
//! messages and kept versions are stored under an item key, `u16 BE store
//! length, store, u16 BE key length, key, u64 BE id`, so one profile's items
//! are one contiguous range in id order, and no key's range can contain
//! another's.
//!
//! Records are one format byte followed by bincode (standard
//! configuration), so the layout can change without guessing what old bytes
//! mean. Messages and versions are a format byte, a `u64 BE` timestamp and
//! the raw bytes, so a large profile is stored without re-encoding it.

use std::collections::BTreeMap;

use profiled_protocol::SessionId;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::ProfileKey;

/// The format of meta records written by this build. Format 1 differs in
/// the meta record, which [`decode_meta`] still reads.
const FORMAT: u8 = 2;
const _: () = assert!(FORMAT == 2, "decode reads formats 1 and 2");

/// The format of lease records written by this build: format 3 added the
/// uid, and [`decode_lease`] still reads 1 and 2. It is kept apart from
/// [`FORMAT`] so that every other record stays readable by earlier builds:
/// after a clean stop, which leaves no lease record, a downgrade works.
const LEASE_FORMAT: u8 = 3;

/// The format of message and version values.
const ITEM_FORMAT: u8 = 1;

const CONFIG: bincode::config::Configuration = bincode::config::standard();

/// The bytes reserved for an encoded record before encoding starts.
const ENCODE_CAPACITY: usize = 64;

/// The largest total of lengths a decoded record may claim. No record is
/// larger than a frame (the limits keep a profile's metadata within one),
/// and a frame is at most 1 GiB; a damaged length beyond that is an error
/// rather than an allocation the process cannot survive.
const RECORD_LIMIT: usize = profiled_protocol::MAX_FRAME_CEILING as usize;

/// [`CONFIG`] for decoding, with [`RECORD_LIMIT`].
const DECODE: bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<RECORD_LIMIT>,
> = CONFIG.with_limit::<RECORD_LIMIT>();

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
    /// The game's tags, replaced by a save that sets them.
    pub meta_tags: BTreeMap<String, Vec<u8>>,
    /// The players whose data the profile holds.
    pub user_ids: Vec<u64>,
    /// The last message id given out; ids are never reused, even after a
    /// wipe, so a late acknowledgement cannot remove a newer message.
    pub last_message_id: u64,
    /// How many messages are pending, so a send can enforce the limit
    /// without counting them.
    pub pending_messages: u64,
    /// The newest version kept in history, 0 if none.
    pub kept_version: u64,
    /// When that version was kept, in Unix milliseconds.
    pub kept_at_ms: u64,
}

/// The meta record as format 1 wrote it.
#[derive(Deserialize)]
struct MetaRecordV1 {
    created_at_ms: u64,
    updated_at_ms: u64,
    load_count: u64,
    version: u64,
    epoch: u64,
}

/// A pending message or a kept version: when it was written, and its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    /// Unix milliseconds.
    pub at_ms: u64,
    /// The payload or data.
    pub bytes: Vec<u8>,
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
    /// The uid that connected the holder's session, so that after a
    /// restart only that uid (or root) may resume it. `None` in records
    /// written before format 3.
    pub uid: Option<u32>,
}

/// The lease record as formats 1 and 2 wrote it.
#[derive(Deserialize)]
struct LeaseRecordV2 {
    session: SessionId,
    epoch: u64,
    since_ms: u64,
}

/// The database key of a profile.
pub fn encode_key(key: &ProfileKey) -> Vec<u8> {
    let store = key.store().as_bytes();
    let len = u16::try_from(store.len()).unwrap_or(u16::MAX);
    let mut out = Vec::with_capacity(2 + store.len() + key.key().len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(store.get(..usize::from(len)).unwrap_or(store));
    out.extend_from_slice(key.key().as_bytes());
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

/// The key of a profile's message or kept version `id`.
pub fn item_key(key: &ProfileKey, id: u64) -> Vec<u8> {
    let mut out = item_prefix(key);
    out.extend_from_slice(&id.to_be_bytes());
    out
}

/// The prefix shared by every item of a profile, and only by them.
pub fn item_prefix(key: &ProfileKey) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + key.store().len() + key.key().len() + 8);
    for part in [key.store().as_bytes(), key.key().as_bytes()] {
        let len = u16::try_from(part.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(part.get(..usize::from(len)).unwrap_or(part));
    }
    out
}

/// The id at the end of an item key.
pub fn item_id(item_key: &[u8]) -> Option<u64> {
    let (_, id) = item_key.split_last_chunk::<8>()?;
    Some(u64::from_be_bytes(*id))
}

/// The value of an item.
pub fn encode_item(at_ms: u64, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + bytes.len());
    out.push(ITEM_FORMAT);
    out.extend_from_slice(&at_ms.to_be_bytes());
    out.extend_from_slice(bytes);
    out
}

/// Decodes a value written by [`encode_item`].
pub fn decode_item(value: &[u8]) -> Result<Item, String> {
    let Some((&ITEM_FORMAT, rest)) = value.split_first() else {
        return Err("unknown item format".to_owned());
    };
    let (at, bytes) = rest
        .split_first_chunk::<8>()
        .ok_or_else(|| "truncated item".to_owned())?;
    Ok(Item {
        at_ms: u64::from_be_bytes(*at),
        bytes: bytes.to_vec(),
    })
}

/// The timestamp of an item, read without copying its bytes.
pub fn item_time(value: &[u8]) -> Option<u64> {
    let (&ITEM_FORMAT, rest) = value.split_first()? else {
        return None;
    };
    rest.first_chunk::<8>().map(|at| u64::from_be_bytes(*at))
}

/// Decodes a meta record of this or an earlier format.
pub fn decode_meta(bytes: &[u8]) -> Result<MetaRecord, String> {
    match bytes.split_first() {
        Some((1, rest)) => bincode::serde::decode_from_slice::<MetaRecordV1, _>(rest, DECODE)
            .map(|(old, _)| MetaRecord {
                created_at_ms: old.created_at_ms,
                updated_at_ms: old.updated_at_ms,
                load_count: old.load_count,
                version: old.version,
                epoch: old.epoch,
                ..MetaRecord::default()
            })
            .map_err(|err| err.to_string()),
        _ => decode(bytes),
    }
}

impl MetaRecord {
    /// Whether the profile exists: it was loaded, saved or sent a message
    /// since it was created or last wiped. A wiped profile keeps its
    /// counters but does not exist.
    pub fn exists(&self) -> bool {
        self.created_at_ms != 0
    }
}

/// Decodes a lease record of any format this build knows.
pub fn decode_lease(bytes: &[u8]) -> Result<LeaseRecord, String> {
    match bytes.split_first() {
        Some((1 | 2, rest)) => bincode::serde::decode_from_slice::<LeaseRecordV2, _>(rest, DECODE)
            .map(|(old, _)| LeaseRecord {
                session: old.session,
                epoch: old.epoch,
                since_ms: old.since_ms,
                uid: None,
            })
            .map_err(|err| err.to_string()),
        Some((&LEASE_FORMAT, rest)) => bincode::serde::decode_from_slice(rest, DECODE)
            .map(|(lease, _)| lease)
            .map_err(|err| err.to_string()),
        Some((format, _)) => Err(format!("unknown lease record format {format}")),
        None => Err("empty record".to_owned()),
    }
}

/// Encodes a lease record with its format byte.
pub fn encode_lease(lease: &LeaseRecord) -> Vec<u8> {
    encode_as(LEASE_FORMAT, lease)
}

/// Encodes a record with its format byte.
pub fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    encode_as(FORMAT, record)
}

fn encode_as<T: Serialize>(format: u8, record: &T) -> Vec<u8> {
    // Room for a typical meta or lease record, which bincode writes a few
    // bytes at a time: growing from one byte reallocated four or five
    // times per record, 2% of the daemon's CPU in fsync sessions.
    let mut out = Vec::with_capacity(ENCODE_CAPACITY);
    out.push(format);
    // Encoding plain structs into a Vec cannot fail.
    if let Err(err) = bincode::serde::encode_into_std_write(record, &mut out, CONFIG) {
        unreachable!("encoding a record into memory failed: {err}");
    }
    out
}

/// Decodes a record written by [`encode`]. Format 1 records other than
/// meta records have the same layout as this format's.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    match bytes.split_first() {
        Some((1 | 2, rest)) => bincode::serde::decode_from_slice(rest, DECODE)
            .map(|(record, _)| record)
            .map_err(|err| err.to_string()),
        Some((format, _)) => Err(format!("unknown record format {format}")),
        None => Err("empty record".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A damaged length must not become an allocation: one near
    /// `usize::MAX` panicked ("capacity overflow") on the committer thread.
    #[test]
    fn a_record_with_a_damaged_length_is_an_error() {
        // Format 2, then a lease record: place id 0, and a job id whose
        // length is u64::MAX (a varint: 0xfd and eight bytes).
        let mut bytes = vec![2, 0, 0xfd];
        bytes.extend_from_slice(&[0xff; 8]);
        assert!(decode_lease(&bytes).is_err());
        // A length just past the limit, which would otherwise allocate
        // over a gigabyte before finding the record too short.
        let mut bytes = vec![2, 0, 0xfd];
        bytes.extend_from_slice(&(RECORD_LIMIT as u64 + 1).to_le_bytes());
        assert!(decode::<LeaseRecord>(&bytes).is_err());
    }

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
            meta_tags: BTreeMap::from([("tag".to_owned(), vec![1, 2])]),
            user_ids: vec![7],
            last_message_id: 6,
            pending_messages: 2,
            kept_version: 3,
            kept_at_ms: 9,
        };
        assert_eq!(decode_meta(&encode(&meta)), Ok(meta));
        assert!(decode::<MetaRecord>(&[9, 0]).is_err());
        assert!(decode::<MetaRecord>(&[]).is_err());
    }

    #[test]
    fn lease_records_keep_their_uid_and_older_formats_are_still_read() {
        let lease = LeaseRecord {
            session: SessionId {
                place_id: 1,
                job_id: "job".to_owned(),
            },
            epoch: 7,
            since_ms: 9,
            uid: Some(1000),
        };
        assert_eq!(decode_lease(&encode_lease(&lease)), Ok(lease.clone()));
        assert_eq!(encode_lease(&lease)[0], 3);
        // Format 2 had no uid: such a lease may be resumed by any allowed
        // uid, as before.
        #[derive(Serialize)]
        struct V2(SessionId, u64, u64);
        let mut bytes = vec![2];
        bincode::serde::encode_into_std_write(V2(lease.session.clone(), 7, 9), &mut bytes, CONFIG)
            .expect("encode");
        assert_eq!(decode_lease(&bytes), Ok(LeaseRecord { uid: None, ..lease }));
        // Meta records stay at format 2, which earlier builds read.
        let meta = MetaRecord {
            epoch: 3,
            ..MetaRecord::default()
        };
        assert_eq!(encode(&meta)[0], 2);
        assert_eq!(decode_meta(&encode(&meta)), Ok(meta));
    }

    #[test]
    fn format_one_meta_records_are_still_read() {
        #[derive(Serialize)]
        struct V1(u64, u64, u64, u64, u64);
        let mut bytes = vec![1];
        bincode::serde::encode_into_std_write(V1(1, 2, 3, 4, 5), &mut bytes, CONFIG)
            .expect("encode");
        let meta = decode_meta(&bytes).expect("decode");
        assert_eq!(
            (meta.created_at_ms, meta.version, meta.epoch),
            (1, 4, 5),
            "{meta:?}"
        );
        assert!(meta.meta_tags.is_empty());
    }

    #[test]
    fn item_keys_of_one_profile_share_a_prefix_no_other_profile_has() {
        let a = ProfileKey::new("s", "ab");
        let b = ProfileKey::new("s", "ab\0");
        let key = item_key(&a, 5);
        assert!(key.starts_with(&item_prefix(&a)));
        assert!(!item_key(&b, 5).starts_with(&item_prefix(&a)));
        assert!(!key.starts_with(&item_prefix(&b)));
        assert_eq!(item_id(&key), Some(5));
        assert!(item_key(&a, 5) < item_key(&a, 6));
        let value = encode_item(42, b"payload");
        assert_eq!(item_time(&value), Some(42));
        assert_eq!(
            decode_item(&value),
            Ok(Item {
                at_ms: 42,
                bytes: b"payload".to_vec()
            })
        );
        assert!(decode_item(&[2, 0]).is_err());
    }
}
