//! `mvsnap write`: copy stdin into a volume through the engine (copy-on-write applies).

use std::io::{self, IsTerminal, Read};
use std::os::fd::AsFd;

use anyhow::{bail, Context, Result};
use clap::Args;

use super::{Global, PIECE};
use crate::output::{outln, Progress, ProgressArgs};
use crate::size::parse_size;

/// Write stdin into an origin or a writable snapshot, through the engine.
///
/// Reads stdin until EOF and writes it at --offset in 1 MiB pieces, then flushes. On a
/// terminal, stderr shows a progress bar.
/// The write goes through the engine, so the snapshots of the volume keep their contents. Never
/// write to an origin that has snapshots behind mvsnap's back (with dd, say): the snapshots
/// would not see the change coming.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  mvsnap write disk --offset 0 < boot.bin
  head -c 1M /dev/urandom | mvsnap write disk --offset 64K
  printf 'hello' | mvsnap write disk@try1 --offset 4096      # a writable snapshot")]
pub struct WriteArgs {
    /// The volume: ORIGIN, or ORIGIN@TAG of a writable snapshot.
    #[arg(value_name = "ORIGIN[@TAG]")]
    name: String,

    /// Where to write, in bytes (K/M/G/T suffixes allowed).
    #[arg(long, value_name = "N", value_parser = parse_size)]
    offset: u64,

    #[command(flatten)]
    progress: ProgressArgs,
}

impl WriteArgs {
    pub fn run(self, global: &Global) -> Result<()> {
        if io::stdin().is_terminal() {
            bail!(
                "refusing to read the data from a terminal: redirect stdin \
                 (mvsnap write {} --offset {} < FILE) or pipe into it",
                self.name,
                self.offset
            );
        }
        let mut store = global.open()?;
        let total = {
            let (size, read_only) = store.volume_info(&self.name)?;
            if read_only {
                bail!(
                    "{} is read-only (only an origin or a snapshot created with --writable takes writes)",
                    self.name
                );
            }
            if self.offset > size {
                bail!(
                    "offset {} is beyond the end of {} ({size} bytes)",
                    self.offset,
                    self.name
                );
            }
            // The whole range is checked before anything is written: a write refused halfway
            // would leave the volume half old, half new. A regular file's length is known; a
            // pipe is spooled to an unnamed temporary file first.
            let room = size - self.offset;
            let (mut input, len): (Box<dyn Read>, u64) = match stdin_file_len() {
                Some(len) if len > room => bail!(
                    "offset {} + length {len} (stdin) is beyond the end of {} ({size} bytes); \
                     nothing was written",
                    self.offset,
                    self.name
                ),
                Some(len) => (Box::new(io::stdin().lock()), len),
                None => {
                    let file = spool(io::stdin().lock(), room).with_context(|| {
                        format!(
                            "stdin does not fit at offset {} of {} ({size} bytes)",
                            self.offset, self.name
                        )
                    })?;
                    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
                    (Box::new(file), len)
                }
            };
            let mut bar = Progress::new(self.progress.progress, "write", &self.name, Some(len));
            let mut buf = vec![0u8; PIECE];
            let mut pos = self.offset;
            loop {
                let n = read_full(&mut input, &mut buf).context("reading stdin")?;
                if n == 0 {
                    break;
                }
                store
                    .write(&self.name, pos, &buf[..n])
                    .with_context(|| format!("writing {} at offset {pos}", self.name))?;
                pos += n as u64;
                bar.inc(n as u64);
                if n < buf.len() {
                    break;
                }
            }
            store
                .flush(&self.name)
                .with_context(|| format!("flushing {}", self.name))?;
            bar.finish();
            pos - self.offset
        };
        store.close()?;
        tracing::info!(bytes = total, volume = %self.name, offset = self.offset, "written");
        outln!(
            "wrote {total} bytes to {} at offset {}",
            self.name,
            self.offset
        );
        Ok(())
    }
}

/// Fill `buf` from `r` unless EOF comes first; returns how much was read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Copy a stream into an unnamed temporary file (in $TMPDIR) and rewind it, refusing one longer
/// than `room` bytes.
fn spool(mut stream: impl Read, room: u64) -> Result<std::fs::File> {
    use std::io::{Seek, SeekFrom};
    let mut file = tempfile::tempfile().context("creating a temporary file to hold stdin")?;
    let n = io::copy(&mut (&mut stream).take(room.saturating_add(1)), &mut file)
        .context("reading stdin into a temporary file")?;
    if n > room {
        bail!("it holds more than the {room} bytes there is room for; nothing was written");
    }
    file.seek(SeekFrom::Start(0))?;
    Ok(file)
}

/// The number of bytes left in stdin if it is a regular file.
fn stdin_file_len() -> Option<u64> {
    use std::io::Seek;
    let fd = io::stdin().as_fd().try_clone_to_owned().ok()?;
    let mut file = std::fs::File::from(fd);
    let meta = file.metadata().ok()?;
    if !meta.is_file() {
        return None;
    }
    let pos = file.stream_position().ok()?;
    Some(meta.len().saturating_sub(pos))
}

#[cfg(test)]
mod tests {
    use super::read_full;

    /// A reader that hands out at most 3 bytes per call.
    struct Dribble<'a>(&'a [u8]);

    impl std::io::Read for Dribble<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.0.len().min(buf.len()).min(3);
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn read_full_fills_across_short_reads() {
        let data: Vec<u8> = (0..20).collect();
        let mut r = Dribble(&data);
        let mut buf = [0u8; 8];
        assert_eq!(read_full(&mut r, &mut buf).unwrap(), 8);
        assert_eq!(&buf, &data[..8]);
        assert_eq!(read_full(&mut r, &mut buf).unwrap(), 8);
        assert_eq!(read_full(&mut r, &mut buf).unwrap(), 4);
        assert_eq!(&buf[..4], &data[16..]);
        assert_eq!(read_full(&mut r, &mut buf).unwrap(), 0);
    }
}
