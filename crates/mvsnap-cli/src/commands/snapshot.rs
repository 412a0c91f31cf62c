//! `mvsnap snapshot create|delete|list`.

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use mvsnap_engine::{SnapshotInfo, SnapshotState};

use super::{print_json, Global};
use crate::output::{human_size, utc_time, Table};
use crate::output::{out, outln};

pub const EXAMPLES: &str = "\
Examples:
  mvsnap --store store.img snapshot create disk --tag monday --memo 'before the upgrade'
  mvsnap --store store.img snapshot list
  mvsnap --store store.img snapshot delete disk@monday";

/// Create, delete and list snapshots.
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    Create(CreateArgs),
    Delete(DeleteArgs),
    List(ListArgs),
}

impl SnapshotCommand {
    pub fn run(self, global: &Global) -> Result<()> {
        match self {
            SnapshotCommand::Create(a) => a.run(global),
            SnapshotCommand::Delete(a) => a.run(global),
            SnapshotCommand::List(a) => a.run(global),
        }
    }
}

/// Take a snapshot of an origin or of a snapshot; prints the new tag.
///
/// The snapshot is instant (no data is copied) and holds every write acknowledged before it.
/// Several sources make one snapshot set taken at one consistent instant: `snapshot create
/// disk0 disk1 --tag T` gives disk0@T and disk1@T.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  mvsnap snapshot create disk                          # tag chosen by mvsnap, printed
  mvsnap snapshot create disk --tag monday --memo 'before the upgrade'
  mvsnap snapshot create disk@monday --tag try1 --writable   # a writable child of a snapshot
  mvsnap snapshot create disk0 disk1 --tag T           # one instant for both: disk0@T, disk1@T
  mvsnap snapshot create disk --freeze /mnt/data       # ext4 on /dev/loopN over the disk file:
                                                       # frozen for the snapshot, so it is clean")]
pub struct CreateArgs {
    /// What to snapshot: ORIGIN or ORIGIN@TAG; several make one consistent snapshot set.
    #[arg(value_name = "ORIGIN[@TAG]", required = true)]
    sources: Vec<String>,

    /// The new snapshot's tag [default: chosen by the engine].
    #[arg(long, value_name = "NEW")]
    tag: Option<String>,

    /// A free-text note kept with the snapshot.
    #[arg(long, value_name = "TEXT", default_value = "")]
    memo: String,

    /// Make the snapshot writable (its writes never change its parent or siblings).
    #[arg(long)]
    writable: bool,

    /// Freeze the filesystem mounted there (FIFREEZE) for the snapshot, then thaw it, so the
    /// snapshot holds it clean; repeatable for a snapshot set.
    #[arg(long, value_name = "MOUNTPOINT")]
    freeze: Vec<std::path::PathBuf>,

    /// Thaw the frozen filesystems after this many seconds whatever happens.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 30,
        requires = "freeze"
    )]
    freeze_timeout: u64,
}

impl CreateArgs {
    fn run(self, global: &Global) -> Result<()> {
        let mut store = global.open()?;
        let sources: Vec<&str> = self.sources.iter().map(String::as_str).collect();
        let timeout = std::time::Duration::from_secs(self.freeze_timeout);
        let frozen = crate::freeze::Frozen::freeze(&self.freeze, timeout)?;
        let made =
            store.create_snapshot(&sources, self.tag.as_deref(), &self.memo, self.writable)?;
        if let Some(f) = frozen {
            f.thaw()?;
        }
        store.close()?;
        let mut tags: Vec<&str> = Vec::new();
        for s in &made {
            if !tags.contains(&s.tag.as_str()) {
                tags.push(&s.tag);
            }
        }
        for tag in tags {
            outln!("{tag}");
        }
        Ok(())
    }
}

/// Delete a snapshot. Its space is reclaimed in the background; a snapshot that still has
/// children stays hidden until they are gone.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  mvsnap snapshot delete disk@monday")]
pub struct DeleteArgs {
    /// The snapshot: ORIGIN@TAG.
    #[arg(value_name = "ORIGIN@TAG")]
    name: String,

    /// Delete even while a client has it open (only a daemon has clients; offline there are none).
    #[arg(long)]
    force: bool,
}

impl DeleteArgs {
    fn run(self, global: &Global) -> Result<()> {
        if !self.name.contains('@') {
            bail!(
                "{} is not a snapshot name: expected ORIGIN@TAG (an origin is removed with \
                 `mvsnap origin remove`)",
                self.name
            );
        }
        let mut store = global.open()?;
        store.delete_snapshot(&self.name, self.force)?;
        store.close()?;
        Ok(())
    }
}

/// List snapshots: a table, or JSON for scripts.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  mvsnap snapshot list
  mvsnap snapshot list --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))'

CREATED is UTC. EXCLUSIVE is the COW space only this snapshot uses; SHARED the space it
shares with other snapshots. An invalid snapshot (it lost data when the store was full) shows
why in its MEMO column.")]
pub struct ListArgs {
    /// Print JSON: an array of snapshot objects (name, origin, tag, parent, memo, created,
    /// writable, state, reason, exclusive_bytes, shared_bytes).
    #[arg(long)]
    json: bool,
}

impl ListArgs {
    fn run(self, global: &Global) -> Result<()> {
        let mut store = global.open_read_only()?;
        let snapshots = store.snapshots()?;
        store.close()?;
        if self.json {
            return print_json(&snapshots);
        }
        out!("{}", table(&snapshots).render(""));
        Ok(())
    }
}

pub fn state_name(state: SnapshotState) -> &'static str {
    match state {
        SnapshotState::Valid => "valid",
        SnapshotState::Invalid => "invalid",
        SnapshotState::Hidden => "hidden",
    }
}

fn table(snapshots: &[SnapshotInfo]) -> Table {
    let mut table = Table::new(&[
        "NAME",
        "PARENT",
        "CREATED",
        "STATE",
        "WRITABLE",
        "EXCLUSIVE",
        "SHARED",
        "MEMO",
    ]);
    for s in snapshots {
        let mut memo = s.memo.clone();
        if s.state == SnapshotState::Invalid || s.reason.is_some() {
            let reason = s.reason.as_deref().unwrap_or("reason unknown");
            memo = if memo.is_empty() {
                format!("[invalid: {reason}]")
            } else {
                format!("[invalid: {reason}] {memo}")
            };
        }
        table.row(vec![
            s.name.clone(),
            s.parent.clone(),
            utc_time(s.created),
            state_name(s.state).to_string(),
            if s.writable { "yes" } else { "no" }.to_string(),
            human_size(s.exclusive_bytes),
            human_size(s.shared_bytes),
            memo.replace('\n', " "),
        ]);
    }
    table
}
