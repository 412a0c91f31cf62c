//! Hand-written protocol tests over a real Unix socket: good paths byte by byte, and the bad
//! input a hostile or broken client can send.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use mvsnap_nbd::memory::{MemExport, MemRegistry};
use mvsnap_nbd::proto::{self, *};
use mvsnap_nbd::{bind_unix, Export, ExportRegistry, Extent, NbdServer, OpenError};

fn server() -> TestServer {
    TestServer::start(vec![
        ("disk", "the main disk", MemExport::new(4 * MIB)),
        ("ro", "a read-only snapshot", MemExport::new_read_only(MIB)),
        ("big", "64 MiB, sparse", MemExport::new(64 * MIB)),
    ])
}

#[test]
fn wrong_option_magic_closes_and_others_are_served() {
    let t = server();
    let mut c = t.connect();
    c.greet(3);
    c.send(b"NOTMAGIC\0\0\0\x01\0\0\0\0");
    assert!(c.is_closed());

    let mut c = t.connect();
    c.handshake("disk", false, false);
    c.request(CMD_READ, 0, 1, 0, 512);
    assert_eq!(c.simple(), (1, 0));
    assert_eq!(c.recv(512), vec![0; 512]);
    c.disconnect();
}

#[test]
fn wrong_request_magic_closes() {
    let t = server();
    let mut c = t.connect();
    c.handshake("disk", true, false);
    let mut bad = encode_request(&Request {
        flags: 0,
        command: CMD_READ,
        handle: 1,
        offset: 0,
        length: 512,
    });
    bad[0] = 0x12;
    c.send(&bad);
    assert!(c.is_closed());
}

#[test]
fn bad_client_flags_close() {
    let t = server();
    let mut c = t.connect();
    c.greet(1 << 5);
    assert!(c.is_closed());
}

#[test]
fn unknown_option_gets_unsup_and_connection_still_works() {
    let t = server();
    t.export("disk").fill(0, &[0x5a; 4096]);
    let mut c = t.connect();
    c.greet(3);
    let r = c.option(0x1234, b"some data the server cannot know");
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0, REP_ERR_UNSUP);
    let r = c.option(OPT_STARTTLS, &[]);
    assert_eq!(r[0].0, REP_ERR_UNSUP);
    let r = c.option(OPT_LIST, b"x");
    assert_eq!(r[0].0, REP_ERR_INVALID);
    let (size, flags) = c.go("disk").unwrap();
    assert_eq!(size, 4 * MIB);
    assert_eq!(flags & FLAG_READ_ONLY, 0);
    c.request(CMD_READ, 0, 7, 0, 4096);
    assert_eq!(c.simple(), (7, 0));
    assert_eq!(c.recv(4096), vec![0x5a; 4096]);
    c.disconnect();
}

#[test]
fn oversize_options_are_bounded() {
    let t = server();
    // Over the 64 KiB limit but sane: skipped, TOO_BIG, and negotiation goes on.
    let mut c = t.connect();
    c.greet(3);
    let r = c.option(OPT_GO, &vec![0u8; 100 * 1024]);
    assert_eq!(r, vec![(REP_ERR_TOO_BIG, b"option too big".to_vec())]);
    let r = c.option(OPT_LIST, &[]);
    assert_eq!(r.last().unwrap().0, REP_ACK);

    // A 4 GiB option is not worth reading: closed without the data being sent.
    let mut c = t.connect();
    c.greet(3);
    c.send(&encode_option_header(OPT_GO, u32::MAX));
    assert!(c.is_closed());

    // EXPORT_NAME cannot be answered with an error: an oversize one closes.
    let mut c = t.connect();
    c.greet(3);
    c.send(&encode_option_header(OPT_EXPORT_NAME, 70 * 1024));
    assert!(c.is_closed());
}

#[test]
fn list_info_and_unknown_exports() {
    let t = server();
    let mut c = t.connect();
    c.greet(3);
    let r = c.option(OPT_LIST, &[]);
    assert_eq!(r.last().unwrap(), &(REP_ACK, vec![]));
    let servers: Vec<(String, String)> = r[..r.len() - 1]
        .iter()
        .map(|(ty, d)| {
            assert_eq!(*ty, REP_SERVER);
            let n = u32::from_be_bytes(d[0..4].try_into().unwrap()) as usize;
            (
                String::from_utf8(d[4..4 + n].to_vec()).unwrap(),
                String::from_utf8(d[4 + n..].to_vec()).unwrap(),
            )
        })
        .collect();
    assert_eq!(
        servers,
        vec![
            ("disk".into(), "the main disk".into()),
            ("ro".into(), "a read-only snapshot".into()),
            ("big".into(), "64 MiB, sparse".into()),
        ]
    );

    let body = encode_info_request(&InfoRequest {
        name: "ro".into(),
        requests: vec![INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE],
    });
    let r = c.option(OPT_INFO, &body);
    assert_eq!(r.last().unwrap().0, REP_ACK);
    let infos: Vec<&Vec<u8>> = r.iter().filter(|x| x.0 == REP_INFO).map(|x| &x.1).collect();
    let find = |t: u16| infos.iter().find(|d| d[0..2] == t.to_be_bytes()).unwrap();
    let exp = find(INFO_EXPORT);
    assert_eq!(u64::from_be_bytes(exp[2..10].try_into().unwrap()), MIB);
    let flags = u16::from_be_bytes(exp[10..12].try_into().unwrap());
    assert_eq!(
        flags & (FLAG_HAS_FLAGS | FLAG_READ_ONLY),
        FLAG_HAS_FLAGS | FLAG_READ_ONLY
    );
    assert_eq!(flags & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES), 0);
    assert_eq!(&find(INFO_NAME)[2..], b"ro");
    assert_eq!(&find(INFO_DESCRIPTION)[2..], b"a read-only snapshot");
    assert_eq!(
        &find(INFO_BLOCK_SIZE)[2..],
        &[0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0]
    );

    // Unknown names: INFO and GO fail with ERR_UNKNOWN and the session goes on; the empty
    // default name is just another unknown name here.
    for name in ["nope", ""] {
        let body = encode_info_request(&InfoRequest {
            name: name.into(),
            requests: vec![],
        });
        let r = c.option(OPT_INFO, &body);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].0, REP_ERR_UNKNOWN);
        assert_eq!(c.go(name).unwrap_err().0, REP_ERR_UNKNOWN);
    }
    assert_eq!(c.go("disk").unwrap().0, 4 * MIB);
    c.disconnect();
}

#[test]
fn abort_is_acknowledged() {
    let t = server();
    let mut c = t.connect();
    c.greet(3);
    assert_eq!(c.option(OPT_ABORT, &[]), vec![(REP_ACK, vec![])]);
    assert!(c.is_closed());
}

#[test]
fn export_name_with_and_without_zeroes() {
    let t = server();
    t.export("disk").fill(100, b"hello");
    for (flags, tail) in [(1u32, 124usize), (3, 0)] {
        let mut c = t.connect();
        c.greet(flags);
        c.send_option(OPT_EXPORT_NAME, b"disk");
        let r = c.recv(10 + tail);
        assert_eq!(u64::from_be_bytes(r[0..8].try_into().unwrap()), 4 * MIB);
        let tflags = u16::from_be_bytes(r[8..10].try_into().unwrap());
        assert_ne!(tflags & FLAG_HAS_FLAGS, 0);
        assert_eq!(tflags & FLAG_SEND_DF, 0, "DF without structured replies");
        assert!(r[10..].iter().all(|&b| b == 0));
        c.request(CMD_READ, 0, 5, 100, 5);
        assert_eq!(c.simple(), (5, 0));
        assert_eq!(c.recv(5), b"hello");
        c.disconnect();
    }
    // Unknown export on EXPORT_NAME: the only possible answer is to close.
    let mut c = t.connect();
    c.greet(3);
    c.send_option(OPT_EXPORT_NAME, b"missing");
    assert!(c.is_closed());
}

#[test]
fn simple_reply_path() {
    let t = server();
    let e = t.export("disk");
    let mut c = t.connect();
    let (_, flags) = c.handshake("disk", false, false);
    for f in [
        FLAG_SEND_FLUSH,
        FLAG_SEND_FUA,
        FLAG_SEND_TRIM,
        FLAG_SEND_WRITE_ZEROES,
        FLAG_SEND_CACHE,
        FLAG_CAN_MULTI_CONN,
    ] {
        assert_ne!(flags & f, 0, "flag {f:#x}");
    }
    let data = pattern_bytes(1, 10_000);
    c.write_req(1, 3000, &data);
    assert_eq!(c.simple(), (1, 0));
    c.request(CMD_WRITE, CMD_FLAG_FUA, 2, 0, 0);
    assert_eq!(c.simple(), (2, 0));
    c.request(CMD_READ, 0, 3, 3000, 10_000);
    assert_eq!(c.simple(), (3, 0));
    assert_eq!(c.recv(10_000), data);
    // An error read carries no data: the next bytes are the next reply.
    c.request(CMD_READ, 0, 4, 4 * MIB - 10, 11);
    assert_eq!(c.simple(), (4, EINVAL));
    c.request(CMD_FLUSH, 0, 5, 0, 0);
    assert_eq!(c.simple(), (5, 0));
    c.request(CMD_WRITE_ZEROES, 0, 6, 4096, 4096);
    assert_eq!(c.simple(), (6, 0));
    c.request(CMD_TRIM, CMD_FLAG_FUA, 7, 8192, 4096);
    assert_eq!(c.simple(), (7, 0));
    c.request(CMD_CACHE, 0, 8, 0, 4096);
    assert_eq!(c.simple(), (8, 0));
    // Block status needs structured replies and a context.
    c.request(CMD_BLOCK_STATUS, 0, 9, 0, 4096);
    assert_eq!(c.simple(), (9, EINVAL));
    c.disconnect();

    let mut want = vec![0u8; 4 * MIB as usize];
    want[3000..13_000].copy_from_slice(&data);
    want[4096..12288].fill(0);
    assert_eq!(sha256(&e.contents()), sha256(&want));
    assert!(e.flush_count() >= 2, "FLUSH and FUA reach the export");
}

/// Issue 7 item 13: a write reaching past the end gets ENOSPC (the spec's SHOULD, nbdkit's
/// answer), so a client knows the device is full rather than that it sent garbage; nothing of
/// it is written, and a read past the end stays EINVAL.
#[test]
fn write_past_the_end_gets_enospc() {
    let t = server();
    let e = t.export("disk");
    let mut c = t.connect();
    c.handshake("disk", false, false);
    let before = sha256(&e.contents());
    c.write_req(1, 4 * MIB - 4096, &[0x5a; 8192]);
    assert_eq!(c.simple(), (1, ENOSPC));
    c.request(CMD_WRITE_ZEROES, 0, 2, 4 * MIB - 512, 1024);
    assert_eq!(c.simple(), (2, ENOSPC));
    c.request(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 3, 4 * MIB, 1);
    assert_eq!(c.simple(), (3, ENOSPC));
    c.request(CMD_TRIM, 0, 4, 4 * MIB - 512, 1024);
    assert_eq!(c.simple(), (4, EINVAL));
    c.request(CMD_READ, 0, 5, 4 * MIB, 1);
    assert_eq!(c.simple(), (5, EINVAL));
    // The connection goes on: a write that fits works.
    c.write_req(6, 4 * MIB - 4096, &[0x5a; 4096]);
    assert_eq!(c.simple(), (6, 0));
    c.disconnect();
    let mut want = vec![0u8; 4 * MIB as usize];
    assert_eq!(before, sha256(&want), "the export started zeroed");
    want[4 * MIB as usize - 4096..].fill(0x5a);
    assert_eq!(sha256(&e.contents()), sha256(&want));
}

#[test]
fn structured_reply_path() {
    let t = server();
    let e = t.export("disk");
    e.fill(MIB, &[0xee; 8192]);
    let mut c = t.connect();
    let (_, flags) = c.handshake("disk", true, true);
    assert_ne!(flags & FLAG_SEND_DF, 0);

    c.write_req(1, 512, &[0xab; 1024]);
    let ch = c.chunk();
    assert_eq!(
        (ch.handle, ch.flags, ch.reply_type),
        (1, REPLY_FLAG_DONE, REPLY_TYPE_NONE)
    );
    assert!(ch.payload.is_empty());

    c.request(CMD_READ, CMD_FLAG_DF, 2, 0, 2048);
    let ch = c.chunk();
    assert_eq!(
        (ch.handle, ch.flags, ch.reply_type),
        (2, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA)
    );
    assert_eq!(u64::from_be_bytes(ch.payload[0..8].try_into().unwrap()), 0);
    let data = &ch.payload[8..];
    assert_eq!(data.len(), 2048);
    assert!(data[..512].iter().all(|&b| b == 0));
    assert!(data[512..1536].iter().all(|&b| b == 0xab));
    assert!(data[1536..].iter().all(|&b| b == 0));

    // Errors come as an ERROR chunk with a message.
    c.request(CMD_READ, 0, 3, 4 * MIB, 1);
    let ch = c.chunk();
    assert_eq!(
        (ch.handle, ch.flags, ch.reply_type),
        (3, REPLY_FLAG_DONE, REPLY_TYPE_ERROR)
    );
    let (err, msg) = decode_error_payload(&ch.payload).unwrap();
    assert_eq!(err, EINVAL);
    assert!(msg.contains("beyond the end"), "{msg}");

    // Zero-length read: just NONE.
    c.request(CMD_READ, 0, 4, 100, 0);
    assert_eq!(c.chunk().reply_type, REPLY_TYPE_NONE);

    // Block status: data at [0,4096) (the write), hole, data at [1M, 1M+8K), hole.
    c.request(CMD_BLOCK_STATUS, 0, 5, 0, (2 * MIB) as u32);
    let ch = c.chunk();
    assert_eq!(
        (ch.handle, ch.flags, ch.reply_type),
        (5, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS)
    );
    let (id, d) = decode_block_status_payload(&ch.payload).unwrap();
    assert_eq!(id, 1);
    let d: Vec<(u32, u32)> = d.iter().map(|x| (x.length, x.flags)).collect();
    assert_eq!(
        d,
        vec![
            (4096, 0),
            (MIB as u32 - 4096, 3),
            (8192, 0),
            (MIB as u32 - 8192, 3)
        ]
    );
    // REQ_ONE: exactly one descriptor, within the request.
    c.request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 6, 4096, 100);
    let (_, d) = decode_block_status_payload(&c.chunk().payload).unwrap();
    assert_eq!(
        d,
        vec![Descriptor {
            length: 100,
            flags: 3
        }]
    );
    c.request(CMD_BLOCK_STATUS, 0, 7, 4 * MIB - 1, 2);
    assert_eq!(c.chunk().reply_type, REPLY_TYPE_ERROR);
    c.disconnect();
}

#[test]
fn meta_context_negotiation() {
    let t = server();
    let mut c = t.connect();
    c.greet(3);
    let list = |q: Vec<&str>| {
        encode_meta_context_request(&MetaContextRequest {
            export: "disk".into(),
            queries: q.into_iter().map(String::from).collect(),
        })
    };
    // Before structured replies: invalid.
    assert_eq!(
        c.option(OPT_LIST_META_CONTEXT, &list(vec![]))[0].0,
        REP_ERR_INVALID
    );
    assert_eq!(
        c.option(OPT_SET_META_CONTEXT, &list(vec!["base:allocation"]))[0].0,
        REP_ERR_INVALID
    );
    c.option(OPT_STRUCTURED_REPLY, &[]);
    for q in [
        vec![],
        vec!["base:"],
        vec!["base:allocation"],
        vec!["x-foo:bar", "base:"],
    ] {
        let r = c.option(OPT_LIST_META_CONTEXT, &list(q.clone()));
        assert_eq!(r.len(), 2, "{q:?}: {r:?}");
        assert_eq!(r[0].0, REP_META_CONTEXT);
        assert_eq!(&r[0].1[4..], b"base:allocation");
    }
    assert_eq!(
        c.option(OPT_LIST_META_CONTEXT, &list(vec!["qemu:dirty-bitmap:a"])),
        vec![(REP_ACK, vec![])]
    );
    // Unknown export.
    let bad = encode_meta_context_request(&MetaContextRequest {
        export: "nope".into(),
        queries: vec![],
    });
    assert_eq!(c.option(OPT_LIST_META_CONTEXT, &bad)[0].0, REP_ERR_UNKNOWN);
    // Malformed.
    assert_eq!(
        c.option(OPT_SET_META_CONTEXT, &[0, 0, 0, 9])[0].0,
        REP_ERR_INVALID
    );
    // SET with no queries selects nothing, so BLOCK_STATUS is refused.
    assert_eq!(
        c.option(OPT_SET_META_CONTEXT, &list(vec![])),
        vec![(REP_ACK, vec![])]
    );
    c.go("disk").unwrap();
    c.request(CMD_BLOCK_STATUS, 0, 1, 0, 4096);
    let ch = c.chunk();
    assert_eq!(ch.reply_type, REPLY_TYPE_ERROR);
    assert_eq!(decode_error_payload(&ch.payload).unwrap().0, EINVAL);
    c.disconnect();

    // Contexts selected for another export do not carry over.
    let mut c = t.connect();
    c.greet(3);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    let r = c.option(
        OPT_SET_META_CONTEXT,
        &encode_meta_context_request(&MetaContextRequest {
            export: "big".into(),
            queries: vec!["base:allocation".into()],
        }),
    );
    assert_eq!(r.len(), 2);
    c.go("disk").unwrap();
    c.request(CMD_BLOCK_STATUS, 0, 1, 0, 4096);
    assert_eq!(c.chunk().reply_type, REPLY_TYPE_ERROR);
    c.disconnect();
}

#[test]
fn oversize_lengths_get_einval_and_the_connection_survives() {
    let t = server();
    let e = t.export("big");
    let mut c = t.connect();
    c.handshake("big", false, false);
    let over = (32 * MIB + 1) as u32;
    c.request(CMD_READ, 0, 1, 0, over);
    assert_eq!(c.simple(), (1, EINVAL));
    // An oversize WRITE's payload is read and thrown away; the framing survives.
    let mut b = encode_request(&Request {
        flags: 0,
        command: CMD_WRITE,
        handle: 2,
        offset: 0,
        length: over,
    })
    .to_vec();
    b.extend(std::iter::repeat_n(0x77u8, over as usize));
    c.send(&b);
    assert_eq!(c.simple(), (2, EINVAL));
    assert!(e.allocated_blocks().is_empty(), "nothing was written");
    c.write_req(3, 0, &[1, 2, 3]);
    assert_eq!(c.simple(), (3, 0));
    c.request(CMD_READ, 0, 4, 0, 3);
    assert_eq!(c.simple(), (4, 0));
    assert_eq!(c.recv(3), vec![1, 2, 3]);
    // Exactly the maximum is fine.
    c.request(CMD_READ, 0, 5, 0, (32 * MIB) as u32);
    assert_eq!(c.simple(), (5, 0));
    let d = c.recv(32 * MIB as usize);
    assert_eq!(&d[..4], &[1, 2, 3, 0]);
    c.disconnect();
}

#[test]
fn past_the_end_gets_einval() {
    let t = server();
    let e = t.export("disk");
    let end = 4 * MIB;
    let mut c = t.connect();
    c.handshake("disk", true, true);
    // Writes past the end get ENOSPC (write_past_the_end_gets_enospc), the rest EINVAL.
    let cases: &[(u16, u64, u32, u32)] = &[
        (CMD_READ, end, 1, EINVAL),
        (CMD_READ, end - 1, 2, EINVAL),
        (CMD_READ, u64::MAX, 1, EINVAL),
        (CMD_TRIM, end - 4096, 8192, EINVAL),
        (CMD_WRITE_ZEROES, end, 4096, ENOSPC),
        (CMD_BLOCK_STATUS, end, 1, EINVAL),
        (CMD_BLOCK_STATUS, 0, u32::MAX, EINVAL),
        (CMD_CACHE, u64::MAX - 10, 100, EINVAL),
    ];
    for (i, &(cmd, off, len, want)) in cases.iter().enumerate() {
        c.request(cmd, 0, i as u64, off, len);
        let ch = c.chunk();
        assert_eq!(
            (ch.handle, ch.reply_type),
            (i as u64, REPLY_TYPE_ERROR),
            "case {i}"
        );
        assert_eq!(
            decode_error_payload(&ch.payload).unwrap().0,
            want,
            "case {i}"
        );
    }
    c.write_req(100, end - 2, &[9, 9, 9, 9]);
    let ch = c.chunk();
    assert_eq!(decode_error_payload(&ch.payload).unwrap().0, ENOSPC);
    c.write_req(101, end - 4, &[9, 9, 9, 9]);
    assert_eq!(c.chunk().reply_type, REPLY_TYPE_NONE);
    c.disconnect();
    assert_eq!(e.allocated_blocks(), vec![end / 4096 - 1]);
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let t = server();
    let e = t.export("ro");
    e.fill(0, &[0x11; 4096]);
    for structured in [false, true] {
        let mut c = t.connect();
        let (_, flags) = c.handshake("ro", structured, false);
        assert_ne!(flags & FLAG_READ_ONLY, 0);
        c.write_req(1, 0, &[0x22; 4096]);
        c.request(CMD_TRIM, 0, 2, 0, 4096);
        c.request(CMD_WRITE_ZEROES, 0, 3, 0, 4096);
        // Replies may come in any order (the spec allows it; threads answer them).
        let mut handles = Vec::new();
        for _ in 1..=3 {
            match c.reply() {
                Reply::Simple { handle, error } => {
                    assert!(!structured);
                    assert_eq!(error, EPERM, "handle {handle}");
                    handles.push(handle);
                }
                Reply::Chunk(ch) => {
                    assert!(structured);
                    assert_eq!(ch.reply_type, REPLY_TYPE_ERROR, "handle {}", ch.handle);
                    assert_eq!(decode_error_payload(&ch.payload).unwrap().0, EPERM);
                    handles.push(ch.handle);
                }
            }
        }
        handles.sort();
        assert_eq!(handles, vec![1, 2, 3]);
        c.request(CMD_FLUSH, 0, 4, 0, 0);
        if structured {
            assert_eq!(c.chunk().reply_type, REPLY_TYPE_NONE);
        } else {
            assert_eq!(c.simple(), (4, 0));
        }
        c.request(CMD_READ, 0, 5, 0, 8);
        if structured {
            assert_eq!(&c.chunk().payload[8..], &[0x11; 8]);
        } else {
            assert_eq!(c.simple(), (5, 0));
            assert_eq!(c.recv(8), vec![0x11; 8]);
        }
        c.disconnect();
    }
    assert!(e.contents()[..4096].iter().all(|&b| b == 0x11));
    assert_eq!(e.allocated_blocks(), vec![0]);
}

#[test]
fn unknown_commands_flags_and_fast_zero() {
    let t = server();
    let e = t.export("disk");
    e.fill(0, &[0x33; 4096]);
    let mut c = t.connect();
    c.handshake("disk", false, false);
    c.request(42, 0, 1, 0, 0);
    assert_eq!(c.simple(), (1, EINVAL));
    c.request(CMD_READ, CMD_FLAG_NO_HOLE, 2, 0, 4);
    assert_eq!(c.simple(), (2, EINVAL));
    c.request(CMD_READ, 1 << 12, 3, 0, 4);
    assert_eq!(c.simple(), (3, EINVAL));
    c.request(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 4, 0, 4096);
    assert_eq!(c.simple(), (4, ENOTSUP));
    assert!(
        e.contents()[..4096].iter().all(|&b| b == 0x33),
        "fast zero touched nothing"
    );
    c.request(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 5, 0, 4096);
    assert_eq!(c.simple(), (5, 0));
    assert!(e.contents()[..4096].iter().all(|&b| b == 0));
    assert_eq!(
        e.allocated_blocks(),
        vec![0],
        "NO_HOLE keeps the block allocated"
    );
    c.disconnect();
}

#[test]
fn clients_vanishing_mid_request_do_not_hurt_others() {
    let t = server();
    let e = t.export("disk");
    {
        // Half a write payload, then gone.
        let mut c = t.connect();
        c.handshake("disk", false, false);
        c.send(&encode_request(&Request {
            flags: 0,
            command: CMD_WRITE,
            handle: 1,
            offset: 0,
            length: 65536,
        }));
        c.send(&[0xcc; 1000]);
    }
    {
        // Half a request header.
        let mut c = t.connect();
        c.handshake("disk", true, false);
        c.send(&[0x25, 0x60, 0x95]);
    }
    {
        // Mid-option.
        let mut c = t.connect();
        c.greet(3);
        c.send(&encode_option_header(OPT_GO, 100));
        c.send(&[0; 10]);
    }
    {
        // Many reads queued, replies never read.
        let mut c = t.connect();
        c.handshake("disk", false, false);
        for h in 0..100 {
            c.request(CMD_READ, 0, h, 0, 65536);
        }
    }
    // The server cleans up: no connection is left in transmission.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !t.server.open_exports().is_empty() {
        assert!(
            Instant::now() < deadline,
            "stale connections: {:?}",
            t.server.open_exports()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        e.allocated_blocks().is_empty(),
        "a torn write must not be applied"
    );
    let mut c = t.connect();
    c.handshake("disk", false, false);
    c.write_req(9, 0, &[1; 512]);
    assert_eq!(c.simple(), (9, 0));
    c.disconnect();
}

#[test]
fn pipelined_requests_are_all_answered() {
    let t = server();
    let mut c = t.connect();
    c.handshake("disk", true, false);
    let mut sender = c.s.try_clone().unwrap();
    const N: u64 = 300;
    // Writes of distinct patterns, then reads of them, all without waiting; replies are read
    // concurrently so neither side blocks on a full socket.
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        for i in 0..N {
            let mut b = encode_request(&Request {
                flags: if i % 7 == 0 { CMD_FLAG_FUA } else { 0 },
                command: CMD_WRITE,
                handle: i,
                offset: i * 8192,
                length: 8192,
            })
            .to_vec();
            b.extend(pattern_bytes(i, 8192));
            sender.write_all(&b).unwrap();
        }
        for i in 0..N {
            sender
                .write_all(&encode_request(&Request {
                    flags: 0,
                    command: CMD_READ,
                    handle: N + i,
                    offset: i * 8192,
                    length: 8192,
                }))
                .unwrap();
        }
    });
    let mut seen = vec![false; 2 * N as usize];
    for _ in 0..2 * N {
        let ch = c.chunk();
        let h = ch.handle as usize;
        assert!(!seen[h], "handle {h} answered twice");
        seen[h] = true;
        if ch.handle < N {
            assert_eq!(ch.reply_type, REPLY_TYPE_NONE);
        } else {
            // A read may overtake its write only if the client sent it first, which it did
            // not: every write was sent before every read, but replies may still reorder.
            assert_eq!(ch.reply_type, REPLY_TYPE_OFFSET_DATA);
        }
    }
    writer.join().unwrap();
    assert!(seen.iter().all(|&s| s));
    let contents = t.export("disk").contents();
    for i in 0..N as usize {
        assert_eq!(
            &contents[i * 8192..(i + 1) * 8192],
            pattern_bytes(i as u64, 8192).as_slice()
        );
    }
    c.disconnect();
}

#[test]
fn block_status_on_a_huge_export_uses_32_bit_lengths() {
    let t = TestServer::start(vec![("huge", "", MemExport::new(16 << 30))]);
    let e = t.export("huge");
    e.fill(0, &[1; 4096]);
    e.fill(10 << 30, &[1; 4096]);
    let mut c = t.connect();
    c.handshake("huge", true, true);
    c.request(CMD_BLOCK_STATUS, 0, 1, 0, u32::MAX);
    let (_, d) = decode_block_status_payload(&c.chunk().payload).unwrap();
    assert_eq!(
        d,
        vec![
            Descriptor {
                length: 4096,
                flags: 0
            },
            Descriptor {
                length: u32::MAX - 4096,
                flags: 3
            }
        ]
    );
    c.request(CMD_BLOCK_STATUS, 0, 2, (10 << 30) - 4096, u32::MAX);
    let (_, d) = decode_block_status_payload(&c.chunk().payload).unwrap();
    assert_eq!(
        &d[..2],
        &[
            Descriptor {
                length: 4096,
                flags: 3
            },
            Descriptor {
                length: 4096,
                flags: 0
            }
        ]
    );
    assert_eq!(
        d.iter().map(|x| u64::from(x.length)).sum::<u64>(),
        u64::from(u32::MAX)
    );
    c.disconnect();
}

/// An export whose reads block until released, to catch requests in flight.
struct GateExport {
    inner: MemExport,
    entered: AtomicUsize,
    open: AtomicBool,
}

impl Export for GateExport {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn can_multi_conn(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.entered.fetch_add(1, Ordering::SeqCst);
        while !self.open.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.inner.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> std::io::Result<()> {
        self.inner.write(offset, data, fua)
    }
    fn flush(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn trim(&self, offset: u64, length: u64) -> std::io::Result<()> {
        self.inner.trim(offset, length)
    }
    fn write_zeroes(&self, o: u64, l: u64, t: bool, f: bool) -> std::io::Result<()> {
        self.inner.write_zeroes(o, l, t, f)
    }
    fn block_status(&self, offset: u64, length: u64) -> std::io::Result<Vec<Extent>> {
        self.inner.block_status(offset, length)
    }
}

struct GateRegistry {
    gate: Arc<GateExport>,
    other: Arc<MemExport>,
}

impl ExportRegistry for GateRegistry {
    fn list(&self) -> Vec<mvsnap_nbd::ExportInfo> {
        vec![]
    }
    fn open(&self, name: &str) -> Result<Arc<dyn Export>, OpenError> {
        match name {
            "gate" => Ok(self.gate.clone()),
            "other" => Ok(self.other.clone()),
            "broken" => Err(OpenError::Unavailable("snapshot invalidated".into())),
            _ => Err(OpenError::NotFound),
        }
    }
}

/// A server on a Unix socket whose "gate" export holds reads until released.
struct GateServer {
    dir: tempfile::TempDir,
    sock: std::path::PathBuf,
    gate: Arc<GateExport>,
    rt: tokio::runtime::Runtime,
    server: NbdServer,
    listener: tokio::net::UnixListener,
}

fn gate_server() -> GateServer {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let gate = Arc::new(GateExport {
        inner: MemExport::new(MIB),
        entered: AtomicUsize::new(0),
        open: AtomicBool::new(false),
    });
    gate.inner.fill(0, b"in flight");
    let reg = GateRegistry {
        gate: gate.clone(),
        other: Arc::new(MemExport::new(MIB)),
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = NbdServer::new(Arc::new(reg));
    let listener = {
        let _g = rt.enter();
        bind_unix(&sock).unwrap()
    };
    GateServer {
        dir,
        sock,
        gate,
        rt,
        server,
        listener,
    }
}

#[test]
fn disconnect_and_shutdown_finish_in_flight_requests() {
    let GateServer {
        dir: _dir,
        sock,
        gate,
        rt,
        server,
        listener,
    } = gate_server();
    // The socket is private to its owner.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let s = server.clone();
    let serve = rt.spawn(async move { s.serve_unix(listener).await });

    let mut a1 = RawClient::connect(&sock);
    a1.handshake("gate", false, false);
    let mut a2 = RawClient::connect(&sock);
    a2.handshake("gate", true, false);
    let mut b = RawClient::connect(&sock);
    b.handshake("other", false, false);
    let mut h = RawClient::connect(&sock);
    h.greet(3);
    let body = encode_info_request(&InfoRequest {
        name: "broken".into(),
        requests: vec![],
    });
    let r = h.option(OPT_GO, &body);
    assert_eq!(r[0].0, REP_ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&r[0].1).contains("snapshot invalidated"));
    assert_eq!(
        server.open_exports(),
        vec!["gate".to_string(), "other".to_string()]
    );

    // A read is stuck inside the export when the export is disconnected.
    a1.request(CMD_READ, 0, 77, 0, 9);
    while gate.entered.load(Ordering::SeqCst) == 0 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let s = server.clone();
    let disc = rt.spawn(async move { s.disconnect("gate").await });
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !disc.is_finished(),
        "disconnect must wait for the in-flight read"
    );
    gate.open.store(true, Ordering::SeqCst);
    rt.block_on(disc).unwrap();
    // The read was answered, then the connection closed.
    assert_eq!(a1.simple(), (77, 0));
    assert_eq!(a1.recv(9), b"in flight");
    assert!(a1.is_closed());
    assert!(a2.is_closed());
    assert_eq!(server.open_exports(), vec!["other".to_string()]);

    // The other export is untouched.
    b.write_req(1, 0, b"still here");
    assert_eq!(b.simple(), (1, 0));

    // Shutdown ends the rest (including a client mid-handshake) and serve_unix returns Ok.
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), server.shutdown()).await })
        .unwrap();
    assert!(b.is_closed());
    assert!(h.is_closed());
    rt.block_on(serve).unwrap().unwrap();
    assert!(server.open_exports().is_empty());
    // No longer accepting.
    let refused = match std::os::unix::net::UnixStream::connect(&sock) {
        Err(_) => true,
        Ok(s) => {
            let mut c = RawClient { s };
            c.is_closed()
        }
    };
    assert!(refused);
}

#[test]
fn bind_unix_replaces_stale_sockets_only() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _g = rt.enter();
    let p = dir.path().join("s");
    // A stale socket (its listener is gone) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&p).unwrap());
    let l = bind_unix(&p).unwrap();
    // A live one is not.
    let e = bind_unix(&p).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse);
    drop(l);
    // Nor is a regular file.
    let f = dir.path().join("file");
    std::fs::write(&f, b"x").unwrap();
    assert!(bind_unix(&f).is_err());
    assert_eq!(std::fs::read(&f).unwrap(), b"x");
    let _ = MemRegistry::new();
    let _ = proto::MAX_PAYLOAD;
}

/// Issue 7 item 13: requests the client sent before a shutdown are answered, never dropped in
/// silence: the ones running complete (with their data), the ones not started get ESHUTDOWN
/// and change nothing.
#[test]
fn shutdown_answers_queued_requests_with_eshutdown() {
    let GateServer {
        dir: _dir,
        sock,
        gate,
        rt,
        server,
        listener,
    } = gate_server();
    let s = server.clone();
    let serve = rt.spawn(async move { s.serve_unix(listener).await });
    let mut c = RawClient::connect(&sock);
    c.handshake("gate", false, false);

    // Enough reads to hold every connection thread inside the export, then writes queued
    // behind them that no thread has read yet.
    const READS: u64 = 40;
    const WRITES: u64 = 40;
    for h in 0..READS {
        c.request(CMD_READ, 0, h, 0, 9);
    }
    while gate.entered.load(Ordering::SeqCst) == 0 {
        std::thread::sleep(Duration::from_millis(5));
    }
    // Small writes: with every connection thread held in the export nobody reads the socket,
    // so all of them must fit in its buffer (40 x 4 KiB did not always: the test then blocked
    // in send before it could open the gate).
    for h in 0..WRITES {
        c.write_req(1000 + h, 4096 * (h + 1), &[0xab; 512]);
    }
    std::thread::sleep(Duration::from_millis(100));
    let s = server.clone();
    let shut = rt.spawn(async move { s.shutdown().await });
    std::thread::sleep(Duration::from_millis(200));
    gate.open.store(true, Ordering::SeqCst);

    let mut answered = std::collections::BTreeMap::new();
    for _ in 0..READS + WRITES {
        let (handle, err) = c.simple();
        if handle < READS && err == 0 {
            assert_eq!(c.recv(9), b"in flight", "read {handle}");
        }
        assert!(
            err == 0 || err == ESHUTDOWN,
            "handle {handle}: errno {err}, want 0 or ESHUTDOWN"
        );
        assert!(
            answered.insert(handle, err).is_none(),
            "handle {handle} twice"
        );
    }
    assert!(c.is_closed(), "closed once every request is answered");
    rt.block_on(shut).unwrap();
    rt.block_on(serve).unwrap().unwrap();

    let shut_down = answered.values().filter(|&&e| e == ESHUTDOWN).count();
    assert!(
        shut_down > 0,
        "the queued requests were not run after shutdown"
    );
    assert_eq!(answered[&0], 0, "a read running at shutdown completes");
    // A write answered ESHUTDOWN changed nothing; one answered 0 is there.
    let mut buf = [0u8; 512];
    for h in 0..WRITES {
        gate.inner.read(4096 * (h + 1), &mut buf).unwrap();
        let want = if answered[&(1000 + h)] == 0 { 0xab } else { 0 };
        assert!(buf.iter().all(|&b| b == want), "write {h}");
    }
}
