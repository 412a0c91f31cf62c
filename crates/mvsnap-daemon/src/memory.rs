//! The heap of a long-running daemon: one allocator arena per core.
//!
//! The engine's node cache stays within its budget, but nodes are read, decoded and dropped
//! by many threads (16 NBD workers per connection, the blocking pool, the engine's own), and
//! glibc gives each thread that finds the arenas busy a new one, up to 8 per core. Each
//! arena keeps what was freed in it, resident, and peaks on its own. Measured at 1M mappings
//! with a 64 MiB cache, after 20 s of first writes (docs/BENCHMARKS.md, "The daemon's RSS"):
//! 16 arenas, RSS 90-105 MiB, of which `malloc_trim` gave back 20-33 MiB; with two arenas
//! (this machine's cores) 82-87 MiB, IOPS within the machine's spread. A periodic trim was
//! tried instead: each took 3-15 ms with the arenas locked, and RSS grew back within its
//! 5 s interval.

/// Limit the heap to one arena per core. Call it first thing, before the threads it is for
/// exist: arenas already made stay.
pub fn limit_arenas() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    set_arena_max(cores);
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_arena_max(arenas: usize) {
    let n = i32::try_from(arenas).unwrap_or(i32::MAX);
    // SAFETY: mallopt only sets an allocator parameter; M_ARENA_MAX takes any positive count.
    if unsafe { libc::mallopt(libc::M_ARENA_MAX, n) } != 1 {
        tracing::debug!(arenas, "mallopt(M_ARENA_MAX) refused");
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_arena_max(_arenas: usize) {}
