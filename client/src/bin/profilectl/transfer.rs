//! The bulk subcommands: `backup`, `export` and `import`. They can run for
//! a while, so they show a spinner on stderr; indicatif hides it when
//! stderr is not a terminal.

use std::collections::BTreeMap;
use std::io::{BufRead, BufWriter, Write};
use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use profiled_client::{Client, ExportedProfile};
use serde_json::{Map, Value, json};

use crate::output::{self, print_json};
use crate::{Failure, Outcome, exit};

/// Profiles asked for in one export request.
const EXPORT_PAGE: u32 = 256;

/// How often the spinner redraws.
const TICK: Duration = Duration::from_millis(100);

/// A spinner on stderr showing `message`.
fn spinner(message: impl Into<String>) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
        bar.set_style(style);
    }
    bar.set_message(message.into());
    bar.enable_steady_tick(TICK);
    bar
}

/// `backup`.
pub async fn backup(client: &Client, dir: &Path, json: bool) -> Outcome {
    // The daemon resolves paths against its own working directory, which is
    // not this command's; send what the operator meant.
    let dir = std::path::absolute(dir).map_err(|err| {
        Failure::new(
            exit::USAGE,
            format!("cannot resolve {}: {err}", dir.display()),
        )
    })?;
    let text = dir.to_str().ok_or_else(|| {
        Failure::new(
            exit::USAGE,
            format!("the backup path {} is not valid utf-8", dir.display()),
        )
    })?;
    let bar = spinner(format!("backing up to {text}"));
    let result = client.backup(text).await;
    bar.finish_and_clear();
    let bytes =
        result.map_err(|err| Failure::request(&format!("backup to {text} failed"), &err))?;
    if json {
        print_json(&json!({ "path": text, "bytes": bytes }));
    } else {
        outln!("backed up to {text}: {}", output::human_bytes(bytes));
    }
    Ok(())
}

/// `export`: every profile of `store`, one JSON object a line on stdout.
pub async fn export(client: &Client, store: &str) -> Outcome {
    let bar = spinner(format!("exporting {store}"));
    let mut out = BufWriter::new(std::io::stdout().lock());
    let mut after = None;
    let mut count: u64 = 0;
    let result = loop {
        let page = match client.export_page(store, after.take(), EXPORT_PAGE).await {
            Ok(page) => page,
            Err(err) => {
                break Err(Failure::request(
                    &format!("exporting {store} failed after {}", profiles(count)),
                    &err,
                ));
            }
        };
        let mut written = Ok(());
        for profile in &page.profiles {
            written = writeln!(out, "{}", export_line(store, profile));
            if written.is_err() {
                break;
            }
            count += 1;
        }
        if let Err(err) = written.and_then(|()| out.flush()) {
            crate::stdout_failed(&err);
        }
        bar.set_message(format!("exporting {store}: {}", profiles(count)));
        match page.next {
            Some(next) => after = Some(next),
            None => break Ok(()),
        }
    };
    bar.finish_and_clear();
    result?;
    eprintln!("exported {} from {store}", profiles(count));
    Ok(())
}

/// "1 profile", "2 profiles".
fn profiles(count: u64) -> String {
    if count == 1 {
        "1 profile".to_owned()
    } else {
        format!("{count} profiles")
    }
}

/// One export line.
fn export_line(store: &str, profile: &ExportedProfile) -> Value {
    let tags: Map<String, Value> = profile
        .meta_tags
        .iter()
        .map(|(name, value)| (name.clone(), Value::String(output::base64(value))))
        .collect();
    json!({
        "store": store,
        "key": profile.key,
        "version": profile.version,
        "updated_at_ms": profile.updated_at_ms,
        "data": profile.data.as_deref().map(output::base64),
        "meta_tags": tags,
        "user_ids": profile.user_ids,
    })
}

/// Reads one export line back. `store` and `version` are optional, since
/// the target store is the command's and the daemon assigns a version.
fn parse_line(line: &str) -> Result<ExportedProfile, String> {
    let value: Value = serde_json::from_str(line).map_err(|err| format!("not json: {err}"))?;
    let object = value.as_object().ok_or("not a json object")?;
    let key = object
        .get("key")
        .and_then(Value::as_str)
        .ok_or("\"key\" is missing or not a string")?
        .to_owned();
    let number = |name: &str| -> Result<u64, String> {
        match object.get(name) {
            None | Some(Value::Null) => Ok(0),
            Some(value) => value
                .as_u64()
                .ok_or_else(|| format!("\"{name}\" is not a non-negative integer")),
        }
    };
    let version = number("version")?;
    let updated_at_ms = number("updated_at_ms")?;
    let data = match object.get("data") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => Some(
            output::unbase64(text).map_err(|err| format!("\"data\" is not valid base64: {err}"))?,
        ),
        Some(_) => return Err("\"data\" is not a base64 string or null".to_owned()),
    };
    let mut meta_tags = BTreeMap::new();
    match object.get("meta_tags") {
        None | Some(Value::Null) => {}
        Some(Value::Object(tags)) => {
            for (name, value) in tags {
                let text = value
                    .as_str()
                    .ok_or_else(|| format!("meta tag \"{name}\" is not a base64 string"))?;
                let bytes = output::unbase64(text)
                    .map_err(|err| format!("meta tag \"{name}\" is not valid base64: {err}"))?;
                meta_tags.insert(name.clone(), bytes);
            }
        }
        Some(_) => return Err("\"meta_tags\" is not an object".to_owned()),
    }
    let user_ids = match object.get("user_ids") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(ids)) => ids
            .iter()
            .map(|id| id.as_u64().ok_or("\"user_ids\" holds a non-integer"))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err("\"user_ids\" is not an array".to_owned()),
    };
    Ok(ExportedProfile {
        key,
        version,
        updated_at_ms,
        data,
        meta_tags,
        user_ids,
    })
}

/// `import`: export lines from stdin into `store`. Stops at the first
/// malformed line or refused profile.
pub async fn import(client: &Client, store: &str, json: bool) -> Outcome {
    let bar = spinner(format!("importing into {store}"));
    let stdin = std::io::stdin().lock();
    let mut count: u64 = 0;
    let mut failure = None;
    for (index, line) in stdin.lines().enumerate() {
        let number = index + 1;
        let line = match line {
            Ok(line) => line,
            Err(err) => {
                failure = Some(Failure::new(
                    exit::DATA,
                    format!("line {number}: cannot read: {err}"),
                ));
                break;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let profile = match parse_line(&line) {
            Ok(profile) => profile,
            Err(reason) => {
                failure = Some(Failure::new(exit::DATA, format!("line {number}: {reason}")));
                break;
            }
        };
        let key = profile.key.clone();
        if let Err(err) = client.import(store, profile).await {
            failure = Some(Failure::request(
                &format!("line {number}: importing {store}/{key} failed"),
                &err,
            ));
            break;
        }
        count += 1;
        bar.set_message(format!("importing into {store}: {}", profiles(count)));
    }
    bar.finish_and_clear();
    if let Some(failure) = failure {
        eprintln!(
            "imported {} into {store} before the failure",
            profiles(count)
        );
        return Err(failure);
    }
    if json {
        print_json(&json!({ "store": store, "imported": count }));
    } else {
        eprintln!("imported {} into {store}", profiles(count));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_lines_read_back() {
        let profile = ExportedProfile {
            key: "Player_1".into(),
            version: 3,
            updated_at_ms: 1_700_000_000_000,
            data: Some(vec![0, 1, 2, 255]),
            meta_tags: BTreeMap::from([("level".to_owned(), b"7".to_vec())]),
            user_ids: vec![42, 43],
        };
        let line = export_line("PlayerData", &profile).to_string();
        assert_eq!(parse_line(&line), Ok(profile));
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        assert!(parse_line("{").expect_err("bad").starts_with("not json"));
        assert!(parse_line("[]").expect_err("bad").contains("object"));
        assert!(
            parse_line(r#"{"key": 1}"#)
                .expect_err("bad")
                .contains("key")
        );
        assert!(
            parse_line(r#"{"key": "k", "data": "%%"}"#)
                .expect_err("bad")
                .contains("base64")
        );
    }
}
