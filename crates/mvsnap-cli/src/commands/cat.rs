//! `mvsnap cat`: stream a volume (an origin or a snapshot) to stdout.

use std::io::{self, Write};

use anyhow::{bail, Context, Result};
use clap::Args;

use super::{Global, PIECE};
use crate::output::stdout_error;
use crate::size::parse_size;

/// Stream a volume (an origin or a snapshot), or a range of it, to stdout.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  mvsnap cat disk@monday > monday.img                 # a whole snapshot
  mvsnap cat disk --offset 1M --length 4K | xxd       # 4 KiB of the origin at 1 MiB
  mvsnap cat disk@monday | sha256sum")]
pub struct CatArgs {
    /// The volume: ORIGIN or ORIGIN@TAG.
    #[arg(value_name = "ORIGIN[@TAG]")]
    name: String,

    /// Where to start, in bytes (K/M/G/T suffixes allowed).
    #[arg(long, value_name = "N", value_parser = parse_size, default_value = "0")]
    offset: u64,

    /// How much to write [default: up to the end of the volume].
    #[arg(long, value_name = "N", value_parser = parse_size)]
    length: Option<u64>,
}

impl CatArgs {
    pub fn run(self, global: &Global) -> Result<()> {
        let mut store = global.open_read_only()?;
        {
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
            let mut out = io::stdout().lock();
            let mut pos = self.offset;
            let end = self.offset + length;
            while pos < end {
                let n = PIECE.min((end - pos) as usize);
                let data = store
                    .read(&self.name, pos, n as u64)
                    .with_context(|| format!("reading {} at offset {pos}", self.name))?;
                write_out(&mut out, &data)?;
                pos += n as u64;
            }
            out.flush().map_err(stdout_error)?;
        }
        store.close()?;
        Ok(())
    }
}

fn write_out(out: &mut impl Write, data: &[u8]) -> Result<()> {
    match out.write_all(data) {
        Ok(()) => Ok(()),
        Err(e) => Err(stdout_error(e)),
    }
}
