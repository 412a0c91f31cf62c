//! `mvsnap format`: make a file or a block device an empty COW store.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use mvsnap_engine::{FormatOptions, OpenOptions, Store};

use super::{usage_bail, Global};
use crate::output::human_size;
use crate::output::outln;
use crate::size::parse_size;

const EXAMPLES: &str = "\
Examples:
  mvsnap format store.img --size 10G
  mvsnap format store.img --size 1G --max-size 50G
  mvsnap format /dev/sdc --force
  MVSNAP_STORE=store.img mvsnap format --size 4G

A new file is created with --size (default 1G); an existing file keeps its size or grows to
--size, and is never shrunk. A block device keeps its own size. A file or device that holds
data (a filesystem or partition signature, or anything non-zero in its first MiB) or an
existing mvsnap store is only overwritten with --force. Space is allocated in 4 KiB blocks
(format version 2): a 4 KiB first write after a snapshot costs 4 KiB of store.";

/// Format a COW store (an image file or a block device).
#[derive(Debug, Args)]
#[command(after_help = EXAMPLES)]
pub struct FormatArgs {
    /// The store to format [default: --store or MVSNAP_STORE].
    #[arg(value_name = "STORE")]
    path: Option<PathBuf>,

    /// Size of a file-backed store: a new file's size, or grow an existing one to it; never
    /// shrinks (ignored for a block device) [default: a new file 1G, an existing one its size].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    size: Option<u64>,

    /// A file-backed store grows on demand up to this size (default: it never grows).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_size: Option<u64>,

    /// Overwrite an existing mvsnap store or a file or device that holds data.
    #[arg(long)]
    force: bool,

    /// Raise a low-space event when free space falls under this percentage.
    #[arg(long, value_name = "PERCENT", default_value_t = 10,
          value_parser = clap::value_parser!(u8).range(0..=100))]
    low_space_percent: u8,
}

impl FormatArgs {
    pub fn run(self, global: &Global) -> Result<()> {
        let path = match (&self.path, &global.store) {
            (Some(p), _) | (None, Some(p)) => p.clone(),
            (None, None) => usage_bail!("no store given: mvsnap format STORE"),
        };
        let max_size = self.max_size.unwrap_or(0);
        if let Some(size) = self.size.filter(|&s| max_size != 0 && max_size < s) {
            usage_bail!(
                "--max-size {} is smaller than --size {}",
                human_size(max_size),
                human_size(size)
            );
        }
        let opts = FormatOptions {
            size: self.size,
            max_size,
            force: self.force,
            low_space_percent: self.low_space_percent,
        };
        Store::format(&path, &opts)?;

        // Read back what was made: the size of a block device is its own.
        let store = Store::open(
            &path,
            &OpenOptions {
                read_only: true,
                ..OpenOptions::default()
            },
        )?;
        let info = store.info();
        store.close()?;
        outln!(
            "formatted {}: store size {}, data area {}, block size {}, uuid {}",
            path.display(),
            super::info::store_size(&info, &Default::default()),
            human_size(info.data_bytes),
            human_size(u64::from(info.chunk_size)),
            info.uuid
        );
        Ok(())
    }
}
