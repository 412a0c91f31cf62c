//! `mvsnap info`: geometry, space, events and per-snapshot space of a store.

use anyhow::Result;
use clap::Args;

use mvsnap_engine::StoreInfo;

use super::snapshot::{reason_cell, state_cell};
use super::{print_json, Global};
use crate::output::out;
use crate::output::{plural, Style, Table};

/// Show the store: geometry, space used and free, events, per-snapshot space.
///
/// Also whether free space is low, and the space each snapshot uses on its own (exclusive) and
/// shares with others (shared).
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  mvsnap --store store.img info
  mvsnap --store store.img info -H -p | awk -F'\\t' '$1 == \"free\" {print $2}'
  mvsnap --store store.img info --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"free_bytes\"])'

Sizes in binary units (1 KiB = 1024). -p: sizes in bytes, times in seconds since the Unix
epoch. -H: one KEY<tab>VALUE line per property, then one line per origin, snapshot and event,
its first field `origin`, `snapshot` or `event`.")]
pub struct InfoArgs {
    #[command(flatten)]
    style: Style,

    /// Print JSON (every field of the store's info, sizes in bytes).
    #[arg(long, conflicts_with_all = ["scripted", "exact"])]
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
        let st = &self.style;
        // Notes in parentheses are for people: scripted mode prints the bare values.
        let note = |value: String, note: String| {
            if st.scripted {
                value
            } else {
                format!("{value} ({note})")
            }
        };
        let pct = |part: u64| {
            let whole = info.used_bytes + info.free_bytes;
            if whole == 0 {
                0.0
            } else {
                part as f64 * 100.0 / whole as f64
            }
        };
        let mut t = Table::new(&["store", &info.path]);
        if st.scripted {
            t = st.table(&[]);
            t.row(vec!["store".into(), info.path.clone()]);
        }
        t.row(vec!["uuid".into(), info.uuid.clone()]);
        t.row(vec![
            "chunk size".into(),
            note(
                st.size(u64::from(info.chunk_size)),
                format!(
                    "copied out in blocks of {}",
                    st.size(u64::from(info.block_size))
                ),
            ),
        ]);
        t.row(vec!["journal".into(), st.size(info.journal_bytes)]);
        t.row(vec!["store size".into(), store_size(&info, st)]);
        if st.scripted {
            // What the human form says in parentheses: how far a file store may grow.
            t.row(vec!["max size".into(), st.size(info.max_bytes)]);
        }
        t.row(vec!["data area".into(), st.size(info.data_bytes)]);
        t.row(vec![
            "used".into(),
            note(
                st.size(info.used_bytes),
                format!("{:.1}%", pct(info.used_bytes)),
            ),
        ]);
        t.row(vec![
            "free".into(),
            note(
                st.size(info.free_bytes),
                format!("{:.1}%", pct(info.free_bytes)),
            ),
        ]);
        t.row(vec!["metadata".into(), st.size(info.metadata_bytes)]);
        t.row(vec!["mappings".into(), info.mappings.to_string()]);
        if st.scripted {
            t.row(vec!["cache used".into(), st.size(info.cache_used_bytes)]);
            t.row(vec!["cache".into(), st.size(info.cache_bytes)]);
            t.row(vec!["cache hits".into(), info.cache_hits.to_string()]);
            t.row(vec!["cache misses".into(), info.cache_misses.to_string()]);
            t.row(vec![
                "cache prefetched".into(),
                info.cache_prefetched.to_string(),
            ]);
        } else {
            t.row(vec![
                "cache".into(),
                format!(
                    "{} of {}",
                    st.size(info.cache_used_bytes),
                    st.size(info.cache_bytes)
                ),
            ]);
            let lookups = info.cache_hits + info.cache_misses;
            if lookups > 0 {
                t.row(vec![
                    "cache hits".into(),
                    format!(
                        "{:.1}% ({} node{} read from the store)",
                        info.cache_hits as f64 * 100.0 / lookups as f64,
                        info.cache_misses,
                        plural(info.cache_misses)
                    ),
                ]);
            }
        }
        // Part of the cache's budget: changes not committed yet, and the commit being written.
        t.row(vec![
            "uncommitted metadata".into(),
            st.size(info.dirty_bytes + info.committing_bytes),
        ]);
        // Also part of the cache's budget, and durable with each commit.
        t.row(vec![
            "buffered index entries".into(),
            format!("{} ({})", info.overlay_entries, st.size(info.overlay_bytes)),
        ]);
        t.row(vec![
            "queued origin writes".into(),
            st.size(info.queued_write_bytes),
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

        // A section: a heading and an indented table, or (scripted) rows tagged with `kind`.
        let section = |kind: &str, title: &str, header: &[&str], rows: Vec<Vec<String>>| {
            let mut text = String::new();
            if st.scripted {
                let mut t = st.table(&[]);
                for r in rows {
                    t.row(std::iter::once(kind.to_string()).chain(r).collect());
                }
                text.push_str(&t.render(""));
            } else {
                text.push_str(&format!("\n{title} ({})\n", rows.len()));
                if !rows.is_empty() {
                    let mut t = st.table(header);
                    for r in rows {
                        t.row(r);
                    }
                    text.push_str(&t.render("  "));
                }
            }
            text
        };
        let origins = info
            .origins
            .iter()
            .map(|o| {
                vec![
                    o.id.clone(),
                    st.size(o.size),
                    o.snapshots.to_string(),
                    o.path.clone(),
                    super::origin::origin_state_name(o.state).into(),
                    o.reason
                        .clone()
                        .unwrap_or_default()
                        .replace(['\n', '\t'], " "),
                ]
            })
            .collect();
        out!(
            "{}",
            section(
                "origin",
                "origins",
                &["ID", "SIZE", "SNAPSHOTS", "PATH", "STATE", "REASON"],
                origins
            )
        );
        let snapshots = info
            .snapshots
            .iter()
            .map(|s| {
                vec![
                    s.name.clone(),
                    state_cell(s).into(),
                    st.size(s.exclusive_bytes),
                    st.size(s.shared_bytes),
                    reason_cell(s).replace(['\n', '\t'], " "),
                ]
            })
            .collect();
        out!(
            "{}",
            section(
                "snapshot",
                "snapshots",
                &["NAME", "STATE", "EXCLUSIVE", "SHARED", "REASON"],
                snapshots
            )
        );
        let mut events = Vec::new();
        for e in &info.events {
            let kind = serde_json::to_value(e.kind)?
                .as_str()
                .unwrap_or("?")
                .to_string();
            events.push(vec![
                st.time(e.time),
                kind,
                e.message.replace(['\n', '\t'], " "),
            ]);
        }
        out!(
            "{}",
            section(
                "event",
                "events",
                &["TIME (UTC)", "KIND", "MESSAGE"],
                events
            )
        );
        Ok(())
    }
}

/// The store's size now, and how far it may grow: `max_bytes` is the whole store's limit.
/// Scripted (`-H`): the size now only.
pub fn store_size(info: &StoreInfo, st: &Style) -> String {
    let now = std::fs::metadata(&info.path)
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.len());
    match now {
        Some(len) if st.scripted => st.size(len),
        Some(len) if info.max_bytes > len => format!(
            "{} (a file; grows on demand up to {})",
            st.size(len),
            st.size(info.max_bytes)
        ),
        Some(len) => st.size(len),
        None => st.size(info.max_bytes),
    }
}
