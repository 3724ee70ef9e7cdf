//! The optional Prometheus endpoint of the real `profiled` binary: it serves
//! the daemon's counters over HTTP, refuses addresses it must not serve on,
//! and stops with the daemon.

mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::Daemon;
use nix::sys::signal::Signal;
use profiled_client::LoadPolicy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The most a test waits for the endpoint to show a value, or for the
/// daemon to exit, before it fails. Only a bound on failure; the endpoint
/// refreshes every second.
const PATIENCE: Duration = Duration::from_secs(10);

/// A loopback address nothing listens on, found by binding port 0 and
/// letting the port go.
fn free_address() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().expect("local address")
}

/// The `[metrics]` TOML that serves Prometheus on `addr`.
fn metrics_config(addr: SocketAddr) -> String {
    format!("[metrics]\nprometheus = \"{addr}\"\n")
}

/// One plain HTTP/1.1 GET of `/metrics` on `addr`; returns the whole
/// response, status line and headers included.
async fn scrape(addr: SocketAddr) -> std::io::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response)
}

/// Scrapes `addr` until the response is a success holding every line of
/// `expected`, failing after [`PATIENCE`] with the last response seen.
async fn wait_for_lines(addr: SocketAddr, expected: &[&str]) -> String {
    let until = Instant::now() + PATIENCE;
    loop {
        let last = match scrape(addr).await {
            Ok(response) => {
                let lines: Vec<&str> = response.lines().collect();
                if response.starts_with("HTTP/1.1 200")
                    && expected.iter().all(|line| lines.contains(line))
                {
                    return response;
                }
                response
            }
            Err(err) => format!("scrape failed: {err}"),
        };
        assert!(
            Instant::now() < until,
            "{addr} did not show {expected:?}; last response:\n{last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the binary with a config file holding `text` and expects it to
/// exit on its own. Returns the exit status and stderr.
fn run_to_exit(text: &str) -> (ExitStatus, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, text).expect("write config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_profiled"))
        .arg("--config")
        .arg(&config)
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .arg("--data-dir")
        .arg(dir.path().join("d"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn profiled");
    let until = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!("profiled did not exit");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        pipe.read_to_string(&mut stderr).expect("read stderr");
    }
    (status, stderr)
}

#[tokio::test]
async fn the_endpoint_serves_the_daemons_counters() {
    let addr = free_address();
    let mut daemon = Daemon::start_with(&format!(
        "{}[shutdown]\ngrace = \"200ms\"\n",
        metrics_config(addr)
    ));
    let client = daemon.client("job").await;
    let profile = client
        .load("PlayerData", "k", LoadPolicy::ForceLoad)
        .await
        .expect("load");
    profile.save(b"one".to_vec()).await.expect("first save");
    profile.save(b"two".to_vec()).await.expect("second save");

    let response =
        wait_for_lines(addr, &["profiled_saves_total 2", "profiled_leases_held 1"]).await;
    for line in [
        "# TYPE profiled_saves_total counter",
        "# TYPE profiled_leases_held gauge",
    ] {
        assert!(
            response.lines().any(|l| l == line),
            "no {line:?} in:\n{response}"
        );
    }

    profile.release(None).await.expect("release");
    wait_for_lines(
        addr,
        &[
            "profiled_leases_held 0",
            "profiled_releases_total{by=\"client\"} 1",
        ],
    )
    .await;
    client.close().await;

    // The endpoint stops with the daemon, which still stops cleanly.
    daemon.signal(Signal::SIGTERM);
    let status = daemon.wait_exit(PATIENCE);
    assert!(status.success(), "SIGTERM exits 0: {status}");
    assert!(
        scrape(addr).await.is_err(),
        "the endpoint still answers after the daemon stopped"
    );
}

#[test]
fn a_non_loopback_address_exits_64_naming_the_key() {
    let (status, stderr) = run_to_exit("[metrics]\nprometheus = \"0.0.0.0:9184\"\n");
    assert_eq!(status.code(), Some(64), "stderr: {stderr}");
    assert!(stderr.contains("metrics.prometheus"), "{stderr:?}");
}

#[test]
fn a_taken_address_stops_the_start_naming_it() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("local address");
    let (status, stderr) = run_to_exit(&metrics_config(addr));
    assert!(!status.success(), "the daemon must not start: {stderr}");
    assert!(stderr.contains("metrics.prometheus"), "{stderr:?}");
    assert!(stderr.contains(&addr.to_string()), "{stderr:?}");
}
