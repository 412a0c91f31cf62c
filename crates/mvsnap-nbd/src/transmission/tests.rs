use super::*;
use crate::memory::MemExport;
use crate::proto::*;

const MIB: u32 = 1024 * 1024;

fn lim() -> Limits {
    Limits {
        size: 1 << 20,
        read_only: false,
        structured: true,
        block_status: true,
        max_payload: 32 * MIB,
        fast_zero: false,
    }
}

fn req(command: u16, flags: u16, offset: u64, length: u32) -> Request {
    Request {
        flags,
        command,
        handle: 1,
        offset,
        length,
    }
}

fn errno(r: Result<Command, Rejection>) -> u32 {
    r.expect_err("should be rejected").errno
}

#[test]
fn valid_requests() {
    let l = lim();
    assert_eq!(
        validate(&req(CMD_READ, 0, 0, 4096), &l),
        Ok(Command::Read {
            offset: 0,
            length: 4096
        })
    );
    assert_eq!(
        validate(&req(CMD_WRITE, CMD_FLAG_FUA, 4096, 512), &l),
        Ok(Command::Write {
            offset: 4096,
            length: 512,
            fua: true
        })
    );
    assert_eq!(
        validate(&req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 1 << 20), &l),
        Ok(Command::WriteZeroes {
            offset: 0,
            length: 1 << 20,
            may_trim: false,
            fua: false
        })
    );
    assert_eq!(
        validate(&req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 1 << 20), &l),
        Ok(Command::BlockStatus {
            offset: 0,
            length: 1 << 20,
            req_one: true
        })
    );
    // Read ending exactly at the end; zero-length at the end.
    assert!(validate(&req(CMD_READ, 0, (1 << 20) - 1, 1), &l).is_ok());
    assert!(validate(&req(CMD_READ, 0, 1 << 20, 0), &l).is_ok());
    // FLUSH and DISC ignore offset/length.
    assert_eq!(validate(&req(CMD_FLUSH, 0, 99, 99), &l), Ok(Command::Flush));
    assert_eq!(validate(&req(CMD_DISC, 0, 0, 0), &l), Ok(Command::Disc));
    assert_eq!(
        validate(&req(CMD_CACHE, 0, 0, 4096), &l),
        Ok(Command::Cache)
    );
    assert!(validate(&req(CMD_READ, CMD_FLAG_DF, 0, 4096), &l).is_ok());
}

#[test]
fn invalid_requests() {
    let l = lim();
    assert_eq!(errno(validate(&req(99, 0, 0, 0), &l)), EINVAL);
    assert_eq!(errno(validate(&req(CMD_READ, 1 << 7, 0, 1), &l)), EINVAL);
    assert_eq!(
        errno(validate(&req(CMD_READ, CMD_FLAG_NO_HOLE, 0, 1), &l)),
        EINVAL
    );
    assert_eq!(
        errno(validate(&req(CMD_WRITE, CMD_FLAG_REQ_ONE, 0, 1), &l)),
        EINVAL
    );
    // Past the end, and offset+length overflowing u64.
    assert_eq!(errno(validate(&req(CMD_READ, 0, 1 << 20, 1), &l)), EINVAL);
    // Writes past the end get ENOSPC (the spec's SHOULD), every other command EINVAL.
    assert_eq!(
        errno(validate(&req(CMD_WRITE, 0, (1 << 20) - 10, 11), &l)),
        ENOSPC
    );
    assert_eq!(
        errno(validate(&req(CMD_WRITE_ZEROES, 0, 1 << 20, 1), &l)),
        ENOSPC
    );
    assert_eq!(errno(validate(&req(CMD_WRITE, 0, u64::MAX, 2), &l)), ENOSPC);
    assert_eq!(errno(validate(&req(CMD_TRIM, 0, u64::MAX, 2), &l)), EINVAL);
    assert_eq!(
        errno(validate(&req(CMD_BLOCK_STATUS, 0, 1 << 20, 1), &l)),
        EINVAL
    );
    assert_eq!(errno(validate(&req(CMD_CACHE, 0, 1 << 21, 1), &l)), EINVAL);
    // Longer than the maximum block size.
    let big = Limits {
        size: 1 << 40,
        ..lim()
    };
    assert_eq!(
        errno(validate(&req(CMD_READ, 0, 0, 32 * MIB + 1), &big)),
        EINVAL
    );
    assert_eq!(
        errno(validate(&req(CMD_WRITE, 0, 0, 32 * MIB + 1), &big)),
        EINVAL
    );
    // ...which does not apply to commands without payload.
    assert!(validate(&req(CMD_TRIM, 0, 0, u32::MAX), &big).is_ok());
    assert!(validate(&req(CMD_BLOCK_STATUS, 0, 0, u32::MAX), &big).is_ok());
    // Fast zero fails fast.
    assert_eq!(
        errno(validate(
            &req(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 4096),
            &l
        )),
        ENOTSUP
    );
    // ...unless the export zeroes fast; NO_HOLE asks for written zeros, which are not fast.
    let fast = Limits {
        fast_zero: true,
        ..lim()
    };
    assert!(matches!(
        validate(&req(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 4096), &fast),
        Ok(Command::WriteZeroes { may_trim: true, .. })
    ));
    assert_eq!(
        errno(validate(
            &req(
                CMD_WRITE_ZEROES,
                CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE,
                0,
                4096
            ),
            &fast
        )),
        ENOTSUP
    );
    assert_eq!(errno(validate(&req(CMD_BLOCK_STATUS, 0, 0, 0), &l)), EINVAL);
}

#[test]
fn read_only_and_negotiation_gates() {
    let ro = Limits {
        read_only: true,
        ..lim()
    };
    for cmd in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
        assert_eq!(
            errno(validate(&req(cmd, 0, 0, 4096), &ro)),
            EPERM,
            "cmd {cmd}"
        );
    }
    assert!(validate(&req(CMD_READ, 0, 0, 4096), &ro).is_ok());
    assert!(validate(&req(CMD_FLUSH, 0, 0, 0), &ro).is_ok());

    let simple = Limits {
        structured: false,
        block_status: false,
        ..lim()
    };
    // DF is only valid once structured replies are negotiated.
    assert_eq!(
        errno(validate(&req(CMD_READ, CMD_FLAG_DF, 0, 1), &simple)),
        EINVAL
    );
    assert_eq!(
        errno(validate(&req(CMD_BLOCK_STATUS, 0, 0, 1), &simple)),
        EINVAL
    );
}

#[test]
fn extents_are_clipped_merged_and_never_empty() {
    let e = |length, flags| Extent { length, flags };
    let d = |length, flags| Descriptor { length, flags };
    assert_eq!(
        normalize_extents(&[e(4096, 0), e(4096, 0), e(8192, 3)], 10000, false),
        vec![d(8192, 0), d(1808, 3)]
    );
    assert_eq!(
        normalize_extents(&[e(0, 0), e(1 << 40, 3 | 0x100)], u32::MAX, false),
        vec![d(u32::MAX, 3)]
    );
    assert_eq!(
        normalize_extents(&[e(100, 0), e(100, 1)], 1000, true),
        vec![d(100, 0)]
    );
    assert_eq!(normalize_extents(&[], 512, false), vec![d(512, 0)]);
    assert_eq!(normalize_extents(&[e(0, 1)], 512, true), vec![d(512, 0)]);
    // Alternating flags are capped at MAX_DESCRIPTORS.
    let many: Vec<Extent> = (0..MAX_DESCRIPTORS as u32 + 10)
        .map(|i| e(1, i % 2))
        .collect();
    let out = normalize_extents(&many, u32::MAX, false);
    assert_eq!(out.len(), MAX_DESCRIPTORS);
    assert!(out.iter().all(|x| x.length == 1));
}

#[test]
fn block_sizes_are_sanitized() {
    let s = sanitize_block_sizes(BlockSizes::default());
    assert_eq!(s, BlockSizes::default());
    let s = sanitize_block_sizes(BlockSizes {
        minimum: 3,
        preferred: 100,
        maximum: u32::MAX,
    });
    assert_eq!(
        s,
        BlockSizes {
            minimum: 1,
            preferred: 4096,
            maximum: MAX_PAYLOAD
        }
    );
    let s = sanitize_block_sizes(BlockSizes {
        minimum: 512,
        preferred: 1 << 30,
        maximum: 1000,
    });
    assert_eq!(
        s,
        BlockSizes {
            minimum: 512,
            preferred: MAX_PAYLOAD,
            maximum: MAX_PAYLOAD
        }
    );
    let s = sanitize_block_sizes(BlockSizes {
        minimum: 4096,
        preferred: 65536,
        maximum: 1_000_000,
    });
    assert_eq!(s.maximum, 999_424);
    assert_eq!(s.maximum % 4096, 0);
}

#[test]
fn flags_tell_the_truth() {
    let rw = MemExport::new(4096);
    let f = transmission_flags(&rw, false);
    assert_eq!(
        f,
        FLAG_HAS_FLAGS
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_CACHE
            | FLAG_SEND_TRIM
            | FLAG_SEND_WRITE_ZEROES
            | FLAG_SEND_FAST_ZERO
            | FLAG_CAN_MULTI_CONN
    );
    assert_ne!(transmission_flags(&rw, true) & FLAG_SEND_DF, 0);
    let ro = MemExport::new_read_only(4096);
    let f = transmission_flags(&ro, false);
    assert_ne!(f & FLAG_READ_ONLY, 0);
    assert_eq!(
        f & (FLAG_SEND_TRIM
            | FLAG_SEND_WRITE_ZEROES
            | FLAG_SEND_FAST_ZERO
            | FLAG_SEND_DF
            | FLAG_SEND_FUA),
        0
    );
}

#[test]
fn reply_encodings() {
    let r = read_reply(9, true, 4096, vec![7; 10]);
    assert_eq!(r.header.len(), 28);
    assert_eq!(
        decode_reply_header(&r.header).unwrap(),
        ReplyHeader::Structured(StructuredHeader {
            flags: REPLY_FLAG_DONE,
            reply_type: REPLY_TYPE_OFFSET_DATA,
            handle: 9,
            length: 18
        })
    );
    assert_eq!(&r.header[20..28], &4096u64.to_be_bytes());
    assert_eq!(r.data, vec![7; 10]);

    let r = read_reply(9, false, 4096, vec![7; 10]);
    assert_eq!(r.header, encode_simple_reply(9, 0).to_vec());
    assert_eq!(r.data.len(), 10);

    let r = error_reply(3, true, EPERM, "nope");
    let (e, msg) = decode_error_payload(&r.header[20..]).unwrap();
    assert_eq!((e, msg.as_str()), (EPERM, "nope"));
    assert!(r.data.is_empty());
    let r = error_reply(3, false, EPERM, "nope");
    assert_eq!(r.header, encode_simple_reply(3, EPERM).to_vec());
}
