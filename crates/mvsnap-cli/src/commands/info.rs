//! `mvsnap info`: geometry, space, events and per-snapshot space of a store.

use anyhow::Result;
use clap::Args;

use mvsnap_engine::StoreInfo;

use super::snapshot::state_name;
use super::{print_json, Global};
use crate::output::{human_size, utc_time, Table};
use crate::output::{out, outln};

/// Show the store: geometry, space used and free, events, per-snapshot space.
///
/// Also whether free space is low, and the space each snapshot uses on its own (exclusive) and
/// shares with others (shared).
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  mvsnap --store store.img info
  mvsnap --store store.img info --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"free_bytes\"])'")]
pub struct InfoArgs {
    /// Print JSON (every field of the store's info, sizes in bytes).
    #[arg(long)]
    json: bool,
}

impl InfoArgs {
    pub fn run(self, global: &Global) -> Result<()> {
        let mut store = global.open_read_only()?;
        let info = store.info()?;
        store.close()?;
        if self.json {
            return print_json(&info);
        }
        let pct = |part: u64| {
            let whole = info.used_bytes + info.free_bytes;
            if whole == 0 {
                0.0
            } else {
                part as f64 * 100.0 / whole as f64
            }
        };
        let mut t = Table::new(&["store", &info.path]);
        t.row(vec!["uuid".into(), info.uuid.clone()]);
        t.row(vec![
            "chunk size".into(),
            format!(
                "{} (copied out in blocks of {})",
                human_size(u64::from(info.chunk_size)),
                human_size(u64::from(info.block_size))
            ),
        ]);
        t.row(vec!["journal".into(), human_size(info.journal_bytes)]);
        t.row(vec!["store size".into(), store_size(&info)]);
        t.row(vec!["data area".into(), human_size(info.data_bytes)]);
        t.row(vec![
            "used".into(),
            format!(
                "{} ({:.1}%)",
                human_size(info.used_bytes),
                pct(info.used_bytes)
            ),
        ]);
        t.row(vec![
            "free".into(),
            format!(
                "{} ({:.1}%)",
                human_size(info.free_bytes),
                pct(info.free_bytes)
            ),
        ]);
        t.row(vec!["metadata".into(), human_size(info.metadata_bytes)]);
        t.row(vec!["mappings".into(), info.mappings.to_string()]);
        t.row(vec![
            "cache".into(),
            format!(
                "{} of {}",
                human_size(info.cache_used_bytes),
                human_size(info.cache_bytes)
            ),
        ]);
        t.row(vec![
            "mode".into(),
            if info.ephemeral {
                "ephemeral"
            } else {
                "persistent"
            }
            .into(),
        ]);
        t.row(vec![
            "low space".into(),
            if info.low_space { "YES" } else { "no" }.into(),
        ]);
        out!("{}", t.render(""));

        outln!("\norigins ({})", info.origins.len());
        if !info.origins.is_empty() {
            let mut t = Table::new(&["ID", "SIZE", "SNAPSHOTS", "PATH"]);
            for o in &info.origins {
                t.row(vec![
                    o.id.clone(),
                    human_size(o.size),
                    o.snapshots.to_string(),
                    o.path.clone(),
                ]);
            }
            out!("{}", t.render("  "));
        }

        outln!("\nsnapshots ({})", info.snapshots.len());
        if !info.snapshots.is_empty() {
            let mut t = Table::new(&["NAME", "STATE", "EXCLUSIVE", "SHARED", "REASON"]);
            for s in &info.snapshots {
                t.row(vec![
                    s.name.clone(),
                    state_name(s.state).into(),
                    human_size(s.exclusive_bytes),
                    human_size(s.shared_bytes),
                    s.reason.clone().unwrap_or_default(),
                ]);
            }
            out!("{}", t.render("  "));
        }

        outln!("\nevents ({})", info.events.len());
        if !info.events.is_empty() {
            let mut t = Table::new(&["TIME (UTC)", "KIND", "MESSAGE"]);
            for e in &info.events {
                let kind = serde_json::to_value(e.kind)?
                    .as_str()
                    .unwrap_or("?")
                    .to_string();
                t.row(vec![utc_time(e.time), kind, e.message.replace('\n', " ")]);
            }
            out!("{}", t.render("  "));
        }
        Ok(())
    }
}

/// The store's size now, and how far it may grow: `max_bytes` is the whole store's limit.
pub fn store_size(info: &StoreInfo) -> String {
    let now = std::fs::metadata(&info.path)
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.len());
    match now {
        Some(len) if info.max_bytes > len => format!(
            "{} (a file; grows on demand up to {})",
            human_size(len),
            human_size(info.max_bytes)
        ),
        Some(len) => human_size(len),
        None => human_size(info.max_bytes),
    }
}
