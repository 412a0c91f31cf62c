//! Group commit: records appended and applied under the state lock, made durable together
//! with one sync; and when a tree commit is due.

use super::*;

impl Inner {
    /// Append a record and apply it to the state (the caller holds the state write lock).
    /// Returns the record's sequence number.
    pub fn log(&self, st: &mut State, rec: Record) -> Result<u64> {
        self.check_poison()?;
        if self.read_only {
            return Err(Error::ReadOnly("store opened read-only".into()));
        }
        if !self.ephemeral && !self.epoch_fresh.load(Ordering::Acquire) {
            // A new journal epoch, so no record a crashed writer left behind can ever
            // validate after ours: a tree commit (cheap: nothing changed yet).
            self.checkpoint_locked(st)?;
        }
        // A record the journal can never hold is refused before anything changes (it used to
        // overflow the journal and poison the store); callers bound their inputs far below.
        let need = rec.encoded_len();
        let max = (self.geo.journal_len / 4) as usize;
        if need > max {
            return Err(Error::InvalidArgument(format!(
                "a metadata record of {need} bytes is more than the journal takes ({max})"
            )));
        }
        self.dirty.store(true, Ordering::Release);
        if self.ephemeral {
            self.spill_if_due(st)?;
        } else {
            self.commit_if_due(st, need)?;
        }
        let seq = {
            let mut j = self.journal.lock();
            if self.ephemeral {
                let s = j.next_seq;
                j.next_seq += 1;
                s
            } else {
                j.append(&rec)
            }
        };
        st.apply(&rec, seq).map_err(|e| {
            // A live record that does not apply is a bug; stop writing before it spreads.
            let e = std::io::Error::other(e);
            self.poison("apply", &e)
        })?;
        Ok(seq)
    }

    /// Wait until a copy-out finishes after `seen` were (the caller read `copies_done` under
    /// the state lock and released it).
    pub(crate) fn wait_copies(&self, seen: u64) {
        let mut g = self.copy_mx.lock();
        while self.copies_done.load(Ordering::Acquire) == seen {
            // Bounded: a poisoned store or a closed one must not leave a writer asleep.
            if self
                .copy_cv
                .wait_for(&mut g, std::time::Duration::from_millis(100))
                .timed_out()
            {
                return;
            }
        }
    }

    /// A copy-out finished (its blocks left `State::copying`): wake its waiters.
    pub(crate) fn copies_finished(&self) {
        self.copies_done.fetch_add(1, Ordering::AcqRel);
        let _g = self.copy_mx.lock();
        self.copy_cv.notify_all();
    }

    /// Highest sequence number appended so far.
    pub fn appended_seq(&self) -> u64 {
        self.journal.lock().next_seq.saturating_sub(1)
    }

    /// The highest record known durable (everything, for an ephemeral store).
    pub fn durable_seq(&self) -> u64 {
        if self.ephemeral {
            return u64::MAX;
        }
        self.commit.lock().durable_seq
    }

    /// Wait up to `timeout` for someone else's group commit to make `seq` durable.
    pub fn wait_committed(&self, seq: u64, timeout: std::time::Duration) -> bool {
        let mut cs = self.commit.lock();
        if cs.durable_seq < seq {
            self.commit_cv.wait_for(&mut cs, timeout);
        }
        cs.durable_seq >= seq
    }

    /// Wait until record `seq` is durable, leading a group commit if nobody else is.
    pub fn wait_durable(&self, seq: u64) -> Result<()> {
        if self.ephemeral {
            return Ok(());
        }
        let mut cs = self.commit.lock();
        loop {
            if cs.durable_seq >= seq {
                return Ok(());
            }
            self.check_poison()?;
            if cs.leader {
                self.commit_cv.wait(&mut cs);
                continue;
            }
            cs.leader = true;
            let before = cs.durable_seq;
            drop(cs);
            let result = self.write_group();
            cs = self.commit.lock();
            cs.leader = false;
            match result {
                Ok(Some(last)) => {
                    cs.durable_seq = last;
                    // The previous group is now followed by a durable one: settled.
                    self.settled_seq.fetch_max(before, Ordering::AcqRel);
                }
                Ok(None) => {}
                Err(e) => {
                    self.commit_cv.notify_all();
                    return Err(e);
                }
            }
            self.commit_cv.notify_all();
        }
    }

    fn write_group(&self) -> Result<Option<u64>> {
        let groups = self.journal.lock().take_groups();
        let Some(last) = groups.last().map(|g| g.last_seq) else {
            // Nothing pending: everything appended was written, or a tree commit covers it.
            return Ok(Some(self.appended_seq()));
        };
        for g in &groups {
            if g.pos + g.bytes.len() as u64 > self.geo.journal_len {
                // Never write past the journal into the data area.
                let e = std::io::Error::other("journal region overflow");
                return Err(self.poison("journal append", &e));
            }
            self.store_write(&g.bytes, JOURNAL_OFFSET + g.pos)?;
        }
        self.store_sync()?;
        Ok(Some(last))
    }

    /// After a delete or reclaim: commit the tree, so what it freed can be used again and
    /// its space goes back to the host. `wait`: return once that is done (close,
    /// `wait_reclaimed`); else start the commit beside the writers (the reclaim thread), after
    /// the one running, if any, is over.
    pub(crate) fn release_freed_space(&self, wait: bool) -> Result<()> {
        if self.ephemeral || self.read_only {
            return Ok(());
        }
        loop {
            // Closing (or dropped, as in a crash): the committer is gone, and `close` finishes
            // what is left itself. Poisoned: nothing more is written.
            if !wait && self.closed.load(Ordering::Acquire) {
                return Ok(());
            }
            self.check_poison()?;
            let mut st = self.state.write();
            if st.deferred_frees.is_empty() {
                // A commit running may still hold some (the reclaim thread started it).
                return if wait {
                    self.wait_inflight(&mut st)
                } else {
                    Ok(())
                };
            }
            if wait {
                return self.checkpoint_locked(&mut st);
            }
            self.finish_inflight(&mut st)?;
            if !self.commit_running() {
                return self.start_commit(&mut st);
            }
            drop(st);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Before a record of `need` bytes: start a tree commit when the open transaction holds
    /// [`Inner::dirty_limit`] nodes or the journal is half full; wait for the one running when
    /// the writers outpace it (twice the limit) or the journal has no room for the record.
    fn commit_if_due(&self, st: &mut State, need: usize) -> Result<()> {
        let limit = self.dirty_limit(st);
        let nodes = st.meta.dirty_nodes() as u64;
        if self.commit_running() {
            // A finished one is finished here; one still writing is waited for only when
            // the writers are too far ahead of it.
            self.finish_inflight(st)?;
            if nodes >= 2 * limit || self.journal.lock().nearly_full(need) {
                self.wait_inflight(st)?;
            }
        }
        // Inside the metadata reserve (the store is full and data is refused): the blocks the
        // open transaction shadowed come back only with a commit, and with one running beside
        // the writers the next transaction may take as many again first, more than the
        // reserve holds (a full store invalidating hundreds of snapshots, then reclaiming,
        // ran out and poisoned the store). So commit to the end, a few nodes at a time.
        if !self.ephemeral
            && st.meta.usable_free_blocks() < self.reserve_blocks(st)
            && (nodes >= (limit / 4).max(4) || self.commit_running())
        {
            return self.checkpoint_locked(st);
        }
        let (full, half) = {
            let j = self.journal.lock();
            (j.nearly_full(need), j.used() * 2 > j.region_len)
        };
        if full {
            // Only a commit finished to the end empties the journal.
            return self.checkpoint_locked(st);
        }
        if nodes >= limit || half {
            self.start_commit(st)?;
        }
        Ok(())
    }

    /// An ephemeral store never commits: at [`Inner::dirty_limit`] dirty nodes, write them out
    /// uncommitted instead of keeping every change of the session in RAM.
    fn spill_if_due(&self, st: &mut State) -> Result<()> {
        if (st.meta.dirty_nodes() as u64) < self.dirty_limit(st) {
            return Ok(());
        }
        match st.meta.spill() {
            Ok(n) => {
                tracing::debug!(
                    nodes = n,
                    "ephemeral: metadata nodes written out uncommitted"
                );
                Ok(())
            }
            Err(e) => Err(self.poison("writing metadata out", &std::io::Error::other(e))),
        }
    }

    /// Dirty tree nodes at which a tree commit starts: at most [`MAX_DIRTY_NODES`] (its
    /// writes are what a commit costs, and what writers wait for when they outpace it), at
    /// most a fifth of the cache (dirty and frozen nodes count against its budget, up to
    /// twice the limit each: four fifths at worst, the rest stays for clean nodes), and a
    /// small share of a small store. The bigger the set, the more changes each leaf write
    /// carries: random first writes into a tree of L leaves write about
    /// `limit / (L * -ln(1 - limit / L))` nodes each.
    pub fn dirty_limit(&self, st: &State) -> u64 {
        (self.cache_nodes / 5)
            .min(MAX_DIRTY_NODES)
            .min(st.meta.limit() / 64)
            .max(8)
    }
}
