//! The server: accept loops, the table of live connections, and clean endings
//! (`disconnect` one export, `shutdown` everything).
//!
//! Each connection is registered with a stop signal before it is spawned. Stopping a
//! connection stops it reading requests; requests already in flight finish and are answered
//! before the socket closes, as the spec asks of a server that shuts down.
//!
//! Plain connections are handed to a blocking thread for the transmission phase (see
//! `transmission/threaded.rs`); TLS connections stay on tokio (`transmission::serve`), as the
//! TLS session lives in the async stream.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, BufReader, BufWriter, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::handshake::{self, Outcome, Session, Tls};
use crate::tls::TlsConfig;
use crate::transmission::{self, BlockingSocket};
use crate::ExportRegistry;

/// An NBD server over an [`ExportRegistry`]. Cheap to clone: clones share one server, so one
/// clone can run `serve_unix` while another calls `disconnect` or `shutdown`.
#[derive(Clone)]
pub struct NbdServer {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Arc<dyn ExportRegistry>,
    state: Mutex<State>,
    /// Flips to true once, on shutdown; accept loops watch it.
    shutdown: watch::Sender<bool>,
}

#[derive(Default)]
struct State {
    next_id: u64,
    shutting_down: bool,
    conns: HashMap<u64, Conn>,
}

struct Conn {
    /// Set once the connection is in the transmission phase.
    export: Option<String>,
    /// Tells the connection to stop reading requests and close after in-flight ones.
    stop: watch::Sender<bool>,
    /// Closed (sender dropped) when the connection has ended.
    done: watch::Receiver<()>,
}

/// A connection's view of its stop signal.
pub(crate) struct StopSignal(watch::Receiver<bool>);

impl StopSignal {
    /// Resolves once the server wants this connection to end.
    pub(crate) async fn stopped(&mut self) {
        // An error means the sender is gone, which only happens as the connection ends.
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

/// A connection's entry in the table; dropping it removes the entry and wakes waiters.
struct Registration {
    inner: Arc<Inner>,
    id: u64,
    _done: watch::Sender<()>,
}

impl Registration {
    fn set_export(&self, name: &str) {
        if let Some(c) = self.inner.state.lock().conns.get_mut(&self.id) {
            c.export = Some(name.to_owned());
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.inner.state.lock().conns.remove(&self.id);
    }
}

impl NbdServer {
    pub fn new(registry: Arc<dyn ExportRegistry>) -> Self {
        let (shutdown, _) = watch::channel(false);
        NbdServer {
            inner: Arc::new(Inner {
                registry,
                state: Mutex::new(State::default()),
                shutdown,
            }),
        }
    }

    /// Accept connections on a Unix socket until [`NbdServer::shutdown`]; returns `Ok` once
    /// shut down and every connection has closed.
    pub async fn serve_unix(&self, listener: UnixListener) -> io::Result<()> {
        let mut shutdown = self.inner.shutdown.subscribe();
        loop {
            let accepted = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => break,
                r = listener.accept() => r,
            };
            match accepted {
                Ok((stream, _addr)) => {
                    self.spawn_connection(stream, Some(unix_to_blocking), None, "unix".to_owned())
                }
                Err(e) => accept_error(e).await?,
            }
        }
        self.wait_idle().await;
        Ok(())
    }

    /// Accept connections on a TCP socket until [`NbdServer::shutdown`]; returns `Ok` once
    /// shut down and every connection has closed.
    pub async fn serve_tcp(&self, listener: TcpListener) -> io::Result<()> {
        self.accept_tcp(listener, None).await
    }

    /// [`NbdServer::serve_tcp`] with TLS required (the spec's FORCEDTLS mode): a client must
    /// send `NBD_OPT_STARTTLS` and complete the TLS handshake before any other option is
    /// served; the rest of the connection, transmission included, is encrypted.
    pub async fn serve_tcp_tls(&self, listener: TcpListener, tls: TlsConfig) -> io::Result<()> {
        self.accept_tcp(listener, Some(tls)).await
    }

    async fn accept_tcp(&self, listener: TcpListener, tls: Option<TlsConfig>) -> io::Result<()> {
        let mut shutdown = self.inner.shutdown.subscribe();
        loop {
            let accepted = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => break,
                r = listener.accept() => r,
            };
            match accepted {
                Ok((stream, addr)) => {
                    // The spec asks both ends to disable Nagle: requests and replies are small
                    // messages that must not wait for an ACK.
                    if let Err(e) = stream.set_nodelay(true) {
                        debug!(error = %e, "TCP_NODELAY");
                    }
                    self.spawn_connection(
                        stream,
                        Some(tcp_to_blocking),
                        tls.clone(),
                        addr.to_string(),
                    );
                }
                Err(e) => accept_error(e).await?,
            }
        }
        self.wait_idle().await;
        Ok(())
    }

    /// Serve one already-connected byte stream to completion (handshake, then transmission)
    /// on the current task. `serve_unix`/`serve_tcp` use this for every connection; it also
    /// lets tests and fuzzers drive a connection over an in-memory stream, and a caller with
    /// an inherited socket serve it directly.
    pub async fn serve_stream<S>(&self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let (reg, stop) = self.register();
        run_connection(
            self.inner.clone(),
            stream,
            None,
            None,
            reg,
            stop,
            "stream".to_owned(),
        )
        .await;
    }

    /// Serve one accepted (or inherited) Unix socket to completion, as `serve_unix` serves
    /// each connection: async handshake, then the threaded transmission phase.
    pub async fn serve_unix_stream(&self, stream: tokio::net::UnixStream) {
        let (reg, stop) = self.register();
        run_connection(
            self.inner.clone(),
            stream,
            Some(unix_to_blocking),
            None,
            reg,
            stop,
            "unix".to_owned(),
        )
        .await;
    }

    /// Names of exports with at least one connection in the transmission phase, sorted.
    pub fn open_exports(&self) -> Vec<String> {
        let st = self.inner.state.lock();
        let mut v: Vec<String> = st.conns.values().filter_map(|c| c.export.clone()).collect();
        v.sort();
        v.dedup();
        v
    }

    /// End every connection on `export` cleanly: each stops reading requests, finishes and
    /// answers those in flight, then closes. Returns once all have closed.
    pub async fn disconnect(&self, export: &str) {
        let waits: Vec<watch::Receiver<()>> = {
            let st = self.inner.state.lock();
            st.conns
                .values()
                .filter(|c| c.export.as_deref() == Some(export))
                .map(|c| {
                    c.stop.send_replace(true);
                    c.done.clone()
                })
                .collect()
        };
        info!(export, connections = waits.len(), "disconnecting export");
        for mut done in waits {
            let _ = done.changed().await;
        }
    }

    /// Stop accepting, end every connection as [`NbdServer::disconnect`] does, and return
    /// once all have closed. `serve_*` then return `Ok`.
    pub async fn shutdown(&self) {
        {
            let mut st = self.inner.state.lock();
            st.shutting_down = true;
            for c in st.conns.values() {
                c.stop.send_replace(true);
            }
        }
        self.inner.shutdown.send_replace(true);
        info!("NBD server shutting down");
        self.wait_idle().await;
    }

    /// Wait until no connection is left (used after shutdown: none can be added).
    async fn wait_idle(&self) {
        let waits: Vec<watch::Receiver<()>> = {
            let st = self.inner.state.lock();
            st.conns.values().map(|c| c.done.clone()).collect()
        };
        for mut done in waits {
            let _ = done.changed().await;
        }
    }

    /// Add a connection to the table. After shutdown it starts out stopped, so a connection
    /// accepted in that window closes at once.
    fn register(&self) -> (Registration, StopSignal) {
        let mut st = self.inner.state.lock();
        let id = st.next_id;
        st.next_id += 1;
        let (stop, stop_rx) = watch::channel(st.shutting_down);
        let (done_tx, done) = watch::channel(());
        st.conns.insert(
            id,
            Conn {
                export: None,
                stop,
                done,
            },
        );
        let reg = Registration {
            inner: self.inner.clone(),
            id,
            _done: done_tx,
        };
        (reg, StopSignal(stop_rx))
    }

    fn spawn_connection<S>(
        &self,
        stream: S,
        to_blocking: Option<ToBlocking<S>>,
        tls: Option<TlsConfig>,
        peer: String,
    ) where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        // Registered before spawning so `shutdown` and `serve_*` can wait for it.
        let (reg, stop) = self.register();
        tokio::spawn(run_connection(
            self.inner.clone(),
            stream,
            to_blocking,
            tls,
            reg,
            stop,
            peer,
        ));
    }
}

/// Turns a connected socket into a blocking one for the threaded transmission phase.
type ToBlocking<S> = fn(S) -> io::Result<BlockingSocket>;

fn unix_to_blocking(s: tokio::net::UnixStream) -> io::Result<BlockingSocket> {
    let s = s.into_std()?;
    s.set_nonblocking(false)?;
    Ok(BlockingSocket::Unix(s))
}

fn tcp_to_blocking(s: tokio::net::TcpStream) -> io::Result<BlockingSocket> {
    let s = s.into_std()?;
    s.set_nonblocking(false)?;
    Ok(BlockingSocket::Tcp(s))
}

/// Transient accept errors (a client that reset early, fd exhaustion) must not stop the
/// server; back off briefly on resource errors. Anything else is returned.
async fn accept_error(e: io::Error) -> io::Result<()> {
    use io::ErrorKind as K;
    match e.kind() {
        K::ConnectionAborted | K::ConnectionReset | K::Interrupted | K::WouldBlock => Ok(()),
        _ => match e.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                warn!(error = %e, "accept failed; backing off");
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok(())
            }
            Some(libc::EPROTO | libc::EPERM) => Ok(()),
            _ => Err(e),
        },
    }
}

/// How long a client may take to reach the transmission phase. Real clients need
/// milliseconds; the limit keeps clients that connect and stall from piling up (qemu-nbd
/// has a similar limit).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// Log a connection's end: protocol violations are warnings, I/O failures (a client that
/// went away) are routine.
fn log_end(peer: &str, export: Option<&str>, e: &io::Error) {
    if e.kind() == io::ErrorKind::InvalidData {
        warn!(peer, export, error = %e, "protocol error; closing connection");
    } else {
        debug!(peer, export, error = %e, "connection I/O error");
    }
}

/// Run a handshake step (option haggling, the TLS handshake) unless the server stops the
/// connection or the handshake's deadline passes first (`None` then: just close).
async fn within<F: Future>(
    stop: &mut StopSignal,
    deadline: Instant,
    peer: &str,
    step: F,
) -> Option<F::Output> {
    tokio::select! {
        biased;
        _ = stop.stopped() => {
            debug!(peer, "stopped during handshake");
            None
        }
        r = tokio::time::timeout_at(deadline, step) => match r {
            Ok(r) => Some(r),
            Err(_) => {
                warn!(peer, "handshake timed out");
                None
            }
        },
    }
}

type Reader<S> = BufReader<ReadHalf<S>>;
type Writer<S> = BufWriter<WriteHalf<S>>;

fn buffered<S: AsyncRead + AsyncWrite>(stream: S) -> (Reader<S>, Writer<S>) {
    let (rd, wr) = tokio::io::split(stream);
    (BufReader::with_capacity(64 * 1024, rd), BufWriter::new(wr))
}

async fn run_connection<S>(
    inner: Arc<Inner>,
    stream: S,
    to_blocking: Option<ToBlocking<S>>,
    tls: Option<TlsConfig>,
    reg: Registration,
    mut stop: StopSignal,
    peer: String,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    debug!(peer, "connection opened");
    // One deadline for all of the handshake, TLS included.
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let (mut rd, mut wr) = buffered(stream);
    let mode = if tls.is_some() {
        Tls::Required
    } else {
        Tls::Off
    };
    let negotiated = handshake::negotiate(&mut rd, &mut wr, &inner.registry, mode);
    let Some(outcome) = within(&mut stop, deadline, &peer, negotiated).await else {
        return;
    };
    let (client, tls) = match (outcome, tls) {
        (Ok(Outcome::StartTls(client)), Some(tls)) => (client, tls),
        (Ok(Outcome::StartTls(_)), None) => {
            // negotiate only acknowledges STARTTLS in Tls::Required.
            warn!(peer, "STARTTLS without TLS configured; closing");
            return;
        }
        (outcome, _) => {
            return finish(outcome, rd, wr, to_blocking, reg, stop, &peer).await;
        }
    };
    // The client waits for the ACK before its TLS hello: anything already read would be
    // plaintext smuggled into the encrypted session.
    if !rd.buffer().is_empty() {
        warn!(peer, "client sent data before the TLS handshake; closing");
        return;
    }
    let stream = rd.into_inner().unsplit(wr.into_inner());
    let accepted = within(&mut stop, deadline, &peer, tls.acceptor.accept(stream)).await;
    let stream = match accepted {
        None => return,
        Some(Err(e)) => {
            // A client that does not trust our certificate, or whose certificate we refuse.
            warn!(peer, error = %e, "TLS handshake failed");
            return;
        }
        Some(Ok(s)) => s,
    };
    {
        let (_, conn) = stream.get_ref();
        debug!(
            peer,
            version = ?conn.protocol_version(),
            suite = ?conn.negotiated_cipher_suite().map(|s| s.suite()),
            client_certificate = conn.peer_certificates().is_some(),
            "TLS established"
        );
    }
    let (mut rd, mut wr) = buffered(stream);
    let negotiated = handshake::options(&mut rd, &mut wr, &inner.registry, client, Tls::Active);
    let Some(outcome) = within(&mut stop, deadline, &peer, negotiated).await else {
        return;
    };
    finish(outcome, rd, wr, None, reg, stop, &peer).await;
}

/// The end of the handshake: close, or run the transmission phase on the same stream.
async fn finish<S>(
    outcome: io::Result<Outcome>,
    rd: Reader<S>,
    wr: Writer<S>,
    to_blocking: Option<ToBlocking<S>>,
    reg: Registration,
    stop: StopSignal,
    peer: &str,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let session = match outcome {
        Ok(Outcome::Transmission(session)) => session,
        Ok(Outcome::Closed) => return debug!(peer, "closed during handshake"),
        Ok(Outcome::StartTls(_)) => return warn!(peer, "a second STARTTLS was acknowledged"),
        Err(e) => return log_end(peer, None, &e),
    };
    let name = session.name.clone();
    info!(
        peer,
        export = %name,
        structured = session.structured,
        block_status = session.base_allocation.is_some(),
        "client entered transmission"
    );
    reg.set_export(&name);
    match transmit(session, rd, wr, to_blocking, stop).await {
        Ok(()) => info!(peer, export = %name, "connection closed"),
        Err(e) => log_end(peer, Some(&name), &e),
    }
    drop(reg);
}

async fn transmit<S>(
    session: Session,
    rd: Reader<S>,
    wr: Writer<S>,
    to_blocking: Option<ToBlocking<S>>,
    stop: StopSignal,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    // The handshake flushes after every option, so nothing is left in the buffer.
    let wr = wr.into_inner();
    match to_blocking {
        Some(convert) => {
            // What the handshake read past its end belongs to the first requests.
            let buffered = rd.buffer().to_vec();
            let sock = convert(rd.into_inner().unsplit(wr))?;
            transmission::serve_threaded(sock, buffered, session, stop).await
        }
        None => transmission::serve(rd, wr, session, stop).await,
    }
}

/// Bind a Unix socket listener for NBD: a stale socket file left by a dead server is removed
/// (a live one is not: that is `AddrInUse`), anything else at the path is refused, and the
/// socket is made mode 0600 so only its owner can connect. Call from within a tokio runtime.
pub fn bind_unix(path: impl AsRef<Path>) -> io::Result<UnixListener> {
    let path = path.as_ref();
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running server", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}
