//! Turning the daemon's answers into text for people and JSON for programs:
//! sizes, times, sessions, and profile data decoded as far as it goes.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::time::{Duration, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use profiled_client::{ActiveSession, Message, ProfileMeta};
use serde_json::{Map, Value, json};

/// Data up to this size that is not JSON, MessagePack or text is shown as
/// hex; larger data as base64, which is shorter.
const HEX_LIMIT: usize = 64;

/// Prints one JSON document, pretty, on stdout.
pub fn print_json(value: &Value) {
    // Serializing a `Value` cannot fail.
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    outln!("{text}");
}

/// Standard base64, the encoding of every byte string in JSON output and
/// export files.
pub fn base64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// Decodes standard base64.
pub fn unbase64(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    STANDARD.decode(text)
}

/// A size in binary units, like `12.3 MiB`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    // Precision loss is irrelevant at one decimal.
    #[allow(clippy::cast_precision_loss)]
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A duration to the second, like `1h 2m 3s`.
pub fn human_duration(ms: u64) -> String {
    humantime::format_duration(Duration::from_secs(ms / 1000)).to_string()
}

/// A Unix-milliseconds time as RFC 3339 in UTC, like
/// `2026-11-29T21:40:00.123Z`.
pub fn time(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// A time for text output, `never` for the zero the daemon uses for unset.
pub fn time_or_never(ms: u64) -> String {
    if ms == 0 {
        "never".to_owned()
    } else {
        time(ms)
    }
}

/// A lease holder in one line of text.
pub fn lease_text(lease: &ActiveSession) -> String {
    format!(
        "session {} (epoch {}, since {})",
        lease.session,
        lease.epoch,
        time(lease.since_ms)
    )
}

/// A lease holder as JSON.
pub fn lease_json(lease: &ActiveSession) -> Value {
    json!({
        "place_id": lease.session.place_id,
        "job_id": lease.session.job_id,
        "epoch": lease.epoch,
        "since_ms": lease.since_ms,
    })
}

/// How a byte string was understood.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// JSON text.
    Json,
    /// A MessagePack map or array, the game's typed layer's encoding.
    MessagePack,
    /// UTF-8 text that is neither of the above.
    Text,
    /// Other bytes, small enough to show as hex.
    Hex,
    /// Other bytes, shown as base64.
    Base64,
}

impl Format {
    /// The name shown in output.
    pub fn name(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::MessagePack => "messagepack",
            Self::Text => "text",
            Self::Hex => "hex",
            Self::Base64 => "base64",
        }
    }
}

/// Decodes profile data or a message payload for display: the format found
/// and the value (decoded JSON, or a string holding text, hex or base64).
pub fn decode(bytes: &[u8]) -> (Format, Value) {
    if let Ok(value) = serde_json::from_slice::<Value>(bytes) {
        return (Format::Json, value);
    }
    if let Some(value) = decode_messagepack(bytes) {
        return (Format::MessagePack, messagepack_to_json(&value));
    }
    if let Ok(text) = std::str::from_utf8(bytes)
        && text
            .chars()
            .all(|c| !c.is_control() || c.is_ascii_whitespace())
    {
        return (Format::Text, Value::String(text.to_owned()));
    }
    if bytes.len() <= HEX_LIMIT {
        (Format::Hex, Value::String(hex(bytes)))
    } else {
        (Format::Base64, Value::String(base64(bytes)))
    }
}

/// Decodes `bytes` as exactly one MessagePack map or array. Scalars are
/// not accepted: nearly any short byte string is some MessagePack scalar,
/// while the game's typed layer always writes a map or an array.
fn decode_messagepack(bytes: &[u8]) -> Option<rmpv::Value> {
    let mut reader = bytes;
    let value = rmpv::decode::read_value(&mut reader).ok()?;
    let mut rest = [0u8; 1];
    let complete = matches!(reader.read(&mut rest), Ok(0));
    (complete && (value.is_map() || value.is_array())).then_some(value)
}

/// Lowercase hex, two digits a byte.
fn hex(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(text, "{byte:02x}");
    }
    text
}

/// A MessagePack value as JSON. Byte strings and extension values become
/// base64; map keys that are not strings become their JSON text.
pub fn messagepack_to_json(value: &rmpv::Value) -> Value {
    use rmpv::Value as M;
    match value {
        M::Nil => Value::Null,
        M::Boolean(b) => Value::Bool(*b),
        M::Integer(int) => int
            .as_u64()
            .map(Value::from)
            .or_else(|| int.as_i64().map(Value::from))
            .unwrap_or(Value::Null),
        M::F32(f) => serde_json::Number::from_f64(f64::from(*f)).map_or(Value::Null, Value::Number),
        M::F64(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        M::String(s) => match s.as_str() {
            Some(text) => Value::String(text.to_owned()),
            None => Value::String(base64(s.as_bytes())),
        },
        M::Binary(bytes) => Value::String(base64(bytes)),
        M::Array(items) => Value::Array(items.iter().map(messagepack_to_json).collect()),
        M::Map(entries) => {
            let mut map = Map::new();
            for (key, value) in entries {
                let key = match key.as_str() {
                    Some(text) => text.to_owned(),
                    None => messagepack_to_json(key).to_string(),
                };
                map.insert(key, messagepack_to_json(value));
            }
            Value::Object(map)
        }
        M::Ext(kind, bytes) => json!({ "ext": kind, "data": base64(bytes) }),
    }
}

/// A JSON value encoded as MessagePack.
pub fn json_to_messagepack(value: &Value) -> Result<Vec<u8>, String> {
    let value = rmpv::ext::to_value(value).map_err(|err| err.to_string())?;
    let mut bytes = Vec::new();
    rmpv::encode::write_value(&mut bytes, &value).map_err(|err| err.to_string())?;
    Ok(bytes)
}

/// Profile data or a payload as JSON fields: `<prefix>_format`, `<prefix>`
/// (decoded) and `<prefix>_base64` (the exact bytes); all null for none.
pub fn bytes_fields(map: &mut Map<String, Value>, prefix: &str, bytes: Option<&[u8]>) {
    let (format, value, exact) = match bytes {
        Some(bytes) => {
            let (format, value) = decode(bytes);
            (
                Value::from(format.name()),
                value,
                Value::String(base64(bytes)),
            )
        }
        None => (Value::Null, Value::Null, Value::Null),
    };
    map.insert(format!("{prefix}_format"), format);
    map.insert(prefix.to_owned(), value);
    map.insert(format!("{prefix}_base64"), exact);
}

/// Profile data or a payload for text output: its format, then its value,
/// pretty-printed for JSON.
pub fn bytes_text(bytes: &[u8]) -> (Format, String) {
    let (format, value) = decode(bytes);
    let text = match (&format, value) {
        (Format::Json | Format::MessagePack, value) => {
            serde_json::to_string_pretty(&value).unwrap_or_default()
        }
        (_, Value::String(text)) => text,
        (_, other) => other.to_string(),
    };
    (format, text)
}

/// A profile's metadata as JSON.
pub fn meta_json(meta: &ProfileMeta) -> Value {
    let tags: Map<String, Value> = meta
        .meta_tags
        .iter()
        .map(|(name, value)| (name.clone(), Value::String(base64(value))))
        .collect();
    json!({
        "created_at_ms": meta.created_at_ms,
        "updated_at_ms": meta.updated_at_ms,
        "load_count": meta.load_count,
        "version": meta.version,
        "active": meta.active.as_ref().map(lease_json),
        "meta_tags": tags,
        "user_ids": meta.user_ids,
    })
}

/// A pending message as JSON.
pub fn message_json(message: &Message) -> Value {
    let mut map = Map::new();
    map.insert("id".into(), message.id.into());
    map.insert("sent_at_ms".into(), message.sent_at_ms.into());
    bytes_fields(&mut map, "payload", Some(&message.payload));
    Value::Object(map)
}

/// Indents every line of `text` by `by` spaces.
pub fn indent(text: &str, by: usize) -> String {
    let pad = " ".repeat(by);
    text.lines()
        .map(|line| format!("{pad}{line}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Writes raw bytes to stdout.
pub fn write_raw(bytes: &[u8]) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(bytes)?;
    stdout.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_messagepack_decode_to_json() {
        assert_eq!(
            decode(br#"{"gold": 5}"#),
            (Format::Json, json!({ "gold": 5 }))
        );
        let packed =
            json_to_messagepack(&json!({ "gold": 5, "items": ["sword"] })).expect("encode");
        assert_eq!(
            decode(&packed),
            (
                Format::MessagePack,
                json!({ "gold": 5, "items": ["sword"] })
            )
        );
    }

    #[test]
    fn other_bytes_are_text_hex_or_base64() {
        assert_eq!(decode(b"+1 gold").0, Format::Text);
        assert_eq!(decode(&[0, 1, 0xff]), (Format::Hex, json!("0001ff")));
        assert_eq!(decode(&[0u8; 100]).0, Format::Base64);
    }

    #[test]
    fn messagepack_binary_becomes_base64() {
        let value = rmpv::Value::Map(vec![(
            rmpv::Value::from("blob"),
            rmpv::Value::Binary(vec![1, 2, 3]),
        )]);
        assert_eq!(messagepack_to_json(&value), json!({ "blob": "AQID" }));
    }

    #[test]
    fn sizes_and_times_read_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024), "5.0 MiB");
        assert_eq!(human_duration(3_723_500), "1h 2m 3s");
        assert_eq!(time(1500), "1970-01-01T00:00:01.500Z");
    }
}
