//! The floors: what a Unix socket and the disk allow at best, so the
//! daemon's figures can be read against them.
//!
//! - *echo*: a server that answers every frame the size of a profiled save
//!   request with a reply the size of a save reply, at W = 1 and W = N
//!   connections. The server runs on its own multi-thread tokio runtime
//!   (default workers, as the daemon's) on its own threads, not on the
//!   bench clients' runtime, so it has its own scheduler as a daemon in its
//!   own process would; it does no work but the socket's.
//! - *fdatasync*: append 2 KiB to a file under `TMPDIR` (the disk the
//!   daemons write to) and `fdatasync` it, one after another, as a write-ahead
//!   log with one writer would.
//! - *fdatasync over*: the same, but overwriting blocks of a file written
//!   and synced beforehand, as a recycled write-ahead log (RocksDB's, with
//!   `recycle_log_file_num`) does: each sync then carries no growth of the
//!   file, and costs less on most file systems.
//! - *synced echo*: the echo at W = 1 with a server that writes each
//!   request over blocks of a file under `TMPDIR` written beforehand, as
//!   *fdatasync over* does, and `fdatasync`s it before it replies: the
//!   least a durable acknowledgement over this socket can take, and so the
//!   floor of the fsync save at W = 1 (the target compares that save with
//!   one fdatasync over allocated blocks, the cheaper kind, which is the
//!   kind profiled's recycled WAL makes).

use std::fs::File;
use std::io::{Seek, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::oneshot;

use crate::report::Report;
use crate::workload::{DATA_SIZE, Params, Stat};

/// A save request's size on the wire: a 4-byte length, 2 KiB of data and
/// about 64 bytes of header (key, store, lease).
const REQUEST_SIZE: usize = 4 + 2048 + 68;
/// A save reply's size on the wire.
const REPLY_SIZE: usize = 32;
/// How long the fdatasync loop runs at most.
const FSYNC_FOR: Duration = Duration::from_secs(2);
/// How many fdatasyncs the loop stops after, if it gets there first.
const FSYNC_MAX: usize = 10_000;
/// The size of the files written beforehand for the syncs over allocated
/// blocks; the synced echo wraps around in its file.
const LOG_BYTES: usize = FSYNC_MAX * DATA_SIZE;

/// Measures the floors and records `floor.echo.*`, `floor.fdatasync.*`,
/// `floor.fdatasync_over.*` and `floor.synced_echo.w1.*`.
pub async fn run(params: Params, report: &mut Report) {
    let run_for = params.run_for.min(Duration::from_secs(5));
    println!(
        "floor: Unix-socket echo of {REQUEST_SIZE} B requests with {REPLY_SIZE} B replies for \
         {} s per W; {} B appends with fdatasync for up to {} s",
        run_for.as_secs_f64(),
        DATA_SIZE,
        FSYNC_FOR.as_secs(),
    );
    println!();
    println!(
        "{:<16} {:>12} | {:>22}",
        "floor", "ops/s", "p50/p99/p999 us"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("echo.sock");
    let (stop, server) = echo_server(&socket, None);
    for (slug, w) in [("w1", 1), ("wN", params.sessions)] {
        eprintln!("floor echo W={w} ...");
        let stat = echo(&socket, w, run_for).await;
        print_row(&format!("echo W={w}"), &stat);
        record(report, &format!("floor.echo.{slug}"), &stat);
    }
    let _ = stop.send(());
    server.join().expect("echo server thread");
    for (name, slug, over) in [
        ("fdatasync", "fdatasync", false),
        ("fdatasync over", "fdatasync_over", true),
    ] {
        eprintln!("floor {name} ...");
        let stat = tokio::task::spawn_blocking(move || fdatasync(over))
            .await
            .expect("fdatasync task");
        print_row(name, &stat);
        record(report, &format!("floor.{slug}"), &stat);
    }
    // The synced echo's log lives under TMPDIR, on the disk the daemons
    // write to, like the fdatasync loop's.
    let log_dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("synced-echo.sock");
    let log = log_dir.path().join("wal");
    drop(prefilled(&log));
    let (stop, server) = echo_server(&socket, Some(log));
    eprintln!("floor synced echo W=1 ...");
    let stat = echo(&socket, 1, run_for.min(FSYNC_FOR)).await;
    print_row("synced echo W=1", &stat);
    record(report, "floor.synced_echo.w1", &stat);
    let _ = stop.send(());
    server.join().expect("synced echo server thread");
}

fn print_row(name: &str, stat: &Stat) {
    println!(
        "{name:<16} {:>12.0} | {:>22}",
        stat.per_sec,
        stat.percentiles()
    );
}

fn record(report: &mut Report, base: &str, stat: &Stat) {
    report.figure(&format!("{base}.per_sec"), stat.per_sec, "1/s");
    report.figure(&format!("{base}.p50_us"), stat.p50, "us");
    report.figure(&format!("{base}.p99_us"), stat.p99, "us");
    report.figure(&format!("{base}.p999_us"), stat.p999, "us");
    report.figure(&format!("{base}.count"), stat.count as f64, "ops");
}

/// Starts the echo server on its own thread and runtime, bound before this
/// returns; sending on the channel stops it. With a `log` (a file written
/// beforehand), each connection writes every request over its blocks and
/// syncs it before it replies.
fn echo_server(
    socket: &Path,
    log: Option<PathBuf>,
) -> (oneshot::Sender<()>, std::thread::JoinHandle<()>) {
    // The echo is a server: it runs where the real servers do.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .thread_name("echo-server")
        .on_thread_start(|| crate::common::pin_this_thread(crate::common::SERVER_CPUS))
        .enable_all()
        .build()
        .expect("echo runtime");
    let listener = {
        let _entered = runtime.enter();
        UnixListener::bind(socket).expect("bind echo socket")
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        crate::common::pin_this_thread(crate::common::SERVER_CPUS);
        runtime.block_on(async move {
            let accept = async {
                loop {
                    let (stream, _) = listener.accept().await.expect("accept echo");
                    let log = log.as_ref().map(|path| {
                        File::options()
                            .write(true)
                            .open(path)
                            .expect("open the synced echo's log")
                    });
                    tokio::spawn(serve(stream, log));
                }
            };
            tokio::select! {
                () = accept => {}
                _ = stopped => {}
            }
        });
        // Dropping the runtime here, off the clients' runtime, ends the
        // connections' tasks.
        drop(runtime);
    });
    (stop, thread)
}

/// Answers each length-prefixed frame with a reply of `REPLY_SIZE` bytes,
/// after writing its body over the next blocks of `log` (from the start
/// again at its end) and syncing it, if there is one. The sync blocks the
/// runtime's worker, which at W = 1 has nothing else to do.
async fn serve(mut stream: UnixStream, mut log: Option<File>) {
    let mut frame = vec![0u8; REQUEST_SIZE];
    let mut reply = [0u8; REPLY_SIZE];
    let body = u32::try_from(REPLY_SIZE - 4).expect("reply size");
    reply[..4].copy_from_slice(&body.to_be_bytes());
    let mut offset = 0;
    loop {
        let mut header = [0u8; 4];
        if stream.read_exact(&mut header).await.is_err() {
            return;
        }
        let len = usize::try_from(u32::from_be_bytes(header)).expect("frame length");
        frame.resize(len, 0);
        if stream.read_exact(&mut frame).await.is_err() {
            return;
        }
        if let Some(log) = &mut log {
            if offset + frame.len() > LOG_BYTES {
                offset = 0;
            }
            log.write_all_at(&frame, offset as u64)
                .expect("write the synced echo's log");
            offset += frame.len();
            log.sync_data().expect("fdatasync the synced echo's log");
        }
        if stream.write_all(&reply).await.is_err() {
            return;
        }
    }
}

/// `connections` clients, each sending one request and awaiting its reply
/// in a loop for `run_for`.
async fn echo(socket: &Path, connections: usize, run_for: Duration) -> Stat {
    let start = Instant::now() + Duration::from_millis(200);
    let end = start + run_for;
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let mut stream = UnixStream::connect(socket).await.expect("connect echo");
        tasks.push(tokio::spawn(async move {
            let mut request = vec![0x5au8; REQUEST_SIZE];
            let body = u32::try_from(REQUEST_SIZE - 4).expect("request size");
            request[..4].copy_from_slice(&body.to_be_bytes());
            let mut reply = [0u8; REPLY_SIZE];
            let mut samples = Vec::new();
            tokio::time::sleep_until(start.into()).await;
            while Instant::now() < end {
                let sent = Instant::now();
                stream.write_all(&request).await.expect("echo write");
                stream.read_exact(&mut reply).await.expect("echo read");
                samples.push(sent.elapsed());
            }
            samples
        }));
    }
    let mut samples = Vec::new();
    for task in tasks {
        samples.extend(task.await.expect("echo task"));
    }
    Stat::new(samples, end - start)
}

/// Writes `DATA_SIZE` bytes and fdatasyncs, one after another, on a new
/// file under `TMPDIR`. Appended, each sync also carries the file's growth
/// as a new log's would; `over` blocks written and synced beforehand, it
/// carries only the data, as a recycled log's does.
fn fdatasync(over: bool) -> Stat {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("wal");
    let mut file = if over {
        prefilled(&path)
    } else {
        File::create(&path).expect("create file")
    };
    let block = vec![0x5au8; DATA_SIZE];
    let mut samples = Vec::with_capacity(FSYNC_MAX);
    let start = Instant::now();
    while start.elapsed() < FSYNC_FOR && samples.len() < FSYNC_MAX {
        let sent = Instant::now();
        file.write_all(&block).expect("append");
        file.sync_data().expect("fdatasync");
        samples.push(sent.elapsed());
    }
    Stat::new(samples, start.elapsed())
}

/// Creates a file of `LOG_BYTES` at `path`, written and synced, and
/// returns it positioned at its start for writing over.
fn prefilled(path: &Path) -> File {
    let mut file = File::create(path).expect("create file");
    let block = vec![0u8; DATA_SIZE];
    for _ in 0..LOG_BYTES / DATA_SIZE {
        file.write_all(&block).expect("fill");
    }
    file.sync_all().expect("sync the filled file");
    file.rewind().expect("rewind the filled file");
    file
}
