//! Redis as a peer: a `redis-server` child on its own temporary directory
//! and Unix socket, one connection per session speaking RESP, one hash per
//! profile `{owner, epoch, data}` and each operation one Lua script called
//! with `EVALSHA`. Durability: `appendonly yes` with `appendfsync always`
//! (fsync) or `everysec` (buffered), and no RDB snapshots.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::common::ProcessTree;
use crate::workload::{self, Durability, Leases, Outcome, Params};

/// Whether `redis-server` can be run.
pub fn available() -> bool {
    crate::common::runs("redis-server")
}

/// Runs the sessions workload and then the saves workloads (one per entry
/// of `saves`, the number of sessions) on a fresh server.
pub async fn run(durability: Durability, params: Params, saves: &[usize]) -> Vec<Outcome> {
    let server = RedisServer::start(durability).await;
    let shas = server.load_scripts().await;
    let tree = ProcessTree::new(server.child.id());
    workload::run("redis", durability, params, saves, &tree, async |name| {
        Session::connect(&server.socket, &shas, name).await
    })
    .await
}

const ACQUIRE: &str = r"
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and owner ~= '' then
  return redis.error_reply('TAKEN')
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1])
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
local data = redis.call('HGET', KEYS[1], 'data')
return {epoch, data}
";

const SAVE: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'owner', 'epoch')
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then
  return redis.error_reply('LEASE_LOST')
end
redis.call('HSET', KEYS[1], 'data', ARGV[3])
return 1
";

const RELEASE: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'owner', 'epoch')
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then
  return redis.error_reply('LEASE_LOST')
end
if ARGV[3] then
  redis.call('HSET', KEYS[1], 'owner', '', 'data', ARGV[3])
else
  redis.call('HSET', KEYS[1], 'owner', '')
end
return 1
";

#[derive(Clone, Debug)]
struct Shas {
    acquire: String,
    save: String,
    release: String,
}

/// A `redis-server` child on a temporary directory, killed on drop.
struct RedisServer {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RedisServer {
    async fn start(durability: Durability) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("redis.sock");
        let fsync = match durability {
            Durability::Fsync => "always",
            Durability::Buffered => "everysec",
        };
        let child = crate::common::server_command("redis-server")
            .arg("--port")
            .arg("0")
            .arg("--unixsocket")
            .arg(&socket)
            .arg("--dir")
            .arg(dir.path())
            .args(["--appendonly", "yes", "--appendfsync", fsync, "--save", ""])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start redis-server");
        let server = Self {
            child,
            socket,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut conn) = Resp::connect(&server.socket).await
                && let Ok(Reply::Simple(pong)) = conn.call(&[b"PING"]).await
                && pong == "PONG"
            {
                break;
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        server
    }

    async fn load_scripts(&self) -> Shas {
        let mut conn = Resp::connect(&self.socket).await.expect("connect redis");
        Shas {
            acquire: conn.script_load(ACQUIRE).await,
            save: conn.script_load(SAVE).await,
            release: conn.script_load(RELEASE).await,
        }
    }
}

#[derive(Debug)]
enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

/// One RESP connection: requests are arrays of bulk strings.
struct Resp {
    io: BufReader<UnixStream>,
    out: Vec<u8>,
}

impl Resp {
    async fn connect(socket: &Path) -> io::Result<Self> {
        Ok(Self {
            io: BufReader::new(UnixStream::connect(socket).await?),
            out: Vec::with_capacity(4096),
        })
    }

    async fn call(&mut self, args: &[&[u8]]) -> io::Result<Reply> {
        self.out.clear();
        self.out
            .extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for arg in args {
            self.out
                .extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            self.out.extend_from_slice(arg);
            self.out.extend_from_slice(b"\r\n");
        }
        self.io.get_mut().write_all(&self.out).await?;
        read_reply(&mut self.io).await
    }

    async fn script_load(&mut self, script: &str) -> String {
        match self
            .call(&[b"SCRIPT", b"LOAD", script.as_bytes()])
            .await
            .expect("script load")
        {
            Reply::Bulk(Some(sha)) => String::from_utf8(sha).expect("sha"),
            other => panic!("SCRIPT LOAD: {other:?}"),
        }
    }

    /// `EVALSHA sha 1 key args...`, with a Redis error turned into `Err`.
    async fn evalsha(
        &mut self,
        sha: &str,
        key: &[u8],
        args: &[&[u8]],
    ) -> io::Result<Result<Reply, String>> {
        let mut all: Vec<&[u8]> = vec![b"EVALSHA", sha.as_bytes(), b"1", key];
        all.extend_from_slice(args);
        Ok(match self.call(&all).await? {
            Reply::Error(err) => Err(err),
            reply => Ok(reply),
        })
    }
}

/// One session's connection with what its scripts need besides the key:
/// the scripts' SHAs and the owner name it acquires as.
struct Session {
    resp: Resp,
    shas: Shas,
    me: String,
}

impl Session {
    /// Connects a session that acquires as `me`.
    async fn connect(socket: &Path, shas: &Shas, me: String) -> Self {
        Self {
            resp: Resp::connect(socket).await.expect("connect redis"),
            shas: shas.clone(),
            me,
        }
    }
}

/// A lease is the profile's key with the epoch the acquire script granted,
/// which the save and release scripts check along with the owner.
impl Leases for Session {
    type Lease = (String, u64);

    /// The key already holds the store, as its `store:` prefix.
    async fn acquire(&mut self, _store: &'static str, key: String) -> Option<(String, u64)> {
        match self
            .resp
            .evalsha(&self.shas.acquire, key.as_bytes(), &[self.me.as_bytes()])
            .await
            .expect("redis acquire")
        {
            Ok(Reply::Array(Some(items))) => match items.first() {
                Some(Reply::Int(epoch)) => Some((key, u64::try_from(*epoch).expect("epoch"))),
                other => panic!("acquire reply: {other:?}"),
            },
            Err(err) if err.contains("TAKEN") => None,
            other => panic!("acquire reply: {other:?}"),
        }
    }

    async fn save(&mut self, (key, epoch): &(String, u64), data: &[u8]) {
        let epoch = epoch.to_string();
        let args = [self.me.as_bytes(), epoch.as_bytes(), data];
        match self
            .resp
            .evalsha(&self.shas.save, key.as_bytes(), &args)
            .await
            .expect("redis save")
        {
            Ok(Reply::Int(1)) => {}
            other => panic!("save reply: {other:?}"),
        }
    }

    async fn release(&mut self, (key, epoch): (String, u64)) {
        let epoch = epoch.to_string();
        let args = [self.me.as_bytes(), epoch.as_bytes()];
        match self
            .resp
            .evalsha(&self.shas.release, key.as_bytes(), &args)
            .await
            .expect("redis release")
        {
            Ok(Reply::Int(1)) => {}
            other => panic!("release reply: {other:?}"),
        }
    }

    async fn ping(&mut self) {
        match self.resp.call(&[b"PING"]).await.expect("redis ping") {
            Reply::Simple(status) if status == "PONG" => {}
            other => panic!("ping reply: {other:?}"),
        }
    }
}

fn read_reply<'a>(
    io: &'a mut BufReader<UnixStream>,
) -> Pin<Box<dyn Future<Output = io::Result<Reply>> + Send + 'a>> {
    Box::pin(async move {
        let mut line = Vec::new();
        io.read_until(b'\n', &mut line).await?;
        if line.len() < 3 || !line.ends_with(b"\r\n") {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "short RESP line",
            ));
        }
        let kind = line[0];
        let body = String::from_utf8_lossy(&line[1..line.len() - 2]).into_owned();
        let number = || {
            body.parse::<i64>()
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad RESP number"))
        };
        Ok(match kind {
            b'+' => Reply::Simple(body),
            b'-' => Reply::Error(body),
            b':' => Reply::Int(number()?),
            b'$' => {
                let len = number()?;
                if len < 0 {
                    Reply::Bulk(None)
                } else {
                    let mut buf = vec![0; usize::try_from(len).expect("len") + 2];
                    io.read_exact(&mut buf).await?;
                    buf.truncate(buf.len() - 2);
                    Reply::Bulk(Some(buf))
                }
            }
            b'*' => {
                let len = number()?;
                if len < 0 {
                    Reply::Array(None)
                } else {
                    let mut items = Vec::new();
                    for _ in 0..len {
                        items.push(read_reply(io).await?);
                    }
                    Reply::Array(Some(items))
                }
            }
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unknown RESP type {:?}", other as char),
                ));
            }
        })
    })
}
