//! PostgreSQL as a peer: a `postgres` child on its own temporary cluster
//! and Unix socket, one connection per session speaking the v3 wire
//! protocol by hand (so no client crate is added), one row per profile
//! `(key, owner, epoch, data)` and each operation one named prepared
//! statement run with Bind, Execute and Sync. Parameters and results are
//! binary, so the 2 KiB of data crosses the socket as raw `bytea` bytes,
//! as it does for profiled and Redis. Durability: `fsync = on` with
//! `synchronous_commit = on` (fsync) or `off` (buffered).
//!
//! PostgreSQL refuses to run as root, so when the bench is root the cluster
//! belongs to the `postgres` user (or `nobody`), and `initdb` and the server
//! run as that user.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::common::ProcessTree;
use crate::workload::{self, Durability, Leases, Outcome, Params};

/// Whether `initdb` and `postgres` can be run.
pub fn available() -> bool {
    ["initdb", "postgres"].into_iter().all(crate::common::runs)
}

/// Runs the sessions workload and then the saves workloads (one per entry
/// of `saves`, the number of sessions) on a fresh cluster.
pub async fn run(durability: Durability, params: Params, saves: &[usize]) -> Vec<Outcome> {
    let server = PgServer::start(durability).await;
    server.create_schema().await;
    // The postmaster: every backend, and the WAL writer, checkpointer and
    // other helpers, are its children.
    let tree = ProcessTree::new(server.child.id());
    workload::run("postgres", durability, params, saves, &tree, async |name| {
        Session::connect(&server.socket, name).await
    })
    .await
}

const SCHEMA: &str = "CREATE TABLE profiles (key text PRIMARY KEY, owner text, \
                      epoch bigint NOT NULL DEFAULT 0, data bytea)";

/// Takes a free (or new) profile and returns its new epoch and data; no
/// row if another owner holds it.
const ACQUIRE: &str = "INSERT INTO profiles (key, owner, epoch) VALUES ($1, $2, 1) \
                       ON CONFLICT (key) DO UPDATE SET owner = $2, epoch = profiles.epoch + 1 \
                       WHERE profiles.owner IS NULL RETURNING epoch, data";

/// Writes the data if the lease is still held; one row updated if so.
const SAVE: &str = "UPDATE profiles SET data = $3 WHERE key = $1 AND owner = $2 AND epoch = $4";

/// Frees the profile if the lease is still held; one row updated if so.
const RELEASE: &str =
    "UPDATE profiles SET owner = NULL WHERE key = $1 AND owner = $2 AND epoch = $3";

/// Type OIDs of the statements' parameters.
const TEXT: u32 = 25;
const BYTEA: u32 = 17;
const INT8: u32 = 20;

/// The user the cluster runs as when the bench is root: `(name, uid, gid)`.
fn unprivileged_user() -> (String, u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").expect("read /etc/passwd");
    for name in ["postgres", "nobody"] {
        let found = passwd.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            match fields.as_slice() {
                [user, _, uid, gid, ..] if *user == name => {
                    Some((uid.parse().ok()?, gid.parse().ok()?))
                }
                _ => None,
            }
        });
        if let Some((uid, gid)) = found {
            return (name.to_owned(), uid, gid);
        }
    }
    panic!("running as root, and neither a postgres nor a nobody user exists to run PostgreSQL");
}

/// A `postgres` child on a temporary cluster, stopped on drop.
struct PgServer {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // SIGINT is the fast shutdown: it ends the sessions and checkpoints,
        // instead of waiting for clients to leave as SIGTERM does.
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGINT);
        }
        let _ = self.child.wait();
    }
}

impl PgServer {
    async fn start(durability: Durability) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        // The directory belongs to whoever made it: if that is root, hand
        // it to a user PostgreSQL will run as.
        let owner = if dir.path().metadata().expect("tempdir metadata").uid() == 0 {
            let (name, uid, gid) = unprivileged_user();
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown tempdir");
            eprintln!("postgres: running as root, so the cluster runs as user {name}");
            Some((uid, gid))
        } else {
            None
        };
        let command = |program: &str| {
            let mut command = crate::common::server_command(program);
            // The bench's own directory may not be readable by that user.
            command.current_dir(dir.path());
            if let Some((uid, gid)) = owner {
                command.uid(uid).gid(gid);
            }
            command
        };
        let data = dir.path().join("data");
        let log = dir.path().join("postgres.log");
        let initdb = command("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync"])
            .args(["--locale=C", "-E", "UTF8"])
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("create postgres.log"))
            .status()
            .expect("run initdb");
        assert!(
            initdb.success(),
            "initdb failed: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        let synchronous_commit = match durability {
            Durability::Fsync => "on",
            Durability::Buffered => "off",
        };
        let child = command("postgres")
            .arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(dir.path())
            .args(["-c", "listen_addresses="])
            .arg("-c")
            .arg(format!("synchronous_commit={synchronous_commit}"))
            .args(["-c", "fsync=on"])
            .args(["-c", "shared_buffers=256MB"])
            .args(["-c", "max_connections=200"])
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("create postgres.log"))
            .spawn()
            .expect("start postgres");
        let mut server = Self {
            child,
            socket: dir.path().join(".s.PGSQL.5432"),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if Pg::connect(&server.socket).await.is_ok() {
                break;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!(
                    "postgres exited with {status}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "postgres did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server
    }

    async fn create_schema(&self) {
        let mut conn = Pg::connect(&self.socket).await.expect("connect postgres");
        conn.prepare("schema", SCHEMA, &[])
            .await
            .expect("prepare schema")
            .expect("schema statement");
        let reply = conn
            .execute("schema", &[])
            .await
            .expect("create schema")
            .expect("schema");
        assert_eq!(reply.tag, "CREATE TABLE", "create schema");
    }
}

/// What one statement returned: its command tag and its rows, each a list
/// of nullable binary columns.
#[derive(Debug)]
struct Rows {
    tag: String,
    rows: Vec<Vec<Option<Vec<u8>>>>,
}

/// One connection, speaking the v3 protocol's extended query flow.
struct Pg {
    io: BufReader<UnixStream>,
    out: Vec<u8>,
    /// The body of the last message read.
    body: Vec<u8>,
}

impl Pg {
    /// Connects as `postgres` to database `postgres` and waits for the
    /// first ReadyForQuery; trust authentication needs no password.
    async fn connect(socket: &Path) -> io::Result<Self> {
        let mut conn = Self {
            io: BufReader::new(UnixStream::connect(socket).await?),
            out: Vec::with_capacity(4096),
            body: Vec::with_capacity(4096),
        };
        let mut startup = Vec::new();
        startup.extend_from_slice(&196_608u32.to_be_bytes()); // protocol 3.0
        for part in ["user", "postgres", "database", "postgres"] {
            startup.extend_from_slice(part.as_bytes());
            startup.push(0);
        }
        startup.push(0);
        conn.out.extend_from_slice(&length(startup.len() + 4));
        conn.out.extend_from_slice(&startup);
        conn.flush().await?;
        loop {
            match conn.read().await? {
                b'R' => {
                    let code = conn
                        .body
                        .get(..4)
                        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                    if code != Some(0) {
                        return Err(invalid(format!(
                            "authentication request {code:?}, not trust"
                        )));
                    }
                }
                b'E' => return Err(invalid(conn.error_message())),
                b'Z' => return Ok(conn),
                // ParameterStatus, BackendKeyData, notices.
                _ => {}
            }
        }
    }

    /// Parses `query` as the named statement `name`, with parameters of
    /// the type OIDs `types`. The outer error is the connection's, the
    /// inner PostgreSQL's.
    async fn prepare(
        &mut self,
        name: &str,
        query: &str,
        types: &[u32],
    ) -> io::Result<Result<(), String>> {
        let start = self.begin(b'P');
        self.cstring(name);
        self.cstring(query);
        self.out.extend_from_slice(&count(types.len()));
        for oid in types {
            self.out.extend_from_slice(&oid.to_be_bytes());
        }
        self.end(start);
        self.sync();
        self.flush().await?;
        Ok(self.collect().await?.map(|_| ()))
    }

    /// Runs the prepared statement `name` with binary parameters (`None`
    /// is NULL) and binary results, as Bind, Execute and Sync in one write.
    async fn execute(
        &mut self,
        name: &str,
        params: &[Option<&[u8]>],
    ) -> io::Result<Result<Rows, String>> {
        let start = self.begin(b'B');
        self.cstring(""); // the unnamed portal
        self.cstring(name);
        self.out.extend_from_slice(&count(1));
        self.out.extend_from_slice(&1u16.to_be_bytes()); // every parameter binary
        self.out.extend_from_slice(&count(params.len()));
        for param in params {
            match param {
                Some(value) => {
                    self.out.extend_from_slice(&length(value.len()));
                    self.out.extend_from_slice(value);
                }
                None => self.out.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        self.out.extend_from_slice(&count(1));
        self.out.extend_from_slice(&1u16.to_be_bytes()); // every result column binary
        self.end(start);
        let start = self.begin(b'E');
        self.cstring("");
        self.out.extend_from_slice(&0u32.to_be_bytes()); // no row limit
        self.end(start);
        self.sync();
        self.flush().await?;
        self.collect().await
    }

    /// Runs `query` through the simple query protocol.
    async fn simple_query(&mut self, query: &str) -> io::Result<Result<Rows, String>> {
        let start = self.begin(b'Q');
        self.cstring(query);
        self.end(start);
        self.flush().await?;
        self.collect().await
    }

    /// Reads replies up to ReadyForQuery: the rows and tag, or the error.
    async fn collect(&mut self) -> io::Result<Result<Rows, String>> {
        let mut rows = Rows {
            tag: String::new(),
            rows: Vec::new(),
        };
        let mut error = None;
        loop {
            match self.read().await? {
                b'D' => rows.rows.push(self.data_row()?),
                b'C' => {
                    let end = self
                        .body
                        .iter()
                        .position(|&b| b == 0)
                        .unwrap_or(self.body.len());
                    rows.tag = String::from_utf8_lossy(&self.body[..end]).into_owned();
                }
                b'E' => error = Some(self.error_message()),
                b'Z' => return Ok(error.map_or(Ok(rows), Err)),
                // ParseComplete, BindComplete, NoData, notices.
                _ => {}
            }
        }
    }

    /// Starts a message of type `kind`; returns where its length goes.
    fn begin(&mut self, kind: u8) -> usize {
        self.out.push(kind);
        let start = self.out.len();
        self.out.extend_from_slice(&[0; 4]);
        start
    }

    /// Fills in the length of the message begun at `start`.
    fn end(&mut self, start: usize) {
        let len = length(self.out.len() - start);
        self.out[start..start + 4].copy_from_slice(&len);
    }

    fn cstring(&mut self, text: &str) {
        self.out.extend_from_slice(text.as_bytes());
        self.out.push(0);
    }

    fn sync(&mut self) {
        let start = self.begin(b'S');
        self.end(start);
    }

    async fn flush(&mut self) -> io::Result<()> {
        self.io.get_mut().write_all(&self.out).await?;
        self.out.clear();
        Ok(())
    }

    /// Reads one message into `body` and returns its type.
    async fn read(&mut self) -> io::Result<u8> {
        let mut header = [0u8; 5];
        self.io.read_exact(&mut header).await?;
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        let len = usize::try_from(len)
            .ok()
            .and_then(|len| len.checked_sub(4))
            .ok_or_else(|| invalid("message length below 4".to_owned()))?;
        self.body.resize(len, 0);
        self.io.read_exact(&mut self.body).await?;
        Ok(header[0])
    }

    /// Splits a DataRow into its columns.
    fn data_row(&self) -> io::Result<Vec<Option<Vec<u8>>>> {
        let short = || invalid("short DataRow".to_owned());
        let body = self.body.as_slice();
        let columns = body.get(..2).ok_or_else(short)?;
        let columns = u16::from_be_bytes([columns[0], columns[1]]);
        let mut at = 2;
        let mut row = Vec::with_capacity(usize::from(columns));
        for _ in 0..columns {
            let len = body.get(at..at + 4).ok_or_else(short)?;
            let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
            at += 4;
            match usize::try_from(len) {
                Ok(len) => {
                    row.push(Some(body.get(at..at + len).ok_or_else(short)?.to_vec()));
                    at += len;
                }
                Err(_) => row.push(None),
            }
        }
        Ok(row)
    }

    /// The severity, code and message fields of an ErrorResponse.
    fn error_message(&self) -> String {
        let mut parts = Vec::new();
        for field in self.body.split(|&b| b == 0) {
            if let Some((&kind, text)) = field.split_first()
                && matches!(kind, b'S' | b'C' | b'M')
            {
                parts.push(String::from_utf8_lossy(text).into_owned());
            }
        }
        parts.join(": ")
    }
}

/// One session's connection with the owner name it acquires as.
struct Session {
    pg: Pg,
    me: String,
}

impl Session {
    /// Connects and prepares the three lease statements, which every
    /// operation then runs by name.
    async fn connect(socket: &Path, me: String) -> Self {
        let mut pg = Pg::connect(socket).await.expect("connect postgres");
        for (name, query, types) in [
            ("acquire", ACQUIRE, &[TEXT, TEXT][..]),
            ("save", SAVE, &[TEXT, TEXT, BYTEA, INT8][..]),
            ("release", RELEASE, &[TEXT, TEXT, INT8][..]),
        ] {
            pg.prepare(name, query, types)
                .await
                .expect("postgres prepare")
                .unwrap_or_else(|err| panic!("prepare {name}: {err}"));
        }
        Self { pg, me }
    }
}

/// A lease is the row's key with the epoch the acquire statement granted,
/// which the save and release statements check along with the owner.
impl Leases for Session {
    type Lease = (String, u64);

    /// The key already holds the store, as its `store:` prefix.
    async fn acquire(&mut self, _store: &'static str, key: String) -> Option<(String, u64)> {
        let reply = self
            .pg
            .execute("acquire", &[Some(key.as_bytes()), Some(self.me.as_bytes())])
            .await
            .expect("postgres acquire")
            .unwrap_or_else(|err| panic!("acquire: {err}"));
        let row = reply.rows.first()?;
        match row.first() {
            Some(Some(epoch)) => {
                let epoch: [u8; 8] = epoch.as_slice().try_into().expect("int8 epoch");
                let epoch = u64::try_from(i64::from_be_bytes(epoch)).expect("epoch");
                Some((key, epoch))
            }
            other => panic!("acquire row: {other:?}"),
        }
    }

    async fn save(&mut self, (key, epoch): &(String, u64), data: &[u8]) {
        let epoch = i64::try_from(*epoch).expect("epoch").to_be_bytes();
        let params = [
            Some(key.as_bytes()),
            Some(self.me.as_bytes()),
            Some(data),
            Some(&epoch[..]),
        ];
        let reply = self
            .pg
            .execute("save", &params)
            .await
            .expect("postgres save")
            .unwrap_or_else(|err| panic!("save: {err}"));
        assert_eq!(reply.tag, "UPDATE 1", "save lost its lease");
    }

    async fn release(&mut self, (key, epoch): (String, u64)) {
        let epoch = i64::try_from(epoch).expect("epoch").to_be_bytes();
        let params = [
            Some(key.as_bytes()),
            Some(self.me.as_bytes()),
            Some(&epoch[..]),
        ];
        let reply = self
            .pg
            .execute("release", &params)
            .await
            .expect("postgres release")
            .unwrap_or_else(|err| panic!("release: {err}"));
        assert_eq!(reply.tag, "UPDATE 1", "release lost its lease");
    }

    /// An empty simple query: parsed, planned as nothing, answered with
    /// EmptyQueryResponse and ReadyForQuery.
    async fn ping(&mut self) {
        self.pg
            .simple_query("")
            .await
            .expect("postgres ping")
            .unwrap_or_else(|err| panic!("ping: {err}"));
    }
}

/// A message length field: `len` bytes, as a big-endian `i32`.
fn length(len: usize) -> [u8; 4] {
    i32::try_from(len).expect("message length").to_be_bytes()
}

/// A count field (of parameters, formats or types), as a big-endian `i16`.
fn count(n: usize) -> [u8; 2] {
    i16::try_from(n).expect("count").to_be_bytes()
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}
