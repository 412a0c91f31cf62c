//! `mvsnap events`: what happened to the store (low space, growth, invalidations, corruption,
//! poisoning), and with `--follow` each new event as it happens.

use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;

use super::Global;
use crate::output::{outln, utc_time};

/// Show the store's events; with --follow, wait for new ones (a daemon must serve the store).
///
/// The store keeps its last 1,000 events across restarts. Each line: the time (UTC), the kind
/// (low-space, grown, snapshot-invalidated, corruption, poisoned) and what happened.
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  mvsnap --store store.img events
  mvsnap --store store.img events --follow --json | while read -r ev; do ...; done

The daemon can also run a command for each event: `mvsnap serve --on-event CMD`.")]
pub struct EventsArgs {
    /// Keep running and print each new event as it happens (until the daemon stops).
    #[arg(short, long)]
    follow: bool,

    /// One JSON object per line: {"time": SECONDS, "kind": KIND, "message": TEXT}.
    #[arg(long)]
    json: bool,
}

impl EventsArgs {
    pub fn run(self, global: &Global) -> Result<()> {
        let mut session = global.open_read_only()?;
        if self.follow && !session.is_daemon() {
            bail!(
                "--follow needs a daemon serving the store (`mvsnap serve`): offline, nothing \
                 happens to wait for"
            );
        }
        let mut next = 0;
        loop {
            let wait = if self.follow {
                Duration::from_secs(5)
            } else {
                Duration::ZERO
            };
            let batch = session.events_after(next, wait)?;
            next = batch.next;
            for e in &batch.events {
                if self.json {
                    outln!("{}", serde_json::to_string(e)?);
                } else {
                    let kind = serde_json::to_value(e.kind)?;
                    outln!(
                        "{}  {:<20}  {}",
                        utc_time(e.time),
                        kind.as_str().unwrap_or("?"),
                        e.message
                    );
                }
            }
            if !self.follow {
                break;
            }
        }
        session.close()
    }
}
