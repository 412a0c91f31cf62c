//! The store's space: growth towards `--max-size`, freed blocks given back to the host,
//! the metadata reserve, data slots, the low-space event.

use super::*;

impl Inner {
    /// Grow a file-backed store towards its maximum size; returns whether it grew.
    pub fn try_grow(&self, st: &mut State) -> bool {
        let max = self.sb.lock().max_size;
        if self.read_only || !self.dev.can_grow() || max == 0 {
            return false;
        }
        let cur_len = self.geo.slot_offset(0) + st.meta.limit() * META_BLOCK;
        if cur_len >= max || st.meta.limit() >= st.meta.blocks() {
            return false;
        }
        // An eighth at a time, within bounds: a 1 TiB fallocate would stall every writer.
        let step = (cur_len / 8).clamp(64 << 20, 1 << 30);
        let new_len = (cur_len + step).min(max);
        let new_blocks = self.geo.slots_for_len(new_len).min(st.meta.blocks());
        if new_blocks <= st.meta.limit() {
            return false;
        }
        let target = self.geo.slot_offset(0) + new_blocks * META_BLOCK;
        if let Err(e) = self.dev.grow(target) {
            tracing::warn!("could not grow {} to {target}: {e}", self.path.display());
            return false;
        }
        // The new size must be durable before anything (a copy, a record, a header) points
        // past the old end: a power cut may keep those writes and lose the size change.
        if let Err(e) = self.store_sync() {
            tracing::error!(
                "could not make the growth of {} durable: {e}",
                self.path.display()
            );
            return false;
        }
        st.meta.set_limit(new_blocks);
        self.event(
            EventKind::Grown,
            format!("store grown to {target} bytes (max {max})"),
        );
        true
    }

    /// Give the host back the space of blocks the last tree commit freed: punch them out of
    /// a file store (under the state lock, so none is handed out again before). Best effort:
    /// a file system that cannot punch keeps the space.
    pub(crate) fn punch_blocks(&self, mut freed: Vec<u64>) {
        if !self.dev.can_punch() || self.ephemeral || freed.is_empty() {
            return;
        }
        freed.sort_unstable();
        freed.dedup();
        let mut i = 0;
        while i < freed.len() {
            let mut j = i + 1;
            while j < freed.len() && freed[j] == freed[j - 1] + 1 {
                j += 1;
            }
            let (off, len) = (
                self.geo.slot_offset(freed[i] as u32),
                (j - i) as u64 * META_BLOCK,
            );
            if let Err(e) = self.dev.punch(off, len) {
                tracing::warn!(
                    "{}: cannot give freed space back to the host ({e}); it stays allocated",
                    self.path.display()
                );
                return;
            }
            i = j;
        }
    }

    /// Blocks kept back for the metadata: the nodes the open transaction may still dirty
    /// before its commit, the tables, and room for the commit's own space-map entries.
    pub fn reserve_blocks(&self, st: &State) -> u64 {
        self.reserve_for(st, st.tables_bound())
    }

    fn reserve_for(&self, st: &State, tables_bytes: u64) -> u64 {
        if self.ephemeral {
            return 16;
        }
        // An event is added after the check: room for one more of the longest.
        let events =
            State::events_bytes(&self.events.lock()) + 16 + crate::state::MAX_EVENT_LEN as u64;
        // Twice the limit: the open transaction may reach it while a commit is running.
        2 * self.dirty_limit(st)
            + (tables_bytes + events).div_ceil(META_BLOCK - CK_HEADER as u64)
            + 16
    }

    /// Refuse new metadata of about `extra` table bytes unless the space its commit needs is
    /// there (growing the store if it may): what is already there must always be able to
    /// commit, free and close, so only growth is refused.
    pub fn ensure_meta_room(&self, st: &mut State, extra: u64) -> Result<()> {
        loop {
            if st.meta.usable_free_blocks() >= self.reserve_for(st, st.tables_bound() + extra) {
                return Ok(());
            }
            if (!st.deferred_frees.is_empty() || self.commit_running()) && !self.ephemeral {
                // What records freed comes back with a commit.
                self.checkpoint_locked(st)?;
                if st.meta.usable_free_blocks() >= self.reserve_for(st, st.tables_bound() + extra) {
                    return Ok(());
                }
            }
            if !self.try_grow(st) {
                return Err(Error::NoSpace(format!(
                    "{}: the COW store has no room for more metadata; delete snapshots \
                     or give the store more space",
                    self.path.display()
                )));
            }
        }
    }

    /// Allocate a 4 KiB data block, growing the store if it can; None when the store is full.
    pub fn alloc_data_slot(&self, st: &mut State) -> Option<u32> {
        loop {
            if st.meta.usable_free_blocks() > self.reserve_blocks(st) {
                let s = match st.alloc_block() {
                    Ok(s) => s,
                    Err(e) => {
                        self.poison("allocate a block", &std::io::Error::other(e.to_string()));
                        None
                    }
                };
                self.check_low_space(st);
                return s;
            }
            // Freed blocks come back with a tree commit.
            if (!st.deferred_frees.is_empty() || self.commit_running())
                && !self.ephemeral
                && self.check_poison().is_ok()
            {
                let before = st.meta.usable_free_blocks();
                if let Err(e) = self.checkpoint_locked(st) {
                    tracing::warn!("could not commit to free space: {e}");
                }
                if st.meta.usable_free_blocks() > before {
                    continue;
                }
            }
            if !self.try_grow(st) {
                self.check_low_space(st);
                return None;
            }
        }
    }

    fn check_low_space(&self, st: &State) {
        let pct = self.sb.lock().low_space_percent as u64;
        let total = st.meta.blocks();
        // The metadata reserve is not free for data: it is what is left when a copy fails.
        let free = (st.meta.usable_free_blocks() + st.deferred_frees.len() as u64)
            .saturating_sub(self.reserve_blocks(st))
            + (total - st.meta.limit());
        let low = free * 100 < total * pct;
        if low && !self.low_space_raised.swap(true, Ordering::AcqRel) {
            self.event(
                EventKind::LowSpace,
                format!(
                    "COW store low on space: {} of {} bytes free (threshold {pct}%)",
                    free * META_BLOCK,
                    total * META_BLOCK
                ),
            );
        } else if !low {
            self.low_space_raised.store(false, Ordering::Release);
        }
    }

    pub fn is_low_space(&self) -> bool {
        self.low_space_raised.load(Ordering::Acquire)
    }
}
