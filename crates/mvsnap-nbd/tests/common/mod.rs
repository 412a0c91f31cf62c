//! Shared test harness: an in-process server on a Unix socket in a tempdir, external-tool
//! helpers, and a small blocking raw NBD client for hand-made protocol tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mvsnap_nbd::memory::{MemExport, MemRegistry};
use mvsnap_nbd::proto::{self, ReplyHeader};
use mvsnap_nbd::{bind_unix, NbdServer};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "mvsnap_nbd=info".into()),
        )
        .try_init();
}

/// A server running on its own tokio runtime (worker threads), listening on a socket in a
/// tempdir. Dropping it shuts the server down and checks `serve_unix` returned `Ok`.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    pub server: NbdServer,
    pub rt: tokio::runtime::Runtime,
    pub exports: HashMap<String, Arc<MemExport>>,
    /// The same server also listens on TCP, on loopback.
    pub tcp: std::net::SocketAddr,
    serve: Vec<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    /// Start with (name, description, export) triples.
    pub fn start(exports: Vec<(&str, &str, MemExport)>) -> TestServer {
        init_tracing();
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("nbd.sock");
        let mut reg = MemRegistry::new();
        let mut map = HashMap::new();
        for (name, desc, e) in exports {
            map.insert(name.to_string(), reg.add(name, desc, e));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap();
        let server = NbdServer::new(Arc::new(reg));
        let listener = {
            let _g = rt.enter();
            bind_unix(&sock).unwrap()
        };
        let tcp_listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let tcp = tcp_listener.local_addr().unwrap();
        let s = server.clone();
        let serve_unix = rt.spawn(async move { s.serve_unix(listener).await });
        let s = server.clone();
        let serve_tcp = rt.spawn(async move { s.serve_tcp(tcp_listener).await });
        TestServer {
            dir,
            sock,
            server,
            rt,
            exports: map,
            tcp,
            serve: vec![serve_unix, serve_tcp],
        }
    }

    pub fn export(&self, name: &str) -> Arc<MemExport> {
        self.exports[name].clone()
    }

    /// `nbd+unix:///NAME?socket=PATH`
    pub fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.sock.display())
    }

    /// `nbd://127.0.0.1:PORT/NAME`
    pub fn tcp_uri(&self, name: &str) -> String {
        format!("nbd://{}/{name}", self.tcp)
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    pub fn connect(&self) -> RawClient {
        RawClient::connect(&self.sock)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let server = self.server.clone();
        let serve = std::mem::take(&mut self.serve);
        let r = self.rt.block_on(async move {
            tokio::time::timeout(Duration::from_secs(60), async move {
                server.shutdown().await;
                for h in serve {
                    h.await.expect("serve task panicked")?;
                }
                Ok::<(), std::io::Error>(())
            })
            .await
        });
        if !std::thread::panicking() {
            r.expect("shutdown timed out").expect("serve_unix failed");
        }
    }
}

/// Find an external tool. Missing: fail if `MVSNAP_REQUIRE_TOOLS=1`, else say so and `None`.
pub fn tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(name);
        if p.is_file() {
            return Some(p);
        }
    }
    if std::env::var("MVSNAP_REQUIRE_TOOLS").as_deref() == Ok("1") {
        panic!("{name} not found and MVSNAP_REQUIRE_TOOLS=1");
    }
    // Written to the real stderr, past the test harness's capture, so it is always seen.
    let _ = writeln!(std::io::stderr(), "skipped: {name} not found");
    None
}

/// `let Some(qemu_io) = need!("qemu-io") else { return };` shorthand.
#[macro_export]
macro_rules! need {
    ($name:expr) => {
        match common::tool($name) {
            Some(p) => p,
            None => return,
        }
    };
}

/// Run a command with a deadline, so a hung client fails the test instead of hanging it.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {desc}: {e}"));
    // Drain pipes on threads so a chatty child cannot block on a full pipe.
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!("timed out after {timeout:?}: {desc}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    };
    eprintln!(
        "$ {desc}\n-> {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run and require success; returns stdout+stderr as text.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd, Duration::from_secs(180));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "command failed: {cmd:?}\n{text}");
    text
}

pub fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(data);
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// Deterministic pseudo-random bytes.
pub fn pattern_bytes(seed: u64, len: usize) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

// ---------------------------------------------------------------------------------------------
// A raw blocking client
// ---------------------------------------------------------------------------------------------

/// One reply to an option: type and data.
pub type OptReply = (u32, Vec<u8>);

/// A structured chunk: header plus payload.
#[derive(Debug)]
pub struct Chunk {
    pub flags: u16,
    pub reply_type: u16,
    pub handle: u64,
    pub payload: Vec<u8>,
}

/// Over a Unix socket by default; any byte stream (TCP, TLS) will do.
pub struct RawClient<S = UnixStream> {
    pub s: S,
}

impl RawClient {
    pub fn connect(sock: &Path) -> RawClient {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        RawClient { s }
    }
}

impl<S: Read + Write> RawClient<S> {
    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    pub fn recv(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v).unwrap();
        v
    }

    /// True once the server has closed its side (EOF, or reset).
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => {
                assert_ne!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock,
                    "server did not close"
                );
                true
            }
        }
    }

    /// Read the greeting and send client flags.
    pub fn greet(&mut self, client_flags: u32) {
        let g = self.recv(18);
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(u16::from_be_bytes([g[16], g[17]]), 3);
        self.send(&client_flags.to_be_bytes());
    }

    pub fn send_option(&mut self, opt: u32, data: &[u8]) {
        let mut b = proto::encode_option_header(opt, data.len() as u32).to_vec();
        b.extend_from_slice(data);
        self.send(&b);
    }

    pub fn read_option_reply(&mut self, opt: u32) -> OptReply {
        let h = self.recv(proto::OPTION_REPLY_HEADER_LEN);
        let h = proto::decode_option_reply_header(h.as_slice().try_into().unwrap()).unwrap();
        assert_eq!(h.option, opt);
        let data = self.recv(h.length as usize);
        (h.reply_type, data)
    }

    /// Send an option and collect replies up to the final one (ACK or an error).
    pub fn option(&mut self, opt: u32, data: &[u8]) -> Vec<OptReply> {
        self.send_option(opt, data);
        let mut v = Vec::new();
        loop {
            let r = self.read_option_reply(opt);
            let last = r.0 == proto::REP_ACK || r.0 & (1 << 31) != 0;
            v.push(r);
            if last {
                return v;
            }
        }
    }

    /// Greet, optionally negotiate structured replies and `base:allocation`, then GO.
    /// Returns (size, transmission flags).
    pub fn handshake(&mut self, name: &str, structured: bool, meta: bool) -> (u64, u16) {
        self.greet(3);
        if structured {
            let r = self.option(proto::OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(r, vec![(proto::REP_ACK, vec![])]);
        }
        if meta {
            let body = proto::encode_meta_context_request(&proto::MetaContextRequest {
                export: name.into(),
                queries: vec!["base:allocation".into()],
            });
            let r = self.option(proto::OPT_SET_META_CONTEXT, &body);
            assert_eq!(r.len(), 2, "{r:?}");
            assert_eq!(r[0].0, proto::REP_META_CONTEXT);
            assert_eq!(&r[0].1[4..], b"base:allocation");
        }
        self.go(name).expect("GO failed")
    }

    /// NBD_OPT_GO; Ok((size, flags)) or Err(final error reply).
    pub fn go(&mut self, name: &str) -> Result<(u64, u16), OptReply> {
        let body = proto::encode_info_request(&proto::InfoRequest {
            name: name.into(),
            requests: vec![proto::INFO_BLOCK_SIZE],
        });
        let replies = self.option(proto::OPT_GO, &body);
        let last = replies.last().unwrap().clone();
        if last.0 != proto::REP_ACK {
            return Err(last);
        }
        let info = replies
            .iter()
            .find(|r| r.0 == proto::REP_INFO && r.1[0..2] == [0, 0])
            .expect("no NBD_INFO_EXPORT");
        let size = u64::from_be_bytes(info.1[2..10].try_into().unwrap());
        let flags = u16::from_be_bytes(info.1[10..12].try_into().unwrap());
        Ok((size, flags))
    }

    pub fn request(&mut self, command: u16, flags: u16, handle: u64, offset: u64, length: u32) {
        self.send(&proto::encode_request(&proto::Request {
            flags,
            command,
            handle,
            offset,
            length,
        }));
    }

    pub fn write_req(&mut self, handle: u64, offset: u64, data: &[u8]) {
        let mut b = proto::encode_request(&proto::Request {
            flags: 0,
            command: proto::CMD_WRITE,
            handle,
            offset,
            length: data.len() as u32,
        })
        .to_vec();
        b.extend_from_slice(data);
        self.send(&b);
    }

    /// Read one reply header (either kind); for a structured one, its payload too.
    pub fn reply(&mut self) -> Reply {
        let magic = self.recv(4);
        let len = proto::reply_header_len(magic.as_slice().try_into().unwrap()).unwrap();
        let mut h = magic;
        h.extend(self.recv(len - 4));
        match proto::decode_reply_header(&h).unwrap() {
            ReplyHeader::Simple(s) => Reply::Simple {
                handle: s.handle,
                error: s.error,
            },
            ReplyHeader::Structured(c) => {
                let payload = self.recv(c.length as usize);
                Reply::Chunk(Chunk {
                    flags: c.flags,
                    reply_type: c.reply_type,
                    handle: c.handle,
                    payload,
                })
            }
        }
    }

    /// A simple reply's (handle, error); panics on a structured one.
    pub fn simple(&mut self) -> (u64, u32) {
        match self.reply() {
            Reply::Simple { handle, error } => (handle, error),
            other => panic!("expected a simple reply, got {other:?}"),
        }
    }

    pub fn chunk(&mut self) -> Chunk {
        match self.reply() {
            Reply::Chunk(c) => c,
            other => panic!("expected a structured chunk, got {other:?}"),
        }
    }

    /// NBD_CMD_DISC, then the server must close.
    pub fn disconnect(mut self) {
        self.request(proto::CMD_DISC, 0, 0, 0, 0);
        assert!(self.is_closed());
    }
}

#[derive(Debug)]
pub enum Reply {
    Simple { handle: u64, error: u32 },
    Chunk(Chunk),
}
