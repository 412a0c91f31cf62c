//! `mvsnap origin add|remove|list`: bind origins (devices or image files) to the store.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use mvsnap_engine::{OriginInfo, OriginState};

use super::Global;
use crate::output::outln;
use crate::output::{Column, Listed, Listing, Value};

pub const EXAMPLES: &str = "\
Examples:
  mvsnap --store store.img origin add disk.img --id disk
  mvsnap --store store.img origin list
  mvsnap --store store.img origin ls -H -p -o id,size
  mvsnap --store store.img origin remove disk";

/// Bind, unbind and list the origins of the store.
#[derive(Debug, Subcommand)]
pub enum OriginCommand {
    Add(AddArgs),
    #[command(visible_alias = "rm")]
    Remove(RemoveArgs),
    #[command(visible_alias = "ls")]
    List(ListArgs),
}

impl OriginCommand {
    pub fn run(self, global: &Global) -> Result<()> {
        match self {
            OriginCommand::Add(a) => a.run(global),
            OriginCommand::Remove(a) => a.run(global),
            OriginCommand::List(a) => a.run(global),
        }
    }
}

/// Bind an origin (a block device or an image file) to the store; prints its id.
///
/// The origin's size is recorded and checked every time the store is opened.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  mvsnap --store store.img origin add disk.img            # id: disk.img
  mvsnap --store store.img origin add /dev/sdb --id data")]
pub struct AddArgs {
    /// The origin: a block device or an image file.
    path: PathBuf,

    /// The origin's id, used in volume names (ID, ID@TAG): 1-128 of A-Z a-z 0-9 - _ . : +
    /// [default: the file name].
    #[arg(long, value_name = "NAME",
          value_parser = |t: &str| super::snapshot::valid_name("origin id", t))]
    id: Option<String>,
}

impl AddArgs {
    fn run(self, global: &Global) -> Result<()> {
        let mut store = global.open()?;
        let origin = store.add_origin(&self.path, self.id.as_deref())?;
        store.close()?;
        outln!("{}", origin.id);
        Ok(())
    }
}

/// Unbind an origin from the store.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  mvsnap --store store.img origin remove disk.img")]
pub struct RemoveArgs {
    /// The origin's id.
    id: String,
}

impl RemoveArgs {
    fn run(self, global: &Global) -> Result<()> {
        let mut store = global.open()?;
        store.remove_origin(&self.id)?;
        store.close()?;
        Ok(())
    }
}

/// The columns of `origin list` (for -o and -s).
pub(crate) const COLUMNS: &[Column<OriginInfo>] = &[
    Column::new("id", |o| Value::Text(o.id.clone())),
    Column::new("size", |o| Value::Size(o.size)),
    Column::new("state", |o| Value::Text(origin_state_name(o.state).into())),
    Column::new("snapshots", |o| Value::Count(o.snapshots as u64)),
    Column::new("path", |o| Value::Text(o.path.clone())),
    // `Value::render` puts a multi-line reason on one line, as for snapshots.
    Column::new("reason", |o| {
        Value::Text(o.reason.clone().unwrap_or_default())
    }),
];

pub(crate) fn origin_state_name(state: OriginState) -> &'static str {
    match state {
        OriginState::Online => "online",
        OriginState::Unavailable => "unavailable",
    }
}

/// `origin list`'s table.
#[derive(Debug)]
pub struct OriginColumns;

impl Listed for OriginColumns {
    const NAMES: &'static [&'static str] = &["id", "size", "state", "snapshots", "path", "reason"];
    const DEFAULT: &'static str = "id,size,state,snapshots,path";
    const SORT_HELP: &'static str =
        "Sort by this column, ascending (sizes as numbers) [default: the store's order]";
    const JSON_HELP: &'static str =
        "Print JSON (an array of {id, path, size, snapshots, state, reason})";
}

/// List the origins bound to the store.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  mvsnap --store store.img origin list
  mvsnap --store store.img origin ls -H -p -o id,size     # scripted: tabs, sizes in bytes
  mvsnap --store store.img origin list --json

Columns (-o, -s): id, size, state, snapshots, path, reason. SIZE in binary units (1 KiB = 1024;
-p: bytes). STATE is online, or unavailable when its device is missing or changed size since
it was bound (REASON says which): its snapshots and its export are unavailable until it is put
back as it was.")]
pub struct ListArgs {
    #[command(flatten)]
    list: Listing<OriginColumns>,
}

impl ListArgs {
    fn run(self, global: &Global) -> Result<()> {
        let mut store = global.open_read_only()?;
        let origins = store.origins()?;
        store.close()?;
        self.list.print(&origins, COLUMNS)
    }
}
