//! The NBD crate's own test harness: an in-process server on a Unix socket in a tempdir. The
//! helpers every suite shares (external tools, patterns, SHA-256, the raw NBD client) come from
//! mvsnap-testkit, re-exported here.
#![allow(dead_code)]

pub use mvsnap_testkit::*;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mvsnap_nbd::memory::{MemExport, MemRegistry};
use mvsnap_nbd::{bind_unix, NbdServer};

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
