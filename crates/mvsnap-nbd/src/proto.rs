//! NBD wire format: constants, and encode/decode of handshake messages, options, option
//! replies, requests and replies.
//!
//! Everything here is a pure function over byte slices (no I/O, no allocation that the input
//! length does not bound), so it can be unit-tested and fuzzed in isolation. Numbers are
//! big-endian ("network byte order") as the spec requires. Constant names follow the spec
//! (`NBD_OPT_GO` → [`OPT_GO`]) so they can be grepped against `doc/proto.md`.

// ---------------------------------------------------------------------------------------------
// Magic numbers
// ---------------------------------------------------------------------------------------------

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle handshake magic; also prefixes every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Prefix of every fixed-newstyle option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// `NBD_REQUEST_MAGIC`.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_SIMPLE_REPLY_MAGIC`.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// `NBD_STRUCTURED_REPLY_MAGIC`.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// ---------------------------------------------------------------------------------------------
// Handshake flags (server, 16 bits) and client flags (32 bits)
// ---------------------------------------------------------------------------------------------

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// The handshake flags this server sends.
pub const SERVER_HANDSHAKE_FLAGS: u16 = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;

// ---------------------------------------------------------------------------------------------
// Transmission flags (16 bits)
// ---------------------------------------------------------------------------------------------

pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---------------------------------------------------------------------------------------------
// Options and option replies
// ---------------------------------------------------------------------------------------------

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_PEEK_EXPORT: u32 = 4;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_ERR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// The one metadata context we serve.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
/// `NBD_STATE_HOLE` in `base:allocation`.
pub const STATE_HOLE: u32 = 1 << 0;
/// `NBD_STATE_ZERO` in `base:allocation`.
pub const STATE_ZERO: u32 = 1 << 1;

// ---------------------------------------------------------------------------------------------
// Commands, command flags, structured replies, errors
// ---------------------------------------------------------------------------------------------

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

pub const REPLY_FLAG_DONE: u16 = 1 << 0;

pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

// ---------------------------------------------------------------------------------------------
// Sizes and limits
// ---------------------------------------------------------------------------------------------

/// Length of the server's opening: NBDMAGIC, IHAVEOPT, handshake flags.
pub const HANDSHAKE_LEN: usize = 18;
/// Length of a client option header: IHAVEOPT, option, data length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of an option reply header: magic, option, reply type, data length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Length of a request header.
pub const REQUEST_LEN: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;
/// Spec: strings (names, descriptions, messages, queries) MUST be no longer than this.
pub const MAX_STRING_LEN: usize = 4096;
/// Largest option payload we read into memory. Options only carry a few short strings, so
/// this is generous, and it bounds what a client can make us allocate during the handshake.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Largest payload a read or write may carry; also the largest maximum block size we
/// advertise. The spec says 2^25 must never be treated as denial of service.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;

/// Why bytes from the client could not be decoded. Small and `Copy` so the hot path and the
/// fuzzer can create them freely; the message is for logs and error strings to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProtoError(pub &'static str);

impl std::fmt::Display for ProtoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for ProtoError {}

/// A cursor over a byte slice that never panics: every read checks the remaining length.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.buf.len() < n {
            return Err(ProtoError("truncated"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u16(&mut self) -> Result<u16, ProtoError> {
        let b = self.bytes(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, ProtoError> {
        let b = self.bytes(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, ProtoError> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A length-prefixed (32-bit) string, at most [`MAX_STRING_LEN`] bytes of UTF-8.
    fn string32(&mut self) -> Result<String, ProtoError> {
        let len = self.u32()? as usize;
        if len > MAX_STRING_LEN {
            return Err(ProtoError("string longer than 4096 bytes"));
        }
        let b = self.bytes(len)?;
        utf8(b)
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

fn utf8(b: &[u8]) -> Result<String, ProtoError> {
    std::str::from_utf8(b)
        .map(str::to_owned)
        .map_err(|_| ProtoError("string is not UTF-8"))
}

// ---------------------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------------------

/// The server's first message: NBDMAGIC, IHAVEOPT, handshake flags.
pub fn encode_handshake(flags: u16) -> [u8; HANDSHAKE_LEN] {
    let mut b = [0u8; HANDSHAKE_LEN];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&flags.to_be_bytes());
    b
}

/// What the client's 32-bit flags field asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
}

/// Decode the client flags. The spec says the server MUST drop the connection if the client
/// sets a flag it does not know or one the server did not advertise.
pub fn decode_client_flags(raw: u32, server_flags: u16) -> Result<ClientFlags, ProtoError> {
    let known = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
    if raw & !known != 0 {
        return Err(ProtoError("unknown client flags"));
    }
    let no_zeroes = raw & FLAG_C_NO_ZEROES != 0;
    if no_zeroes && server_flags & FLAG_NO_ZEROES == 0 {
        return Err(ProtoError("client set NO_ZEROES the server did not offer"));
    }
    Ok(ClientFlags {
        fixed_newstyle: raw & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes,
    })
}

/// The fixed part of a client option: the option number and how much data follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

/// Decode an option header; a wrong magic means the client is not speaking NBD (or has lost
/// framing), and the only safe thing is to close.
pub fn decode_option_header(b: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, ProtoError> {
    let mut r = Reader::new(b);
    if r.u64()? != IHAVEOPT {
        return Err(ProtoError("bad option magic"));
    }
    Ok(OptionHeader {
        option: r.u32()?,
        length: r.u32()?,
    })
}

/// Encode an option header (used by tests and test clients).
pub fn encode_option_header(option: u32, length: u32) -> [u8; OPTION_HEADER_LEN] {
    let mut b = [0u8; OPTION_HEADER_LEN];
    b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[8..12].copy_from_slice(&option.to_be_bytes());
    b[12..16].copy_from_slice(&length.to_be_bytes());
    b
}

/// The body of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    /// `NBD_INFO_*` items the client asked for, in its order.
    pub requests: Vec<u16>,
}

/// The body of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

/// A client option, decoded from its number and data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(String),
    Abort,
    List,
    StartTls,
    Info(InfoRequest),
    Go(InfoRequest),
    StructuredReply,
    ListMetaContext(MetaContextRequest),
    SetMetaContext(MetaContextRequest),
    /// An option number this server does not implement: answer `NBD_REP_ERR_UNSUP`.
    Unsupported(u32),
    /// A known option whose data is malformed: answer `NBD_REP_ERR_INVALID` (or, for
    /// `NBD_OPT_EXPORT_NAME`, which cannot be answered with an error, close).
    Invalid(u32, ProtoError),
}

/// Decode one option's data. Never panics; any malformed input becomes
/// [`ClientOption::Invalid`].
pub fn parse_option(option: u32, data: &[u8]) -> ClientOption {
    let invalid = |e| ClientOption::Invalid(option, e);
    match option {
        OPT_EXPORT_NAME => {
            if data.len() > MAX_STRING_LEN {
                return invalid(ProtoError("export name longer than 4096 bytes"));
            }
            match utf8(data) {
                Ok(name) => ClientOption::ExportName(name),
                Err(e) => invalid(e),
            }
        }
        // Spec: the server SHOULD ignore any data sent with NBD_OPT_ABORT.
        OPT_ABORT => ClientOption::Abort,
        OPT_LIST if data.is_empty() => ClientOption::List,
        OPT_LIST => invalid(ProtoError("NBD_OPT_LIST carries no data")),
        OPT_STARTTLS if data.is_empty() => ClientOption::StartTls,
        OPT_STARTTLS => invalid(ProtoError("NBD_OPT_STARTTLS carries no data")),
        OPT_INFO | OPT_GO => match parse_info_request(data) {
            Ok(req) if option == OPT_INFO => ClientOption::Info(req),
            Ok(req) => ClientOption::Go(req),
            Err(e) => invalid(e),
        },
        OPT_STRUCTURED_REPLY if data.is_empty() => ClientOption::StructuredReply,
        OPT_STRUCTURED_REPLY => invalid(ProtoError("NBD_OPT_STRUCTURED_REPLY carries no data")),
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => match parse_meta_context_request(data) {
            Ok(req) if option == OPT_LIST_META_CONTEXT => ClientOption::ListMetaContext(req),
            Ok(req) => ClientOption::SetMetaContext(req),
            Err(e) => invalid(e),
        },
        other => ClientOption::Unsupported(other),
    }
}

/// `NBD_OPT_INFO`/`GO` data: u32 name length, name, u16 count, count × u16 info types.
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, ProtoError> {
    let mut r = Reader::new(data);
    let name = r.string32()?;
    let n = r.u16()?;
    let mut requests = Vec::with_capacity(usize::from(n).min(data.len() / 2));
    for _ in 0..n {
        requests.push(r.u16()?);
    }
    if !r.is_empty() {
        return Err(ProtoError("trailing bytes after info requests"));
    }
    Ok(InfoRequest { name, requests })
}

/// Encode an `NBD_OPT_INFO`/`GO` body (used by tests and test clients).
pub fn encode_info_request(req: &InfoRequest) -> Vec<u8> {
    let mut b = Vec::with_capacity(6 + req.name.len() + 2 * req.requests.len());
    b.extend_from_slice(&(req.name.len() as u32).to_be_bytes());
    b.extend_from_slice(req.name.as_bytes());
    b.extend_from_slice(&(req.requests.len() as u16).to_be_bytes());
    for i in &req.requests {
        b.extend_from_slice(&i.to_be_bytes());
    }
    b
}

/// Meta context data: u32 export name length, name, u32 query count, queries (u32 + string).
pub fn parse_meta_context_request(data: &[u8]) -> Result<MetaContextRequest, ProtoError> {
    let mut r = Reader::new(data);
    let export = r.string32()?;
    let n = r.u32()?;
    // Each query needs at least its 4-byte length, so the data bounds the count; checking
    // first keeps a huge count from pre-allocating.
    if u64::from(n) * 4 > r.buf.len() as u64 {
        return Err(ProtoError("query count exceeds option length"));
    }
    let mut queries = Vec::with_capacity(n as usize);
    for _ in 0..n {
        queries.push(r.string32()?);
    }
    if !r.is_empty() {
        return Err(ProtoError("trailing bytes after queries"));
    }
    Ok(MetaContextRequest { export, queries })
}

/// Encode a meta context body (used by tests and test clients).
pub fn encode_meta_context_request(req: &MetaContextRequest) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(req.export.len() as u32).to_be_bytes());
    b.extend_from_slice(req.export.as_bytes());
    b.extend_from_slice(&(req.queries.len() as u32).to_be_bytes());
    for q in &req.queries {
        b.extend_from_slice(&(q.len() as u32).to_be_bytes());
        b.extend_from_slice(q.as_bytes());
    }
    b
}

/// An option reply: header plus data, ready to write.
pub fn encode_option_reply(option: u32, reply_type: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(OPTION_REPLY_HEADER_LEN + data.len());
    b.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply_type.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// A decoded option reply header (for test clients).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub length: u32,
}

/// Decode an option reply header (for test clients).
pub fn decode_option_reply_header(
    b: &[u8; OPTION_REPLY_HEADER_LEN],
) -> Result<OptionReplyHeader, ProtoError> {
    let mut r = Reader::new(b);
    if r.u64()? != OPTION_REPLY_MAGIC {
        return Err(ProtoError("bad option reply magic"));
    }
    Ok(OptionReplyHeader {
        option: r.u32()?,
        reply_type: r.u32()?,
        length: r.u32()?,
    })
}

/// Cut a string to at most `max` bytes on a character boundary, so what we send stays
/// within the spec's string limit and is still valid UTF-8.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `NBD_REP_SERVER` data: u32 name length, name, then the description.
pub fn encode_rep_server(name: &str, description: &str) -> Vec<u8> {
    let desc = truncate_utf8(description, MAX_STRING_LEN);
    let mut b = Vec::with_capacity(4 + name.len() + desc.len());
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(desc.as_bytes());
    b
}

/// `NBD_REP_INFO` data for `NBD_INFO_EXPORT`: size and transmission flags.
pub fn encode_info_export(size: u64, transmission_flags: u16) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    b[2..10].copy_from_slice(&size.to_be_bytes());
    b[10..12].copy_from_slice(&transmission_flags.to_be_bytes());
    b
}

/// `NBD_REP_INFO` data for `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`.
pub fn encode_info_string(info: u16, s: &str) -> Vec<u8> {
    let s = truncate_utf8(s, MAX_STRING_LEN);
    let mut b = Vec::with_capacity(2 + s.len());
    b.extend_from_slice(&info.to_be_bytes());
    b.extend_from_slice(s.as_bytes());
    b
}

/// `NBD_REP_INFO` data for `NBD_INFO_BLOCK_SIZE`.
pub fn encode_info_block_size(minimum: u32, preferred: u32, maximum: u32) -> [u8; 14] {
    let mut b = [0u8; 14];
    b[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b[2..6].copy_from_slice(&minimum.to_be_bytes());
    b[6..10].copy_from_slice(&preferred.to_be_bytes());
    b[10..14].copy_from_slice(&maximum.to_be_bytes());
    b
}

/// `NBD_REP_META_CONTEXT` data: context id and name.
pub fn encode_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, flags, and 124 zero bytes unless the client
/// negotiated `NBD_FLAG_C_NO_ZEROES`.
pub fn encode_export_name_reply(size: u64, transmission_flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(10 + 124);
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&transmission_flags.to_be_bytes());
    if !no_zeroes {
        b.resize(b.len() + 124, 0);
    }
    b
}

// ---------------------------------------------------------------------------------------------
// Transmission
// ---------------------------------------------------------------------------------------------

/// A decoded request header. The command and flags are kept raw: validating them depends on
/// what was negotiated, which is the transmission module's business.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

/// Decode a request header; a wrong magic means framing is lost and the connection must close.
pub fn decode_request(b: &[u8; REQUEST_LEN]) -> Result<Request, ProtoError> {
    let mut r = Reader::new(b);
    if r.u32()? != REQUEST_MAGIC {
        return Err(ProtoError("bad request magic"));
    }
    Ok(Request {
        flags: r.u16()?,
        command: r.u16()?,
        handle: r.u64()?,
        offset: r.u64()?,
        length: r.u32()?,
    })
}

/// Encode a request header (for tests and test clients).
pub fn encode_request(req: &Request) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&req.flags.to_be_bytes());
    b[6..8].copy_from_slice(&req.command.to_be_bytes());
    b[8..16].copy_from_slice(&req.handle.to_be_bytes());
    b[16..24].copy_from_slice(&req.offset.to_be_bytes());
    b[24..28].copy_from_slice(&req.length.to_be_bytes());
    b
}

/// A simple reply header; for a successful read the data follows.
pub fn encode_simple_reply(handle: u64, error: u32) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b
}

/// A decoded simple reply header (for test clients).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub handle: u64,
}

/// A structured reply chunk header; `length` bytes of payload follow.
pub fn encode_structured_header(
    flags: u16,
    reply_type: u16,
    handle: u64,
    length: u32,
) -> [u8; STRUCTURED_REPLY_LEN] {
    let mut b = [0u8; STRUCTURED_REPLY_LEN];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&reply_type.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

/// A decoded structured reply chunk header (for test clients).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StructuredHeader {
    pub flags: u16,
    pub reply_type: u16,
    pub handle: u64,
    pub length: u32,
}

/// Either kind of reply header, told apart by magic (for test clients).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple(SimpleReply),
    Structured(StructuredHeader),
}

/// How many bytes a reply header starting with this 4-byte magic occupies.
pub fn reply_header_len(magic: [u8; 4]) -> Result<usize, ProtoError> {
    match u32::from_be_bytes(magic) {
        SIMPLE_REPLY_MAGIC => Ok(SIMPLE_REPLY_LEN),
        STRUCTURED_REPLY_MAGIC => Ok(STRUCTURED_REPLY_LEN),
        _ => Err(ProtoError("bad reply magic")),
    }
}

/// Decode a simple or structured reply header (for test clients).
pub fn decode_reply_header(b: &[u8]) -> Result<ReplyHeader, ProtoError> {
    let mut r = Reader::new(b);
    match r.u32()? {
        SIMPLE_REPLY_MAGIC => Ok(ReplyHeader::Simple(SimpleReply {
            error: r.u32()?,
            handle: r.u64()?,
        })),
        STRUCTURED_REPLY_MAGIC => Ok(ReplyHeader::Structured(StructuredHeader {
            flags: r.u16()?,
            reply_type: r.u16()?,
            handle: r.u64()?,
            length: r.u32()?,
        })),
        _ => Err(ProtoError("bad reply magic")),
    }
}

/// Payload of an `NBD_REPLY_TYPE_ERROR` chunk: error, message length, message.
pub fn encode_error_payload(error: u32, message: &str) -> Vec<u8> {
    // The message length field is 16 bits and the spec caps strings at 4096 bytes.
    let msg = truncate_utf8(message, MAX_STRING_LEN);
    let mut b = Vec::with_capacity(6 + msg.len());
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    b.extend_from_slice(msg.as_bytes());
    b
}

/// Decode an error chunk payload into (error, message) (for test clients).
pub fn decode_error_payload(b: &[u8]) -> Result<(u32, String), ProtoError> {
    let mut r = Reader::new(b);
    let error = r.u32()?;
    let len = r.u16()?;
    let msg = String::from_utf8_lossy(r.bytes(usize::from(len))?).into_owned();
    Ok((error, msg))
}

/// One block status descriptor as sent on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    pub length: u32,
    pub flags: u32,
}

/// Payload of an `NBD_REPLY_TYPE_BLOCK_STATUS` chunk: context id, then descriptors.
pub fn encode_block_status_payload(context_id: u32, descriptors: &[Descriptor]) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + 8 * descriptors.len());
    b.extend_from_slice(&context_id.to_be_bytes());
    for d in descriptors {
        b.extend_from_slice(&d.length.to_be_bytes());
        b.extend_from_slice(&d.flags.to_be_bytes());
    }
    b
}

/// Decode a block status payload into (context id, descriptors) (for test clients).
pub fn decode_block_status_payload(b: &[u8]) -> Result<(u32, Vec<Descriptor>), ProtoError> {
    if b.len() < 12 || (b.len() - 4) & 7 != 0 {
        return Err(ProtoError("bad block status length"));
    }
    let mut r = Reader::new(b);
    let id = r.u32()?;
    let mut v = Vec::with_capacity((b.len() - 4) / 8);
    while !r.is_empty() {
        v.push(Descriptor {
            length: r.u32()?,
            flags: r.u32()?,
        });
    }
    Ok((id, v))
}

#[cfg(test)]
mod tests;
