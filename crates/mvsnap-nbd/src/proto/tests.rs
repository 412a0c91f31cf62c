use super::*;

#[test]
fn handshake_bytes_match_spec() {
    let b = encode_handshake(SERVER_HANDSHAKE_FLAGS);
    assert_eq!(&b[0..8], b"NBDMAGIC");
    assert_eq!(&b[8..16], b"IHAVEOPT");
    assert_eq!(&b[16..18], &[0, 3]);
}

#[test]
fn client_flags() {
    let f = decode_client_flags(3, SERVER_HANDSHAKE_FLAGS).unwrap();
    assert!(f.fixed_newstyle && f.no_zeroes);
    let f = decode_client_flags(1, SERVER_HANDSHAKE_FLAGS).unwrap();
    assert!(f.fixed_newstyle && !f.no_zeroes);
    assert!(decode_client_flags(4, SERVER_HANDSHAKE_FLAGS).is_err());
    assert!(decode_client_flags(1 << 31, SERVER_HANDSHAKE_FLAGS).is_err());
    // NO_ZEROES may only be set if the server offered it.
    assert!(decode_client_flags(2, FLAG_FIXED_NEWSTYLE).is_err());
}

#[test]
fn option_header_roundtrip_and_magic() {
    let b = encode_option_header(OPT_GO, 1234);
    assert_eq!(&b[0..8], b"IHAVEOPT");
    assert_eq!(
        decode_option_header(&b).unwrap(),
        OptionHeader {
            option: OPT_GO,
            length: 1234
        }
    );
    let mut bad = b;
    bad[0] ^= 1;
    assert!(decode_option_header(&bad).is_err());
}

#[test]
fn info_request_roundtrip() {
    let req = InfoRequest {
        name: "disk@snap1".into(),
        requests: vec![INFO_NAME, INFO_BLOCK_SIZE],
    };
    let b = encode_info_request(&req);
    assert_eq!(&b[0..4], &[0, 0, 0, 10]);
    assert_eq!(&b[4..14], b"disk@snap1");
    assert_eq!(&b[14..16], &[0, 2]);
    assert_eq!(&b[16..], &[0, 1, 0, 3]);
    assert_eq!(parse_info_request(&b).unwrap(), req);
    assert_eq!(parse_option(OPT_GO, &b), ClientOption::Go(req.clone()));
    assert_eq!(parse_option(OPT_INFO, &b), ClientOption::Info(req));
}

#[test]
fn info_request_rejects_malformed() {
    // Name length past the end.
    assert!(parse_info_request(&[0, 0, 0, 9, b'a']).is_err());
    // Missing request count.
    assert!(parse_info_request(&[0, 0, 0, 1, b'a']).is_err());
    // Count says 2, only one present.
    assert!(parse_info_request(&[0, 0, 0, 0, 0, 2, 0, 1]).is_err());
    // Trailing garbage.
    assert!(parse_info_request(&[0, 0, 0, 0, 0, 0, 9]).is_err());
    // Huge name length is refused without allocating.
    assert!(parse_info_request(&[0xff, 0xff, 0xff, 0xff]).is_err());
    // Not UTF-8.
    assert!(parse_info_request(&[0, 0, 0, 1, 0xff, 0, 0]).is_err());
    assert!(matches!(
        parse_option(OPT_GO, &[1, 2, 3]),
        ClientOption::Invalid(OPT_GO, _)
    ));
}

#[test]
fn meta_context_roundtrip_and_bounds() {
    let req = MetaContextRequest {
        export: "vol".into(),
        queries: vec!["base:allocation".into(), "qemu:dirty-bitmap:x".into()],
    };
    let b = encode_meta_context_request(&req);
    assert_eq!(parse_meta_context_request(&b).unwrap(), req);
    assert_eq!(
        parse_option(OPT_SET_META_CONTEXT, &b),
        ClientOption::SetMetaContext(req.clone())
    );
    assert_eq!(
        parse_option(OPT_LIST_META_CONTEXT, &b),
        ClientOption::ListMetaContext(req)
    );
    // A count of 2^32-1 with no data must fail fast, not allocate.
    assert!(parse_meta_context_request(&[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]).is_err());
    // Query longer than the data.
    assert!(parse_meta_context_request(&[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 5, b'a']).is_err());
    // Zero queries is valid.
    let empty = parse_meta_context_request(&[0, 0, 0, 0, 0, 0, 0, 0]).unwrap();
    assert!(empty.export.is_empty() && empty.queries.is_empty());
}

#[test]
fn simple_options() {
    assert_eq!(parse_option(OPT_ABORT, b"ignored"), ClientOption::Abort);
    assert_eq!(parse_option(OPT_LIST, b""), ClientOption::List);
    assert!(matches!(
        parse_option(OPT_LIST, b"x"),
        ClientOption::Invalid(OPT_LIST, _)
    ));
    assert_eq!(
        parse_option(OPT_STRUCTURED_REPLY, b""),
        ClientOption::StructuredReply
    );
    assert!(matches!(
        parse_option(OPT_STRUCTURED_REPLY, b"x"),
        ClientOption::Invalid(..)
    ));
    assert_eq!(parse_option(OPT_STARTTLS, b""), ClientOption::StartTls);
    assert_eq!(
        parse_option(OPT_EXPORT_NAME, b"disk"),
        ClientOption::ExportName("disk".into())
    );
    assert!(matches!(
        parse_option(OPT_EXPORT_NAME, &[0xc3]),
        ClientOption::Invalid(OPT_EXPORT_NAME, _)
    ));
    assert_eq!(
        parse_option(0xdead, b"xyz"),
        ClientOption::Unsupported(0xdead)
    );
    assert_eq!(
        parse_option(OPT_PEEK_EXPORT, b""),
        ClientOption::Unsupported(4)
    );
}

#[test]
fn option_reply_layout() {
    let b = encode_option_reply(OPT_LIST, REP_SERVER, &encode_rep_server("a", "desc"));
    assert_eq!(&b[0..8], &OPTION_REPLY_MAGIC.to_be_bytes());
    let mut hdr = [0u8; OPTION_REPLY_HEADER_LEN];
    hdr.copy_from_slice(&b[..OPTION_REPLY_HEADER_LEN]);
    let h = decode_option_reply_header(&hdr).unwrap();
    assert_eq!(
        h,
        OptionReplyHeader {
            option: OPT_LIST,
            reply_type: REP_SERVER,
            length: 9
        }
    );
    assert_eq!(&b[20..], &[0, 0, 0, 1, b'a', b'd', b'e', b's', b'c']);
    assert_eq!(REP_ERR_UNSUP, 0x8000_0001);
    assert_eq!(REP_ERR_TOO_BIG, 0x8000_0009);
}

#[test]
fn info_payloads() {
    let b = encode_info_export(0x0102_0304_0506_0708, 0x0a0b);
    assert_eq!(b, [0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0x0a, 0x0b]);
    let b = encode_info_block_size(1, 4096, 1 << 25);
    assert_eq!(b, [0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 2, 0, 0, 0]);
    assert_eq!(encode_info_string(INFO_NAME, "x"), vec![0, 1, b'x']);
    assert_eq!(encode_meta_context(7, "base:allocation")[..4], [0, 0, 0, 7]);
}

#[test]
fn export_name_reply_zeroes() {
    let with = encode_export_name_reply(1 << 20, 3, false);
    assert_eq!(with.len(), 8 + 2 + 124);
    assert!(with[10..].iter().all(|&b| b == 0));
    let without = encode_export_name_reply(1 << 20, 3, true);
    assert_eq!(without, vec![0, 0, 0, 0, 0, 0x10, 0, 0, 0, 3]);
}

#[test]
fn request_roundtrip_and_magic() {
    let req = Request {
        flags: CMD_FLAG_FUA,
        command: CMD_WRITE,
        handle: 0x1122_3344_5566_7788,
        offset: 1 << 40,
        length: 4096,
    };
    let b = encode_request(&req);
    assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
    assert_eq!(&b[4..8], &[0, 1, 0, 1]);
    assert_eq!(decode_request(&b).unwrap(), req);
    let mut bad = b;
    bad[3] = 0x14;
    assert!(decode_request(&bad).is_err());
}

#[test]
fn replies() {
    let s = encode_simple_reply(42, EPERM);
    assert_eq!(&s[0..4], &[0x67, 0x44, 0x66, 0x98]);
    assert_eq!(
        decode_reply_header(&s).unwrap(),
        ReplyHeader::Simple(SimpleReply {
            error: 1,
            handle: 42
        })
    );
    let h = encode_structured_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 7, 10);
    assert_eq!(&h[0..4], &[0x66, 0x8e, 0x33, 0xef]);
    assert_eq!(
        decode_reply_header(&h).unwrap(),
        ReplyHeader::Structured(StructuredHeader {
            flags: 1,
            reply_type: 0x8001,
            handle: 7,
            length: 10
        })
    );
    assert_eq!(reply_header_len(s[0..4].try_into().unwrap()), Ok(16));
    assert_eq!(reply_header_len(h[0..4].try_into().unwrap()), Ok(20));
    assert!(reply_header_len([0; 4]).is_err());

    let e = encode_error_payload(EINVAL, "bad");
    assert_eq!(e, vec![0, 0, 0, 22, 0, 3, b'b', b'a', b'd']);
    assert_eq!(decode_error_payload(&e).unwrap(), (22, "bad".to_string()));
    // A message over the string limit is cut, so its 16-bit length stays honest.
    let long = "é".repeat(3000);
    let e = encode_error_payload(EIO, &long);
    let (_, msg) = decode_error_payload(&e).unwrap();
    assert!(msg.len() <= MAX_STRING_LEN && msg.chars().all(|c| c == 'é'));
}

#[test]
fn block_status_payload_roundtrip() {
    let d = [
        Descriptor {
            length: 4096,
            flags: 0,
        },
        Descriptor {
            length: u32::MAX - 4096,
            flags: STATE_HOLE | STATE_ZERO,
        },
    ];
    let b = encode_block_status_payload(1, &d);
    assert_eq!(b.len(), 4 + 16);
    assert_eq!(decode_block_status_payload(&b).unwrap(), (1, d.to_vec()));
    assert!(decode_block_status_payload(&b[..4]).is_err());
    assert!(decode_block_status_payload(&b[..13]).is_err());
}

#[test]
fn truncate_respects_char_boundaries() {
    assert_eq!(truncate_utf8("abc", 5), "abc");
    assert_eq!(truncate_utf8("aé", 2), "a");
    assert_eq!(truncate_utf8("aé", 3), "aé");
}

proptest::proptest! {
    /// Option and request decoders never panic and never accept what they cannot re-encode.
    #[test]
    fn decoders_total(opt in 0u32..16, data in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
        match parse_option(opt, &data) {
            ClientOption::Go(r) | ClientOption::Info(r) => {
                proptest::prop_assert_eq!(&encode_info_request(&r), &data);
            }
            ClientOption::SetMetaContext(r) | ClientOption::ListMetaContext(r) => {
                proptest::prop_assert_eq!(&encode_meta_context_request(&r), &data);
            }
            _ => {}
        }
        if data.len() >= REQUEST_LEN {
            let mut b = [0u8; REQUEST_LEN];
            b.copy_from_slice(&data[..REQUEST_LEN]);
            if let Ok(r) = decode_request(&b) {
                proptest::prop_assert_eq!(encode_request(&r), b);
            }
        }
    }
}
