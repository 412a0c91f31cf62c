//! What `snapshot list` costs with many snapshots sharing many preserved entries (issue 8):
//! a 64 MiB origin, 4 KiB chunks, 1,000 snapshots, then the whole origin overwritten (16,384
//! entries, each shared by all 1,000 snapshots); `Store::snapshots()` timed 5 times.
//!
//! `cargo run --release -p mvsnap-engine --example list_cost -- DIR` (DIR is emptied).

use std::time::Instant;

use mvsnap_engine::{FormatOptions, OpenOptions, Store};

fn main() {
    let dir = std::env::args()
        .nth(1)
        .expect("usage: list_cost DIR (a scratch directory, emptied)");
    let dir = std::path::Path::new(&dir);
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap();
    let (store, origin) = (dir.join("store"), dir.join("o0"));
    let size = 16384u64 * 4096;
    std::fs::write(&origin, vec![1u8; size as usize]).unwrap();
    let opts = FormatOptions {
        size: Some(1 << 30),
        ..Default::default()
    };
    Store::format(&store, &opts).unwrap();
    let s = Store::open(&store, &OpenOptions::default()).unwrap();
    s.add_origin(&origin, Some("o0")).unwrap();
    for i in 0..1000 {
        s.create_snapshot(&["o0"], Some(&format!("t{i}")), "", false)
            .unwrap();
    }
    let o = s.volume("o0").unwrap();
    let buf = vec![2u8; 1 << 20];
    for off in (0..size).step_by(1 << 20) {
        o.write_at(off, &buf, false).unwrap();
    }
    o.flush().unwrap();
    let mut ms: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            assert_eq!(s.snapshots().len(), 1000);
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    ms.sort_by(|a, b| a.total_cmp(b));
    println!(
        "snapshot list, 1000 snapshots x 16384 shared entries: median {:.2} ms (min {:.2}, max {:.2})",
        ms[2], ms[0], ms[4]
    );
}
