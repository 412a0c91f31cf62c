//! `mvsnap check`: verify the store's invariants (fsck); non-zero exit on any error.

use anyhow::{bail, Result};
use clap::Args;

use super::{print_json, Global};
use crate::output::{outln, plural, Progress, ProgressArgs};

/// Check the store's invariants (fsck); exit status 1 on any error.
///
/// Verifies checksums, the space map against the index (no block both free and used, none
/// lost), the snapshot table and the origins, and prints a report. On a terminal, stderr shows
/// a spinner while it runs.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  mvsnap --store store.img check
  mvsnap --store store.img check --json | python3 -m json.tool

The store is opened read-only: check repairs nothing and writes nothing.
With --repair (the daemon stopped): the tree is rebuilt from the nodes that still read, the
space map from what the tree points at, the counters from the tree; snapshots that lost data
to a damaged node are invalidated; then the store is checked again.")]
pub struct CheckArgs {
    /// Repair what can be repaired, in place (one commit: a crash leaves the store as it was),
    /// then check again.
    #[arg(long)]
    repair: bool,

    /// Print the report as JSON (slots_total, slots_used, slots_free, mappings, snapshots,
    /// errors, warnings).
    #[arg(long)]
    json: bool,

    #[command(flatten)]
    progress: ProgressArgs,
}

impl CheckArgs {
    pub fn run(self, global: &Global) -> Result<()> {
        let path = global.store_path()?.display().to_string();
        if self.repair {
            return repair(global, &path, self.json);
        }
        let spinner = Progress::new(self.progress.progress, "check", &path, None);
        let mut store = global.open_read_only()?;
        let report = store.check()?;
        store.close()?;
        spinner.finish();
        report_check(&path, &report, self.json)
    }
}

fn repair(global: &Global, path: &str, json: bool) -> Result<()> {
    let mut store = global.open()?;
    let r = store.repair()?;
    store.close()?;
    if json {
        print_json(&r)?;
        return finish(path, &r.check);
    }
    outln!("repair of {path}");
    outln!(
        "  tree:      {} nodes reached, {} entries kept{}",
        r.nodes_read,
        r.entries_kept,
        if r.tree_rebuilt { ", rebuilt" } else { "" }
    );
    for l in &r.lost {
        outln!("  lost:      {l}");
    }
    outln!(
        "  space map: {} leaked blocks given back, {} used blocks marked, {} bitmaps rewritten",
        r.blocks_leaked,
        r.blocks_lost,
        r.bitmaps_rewritten
    );
    outln!(
        "  counters:  {}",
        if r.counters_fixed {
            "set from the tree"
        } else {
            "right"
        }
    );
    for s in &r.invalidated {
        outln!("  invalidated: {s} (data it needed was under a damaged node)");
    }
    report_check(path, &r.check, false)
}

fn report_check(path: &str, report: &mvsnap_engine::CheckReport, json: bool) -> Result<()> {
    if json {
        print_json(&report)?;
    } else {
        outln!("check of {path}");
        outln!(
            "  slots:     {} total, {} used, {} free",
            report.slots_total,
            report.slots_used,
            report.slots_free
        );
        outln!("  mappings:  {}", report.mappings);
        outln!("  snapshots: {}", report.snapshots);
        for w in &report.warnings {
            outln!("  warning: {w}");
        }
        for e in &report.errors {
            outln!("  ERROR: {e}");
        }
        if report.is_clean() {
            outln!(
                "clean: no errors, {} warning{}",
                report.warnings.len(),
                plural(report.warnings.len() as u64)
            );
        } else {
            outln!(
                "NOT CLEAN: {} error{}",
                report.errors.len(),
                plural(report.errors.len() as u64)
            );
        }
    }
    finish(path, report)
}

/// Exit status 1 on any error.
fn finish(path: &str, report: &mvsnap_engine::CheckReport) -> Result<()> {
    if !report.is_clean() {
        bail!(
            "check of {path} found {} error{}: {}",
            report.errors.len(),
            plural(report.errors.len() as u64),
            report.errors[0]
        );
    }
    Ok(())
}
