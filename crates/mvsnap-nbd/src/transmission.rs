//! The transmission phase.
//!
//! Real sockets are served by threads (`threaded`: nbdkit's model, the fast path). Any other
//! byte stream (tests, fuzzing, an in-memory pipe) is served by the async path below:
//! one reader (the connection task) parses requests, checks them, and hands each to tokio's
//! blocking pool, where the export does the work and queues the reply. A writer task writes
//! replies whole, one at a time, in the order they complete, so replies go out of order and a
//! slow request does not hold up fast ones.
//!
//! What a client can make us hold is bounded: at most [`MAX_INFLIGHT_REQUESTS`] requests and
//! [`MAX_INFLIGHT_BYTES`] of read/write payload per connection are in flight (permits are
//! taken before a payload is buffered and released once the reply is written), and no single
//! READ or WRITE may exceed the advertised maximum block size (at most 32 MiB).
//!
//! A WRITE longer than the maximum is answered with EINVAL after its payload has been read
//! and thrown away in small pieces (never buffered), so the client keeps its connection and
//! framing stays intact. A bad request magic means framing is lost: the connection closes.

use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, error, warn};

use crate::handshake::Session;
use crate::proto::{self, Descriptor, Request};
use crate::server::StopSignal;
use crate::{nbd_errno, BlockSizes, Export, Extent};

/// Most requests one connection may have in flight; the reader waits for a slot.
pub const MAX_INFLIGHT_REQUESTS: usize = 64;
/// Most read/write payload bytes one connection may have in flight.
pub const MAX_INFLIGHT_BYTES: usize = 64 * 1024 * 1024;
/// Most descriptors in one block status reply (512 KiB); clients ask again for the rest.
const MAX_DESCRIPTORS: usize = 64 * 1024;
/// When the server ends a connection (disconnect/shutdown), how long replies to in-flight
/// requests may take to drain before the connection is dropped anyway (a client that stops
/// reading must not hold up shutdown forever).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// When the server stops a connection on the async path, how long it keeps reading what the
/// client had already sent (to answer it ESHUTDOWN) before it stops reading.
const DRAIN_READ_WINDOW: Duration = Duration::from_millis(500);

/// The transmission flags for an export: every flag tells the truth about what we do.
pub(crate) fn transmission_flags(export: &dyn Export, structured: bool) -> u16 {
    let mut f = proto::FLAG_HAS_FLAGS | proto::FLAG_SEND_FLUSH | proto::FLAG_SEND_CACHE;
    if export.read_only() {
        // No FUA either: it is about writes (a client that sends it anyway is not refused).
        f |= proto::FLAG_READ_ONLY;
    } else {
        f |= proto::FLAG_SEND_FUA;
        // FAST_ZERO is done where the export zeroes fast and answered ENOTSUP elsewhere.
        f |= proto::FLAG_SEND_TRIM | proto::FLAG_SEND_WRITE_ZEROES | proto::FLAG_SEND_FAST_ZERO;
    }
    if structured {
        // Reads are always answered with one data chunk, so "don't fragment" costs nothing.
        f |= proto::FLAG_SEND_DF;
    }
    if export.can_multi_conn() {
        f |= proto::FLAG_CAN_MULTI_CONN;
    }
    f
}

/// Bring an export's block sizes within what the spec allows and what we will buffer:
/// minimum a power of two ≤ 64 KiB, preferred a power of two ≥ max(minimum, 512), maximum a
/// multiple of the minimum, at least the preferred size, at most 32 MiB.
pub(crate) fn sanitize_block_sizes(b: BlockSizes) -> BlockSizes {
    let minimum = if b.minimum.is_power_of_two() && b.minimum <= 65536 {
        b.minimum
    } else {
        1
    };
    let preferred = if b.preferred.is_power_of_two() && b.preferred >= minimum.max(512) {
        b.preferred.min(proto::MAX_PAYLOAD)
    } else {
        minimum.max(4096)
    };
    let mut maximum = b.maximum.min(proto::MAX_PAYLOAD);
    maximum -= maximum % minimum;
    BlockSizes {
        minimum,
        preferred,
        maximum: maximum.max(preferred),
    }
}

/// What the negotiated session allows; the input to [`validate`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub size: u64,
    pub read_only: bool,
    pub structured: bool,
    /// `base:allocation` was selected, so BLOCK_STATUS is allowed.
    pub block_status: bool,
    pub max_payload: u32,
    /// FAST_ZERO can be honoured (without NO_HOLE).
    pub fast_zero: bool,
}

impl Limits {
    pub(crate) fn for_session(session: &Session) -> Limits {
        Limits {
            size: session.size,
            read_only: session.read_only,
            structured: session.structured,
            block_status: session.base_allocation.is_some(),
            max_payload: session.max_payload,
            fast_zero: session.fast_zero,
        }
    }
}

/// A checked request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Command {
    Read {
        offset: u64,
        length: u32,
    },
    Write {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Disc,
    Flush,
    Trim {
        offset: u64,
        length: u32,
        fua: bool,
    },
    Cache,
    WriteZeroes {
        offset: u64,
        length: u32,
        may_trim: bool,
        fua: bool,
    },
    BlockStatus {
        offset: u64,
        length: u32,
        req_one: bool,
    },
}

/// Why a request is refused: the NBD error and a message for the human at the other end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rejection {
    pub errno: u32,
    pub message: &'static str,
}

fn reject(errno: u32, message: &'static str) -> Rejection {
    Rejection { errno, message }
}

/// Check a request against the session. Pure, so it is unit-tested and fuzzed directly.
///
/// Errors follow the spec and design invariant 6: unknown command or flag → EINVAL; write,
/// trim or write-zeroes on a read-only export → EPERM; a WRITE or WRITE_ZEROES reaching past the
/// end → ENOSPC (the spec's SHOULD, as nbdkit does: a client may retry smaller), any other range
/// past the end → EINVAL;
/// READ/WRITE longer than the maximum block size → EINVAL; BLOCK_STATUS without a selected
/// context → EINVAL; FAST_ZERO → ENOTSUP (fails fast, touches nothing) unless the export zeroes
/// fast and NO_HOLE (which asks for written zeros) is not set.
pub(crate) fn validate(req: &Request, lim: &Limits) -> Result<Command, Rejection> {
    use proto::*;
    let allowed = match req.command {
        CMD_READ if lim.structured => CMD_FLAG_FUA | CMD_FLAG_DF,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        CMD_READ | CMD_WRITE | CMD_DISC | CMD_FLUSH | CMD_TRIM | CMD_CACHE => CMD_FLAG_FUA,
        _ => return Err(reject(EINVAL, "unknown command")),
    };
    if req.flags & !allowed != 0 {
        return Err(reject(EINVAL, "command flag not valid for this command"));
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let (offset, length) = (req.offset, req.length);
    match req.command {
        CMD_DISC => return Ok(Command::Disc),
        // Offset and length are reserved for FLUSH; being lenient costs nothing.
        CMD_FLUSH => return Ok(Command::Flush),
        _ => {}
    }
    if lim.read_only && matches!(req.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES) {
        return Err(reject(EPERM, "export is read-only"));
    }
    if req.command == CMD_BLOCK_STATUS && !lim.block_status {
        return Err(reject(EINVAL, "no metadata context was negotiated"));
    }
    match offset.checked_add(u64::from(length)) {
        Some(end) if end <= lim.size => {}
        _ if matches!(req.command, CMD_WRITE | CMD_WRITE_ZEROES) => {
            return Err(reject(ENOSPC, "write extends beyond the end of the export"));
        }
        _ => {
            return Err(reject(
                EINVAL,
                "request extends beyond the end of the export",
            ))
        }
    }
    if matches!(req.command, CMD_READ | CMD_WRITE) && length > lim.max_payload {
        return Err(reject(EINVAL, "request longer than the maximum block size"));
    }
    Ok(match req.command {
        CMD_READ => Command::Read { offset, length },
        CMD_WRITE => Command::Write {
            offset,
            length,
            fua,
        },
        CMD_TRIM => Command::Trim {
            offset,
            length,
            fua,
        },
        CMD_CACHE => Command::Cache,
        CMD_WRITE_ZEROES => {
            let no_hole = req.flags & CMD_FLAG_NO_HOLE != 0;
            if req.flags & CMD_FLAG_FAST_ZERO != 0 && (no_hole || !lim.fast_zero) {
                return Err(reject(ENOTSUP, "fast zero is not supported here"));
            }
            Command::WriteZeroes {
                offset,
                length,
                may_trim: req.flags & CMD_FLAG_NO_HOLE == 0,
                fua,
            }
        }
        CMD_BLOCK_STATUS => {
            if length == 0 {
                // No descriptor can describe zero bytes.
                return Err(reject(EINVAL, "block status of zero bytes"));
            }
            Command::BlockStatus {
                offset,
                length,
                req_one: req.flags & CMD_FLAG_REQ_ONE != 0,
            }
        }
        _ => return Err(reject(EINVAL, "unknown command")),
    })
}

/// Turn an export's extents into wire descriptors for a request of `length` bytes: zero-length
/// extents dropped, each clipped so the total never exceeds `length`, neighbours with equal
/// flags merged, unknown flag bits cleared, at most 64 Ki descriptors (one with `req_one`).
/// Never empty: with no usable extent it reports the whole range as status 0 ("allocated or
/// unknown"), which the spec says is always safe. `length` must be non-zero.
pub fn normalize_extents(extents: &[Extent], length: u32, req_one: bool) -> Vec<Descriptor> {
    let max = if req_one { 1 } else { MAX_DESCRIPTORS };
    let mut out: Vec<Descriptor> = Vec::new();
    let mut remaining = length;
    for e in extents {
        if remaining == 0 {
            break;
        }
        if e.length == 0 {
            continue;
        }
        let len = e.length.min(u64::from(remaining)) as u32;
        let flags = e.flags & (proto::STATE_HOLE | proto::STATE_ZERO);
        remaining -= len;
        match out.last_mut() {
            Some(last) if last.flags == flags => last.length += len,
            _ => {
                if out.len() == max {
                    break;
                }
                out.push(Descriptor { length: len, flags });
            }
        }
    }
    if out.is_empty() && length > 0 {
        out.push(Descriptor { length, flags: 0 });
    }
    out
}

/// A reply ready to write: a small header part and an optional large data part (kept apart
/// so read data is never copied), plus the in-flight permits it releases once written.
pub(crate) struct Outgoing {
    header: Vec<u8>,
    data: Vec<u8>,
    _permits: Option<Permits>,
}

struct Permits {
    _request: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

impl Outgoing {
    fn new(header: Vec<u8>, data: Vec<u8>) -> Self {
        Outgoing {
            header,
            data,
            _permits: None,
        }
    }

    fn holding(mut self, permits: Permits) -> Self {
        self._permits = Some(permits);
        self
    }
}

/// Success without data: a simple reply, or a structured `NONE` chunk.
fn ok_reply(handle: u64, structured: bool) -> Outgoing {
    let header = if structured {
        proto::encode_structured_header(proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, handle, 0)
            .to_vec()
    } else {
        proto::encode_simple_reply(handle, 0).to_vec()
    };
    Outgoing::new(header, Vec::new())
}

/// Failure: a simple reply with the error (no data, even for a read), or an `ERROR` chunk
/// carrying the message.
fn error_reply(handle: u64, structured: bool, errno: u32, message: &str) -> Outgoing {
    let header = if structured {
        let payload = proto::encode_error_payload(errno, message);
        let mut h = proto::encode_structured_header(
            proto::REPLY_FLAG_DONE,
            proto::REPLY_TYPE_ERROR,
            handle,
            payload.len() as u32,
        )
        .to_vec();
        h.extend_from_slice(&payload);
        h
    } else {
        proto::encode_simple_reply(handle, errno).to_vec()
    };
    Outgoing::new(header, Vec::new())
}

/// Read data: a simple reply followed by the data, or one `OFFSET_DATA` chunk (one chunk
/// also satisfies `NBD_CMD_FLAG_DF`). A zero-length read has no content chunk to send.
fn read_reply(handle: u64, structured: bool, offset: u64, data: Vec<u8>) -> Outgoing {
    if !structured {
        return Outgoing::new(proto::encode_simple_reply(handle, 0).to_vec(), data);
    }
    if data.is_empty() {
        return ok_reply(handle, true);
    }
    let mut h = proto::encode_structured_header(
        proto::REPLY_FLAG_DONE,
        proto::REPLY_TYPE_OFFSET_DATA,
        handle,
        8 + data.len() as u32,
    )
    .to_vec();
    h.extend_from_slice(&offset.to_be_bytes());
    Outgoing::new(h, data)
}

fn block_status_reply(handle: u64, context_id: u32, descriptors: &[Descriptor]) -> Outgoing {
    let payload = proto::encode_block_status_payload(context_id, descriptors);
    let mut h = proto::encode_structured_header(
        proto::REPLY_FLAG_DONE,
        proto::REPLY_TYPE_BLOCK_STATUS,
        handle,
        payload.len() as u32,
    )
    .to_vec();
    h.extend_from_slice(&payload);
    Outgoing::new(h, Vec::new())
}

fn status_reply(handle: u64, structured: bool, what: &str, r: io::Result<()>) -> Outgoing {
    match r {
        Ok(()) => ok_reply(handle, structured),
        Err(e) => io_error_reply(handle, structured, what, &e),
    }
}

fn io_error_reply(handle: u64, structured: bool, what: &str, e: &io::Error) -> Outgoing {
    let errno = nbd_errno(e);
    warn!(op = what, error = %e, errno, "export error");
    error_reply(handle, structured, errno, &format!("{what}: {e}"))
}

/// Run one checked command against the export (on the blocking pool) and build its reply.
fn execute(session: &Session, handle: u64, cmd: Command, payload: Vec<u8>) -> Outgoing {
    let e = &*session.export;
    let st = session.structured;
    match cmd {
        Command::Read { offset, length } => {
            let mut buf = vec![0u8; length as usize];
            match e.read(offset, &mut buf) {
                Ok(()) => read_reply(handle, st, offset, buf),
                Err(err) => io_error_reply(handle, st, "read", &err),
            }
        }
        Command::Write { offset, fua, .. } => {
            status_reply(handle, st, "write", e.write(offset, &payload, fua))
        }
        Command::Flush => status_reply(handle, st, "flush", e.flush()),
        Command::Trim {
            offset,
            length,
            fua,
        } => {
            let r =
                e.trim(offset, u64::from(length))
                    .and_then(|()| if fua { e.flush() } else { Ok(()) });
            status_reply(handle, st, "trim", r)
        }
        Command::WriteZeroes {
            offset,
            length,
            may_trim,
            fua,
        } => {
            let r = e.write_zeroes(offset, u64::from(length), may_trim, fua);
            status_reply(handle, st, "write zeroes", r)
        }
        Command::BlockStatus {
            offset,
            length,
            req_one,
        } => match e.block_status(offset, u64::from(length)) {
            Ok(extents) => {
                let d = normalize_extents(&extents, length, req_one);
                let id = session.base_allocation.unwrap_or(0);
                block_status_reply(handle, id, &d)
            }
            Err(err) => io_error_reply(handle, st, "block status", &err),
        },
        Command::Disc | Command::Cache => ok_reply(handle, st),
    }
}

/// CACHE is only a hint, and zero-length operations have nothing to do: both are answered
/// without touching the export.
fn nothing_to_do(cmd: &Command) -> bool {
    matches!(
        cmd,
        Command::Cache
            | Command::Read { length: 0, .. }
            | Command::Write { length: 0, .. }
            | Command::Trim { length: 0, .. }
            | Command::WriteZeroes { length: 0, .. }
    )
}

/// Log a refused request and build its error reply.
fn rejection_reply(req: &Request, lim: &Limits, rej: Rejection) -> Outgoing {
    if rej.errno == proto::ENOTSUP {
        // An expected answer to FAST_ZERO, not a client error.
        debug!(handle = req.handle, "{}", rej.message);
    } else {
        warn!(
            command = req.command,
            flags = req.flags,
            offset = req.offset,
            length = req.length,
            errno = rej.errno,
            "{}",
            rej.message
        );
    }
    error_reply(req.handle, lim.structured, rej.errno, rej.message)
}

/// What the reader got from the client.
enum Next {
    /// A checked request for the export, with its payload (for WRITE).
    Run {
        handle: u64,
        cmd: Command,
        payload: Vec<u8>,
        permits: Permits,
    },
    /// A request answered without touching the export (refused, or a no-op).
    Reply(Outgoing),
    Disconnect,
    /// The client hung up (possibly mid-request).
    Eof,
}

fn is_eof(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::UnexpectedEof
}

/// Read and check one request (and a WRITE's payload), taking in-flight permits first so a
/// client cannot make us buffer more than the limits.
async fn next_request<R: AsyncRead + Unpin>(
    rd: &mut R,
    lim: &Limits,
    requests: &Arc<Semaphore>,
    bytes: &Arc<Semaphore>,
) -> io::Result<Next> {
    let closed = |_| io::Error::other("semaphore closed");
    let request_permit = requests.clone().acquire_owned().await.map_err(closed)?;
    let mut hdr = [0u8; proto::REQUEST_LEN];
    match rd.read_exact(&mut hdr).await {
        Ok(_) => {}
        Err(e) if is_eof(&e) => return Ok(Next::Eof),
        Err(e) => return Err(e),
    }
    let req =
        proto::decode_request(&hdr).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.0))?;
    let mut permits = Permits {
        _request: request_permit,
        _bytes: None,
    };
    let mut payload = Vec::new();
    if req.command == proto::CMD_WRITE {
        if req.length <= lim.max_payload {
            permits._bytes = Some(
                bytes
                    .clone()
                    .acquire_many_owned(req.length)
                    .await
                    .map_err(closed)?,
            );
            payload = vec![0u8; req.length as usize];
            match rd.read_exact(&mut payload).await {
                Ok(_) => {}
                Err(e) if is_eof(&e) => return Ok(Next::Eof),
                Err(e) => return Err(e),
            }
        } else {
            let n = tokio::io::copy(
                &mut (&mut *rd).take(u64::from(req.length)),
                &mut tokio::io::sink(),
            )
            .await?;
            if n != u64::from(req.length) {
                return Ok(Next::Eof);
            }
        }
    }
    let cmd = match validate(&req, lim) {
        Ok(cmd) => cmd,
        Err(rej) => {
            let out = rejection_reply(&req, lim, rej);
            return Ok(Next::Reply(out.holding(permits)));
        }
    };
    match cmd {
        Command::Disc => Ok(Next::Disconnect),
        _ if nothing_to_do(&cmd) => Ok(Next::Reply(
            ok_reply(req.handle, lim.structured).holding(permits),
        )),
        _ => {
            if let Command::Read { length, .. } = cmd {
                permits._bytes = Some(
                    bytes
                        .clone()
                        .acquire_many_owned(length)
                        .await
                        .map_err(closed)?,
                );
            }
            Ok(Next::Run {
                handle: req.handle,
                cmd,
                payload,
                permits,
            })
        }
    }
}

/// Write replies as they arrive, each whole; flush when nothing else is queued so replies
/// that complete together share a syscall.
async fn write_replies<W: AsyncWrite + Unpin>(
    wr: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
) -> io::Result<()> {
    let mut w = BufWriter::with_capacity(64 * 1024, wr);
    while let Some(out) = rx.recv().await {
        w.write_all(&out.header).await?;
        if !out.data.is_empty() {
            w.write_all(&out.data).await?;
        }
        drop(out);
        if rx.is_empty() {
            w.flush().await?;
        }
    }
    w.flush().await?;
    w.shutdown().await
}

/// Serve requests until the client disconnects or hangs up, a protocol error, or `stop`.
/// In every case requests already in flight finish and their replies are written first.
pub(crate) async fn serve<R, W>(
    mut rd: R,
    wr: W,
    session: Session,
    mut stop: StopSignal,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let lim = Limits::for_session(&session);
    let session = Arc::new(session);
    let (tx, rx) = mpsc::unbounded_channel::<Outgoing>();
    let mut writer = tokio::spawn(write_replies(wr, rx));
    let requests = Arc::new(Semaphore::new(MAX_INFLIGHT_REQUESTS));
    let bytes = Arc::new(Semaphore::new(MAX_INFLIGHT_BYTES));
    // Set when the server stops the connection: from then on requests are read only until
    // the deadline, and answered ESHUTDOWN instead of run; a request half read when the stop
    // came is read whole first, so none that the client sent in time goes unanswered.
    let mut stopped_until: Option<tokio::time::Instant> = None;
    let mut result = Ok(());
    loop {
        let read = next_request(&mut rd, &lim, &requests, &bytes);
        tokio::pin!(read);
        let next = match stopped_until {
            None => tokio::select! {
                biased;
                _ = stop.stopped() => {
                    let until = tokio::time::Instant::now() + DRAIN_READ_WINDOW;
                    stopped_until = Some(until);
                    match tokio::time::timeout_at(until, &mut read).await {
                        Ok(next) => next,
                        Err(_) => break,
                    }
                }
                // The writer failed (client gone or not reading): nothing more can be answered.
                _ = tx.closed() => break,
                next = &mut read => next,
            },
            Some(until) => match tokio::time::timeout_at(until, &mut read).await {
                Ok(next) => next,
                Err(_) => break,
            },
        };
        match next {
            Ok(Next::Run { handle, .. }) if stopped_until.is_some() => {
                let _ = tx.send(error_reply(
                    handle,
                    session.structured,
                    proto::ESHUTDOWN,
                    "server is shutting down",
                ));
            }
            Ok(Next::Run {
                handle,
                cmd,
                payload,
                permits,
            }) => {
                let session = session.clone();
                let tx = tx.clone();
                tokio::task::spawn_blocking(move || {
                    let out =
                        catch_unwind(AssertUnwindSafe(|| execute(&session, handle, cmd, payload)))
                            .unwrap_or_else(|_| {
                                error!(export = %session.name, ?cmd, "export panicked");
                                error_reply(
                                    handle,
                                    session.structured,
                                    proto::EIO,
                                    "internal error",
                                )
                            });
                    // If the writer is gone the reply has nowhere to go; dropping it frees
                    // its permits.
                    let _ = tx.send(out.holding(permits));
                });
            }
            Ok(Next::Reply(out)) => {
                let _ = tx.send(out);
            }
            Ok(Next::Disconnect) => {
                debug!(export = %session.name, "client sent NBD_CMD_DISC");
                break;
            }
            Ok(Next::Eof) => {
                debug!(export = %session.name, "client hung up");
                break;
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    // The writer ends once every in-flight request has sent its reply (each holds a sender).
    drop(tx);
    let written = if stopped_until.is_some() {
        match tokio::time::timeout(DRAIN_TIMEOUT, &mut writer).await {
            Ok(r) => r,
            Err(_) => {
                warn!(export = %session.name, "replies did not drain in time; dropping connection");
                writer.abort();
                return result;
            }
        }
    } else {
        (&mut writer).await
    };
    match written {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(export = %session.name, error = %e, "writing replies failed"),
        Err(e) => error!(export = %session.name, error = %e, "reply writer failed"),
    }
    result
}

mod threaded;
pub(crate) use threaded::{serve as serve_threaded, BlockingSocket};

#[cfg(test)]
mod tests;
