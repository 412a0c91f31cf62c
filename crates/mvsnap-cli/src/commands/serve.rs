//! `mvsnap serve`: run the daemon that serves every volume of the store over NBD (and as files
//! over FUSE with `--mount`).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use clap::Args;

use super::Global;
use crate::output::{out, outln};

pub const EXAMPLES: &str = "\
Examples:
  mvsnap --store store.img serve                       # NBD on a Unix socket named after the store
  mvsnap --store store.img serve --nbd-socket /run/disk.sock --detach
  mvsnap --store store.img serve --listen 10809         # also TCP on 127.0.0.1:10809
  qemu-io -f raw 'nbd+unix:///disk@monday?socket=/run/disk.sock' -c 'read -v 0 512'
  nbdinfo --list 'nbd+unix://?socket=/run/disk.sock'
  mvsnap --store store.img serve --mount /mnt/vols --detach   # also files: /mnt/vols/disk@monday
  losetup --find --show --read-only /mnt/vols/disk@monday     # a block device of the snapshot

Exports: ORIGIN (read-write) and ORIGIN@TAG for each snapshot (read-only unless writable).
While it runs, the other commands (snapshot create/delete/list, info, cat, write, check) talk
to it through its control socket. It prints one line when ready:
  ready nbd=unix:PATH control=PATH [tcp=ADDR] [mount=DIR]
SIGTERM or SIGINT: unmount DIR, stop accepting, finish in-flight requests, checkpoint, exit 0.
A mount still in use (a loop device, an open file) is said so and detached lazily: its users
get I/O errors; detach loop devices (`losetup -d`) before stopping the daemon.";

/// Serve the origin and every snapshot over NBD, and take commands on a control socket.
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct ServeArgs {
    /// The NBD Unix socket (mode 0600) [default: in the runtime directory, named after the store].
    #[arg(long, value_name = "PATH")]
    nbd_socket: Option<PathBuf>,

    /// Also serve NBD over TCP: PORT (on 127.0.0.1) or ADDR:PORT.
    #[arg(long, value_name = "[ADDR:]PORT")]
    listen: Option<String>,

    /// Also serve every volume as a file in DIR (FUSE): DIR/ORIGIN and DIR/ORIGIN@TAG, for
    /// `losetup`. A stale mount left there by a killed daemon is cleared first.
    #[arg(long, value_name = "DIR")]
    mount: Option<PathBuf>,

    /// Start in the background; return once it serves (the readiness line is printed).
    #[arg(long)]
    detach: bool,

    /// RAM for metadata nodes: the index stays on disk and RAM does not grow with it
    /// beyond this [default: 64MiB].
    #[arg(long, value_name = "SIZE", value_parser = crate::size::parse_size)]
    cache_size: Option<u64>,
}

impl ServeArgs {
    pub fn run(self, global: &Global) -> Result<()> {
        let store = global.store_path()?.to_path_buf();
        if self.detach {
            return detach();
        }
        mvsnap_daemon::serve(mvsnap_daemon::ServeOptions {
            store,
            nbd_socket: self.nbd_socket,
            listen: self.listen,
            ephemeral: global.ephemeral,
            cache_bytes: self.cache_size,
            mount: self.mount,
        })
    }
}

/// Run ourselves again without --detach in a new process group, wait for its readiness line.
fn detach() -> Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("finding the mvsnap binary")?;
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--detach")
        .collect();
    // The daemon's log goes to a file, so it holds none of the caller's descriptors open.
    let dir = mvsnap_daemon::paths::runtime_dir();
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("runtime directory {}", dir.display()))?;
    let log_path = dir.join(format!("mvsnap-serve-{}.log", std::process::id()));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("log file {}", log_path.display()))?;
    let mut child = Command::new(exe)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting the daemon")?;
    let out = child.stdout.take().context("daemon stdout")?;
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    if line.starts_with("ready ") {
        out!("{line}");
        outln!("pid {}", child.id());
        outln!("log {}", log_path.display());
        return Ok(());
    }
    let status = child.wait()?;
    let err = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = std::fs::remove_file(&log_path);
    let last = err
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no message");
    bail!(
        "the daemon did not start ({status}): {}",
        last.trim_start_matches("mvsnap: error: ")
    )
}
