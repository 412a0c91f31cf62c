//! The transmission phase over a real socket, the way nbdkit does it: a few threads per
//! connection take turns reading one request each; each thread then runs its request against
//! the export and writes the reply itself. Nothing is handed from thread to thread on the way,
//! so a request costs one wake-up (the async path costs three: reader task, blocking pool,
//! writer task), and the export's blocking I/O never stalls the runtime. Replies still go out
//! in completion order, so a slow request does not hold up fast ones.
//!
//! The handshake stays async (cheap, bounded by a timeout); the connection's socket is then
//! handed to these threads. The limits are those of the async path: [`WORKERS`] requests and
//! [`MAX_INFLIGHT_BYTES`] of payload in flight.

use std::io::{self, BufRead, BufReader, Cursor, Read, Write};
use std::net::Shutdown;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};
use tracing::{debug, error, warn};

use super::DRAIN_TIMEOUT;
use super::{error_reply, execute, nothing_to_do, ok_reply, rejection_reply, validate};
use super::{Command, Limits, Outgoing};
use super::{MAX_INFLIGHT_BYTES, MAX_INFLIGHT_REQUESTS};
use crate::handshake::Session;
use crate::proto;
use crate::server::StopSignal;

/// Threads per connection: requests one connection may have in flight (nbdkit's default).
pub const WORKERS: usize = 16;
const _: () = assert!(WORKERS <= MAX_INFLIGHT_REQUESTS);

/// A connected stream socket in blocking mode.
pub(crate) enum BlockingSocket {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

impl BlockingSocket {
    fn try_clone(&self) -> io::Result<BlockingSocket> {
        Ok(match self {
            BlockingSocket::Unix(s) => BlockingSocket::Unix(s.try_clone()?),
            BlockingSocket::Tcp(s) => BlockingSocket::Tcp(s.try_clone()?),
        })
    }

    fn shutdown(&self, how: Shutdown) {
        let r = match self {
            BlockingSocket::Unix(s) => s.shutdown(how),
            BlockingSocket::Tcp(s) => s.shutdown(how),
        };
        if let Err(e) = r {
            debug!(error = %e, "socket shutdown");
        }
    }
}

impl Read for BlockingSocket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            BlockingSocket::Unix(s) => s.read(buf),
            BlockingSocket::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for BlockingSocket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            BlockingSocket::Unix(s) => s.write(buf),
            BlockingSocket::Tcp(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            BlockingSocket::Unix(s) => s.write_vectored(bufs),
            BlockingSocket::Tcp(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Payload bytes in flight, as a counting budget (the async path uses a semaphore).
struct Budget {
    left: Mutex<usize>,
    freed: Condvar,
}

struct Grant<'a> {
    budget: &'a Budget,
    n: usize,
}

impl Budget {
    fn take(&self, n: usize) -> Grant<'_> {
        let mut left = self.left.lock();
        while *left < n {
            self.freed.wait(&mut left);
        }
        *left -= n;
        Grant { budget: self, n }
    }
}

impl Drop for Grant<'_> {
    fn drop(&mut self) {
        *self.budget.left.lock() += self.n;
        self.budget.freed.notify_all();
    }
}

struct Shared {
    session: Session,
    lim: Limits,
    /// A std mutex, not parking_lot's: its holder sits in `recv` until the client sends, and
    /// parking_lot's waiters spin with `sched_yield` first (every worker back from a request,
    /// at every request: ~2.7 yields per 4 KiB write measured, on 2 cores). std's spins
    /// briefly, then sleeps on the futex.
    reader: std::sync::Mutex<BufReader<std::io::Chain<Cursor<Vec<u8>>, BlockingSocket>>>,
    writer: Mutex<BlockingSocket>,
    /// Kept to shut the socket down from outside the workers.
    socket: BlockingSocket,
    /// Set once the connection is ending: no worker reads another request.
    ending: AtomicBool,
    /// Set when the server stops the connection: requests still arriving (already in our
    /// buffer or the socket's) are read to the end and answered ESHUTDOWN, never dropped.
    draining: AtomicBool,
    budget: Budget,
    /// The first protocol error; the connection's result.
    error: Mutex<Option<io::Error>>,
}

enum Next<'a> {
    Run {
        handle: u64,
        cmd: Command,
        payload: Vec<u8>,
        _grant: Option<Grant<'a>>,
    },
    Reply(Outgoing),
    Disconnect,
    Eof,
}

fn is_eof(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::UnexpectedEof
}

impl Shared {
    /// Stop reading requests: wakes the worker blocked reading (it sees end of stream).
    fn end(&self) {
        if !self.ending.swap(true, Ordering::AcqRel) {
            self.socket.shutdown(Shutdown::Read);
        }
    }

    /// The server stops the connection: no new request runs, the ones read from now on get
    /// ESHUTDOWN. Shutting the reading half wakes the worker blocked reading; what the client
    /// had already sent is still read, then end of stream.
    fn stop(&self) {
        if !self.draining.swap(true, Ordering::AcqRel) {
            self.socket.shutdown(Shutdown::Read);
        }
    }

    /// Read and check one request (and a WRITE's payload); the caller holds the reader.
    fn next_request<R: BufRead>(&self, rd: &mut R) -> io::Result<Next<'_>> {
        let lim = &self.lim;
        let mut hdr = [0u8; proto::REQUEST_LEN];
        match rd.read_exact(&mut hdr) {
            Ok(()) => {}
            Err(e) if is_eof(&e) => return Ok(Next::Eof),
            Err(e) => return Err(e),
        }
        let req = proto::decode_request(&hdr)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.0))?;
        let mut payload = Vec::new();
        let mut grant = None;
        if req.command == proto::CMD_WRITE {
            if req.length <= lim.max_payload {
                grant = Some(self.budget.take(req.length as usize));
                payload = vec![0u8; req.length as usize];
                match rd.read_exact(&mut payload) {
                    Ok(()) => {}
                    Err(e) if is_eof(&e) => return Ok(Next::Eof),
                    Err(e) => return Err(e),
                }
            } else {
                // Too long to buffer: thrown away in pieces, so framing stays intact.
                let n = io::copy(&mut rd.take(u64::from(req.length)), &mut io::sink())?;
                if n != u64::from(req.length) {
                    return Ok(Next::Eof);
                }
            }
        }
        let cmd = match validate(&req, lim) {
            Ok(cmd) => cmd,
            Err(rej) => return Ok(Next::Reply(rejection_reply(&req, lim, rej))),
        };
        match cmd {
            Command::Disc => Ok(Next::Disconnect),
            _ if nothing_to_do(&cmd) => Ok(Next::Reply(ok_reply(req.handle, lim.structured))),
            _ => {
                if let Command::Read { length, .. } = cmd {
                    grant = Some(self.budget.take(length as usize));
                }
                Ok(Next::Run {
                    handle: req.handle,
                    cmd,
                    payload,
                    _grant: grant,
                })
            }
        }
    }

    /// Write one reply whole. A failure means the client is gone: the connection ends.
    fn send(&self, out: &Outgoing) {
        let mut w = self.writer.lock();
        let r = if out.data.is_empty() {
            w.write_all(&out.header)
        } else {
            write_all_vectored(&mut *w, &out.header, &out.data)
        };
        if let Err(e) = r {
            drop(w);
            debug!(export = %self.session.name, error = %e, "writing a reply failed");
            self.end();
        }
    }

    fn worker(&self) {
        loop {
            let next = {
                // A panic cannot leave the reader half used: none happens while it is held
                // but a bug's, and the connection ends then anyway.
                let mut rd = self.reader.lock().unwrap_or_else(|e| e.into_inner());
                if self.ending.load(Ordering::Acquire) {
                    return;
                }
                self.next_request(&mut *rd)
            };
            match next {
                Ok(Next::Run { handle, .. }) if self.draining.load(Ordering::Acquire) => {
                    let s = &self.session;
                    self.send(&error_reply(
                        handle,
                        s.structured,
                        proto::ESHUTDOWN,
                        "server is shutting down",
                    ));
                }
                Ok(Next::Run {
                    handle,
                    cmd,
                    payload,
                    _grant,
                }) => {
                    let s = &self.session;
                    let out = catch_unwind(AssertUnwindSafe(|| execute(s, handle, cmd, payload)))
                        .unwrap_or_else(|_| {
                            error!(export = %s.name, ?cmd, "export panicked");
                            error_reply(handle, s.structured, proto::EIO, "internal error")
                        });
                    self.send(&out);
                }
                Ok(Next::Reply(out)) => self.send(&out),
                Ok(Next::Disconnect) => {
                    debug!(export = %self.session.name, "client sent NBD_CMD_DISC");
                    self.end();
                    return;
                }
                Ok(Next::Eof) => {
                    if !self.ending.load(Ordering::Acquire)
                        && !self.draining.load(Ordering::Acquire)
                    {
                        debug!(export = %self.session.name, "client hung up");
                    }
                    self.end();
                    return;
                }
                Err(e) => {
                    self.error.lock().get_or_insert(e);
                    self.end();
                    return;
                }
            }
        }
    }
}

/// `write_all` of two buffers with as few syscalls as the socket allows.
fn write_all_vectored(w: &mut impl Write, a: &[u8], b: &[u8]) -> io::Result<()> {
    let (mut a, mut b) = (a, b);
    while !a.is_empty() {
        let n = w.write_vectored(&[io::IoSlice::new(a), io::IoSlice::new(b)])?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let from_a = n.min(a.len());
        a = &a[from_a..];
        b = &b[n - from_a..];
    }
    w.write_all(b)
}

/// Serve requests until the client disconnects or hangs up, a protocol error, or `stop`.
/// `buffered` holds bytes the handshake read past its end (a client may pipeline requests).
/// In every case, requests already in flight finish and are answered first.
pub(crate) async fn serve(
    socket: BlockingSocket,
    buffered: Vec<u8>,
    session: Session,
    mut stop: StopSignal,
) -> io::Result<()> {
    let lim = Limits::for_session(&session);
    let name = session.name.clone();
    let shared = Arc::new(Shared {
        session,
        lim,
        reader: std::sync::Mutex::new(BufReader::with_capacity(
            64 * 1024,
            Cursor::new(buffered).chain(socket.try_clone()?),
        )),
        writer: Mutex::new(socket.try_clone()?),
        socket,
        ending: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        budget: Budget {
            left: Mutex::new(MAX_INFLIGHT_BYTES),
            freed: Condvar::new(),
        },
        error: Mutex::new(None),
    });
    let (done_tx, mut done) = tokio::sync::oneshot::channel::<()>();
    let mut workers = Vec::with_capacity(WORKERS);
    for i in 0..WORKERS {
        let s = shared.clone();
        match std::thread::Builder::new()
            .name(format!("nbd-worker-{i}"))
            .spawn(move || s.worker())
        {
            Ok(h) => workers.push(h),
            // Fewer workers only means fewer requests in flight; none means no service.
            Err(e) if i > 0 => {
                warn!(error = %e, workers = i, "could not start every connection thread");
                break;
            }
            Err(e) => return Err(e),
        }
    }
    std::thread::Builder::new()
        .name("nbd-join".into())
        .spawn(move || {
            for w in workers {
                let _ = w.join();
            }
            let _ = done_tx.send(());
        })?;
    tokio::select! {
        _ = &mut done => {}
        _ = stop.stopped() => {
            shared.stop();
            if tokio::time::timeout(DRAIN_TIMEOUT, &mut done).await.is_err() {
                warn!(export = %name, "replies did not drain in time; dropping connection");
                shared.socket.shutdown(Shutdown::Both);
                let _ = done.await;
            }
        }
    }
    shared.socket.shutdown(Shutdown::Both);
    let err = shared.error.lock().take();
    match err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
