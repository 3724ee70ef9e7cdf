//! The subcommands that make one or a few requests and print the answer:
//! everything but the bulk transfers in [`crate::transfer`].

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use profiled_client::{Client, ErrorCode, OverwriteSource, VersionQuery};
use serde_json::{Map, Value, json};

use crate::args::{Payload, ProfileAddr};
use crate::output::{self, print_json};
use crate::{Failure, Outcome, exit};

/// How often `release` looks whether the holder has let go.
const RELEASE_POLL: Duration = Duration::from_millis(100);

/// `status`.
pub async fn status(client: &Client, json: bool) -> Outcome {
    let status = client
        .status()
        .await
        .map_err(|err| Failure::request("status failed", &err))?;
    if json {
        print_json(&json!({
            "daemon_version": status.daemon_version,
            "uptime_ms": status.uptime_ms,
            "connections": status.connections,
            "sessions": status.sessions,
            "leases_held": status.leases_held,
            "queued_loads": status.queued_loads,
            "storage_bytes": status.storage_bytes,
        }));
    } else {
        outln!("daemon version  {}", status.daemon_version);
        outln!(
            "uptime          {}",
            output::human_duration(status.uptime_ms)
        );
        outln!("connections     {}", status.connections);
        outln!("sessions        {}", status.sessions);
        outln!("leases held     {}", status.leases_held);
        outln!("queued loads    {}", status.queued_loads);
        outln!(
            "storage         {}",
            output::human_bytes(status.storage_bytes)
        );
    }
    Ok(())
}

/// `sessions`.
pub async fn sessions(client: &Client, json: bool) -> Outcome {
    let mut sessions = client
        .sessions()
        .await
        .map_err(|err| Failure::request("listing sessions failed", &err))?;
    sessions.sort_by(|a, b| a.session.cmp(&b.session));
    if json {
        let list: Vec<Value> = sessions
            .iter()
            .map(|info| {
                let leases: Vec<Value> = info
                    .leases
                    .iter()
                    .map(|lease| json!({ "store": lease.store, "key": lease.key, "epoch": lease.epoch }))
                    .collect();
                json!({
                    "place_id": info.session.place_id,
                    "job_id": info.session.job_id,
                    "connection_id": info.connection_id,
                    "leases": leases,
                })
            })
            .collect();
        print_json(&Value::Array(list));
        return Ok(());
    }
    if sessions.is_empty() {
        outln!("no sessions");
    }
    for info in &sessions {
        let link = match info.connection_id {
            Some(id) => format!("connection {id}"),
            None => "disconnected, within its resume grace".to_owned(),
        };
        let count = info.leases.len();
        let plural = if count == 1 { "" } else { "s" };
        outln!("{}  {link}  {count} lease{plural}", info.session);
        for lease in &info.leases {
            outln!("  {}/{}  epoch {}", lease.store, lease.key, lease.epoch);
        }
    }
    Ok(())
}

/// `view`.
pub async fn view(
    client: &Client,
    profile: &ProfileAddr,
    version: Option<u64>,
    raw: bool,
    json: bool,
) -> Outcome {
    let view = client
        .view(&profile.store, &profile.key, version)
        .await
        .map_err(|err| Failure::request(&describe("viewing", profile), &err))?;
    if raw {
        return match &view.data {
            Some(data) => {
                if let Err(err) = output::write_raw(data) {
                    crate::stdout_failed(&err);
                }
                Ok(())
            }
            None => {
                eprintln!("profilectl: {}/{} has no data", profile.store, profile.key);
                Ok(())
            }
        };
    }
    if json {
        let mut map = Map::new();
        map.insert("store".into(), profile.store.clone().into());
        map.insert("key".into(), profile.key.clone().into());
        map.insert("version".into(), view.version.into());
        map.insert("saved_at_ms".into(), view.saved_at_ms.into());
        output::bytes_fields(&mut map, "data", view.data.as_deref());
        map.insert("meta".into(), output::meta_json(&view.meta));
        let messages: Vec<Value> = view.messages.iter().map(output::message_json).collect();
        map.insert("messages".into(), Value::Array(messages));
        print_json(&Value::Object(map));
        return Ok(());
    }
    let meta = &view.meta;
    let mut text = String::new();
    let _ = writeln!(text, "profile       {}/{}", profile.store, profile.key);
    let latest = if view.version == meta.version {
        " (current)".to_owned()
    } else {
        format!(" (current is {})", meta.version)
    };
    let _ = writeln!(text, "version       {}{latest}", view.version);
    let _ = writeln!(
        text,
        "saved at      {}",
        output::time_or_never(view.saved_at_ms)
    );
    let _ = writeln!(
        text,
        "created at    {}",
        output::time_or_never(meta.created_at_ms)
    );
    let _ = writeln!(
        text,
        "updated at    {}",
        output::time_or_never(meta.updated_at_ms)
    );
    let _ = writeln!(text, "loads         {}", meta.load_count);
    let holder = meta
        .active
        .as_ref()
        .map_or_else(|| "nobody".to_owned(), output::lease_text);
    let _ = writeln!(text, "held by       {holder}");
    if meta.user_ids.is_empty() {
        let _ = writeln!(text, "user ids      none");
    } else {
        let ids: Vec<String> = meta.user_ids.iter().map(u64::to_string).collect();
        let _ = writeln!(text, "user ids      {}", ids.join(", "));
    }
    if meta.meta_tags.is_empty() {
        let _ = writeln!(text, "meta tags     none");
    } else {
        let _ = writeln!(text, "meta tags");
        for (name, value) in &meta.meta_tags {
            let (format, shown) = output::bytes_text(value);
            let shown = shown.replace('\n', " ");
            let _ = writeln!(text, "  {name} ({}): {shown}", format.name());
        }
    }
    let _ = writeln!(text, "messages      {} pending", view.messages.len());
    for message in &view.messages {
        let (format, shown) = output::bytes_text(&message.payload);
        let _ = writeln!(
            text,
            "  #{} sent {} ({}):\n{}",
            message.id,
            output::time(message.sent_at_ms),
            format.name(),
            output::indent(&shown, 4)
        );
    }
    match &view.data {
        Some(data) => {
            let (format, shown) = output::bytes_text(data);
            let _ = writeln!(
                text,
                "data          {} bytes, {}",
                data.len(),
                format.name()
            );
            let _ = writeln!(text, "{shown}");
        }
        None => {
            let _ = writeln!(text, "data          none (never saved)");
        }
    }
    out!("{text}");
    Ok(())
}

/// `versions`.
pub async fn versions(
    client: &Client,
    profile: &ProfileAddr,
    query: VersionQuery,
    json: bool,
) -> Outcome {
    let versions = client
        .list_versions(&profile.store, &profile.key, query)
        .await
        .map_err(|err| Failure::request(&describe("listing versions of", profile), &err))?;
    if json {
        let list: Vec<Value> = versions
            .iter()
            .map(|v| json!({ "version": v.version, "saved_at_ms": v.saved_at_ms, "size": v.size }))
            .collect();
        print_json(&Value::Array(list));
        return Ok(());
    }
    if versions.is_empty() {
        outln!("no kept versions match");
        return Ok(());
    }
    outln!("{:>8}  {:<24}  {:>10}", "VERSION", "SAVED AT", "SIZE");
    for v in &versions {
        outln!(
            "{:>8}  {:<24}  {:>10}",
            v.version,
            output::time(v.saved_at_ms),
            output::human_bytes(v.size)
        );
    }
    Ok(())
}

/// `rollback`.
pub async fn rollback(client: &Client, profile: &ProfileAddr, to: u64, json: bool) -> Outcome {
    let version = client
        .overwrite(&profile.store, &profile.key, OverwriteSource::Version(to))
        .await
        .map_err(|err| Failure::request(&describe("rolling back", profile), &err))?;
    if json {
        print_json(&json!({
            "store": profile.store,
            "key": profile.key,
            "restored": to,
            "version": version,
        }));
    } else {
        outln!(
            "rolled {}/{} back to version {to}; it is now version {version}",
            profile.store,
            profile.key
        );
    }
    Ok(())
}

/// Asks for a wipe's confirmation on the terminal, unless `yes`. Refuses
/// without a terminal, so a script cannot wipe by accident.
pub fn confirm_wipe(profile: &ProfileAddr, yes: bool) -> Outcome {
    if yes {
        return Ok(());
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(Failure::new(
            exit::USAGE,
            "refusing to wipe without confirmation: stdin is not a terminal (pass --yes)",
        ));
    }
    eprint!(
        "this erases {}/{} for good: data, metadata, versions and messages\n\
         type the key to confirm: ",
        profile.store, profile.key
    );
    let mut answer = String::new();
    stdin
        .read_line(&mut answer)
        .map_err(|err| Failure::new(exit::USAGE, format!("cannot read the confirmation: {err}")))?;
    if answer.trim_end_matches(['\r', '\n']) == profile.key {
        Ok(())
    } else {
        Err(Failure::new(
            exit::USAGE,
            "the confirmation did not match the key; nothing was wiped",
        ))
    }
}

/// `wipe`, once confirmed.
pub async fn wipe(client: &Client, profile: &ProfileAddr, json: bool) -> Outcome {
    client
        .wipe(&profile.store, &profile.key)
        .await
        .map_err(|err| Failure::request(&describe("wiping", profile), &err))?;
    if json {
        print_json(&json!({ "store": profile.store, "key": profile.key, "wiped": true }));
    } else {
        outln!("wiped {}/{}", profile.store, profile.key);
    }
    Ok(())
}

/// The bytes `send` sends, checked before connecting so a bad payload
/// needs no daemon.
pub fn payload_bytes(payload: &Payload) -> Result<Vec<u8>, Failure> {
    if let Some(text) = &payload.json {
        let value: Value = serde_json::from_str(text)
            .map_err(|err| Failure::new(exit::USAGE, format!("--json is not valid json: {err}")))?;
        output::json_to_messagepack(&value)
            .map_err(|err| Failure::new(exit::USAGE, format!("cannot encode --json: {err}")))
    } else if let Some(text) = &payload.raw {
        Ok(text.as_bytes().to_vec())
    } else if let Some(text) = &payload.base64 {
        output::unbase64(text.trim()).map_err(|err| {
            Failure::new(exit::USAGE, format!("--base64 is not valid base64: {err}"))
        })
    } else {
        // clap requires one of the three.
        Err(Failure::new(exit::USAGE, "no payload given"))
    }
}

/// `send`, with the payload from [`payload_bytes`].
pub async fn send(client: &Client, profile: &ProfileAddr, bytes: Vec<u8>, json: bool) -> Outcome {
    let id = client
        .send_message(&profile.store, &profile.key, bytes)
        .await
        .map_err(|err| Failure::request(&describe("sending to", profile), &err))?;
    if json {
        print_json(&json!({ "store": profile.store, "key": profile.key, "id": id }));
    } else {
        outln!("sent message {id} to {}/{}", profile.store, profile.key);
    }
    Ok(())
}

/// `release`: asks the holder to let go, then waits until it has.
pub async fn release(
    client: &Client,
    profile: &ProfileAddr,
    timeout: Duration,
    json: bool,
) -> Outcome {
    let started = Instant::now();
    let asked = client
        .ask_release(&profile.store, &profile.key)
        .await
        .map_err(|err| Failure::request(&describe("asking to release", profile), &err))?;
    let Some(lease) = asked else {
        if json {
            print_json(&json!({ "store": profile.store, "key": profile.key, "held": false }));
        } else {
            outln!("{}/{} is not held", profile.store, profile.key);
        }
        return Ok(());
    };
    if !json {
        eprintln!(
            "asked {} to release {}/{}; waiting up to {}",
            lease.session,
            profile.store,
            profile.key,
            humantime::format_duration(timeout)
        );
    }
    loop {
        let still_held = match client.view(&profile.store, &profile.key, None).await {
            Ok(view) => view
                .meta
                .active
                .is_some_and(|active| active.epoch == lease.epoch),
            // A profile with no record at all is held by nobody.
            Err(err) if err.code() == Some(&ErrorCode::NotFound) => false,
            Err(err) => return Err(Failure::request(&describe("viewing", profile), &err)),
        };
        if !still_held {
            break;
        }
        if started.elapsed() >= timeout {
            return Err(Failure::new(
                exit::TIMEOUT,
                format!(
                    "{} still holds {}/{} after {}; `profilectl steal {} {}` ends the lease now",
                    lease.session,
                    profile.store,
                    profile.key,
                    humantime::format_duration(timeout),
                    profile.store,
                    profile.key
                ),
            ));
        }
        tokio::time::sleep(RELEASE_POLL).await;
    }
    if json {
        print_json(&json!({
            "store": profile.store,
            "key": profile.key,
            "held": true,
            "released": output::lease_json(&lease),
            "waited_ms": u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        }));
    } else {
        outln!(
            "{} released {}/{}",
            lease.session,
            profile.store,
            profile.key
        );
    }
    Ok(())
}

/// `steal`.
pub async fn steal(client: &Client, profile: &ProfileAddr, json: bool) -> Outcome {
    let ended = client
        .revoke(&profile.store, &profile.key)
        .await
        .map_err(|err| Failure::request(&describe("ending the lease on", profile), &err))?;
    if json {
        print_json(&json!({
            "store": profile.store,
            "key": profile.key,
            "ended": ended.as_ref().map(output::lease_json),
        }));
        return Ok(());
    }
    match ended {
        Some(lease) => outln!(
            "ended the lease on {}/{} of {}",
            profile.store,
            profile.key,
            output::lease_text(&lease)
        ),
        None => outln!("{}/{} is not held", profile.store, profile.key),
    }
    Ok(())
}

/// `stats`.
pub async fn stats(client: &Client, json: bool) -> Outcome {
    let metrics = client
        .stats()
        .await
        .map_err(|err| Failure::request("stats failed", &err))?;
    let mut lines: Vec<(String, f64)> = metrics
        .iter()
        .map(|metric| {
            let labels: Vec<String> = metric
                .labels
                .iter()
                .map(|(name, value)| format!("{name}={value:?}"))
                .collect();
            let name = if labels.is_empty() {
                metric.name.clone()
            } else {
                format!("{}{{{}}}", metric.name, labels.join(","))
            };
            (name, metric.value)
        })
        .collect();
    lines.sort_by(|a, b| a.0.cmp(&b.0));
    if json {
        let mut sorted = metrics.clone();
        sorted.sort_by(|a, b| (&a.name, &a.labels).cmp(&(&b.name, &b.labels)));
        let list: Vec<Value> = sorted
            .iter()
            .map(|metric| {
                let labels: Map<String, Value> = metric
                    .labels
                    .iter()
                    .map(|(name, value)| (name.clone(), Value::String(value.clone())))
                    .collect();
                json!({ "name": metric.name, "labels": labels, "value": metric.value })
            })
            .collect();
        print_json(&Value::Array(list));
        return Ok(());
    }
    for (name, value) in lines {
        outln!("{name} {value}");
    }
    Ok(())
}

/// "`verb` `store`/`key`", the context of a failed request's message.
fn describe(verb: &str, profile: &ProfileAddr) -> String {
    format!("{verb} {}/{} failed", profile.store, profile.key)
}
