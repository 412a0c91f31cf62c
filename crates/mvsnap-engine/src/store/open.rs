//! Opening a store: format, the superblocks, recovery (the newest durable tree version, then
//! the journal replayed on top), the origins.

use super::tables::read_tables;
use super::*;

impl Inner {
    /// An origin found shorter than recorded lost data behind mvsnap's back: its snapshots read
    /// the lost range from it, so they are invalidated, durably and with the reason (they are
    /// not served wrong data). The origin itself stays unavailable until it is put right.
    fn invalidate_shrunk_origins(&self) -> Result<()> {
        let mut st = self.state.write();
        let shrunk: Vec<(u32, String, u64, u64)> = st
            .origins
            .values()
            .filter_map(|o| {
                let found = o.found_size.filter(|&f| f < o.size)?;
                Some((o.no, o.id.clone(), o.size, found))
            })
            .collect();
        for (no, id, size, found) in shrunk {
            let ids: Vec<u64> = st
                .snaps
                .values()
                .filter(|s| s.origin == no && s.state == SnapshotState::Valid)
                .map(|s| s.id)
                .collect();
            if ids.is_empty() {
                continue;
            }
            let reason = format!(
                "origin {id} shrank behind mvsnap's back from {size} to {found} bytes: the data \
                 these snapshots shared with it is gone"
            );
            self.invalidate(&mut st, no, &ids, &reason, &[])?;
            self.event(EventKind::SnapshotInvalidated, reason);
        }
        let seq = self.appended_seq();
        drop(st);
        self.wait_durable(seq)
    }

    /// Say that a superblock copy is damaged (a warning, an event, `check`), and on a writable
    /// open rewrite it from the good one so the store has two copies again.
    fn report_superblock_damage(&self, damage: &[(u64, String)], repair: bool) -> Result<()> {
        for (off, what) in damage {
            let mut what = format!("{}: {what}", self.path.display());
            if repair {
                let good = self.sb.lock().encode();
                self.store_write(&good, *off)?;
                self.store_sync()?;
                what.push_str("; rewritten from the good copy");
            }
            self.event(EventKind::Corruption, what.clone());
            self.superblock_damage.lock().push(what);
        }
        Ok(())
    }
}

pub(super) fn read_superblocks(dev: &dyn BlockDev, path: &Path) -> Result<Superblock> {
    read_superblocks_checked(dev, path).map(|(sb, _)| sb)
}

/// The newest valid superblock, and the copies that failed their checks (offset, why).
fn read_superblocks_checked(
    dev: &dyn BlockDev,
    path: &Path,
) -> Result<(Superblock, Vec<(u64, String)>)> {
    let len = dev.len().map_err(|e| Error::io("stat", path, e))?;
    if len < 2 * META_BLOCK {
        // Too short for both superblocks: truncated if what is left starts like a store.
        let mut head = vec![0u8; len.min(8) as usize];
        dev.read_at(&mut head, 0)
            .map_err(|e| Error::io("read", path, e))?;
        if head == format::SB_MAGIC {
            return Err(Error::corrupt(
                path,
                format!("store is truncated: {len} bytes, shorter than its superblocks"),
            ));
        }
        return Err(Error::NotAStore { path: path.into() });
    }
    let mut best: Option<Superblock> = None;
    let mut errors = Vec::new();
    let mut any_magic = false;
    for off in SB_OFFSETS {
        let mut buf = vec![0u8; META_BLOCK as usize];
        dev.read_at(&mut buf, off)
            .map_err(|e| Error::io("read", path, e))?;
        any_magic |= &buf[..8] == format::SB_MAGIC;
        match Superblock::decode(&buf) {
            Ok(Some(sb)) => {
                if best.as_ref().is_none_or(|b| sb.sb_seq > b.sb_seq) {
                    best = Some(sb);
                }
            }
            Ok(None) => {}
            Err(e) => errors.push((
                off,
                format!("superblock copy at byte {off} is damaged: {e}"),
            )),
        }
    }
    match best {
        Some(sb) => {
            if sb.version != FORMAT_VERSION {
                return Err(Error::Version {
                    path: path.into(),
                    found: sb.version,
                    supported: FORMAT_VERSION,
                });
            }
            Ok((sb, errors))
        }
        None if any_magic => Err(Error::corrupt(
            path,
            errors
                .into_iter()
                .map(|(_, e)| e)
                .collect::<Vec<_>>()
                .join("; "),
        )),
        None => Err(Error::NotAStore { path: path.into() }),
    }
}

impl Store {
    /// Create a new, empty store on a file (created or resized) or a block device.
    pub fn format(path: &Path, opts: &FormatOptions) -> Result<()> {
        if let Some(size) = opts
            .size
            .filter(|&s| opts.max_size != 0 && opts.max_size < s)
        {
            return Err(Error::InvalidArgument(format!(
                "--max-size {} is smaller than --size {size}",
                opts.max_size
            )));
        }
        let exists = path.exists();
        if let Some(size) = opts.size {
            // Refused before anything is created or changed.
            Self::format_geometry(size, size.max(opts.max_size))?;
        }
        if !exists {
            File::create(path).map_err(|e| Error::io("create", path, e))?;
        }
        let dev = FileDev::open(path, true).map_err(|e| Error::io("open", path, e))?;
        if !try_lock(dev.file(), true).map_err(|e| Error::io("lock", path, e))? {
            return Err(Error::Locked { path: path.into() });
        }
        if exists && !opts.force {
            match read_superblocks(&dev, path) {
                Err(Error::NotAStore { .. }) => {}
                _ => return Err(Error::StoreExists { path: path.into() }),
            }
            if let Some(what) =
                crate::signature::find_data(&dev).map_err(|e| Error::io("read", path, e))?
            {
                return Err(Error::HoldsData {
                    path: path.into(),
                    what,
                });
            }
        }
        let size = if dev.can_grow() {
            // A file keeps its size unless a bigger one is asked for: formatting never shrinks,
            // whatever the file held (the user may have meant another file).
            let cur = dev.len().map_err(|e| Error::io("stat", path, e))?;
            let want = match opts.size {
                None if cur > 0 => cur,
                None => FormatOptions::DEFAULT_SIZE,
                Some(asked) if asked < cur => {
                    return Err(Error::WouldShrink {
                        path: path.into(),
                        current: cur,
                        asked,
                    })
                }
                Some(asked) => asked,
            };
            dev.grow(want).map_err(|e| Error::io("allocate", path, e))?;
            want
        } else {
            dev.len().map_err(|e| Error::io("stat", path, e))?
        };
        let max_len = if dev.can_grow() {
            size.max(opts.max_size)
        } else {
            size
        };
        let (geo, max_blocks) = Self::format_geometry(size, max_len)?;
        // Wipe the first journal block so nothing of an old store can ever look valid.
        dev.write_at(&vec![0u8; META_BLOCK as usize], JOURNAL_OFFSET)
            .map_err(|e| Error::io("write", path, e))?;
        let mut sb = Superblock {
            version: FORMAT_VERSION,
            uuid: {
                // A version-4 UUID.
                let mut u: [u8; 16] = rand::random();
                u[6] = (u[6] & 0x0f) | 0x40;
                u[8] = (u[8] & 0x3f) | 0x80;
                u
            },
            geo,
            max_size: if dev.can_grow() { opts.max_size } else { 0 },
            low_space_percent: opts.low_space_percent,
            sb_seq: 0,
            epoch: rand::random::<u32>() as u64,
            journal_seq: 1,
            checkpoint: None,
            store_len: size,
        };
        // The metadata: an empty tree and space map, and empty tables.
        let epoch = sb.epoch;
        let shared: Arc<dyn BlockDev> = Arc::new(dev);
        let ioerr = |e: crate::pdata::PdataError| {
            Error::io(
                "write the metadata of",
                path,
                std::io::Error::other(e.to_string()),
            )
        };
        let mut meta = crate::pdata::meta::Meta::format_at(
            shared.clone(),
            geo.data_start,
            max_blocks,
            1 << 20,
            [epoch, 1, u64::MAX, 0, 0, 0, 0, 0],
        )
        .map_err(ioerr)?;
        meta.set_limit(geo.slots_for_len(size));
        let mut st = State::new(geo, meta);
        let stream = st.serialize_tables(&[]);
        let (blocks, writes) = table_blocks(&mut st, epoch, &stream)
            .map_err(ioerr)?
            .ok_or_else(|| Error::InvalidArgument("store too small".into()))?;
        for (offset, bytes) in &writes {
            shared
                .write_at(bytes, *offset)
                .map_err(|e| Error::io("write", path, e))?;
        }
        st.meta
            .commit([
                epoch,
                1,
                blocks[0],
                stream.len() as u64,
                format::crc(format::SALT_CHECKPOINT, &stream) as u64,
                0,
                0,
                0,
            ])
            .map_err(ioerr)?;
        // Both copies, so a stale copy of an older store can never win.
        for _ in 0..2 {
            sb.sb_seq += 1;
            shared
                .write_at(&sb.encode(), SB_OFFSETS[(sb.sb_seq % 2) as usize])
                .map_err(|e| Error::io("write", path, e))?;
        }
        shared.sync().map_err(|e| Error::io("sync", path, e))?;
        Ok(())
    }

    /// The geometry of a store of `size` bytes that may grow to `max_len`, and the blocks its
    /// space map covers; refused if it is too small or too big. Format v2 allocates 4 KiB
    /// blocks, data and metadata alike.
    fn format_geometry(size: u64, max_len: u64) -> Result<(Geometry, u64)> {
        let geo = Geometry::new(BLOCK, Geometry::default_journal_len(size))
            .map_err(Error::InvalidArgument)?;
        for (what, len) in [("size", size), ("--max-size", max_len)] {
            if geo.slots_for_len(len) > MAX_SLOTS {
                return Err(Error::InvalidArgument(format!(
                    "store {what} {len} is too big: at most {} bytes",
                    geo.data_start + MAX_SLOTS * BLOCK as u64
                )));
            }
        }
        let max_blocks = geo.slots_for_len(max_len);
        let fixed = crate::pdata::meta::Meta::fixed_blocks(max_blocks);
        if geo.slots_for_len(size) < fixed + 32 {
            return Err(Error::InvalidArgument(format!(
                "store size {size} is too small: it needs at least {} bytes",
                geo.data_start + (fixed + 32) * BLOCK as u64
            )));
        }
        Ok((geo, max_blocks))
    }

    /// Open a store file or device, recovering from the journal.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Store> {
        let dev = FileDev::open(path, !opts.read_only)
            .map_err(|e| Error::io("open", path, e))?
            .discarding(opts.discard);
        if !try_lock(dev.file(), !opts.read_only).map_err(|e| Error::io("lock", path, e))? {
            return Err(Error::Locked { path: path.into() });
        }
        let lock = dev
            .file()
            .try_clone()
            .map_err(|e| Error::io("open", path, e))?;
        Self::open_with(Arc::new(dev), Some(lock), Arc::new(FileOpener), opts)
    }

    /// Open through any block-I/O backend (tests use a crash simulator here).
    pub fn open_with(
        dev: Arc<dyn BlockDev>,
        lock: Option<File>,
        opener: Arc<dyn DeviceOpener>,
        opts: &OpenOptions,
    ) -> Result<Store> {
        let dev = crate::blockdev::FailStop::wrap(dev);
        let path = dev.path().to_path_buf();
        // Recovery must judge what is on the device, not what the page cache still shows: after
        // a failed sync (a poisoned store, then a restart in the same boot) the cache holds
        // writes the device never got, and replay would vouch for them.
        dev.drop_cache()
            .map_err(|e| Error::io("drop the cache of", &path, e))?;
        let (sb, sb_damage) = read_superblocks_checked(&*dev, &path)?;
        let geo = sb.geo;
        let len = dev.len().map_err(|e| Error::io("stat", &path, e))?;
        if len < geo.data_start + geo.chunk_size as u64 {
            return Err(Error::corrupt(
                &path,
                format!(
                    "store is truncated: {len} bytes, its data area starts at {}",
                    geo.data_start
                ),
            ));
        }
        // 1. The tree's newest durable version, and the tables it points at.
        let cache_bytes = opts.cache_bytes.unwrap_or(DEFAULT_CACHE_BYTES).max(1 << 20);
        let mut meta = crate::pdata::meta::Meta::open_at(dev.clone(), geo.data_start, cache_bytes)
            .map_err(|e| {
                if len < sb.store_len {
                    Error::corrupt(
                        &path,
                        format!(
                            "store is truncated: {len} bytes, it had {}: metadata: {e}",
                            sb.store_len
                        ),
                    )
                } else {
                    Error::corrupt(&path, format!("metadata: {e}"))
                }
            })?;
        // Blocks past the end of a file not grown that far are never handed out.
        meta.set_limit(geo.slots_for_len(len));
        if let Some(n) = opts.overlay_entries {
            meta.set_overlay_entries(n);
        }
        let mut user = meta.user();
        // Only a clean close vouches for the origins' page cache (format::ORIGINS_CLEAN).
        let origins_clean = user[7] == format::ORIGINS_CLEAN && !opts.ephemeral;
        if opts.ephemeral {
            // An ephemeral session writes its origins but never a header: one that vouches for
            // their cache must stop before it starts (same tree, same journal position).
            if user[7] == format::ORIGINS_CLEAN && !opts.read_only {
                user[7] = 0;
                meta.commit(user).map_err(|e| {
                    Error::io(
                        "write the metadata header of",
                        &path,
                        std::io::Error::other(e.to_string()),
                    )
                })?;
            }
            meta.set_sync(false);
        }
        let (epoch, journal_seq, first_table, table_len, table_crc, journal_start) =
            (user[0], user[1], user[2], user[3], user[4] as u32, user[6]);
        // What refers past the end of a shorter file says first that the store is truncated.
        let store_len = sb.store_len.max(user[5]);
        let truncated = |e: Error| match e {
            Error::Corrupt { path, what } if len < store_len => Error::Corrupt {
                path,
                what: format!("store is truncated: {len} bytes, it had {store_len}: {what}"),
            },
            e => e,
        };
        let (stream, table_blocks) =
            read_tables(&*dev, &path, geo, &meta, first_table, table_len, table_crc)
                .map_err(truncated)?;
        let (mut st, events) = State::deserialize_tables(geo, meta, &stream)
            .map_err(|e| truncated(Error::corrupt(&path, format!("tables: {e}"))))?;
        st.table_blocks = table_blocks;
        st.ephemeral = opts.ephemeral;
        let mut sb = sb;
        sb.epoch = epoch;
        sb.journal_seq = journal_seq;

        // 2. The journal.
        let (groups, next_seq) = journal::scan(
            geo.journal_len,
            sb.epoch,
            sb.journal_seq,
            journal_start,
            &mut |off, buf| dev.read_at(buf, JOURNAL_OFFSET + off),
        )
        .map_err(|e| Error::io("read journal", &path, e))?;
        let ngroups = groups.len();
        let mut replayed = 0u64;
        let mut last_seq = sb.journal_seq - 1;
        // Every data block the records name is taken first: replay's own tree changes allocate
        // nodes, and must not land on a block a later record names. The blocks of records not
        // replayed (a torn tail) are given back after.
        let mut named: Vec<(u64, u32)> = Vec::new();
        for g in &groups {
            for (seq, rec) in &g.records {
                if let Record::Preserve { slot, .. } | Record::MapWrite { slot, .. } = rec {
                    if *slot != crate::state::ZERO_SLOT {
                        let ok = st
                            .meta
                            .claim_block(*slot as u64)
                            .map_err(|e| Error::corrupt(&path, format!("metadata: {e}")))?;
                        if !ok {
                            return Err(truncated(Error::corrupt(
                                &path,
                                format!(
                                    "journal record {seq}: block {slot} is used twice or lies \
                                     past the end of the store"
                                ),
                            )));
                        }
                        named.push((*seq, *slot));
                    }
                }
            }
        }
        'replay: for (gi, g) in groups.into_iter().enumerate() {
            // Only the last group may be one whose sync never completed: verify its data.
            let verify = gi + 1 == ngroups;
            for (seq, rec) in g.records {
                if verify && !data_intact(&*dev, geo, &rec)? {
                    tracing::info!(
                        seq,
                        "journal tail: data of a record never became durable; stopping replay"
                    );
                    break 'replay;
                }
                st.apply(&rec, seq).map_err(|e| {
                    truncated(Error::corrupt(&path, format!("journal record {seq}: {e}")))
                })?;
                replayed += 1;
                last_seq = seq;
            }
        }
        for (seq, slot) in named {
            if seq > last_seq {
                st.meta
                    .free_block(slot as u64)
                    .map_err(|e| Error::corrupt(&path, format!("metadata: {e}")))?;
            }
        }
        let _ = next_seq;
        st.unsettled_slots.clear();

        // 3. The origins.
        for o in st.origins.values_mut() {
            o.dev = open_origin(
                &*opener,
                &o.path,
                &o.id,
                o.size,
                !opts.read_only,
                !origins_clean,
            );
            if o.dev.is_err() {
                o.found_size = opener
                    .open(Path::new(&o.path), false)
                    .and_then(|d| d.len())
                    .ok()
                    .filter(|&found| found != o.size);
            }
        }
        if opts.ephemeral && st.snaps.values().any(|s| s.state != SnapshotState::Hidden) {
            return Err(Error::Busy(format!(
                "{}: --ephemeral needs a store without persistent snapshots; delete them first",
                path.display()
            )));
        }

        let journal = JournalWriter::new(sb.epoch, last_seq + 1, geo.journal_len, journal_start);
        let inner = Arc::new(Inner {
            path: path.clone(),
            dev,
            _lock: lock,
            opener,
            geo,
            ephemeral: opts.ephemeral,
            read_only: opts.read_only,
            state: RwLock::new(st),
            sb: Mutex::new(sb),
            journal: Mutex::new(journal),
            commit: Mutex::new(CommitState {
                durable_seq: last_seq,
                leader: false,
            }),
            commit_cv: Condvar::new(),
            settled_seq: AtomicU64::new(last_seq),
            poisoned: AtomicBool::new(false),
            poison_msg: Mutex::new(String::new()),
            events: Mutex::new(Vec::new()),
            events_total: AtomicU64::new(events.len() as u64),
            events_cv: Condvar::new(),
            low_space_raised: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            epoch_fresh: AtomicBool::new(false),
            origin_errors: Mutex::new(HashMap::new()),
            superblock_damage: Mutex::new(Vec::new()),
            dirty: AtomicBool::new(false),
            // A read-only open writes no header: nothing to mark. (An ephemeral one cleared
            // the mark above: `origins_clean` is false for it.)
            origins_marked_unclean: AtomicBool::new(!origins_clean || opts.read_only),
            closing_clean: AtomicBool::new(false),
            flusher: Mutex::new(None),
            inflight: Mutex::new(None),
            copies_done: AtomicU64::new(0),
            copy_mx: Mutex::new(()),
            copy_cv: Condvar::new(),
            finished: Mutex::new(Vec::new()),
            finished_len: std::sync::atomic::AtomicUsize::new(0),
            committer_cv: Condvar::new(),
            committer: Mutex::new(None),
            writeback: Writeback::new(),
            reclaimer: Default::default(),
            cache_nodes: cache_bytes / META_BLOCK,
        });
        inner.events.lock().extend(events);
        inner.report_superblock_damage(&sb_damage, !opts.read_only && !opts.ephemeral)?;
        if !opts.read_only && !opts.ephemeral {
            inner.invalidate_shrunk_origins()?;
        }
        if !opts.read_only && !opts.ephemeral {
            let mut st = inner.state.write();
            if replayed > 0 {
                // Fold the replayed records into a checkpoint: a new epoch, an empty journal.
                inner.checkpoint_locked(&mut st)?;
            }
            // Otherwise the new epoch starts with the first record (`log`).
        }
        if !opts.read_only && !opts.ephemeral {
            spawn_flusher(&inner);
            crate::commit::spawn_committer(&inner)
                .map_err(|e| Error::io("start the committer thread for", &path, e))?;
            crate::reclaim::spawn_reclaimer(&inner)
                .map_err(|e| Error::io("start the reclaim thread for", &path, e))?;
            inner.queue_dead_ranges(&inner.state.read());
            inner
                .writeback
                .spawn_workers(Arc::downgrade(&inner))
                .map_err(|e| Error::io("start write-behind threads for", &path, e))?;
        }
        if len < store_len {
            tracing::warn!(
                "{}: the store is {len} bytes, it was grown to {store_len} (a power cut lost the \
                 size change); nothing refers past its end, so it opens at its size",
                path.display()
            );
        }
        tracing::debug!(replayed, "store opened");
        let handles = Arc::new(Handles {
            inner: inner.clone(),
        });
        Ok(Store { inner, handles })
    }
}

fn open_origin(
    opener: &dyn DeviceOpener,
    path: &str,
    id: &str,
    size: u64,
    writable: bool,
    drop_cache: bool,
) -> Result<Arc<dyn BlockDev>, String> {
    let dev = opener
        .open(Path::new(path), writable)
        .map_err(|e| format!("origin {id}: cannot open {path}: {e}"))?;
    // As for the store: unless the last session closed cleanly, reads (copy-outs, clients')
    // must see the device, not pages a failed sync left in the cache.
    if drop_cache {
        dev.drop_cache()
            .map_err(|e| format!("origin {id}: {path}: dropping its cache: {e}"))?;
    }
    let found = dev.len().map_err(|e| format!("origin {id}: {path}: {e}"))?;
    if found != size {
        return Err(Error::OriginSizeChanged {
            id: id.to_string(),
            recorded: size,
            found,
        }
        .to_string());
    }
    Ok(crate::blockdev::FailStop::wrap(dev))
}

/// For a record of the last journal group: is the data it vouches for really on disk?
fn data_intact(dev: &dyn BlockDev, geo: Geometry, rec: &Record) -> Result<bool> {
    let (slot, bits, crc) = match rec {
        Record::Preserve {
            slot, bits, crc, ..
        } => (*slot, *bits, *crc),
        Record::MapWrite {
            slot,
            data_bits,
            crc,
            ..
        } => (*slot, *data_bits, *crc),
        _ => return Ok(true),
    };
    if slot == crate::state::ZERO_SLOT {
        return Ok(true); // nothing was written: the blocks read as zeroes
    }
    if (slot as u64) >= geo.slots_for_len(dev.len().unwrap_or(0)) {
        return Ok(false);
    }
    Ok(crate::volume::blocks_crc(dev, geo, slot, bits)
        .map(|c| c == crc)
        .unwrap_or(false))
}
