//! The CLI's view of a store: the same calls whether a daemon serves it (through the control
//! socket) or not (the store opened directly, under its exclusive lock).

use std::path::Path;

use anyhow::{Context, Result};
use mvsnap_engine::{
    CheckReport, Extent, OpenOptions, OriginInfo, RepairReport, SnapshotInfo, Store, StoreInfo,
};
use serde::de::DeserializeOwned;

use crate::control::{ControlClient, Request};

pub enum Session {
    Offline(Store),
    Daemon(ControlClient),
}

fn decode<T: DeserializeOwned>(v: serde_json::Value) -> Result<T> {
    serde_json::from_value(v).context("control socket: unexpected reply")
}

impl Session {
    /// Connect to the store's daemon if one serves it, else open the store. `writes` says
    /// whether the command changes anything (read-only commands open read-only).
    pub fn open(store: &Path, writes: bool, ephemeral: bool) -> Result<Session> {
        // Our runtime directory's socket, else wherever the registry says the daemon is (it
        // may have been started with another runtime directory).
        let sockets = crate::paths::control_socket_for_store(store)
            .into_iter()
            .chain(crate::service::registered(store).map(|r| r.control));
        for sock in sockets {
            if let Ok(c) = ControlClient::connect(&sock) {
                tracing::debug!("using the daemon at {}", sock.display());
                return Ok(Session::Daemon(c));
            }
        }
        let opts = OpenOptions {
            ephemeral,
            read_only: !writes,
            cache_bytes: None,
            discard: false,
            overlay_entries: None,
        };
        match Store::open(store, &opts) {
            Ok(s) => Ok(Session::Offline(s)),
            Err(e @ mvsnap_engine::Error::Locked { .. }) => {
                match crate::service::lock_holder(store) {
                    Some(who) => Err(anyhow::Error::new(e)
                        .context(format!("{}: in use by {who}", store.display()))),
                    None => Err(e.into()),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn is_daemon(&self) -> bool {
        matches!(self, Session::Daemon(_))
    }

    pub fn add_origin(&mut self, path: &Path, id: Option<&str>) -> Result<OriginInfo> {
        match self {
            Session::Offline(s) => Ok(s.add_origin(path, id)?),
            Session::Daemon(c) => {
                let abs = std::fs::canonicalize(path)
                    .with_context(|| format!("origin {}", path.display()))?;
                decode(c.call(&Request::OriginAdd {
                    path: abs.to_string_lossy().into(),
                    id: id.map(String::from),
                })?)
            }
        }
    }

    pub fn remove_origin(&mut self, id: &str) -> Result<()> {
        match self {
            Session::Offline(s) => Ok(s.remove_origin(id)?),
            Session::Daemon(c) => c
                .call(&Request::OriginRemove { id: id.into() })
                .map(|_| ())
                .map_err(Into::into),
        }
    }

    pub fn origins(&mut self) -> Result<Vec<OriginInfo>> {
        match self {
            Session::Offline(s) => Ok(s.origins()),
            Session::Daemon(c) => decode(c.call(&Request::OriginList)?),
        }
    }

    pub fn create_snapshot(
        &mut self,
        sources: &[&str],
        tag: Option<&str>,
        memo: &str,
        writable: bool,
    ) -> Result<Vec<SnapshotInfo>> {
        match self {
            Session::Offline(s) => Ok(s.create_snapshot(sources, tag, memo, writable)?),
            Session::Daemon(c) => decode(c.call(&Request::SnapshotCreate {
                sources: sources.iter().map(|s| s.to_string()).collect(),
                tag: tag.map(String::from),
                memo: memo.into(),
                writable,
            })?),
        }
    }

    /// `force`: a daemon disconnects the clients that have it open; offline nobody has.
    pub fn delete_snapshot(&mut self, name: &str, force: bool) -> Result<()> {
        match self {
            Session::Offline(s) => Ok(s.delete_snapshot(name)?),
            Session::Daemon(c) => c
                .call(&Request::SnapshotDelete {
                    name: name.into(),
                    force,
                })
                .map(|_| ())
                .map_err(Into::into),
        }
    }

    pub fn snapshots(&mut self) -> Result<Vec<SnapshotInfo>> {
        match self {
            Session::Offline(s) => Ok(s.snapshots()),
            Session::Daemon(c) => decode(c.call(&Request::SnapshotList)?),
        }
    }

    pub fn info(&mut self) -> Result<StoreInfo> {
        match self {
            Session::Offline(s) => Ok(s.info()),
            Session::Daemon(c) => decode(c.call(&Request::Info)?),
        }
    }

    pub fn check(&mut self) -> Result<CheckReport> {
        match self {
            Session::Offline(s) => Ok(s.check()),
            Session::Daemon(c) => decode(c.call(&Request::Check)?),
        }
    }

    /// Repair the store in place: only with the store to ourselves, as thin_repair wants its
    /// metadata inactive (a daemon's clients would see the repair happen under them).
    pub fn repair(&mut self) -> Result<RepairReport> {
        match self {
            Session::Offline(s) => Ok(s.repair()?),
            Session::Daemon(_) => anyhow::bail!(
                "a daemon serves this store: stop it first (a repair needs the store to itself)"
            ),
        }
    }

    /// Events from number `after` on, waiting up to `wait` for one when a daemon serves the
    /// store (offline, nothing happens meanwhile: the kept ones at once).
    pub fn events_after(
        &mut self,
        after: u64,
        wait: std::time::Duration,
    ) -> Result<crate::control::EventBatch> {
        match self {
            Session::Offline(s) => {
                let (next, events) = s.events_after(after, std::time::Duration::ZERO);
                Ok(crate::control::EventBatch { next, events })
            }
            Session::Daemon(c) => decode(c.call(&Request::Events {
                after,
                wait_ms: wait.as_millis() as u64,
            })?),
        }
    }

    /// A volume's size and whether it is read-only.
    pub fn volume_info(&mut self, name: &str) -> Result<(u64, bool)> {
        match self {
            Session::Offline(s) => {
                let v = s.volume(name)?;
                Ok((v.size(), v.read_only()))
            }
            Session::Daemon(c) => decode(c.call(&Request::VolumeInfo { name: name.into() })?),
        }
    }

    pub fn read(&mut self, name: &str, offset: u64, length: u64) -> Result<Vec<u8>> {
        match self {
            Session::Offline(s) => {
                let mut buf = vec![0u8; length as usize];
                s.volume(name)?.read_at(offset, &mut buf)?;
                Ok(buf)
            }
            Session::Daemon(c) => Ok(c.read(name, offset, length)?),
        }
    }

    /// Which ranges of a volume hold data (holes read as zeros), where known: `None` from a
    /// daemon that does not answer the request (an older one), and the caller reads everything.
    pub fn block_status(
        &mut self,
        name: &str,
        offset: u64,
        length: u64,
    ) -> Result<Option<Vec<Extent>>> {
        match self {
            Session::Offline(s) => Ok(Some(s.volume(name)?.block_status(offset, length)?)),
            Session::Daemon(c) => {
                let req = Request::BlockStatus {
                    name: name.into(),
                    offset,
                    length,
                };
                match c.call(&req) {
                    Ok(v) => {
                        let ext: Vec<(u64, bool)> = decode(v)?;
                        Ok(Some(
                            ext.into_iter()
                                .map(|(length, zero)| Extent { length, zero })
                                .collect(),
                        ))
                    }
                    Err(e) => {
                        // An older daemon closes the connection on a request it does not know.
                        tracing::debug!("block status through the daemon: {e}");
                        if e.to_string().contains("malformed request") {
                            c.reconnect().context("reconnecting to the daemon")?;
                        }
                        Ok(None)
                    }
                }
            }
        }
    }

    pub fn write(&mut self, name: &str, offset: u64, data: &[u8]) -> Result<()> {
        match self {
            Session::Offline(s) => Ok(s.volume(name)?.write_at(offset, data, false)?),
            Session::Daemon(c) => Ok(c.write(name, offset, data)?),
        }
    }

    pub fn flush(&mut self, name: &str) -> Result<()> {
        match self {
            Session::Offline(s) => Ok(s.volume(name)?.flush()?),
            Session::Daemon(c) => c
                .call(&Request::Flush { name: name.into() })
                .map(|_| ())
                .map_err(Into::into),
        }
    }

    /// Offline: checkpoint and release the lock. Daemon: nothing to do.
    pub fn close(self) -> Result<()> {
        match self {
            Session::Offline(s) => Ok(s.close()?),
            Session::Daemon(_) => Ok(()),
        }
    }
}
