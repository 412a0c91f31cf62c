//! `mvsnap origin add|remove|list`: bind origins (devices or image files) to the store.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

use super::{print_json, Global};
use crate::output::{human_size, Table};
use crate::output::{out, outln};

pub const EXAMPLES: &str = "\
Examples:
  mvsnap --store store.img origin add disk.img --id disk
  mvsnap --store store.img origin list
  mvsnap --store store.img origin remove disk";

/// Bind, unbind and list the origins of the store.
#[derive(Debug, Subcommand)]
pub enum OriginCommand {
    Add(AddArgs),
    Remove(RemoveArgs),
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

    /// The origin's id, used in volume names (ID, ID@TAG) [default: the file name].
    #[arg(long, value_name = "NAME")]
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

/// List the origins bound to the store.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  mvsnap --store store.img origin list
  mvsnap --store store.img origin list --json")]
pub struct ListArgs {
    /// Print JSON (an array of {id, path, size, snapshots}).
    #[arg(long)]
    json: bool,
}

impl ListArgs {
    fn run(self, global: &Global) -> Result<()> {
        let mut store = global.open_read_only()?;
        let origins = store.origins()?;
        store.close()?;
        if self.json {
            return print_json(&origins);
        }
        let mut table = Table::new(&["ID", "SIZE", "SNAPSHOTS", "PATH"]);
        for o in &origins {
            table.row(vec![
                o.id.clone(),
                human_size(o.size),
                o.snapshots.to_string(),
                o.path.clone(),
            ]);
        }
        out!("{}", table.render(""));
        Ok(())
    }
}
