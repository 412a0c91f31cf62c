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
  mvsnap --store store.img serve --listen 0.0.0.0:10809 \
      --tls-cert server-cert.pem --tls-key server-key.pem [--tls-client-ca ca-cert.pem]
  nbdinfo 'nbds://HOST:10809/disk?tls-certificates=DIR'  # DIR: ca-cert.pem [client-*.pem]
  qemu-io -f raw 'nbd+unix:///disk@monday?socket=/run/disk.sock' -c 'read -v 0 512'
  nbdinfo --list 'nbd+unix://?socket=/run/disk.sock'
  mvsnap --store store.img serve --mount /mnt/vols --detach   # also files: /mnt/vols/disk@monday
  losetup --find --show --read-only /mnt/vols/disk@monday     # a block device of the snapshot

Exports: ORIGIN (read-write) and ORIGIN@TAG for each snapshot (read-only unless writable).
While it runs, the other commands (snapshot create/delete/list, info, cat, write, check) talk
to it through its control socket. It prints one line when ready:
  ready nbd=unix:PATH control=PATH [tcp=ADDR [tls=on]] [mount=DIR]
TLS (NBD_OPT_STARTTLS, required on the TCP listener once configured) never applies to the
Unix socket, which stays mode 0600. --listen on an address other than loopback without TLS
is refused unless --insecure.
SIGTERM or SIGINT: unmount DIR, stop accepting, finish in-flight requests, checkpoint, exit 0.
A mount still in use (a loop device, an open file) is said so and detached lazily: its users
get I/O errors; detach loop devices (`losetup -d`) before stopping the daemon.
Under systemd (Type=notify) it reports readiness; contrib/systemd/mvsnap@.service is a unit
template per store. With --detach: a log and a pidfile named after the daemon's pid.";

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

    /// Require TLS on the TCP listener with this x509 certificate (PEM; the server's first,
    /// then any intermediates). Clients must trust the CA that signed it.
    #[arg(long, value_name = "FILE", requires_all = ["listen", "tls_key"])]
    tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// Access control: only clients presenting a certificate signed by a CA in this PEM file
    /// may connect.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,

    /// Allow --listen on a non-loopback address without TLS: every export in clear, to
    /// anyone who can reach the port.
    #[arg(long, requires = "listen", conflicts_with = "tls_cert")]
    insecure: bool,

    /// Also serve every volume as a file in DIR (FUSE): DIR/ORIGIN and DIR/ORIGIN@TAG, for
    /// `losetup`. A stale mount left there by a killed daemon is cleared first.
    #[arg(long, value_name = "DIR")]
    mount: Option<PathBuf>,

    /// Start in the background; return once it serves (the readiness line is printed).
    #[arg(long)]
    detach: bool,

    /// RAM for the index: cached metadata nodes, and (an eighth of it) new entries not yet
    /// folded into the index. The index stays on disk and RAM does not grow with it beyond
    /// this [default: 64MiB].
    #[arg(long, value_name = "SIZE", value_parser = crate::size::parse_size)]
    cache_size: Option<u64>,

    /// On a block-device store, give the blocks of deleted snapshots back to the device
    /// (BLKDISCARD: a thin LUN or an SSD takes them back). A file store always punches them.
    #[arg(long)]
    discard: bool,

    /// Write the daemon's pid here once it serves (removed when it stops); `%p` in the path
    /// is the pid [default with --detach: mvsnap-serve-%p.pid in the runtime directory].
    #[arg(long, value_name = "PATH")]
    pidfile: Option<PathBuf>,

    /// Run this shell command for every event (low space, growth, invalidation, corruption,
    /// poisoning), with MVSNAP_EVENT_KIND, MVSNAP_EVENT_MESSAGE, MVSNAP_EVENT_TIME,
    /// MVSNAP_EVENT_JSON and MVSNAP_STORE in its environment.
    #[arg(long, value_name = "CMD")]
    on_event: Option<String>,

    /// Ephemeral mode: nothing is synced and the snapshots made while it runs are discarded when
    /// it stops (blksnap's model for backups); refused on a store with persistent snapshots.
    #[arg(long)]
    ephemeral: bool,
}

impl ServeArgs {
    pub fn run(self, global: &Global) -> Result<()> {
        let store = global.store_path()?.to_path_buf();
        let tls = match (self.tls_cert, self.tls_key) {
            (Some(cert), Some(key)) => Some(mvsnap_daemon::TlsFiles {
                cert,
                key,
                client_ca: self.tls_client_ca,
            }),
            _ => None,
        };
        let default_pidfile = self.pidfile.is_none();
        let opts = mvsnap_daemon::ServeOptions {
            store,
            nbd_socket: self.nbd_socket,
            listen: self.listen,
            tls,
            insecure: self.insecure,
            ephemeral: self.ephemeral,
            cache_bytes: self.cache_size,
            discard: self.discard,
            mount: self.mount,
            pidfile: self.pidfile,
            on_event: self.on_event,
        };
        // A usage error (exit 2), refused before anything starts, --detach included.
        if let Err(msg) = mvsnap_daemon::check_listen(&opts) {
            clap::Error::raw(clap::error::ErrorKind::ArgumentConflict, format!("{msg}\n")).exit();
        }
        if self.detach {
            return detach(default_pidfile);
        }
        mvsnap_daemon::serve(opts)
    }
}

/// Run ourselves again without --detach in a new process group, wait for its readiness line.
/// Its log (info level unless -v or RUST_LOG say more) and its pidfile are named after its
/// own pid.
fn detach(default_pidfile: bool) -> Result<()> {
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
    let starting = dir.join(format!("mvsnap-serve-starting-{}.log", std::process::id()));
    let log = std::fs::File::create(&starting)
        .with_context(|| format!("log file {}", starting.display()))?;
    let mut cmd = Command::new(exe);
    cmd.args(&args);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("MVSNAP_LOG_DEFAULT", "info");
    }
    // The child learns its pid only once started: its pidfile is named by the path we give,
    // so take the pid-named path from a placeholder the child fills in (see serve's ready).
    let pidfile_tmpl = dir.join("mvsnap-serve-%p.pid");
    if default_pidfile {
        cmd.arg("--pidfile").arg(&pidfile_tmpl);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("starting the daemon")?;
    let log_path = dir.join(format!("mvsnap-serve-{}.log", child.id()));
    std::fs::rename(&starting, &log_path)
        .with_context(|| format!("log file {}", log_path.display()))?;
    let out = child.stdout.take().context("daemon stdout")?;
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    if line.starts_with("ready ") {
        out!("{line}");
        outln!("pid {}", child.id());
        outln!("log {}", log_path.display());
        if default_pidfile {
            let p = pidfile_tmpl
                .to_string_lossy()
                .replace("%p", &child.id().to_string());
            outln!("pidfile {p}");
        }
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
