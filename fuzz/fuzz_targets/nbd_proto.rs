//! Fuzz the NBD server: the option and request parsers, block status normalisation, and —
//! most useful — a whole server connection over an in-memory stream with the input as
//! everything the client sends.
//!
//! The first input byte picks the mode (0: connection, 1: options, 2: requests,
//! 3: extents). Seed a corpus with valid sessions:
//! `MVSNAP_WRITE_FUZZ_SEEDS=fuzz/corpus/nbd_proto cargo test -p mvsnap-nbd --test fuzz_conn write_seeds`
//! then `cargo +nightly fuzz run nbd_proto`.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use mvsnap_nbd::memory::{MemExport, MemRegistry};
use mvsnap_nbd::proto::{self, ClientOption};
use mvsnap_nbd::{normalize_extents, Extent, NbdServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 4 {
        0 => connection(rest),
        1 => options(rest),
        2 => requests(rest),
        _ => extents(rest),
    }
});

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

/// One connection: the input is the client's side, the server's replies are drained.
fn connection(input: &[u8]) {
    let mut reg = MemRegistry::new();
    let a = reg.add("a", "fuzz", MemExport::new(1 << 20));
    a.fill(1 << 19, &[0x5a; 8192]);
    reg.add("ro", "read-only", MemExport::new_read_only(1 << 20));
    let server = NbdServer::new(Arc::new(reg));
    let input = input.to_vec();
    runtime().block_on(async move {
        let (client, server_side) = tokio::io::duplex(64 * 1024);
        let srv = server.clone();
        let task = tokio::spawn(async move { srv.serve_stream(server_side).await });
        let (mut rd, mut wr) = tokio::io::split(client);
        let send = async move {
            let _ = wr.write_all(&input).await;
            let _ = wr.shutdown().await;
        };
        let recv = async move {
            let mut out = Vec::new();
            let _ = rd.read_to_end(&mut out).await;
        };
        tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(send, recv) })
            .await
            .expect("connection hung");
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("server did not finish")
            .expect("server task panicked");
        assert!(server.open_exports().is_empty(), "connection left registered");
    });
}

/// Option header + option data: decoders are total and round-trip what they accept.
fn options(input: &[u8]) {
    if input.len() >= proto::OPTION_HEADER_LEN {
        let _ = proto::decode_option_header(input[..proto::OPTION_HEADER_LEN].try_into().unwrap());
    }
    let Some((opt, body)) = input.split_first_chunk::<4>() else {
        return;
    };
    match proto::parse_option(u32::from_be_bytes(*opt) % 16, body) {
        ClientOption::Go(r) | ClientOption::Info(r) => {
            assert_eq!(proto::encode_info_request(&r), body);
        }
        ClientOption::SetMetaContext(r) | ClientOption::ListMetaContext(r) => {
            assert_eq!(proto::encode_meta_context_request(&r), body);
        }
        _ => {}
    }
}

/// A stream of request headers: decoding is total and round-trips.
fn requests(input: &[u8]) {
    for chunk in input.chunks_exact(proto::REQUEST_LEN) {
        let b: [u8; proto::REQUEST_LEN] = chunk.try_into().unwrap();
        if let Ok(r) = proto::decode_request(&b) {
            assert_eq!(proto::encode_request(&r), b);
        }
    }
}

/// Whatever an export returns, block status replies stay within the spec.
fn extents(input: &[u8]) {
    let Some((head, rest)) = input.split_first_chunk::<5>() else {
        return;
    };
    let length = u32::from_be_bytes([head[0], head[1], head[2], head[3]]).max(1);
    let req_one = head[4] & 1 != 0;
    let ext: Vec<Extent> = rest
        .chunks_exact(12)
        .map(|c| Extent {
            length: u64::from_be_bytes(c[..8].try_into().unwrap()),
            flags: u32::from_be_bytes(c[8..].try_into().unwrap()),
        })
        .collect();
    let d = normalize_extents(&ext, length, req_one);
    assert!(!d.is_empty());
    assert!(d.iter().all(|x| x.length > 0 && x.flags & !3 == 0));
    assert!(d.iter().map(|x| u64::from(x.length)).sum::<u64>() <= u64::from(length));
    assert!(!req_one || d.len() == 1);
}
