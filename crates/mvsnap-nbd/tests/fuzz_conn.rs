//! The fuzz harness as ordinary tests: whole server connections, alternately over a Unix
//! socket pair (the threaded transmission path) and an in-memory duplex stream (the async
//! path), fed random bytes, random bytes after a valid handshake, and mutated valid
//! sessions (thousands of cases per run). Any panic anywhere (including in spawned tasks), a
//! hang, or — for unmutated sessions — a wrong or missing reply fails the test.
//!
//! The cargo-fuzz target `fuzz/fuzz_targets/nbd_proto.rs` drives the same kind of connection
//! under libFuzzer. `MVSNAP_WRITE_FUZZ_SEEDS=DIR cargo test --test fuzz_conn write_seeds`
//! writes valid sessions there as a starting corpus.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use mvsnap_nbd::memory::{MemExport, MemRegistry};
use mvsnap_nbd::proto::{self, *};
use mvsnap_nbd::NbdServer;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SIZE: u64 = 1 << 20;
const HALF: u64 = SIZE / 2;

static PANICS: AtomicUsize = AtomicUsize::new(0);
static RUNS: AtomicUsize = AtomicUsize::new(0);

/// The client's end of either kind of connection.
trait Duplex: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Duplex for T {}
static HOOK: Once = Once::new();

/// Count every panic, including those tokio catches in spawned tasks.
fn install_panic_counter() {
    HOOK.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            prev(info);
        }));
    });
}

fn known(i: u64) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 8)) as u8
}

/// Exports: "a" (writable, second half pre-filled with a known pattern) and "ro".
fn registry() -> MemRegistry {
    let mut reg = MemRegistry::new();
    let a = reg.add("a", "fuzz target", MemExport::new(SIZE));
    let fill: Vec<u8> = (HALF..SIZE).map(known).collect();
    a.fill(HALF, &fill);
    let ro = reg.add("ro", "read-only", MemExport::new_read_only(SIZE));
    ro.fill(HALF, &fill);
    reg
}

/// Run one connection with `input` as everything the client sends; returns what the server
/// sent. Panics if the server hangs or panics.
fn drive(input: &[u8]) -> Vec<u8> {
    install_panic_counter();
    let before = PANICS.load(Ordering::SeqCst);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let server = NbdServer::new(Arc::new(registry()));
    let input = input.to_vec();
    // Alternate the two transmission paths: a real socket (threads) and a byte stream (async).
    let threaded = RUNS.fetch_add(1, Ordering::Relaxed).is_multiple_of(2);
    let out = rt.block_on(async move {
        let srv = server.clone();
        let (client, task): (Box<dyn Duplex>, _) = if threaded {
            let (client, server_side) = tokio::net::UnixStream::pair().unwrap();
            let task = tokio::spawn(async move { srv.serve_unix_stream(server_side).await });
            (Box::new(client), task)
        } else {
            let (client, server_side) = tokio::io::duplex(64 * 1024);
            let task = tokio::spawn(async move { srv.serve_stream(server_side).await });
            (Box::new(client), task)
        };
        let (mut rd, mut wr) = tokio::io::split(client);
        let send = async move {
            let _ = wr.write_all(&input).await;
            let _ = wr.shutdown().await;
        };
        let recv = async move {
            let mut out = Vec::new();
            let _ = rd.read_to_end(&mut out).await;
            out
        };
        let (_, out) =
            tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(send, recv) })
                .await
                .expect("connection hung");
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("server did not finish")
            .expect("server task panicked");
        assert!(server.open_exports().is_empty());
        out
    });
    assert_eq!(PANICS.load(Ordering::SeqCst), before, "a task panicked");
    out
}

// ---------------------------------------------------------------------------------------------
// Valid sessions
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Read { off: u64, len: u32, flags: u16 },
    Write { off: u64, len: u32, fua: bool },
    Flush,
    Trim { off: u64, len: u32 },
    Zero { off: u64, len: u32, flags: u16 },
    Status { off: u64, len: u32, req_one: bool },
    Cache { off: u64, len: u32 },
    Unknown { cmd: u16 },
}

#[derive(Debug, Clone)]
struct Session {
    export: &'static str,
    structured: bool,
    meta: bool,
    export_name: bool,
    no_zeroes: bool,
    list_first: bool,
    ops: Vec<Op>,
}

fn arb_off() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0..HALF,
        4 => HALF..SIZE,
        1 => SIZE - 16..SIZE + 16,
        1 => Just(u64::MAX - 3),
    ]
}

fn arb_len() -> impl Strategy<Value = u32> {
    prop_oneof![8 => 0u32..70_000, 1 => Just(0u32), 1 => 500_000u32..600_000]
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (arb_off(), arb_len(), prop_oneof![Just(0u16), Just(CMD_FLAG_DF), Just(CMD_FLAG_FUA)])
            .prop_map(|(off, len, flags)| Op::Read { off, len, flags }),
        // Writes only land in the first half, so reads of the second half are deterministic.
        3 => (0..HALF, 0u32..70_000, any::<bool>()).prop_map(|(off, len, fua)| Op::Write {
            off,
            len: len.min((HALF - off) as u32),
            fua
        }),
        1 => Just(Op::Flush),
        1 => (0..HALF, arb_len()).prop_map(|(off, len)| Op::Trim { off, len: len.min((HALF - off) as u32) }),
        1 => (0..HALF, arb_len(), prop_oneof![Just(0u16), Just(CMD_FLAG_NO_HOLE), Just(CMD_FLAG_FAST_ZERO)])
            .prop_map(|(off, len, flags)| Op::Zero { off, len: len.min((HALF - off) as u32), flags }),
        2 => (arb_off(), arb_len(), any::<bool>()).prop_map(|(off, len, req_one)| Op::Status { off, len, req_one }),
        1 => (arb_off(), arb_len()).prop_map(|(off, len)| Op::Cache { off, len }),
        1 => (8u16..100).prop_map(|cmd| Op::Unknown { cmd }),
    ]
}

fn arb_session() -> impl Strategy<Value = Session> {
    (
        prop_oneof![4 => Just("a"), 1 => Just("ro")],
        any::<bool>(),
        any::<bool>(),
        prop::bool::weighted(0.2),
        any::<bool>(),
        any::<bool>(),
        prop::collection::vec(arb_op(), 0..40),
    )
        .prop_map(
            |(export, structured, meta, export_name, no_zeroes, list_first, ops)| Session {
                export,
                structured,
                meta: meta && structured,
                export_name,
                no_zeroes,
                list_first,
                ops,
            },
        )
}

fn write_data(handle: u64, len: u32) -> Vec<u8> {
    (0..u64::from(len)).map(|i| (i ^ handle) as u8).collect()
}

impl Session {
    /// The client's bytes, ending with NBD_CMD_DISC.
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(if self.no_zeroes { 3u32 } else { 1 }).to_be_bytes());
        let opt = |b: &mut Vec<u8>, o: u32, data: &[u8]| {
            b.extend_from_slice(&encode_option_header(o, data.len() as u32));
            b.extend_from_slice(data);
        };
        if self.list_first {
            opt(&mut b, OPT_LIST, &[]);
            opt(&mut b, 0x4242, b"unknown");
        }
        if self.structured {
            opt(&mut b, OPT_STRUCTURED_REPLY, &[]);
        }
        if self.meta {
            let m = encode_meta_context_request(&MetaContextRequest {
                export: self.export.into(),
                queries: vec!["base:allocation".into()],
            });
            opt(&mut b, OPT_SET_META_CONTEXT, &m);
        }
        if self.export_name {
            opt(&mut b, OPT_EXPORT_NAME, self.export.as_bytes());
        } else {
            let g = encode_info_request(&InfoRequest {
                name: self.export.into(),
                requests: vec![INFO_BLOCK_SIZE, INFO_DESCRIPTION],
            });
            opt(&mut b, OPT_GO, &g);
        }
        for (i, op) in self.ops.iter().enumerate() {
            let h = i as u64;
            let (command, flags, offset, length) = match *op {
                Op::Read { off, len, flags } => (CMD_READ, flags, off, len),
                Op::Write { off, len, fua } => {
                    (CMD_WRITE, if fua { CMD_FLAG_FUA } else { 0 }, off, len)
                }
                Op::Flush => (CMD_FLUSH, 0, 0, 0),
                Op::Trim { off, len } => (CMD_TRIM, 0, off, len),
                Op::Zero { off, len, flags } => (CMD_WRITE_ZEROES, flags, off, len),
                Op::Status { off, len, req_one } => (
                    CMD_BLOCK_STATUS,
                    if req_one { CMD_FLAG_REQ_ONE } else { 0 },
                    off,
                    len,
                ),
                Op::Cache { off, len } => (CMD_CACHE, 0, off, len),
                Op::Unknown { cmd } => (cmd, 0, 0, 0),
            };
            b.extend_from_slice(&encode_request(&Request {
                flags,
                command,
                handle: h,
                offset,
                length,
            }));
            if let Op::Write { len, .. } = *op {
                b.extend_from_slice(&write_data(h, len));
            }
        }
        b.extend_from_slice(&encode_request(&Request {
            flags: 0,
            command: CMD_DISC,
            handle: 999,
            offset: 0,
            length: 0,
        }));
        b
    }

    /// What the spec (and invariant 6) says each op must get: 0 or an error.
    fn expected_errno(&self, op: &Op) -> u32 {
        let ro = self.export == "ro";
        let in_range =
            |off: u64, len: u32| off.checked_add(u64::from(len)).is_some_and(|e| e <= SIZE);
        match *op {
            Op::Read { off, len, flags } => {
                if flags == CMD_FLAG_DF && !self.structured || !in_range(off, len) {
                    EINVAL
                } else {
                    0
                }
            }
            Op::Trim { off, len } => {
                if ro {
                    EPERM
                } else if !in_range(off, len) {
                    EINVAL
                } else {
                    0
                }
            }
            // Writes past the end: ENOSPC, the spec's SHOULD.
            Op::Write { off, len, .. } => {
                if ro {
                    EPERM
                } else if !in_range(off, len) {
                    ENOSPC
                } else {
                    0
                }
            }
            Op::Zero { off, len, flags } => {
                if ro {
                    EPERM
                } else if !in_range(off, len) {
                    ENOSPC
                } else if flags == CMD_FLAG_FAST_ZERO {
                    ENOTSUP
                } else {
                    0
                }
            }
            Op::Flush => 0,
            Op::Status { off, len, .. } => {
                if !self.meta || !in_range(off, len) || len == 0 {
                    EINVAL
                } else {
                    0
                }
            }
            Op::Cache { off, len } => {
                if in_range(off, len) {
                    0
                } else {
                    EINVAL
                }
            }
            Op::Unknown { .. } => EINVAL,
        }
    }
}

/// A cursor over the server's output that fails the test on short data.
struct Out<'a>(&'a [u8]);

impl<'a> Out<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        assert!(
            self.0.len() >= n,
            "server output ends early (wanted {n}, have {})",
            self.0.len()
        );
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a
    }
    fn option_replies(&mut self, opt: u32) {
        loop {
            let h = decode_option_reply_header(self.take(20).try_into().unwrap()).unwrap();
            assert_eq!(h.option, opt);
            self.take(h.length as usize);
            if h.reply_type == REP_ACK || h.reply_type & (1 << 31) != 0 {
                return;
            }
        }
    }
}

/// Parse the server's side of a valid session and check every reply.
fn check_session(s: &Session, out: &[u8]) {
    let mut o = Out(out);
    assert_eq!(&o.take(18)[..8], b"NBDMAGIC");
    if s.list_first {
        o.option_replies(OPT_LIST);
        o.option_replies(0x4242);
    }
    if s.structured {
        o.option_replies(OPT_STRUCTURED_REPLY);
    }
    if s.meta {
        o.option_replies(OPT_SET_META_CONTEXT);
    }
    if s.export_name {
        o.take(if s.no_zeroes { 10 } else { 134 });
    } else {
        o.option_replies(OPT_GO);
    }
    let mut results: HashMap<u64, (u32, Vec<u8>)> = HashMap::new();
    let mut pending: HashMap<u64, &Op> = s
        .ops
        .iter()
        .enumerate()
        .map(|(i, op)| (i as u64, op))
        .collect();
    while !pending.is_empty() {
        let magic: [u8; 4] = o.take(4).try_into().unwrap();
        let mut hdr = magic.to_vec();
        hdr.extend_from_slice(o.take(reply_header_len(magic).unwrap() - 4));
        match decode_reply_header(&hdr).unwrap() {
            ReplyHeader::Simple(r) => {
                assert!(
                    !s.structured || !matches!(pending[&r.handle], Op::Read { .. }),
                    "simple reply to a read"
                );
                let op = pending
                    .remove(&r.handle)
                    .expect("unknown or repeated handle");
                let data = match *op {
                    Op::Read { len, .. } if r.error == 0 => o.take(len as usize).to_vec(),
                    _ => Vec::new(),
                };
                results.insert(r.handle, (r.error, data));
            }
            ReplyHeader::Structured(c) => {
                assert!(s.structured, "structured reply without negotiation");
                let payload = o.take(c.length as usize);
                let entry = results.entry(c.handle).or_insert((0, Vec::new()));
                match c.reply_type {
                    REPLY_TYPE_NONE => assert!(payload.is_empty()),
                    REPLY_TYPE_OFFSET_DATA => entry.1.extend_from_slice(&payload[8..]),
                    REPLY_TYPE_ERROR => entry.0 = decode_error_payload(payload).unwrap().0,
                    REPLY_TYPE_BLOCK_STATUS => {
                        let (_, d) = decode_block_status_payload(payload).unwrap();
                        let Op::Status { len, req_one, .. } = *pending[&c.handle] else {
                            panic!("block status for another command")
                        };
                        let total: u64 = d.iter().map(|x| u64::from(x.length)).sum();
                        assert!(total <= u64::from(len) && d.iter().all(|x| x.length > 0));
                        assert!(!req_one || d.len() == 1);
                    }
                    t => panic!("unexpected chunk type {t}"),
                }
                if c.flags & REPLY_FLAG_DONE != 0 {
                    pending
                        .remove(&c.handle)
                        .expect("unknown or repeated handle");
                }
            }
        }
    }
    assert!(o.0.is_empty(), "bytes after the last reply: {}", o.0.len());
    for (i, op) in s.ops.iter().enumerate() {
        let (errno, data) = &results[&(i as u64)];
        assert_eq!(*errno, s.expected_errno(op), "op {i}: {op:?}");
        if let (Op::Read { off, len, .. }, 0) = (op, errno) {
            assert_eq!(data.len(), *len as usize, "op {i}");
            if *off >= HALF {
                let want: Vec<u8> = (*off..off + u64::from(*len)).map(known).collect();
                assert!(data == &want, "op {i}: read of known data differs");
            }
        }
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(usize, u8),
    Truncate(usize),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Duplicate(usize, usize),
    SetU32(usize, u32),
}

fn arb_mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), 1u8..).prop_map(|(i, x)| Mutation::Flip(i, x)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        2 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..40)).prop_map(|(i, v)| Mutation::Insert(i, v)),
        2 => (any::<usize>(), 1usize..40).prop_map(|(i, n)| Mutation::Delete(i, n)),
        1 => (any::<usize>(), 1usize..200).prop_map(|(i, n)| Mutation::Duplicate(i, n)),
        3 => (any::<usize>(), prop_oneof![Just(0u32), Just(u32::MAX), Just(1 << 25), Just((1 << 25) + 1), Just(65536), any::<u32>()])
            .prop_map(|(i, v)| Mutation::SetU32(i, v)),
    ]
}

fn mutate(mut b: Vec<u8>, ms: &[Mutation]) -> Vec<u8> {
    for m in ms {
        if b.is_empty() {
            break;
        }
        let n = b.len();
        match m {
            Mutation::Flip(i, x) => b[i % n] ^= x,
            Mutation::Truncate(i) => b.truncate(i % n),
            Mutation::Insert(i, v) => {
                let at = i % (n + 1);
                b.splice(at..at, v.iter().copied());
            }
            Mutation::Delete(i, k) => {
                let at = i % n;
                b.drain(at..(at + k).min(n));
            }
            Mutation::Duplicate(i, k) => {
                let at = i % n;
                let seg: Vec<u8> = b[at..(at + k).min(n)].to_vec();
                b.splice(at..at, seg);
            }
            Mutation::SetU32(i, v) if n >= 4 => {
                let at = i % (n - 3);
                b[at..at + 4].copy_from_slice(&v.to_be_bytes());
            }
            Mutation::SetU32(..) => {}
        }
    }
    b
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// Unmutated valid sessions: every request answered once, with the right error or data.
    #[test]
    fn valid_sessions_are_answered_correctly(s in arb_session()) {
        let out = drive(&s.encode());
        check_session(&s, &out);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    /// Valid sessions with a few random mutations: no panic, no hang, nothing left open.
    #[test]
    fn mutated_sessions_never_crash(s in arb_session(), ms in prop::collection::vec(arb_mutation(), 1..6)) {
        drive(&mutate(s.encode(), &ms));
    }

    /// Plain random bytes.
    #[test]
    fn random_bytes_never_crash(b in prop::collection::vec(any::<u8>(), 0..2048)) {
        drive(&b);
    }

    /// Random bytes after a valid handshake (structured or not): the request parser's turn.
    #[test]
    fn random_requests_never_crash(structured in any::<bool>(), tail in prop::collection::vec(any::<u8>(), 0..4096)) {
        let s = Session { export: "a", structured, meta: structured, export_name: false, no_zeroes: true, list_first: false, ops: vec![] };
        let mut b = s.encode();
        b.truncate(b.len() - REQUEST_LEN);
        // Random requests with a valid magic, so they get past the first check.
        for chunk in tail.chunks(REQUEST_LEN) {
            b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            b.extend_from_slice(chunk);
        }
        drive(&b);
    }
}

#[test]
fn write_seeds() {
    let Ok(dir) = std::env::var("MVSNAP_WRITE_FUZZ_SEEDS") else {
        return;
    };
    std::fs::create_dir_all(&dir).unwrap();
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    for i in 0..64 {
        let s = arb_session().new_tree(&mut runner).unwrap().current();
        // The fuzz target reads its first byte as a mode selector: 0 = whole connection.
        let mut b = vec![0u8];
        b.extend(s.encode());
        std::fs::write(format!("{dir}/session-{i:02}"), b).unwrap();
    }
    let _ = proto::MAX_PAYLOAD;
}
