//! `mvsnap serve`: open the store (recovery first), serve every volume over NBD, answer the
//! control socket, and on SIGTERM/SIGINT finish in-flight requests, checkpoint and exit 0.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use mvsnap_engine::{OpenOptions, Store};
use mvsnap_nbd::{bind_unix, NbdServer, TlsConfig, TlsFiles};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;

use crate::control::{Reply, Request, MAX_IO};
use crate::exports::EngineRegistry;
use crate::users::{Doomed, Reservation, Users};

#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    pub store: PathBuf,
    /// NBD Unix socket; default: named after the store in the runtime directory.
    pub nbd_socket: Option<PathBuf>,
    /// Also listen on TCP: `PORT` (127.0.0.1) or `ADDR:PORT`.
    pub listen: Option<String>,
    /// Require TLS on the TCP listener (the Unix socket stays plaintext: it is 0600).
    pub tls: Option<TlsFiles>,
    /// Allow `listen` on a non-loopback address without TLS.
    pub insecure: bool,
    pub ephemeral: bool,
    /// RAM for metadata nodes (None: the engine's default, 64 MiB).
    pub cache_bytes: Option<u64>,
    /// Give freed blocks of a block-device store back with BLKDISCARD.
    pub discard: bool,
    /// Write our pid here once ready (removed at exit).
    pub pidfile: Option<PathBuf>,
    /// Run this shell command for every event (see `service::spawn_event_hook`).
    pub on_event: Option<String>,
    /// Also serve every volume as a file in this directory (FUSE).
    pub mount: Option<PathBuf>,
}

/// Parse `--listen`: a bare port binds loopback only.
fn listen_addr(s: &str) -> Result<String> {
    if s.parse::<u16>().is_ok() {
        return Ok(format!("127.0.0.1:{s}"));
    }
    if s.rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        .is_some()
    {
        return Ok(s.to_string());
    }
    bail!("--listen {s:?}: expected PORT or ADDR:PORT")
}

/// Refuse NBD over TCP in clear on anything but loopback unless `insecure` is set: a
/// plaintext listener on the network hands every export to whoever connects. `Err` is the
/// message for the user. Also refuses TLS without a TCP listener (it would do nothing).
pub fn check_listen(opts: &ServeOptions) -> std::result::Result<(), String> {
    let Some(listen) = &opts.listen else {
        return match opts.tls {
            Some(_) => Err("TLS applies to NBD over TCP: give --listen too".into()),
            None => Ok(()),
        };
    };
    if opts.tls.is_some() || opts.insecure {
        return Ok(());
    }
    let addr = listen_addr(listen).map_err(|e| e.to_string())?;
    use std::net::ToSocketAddrs;
    let addrs: Vec<std::net::SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| format!("--listen {listen}: {e}"))?
        .collect();
    match addrs.iter().find(|a| !a.ip().is_loopback()) {
        None if !addrs.is_empty() => Ok(()),
        found => Err(format!(
            "--listen {listen}: {} is not a loopback address, and NBD over TCP without TLS \
             would hand every export to anyone who can reach it; give --tls-cert and \
             --tls-key (see the README), or --insecure to serve it in clear anyway",
            found.map_or(addr.clone(), |a| a.ip().to_string())
        )),
    }
}

/// Run the daemon until a signal or a `shutdown` request; blocks.
pub fn serve(opts: ServeOptions) -> Result<()> {
    crate::memory::limit_arenas();
    if let Err(msg) = check_listen(&opts) {
        bail!(msg);
    }
    // Before the store is opened: a bad certificate is a quick, clear error.
    let tls = opts
        .tls
        .as_ref()
        .map(TlsConfig::load)
        .transpose()
        .context("TLS credentials")?;
    let key = crate::paths::store_key(&opts.store)?;
    let ctl_path = crate::paths::control_socket(&key);
    if std::os::unix::net::UnixStream::connect(&ctl_path).is_ok() {
        bail!(
            "a daemon already serves {} (control socket {})",
            opts.store.display(),
            ctl_path.display()
        );
    }
    let store = Store::open(
        &opts.store,
        &OpenOptions {
            ephemeral: opts.ephemeral,
            read_only: false,
            cache_bytes: opts.cache_bytes,
            discard: opts.discard,
            overlay_entries: None,
        },
    )
    .with_context(|| format!("cannot serve {}", opts.store.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(run(store.clone(), opts, tls, key, ctl_path.clone()));
    let _ = std::fs::remove_file(&ctl_path);
    // Whatever happened, leave the store consistent: checkpoint and release it.
    let closed = store.shutdown();
    result?;
    closed.context("final checkpoint")?;
    tracing::info!("daemon stopped cleanly");
    Ok(())
}

async fn run(
    store: Store,
    opts: ServeOptions,
    tls: Option<TlsConfig>,
    key: String,
    ctl_path: PathBuf,
) -> Result<()> {
    let dir = crate::paths::runtime_dir();
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("runtime directory {}", dir.display()))?;
    let nbd_path = opts
        .nbd_socket
        .clone()
        .unwrap_or_else(|| crate::paths::default_nbd_socket(&key));
    let users = Arc::new(Users::default());
    // First: a mount that fails (not root, no fusermount3, a live mount there) fails the
    // start before any socket exists.
    let fuse = match &opts.mount {
        Some(dir) => {
            let gate = Arc::new(crate::files::UsersGate(users.clone()));
            let (st, dir) = (store.clone(), dir.clone());
            Some(
                tokio::task::spawn_blocking(move || {
                    mvsnap_fuse::Mount::start(st, gate, &dir, &mvsnap_fuse::MountOptions::default())
                })
                .await?
                .context("--mount")?,
            )
        }
        None => None,
    };
    let nbd = NbdServer::new(Arc::new(EngineRegistry {
        store: store.clone(),
        users: users.clone(),
    }));
    let nbd_listener =
        bind_unix(&nbd_path).with_context(|| format!("NBD socket {}", nbd_path.display()))?;
    let _ = std::fs::remove_file(&ctl_path);
    let ctl = UnixListener::bind(&ctl_path)
        .with_context(|| format!("control socket {}", ctl_path.display()))?;
    std::fs::set_permissions(&ctl_path, std::fs::Permissions::from_mode(0o600))?;
    let tcp = match &opts.listen {
        Some(l) => {
            let addr = listen_addr(l)?;
            Some(
                tokio::net::TcpListener::bind(&addr)
                    .await
                    .with_context(|| format!("listen on {addr}"))?,
            )
        }
        None => None,
    };
    let tcp_addr = tcp.as_ref().and_then(|t| t.local_addr().ok());

    let stop = Arc::new(Notify::new());
    let mut tasks = tokio::task::JoinSet::new();
    {
        let nbd = nbd.clone();
        tasks.spawn(async move {
            nbd.serve_unix(nbd_listener)
                .await
                .map_err(anyhow::Error::from)
        });
    }
    if let Some(t) = tcp {
        let nbd = nbd.clone();
        let tls = tls.clone();
        tasks.spawn(async move {
            match tls {
                Some(tls) => nbd.serve_tcp_tls(t, tls).await,
                None => nbd.serve_tcp(t).await,
            }
            .map_err(anyhow::Error::from)
        });
    }
    let ctl_task = {
        let (store, nbd, stop) = (store.clone(), nbd.clone(), stop.clone());
        tokio::spawn(async move { control_loop(ctl, store, nbd, users, stop).await })
    };

    // An origin whose device is missing or resized is served by nobody: its export and its
    // snapshots' are absent, which a client only sees as "no such export". Say so here, where
    // the administrator looks (the journal, the log file), with what puts it right.
    for o in store.origins() {
        if let Some(reason) = &o.reason {
            tracing::warn!(
                "{reason}: the origin and its snapshots are not served; put its device back \
                 as it was bound ({}, {} bytes) and restart, or remove the origin once its \
                 snapshots are deleted",
                o.path,
                o.size
            );
        }
    }

    // The readiness line scripts wait for.
    let mut ready = format!(
        "ready nbd=unix:{} control={}",
        nbd_path.display(),
        ctl_path.display()
    );
    if let Some(a) = tcp_addr {
        ready.push_str(&format!(" tcp={a}"));
        if tls.is_some() {
            ready.push_str(" tls=on");
        }
    }
    // Before anyone can learn our pid (registry, pidfile, readiness line, sd_notify): a
    // SIGTERM from then on shuts down cleanly instead of killing the process.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    // Where we are, for commands started with another runtime directory, and for systemd.
    let _registration = crate::service::register(
        &key,
        &crate::service::DaemonRecord {
            pid: std::process::id(),
            store: std::fs::canonicalize(&opts.store).unwrap_or_else(|_| opts.store.clone()),
            control: ctl_path.clone(),
            nbd: nbd_path.clone(),
            tcp: tcp_addr.map(|a| a.to_string()),
        },
    )
    .map_err(|e| {
        tracing::warn!(
            "cannot register in {}: {e}",
            crate::service::registry_dir().display()
        )
    })
    .ok();
    let _pidfile = match &opts.pidfile {
        Some(p) => Some(
            crate::service::write_pidfile(p).with_context(|| format!("pidfile {}", p.display()))?,
        ),
        None => None,
    };
    if let Some(cmd) = &opts.on_event {
        crate::service::spawn_event_hook(store.clone(), opts.store.clone(), cmd.clone());
    }
    if let Some(m) = &fuse {
        ready.push_str(&format!(" mount={}", m.dir().display()));
    }
    println!("{ready}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    tracing::info!("{ready}");
    crate::service::notify_ready(&ready);

    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        _ = stop.notified() => tracing::info!("shutdown requested"),
        r = tasks.join_next() => {
            if let Some(Ok(Err(e))) = r {
                tracing::error!("NBD listener failed: {e:#}");
            }
        }
    }
    crate::service::notify_stopping();
    ctl_task.abort();
    if let Some(m) = fuse {
        // Unmounted first: a busy mount is detached lazily, never waited for.
        match tokio::task::spawn_blocking(move || m.unmount()).await {
            Ok(Ok(true)) => tracing::info!("unmounted the volume files"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => tracing::warn!("unmount: {e}"),
            Err(e) => tracing::warn!("unmount: {e}"),
        }
    }
    // Stop accepting, let in-flight requests finish, close connections.
    nbd.shutdown().await;
    tasks.abort_all();
    let _ = std::fs::remove_file(&nbd_path);
    Ok(())
}

async fn control_loop(
    listener: UnixListener,
    store: Store,
    nbd: NbdServer,
    users: Arc<Users>,
    stop: Arc<Notify>,
) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            continue;
        };
        let (store, nbd, users, stop) = (store.clone(), nbd.clone(), users.clone(), stop.clone());
        tokio::spawn(async move {
            if let Err(e) = control_conn(conn, store, nbd, users, stop).await {
                tracing::debug!("control connection ended: {e}");
            }
        });
    }
}

async fn control_conn(
    conn: UnixStream,
    store: Store,
    nbd: NbdServer,
    users: Arc<Users>,
    stop: Arc<Notify>,
) -> std::io::Result<()> {
    let (rd, mut wr) = conn.into_split();
    let mut rd = BufReader::new(rd);
    let mut line = String::new();
    loop {
        line.clear();
        if rd.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let req: Request = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                send(&mut wr, &Reply::err(format!("malformed request: {e}")), &[]).await?;
                return Ok(());
            }
        };
        let mut payload = Vec::new();
        if let Request::Write { length, .. } = &req {
            if *length > MAX_IO {
                send(
                    &mut wr,
                    &Reply::err(format!("write of {length} bytes exceeds {MAX_IO}")),
                    &[],
                )
                .await?;
                return Ok(());
            }
            payload.resize(*length as usize, 0);
            rd.read_exact(&mut payload).await?;
        }
        // A delete reserves what it takes away, so no client opens it meanwhile.
        let doomed = match &req {
            Request::SnapshotDelete { name, force } => {
                Some((Doomed::Snapshot(name.clone()), *force))
            }
            Request::OriginRemove { id } => Some((Doomed::Origin(id.clone()), false)),
            _ => None,
        };
        let mut reservation: Option<Reservation> = None;
        if let Some((what, force)) = doomed {
            match reserve(&users, &nbd, what, force).await {
                Ok(r) => reservation = Some(r),
                Err(msg) => {
                    send(&mut wr, &Reply::err(msg), &[]).await?;
                    continue;
                }
            }
        }
        if let Request::Shutdown = req {
            send(&mut wr, &Reply::ok(serde_json::Value::Null), &[]).await?;
            stop.notify_one();
            return Ok(());
        }
        let st = store.clone();
        let (reply, bytes) = tokio::task::spawn_blocking(move || {
            let r = handle(&st, req, payload);
            drop(reservation);
            r
        })
        .await
        .unwrap_or_else(|e| (Reply::err(format!("internal error: {e}")), Vec::new()));
        send(&mut wr, &reply, &bytes).await?;
    }
}

/// Reserve what a delete takes away. In use: refused, or with `force` its NBD clients are
/// disconnected first (they finish what is in flight) and it waits for them to be gone.
async fn reserve(
    users: &Arc<Users>,
    nbd: &NbdServer,
    what: Doomed,
    force: bool,
) -> Result<Reservation, String> {
    let r = match users.reserve(what.clone(), force) {
        Ok(r) => r,
        Err(busy) => {
            return Err(match what {
                Doomed::Snapshot(name) => format!(
                    "{name} is open by an NBD client or through its file under --mount (a loop \
                     device, a process); close it, or use --force to disconnect NBD clients, \
                     fail every later I/O of open files, and delete"
                ),
                Doomed::Origin(id) => format!(
                    "origin {id} is open by an NBD client or through a file under --mount ({}); \
                     close it first",
                    busy.join(", ")
                ),
            })
        }
    };
    if force {
        for name in nbd.open_exports() {
            if what.covers(&name) {
                nbd.disconnect(&name).await;
            }
        }
        // An open file cannot be closed from here: it is cut off instead.
        let cut = users.revoke(&what);
        if cut > 0 {
            tracing::warn!(
                "{cut} open file(s) of {what} revoked by a forced delete: their I/O fails \
                 from now on"
            );
        }
        let r = tokio::task::spawn_blocking(move || {
            r.wait_unused(Duration::from_secs(30)).then_some(r)
        })
        .await
        .ok()
        .flatten();
        return r.ok_or_else(|| "its clients did not let go within 30 s".to_string());
    }
    Ok(r)
}

async fn send(
    wr: &mut tokio::net::unix::OwnedWriteHalf,
    r: &Reply,
    bytes: &[u8],
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
    line.push(b'\n');
    wr.write_all(&line).await?;
    wr.write_all(bytes).await
}

/// Run one control request against the store (blocking).
fn handle(store: &Store, req: Request, payload: Vec<u8>) -> (Reply, Vec<u8>) {
    fn json<T: serde::Serialize>(r: mvsnap_engine::Result<T>) -> Reply {
        match r {
            Ok(v) => Reply::ok(serde_json::to_value(v).unwrap_or_default()),
            Err(e) => Reply::err(e),
        }
    }
    let reply = match req {
        Request::OriginAdd { path, id } => {
            json(store.add_origin(std::path::Path::new(&path), id.as_deref()))
        }
        Request::OriginRemove { id } => json(store.remove_origin(&id)),
        Request::OriginList => json(Ok(store.origins())),
        Request::SnapshotCreate {
            sources,
            tag,
            memo,
            writable,
        } => {
            let srcs: Vec<&str> = sources.iter().map(String::as_str).collect();
            json(store.create_snapshot(&srcs, tag.as_deref(), &memo, writable))
        }
        Request::SnapshotDelete { name, .. } => json(store.delete_snapshot(&name)),
        Request::SnapshotList => json(Ok(store.snapshots())),
        Request::Info => json(Ok(store.info())),
        Request::Check => json(Ok(store.check())),
        Request::VolumeInfo { name } => {
            json(store.volume(&name).map(|v| (v.size(), v.read_only())))
        }
        Request::Flush { name } => json(store.volume(&name).and_then(|v| v.flush())),
        Request::BlockStatus {
            name,
            offset,
            length,
        } => json(
            store
                .volume(&name)
                .and_then(|v| v.block_status(offset, length))
                .map(|ext| ext.iter().map(|e| (e.length, e.zero)).collect::<Vec<_>>()),
        ),
        Request::Write { name, offset, .. } => json(
            store
                .volume(&name)
                .and_then(|v| v.write_at(offset, &payload, false)),
        ),
        Request::Read {
            name,
            offset,
            length,
        } => {
            if length > MAX_IO {
                return (
                    Reply::err(format!("read of {length} bytes exceeds {MAX_IO}")),
                    Vec::new(),
                );
            }
            let mut buf = vec![0u8; length as usize];
            return match store
                .volume(&name)
                .and_then(|v| v.read_at(offset, &mut buf))
            {
                Ok(()) => {
                    let mut r = Reply::ok(serde_json::Value::Null);
                    r.bytes = length;
                    (r, buf)
                }
                Err(e) => (Reply::err(e), Vec::new()),
            };
        }
        Request::Events { after, wait_ms } => {
            // Bounded: a follower asks again; a stuck one never pins a thread for long.
            let wait = Duration::from_millis(wait_ms.min(10_000));
            let (next, events) = store.events_after(after, wait);
            json(Ok(crate::control::EventBatch { next, events }))
        }
        Request::Shutdown => Reply::ok(serde_json::Value::Null),
    };
    (reply, Vec::new())
}
