//! Serve in-memory exports over a Unix socket, for trying clients by hand.
//!
//! ```text
//! cargo run -p mvsnap-nbd --example memserver -- /tmp/nbd.sock 64M disk scratch snap:ro
//! qemu-io -f raw 'nbd+unix:///disk?socket=/tmp/nbd.sock' -c 'write -P 0xab 0 64k'
//! nbdinfo --list 'nbd+unix://?socket=/tmp/nbd.sock'
//! ```
//!
//! Arguments: socket path, size (bytes, or with a K/M/G/T suffix), then export names; a
//! name ending in `:ro` is served read-only. Stops cleanly on Ctrl-C or SIGTERM. Set
//! `RUST_LOG=mvsnap_nbd=debug` for protocol logs.

use std::sync::Arc;

use mvsnap_nbd::memory::{MemExport, MemRegistry};
use mvsnap_nbd::{bind_unix, Export as _, NbdServer};

fn parse_size(s: &str) -> Option<u64> {
    let (num, mult) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 1u64 << 10),
        (i, 'm' | 'M') => (&s[..i], 1 << 20),
        (i, 'g' | 'G') => (&s[..i], 1 << 30),
        (i, 't' | 'T') => (&s[..i], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

fn usage() -> ! {
    eprintln!("usage: memserver SOCKET SIZE NAME[:ro]...");
    std::process::exit(2);
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "mvsnap_nbd=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        usage();
    }
    let size = parse_size(&args[1]).unwrap_or_else(|| usage());
    let mut reg = MemRegistry::new();
    for spec in &args[2..] {
        let (name, export) = match spec.strip_suffix(":ro") {
            Some(name) => (name, MemExport::new_read_only(size)),
            None => (spec.as_str(), MemExport::new(size)),
        };
        let desc = format!(
            "in-memory, {size} bytes{}",
            if export.read_only() {
                ", read-only"
            } else {
                ""
            }
        );
        reg.add(name, &desc, export);
    }
    let server = NbdServer::new(Arc::new(reg));
    let listener = bind_unix(&args[0])?;
    eprintln!("listening on {}", args[0]);
    let s = server.clone();
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        s.shutdown().await;
    });
    server.serve_unix(listener).await?;
    let _ = std::fs::remove_file(&args[0]);
    Ok(())
}
