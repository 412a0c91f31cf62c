//! The daemon's heap has one arena per core (`memory::limit_arenas`), however many threads
//! allocate. Its own test binary: arenas are per process and never go away.

#![cfg(all(target_os = "linux", target_env = "gnu"))]

use std::io::Read;
use std::sync::{Arc, Barrier};

/// The arenas glibc has made in this process, from `malloc_info`'s `<heap nr=...>` elements.
fn arenas() -> usize {
    let path = std::env::temp_dir().join(format!("mvsnap-arenas-{}.xml", std::process::id()));
    let cpath = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    // SAFETY: a FILE opened on a path we own, written by malloc_info and closed before the
    // file is read; no other code uses it.
    unsafe {
        let f = libc::fopen(cpath.as_ptr(), c"w".as_ptr());
        assert!(!f.is_null(), "fopen {}", path.display());
        assert_eq!(libc::malloc_info(0, f), 0);
        libc::fclose(f);
    }
    let mut xml = String::new();
    std::fs::File::open(&path)
        .unwrap()
        .read_to_string(&mut xml)
        .unwrap();
    let _ = std::fs::remove_file(&path);
    xml.matches("<heap nr=").count()
}

#[test]
fn many_threads_allocating_at_once_share_one_arena_per_core() {
    mvsnap_daemon::memory::limit_arenas();
    let cores = std::thread::available_parallelism().unwrap().get();
    let threads = 4 * cores + 4;
    // Every thread allocates while all the others are alive: without the limit, glibc gives
    // each a new arena (up to 8 per core).
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let blocks: Vec<Vec<u8>> = (0..64).map(|j| vec![(i + j) as u8; 4096]).collect();
                barrier.wait();
                blocks.iter().map(|b| b[100] as usize).sum::<usize>()
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let n = arenas();
    assert!(
        n <= cores,
        "{n} arenas for {threads} threads on {cores} cores"
    );
}
