//! profiled: a sidecar daemon that keeps game players' profiles safe.
//!
//! Game servers connect over a Unix socket, take fenced leases on profiles,
//! save under them, and release them; the daemon guarantees that no two
//! sessions hold one profile at once and that no acknowledged save is lost.
//! `ARCHITECTURE.md` maps the modules; the wire format is documented in the
//! `profiled-protocol` crate.
//!
//! [`run`] starts the daemon on a listener of the caller's choosing, so
//! tests can run it in-process.

// Data from clients must never panic the daemon: no `expect` and no
// indexing that could go out of bounds outside tests (`unwrap` is denied
// workspace-wide).
#![cfg_attr(not(test), warn(clippy::expect_used, clippy::indexing_slicing))]

pub mod access;
pub mod activation;
pub mod config;
mod connection;
pub mod daemonize;
pub mod leases;
pub mod logging;
pub mod notify;
mod profile_key;
mod prometheus;
mod pruning;
mod replies;
mod requests;
mod server;
pub mod signals;
pub mod stats;
pub mod storage;
pub mod testing;

pub use config::Config;
pub use profile_key::ProfileKey;
pub use server::{Listener, ServerError, bind, run, run_with};
