//! Events as a follower sees them (`mvsnap events --follow`): the ones kept, then each new one
//! as it happens, with a cursor that never repeats or skips one.

mod common;

use std::time::Duration;

use mvsnap_engine::{EventKind, FormatOptions, OpenOptions, Store};

use common::{format_opts, pattern};

const MIB: u64 = 1 << 20;

#[test]
fn a_follower_gets_each_event_once_as_it_happens() {
    let dir = tempfile::tempdir().unwrap();
    let content = pattern(31, (16 * MIB) as usize);
    let opts = FormatOptions {
        max_size: 256 * MIB,
        ..format_opts(4 * MIB, 65536)
    };
    let (store, _) = common::real_setup(dir.path(), &opts, &[("o0", content)]);
    let s = Store::open(&store, &OpenOptions::default()).unwrap();
    let (start, kept) = s.events_after(0, Duration::ZERO);
    assert_eq!(start, kept.len() as u64);
    s.create_snapshot(&["o0"], Some("a"), "", false).unwrap();
    // A follower waits from the cursor; the writes below grow the store.
    let got = std::thread::scope(|sc| {
        let follower = sc.spawn(|| s.events_after(start, Duration::from_secs(20)));
        std::thread::sleep(Duration::from_millis(100));
        let o = s.volume("o0").unwrap();
        o.write_at(0, &pattern(32, (12 * MIB) as usize), false)
            .unwrap();
        o.flush().unwrap();
        follower.join().unwrap()
    });
    let (next, new) = got;
    assert!(!new.is_empty(), "the follower woke with nothing");
    assert!(
        new.iter().any(|e| e.kind == EventKind::Grown),
        "no growth event: {new:?}"
    );
    assert!(next > start);
    // From the new cursor: only what came after, never a repeat.
    let (again, rest) = s.events_after(next, Duration::ZERO);
    assert!(again >= next);
    assert_eq!(rest.len() as u64, again - next);
    let (_, all) = s.events_after(0, Duration::ZERO);
    assert_eq!(all.len() as u64, again);
    // Nothing new: a bounded wait returns empty at the same cursor.
    let (same, none) = s.events_after(again, Duration::from_millis(50));
    assert_eq!((same, none.len()), (again, 0));
    s.close().unwrap();
    // Kept across a reopen, the cursor counting them.
    let s = Store::open(&store, &OpenOptions::default()).unwrap();
    let (n, kept) = s.events_after(0, Duration::ZERO);
    assert_eq!(n, kept.len() as u64);
    assert!(kept.iter().any(|e| e.kind == EventKind::Grown));
}
