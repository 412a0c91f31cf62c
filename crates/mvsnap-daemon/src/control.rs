//! The control protocol: one JSON request per line, one JSON reply per line. `read` replies and
//! `write` requests carry their bytes raw right after the JSON line.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Largest payload of one read or write over the control socket.
pub const MAX_IO: u64 = 16 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    OriginAdd {
        path: String,
        id: Option<String>,
    },
    OriginRemove {
        id: String,
    },
    OriginList,
    SnapshotCreate {
        sources: Vec<String>,
        tag: Option<String>,
        memo: String,
        writable: bool,
    },
    SnapshotDelete {
        name: String,
        force: bool,
    },
    SnapshotList,
    Info,
    Check,
    VolumeInfo {
        name: String,
    },
    Read {
        name: String,
        offset: u64,
        length: u64,
    },
    Write {
        name: String,
        offset: u64,
        length: u64,
    },
    Flush {
        name: String,
    },
    /// Events from number `after` on, waiting up to `wait_ms` for one (`events --follow`).
    Events {
        after: u64,
        wait_ms: u64,
    },
    /// Which ranges hold data: `[[length, zero], ...]` (for sparse copies, `mvsnap cat`).
    BlockStatus {
        name: String,
        offset: u64,
        length: u64,
    },
    Shutdown,
}

/// The reply to [`Request::Events`]: the events, and the number to ask from next.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventBatch {
    pub next: u64,
    pub events: Vec<mvsnap_engine::Event>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub result: serde_json::Value,
    /// Raw bytes that follow this line (reads).
    #[serde(default)]
    pub bytes: u64,
}

impl Reply {
    pub fn ok(result: serde_json::Value) -> Reply {
        Reply {
            ok: true,
            error: None,
            result,
            bytes: 0,
        }
    }

    pub fn err(e: impl std::fmt::Display) -> Reply {
        Reply {
            ok: false,
            error: Some(e.to_string()),
            result: serde_json::Value::Null,
            bytes: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("control socket: malformed reply: {0}")]
    Protocol(String),
    /// The daemon ran the command and it failed; the message is the daemon's.
    #[error("{0}")]
    Remote(String),
}

/// A blocking client of a daemon's control socket.
pub struct ControlClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl ControlClient {
    pub fn connect(path: &Path) -> std::io::Result<ControlClient> {
        let s = UnixStream::connect(path)?;
        Ok(ControlClient {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        })
    }

    /// A new connection to the same daemon, after it closed this one (as it does after a
    /// request it cannot parse: an older daemon's answer to a newer request).
    pub fn reconnect(&mut self) -> std::io::Result<()> {
        let addr = self.writer.peer_addr()?;
        let path = addr.as_pathname().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "control socket has no path")
        })?;
        *self = ControlClient::connect(path)?;
        Ok(())
    }

    fn send(&mut self, req: &Request, payload: &[u8]) -> Result<Reply, ClientError> {
        let mut line = serde_json::to_vec(req).map_err(|e| ClientError::Protocol(e.to_string()))?;
        line.push(b'\n');
        self.writer.write_all(&line)?;
        self.writer.write_all(payload)?;
        let mut resp = String::new();
        if self.reader.read_line(&mut resp)? == 0 {
            return Err(ClientError::Protocol(
                "the daemon closed the connection".into(),
            ));
        }
        let reply: Reply =
            serde_json::from_str(&resp).map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok(reply)
    }

    /// Run a command; its JSON result.
    pub fn call(&mut self, req: &Request) -> Result<serde_json::Value, ClientError> {
        let r = self.send(req, &[])?;
        if !r.ok {
            return Err(ClientError::Remote(r.error.unwrap_or_default()));
        }
        Ok(r.result)
    }

    pub fn read(&mut self, name: &str, offset: u64, length: u64) -> Result<Vec<u8>, ClientError> {
        let r = self.send(
            &Request::Read {
                name: name.into(),
                offset,
                length,
            },
            &[],
        )?;
        if !r.ok {
            return Err(ClientError::Remote(r.error.unwrap_or_default()));
        }
        let mut buf = vec![0u8; r.bytes as usize];
        self.reader.read_exact(&mut buf)?;
        Ok(buf)
    }

    pub fn write(&mut self, name: &str, offset: u64, data: &[u8]) -> Result<(), ClientError> {
        let r = self.send(
            &Request::Write {
                name: name.into(),
                offset,
                length: data.len() as u64,
            },
            data,
        )?;
        if !r.ok {
            return Err(ClientError::Remote(r.error.unwrap_or_default()));
        }
        Ok(())
    }
}
