//! `mvsnap snapshot create|delete|list`.

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, IsTerminal, Write};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use mvsnap_engine::{OriginState, SnapshotInfo, SnapshotState};

use super::Global;
use crate::output::outln;
use crate::output::{Column, Listed, Listing, Value};

pub const EXAMPLES: &str = "\
Examples:
  mvsnap --store store.img snapshot create disk --tag monday --memo 'before the upgrade'
  mvsnap --store store.img snapshot list
  mvsnap --store store.img snapshot ls disk -H -o name,exclusive -p
  mvsnap --store store.img snapshot delete disk@monday
  mvsnap --store store.img snapshot rm -r -y disk@monday   # with every snapshot taken from it";

/// Create, delete and list snapshots.
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    Create(CreateArgs),
    #[command(visible_alias = "rm")]
    Delete(DeleteArgs),
    #[command(visible_alias = "ls")]
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

/// An origin id or a tag, checked as the engine checks it (a bad one is a usage error).
pub fn valid_name(what: &str, text: &str) -> Result<String, String> {
    mvsnap_engine::validate_name(what, text)
        .map(|()| text.to_string())
        .map_err(|e| e.to_string())
}

/// A snapshot name on the command line: ORIGIN@TAG (an origin name is a usage error).
fn snapshot_name(text: &str) -> Result<String, String> {
    match text.split_once('@') {
        Some((o, t)) if !o.is_empty() && !t.is_empty() => {
            mvsnap_engine::validate_name("origin id", o)
                .and_then(|()| mvsnap_engine::validate_name("tag", t))
                .map_err(|e| e.to_string())?;
            Ok(text.to_string())
        }
        _ => Err(format!(
            "'{text}' is not a snapshot name: expected ORIGIN@TAG (an origin is removed with \
             `mvsnap origin remove`)"
        )),
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

    /// The new snapshot's tag: 1-128 of A-Z a-z 0-9 - _ . : + [default: chosen by the engine].
    #[arg(long, value_name = "NEW", value_parser = |t: &str| valid_name("tag", t))]
    tag: Option<String>,

    /// A free-text note kept with the snapshot.
    #[arg(long, value_name = "TEXT", default_value = "")]
    memo: String,

    /// Make the snapshot writable (its writes never change its parent or siblings).
    #[arg(long)]
    writable: bool,

    /// Open the store in ephemeral mode (nothing synced, this session's snapshots discarded when
    /// it closes; refused on a store that holds persistent snapshots). Offline the snapshot lasts
    /// only for this command: ephemeral snapshots are for `serve --ephemeral`.
    #[arg(long)]
    ephemeral: bool,

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
        let global = Global {
            ephemeral: self.ephemeral,
            ..global.clone()
        };
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

/// Delete snapshots. Their space is reclaimed in the background.
///
/// A snapshot that others were taken from (its children, their children...) is only deleted
/// with -r, which deletes that whole subtree, children first, after a confirmation (on a
/// terminal; elsewhere -y is required). Nothing is deleted unless every name exists.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  mvsnap snapshot delete disk@monday
  mvsnap snapshot rm disk@monday disk@tuesday
  mvsnap snapshot delete -r disk@monday -n     # what -r would delete, children first
  mvsnap snapshot delete -r -y disk@monday     # disk@monday and every snapshot taken from it")]
pub struct DeleteArgs {
    /// The snapshots: ORIGIN@TAG...
    #[arg(value_name = "ORIGIN@TAG", required = true, value_parser = snapshot_name)]
    names: Vec<String>,

    /// Also delete every snapshot taken from these (the whole subtree, children first).
    #[arg(short, long)]
    recursive: bool,

    /// Do not ask for confirmation (required with -r when stdin is not a terminal).
    #[arg(short, long)]
    yes: bool,

    /// Print what would be deleted, one name per line, in order; delete nothing.
    #[arg(short = 'n', long)]
    dry_run: bool,

    /// Delete even while a client has it open: a daemon disconnects its NBD clients, and files
    /// open under `serve --mount` (a loop device, a process) fail every later I/O with EIO.
    #[arg(long)]
    force: bool,
}

impl DeleteArgs {
    fn run(self, global: &Global) -> Result<()> {
        let mut store = global.open()?;
        let snapshots = store.snapshots()?;
        let plan = delete_plan(&snapshots, &self.names, self.recursive)?;
        if self.dry_run {
            store.close()?;
            for name in &plan {
                outln!("would delete {name}");
            }
            return Ok(());
        }
        if self.recursive && !self.yes {
            confirm(&plan)?;
        }
        let mut done: Vec<&str> = Vec::new();
        for name in &plan {
            if let Err(e) = store.delete_snapshot(name, self.force) {
                let e = e.context(format!("deleting {name}"));
                if done.is_empty() {
                    return Err(e);
                }
                return Err(e.context(format!("already deleted: {}", done.join(", "))));
            }
            done.push(name);
        }
        store.close()?;
        Ok(())
    }
}

/// Ask on the terminal before deleting a subtree; refuse where nobody can answer.
fn confirm(plan: &[String]) -> Result<()> {
    let n = plan.len();
    let what = format!("{n} snapshot{}", if n == 1 { "" } else { "s" });
    if !std::io::stdin().is_terminal() {
        bail!(
            "refusing to delete {what} ({}) without confirmation: stdin is not a terminal; \
             pass -y to confirm (-n shows what would be deleted)",
            plan.join(", ")
        );
    }
    let mut err = std::io::stderr().lock();
    writeln!(err, "This deletes, children first:")?;
    for name in plan {
        writeln!(err, "  {name}")?;
    }
    write!(err, "Delete {what}? [y/N] ")?;
    err.flush()?;
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .context("reading the answer")?;
    if matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
        Ok(())
    } else {
        bail!("not confirmed: nothing was deleted")
    }
}

/// The snapshots to delete, in order (every child before its parent), or why not: a name that
/// does not exist, or (without `recursive`) a snapshot with children that are not deleted too.
/// Hidden snapshots (deleted, waiting for their children to go) are never named in the plan.
fn delete_plan(all: &[SnapshotInfo], names: &[String], recursive: bool) -> Result<Vec<String>> {
    let by_name: HashMap<&str, &SnapshotInfo> = all.iter().map(|s| (s.name.as_str(), s)).collect();
    let mut children: HashMap<&str, Vec<&str>> = HashMap::new();
    for s in all {
        children.entry(s.parent.as_str()).or_default().push(&s.name);
    }
    for name in names {
        match by_name.get(name.as_str()) {
            None => bail!("snapshot {name} not found"),
            Some(s) if s.state == SnapshotState::Hidden => bail!(
                "snapshot {name} not found: it was deleted (it stays hidden until the snapshots \
                 taken from it are gone)"
            ),
            Some(_) => {}
        }
    }
    // Post-order walk: children first. `seen` guards against a malformed parent cycle.
    fn walk<'a>(
        name: &'a str,
        children: &HashMap<&str, Vec<&'a str>>,
        seen: &mut BTreeSet<&'a str>,
        out: &mut Vec<&'a str>,
    ) {
        if !seen.insert(name) {
            return;
        }
        for c in children.get(name).into_iter().flatten() {
            walk(c, children, seen, out);
        }
        out.push(name);
    }
    let live = |n: &str| {
        by_name
            .get(n)
            .is_some_and(|s| s.state != SnapshotState::Hidden)
    };
    let named: BTreeSet<&str> = names.iter().map(String::as_str).collect();
    let mut plan: Vec<&str> = Vec::new();
    let mut seen = BTreeSet::new();
    for name in names {
        let mut subtree = Vec::new();
        walk(name, &children, &mut BTreeSet::new(), &mut subtree);
        let others: Vec<&str> = subtree
            .iter()
            .copied()
            .filter(|n| n != name && live(n) && !named.contains(n))
            .collect();
        if !recursive && !others.is_empty() {
            bail!(
                "{name} has {} snapshot{} taken from it ({}): delete {} first, or pass -r to \
                 delete {name} and everything taken from it",
                others.len(),
                if others.len() == 1 { "" } else { "s" },
                others.join(", "),
                if others.len() == 1 { "it" } else { "them" },
            );
        }
        walk(name, &children, &mut seen, &mut plan);
    }
    // `walk` from a later name may visit an earlier-named descendant first only if that one was
    // not seen yet, so children always come before their parents.
    Ok(plan
        .into_iter()
        .filter(|n| live(n))
        .map(String::from)
        .collect())
}

/// The columns of `snapshot list` (for -o and -s).
const COLUMNS: &[Column<SnapshotInfo>] = &[
    Column::new("name", |s| Value::Text(s.name.clone())),
    Column::new("origin", |s| Value::Text(s.origin.clone())),
    Column::new("tag", |s| Value::Text(s.tag.clone())),
    Column::new("parent", |s| Value::Text(s.parent.clone())),
    Column::new("created", |s| Value::Time(s.created)),
    Column::new("state", |s| Value::Text(state_cell(s).into())),
    Column::new("writable", |s| {
        Value::Text(if s.writable { "yes" } else { "no" }.into())
    }),
    Column::new("exclusive", |s| Value::Size(s.exclusive_bytes)),
    Column::new("shared", |s| Value::Size(s.shared_bytes)),
    Column::new("memo", |s| Value::Text(memo_cell(s))),
    Column::new("reason", |s| Value::Text(reason_cell(s))),
];

/// `snapshot list`'s table.
#[derive(Debug)]
pub struct SnapshotColumns;

impl Listed for SnapshotColumns {
    const NAMES: &'static [&'static str] = &[
        "name",
        "origin",
        "tag",
        "parent",
        "created",
        "state",
        "writable",
        "exclusive",
        "shared",
        "memo",
        "reason",
    ];
    const DEFAULT: &'static str = "name,parent,created,state,writable,exclusive,shared,memo";
    const SORT_HELP: &'static str =
        "Sort by this column, ascending (sizes and times as numbers) [default: creation order]";
    const JSON_HELP: &'static str = "Print JSON: an array of snapshot objects (name, origin, \
        tag, parent, memo, created, writable, state, reason, origin_state, exclusive_bytes, \
        shared_bytes)";
}

/// List snapshots: a table, or JSON for scripts.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  mvsnap snapshot list
  mvsnap snapshot ls disk                               # the snapshots of origin disk only
  mvsnap snapshot list -H -p -o name,exclusive -s exclusive   # scripted: tabs, bytes, sorted
  mvsnap snapshot list --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))'

Columns (-o, -s): name, origin, tag, parent, created, state, writable, exclusive, shared, memo,
reason. CREATED is UTC (-p: seconds since the Unix epoch). EXCLUSIVE is the COW space only this
snapshot uses; SHARED the space it shares with other snapshots (binary units, 1 KiB = 1024;
-p: bytes). An invalid snapshot (it lost data when the store was full) shows why in its MEMO
column and in REASON. A snapshot whose origin is unavailable (its device missing or resized: see
`mvsnap origin list`) shows STATE unavailable until the origin is back; JSON keeps its own
`state` and adds `origin_state`.")]
pub struct ListArgs {
    /// Only these: an ORIGIN (its snapshots) or a snapshot ORIGIN@TAG [default: all].
    #[arg(value_name = "ORIGIN[@TAG]")]
    filter: Vec<String>,

    #[command(flatten)]
    list: Listing<SnapshotColumns>,
}

impl ListArgs {
    fn run(self, global: &Global) -> Result<()> {
        let mut store = global.open_read_only()?;
        let mut snapshots = store.snapshots()?;
        let origins = if self.filter.is_empty() {
            Vec::new()
        } else {
            store.origins()?
        };
        store.close()?;
        if !self.filter.is_empty() {
            for f in &self.filter {
                let known = if f.contains('@') {
                    snapshots.iter().any(|s| &s.name == f)
                } else {
                    origins.iter().any(|o| &o.id == f)
                };
                if !known {
                    let what = if f.contains('@') {
                        "snapshot"
                    } else {
                        "origin"
                    };
                    bail!("{what} {f} not found");
                }
            }
            snapshots.retain(|s| self.filter.iter().any(|f| *f == s.name || *f == s.origin));
        }
        self.list.print(&snapshots, COLUMNS)
    }
}

/// The snapshot's state, or `unavailable` for a valid one that cannot be read because its
/// origin's device is missing or changed size (JSON keeps the two apart: `state`,
/// `origin_state`).
pub fn state_cell(s: &SnapshotInfo) -> &'static str {
    match s.state {
        SnapshotState::Valid if s.origin_state == OriginState::Unavailable => "unavailable",
        SnapshotState::Valid => "valid",
        SnapshotState::Invalid => "invalid",
        SnapshotState::Hidden => "hidden",
    }
}

/// Why the snapshot is invalid, or why it cannot be read now.
pub fn reason_cell(s: &SnapshotInfo) -> String {
    match (&s.reason, s.origin_state) {
        (Some(r), _) => r.clone(),
        (None, OriginState::Unavailable) => format!(
            "origin {} is unavailable (see `mvsnap origin list`); nothing of the snapshot is lost",
            s.origin
        ),
        (None, OriginState::Online) => String::new(),
    }
}

/// The memo, after why the snapshot is invalid if it is.
fn memo_cell(s: &SnapshotInfo) -> String {
    let mut memo = s.memo.clone();
    if s.state == SnapshotState::Invalid || s.reason.is_some() {
        let reason = s.reason.as_deref().unwrap_or("reason unknown");
        memo = if memo.is_empty() {
            format!("[invalid: {reason}]")
        } else {
            format!("[invalid: {reason}] {memo}")
        };
    }
    memo
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(name: &str, parent: &str, state: SnapshotState) -> SnapshotInfo {
        let (origin, tag) = name.split_once('@').unwrap();
        SnapshotInfo {
            origin: origin.into(),
            tag: tag.into(),
            name: name.into(),
            parent: parent.into(),
            memo: String::new(),
            created: 0,
            writable: false,
            state,
            reason: None,
            origin_state: OriginState::Online,
            exclusive_bytes: 0,
            shared_bytes: 0,
        }
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// d@a <- d@b <- d@c, d@a <- d@h (hidden) <- d@x; d@z alone.
    fn tree() -> Vec<SnapshotInfo> {
        use SnapshotState::*;
        vec![
            snap("d@a", "d", Valid),
            snap("d@b", "d@a", Valid),
            snap("d@h", "d@a", Hidden),
            snap("d@c", "d@b", Valid),
            snap("d@x", "d@h", Valid),
            snap("d@z", "d", Valid),
        ]
    }

    #[test]
    fn plan_children_first() {
        let t = tree();
        let plan = delete_plan(&t, &names(&["d@a"]), true).unwrap();
        assert_eq!(plan, names(&["d@c", "d@b", "d@x", "d@a"]));
        // Named in any order, without -r, when the set is closed under children.
        let plan = delete_plan(&t, &names(&["d@b", "d@c", "d@z"]), false).unwrap();
        assert_eq!(plan, names(&["d@c", "d@b", "d@z"]));
        let plan = delete_plan(&t, &names(&["d@c", "d@b"]), false).unwrap();
        assert_eq!(plan, names(&["d@c", "d@b"]));
    }

    #[test]
    fn plan_refuses() {
        let t = tree();
        let err = delete_plan(&t, &names(&["d@b"]), false).unwrap_err();
        assert!(err
            .to_string()
            .contains("d@b has 1 snapshot taken from it (d@c)"));
        assert!(err.to_string().contains("-r"));
        // A hidden child with a live grandchild counts.
        let err = delete_plan(&t, &names(&["d@a", "d@b", "d@c"]), false).unwrap_err();
        assert!(err.to_string().contains("(d@x)"), "{err}");
        let err = delete_plan(&t, &names(&["d@z", "d@nope"]), true).unwrap_err();
        assert!(err.to_string().contains("d@nope not found"));
        let err = delete_plan(&t, &names(&["d@h"]), true).unwrap_err();
        assert!(err.to_string().contains("hidden"));
    }

    #[test]
    fn snapshot_names() {
        assert!(snapshot_name("d@a").is_ok());
        for bad in ["d", "@a", "d@", "", "d@a@b", "d@a b", "d/x@a"] {
            assert!(snapshot_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn column_names_match() {
        crate::output::assert_listed::<SnapshotColumns, _>(COLUMNS);
        crate::output::assert_listed::<super::super::origin::OriginColumns, _>(
            super::super::origin::COLUMNS,
        );
    }
}
