//! `mvsnap cat`: stream a volume (an origin or a snapshot) to stdout, skipping its holes when
//! stdout is a regular file (as `cp --sparse` does).

use std::fs::File;
use std::io::{self, IsTerminal, Seek, SeekFrom, Write};
use std::os::fd::AsFd;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use mvsnap_daemon::Session;
use mvsnap_engine::Extent;

use super::{Global, PIECE};
use crate::output::{stdout_error, Progress, ProgressArgs};
use crate::size::parse_size;

/// Block status is asked for this much of the volume at a time.
const WINDOW: u64 = 64 << 20;
/// Zeros in data are looked for in blocks of this size (the engine's block).
const ZERO_BLOCK: usize = 4096;

/// Stream a volume (an origin or a snapshot), or a range of it, to stdout.
///
/// To a regular file, holes of the volume (and 4 KiB blocks of zeros) are skipped, so the file
/// is sparse, as `cp --sparse=auto` makes it. A terminal is refused as output. On a terminal,
/// stderr shows a progress bar.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  mvsnap cat disk@monday > monday.img                 # a whole snapshot, sparse
  mvsnap cat disk --offset 1M --length 4K | xxd       # 4 KiB of the origin at 1 MiB
  mvsnap cat disk@monday | sha256sum
  mvsnap cat disk@monday --sparse always > /dev/sdz   # a device known to read as zeros")]
pub struct CatArgs {
    /// The volume: ORIGIN or ORIGIN@TAG.
    #[arg(value_name = "ORIGIN[@TAG]")]
    name: String,

    /// Where to start, in bytes (4096, 64K, 1.5M...; binary units).
    #[arg(long, value_name = "N", value_parser = parse_size, default_value = "0")]
    offset: u64,

    /// How much to write [default: up to the end of the volume].
    #[arg(long, value_name = "N", value_parser = parse_size)]
    length: Option<u64>,

    /// Skip holes: auto (when stdout is a regular file, new or truncated by `>`), always (any
    /// seekable stdout, which must already read as zeros), never (write every byte).
    #[arg(long, value_enum, value_name = "WHEN", default_value_t = Sparse::Auto)]
    sparse: Sparse,

    #[command(flatten)]
    progress: ProgressArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Sparse {
    Auto,
    Always,
    Never,
}

impl CatArgs {
    pub fn run(self, global: &Global) -> Result<()> {
        if io::stdout().is_terminal() {
            bail!(
                "refusing to write a volume to a terminal: redirect stdout to a file \
                 (mvsnap cat {} > FILE) or a pipe",
                self.name
            );
        }
        let mut store = global.open_read_only()?;
        self.copy(&mut store)?;
        store.close()?;
        Ok(())
    }

    fn copy(&self, store: &mut Session) -> Result<()> {
        let (size, _) = store.volume_info(&self.name)?;
        if self.offset > size {
            bail!(
                "offset {} is beyond the end of {} ({size} bytes)",
                self.offset,
                self.name
            );
        }
        let length = self.length.unwrap_or(size - self.offset);
        if length > size - self.offset {
            bail!(
                "offset {} + length {length} is beyond the end of {} ({size} bytes)",
                self.offset,
                self.name
            );
        }
        let mut sink = Sink::new(self.sparse)?;
        let mut bar = Progress::new(self.progress.progress, "cat", &self.name, Some(length));
        let mut pos = self.offset;
        let end = self.offset + length;
        while pos < end {
            let window = WINDOW.min(end - pos);
            let extents = match sink.is_sparse() {
                true => store
                    .block_status(&self.name, pos, window)
                    .with_context(|| format!("block status of {} at offset {pos}", self.name))?,
                false => None,
            }
            .unwrap_or_else(|| {
                if sink.is_sparse() {
                    tracing::debug!("no block status: reading every byte, skipping zero blocks");
                }
                vec![Extent {
                    length: window,
                    zero: false,
                }]
            });
            for e in extents {
                let e_end = pos + e.length.min(end - pos);
                if e.zero && sink.is_sparse() {
                    sink.skip(e_end - pos);
                    bar.inc(e_end - pos);
                    pos = e_end;
                    continue;
                }
                while pos < e_end {
                    let n = (PIECE as u64).min(e_end - pos);
                    let data = store
                        .read(&self.name, pos, n)
                        .with_context(|| format!("reading {} at offset {pos}", self.name))?;
                    sink.write(&data)?;
                    pos += n;
                    bar.inc(n);
                }
            }
        }
        sink.finish()?;
        bar.finish();
        Ok(())
    }
}

/// Where the bytes go: stdout as a stream, or stdout's file with holes left where zeros go.
enum Sink {
    Stream(io::StdoutLock<'static>),
    Sparse {
        file: File,
        /// Zeros not written yet: a seek before the next data, a length at the end.
        pending: u64,
        regular: bool,
    },
}

impl Sink {
    fn new(mode: Sparse) -> Result<Sink> {
        if mode == Sparse::Never {
            return Ok(Sink::Stream(io::stdout().lock()));
        }
        let stdout = io::stdout();
        // A duplicate of fd 1: it shares the file offset with stdout.
        let fd = stdout.as_fd().try_clone_to_owned().context("stdout")?;
        let mut file = File::from(fd);
        let meta = file.metadata().context("stdout")?;
        let regular = meta.is_file();
        let append = fd_is_append(&file);
        let position = file.stream_position();
        let sparse = match mode {
            Sparse::Never => false,
            // Only where what is skipped reads as zeros: at or past the end of a regular file
            // that seeks (not `>>`, whose writes all go to the end).
            Sparse::Auto => regular && !append && position.as_ref().is_ok_and(|&p| p >= meta.len()),
            Sparse::Always => {
                if append {
                    bail!(
                        "--sparse always: stdout is opened for appending (>>), holes would be lost"
                    );
                }
                if position.is_err() {
                    bail!("--sparse always: stdout cannot seek (a pipe?); use --sparse auto");
                }
                true
            }
        };
        tracing::debug!(sparse, regular, append, "cat output");
        Ok(if sparse {
            Sink::Sparse {
                file,
                pending: 0,
                regular,
            }
        } else {
            Sink::Stream(io::stdout().lock())
        })
    }

    fn is_sparse(&self) -> bool {
        matches!(self, Sink::Sparse { .. })
    }

    fn skip(&mut self, n: u64) {
        if let Sink::Sparse { pending, .. } = self {
            *pending += n;
        }
    }

    fn write(&mut self, data: &[u8]) -> Result<()> {
        match self {
            Sink::Stream(out) => out.write_all(data).map_err(stdout_error),
            Sink::Sparse { file, pending, .. } => {
                // Runs of non-zero blocks are written; zero blocks become holes.
                let mut start = 0;
                while start < data.len() {
                    let zero = |b: &[u8]| b.iter().all(|&x| x == 0);
                    let block = |i: usize| &data[i..(i + ZERO_BLOCK).min(data.len())];
                    let mut i = start;
                    let is_zero = zero(block(i));
                    while i < data.len() && zero(block(i)) == is_zero {
                        i += block(i).len();
                    }
                    if is_zero {
                        *pending += (i - start) as u64;
                    } else {
                        if *pending > 0 {
                            file.seek(SeekFrom::Current(*pending as i64))
                                .map_err(stdout_error)?;
                            *pending = 0;
                        }
                        file.write_all(&data[start..i]).map_err(stdout_error)?;
                    }
                    start = i;
                }
                Ok(())
            }
        }
    }

    /// Trailing zeros: a regular file gets its length (ftruncate) and the offset moves past
    /// them; on a device, the offset only.
    fn finish(self) -> Result<()> {
        match self {
            Sink::Stream(mut out) => out.flush().map_err(stdout_error),
            Sink::Sparse {
                mut file,
                pending,
                regular,
            } => {
                if pending > 0 {
                    let end = file.stream_position().map_err(stdout_error)? + pending;
                    if regular && file.metadata().map_err(stdout_error)?.len() < end {
                        file.set_len(end).map_err(stdout_error)?;
                    }
                    file.seek(SeekFrom::Start(end)).map_err(stdout_error)?;
                }
                file.flush().map_err(stdout_error)
            }
        }
    }
}

/// Whether the descriptor was opened with O_APPEND (`>>`): seeks do not move its writes.
fn fd_is_append(file: &File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: F_GETFL on a descriptor we own (a duplicate of stdout) reads its flags only.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    flags >= 0 && flags & libc::O_APPEND != 0
}
