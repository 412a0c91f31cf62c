//! The fixed newstyle handshake: greet, read the client's flags, then answer options until
//! the client picks an export (`NBD_OPT_EXPORT_NAME` / `NBD_OPT_GO`) or leaves.
//!
//! Option data is read whole, so its length is bounded ([`proto::MAX_OPTION_LEN`]): longer
//! options are skipped without buffering and answered with `NBD_REP_ERR_TOO_BIG`, absurdly
//! long ones end the connection.
//!
//! TLS follows the spec's FORCEDTLS mode when the listener has it ([`Tls::Required`]): until
//! `NBD_OPT_STARTTLS` every option but ABORT gets `NBD_REP_ERR_TLS_REQD` (EXPORT_NAME, which
//! cannot fail, closes), so no export name or list crosses the network in clear. The caller
//! runs the TLS handshake when [`Outcome::StartTls`] comes back and then calls [`options`]
//! again over the encrypted stream with [`Tls::Active`].

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{debug, warn};

use crate::proto::{self, ClientOption, InfoRequest, MetaContextRequest};
use crate::transmission::{sanitize_block_sizes, transmission_flags};
use crate::{Export, ExportRegistry, OpenError};

/// Options longer than [`proto::MAX_OPTION_LEN`] but at most this are read and dropped so the
/// client can carry on; anything longer is treated as denial of service and closes.
const MAX_OPTION_DISCARD: u32 = 16 * 1024 * 1024;

/// The id we give `base:allocation` in `NBD_OPT_SET_META_CONTEXT` replies.
pub(crate) const BASE_ALLOCATION_ID: u32 = 1;

/// What the handshake agreed on; everything the transmission phase needs.
pub(crate) struct Session {
    pub name: String,
    pub export: Arc<dyn Export>,
    pub size: u64,
    pub read_only: bool,
    pub structured: bool,
    /// Context id of `base:allocation` if the client selected it for this export.
    pub base_allocation: Option<u32>,
    /// Largest READ/WRITE length accepted (the advertised maximum block size).
    pub max_payload: u32,
    /// The export zeroes fast (see `Export::fast_zero`).
    pub fast_zero: bool,
}

/// How the handshake ended.
pub(crate) enum Outcome {
    Transmission(Session),
    /// The client aborted or went away; nothing more to do.
    Closed,
    /// `NBD_OPT_STARTTLS` was acknowledged: the next bytes are the client's TLS handshake.
    /// Option haggling resumes over TLS with these client flags.
    StartTls(proto::ClientFlags),
}

/// The TLS mode of a connection (the spec's "TLS support" section); fixed for its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tls {
    /// NOTLS: `NBD_OPT_STARTTLS` is answered `NBD_REP_ERR_UNSUP` (Unix sockets, plain TCP).
    Off,
    /// FORCEDTLS, not upgraded yet: only STARTTLS and ABORT are served.
    Required,
    /// Upgraded: the stream is TLS; a second STARTTLS is `NBD_REP_ERR_INVALID`.
    Active,
}

/// Negotiation state that options change.
#[derive(Default)]
struct State {
    structured: bool,
    /// Export name the last successful `NBD_OPT_SET_META_CONTEXT` selected contexts for.
    meta_export: Option<String>,
}

fn protocol_error(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Run the handshake. `Ok(Closed)` is a clean end; `Err` is an I/O or protocol error after
/// which the connection must close.
pub(crate) async fn negotiate<R, W>(
    rd: &mut R,
    wr: &mut W,
    registry: &Arc<dyn ExportRegistry>,
    tls: Tls,
) -> io::Result<Outcome>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    wr.write_all(&proto::encode_handshake(proto::SERVER_HANDSHAKE_FLAGS))
        .await?;
    wr.flush().await?;

    let mut raw = [0u8; 4];
    if let Err(e) = rd.read_exact(&mut raw).await {
        return eof_is_clean(e);
    }
    let client = proto::decode_client_flags(u32::from_be_bytes(raw), proto::SERVER_HANDSHAKE_FLAGS)
        .map_err(|e| protocol_error(e.0))?;
    // A client without FIXED_NEWSTYLE only ever sends EXPORT_NAME, which we answer the same
    // way, so there is nothing to do differently for it; unless TLS is required: TLS needs
    // fixed newstyle (spec), and EXPORT_NAME before TLS must close anyway.
    if tls == Tls::Required && !client.fixed_newstyle {
        return Err(protocol_error(
            "TLS is required and the client does not speak fixed newstyle",
        ));
    }
    options(rd, wr, registry, client, tls).await
}

/// The option haggling after the greeting (and, with TLS, again after the upgrade: the
/// greeting is not repeated; state from before it is not kept, as none can have been set).
pub(crate) async fn options<R, W>(
    rd: &mut R,
    wr: &mut W,
    registry: &Arc<dyn ExportRegistry>,
    client: proto::ClientFlags,
    tls: Tls,
) -> io::Result<Outcome>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut st = State::default();
    loop {
        let mut hdr = [0u8; proto::OPTION_HEADER_LEN];
        if let Err(e) = rd.read_exact(&mut hdr).await {
            return eof_is_clean(e);
        }
        let hdr = proto::decode_option_header(&hdr).map_err(|e| protocol_error(e.0))?;
        if hdr.length > proto::MAX_OPTION_LEN {
            if hdr.option == proto::OPT_EXPORT_NAME || hdr.length > MAX_OPTION_DISCARD {
                return Err(protocol_error(format!(
                    "option {} with {} bytes of data is too big",
                    hdr.option, hdr.length
                )));
            }
            let skipped = tokio::io::copy(
                &mut (&mut *rd).take(u64::from(hdr.length)),
                &mut tokio::io::sink(),
            )
            .await?;
            if skipped != u64::from(hdr.length) {
                return Ok(Outcome::Closed);
            }
            warn!(option = hdr.option, length = hdr.length, "option too big");
            if tls == Tls::Required && hdr.option != proto::OPT_STARTTLS {
                // Before TLS every other option gets TLS_REQD, whatever its size.
                let msg = b"TLS is required: send NBD_OPT_STARTTLS first";
                reply(wr, hdr.option, proto::REP_ERR_TLS_REQD, msg).await?;
            } else {
                reply(wr, hdr.option, proto::REP_ERR_TOO_BIG, b"option too big").await?;
            }
            wr.flush().await?;
            continue;
        }
        let mut data = vec![0u8; hdr.length as usize];
        if let Err(e) = rd.read_exact(&mut data).await {
            return eof_is_clean(e);
        }
        if tls == Tls::Required {
            match hdr.option {
                proto::OPT_STARTTLS if data.is_empty() => {
                    reply(wr, proto::OPT_STARTTLS, proto::REP_ACK, &[]).await?;
                    wr.flush().await?;
                    return Ok(Outcome::StartTls(client));
                }
                proto::OPT_STARTTLS | proto::OPT_ABORT => {}
                proto::OPT_EXPORT_NAME => {
                    // It cannot be answered with an error; the spec says to close.
                    return Err(protocol_error(
                        "NBD_OPT_EXPORT_NAME before NBD_OPT_STARTTLS (TLS is required)",
                    ));
                }
                other => {
                    debug!(option = other, "option before STARTTLS");
                    let msg = b"TLS is required: send NBD_OPT_STARTTLS first";
                    reply(wr, other, proto::REP_ERR_TLS_REQD, msg).await?;
                    wr.flush().await?;
                    continue;
                }
            }
        }
        let option = proto::parse_option(hdr.option, &data);
        debug!(?option, "option");
        let outcome = handle_option(wr, registry, &mut st, client.no_zeroes, tls, option).await?;
        wr.flush().await?;
        if let Some(outcome) = outcome {
            return Ok(outcome);
        }
    }
}

/// A client that hangs up between messages has simply left.
fn eof_is_clean(e: io::Error) -> io::Result<Outcome> {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        Ok(Outcome::Closed)
    } else {
        Err(e)
    }
}

async fn reply<W: AsyncWrite + Unpin>(
    wr: &mut W,
    option: u32,
    reply_type: u32,
    data: &[u8],
) -> io::Result<()> {
    wr.write_all(&proto::encode_option_reply(option, reply_type, data))
        .await
}

/// Answer one option; `Some` ends the handshake.
async fn handle_option<W: AsyncWrite + Unpin>(
    wr: &mut W,
    registry: &Arc<dyn ExportRegistry>,
    st: &mut State,
    no_zeroes: bool,
    tls: Tls,
    option: ClientOption,
) -> io::Result<Option<Outcome>> {
    match option {
        ClientOption::ExportName(name) => {
            // This option cannot be answered with an error: the spec says to close.
            let export = open(registry, &name)
                .await
                .map_err(|e| protocol_error(format!("NBD_OPT_EXPORT_NAME {name:?}: {e}")))?;
            let session = make_session(name, export, st);
            let flags = transmission_flags(&*session.export, session.structured);
            wr.write_all(&proto::encode_export_name_reply(
                session.size,
                flags,
                no_zeroes,
            ))
            .await?;
            Ok(Some(Outcome::Transmission(session)))
        }
        ClientOption::Abort => {
            reply(wr, proto::OPT_ABORT, proto::REP_ACK, &[]).await?;
            Ok(Some(Outcome::Closed))
        }
        ClientOption::List => {
            let reg = registry.clone();
            let list = tokio::task::spawn_blocking(move || reg.list())
                .await
                .unwrap_or_default();
            for info in list {
                if info.name.len() > proto::MAX_STRING_LEN {
                    continue;
                }
                let data = proto::encode_rep_server(&info.name, &info.description);
                reply(wr, proto::OPT_LIST, proto::REP_SERVER, &data).await?;
            }
            reply(wr, proto::OPT_LIST, proto::REP_ACK, &[]).await?;
            Ok(None)
        }
        ClientOption::StartTls => {
            // (Tls::Required was answered before parsing.)
            let (rep, msg): (u32, &[u8]) = if tls == Tls::Active {
                (proto::REP_ERR_INVALID, b"TLS is already active")
            } else {
                (proto::REP_ERR_UNSUP, b"TLS is not offered on this socket")
            };
            reply(wr, proto::OPT_STARTTLS, rep, msg).await?;
            Ok(None)
        }
        ClientOption::Info(req) => {
            info_or_go(wr, registry, st, proto::OPT_INFO, req).await?;
            Ok(None)
        }
        ClientOption::Go(req) => Ok(info_or_go(wr, registry, st, proto::OPT_GO, req)
            .await?
            .map(Outcome::Transmission)),
        ClientOption::StructuredReply => {
            st.structured = true;
            reply(wr, proto::OPT_STRUCTURED_REPLY, proto::REP_ACK, &[]).await?;
            Ok(None)
        }
        ClientOption::ListMetaContext(req) => {
            meta_context(wr, registry, st, proto::OPT_LIST_META_CONTEXT, req).await?;
            Ok(None)
        }
        ClientOption::SetMetaContext(req) => {
            meta_context(wr, registry, st, proto::OPT_SET_META_CONTEXT, req).await?;
            Ok(None)
        }
        ClientOption::Unsupported(opt) => {
            // Not an error: clients probe for newer options (qemu asks for extended
            // headers first) and fall back.
            debug!(option = opt, "unsupported option");
            reply(wr, opt, proto::REP_ERR_UNSUP, b"option not supported").await?;
            Ok(None)
        }
        ClientOption::Invalid(proto::OPT_EXPORT_NAME, e) => {
            Err(protocol_error(format!("NBD_OPT_EXPORT_NAME: {e}")))
        }
        ClientOption::Invalid(opt, e) => {
            warn!(option = opt, error = e.0, "invalid option");
            if opt == proto::OPT_SET_META_CONTEXT {
                // A failed SET still replaces the previous selection.
                st.meta_export = None;
            }
            reply(wr, opt, proto::REP_ERR_INVALID, e.0.as_bytes()).await?;
            Ok(None)
        }
    }
}

/// Open an export on the blocking pool; a panicking registry counts as unavailable.
async fn open(
    registry: &Arc<dyn ExportRegistry>,
    name: &str,
) -> Result<Arc<dyn Export>, OpenError> {
    let reg = registry.clone();
    let name = name.to_owned();
    tokio::task::spawn_blocking(move || reg.open(&name))
        .await
        .unwrap_or_else(|_| Err(OpenError::Unavailable("internal error".into())))
}

/// Reply to a failed open with `NBD_REP_ERR_UNKNOWN` and a reason.
async fn reply_open_error<W: AsyncWrite + Unpin>(
    wr: &mut W,
    option: u32,
    name: &str,
    e: &OpenError,
) -> io::Result<()> {
    debug!(export = name, error = %e, "open failed");
    let msg = format!("{name}: {e}");
    let msg = proto::truncate_utf8(&msg, proto::MAX_STRING_LEN);
    reply(wr, option, proto::REP_ERR_UNKNOWN, msg.as_bytes()).await
}

fn make_session(name: String, export: Arc<dyn Export>, st: &State) -> Session {
    let base_allocation = (st.structured && st.meta_export.as_deref() == Some(name.as_str()))
        .then_some(BASE_ALLOCATION_ID);
    Session {
        size: export.size(),
        read_only: export.read_only(),
        max_payload: sanitize_block_sizes(export.block_sizes()).maximum,
        fast_zero: export.fast_zero(),
        name,
        export,
        structured: st.structured,
        base_allocation,
    }
}

/// `NBD_OPT_INFO` and `NBD_OPT_GO`: the same replies, and GO then enters transmission.
async fn info_or_go<W: AsyncWrite + Unpin>(
    wr: &mut W,
    registry: &Arc<dyn ExportRegistry>,
    st: &State,
    option: u32,
    req: InfoRequest,
) -> io::Result<Option<Session>> {
    let export = match open(registry, &req.name).await {
        Ok(e) => e,
        Err(e) => {
            reply_open_error(wr, option, &req.name, &e).await?;
            return Ok(None);
        }
    };
    let flags = transmission_flags(&*export, st.structured);
    let sizes = sanitize_block_sizes(export.block_sizes());
    reply(
        wr,
        option,
        proto::REP_INFO,
        &proto::encode_info_export(export.size(), flags),
    )
    .await?;
    if req.requests.contains(&proto::INFO_NAME) {
        let data = proto::encode_info_string(proto::INFO_NAME, &req.name);
        reply(wr, option, proto::REP_INFO, &data).await?;
    }
    if req.requests.contains(&proto::INFO_DESCRIPTION) {
        let reg = registry.clone();
        let list = tokio::task::spawn_blocking(move || reg.list())
            .await
            .unwrap_or_default();
        if let Some(info) = list.iter().find(|i| i.name == req.name) {
            let data = proto::encode_info_string(proto::INFO_DESCRIPTION, &info.description);
            reply(wr, option, proto::REP_INFO, &data).await?;
        }
    }
    // Sent even when not asked for (the spec allows it): a non-default minimum must be told.
    let data = proto::encode_info_block_size(sizes.minimum, sizes.preferred, sizes.maximum);
    reply(wr, option, proto::REP_INFO, &data).await?;
    reply(wr, option, proto::REP_ACK, &[]).await?;
    if option == proto::OPT_GO {
        Ok(Some(make_session(req.name, export, st)))
    } else {
        Ok(None)
    }
}

/// `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`. The only context is
/// `base:allocation`; `base:` is a wildcard when listing; other namespaces are ignored.
async fn meta_context<W: AsyncWrite + Unpin>(
    wr: &mut W,
    registry: &Arc<dyn ExportRegistry>,
    st: &mut State,
    option: u32,
    req: MetaContextRequest,
) -> io::Result<()> {
    let set = option == proto::OPT_SET_META_CONTEXT;
    if set {
        // Spec: SET replaces the previous selection, even when it fails.
        st.meta_export = None;
    }
    if !st.structured {
        let msg = b"structured replies must be negotiated first";
        return reply(wr, option, proto::REP_ERR_INVALID, msg).await;
    }
    if let Err(e) = open(registry, &req.export).await {
        return reply_open_error(wr, option, &req.export, &e).await;
    }
    let matched = if set {
        req.queries.iter().any(|q| q == proto::META_BASE_ALLOCATION)
    } else {
        req.queries.is_empty()
            || req
                .queries
                .iter()
                .any(|q| q == "base:" || q == proto::META_BASE_ALLOCATION)
    };
    if matched {
        let id = if set { BASE_ALLOCATION_ID } else { 0 };
        let data = proto::encode_meta_context(id, proto::META_BASE_ALLOCATION);
        reply(wr, option, proto::REP_META_CONTEXT, &data).await?;
        if set {
            st.meta_export = Some(req.export);
        }
    }
    reply(wr, option, proto::REP_ACK, &[]).await
}
