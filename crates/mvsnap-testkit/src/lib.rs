//! Test support shared by mvsnap's test suites: a dev-dependency only, never shipped
//! (`publish = false`; no library or binary of the workspace depends on it).
//!
//! - [`tools`]: external tools (qemu-io, nbdinfo, fio...) found or skipped (`need!`), and run
//!   with a deadline so a hung client fails its test instead of hanging it;
//! - [`data`]: seeded pseudo-random bytes, SHA-256, and where two images first differ;
//! - [`nbd`]: a small blocking raw NBD client for hand-made protocol tests.
//!
//! What belongs to one crate's tests alone (a daemon fixture, an in-memory NBD server, the
//! engine's simulated machines) stays in that crate's `tests/common`.

pub mod data;
pub mod nbd;
pub mod tools;

pub use data::{assert_image, first_diff, pattern_bytes, sha256, sha256_file, Rng, Sha256};
pub use nbd::{Chunk, OptReply, RawClient, Reply};
pub use tools::{
    find_tool, run, run_ok, since_start, text, tool, wait_output, wait_timeout, TOOL_TIMEOUT,
};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

/// `let [qemu_io] = need!("qemu-io");`: the tools' paths, or return from the test (skipped)
/// when one is missing, unless `MVSNAP_REQUIRE_TOOLS=1` (then it fails). Several at once:
/// `let [a, b] = need!("a", "b");`.
#[macro_export]
macro_rules! need {
    ($($name:expr),+ $(,)?) => {
        [$(match $crate::tool($name) {
            Some(p) => p,
            None => return,
        }),+]
    };
}
