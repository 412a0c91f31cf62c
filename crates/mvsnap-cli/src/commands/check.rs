//! `mvsnap check`: verify the store's invariants (fsck); non-zero exit on any error.

use anyhow::{bail, Result};
use clap::Args;

use super::{print_json, Global};
use crate::output::{outln, Progress, ProgressArgs};

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

The store is opened read-only: check repairs nothing and writes nothing.")]
pub struct CheckArgs {
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
        let spinner = Progress::new(self.progress.progress, "check", &path, None);
        let mut store = global.open_read_only()?;
        let report = store.check()?;
        store.close()?;
        spinner.finish();
        if self.json {
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
                    plural(report.warnings.len())
                );
            } else {
                outln!(
                    "NOT CLEAN: {} error{}",
                    report.errors.len(),
                    plural(report.errors.len())
                );
            }
        }
        if !report.is_clean() {
            bail!(
                "check of {path} found {} error{}: {}",
                report.errors.len(),
                plural(report.errors.len()),
                report.errors[0]
            );
        }
        Ok(())
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}
