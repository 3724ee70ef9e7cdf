//! A simulated game server: players join, earn coins every tick and leave,
//! with their `PlayerData` kept by profiled through the typed layer.
//!
//! It shows what a game server needs to do and what the typed layer does for
//! it. Each player gets a task with one event loop: the game changes the
//! data on every tick, and the profile's own task saves it and, when another
//! server force-loads the player (a player hopping servers), makes the last
//! save and releases by itself. Run two of them against one daemon and move
//! a player from the first to the second; the README walks through it.
//!
//! ```sh
//! cargo run -p profiled-client --example game_server -- --server a --players alice,bob --ticks 50
//! ```
//!
//! Every line printed starts with the server's name in brackets, so the
//! output of two servers can be told apart. A player's last line is one of
//! `<player> left with <n> coins` (the player's ticks ran out),
//! `released <player> on request` (another server took the player) or
//! `<player>'s session ended: ...` (anything else).

use std::error::Error;
use std::time::Duration;

use profiled_client::typed::{EndReason, LastSaveReason, LifecycleEvent, ProfileStore, SaveReason};
use profiled_client::{Client, ClientError, LoadPolicy, SessionId};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

/// What the example's errors are: anything, from any task.
type BoxError = Box<dyn Error + Send + Sync>;

/// How many coins a player earns per tick.
const COINS_PER_TICK: u64 = 10;

/// The profile data: what the game keeps about a player.
#[derive(Debug, Default, Serialize, Deserialize)]
struct PlayerData {
    /// Coins earned, across all servers.
    coins: u64,
    /// How many times the player joined a server.
    joins: u64,
    /// The server the player last joined.
    last_server: String,
}

/// The command line.
#[derive(Clone, Debug)]
struct Args {
    /// The daemon's socket.
    socket: String,
    /// This server's name, used as the session's job id.
    server: String,
    /// The players who join this server.
    players: Vec<String>,
    /// How many ticks each player plays.
    ticks: u32,
    /// The time between ticks.
    tick: Duration,
    /// Whether players stay after their last tick, until another server
    /// takes them.
    hold: bool,
}

const USAGE: &str = "usage: game_server [--socket PATH] --server NAME --players A,B,... \
                     [--ticks N] [--tick-ms M] [--hold]";

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = parse_args(std::env::args().skip(1))?;
    let session = SessionId {
        place_id: 1,
        job_id: args.server.clone(),
    };
    let client = Client::connect(&args.socket, session).await?;
    println!("[{}] connected to {}", args.server, args.socket);

    // Auto-save every two seconds, so the output shows some; a real game
    // would keep the default of thirty.
    let store = client
        .store::<PlayerData>("PlayerData")
        .with_autosave(Some(Duration::from_secs(2)));

    // Every player is played by a task of its own, as a game server would
    // handle each connected player on its own.
    let mut players = JoinSet::new();
    for player in &args.players {
        players.spawn(play(store.clone(), args.clone(), player.clone()));
    }
    let mut failed = None;
    while let Some(joined) = players.join_next().await {
        if let Err(err) = joined.map_err(BoxError::from).and_then(|played| played) {
            eprintln!("[{}] a player failed: {err}", args.server);
            failed.get_or_insert(err);
        }
    }
    client.close().await;
    println!("[{}] all players gone, shutting down", args.server);
    failed.map_or(Ok(()), Err)
}

/// One player's stay on this server: loads the profile, plays the ticks,
/// and handles the profile's events until the player leaves or is taken.
async fn play(store: ProfileStore<PlayerData>, args: Args, player: String) -> Result<(), BoxError> {
    let server = &args.server;
    // ForceLoad: if another server holds the player, it is asked to save
    // and release, and this load returns once it has.
    let mut profile = store.load(&player, LoadPolicy::ForceLoad).await?;
    let (coins, joins, last) = profile.update(|data| {
        data.joins += 1;
        let last = std::mem::replace(&mut data.last_server, server.clone());
        (data.coins, data.joins, last)
    });
    let seen = if last.is_empty() {
        "first visit".to_owned()
    } else {
        format!("last on {last}")
    };
    println!("[{server}] {player} joined with {coins} coins (join {joins}, {seen})");

    let mut ticks = tokio::time::interval(args.tick);
    // The first tick of an interval is immediate; a player earns only after
    // a full tick.
    ticks.tick().await;
    let mut played = 0;
    // With no ticks to play the player leaves at once, unless held.
    if args.ticks > 0 || args.hold {
        loop {
            tokio::select! {
                _ = ticks.tick(), if played < args.ticks => {
                    played += 1;
                    let coins = profile.update(|data| {
                        data.coins += COINS_PER_TICK;
                        data.coins
                    });
                    println!("[{server}] {player} earned {COINS_PER_TICK} coins, now {coins}");
                    if played == args.ticks {
                        if !args.hold {
                            break;
                        }
                        println!("[{server}] {player} is idle, holding until another server takes them");
                    }
                }
                event = profile.next_event() => match event {
                    Some(LifecycleEvent::Message(message)) => {
                        // This game has no use for messages; acknowledging one
                        // lets the next save remove it.
                        println!("[{server}] {player} got message {}", message.id);
                        profile.ack(message.id);
                    }
                    Some(LifecycleEvent::Saved { reason, version }) => {
                        println!("[{server}] {player} saved at version {version} ({})", why(reason));
                    }
                    Some(LifecycleEvent::SaveFailed { reason, error, attempt }) => {
                        println!(
                            "[{server}] {player} could not be saved ({}, attempt {attempt}): {error}",
                            why(reason)
                        );
                    }
                    Some(LifecycleEvent::ReleaseRequested { requester }) => {
                        // The typed layer saves and releases on its own; this
                        // only says who asked.
                        println!("[{server}] {player} is wanted by server {}", requester.job_id);
                    }
                    Some(LifecycleEvent::SessionEnded {
                        reason: EndReason::Released(LastSaveReason::ReleaseRequested),
                    }) => {
                        // The typed layer has already made the last save and
                        // released; the player is on another server now.
                        println!("[{server}] released {player} on request");
                        return Ok(());
                    }
                    Some(LifecycleEvent::SessionEnded { reason }) => {
                        println!("[{server}] {player}'s session ended: {reason:?}");
                        return Ok(());
                    }
                    Some(other) => println!("[{server}] {player}: {other:?}"),
                    None => return Ok(()),
                },
            }
        }
    }

    // The player leaves: the last save and the release, in one step.
    let coins = profile.data().coins;
    match profile.release().await {
        Ok(version) => {
            println!("[{server}] {player} left with {coins} coins (version {version})");
        }
        // Another server took the player as the ticks ran out: the typed
        // layer already made the last save and released.
        Err(ClientError::Ended) => println!("[{server}] {player} was taken as they left"),
        Err(err) => return Err(err.into()),
    }
    Ok(())
}

/// Why a save was made, in words.
fn why(reason: SaveReason) -> &'static str {
    match reason {
        SaveReason::Manual => "saved by the game",
        SaveReason::AutoSave => "auto-save",
        SaveReason::Last(LastSaveReason::ReleaseRequested) => "last save, another server asked",
        SaveReason::Last(LastSaveReason::Shutdown) => "last save, the daemon is stopping",
        SaveReason::Last(_) => "last save",
        _ => "other",
    }
}

/// Parses the command line (without the program name).
fn parse_args(mut words: impl Iterator<Item = String>) -> Result<Args, BoxError> {
    let mut args = Args {
        socket: "profiled.sock".to_owned(),
        server: String::new(),
        players: Vec::new(),
        ticks: 20,
        tick: Duration::from_millis(100),
        hold: false,
    };
    while let Some(word) = words.next() {
        let mut value = || {
            words
                .next()
                .ok_or_else(|| format!("{word} needs a value\n{USAGE}"))
        };
        match word.as_str() {
            "--socket" => args.socket = value()?,
            "--server" => args.server = value()?,
            "--players" => {
                args.players = value()?
                    .split(',')
                    .filter(|p| !p.is_empty())
                    .map(str::to_owned)
                    .collect();
            }
            "--ticks" => args.ticks = value()?.parse()?,
            "--tick-ms" => args.tick = Duration::from_millis(value()?.parse()?),
            "--hold" => args.hold = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}").into()),
        }
    }
    if args.server.is_empty() || args.players.is_empty() {
        return Err(format!("--server and --players are required\n{USAGE}").into());
    }
    if args.tick.is_zero() {
        return Err("--tick-ms must be at least 1".into());
    }
    Ok(args)
}
