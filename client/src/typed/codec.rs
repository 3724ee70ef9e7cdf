//! How typed profile data becomes bytes and back: MessagePack with field
//! names, defaults for missing fields, kept unknown fields, and migrations.
//!
//! Stored data is a MessagePack map from field name to value (what
//! `rmp_serde::to_vec_named` writes), so it describes itself. Loading
//! decodes it to a [`Value`], runs the migrations it has not had yet, lays
//! it over the encoding of `T::default()` (so a field missing from the
//! stored data takes its default: ProfileService's Reconcile), and then
//! decodes `T` from that. The stored top-level fields that `T` does not
//! know (neither its default nor the loaded value encodes them) are kept as
//! the profile's *base*.
//!
//! Saving encodes `T` to a map and lays it over the base: every field `T`
//! knows is written as `T` encodes it now, and every top-level field it
//! does not know is kept as it was. An older server in a rolling deploy
//! therefore never erases a field a newer server added, and a field `T`
//! knows but leaves out (`skip_serializing_if`, or an entry removed from a
//! `flatten`ed map) stays out. The merge is deliberately shallow: inside a
//! field `T` knows, `T`'s value is the truth, so an entry removed from a
//! map field stays removed.
//!
//! Rename a field with a [`Migration`], not with `#[serde(alias)]`: the
//! defaults would add the new name beside the stored old one, and serde's
//! derived deserializer refuses the pair as a duplicate field.

use rmpv::Value;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::Migration;
use crate::ClientError;

/// The meta tag that records which schema version (how many migrations)
/// the stored data has had, as a decimal number.
///
/// ```no_run
/// use profiled_client::typed::SCHEMA_TAG;
///
/// # async fn run(client: profiled_client::Client) -> Result<(), profiled_client::ClientError> {
/// // Which schema a stored profile has, read without taking its lease.
/// let view = client.view("PlayerData", "Player_2261", None).await?;
/// let schema = view.meta.meta_tags.get(SCHEMA_TAG).map(|tag| String::from_utf8_lossy(tag).into_owned());
/// println!("schema {}", schema.as_deref().unwrap_or("0"));
/// # Ok(()) }
/// ```
pub const SCHEMA_TAG: &str = "profiled.schema";

/// One step that upgrades stored data by one schema version.
pub type MigrationFn = dyn Fn(Value) -> Result<Value, String> + Send + Sync;

/// Encodes `data` laid over `base`, the unknown fields. Returns the base
/// for the next save (the same unknown fields: what `T` knows is always
/// written afresh) and the bytes.
pub fn encode<T: Serialize>(data: &T, base: &Value) -> Result<(Value, Vec<u8>), ClientError> {
    let fresh = to_value(data)?;
    let merged = merge(base.clone(), fresh);
    let mut bytes = Vec::new();
    rmpv::encode::write_value(&mut bytes, &merged)
        .map_err(|err| ClientError::Encode(err.to_string()))?;
    Ok((base.clone(), bytes))
}

/// Decodes stored bytes (`None` for a new profile) written at schema
/// version `stored_schema`, running the migrations it lacks. Returns the
/// data and the base to merge the next save over.
pub fn decode<T: Serialize + DeserializeOwned + Default>(
    bytes: Option<&[u8]>,
    stored_schema: u32,
    migrations: &[Migration],
) -> Result<(T, Value), ClientError> {
    let supported = u32::try_from(migrations.len()).unwrap_or(u32::MAX);
    let defaults = to_value(&T::default())?;
    let Some(bytes) = bytes else {
        let data = from_value(&defaults)?;
        return Ok((data, Value::Map(Vec::new())));
    };
    if stored_schema > supported {
        return Err(ClientError::SchemaTooNew {
            stored: stored_schema,
            supported,
        });
    }
    let mut value = rmpv::decode::read_value(&mut &bytes[..])
        .map_err(|err| ClientError::Decode(format!("stored data is not MessagePack: {err}")))?;
    let pending = migrations
        .iter()
        .enumerate()
        .skip(usize::try_from(stored_schema).unwrap_or(usize::MAX));
    for (step, migration) in pending {
        value = (migration.0)(value).map_err(|message| {
            ClientError::Decode(format!("migration {} failed: {message}", step + 1))
        })?;
    }
    // Missing fields take their defaults; stored ones win.
    let known_by_default = keys(&defaults);
    let merged = merge(defaults, value);
    let data = from_value(&merged)?;
    let known_now = keys(&to_value(&data)?);
    let unknown = match merged {
        Value::Map(entries) => Value::Map(
            entries
                .into_iter()
                .filter(|(key, _)| !known_by_default.contains(key) && !known_now.contains(key))
                .collect(),
        ),
        _ => Value::Map(Vec::new()),
    };
    Ok((data, unknown))
}

/// The keys of a map, or none.
fn keys(value: &Value) -> Vec<Value> {
    match value {
        Value::Map(entries) => entries.iter().map(|(key, _)| key.clone()).collect(),
        _ => Vec::new(),
    }
}

/// Reads the schema version from a profile's meta tags; 0 if untagged.
pub fn schema_of(tags: &std::collections::BTreeMap<String, Vec<u8>>) -> Result<u32, ClientError> {
    let Some(tag) = tags.get(SCHEMA_TAG) else {
        return Ok(0);
    };
    std::str::from_utf8(tag)
        .ok()
        .and_then(|text| text.parse().ok())
        .ok_or_else(|| ClientError::Decode(format!("the {SCHEMA_TAG} meta tag is not a number")))
}

/// Lays `over` on `base`: for two maps, `over`'s entries replace `base`'s
/// and `base`'s other entries stay; otherwise `over` wins.
fn merge(base: Value, over: Value) -> Value {
    match (base, over) {
        (Value::Map(mut entries), Value::Map(fresh)) => {
            for (key, value) in fresh {
                match entries.iter_mut().find(|(k, _)| *k == key) {
                    Some(slot) => slot.1 = value,
                    None => entries.push((key, value)),
                }
            }
            Value::Map(entries)
        }
        (_, over) => over,
    }
}

fn to_value<T: Serialize>(data: &T) -> Result<Value, ClientError> {
    let bytes =
        rmp_serde::to_vec_named(data).map_err(|err| ClientError::Encode(err.to_string()))?;
    rmpv::decode::read_value(&mut &bytes[..]).map_err(|err| ClientError::Encode(err.to_string()))
}

fn from_value<T: DeserializeOwned>(value: &Value) -> Result<T, ClientError> {
    let mut bytes = Vec::new();
    rmpv::encode::write_value(&mut bytes, value)
        .map_err(|err| ClientError::Decode(err.to_string()))?;
    rmp_serde::from_slice(&bytes).map_err(|err| ClientError::Decode(err.to_string()))
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
    struct V1 {
        coins: u64,
        name: String,
    }

    #[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
    struct V2 {
        coins: u64,
        name: String,
        gems: u32,
    }

    #[test]
    fn a_new_profile_is_the_default() {
        let (data, _) = decode::<V1>(None, 0, &[]).expect("decode");
        assert_eq!(data, V1::default());
    }

    #[test]
    fn missing_fields_take_their_defaults() {
        let (_, bytes) = encode(
            &V1 {
                coins: 5,
                name: "a".into(),
            },
            &Value::Nil,
        )
        .expect("encode");
        let (data, _) = decode::<V2>(Some(&bytes), 0, &[]).expect("decode");
        assert_eq!(
            data,
            V2 {
                coins: 5,
                name: "a".into(),
                gems: 0
            }
        );
    }

    #[test]
    fn unknown_fields_survive_a_round_trip_through_an_older_type() {
        let (_, newer) = encode(
            &V2 {
                coins: 1,
                name: "n".into(),
                gems: 9,
            },
            &Value::Nil,
        )
        .expect("encode");
        let (mut old, base) = decode::<V1>(Some(&newer), 0, &[]).expect("decode as V1");
        old.coins = 2;
        let (_, saved) = encode(&old, &base).expect("encode as V1");
        let (data, _) = decode::<V2>(Some(&saved), 0, &[]).expect("decode as V2");
        assert_eq!(
            data,
            V2 {
                coins: 2,
                name: "n".into(),
                gems: 9
            }
        );
    }

    #[test]
    fn migrations_run_from_the_stored_version_and_newer_schemas_are_refused() {
        let rename = Migration::new(|value| {
            let Value::Map(entries) = value else {
                return Err("not a map".into());
            };
            Ok(Value::Map(
                entries
                    .into_iter()
                    .map(|(k, v)| match k.as_str() {
                        Some("gold") => (Value::from("coins"), v),
                        _ => (k, v),
                    })
                    .collect(),
            ))
        });
        let stored = Value::Map(vec![(Value::from("gold"), Value::from(7))]);
        let mut bytes = Vec::new();
        rmpv::encode::write_value(&mut bytes, &stored).expect("write");
        let migrations = [rename];
        let (data, _) = decode::<V1>(Some(&bytes), 0, &migrations).expect("migrate");
        assert_eq!(data.coins, 7);
        // Already at version 1: the migration does not run again.
        let (data, _) = decode::<V1>(Some(&bytes), 1, &migrations).expect("no migration");
        assert_eq!(data.coins, 0);
        let err = decode::<V1>(Some(&bytes), 2, &migrations).expect_err("newer schema");
        assert!(
            matches!(
                err,
                ClientError::SchemaTooNew {
                    stored: 2,
                    supported: 1
                }
            ),
            "{err}"
        );
    }

    /// A field the type knows but leaves out when empty stays out once
    /// the game empties it; only fields the type does not know are kept.
    #[test]
    fn a_field_skipped_when_empty_is_cleared_by_a_save() {
        #[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
        struct Trading {
            coins: u64,
            #[serde(skip_serializing_if = "Option::is_none")]
            pending_trade: Option<u32>,
        }
        let stored = Value::Map(vec![
            (Value::from("coins"), Value::from(1)),
            (Value::from("pending_trade"), Value::from(5)),
            (Value::from("from_a_newer_server"), Value::from(true)),
        ]);
        let mut bytes = Vec::new();
        rmpv::encode::write_value(&mut bytes, &stored).expect("write");
        let (mut data, base) = decode::<Trading>(Some(&bytes), 0, &[]).expect("decode");
        assert_eq!(data.pending_trade, Some(5));
        data.pending_trade = None;
        let (base, saved) = encode(&data, &base).expect("encode");
        let (reloaded, _) = decode::<Trading>(Some(&saved), 0, &[]).expect("decode");
        assert_eq!(reloaded.pending_trade, None, "the trade does not come back");
        let saved = rmpv::decode::read_value(&mut &saved[..]).expect("read");
        assert!(
            keys(&saved).contains(&Value::from("from_a_newer_server")),
            "an unknown field is kept: {saved}"
        );
        // And a second save over the returned base keeps it cleared.
        let (_, again) = encode(&data, &base).expect("encode");
        let (reloaded, _) = decode::<Trading>(Some(&again), 0, &[]).expect("decode");
        assert_eq!(reloaded.pending_trade, None);
    }

    #[test]
    fn the_schema_tag_is_a_decimal_number() {
        let mut tags = std::collections::BTreeMap::new();
        assert_eq!(schema_of(&tags).expect("untagged"), 0);
        tags.insert(SCHEMA_TAG.to_owned(), b"12".to_vec());
        assert_eq!(schema_of(&tags).expect("tagged"), 12);
        tags.insert(SCHEMA_TAG.to_owned(), b"x".to_vec());
        assert!(schema_of(&tags).is_err());
    }
}
