//! fio through its nbd engine, with `--verify=crc32c`, several jobs (one NBD connection each)
//! and 16 requests in flight per connection, while snapshots are taken live.
//!
//! fio's verification proves the origin returned what was written. The snapshots are checked
//! block by block: each 4 KiB block of a snapshot is either the origin's content before fio
//! (the model) or a complete, valid fio block for exactly that offset (fio's verify header:
//! magic, length, offset, header CRC32C, data CRC32C), never a torn or foreign one. fio's
//! random map writes every block exactly once, so a block a snapshot saw written must be
//! identical in every later snapshot and in the origin: each snapshot is a point in time.
//! Every snapshot reads the same twice, and `mvsnap check` is clean.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const SIZE: u64 = 64 * MIB;
const BS: usize = 4096;

/// CRC32C (Castagnoli) as fio computes it: initial value !0, no final inversion.
fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let t = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82f6_3b78
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    let mut c = !0u32;
    for &b in data {
        c = t[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    c
}

/// Is this 4 KiB block one fio wrote (crc32c verify) at `offset`? `Err(why)` if not.
/// Layout (fio verify.h, little-endian): magic u16 0xacca, verify_type u16, len u32,
/// rand_seed u64, offset u64, time_sec u32, time_nsec u32, thread u16, numberio u16, crc32
/// u32 of the 36 bytes before it; then the data's crc32c (u32); then the data.
fn fio_block(b: &[u8], offset: u64) -> Result<(), String> {
    let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
    if u16_at(0) != 0xacca {
        return Err(format!("magic {:#06x}", u16_at(0)));
    }
    if u32_at(4) as usize != BS {
        return Err(format!("len {}", u32_at(4)));
    }
    if u64_at(16) != offset {
        return Err(format!(
            "a block of offset {} at offset {offset}",
            u64_at(16)
        ));
    }
    if crc32c(&b[..36]) != u32_at(36) {
        return Err("bad header crc".into());
    }
    if crc32c(&b[44..]) != u32_at(40) {
        return Err("bad data crc (torn block?)".into());
    }
    Ok(())
}

/// Per 4 KiB block: false = the model's (pre-fio) content, true = a valid fio block.
/// Panics on anything else.
fn classify(what: &str, img: &[u8], model: &[u8]) -> Vec<bool> {
    assert_eq!(img.len(), model.len(), "{what}: size");
    img.chunks(BS)
        .zip(model.chunks(BS))
        .enumerate()
        .map(|(i, (b, m))| {
            if b == m {
                return false;
            }
            let off = (i * BS) as u64;
            if let Err(why) = fio_block(b, off) {
                panic!("{what}: block at {off} is neither the old content nor a fio block: {why}");
            }
            true
        })
        .collect()
}

/// fio's JSON report (stdout may carry lines before it): every job without error, with the
/// expected bytes written and verified.
fn check_fio_report(out: &std::process::Output, jobs: usize, bytes_per_job: u64) {
    let so = String::from_utf8_lossy(&out.stdout);
    let t = text(out);
    assert!(out.status.success(), "fio failed: {t}");
    assert!(
        !t.contains("verify failed") && !t.contains("bad magic") && !t.contains("crc32c:"),
        "fio reported a verify error: {t}"
    );
    let start = so
        .find('{')
        .unwrap_or_else(|| panic!("no JSON from fio: {t}"));
    let v: serde_json::Value = serde_json::from_str(&so[start..]).expect("fio JSON");
    let js = v["jobs"].as_array().expect("jobs");
    assert_eq!(js.len(), jobs, "fio jobs");
    for j in js {
        assert_eq!(j["error"], 0, "fio job error: {j}");
        assert_eq!(
            j["write"]["io_bytes"], bytes_per_job,
            "bytes written by a job"
        );
        // The verify pass reads back everything written.
        assert_eq!(
            j["read"]["io_bytes"], bytes_per_job,
            "bytes verified by a job"
        );
    }
}

fn fio_cmd(fio: &std::path::Path, fx: &Fixture, export: &str, jobs: u64, per_job: u64) -> Command {
    let mut c = Command::new(fio);
    c.current_dir(&fx.dir.path)
        .arg("--name=w")
        .arg("--ioengine=nbd")
        .arg(format!("--uri={}", fx.uri(export)))
        .args([
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            "--verify_state_save=0",
            // Jobs as threads: killing fio kills every job.
            "--thread",
            "--output-format=json",
        ])
        .arg(format!("--numjobs={jobs}"))
        .arg(format!("--size={per_job}"))
        .arg(format!("--offset_increment={per_job}"));
    c
}

#[test]
fn fio_verify_with_live_snapshots() {
    let [fio, nbdcopy] = need!("fio", "nbdcopy");
    let model = pattern_bytes(0xf10, SIZE as usize);
    let fx = Fixture::new("fio", SIZE, &model);
    let _d = fx.start();
    fx.snapshot("disk0", "pre", false, "before fio");

    // 4 jobs × 16 MiB, writes held to 1500 IOPS per job (about 2.7 s of writing) so that the
    // snapshots land while blocks are being written; the verify pass is not limited.
    let mut c = fio_cmd(&fio, &fx, "disk0", 4, 16 * MIB);
    c.arg("--rate_iops=,1500");
    let job = ChildGuard::spawn(&mut c);
    let mut job = job;
    let mut tags = Vec::new();
    let start = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    while job.running() && tags.len() < 6 && start.elapsed() < Duration::from_secs(60) {
        let tag = format!("live{}", tags.len());
        fx.snapshot("disk0", &tag, false, "");
        eprintln!("{tag} at {:?}", start.elapsed());
        tags.push(tag);
        std::thread::sleep(Duration::from_millis(400));
    }
    let out = job.output(Duration::from_secs(120));
    check_fio_report(&out, 4, 16 * MIB);
    eprintln!("fio took {:?}", start.elapsed());

    let pre = fx.nbdcopy_read(&nbdcopy, "disk0@pre");
    assert_image("disk0@pre", &pre, &model);
    drop(pre);

    // Every live snapshot: stable, made of old or whole fio blocks, monotonic.
    let origin = fx.nbdcopy_read(&nbdcopy, "disk0");
    let fin = classify("disk0", &origin, &model);
    assert!(
        fin.iter().all(|&n| n),
        "fio wrote every block once, yet the origin has old blocks"
    );
    let mut prev: Option<(String, Vec<u8>, Vec<bool>)> = None;
    let mut mid_write = 0;
    for tag in &tags {
        let name = format!("disk0@{tag}");
        let img = fx.nbdcopy_read(&nbdcopy, &name);
        let again = fx.nbdcopy_read(&nbdcopy, &name);
        assert!(
            img == again,
            "{name} reads differently twice: {:?}",
            first_diff(&again, &img)
        );
        drop(again);
        let cls = classify(&name, &img, &model);
        let n = cls.iter().filter(|&&x| x).count();
        eprintln!("{name}: {n} of {} blocks written by fio", cls.len());
        if n > 0 && n < cls.len() {
            mid_write += 1;
        }
        // A block written once and seen here must be the same later and in the origin.
        for (i, &new) in cls.iter().enumerate() {
            if new {
                let r = i * BS..(i + 1) * BS;
                assert!(
                    img[r.clone()] == origin[r.clone()],
                    "{name}: block {i} is a fio block the origin does not hold (not a \
                     point in time)"
                );
            }
        }
        if let Some((pname, pimg, pcls)) = &prev {
            for (i, (&was, &is)) in pcls.iter().zip(&cls).enumerate() {
                assert!(
                    !was || is,
                    "block {i} was written in {pname} but is old again in {name}"
                );
                let r = i * BS..(i + 1) * BS;
                assert!(
                    !was || pimg[r.clone()] == img[r],
                    "block {i} differs between {pname} and {name}"
                );
            }
        }
        prev = Some((name, img, cls));
    }
    assert!(
        mid_write > 0,
        "no snapshot landed while fio was writing (timing): nothing tested"
    );
    fx.assert_check_clean("after fio with live snapshots");
}

/// fio on a writable snapshot: its verify passes, the blocks land where fio wrote them, and
/// neither its parent nor the origin sees them.
fn fio_on_writable_snapshot(name: &str, per_job: u64) {
    let [fio, nbdcopy] = need!("fio", "nbdcopy");
    let model = pattern_bytes(0xf11, SIZE as usize);
    let fx = Fixture::new(name, SIZE, &model);
    let _d = fx.start();
    fx.snapshot("disk0", "base", false, "");
    fx.snapshot("disk0@base", "w", true, "");

    // 2 jobs (connections), `per_job` bytes each, from offset 0.
    let out = run(&mut fio_cmd(&fio, &fx, "disk0@w", 2, per_job), TOOL_TIMEOUT);
    check_fio_report(&out, 2, per_job);

    let w = fx.nbdcopy_read(&nbdcopy, "disk0@w");
    let cls = classify("disk0@w", &w, &model);
    let written = (2 * per_job) as usize / BS;
    assert!(
        cls[..written].iter().all(|&n| n),
        "fio's part is all fio blocks"
    );
    assert!(cls[written..].iter().all(|&n| !n), "the rest is untouched");
    // Its parent and the origin never see the child's writes.
    assert_image("disk0", &fx.nbdcopy_read(&nbdcopy, "disk0"), &model);
    assert_image(
        "disk0@base",
        &fx.nbdcopy_read(&nbdcopy, "disk0@base"),
        &model,
    );
    fx.assert_check_clean("after fio on a writable snapshot");
}

#[test]
fn fio_verify_on_writable_snapshot() {
    fio_on_writable_snapshot("fiow", 4 * MIB);
}

/// Regression test: 32 MiB of random 4 KiB writes into a writable snapshot on a 512 MiB store
/// (496 MiB of data slots, 8 MiB of them needed) used to fail with ENOSPC. A write into a
/// chunk whose slot an unsettled record vouches for takes a fresh 64 KiB slot and quarantines
/// the old one until a later group settles; at thousands of writes per second the quarantine
/// outgrew the store (2 x 4 MiB showed 128 MiB used for 128 mapped chunks). The allocator now
/// forces a settle when the quarantine grows large.
#[test]
fn fio_writable_snapshot_32m_random_writes_no_enospc() {
    fio_on_writable_snapshot("fiow32", 16 * MIB);
}
