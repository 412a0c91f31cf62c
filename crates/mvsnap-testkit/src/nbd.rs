//! A small blocking raw NBD client, for hand-made protocol tests: every byte it sends is the
//! test's choice, and every reply is decoded with the library's own `proto` functions.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use mvsnap_nbd::proto::{self, ReplyHeader};

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

#[derive(Debug)]
pub enum Reply {
    Simple { handle: u64, error: u32 },
    Chunk(Chunk),
}

/// Over a Unix socket by default; any byte stream (TCP, TLS) will do.
pub struct RawClient<S = UnixStream> {
    pub s: S,
}

impl RawClient {
    /// Connect to a server's Unix socket; reads time out after 30 s (a test fails, not hangs).
    pub fn connect(sock: &Path) -> RawClient {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        RawClient { s }
    }

    /// True once the server has closed its side (EOF or reset) within `timeout`; bytes still
    /// arriving are skipped.
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        self.s.set_read_timeout(Some(timeout)).unwrap();
        let mut b = [0u8; 4096];
        let start = Instant::now();
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) if start.elapsed() < timeout => continue,
                Ok(_) => return false,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return false
                }
                Err(_) => return true,
            }
        }
    }
}

impl<S: Read + Write> RawClient<S> {
    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    /// Send; false if the server has closed the connection.
    pub fn try_send(&mut self, b: &[u8]) -> bool {
        self.s.write_all(b).is_ok()
    }

    pub fn recv(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v).unwrap();
        v
    }

    /// True once the server has closed its side (EOF, or reset); false if a byte arrives.
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => {
                assert!(
                    !matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ),
                    "server did not close"
                );
                true
            }
        }
    }

    /// Read the greeting (fixed newstyle, no zeroes) and send client flags.
    pub fn greet(&mut self, client_flags: u32) {
        let g = self.recv(proto::HANDSHAKE_LEN);
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

    /// Greet (fixed newstyle, no zeroes), optionally negotiate structured replies and
    /// `base:allocation`, then GO. Returns (size, transmission flags).
    pub fn handshake(&mut self, name: &str, structured: bool, meta: bool) -> (u64, u16) {
        self.greet(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES);
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
        self.go(name)
            .unwrap_or_else(|e| panic!("GO {name} failed: {e:?}"))
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
        let len = proto::reply_header_len(magic.as_slice().try_into().unwrap())
            .unwrap_or_else(|e| panic!("bad reply magic {magic:02x?}: {e}"));
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

    /// READ on a connection without structured replies: Ok(data) or Err(errno).
    pub fn read_simple(&mut self, handle: u64, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(proto::CMD_READ, 0, handle, offset, len);
        let (h, err) = self.simple();
        assert_eq!(h, handle);
        if err != 0 {
            return Err(err);
        }
        Ok(self.recv(len as usize))
    }

    /// NBD_CMD_DISC, then the server must close within 10 s (bytes still arriving, replies to
    /// requests the test did not read, are skipped).
    pub fn disconnect(mut self) {
        self.request(proto::CMD_DISC, 0, 0, 0, 0);
        let start = Instant::now();
        let mut b = [0u8; 4096];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return,
                Ok(_) if start.elapsed() < Duration::from_secs(10) => continue,
                Ok(_) => panic!("server did not close after NBD_CMD_DISC"),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    panic!("server did not close after NBD_CMD_DISC")
                }
                Err(_) => return,
            }
        }
    }
}
