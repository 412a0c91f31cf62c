//! A copy-on-write B+tree of 16-byte keys and 16-byte values in 4 KiB nodes.
//!
//! A [`Txn`] changes the tree by shadowing: a committed node is never written again; the first
//! change to it in a transaction copies it to a freshly allocated block, and its parent then
//! points at the copy (so the path from the root is copied too). Nodes created in the
//! transaction are changed in place until [`Txn::commit`] writes them. The previous root stays
//! readable, untouched, until the caller has made the new root durable (a superblock flip)
//! and only then reuses the blocks the commit released. A commit writes what the transaction
//! dirtied, never the whole tree.
//!
//! Removal merges a node that falls below a quarter full into a neighbour when both fit in
//! one node, and drops empty nodes, so space stays proportional to the entries.

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::Arc;

use super::cache::NodeCache;
use super::node::{Key, Node, Value, INTERNAL_CAP, LEAF_CAP};
use super::overlay::Overlay;
use super::{BlockNo, NodeIo, PResult, PdataError, NODE_SIZE};

/// Where a transaction gets blocks for its new nodes, and gives back the ones it drops.
pub trait BlockAlloc {
    fn alloc(&mut self) -> Option<BlockNo>;
    /// A block allocated in this same transaction that is no longer used: nothing durable
    /// points at it, so it is free at once.
    fn free_now(&mut self, block: BlockNo);
    /// A block of the committed version this transaction replaced or dropped: free in the new
    /// version, but not to be handed out again before the new root is durable (a crash
    /// would go back to the old root, which uses it).
    fn release(&mut self, block: BlockNo);
}

/// A node as a reader sees it: one the transaction holds, or a clean one from the cache.
pub enum NodeRef<'a> {
    Dirty(&'a Node),
    Clean(Arc<Node>),
}

impl Deref for NodeRef<'_> {
    type Target = Node;
    fn deref(&self) -> &Node {
        match self {
            NodeRef::Dirty(n) => n,
            NodeRef::Clean(n) => n,
        }
    }
}

/// Read access to one version of the tree.
pub trait View {
    fn root(&self) -> Option<BlockNo>;
    fn node(&self, block: BlockNo) -> PResult<NodeRef<'_>>;
    /// Entries not folded into the tree yet: [`get`], [`seek_ge`] and [`for_each_from`] see
    /// them first (an overlay entry hides the tree's of the same key).
    fn overlay(&self) -> Option<&Overlay> {
        None
    }
}

/// The nodes of a version being written by a commit (not durable, not in the cache yet):
/// readers and the next transaction see them as committed.
pub type FrozenNodes = HashMap<BlockNo, Arc<Node>>;

/// A node of the frozen version, or a clean one through the cache.
fn load_base(
    io: &dyn NodeIo,
    cache: &NodeCache,
    frozen: Option<&FrozenNodes>,
    block: BlockNo,
) -> PResult<Arc<Node>> {
    if let Some(n) = frozen.and_then(|f| f.get(&block)) {
        return Ok(n.clone());
    }
    load(io, cache, block)
}

/// Read a clean node through the cache.
fn load(io: &dyn NodeIo, cache: &NodeCache, block: BlockNo) -> PResult<Arc<Node>> {
    if let Some(n) = cache.get(block) {
        return Ok(n);
    }
    let n = Arc::new(read_node(io, block)?);
    cache.insert(block, n.clone());
    Ok(n)
}

/// A committed version of the tree, read-only.
pub struct Committed<'a> {
    pub io: &'a dyn NodeIo,
    pub cache: &'a NodeCache,
    pub root: Option<BlockNo>,
}

impl View for Committed<'_> {
    fn root(&self) -> Option<BlockNo> {
        self.root
    }
    fn node(&self, block: BlockNo) -> PResult<NodeRef<'_>> {
        load(self.io, self.cache, block).map(NodeRef::Clean)
    }
}

/// No real tree is this deep (127 x 169^11 entries); a damaged one that loops is stopped here
/// with an error instead of a hang or a stack overflow.
pub const MAX_DEPTH: u32 = 12;

fn too_deep(block: BlockNo) -> PdataError {
    PdataError::Corrupt {
        block,
        what: format!("the tree is deeper than {MAX_DEPTH} levels here: its nodes loop"),
    }
}

/// Room in a node's vector for a full node and the entry that splits it, reserved exactly
/// before an entry goes in: a vector read or cloned at its length would otherwise grow by
/// doubling, a full node's to twice the 4 KiB the cache counts for it.
fn room_for_entry<T>(v: &mut Vec<T>, cap: usize) {
    v.reserve_exact((cap + 1).saturating_sub(v.len()));
}

/// The entries from `mid` on, in a vector with room for a full node (see `room_for_entry`):
/// a right node starts with as little as a tenth of one and fills up.
fn split_tail<T>(v: &mut Vec<T>, mid: usize, cap: usize) -> Vec<T> {
    let mut tail = Vec::with_capacity(cap + 1);
    tail.extend(v.drain(mid..));
    tail
}

/// Whether `key`, going in at `i` of `keys`, would be the last of its run there: keys of one
/// key space and origin (the first four bytes) make a run.
fn ends_run(keys: &[Key], i: usize, key: &Key) -> bool {
    keys.get(i).is_none_or(|next| next[..4] != key[..4])
}

/// The child of an internal node whose range holds `key` (the first one for smaller keys).
fn child_index(keys: &[Key], key: &Key) -> usize {
    match keys.binary_search(key) {
        Ok(i) => i,
        Err(0) => 0,
        Err(i) => i - 1,
    }
}

pub fn get(v: &dyn View, key: &Key) -> PResult<Option<Value>> {
    if let Some(val) = v.overlay().and_then(|o| o.get(key)) {
        return Ok(Some(*val));
    }
    tree_get(v, key)
}

/// [`get`] in the tree alone.
fn tree_get(v: &dyn View, key: &Key) -> PResult<Option<Value>> {
    let Some(mut b) = v.root() else {
        return Ok(None);
    };
    for _ in 0..=MAX_DEPTH {
        let n = v.node(b)?;
        match &*n {
            Node::Leaf { keys, vals } => {
                return Ok(keys.binary_search(key).ok().map(|i| vals[i]));
            }
            Node::Internal { keys, children } => b = children[child_index(keys, key)],
        }
    }
    Err(too_deep(b))
}

/// The first entry whose key is at or after `key`: a read at any depth stays one descent
/// (plus a step right when the subtree it lands in holds only smaller keys).
pub fn seek_ge(v: &dyn View, key: &Key) -> PResult<Option<(Key, Value)>> {
    let tree = tree_seek_ge(v, key)?;
    let Some(buffered) = v.overlay().and_then(|o| o.first_from(key)) else {
        return Ok(tree);
    };
    Ok(Some(match tree {
        Some(t) if t.0 < buffered.0 => t,
        _ => buffered,
    }))
}

/// [`seek_ge`] in the tree alone.
fn tree_seek_ge(v: &dyn View, key: &Key) -> PResult<Option<(Key, Value)>> {
    let mut found = None;
    if let Some(root) = v.root() {
        walk(v, root, key, 0, &mut Default::default(), &mut |k, val| {
            found = Some((*k, *val));
            false
        })?;
    }
    Ok(found)
}

/// Call `f` on every entry from `from` on, in key order, until it returns false.
pub fn for_each_from(
    v: &dyn View,
    from: &Key,
    f: &mut dyn FnMut(&Key, &Value) -> bool,
) -> PResult<()> {
    let Some(overlay) = v.overlay().filter(|o| !o.is_empty()) else {
        return tree_for_each_from(v, from, f);
    };
    // Two sorted streams merged; the overlay's entry wins a tie.
    let mut buffered = overlay.range_from(from).peekable();
    let mut more = true;
    tree_for_each_from(v, from, &mut |k, val| {
        while let Some(&(bk, bv)) = buffered.peek() {
            if bk > k {
                break;
            }
            buffered.next();
            more = f(bk, bv);
            if !more || bk == k {
                return more;
            }
        }
        more = f(k, val);
        more
    })?;
    if more {
        for (bk, bv) in buffered {
            if !f(bk, bv) {
                break;
            }
        }
    }
    Ok(())
}

/// [`for_each_from`] in the tree alone.
fn tree_for_each_from(
    v: &dyn View,
    from: &Key,
    f: &mut dyn FnMut(&Key, &Value) -> bool,
) -> PResult<()> {
    if let Some(root) = v.root() {
        walk(v, root, from, 0, &mut Default::default(), f)?;
    }
    Ok(())
}

/// The end of the key range of the leaf that holds (or would hold) `key`: the next
/// separator on its path (`None`: it is the last leaf). Tree alone.
fn leaf_bound(v: &dyn View, key: &Key) -> PResult<Option<Key>> {
    let mut bound = None;
    let Some(mut b) = v.root() else {
        return Ok(None);
    };
    for _ in 0..=MAX_DEPTH {
        let n = v.node(b)?;
        match &*n {
            Node::Leaf { .. } => return Ok(bound),
            Node::Internal { keys, children } => {
                let i = child_index(keys, key);
                if let Some(next) = keys.get(i + 1) {
                    bound = Some(*next);
                }
                b = children[i];
            }
        }
    }
    Err(too_deep(b))
}

/// Descend to the leaf the fold takes next, so that a [`ProbeView`] notes the nodes it
/// would read: only when one more entry makes the overlay fold (else no fold reads it).
pub fn probe_fold(v: &dyn View) -> PResult<()> {
    if let Some(k) = v
        .overlay()
        .filter(|o| o.full())
        .and_then(|o| o.next_to_fold())
    {
        tree_get(v, &k)?;
    }
    Ok(())
}

/// In-order walk of the subtree at `b` from `from`; false once `f` asked to stop. A node met
/// twice (a damaged tree that shares or loops) is an error: a walk costs at most one visit
/// per node.
fn walk(
    v: &dyn View,
    b: BlockNo,
    from: &Key,
    depth: u32,
    seen: &mut std::collections::HashSet<BlockNo>,
    f: &mut dyn FnMut(&Key, &Value) -> bool,
) -> PResult<bool> {
    if depth > MAX_DEPTH {
        return Err(too_deep(b));
    }
    if !seen.insert(b) {
        return Err(PdataError::Corrupt {
            block: b,
            what: "reached twice in the tree".into(),
        });
    }
    let n = v.node(b)?;
    match &*n {
        Node::Leaf { keys, vals } => {
            let start = keys.partition_point(|k| k < from);
            for i in start..keys.len() {
                if !f(&keys[i], &vals[i]) {
                    return Ok(false);
                }
            }
            Ok(true)
        }
        Node::Internal { keys, children } => {
            let children = children.clone();
            let start = child_index(keys, from);
            drop(n);
            for c in &children[start..] {
                if !walk(v, *c, from, depth + 1, seen, f)? {
                    return Ok(false);
                }
            }
            Ok(true)
        }
    }
}

/// What [`check`] found: the blocks the tree uses (for the space map) and its entries.
#[derive(Debug, Default)]
pub struct TreeReport {
    pub blocks: Vec<BlockNo>,
    pub entries: u64,
    pub depth: u32,
}

/// Verify the whole tree: every node decodes, keys are sorted and within their parent's
/// bounds, leaves all at one depth, no node is empty (but an empty root leaf), no block is
/// used twice.
pub fn check(v: &dyn View) -> PResult<TreeReport> {
    let mut r = TreeReport::default();
    let Some(root) = v.root() else {
        return Ok(r);
    };
    let mut seen = std::collections::HashSet::new();
    let mut leaf_depth = None;
    check_node(
        v,
        root,
        None,
        None,
        1,
        true,
        &mut seen,
        &mut leaf_depth,
        &mut r,
    )?;
    r.depth = leaf_depth.unwrap_or(0);
    r.blocks = seen.into_iter().collect();
    r.blocks.sort_unstable();
    Ok(r)
}

#[allow(clippy::too_many_arguments)]
fn check_node(
    v: &dyn View,
    b: BlockNo,
    lo: Option<&Key>,
    hi: Option<&Key>,
    depth: u32,
    is_root: bool,
    seen: &mut std::collections::HashSet<BlockNo>,
    leaf_depth: &mut Option<u32>,
    r: &mut TreeReport,
) -> PResult<()> {
    let bad = |what: String| PdataError::Corrupt { block: b, what };
    if depth > MAX_DEPTH {
        return Err(too_deep(b));
    }
    if !seen.insert(b) {
        return Err(bad("reached twice in the tree".into()));
    }
    let n = v.node(b)?;
    let keys = n.keys();
    if keys.is_empty() && !is_root {
        return Err(bad("an empty node".into()));
    }
    if keys.windows(2).any(|w| w[0] >= w[1]) {
        return Err(bad("keys out of order".into()));
    }
    if let (Some(lo), Some(first)) = (lo, keys.first()) {
        if first < lo {
            return Err(bad("a key below its parent's bound".into()));
        }
    }
    if let (Some(hi), Some(last)) = (hi, keys.last()) {
        if last >= hi {
            return Err(bad("a key at or above the next subtree's bound".into()));
        }
    }
    match &*n {
        Node::Leaf { keys, .. } => {
            r.entries += keys.len() as u64;
            match leaf_depth {
                None => *leaf_depth = Some(depth),
                Some(d) if *d != depth => return Err(bad("leaves at different depths".into())),
                _ => {}
            }
        }
        Node::Internal { keys, children } => {
            let (keys, children) = (keys.clone(), children.clone());
            drop(n);
            for i in 0..children.len() {
                let lo = Some(&keys[i]);
                let hi = keys.get(i + 1).or(hi);
                check_node(
                    v,
                    children[i],
                    lo,
                    hi,
                    depth + 1,
                    false,
                    seen,
                    leaf_depth,
                    r,
                )?;
            }
        }
    }
    Ok(())
}

/// What a walk of a damaged tree could still read ([`salvage`]).
#[derive(Debug, Default)]
pub struct Salvage {
    /// Every entry of the nodes that could be read, in key order.
    pub entries: Vec<(Key, Value)>,
    /// Every block the tree points at, read or not (they stay in use until a rebuilt tree
    /// replacing them is durable).
    pub blocks: Vec<BlockNo>,
    /// The key ranges under nodes that could not be read or were inconsistent.
    pub lost: Vec<LostRange>,
}

/// Keys `lo..hi` (`None`: from the first / to the last key) of a subtree that is gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LostRange {
    pub lo: Option<Key>,
    pub hi: Option<Key>,
    pub block: BlockNo,
    pub why: String,
}

/// Walk the tree as far as it can be read, as thin_repair does: a node that does not decode,
/// is reached twice, or whose keys leave its parent's bounds is skipped with the key range its
/// parent gave it; everything else is kept. Never fails: a damaged root loses everything.
pub fn salvage(v: &dyn View) -> Salvage {
    let mut s = Salvage::default();
    if let Some(root) = v.root() {
        let mut seen = std::collections::HashSet::new();
        salvage_node(v, root, None, None, 1, &mut seen, &mut s);
    }
    s.blocks.sort_unstable();
    s.blocks.dedup();
    s
}

fn salvage_node(
    v: &dyn View,
    b: BlockNo,
    lo: Option<&Key>,
    hi: Option<&Key>,
    depth: u32,
    seen: &mut std::collections::HashSet<BlockNo>,
    s: &mut Salvage,
) {
    let lose = |s: &mut Salvage, why: String| {
        s.lost.push(LostRange {
            lo: lo.copied(),
            hi: hi.copied(),
            block: b,
            why,
        })
    };
    if depth > MAX_DEPTH {
        return lose(s, "deeper than any real tree".into());
    }
    if !seen.insert(b) {
        return lose(s, "reached twice".into());
    }
    s.blocks.push(b);
    let n = match v.node(b) {
        Ok(n) => n,
        Err(e) => return lose(s, e.to_string()),
    };
    let keys = n.keys();
    let in_bounds = keys.windows(2).all(|w| w[0] < w[1])
        && lo.is_none_or(|lo| keys.first().is_none_or(|f| f >= lo))
        && hi.is_none_or(|hi| keys.last().is_none_or(|l| l < hi));
    if !in_bounds {
        return lose(s, "keys out of order or outside the parent's bounds".into());
    }
    match &*n {
        Node::Leaf { keys, vals } => {
            s.entries
                .extend(keys.iter().copied().zip(vals.iter().copied()));
        }
        Node::Internal { keys, children } => {
            let (keys, children) = (keys.clone(), children.clone());
            drop(n);
            for i in 0..children.len() {
                let child_hi = keys.get(i + 1).or(hi);
                salvage_node(v, children[i], Some(&keys[i]), child_hi, depth + 1, seen, s);
            }
        }
    }
}

/// What a commit leaves to its caller.
#[derive(Debug)]
pub struct Commit {
    pub root: Option<BlockNo>,
    /// Nodes written.
    pub written: usize,
}

/// A transaction between calls: what [`Txn::suspend`] leaves and [`Txn::resume`] takes back.
/// The store keeps one open between tree commits; journal records are applied to it.
#[derive(Default)]
pub struct Pending {
    pub root: Option<BlockNo>,
    pub txn: u64,
    dirty: HashMap<BlockNo, Node>,
}

impl Pending {
    pub fn new(root: Option<BlockNo>, txn: u64) -> Pending {
        Pending {
            root,
            txn,
            dirty: HashMap::new(),
        }
    }

    /// Nodes changed since the last commit (they stay in RAM until it).
    pub fn dirty_nodes(&self) -> usize {
        self.dirty.len()
    }

    /// Write the dirty nodes to their own blocks and leave them to the cache as clean ones,
    /// without a commit: for a store that never commits (ephemeral), so its RAM stays bounded.
    /// A node changed again after this is shadowed to a new block like any clean one. On an
    /// error the transaction has lost nodes: the caller must treat it as broken.
    pub fn spill(&mut self, io: &dyn NodeIo, cache: &NodeCache) -> PResult<usize> {
        let nodes: FrozenNodes = std::mem::take(&mut self.dirty)
            .into_iter()
            .map(|(b, mut n)| {
                n.shrink_to_fit();
                (b, Arc::new(n))
            })
            .collect();
        let written = write_frozen(io, &nodes, self.txn)?;
        for (b, n) in nodes {
            cache.insert(b, n);
        }
        Ok(written)
    }

    /// Close the transaction: its dirty nodes, to be written by a commit while the next
    /// transaction reads (and shadows) them.
    pub fn freeze(self) -> FrozenNodes {
        self.dirty
            .into_iter()
            .map(|(b, n)| (b, Arc::new(n)))
            .collect()
    }
}

/// Write a frozen version's nodes, in block order (neighbouring nodes go out as neighbouring
/// writes), stamped with `txn`.
pub fn write_frozen(io: &dyn NodeIo, nodes: &FrozenNodes, txn: u64) -> PResult<usize> {
    let mut blocks: Vec<BlockNo> = nodes.keys().copied().collect();
    blocks.sort_unstable();
    for &b in &blocks {
        let bytes = nodes[&b].encode(b, txn);
        io.write_block(b, &bytes[..])
            .map_err(|source| PdataError::Io { block: b, source })?;
    }
    Ok(blocks.len())
}

/// Read access to a suspended transaction: its dirty nodes first, then the frozen version's,
/// then the cache.
pub struct PendingView<'a> {
    pub io: &'a dyn NodeIo,
    pub cache: &'a NodeCache,
    pub frozen: Option<&'a FrozenNodes>,
    pub pending: &'a Pending,
    pub overlay: Option<&'a Overlay>,
}

impl View for PendingView<'_> {
    fn root(&self) -> Option<BlockNo> {
        self.pending.root
    }
    fn overlay(&self) -> Option<&Overlay> {
        self.overlay
    }
    fn node(&self, block: BlockNo) -> PResult<NodeRef<'_>> {
        match self.pending.dirty.get(&block) {
            Some(n) => Ok(NodeRef::Dirty(n)),
            None => load_base(self.io, self.cache, self.frozen, block).map(NodeRef::Clean),
        }
    }
}

/// A suspended transaction's view as far as RAM holds it: a node that would have to be read
/// from the device is noted instead (with its cache stamp) and the lookup fails with
/// [`PdataError::NotCached`]. Run under the tree's lock; the caller then reads the noted
/// nodes without it ([`read_node`]) and probes again, one level deeper each time.
pub struct ProbeView<'a> {
    pub view: PendingView<'a>,
    missed: std::cell::RefCell<Vec<(BlockNo, u32)>>,
}

impl<'a> ProbeView<'a> {
    pub fn new(view: PendingView<'a>) -> ProbeView<'a> {
        ProbeView {
            view,
            missed: Default::default(),
        }
    }

    /// The nodes lookups missed, each once, with the stamps [`NodeCache::insert_fetched`]
    /// needs.
    pub fn into_missed(self) -> Vec<(BlockNo, u32)> {
        let mut m = self.missed.into_inner();
        m.sort_unstable();
        m.dedup_by_key(|x| x.0);
        m
    }
}

impl View for ProbeView<'_> {
    fn root(&self) -> Option<BlockNo> {
        self.view.root()
    }
    fn overlay(&self) -> Option<&Overlay> {
        self.view.overlay
    }
    fn node(&self, block: BlockNo) -> PResult<NodeRef<'_>> {
        let v = &self.view;
        if let Some(n) = v.pending.dirty.get(&block) {
            return Ok(NodeRef::Dirty(n));
        }
        if let Some(n) = v.frozen.and_then(|f| f.get(&block)) {
            return Ok(NodeRef::Clean(n.clone()));
        }
        if let Some(n) = v.cache.probe(block) {
            return Ok(NodeRef::Clean(n));
        }
        self.missed.borrow_mut().push((block, v.cache.stamp(block)));
        Err(PdataError::NotCached(block))
    }
}

/// Read and decode the node at `block`, bypassing the cache (a miss of [`load`], or of a
/// [`ProbeView`], whose callers cache it with [`NodeCache::insert_fetched`]).
pub fn read_node(io: &dyn NodeIo, block: BlockNo) -> PResult<Node> {
    let mut buf = vec![0u8; NODE_SIZE];
    io.read_block(block, &mut buf)
        .map_err(|source| PdataError::Io { block, source })?;
    Node::decode(block, &buf)
}

/// One transaction on the tree.
pub struct Txn<'a, A: BlockAlloc> {
    io: &'a dyn NodeIo,
    cache: &'a NodeCache,
    /// The version a commit is writing: committed as far as this transaction is concerned.
    frozen: Option<&'a FrozenNodes>,
    alloc: &'a mut A,
    txn: u64,
    root: Option<BlockNo>,
    dirty: HashMap<BlockNo, Node>,
    /// Entries buffered instead of inserted ([`Txn::insert_buffered`]), if the caller keeps
    /// them (see [`Overlay`]).
    overlay: Option<&'a mut Overlay>,
}

impl<A: BlockAlloc> View for Txn<'_, A> {
    fn root(&self) -> Option<BlockNo> {
        self.root
    }
    fn overlay(&self) -> Option<&Overlay> {
        self.overlay.as_deref()
    }
    fn node(&self, block: BlockNo) -> PResult<NodeRef<'_>> {
        match self.dirty.get(&block) {
            Some(n) => Ok(NodeRef::Dirty(n)),
            None => load_base(self.io, self.cache, self.frozen, block).map(NodeRef::Clean),
        }
    }
}

impl<'a, A: BlockAlloc> Txn<'a, A> {
    /// Start changing the version at `root`; `txn` is stamped into the nodes it writes.
    pub fn new(
        io: &'a dyn NodeIo,
        cache: &'a NodeCache,
        alloc: &'a mut A,
        root: Option<BlockNo>,
        txn: u64,
    ) -> Txn<'a, A> {
        Txn {
            io,
            cache,
            frozen: None,
            alloc,
            txn,
            root,
            dirty: HashMap::new(),
            overlay: None,
        }
    }

    /// Go on with a suspended transaction, on top of the `frozen` version if a commit is
    /// writing one, with the caller's overlay.
    pub fn resume(
        io: &'a dyn NodeIo,
        cache: &'a NodeCache,
        frozen: Option<&'a FrozenNodes>,
        alloc: &'a mut A,
        p: Pending,
        overlay: Option<&'a mut Overlay>,
    ) -> Txn<'a, A> {
        Txn {
            io,
            cache,
            frozen,
            alloc,
            txn: p.txn,
            root: p.root,
            dirty: p.dirty,
            overlay,
        }
    }

    /// Stop here, keeping every change, to resume later.
    pub fn suspend(self) -> Pending {
        Pending {
            root: self.root,
            txn: self.txn,
            dirty: self.dirty,
        }
    }

    /// The allocator, for what the caller keeps in step with the tree (the space map).
    pub fn allocator(&mut self) -> &mut A {
        self.alloc
    }

    fn new_block(&mut self) -> PResult<BlockNo> {
        let b = self.alloc.alloc().ok_or(PdataError::NoSpace)?;
        // A reused block: whatever the cache held for it is another node's old content.
        self.cache.remove(b);
        Ok(b)
    }

    /// The node at `b`, to be changed: in place if this transaction made it, else a copy in
    /// a new block (the old one is released at commit).
    fn shadow(&mut self, b: BlockNo) -> PResult<(BlockNo, Node)> {
        if let Some(n) = self.dirty.remove(&b) {
            return Ok((b, n));
        }
        let n = (*load_base(self.io, self.cache, self.frozen, b)?).clone();
        let nb = self.new_block()?;
        self.alloc.release(b);
        Ok((nb, n))
    }

    /// The node at `b`, which goes away (merged into another, or empty).
    fn take(&mut self, b: BlockNo) -> PResult<Node> {
        if let Some(n) = self.dirty.remove(&b) {
            self.alloc.free_now(b);
            return Ok(n);
        }
        let n = (*load_base(self.io, self.cache, self.frozen, b)?).clone();
        self.alloc.release(b);
        Ok(n)
    }

    /// Insert or replace, in the tree; returns the value it replaced.
    pub fn insert(&mut self, key: Key, val: Value) -> PResult<Option<Value>> {
        let buffered = self.overlay.as_mut().and_then(|o| o.remove(&key));
        let old = self.tree_insert(key, val)?;
        Ok(buffered.or(old))
    }

    /// Insert a key the tree does not hold into the overlay, if there is one (else the
    /// tree): it reaches the tree when the fold passes it ([`Txn::fold`]).
    pub fn insert_buffered(&mut self, key: Key, val: Value) -> PResult<()> {
        match self.overlay.as_mut() {
            Some(o) => {
                o.insert(key, val);
            }
            None => {
                self.tree_insert(key, val)?;
            }
        }
        Ok(())
    }

    /// Move the overlay's entries of one leaf into it, up to `max` of them: the first leaf at
    /// or after the overlay's cursor that has any. Returns how many moved (0: none left).
    pub fn fold(&mut self, max: usize) -> PResult<usize> {
        let Some(first) = self.overlay.as_ref().and_then(|o| o.next_to_fold()) else {
            return Ok(0);
        };
        let bound = leaf_bound(&*self, &first)?;
        let batch = self
            .overlay
            .as_mut()
            .expect("checked")
            .take_range(first, bound, max);
        for &(k, v) in &batch {
            self.tree_insert(k, v)?;
        }
        Ok(batch.len())
    }

    fn tree_insert(&mut self, key: Key, val: Value) -> PResult<Option<Value>> {
        let Some(root) = self.root else {
            let b = self.new_block()?;
            self.dirty.insert(
                b,
                Node::Leaf {
                    keys: vec![key],
                    vals: vec![val],
                },
            );
            self.root = Some(b);
            return Ok(None);
        };
        let (nb, split, old) = self.insert_rec(root, key, val, 0)?;
        self.root = Some(nb);
        if let Some((sep, right)) = split {
            let first = self.dirty[&nb].keys()[0];
            let b = self.new_block()?;
            self.dirty.insert(
                b,
                Node::Internal {
                    keys: vec![first, sep],
                    children: vec![nb, right],
                },
            );
            self.root = Some(b);
        }
        Ok(old)
    }

    #[allow(clippy::type_complexity)]
    fn insert_rec(
        &mut self,
        b: BlockNo,
        key: Key,
        val: Value,
        depth: u32,
    ) -> PResult<(BlockNo, Option<(Key, BlockNo)>, Option<Value>)> {
        if depth > MAX_DEPTH {
            return Err(too_deep(b));
        }
        let (nb, mut node) = self.shadow(b)?;
        let cap = node.cap();
        let mut old = None;
        // Where the new entry went in, if it is the last of its run in this node (what follows
        // it, if anything, is another key space or origin): the run is being filled in key
        // order here (a sequential overwrite's copy-outs, a sweep of the overlay).
        let mut appended_at = None;
        match &mut node {
            Node::Leaf { keys, vals } => match keys.binary_search(&key) {
                Ok(i) => old = Some(std::mem::replace(&mut vals[i], val)),
                Err(i) => {
                    appended_at = ends_run(keys, i, &key).then_some(i);
                    room_for_entry(keys, cap);
                    room_for_entry(vals, cap);
                    keys.insert(i, key);
                    vals.insert(i, val);
                }
            },
            Node::Internal { keys, children } => {
                let i = child_index(keys, &key);
                let (cb, split, o) = self.insert_rec(children[i], key, val, depth + 1)?;
                old = o;
                children[i] = cb;
                if key < keys[i] {
                    keys[i] = key;
                }
                if let Some((sep, right)) = split {
                    appended_at = ends_run(keys, i + 1, &sep).then_some(i + 1);
                    room_for_entry(keys, cap);
                    room_for_entry(children, cap);
                    keys.insert(i + 1, sep);
                    children.insert(i + 1, right);
                }
            }
        }
        let split = if node.len() > cap {
            // Halves, unless a run is filled in key order: halves would then stay half full
            // for good (nothing comes back to the left one), so the run's entries up to the
            // new one stay on the left, up to nine tenths of it, leaving room for a few later
            // inserts (PostgreSQL's fillfactor for rightmost splits).
            let mid = match appended_at {
                Some(i) => (i + 1).min(cap * 9 / 10),
                None => node.len() / 2,
            };
            let right = match &mut node {
                Node::Leaf { keys, vals } => Node::Leaf {
                    keys: split_tail(keys, mid, cap),
                    vals: split_tail(vals, mid, cap),
                },
                Node::Internal { keys, children } => Node::Internal {
                    keys: split_tail(keys, mid, cap),
                    children: split_tail(children, mid, cap),
                },
            };
            let sep = right.keys()[0];
            let rb = self.new_block()?;
            self.dirty.insert(rb, right);
            Some((sep, rb))
        } else {
            None
        };
        self.dirty.insert(nb, node);
        Ok((nb, split, old))
    }

    /// Remove `key` (from the overlay and the tree); returns its value. A key that is not
    /// there changes nothing.
    pub fn remove(&mut self, key: &Key) -> PResult<Option<Value>> {
        let buffered = self.overlay.as_mut().and_then(|o| o.remove(key));
        let old = self.tree_remove(key)?;
        Ok(buffered.or(old))
    }

    fn tree_remove(&mut self, key: &Key) -> PResult<Option<Value>> {
        let Some(old) = tree_get(&*self, key)? else {
            return Ok(None);
        };
        let root = self.root.expect("a key was found");
        let nb = self.remove_rec(root, key, 0)?;
        self.root = Some(nb);
        // An empty root goes; an internal root with one child hands over to it.
        while let Some(r) = self.root {
            let Some(n) = self.dirty.get(&r) else { break };
            let next = match n {
                Node::Leaf { keys, .. } if keys.is_empty() => None,
                Node::Internal { children, .. } if children.len() == 1 => Some(children[0]),
                _ => break,
            };
            self.take(r)?;
            self.root = next;
        }
        Ok(Some(old))
    }

    fn remove_rec(&mut self, b: BlockNo, key: &Key, depth: u32) -> PResult<BlockNo> {
        if depth > MAX_DEPTH {
            return Err(too_deep(b));
        }
        let (nb, mut node) = self.shadow(b)?;
        match &mut node {
            Node::Leaf { keys, vals } => {
                let Ok(i) = keys.binary_search(key) else {
                    return Err(PdataError::Corrupt {
                        block: b,
                        what: "a key its lookup found is not in its leaf".into(),
                    });
                };
                keys.remove(i);
                vals.remove(i);
            }
            Node::Internal { keys, children } => {
                let i = child_index(keys, key);
                let cb = self.remove_rec(children[i], key, depth + 1)?;
                children[i] = cb;
                let child = &self.dirty[&cb];
                let (len, cap) = (child.len(), child.cap());
                if len == 0 {
                    self.take(cb)?;
                    keys.remove(i);
                    children.remove(i);
                } else if len < cap / 4 && children.len() > 1 {
                    // Merge with a neighbour if both fit in one node.
                    let j = if i + 1 < children.len() { i + 1 } else { i - 1 };
                    let sib_len = self.node(children[j])?.len();
                    if len + sib_len <= cap {
                        let (l, r) = (i.min(j), i.max(j));
                        let right = self.take(children[r])?;
                        let (lb, mut left) = self.shadow(children[l])?;
                        match (&mut left, right) {
                            (
                                Node::Leaf { keys: lk, vals: lv },
                                Node::Leaf { keys: rk, vals: rv },
                            ) => {
                                lk.extend(rk);
                                lv.extend(rv);
                            }
                            (
                                Node::Internal {
                                    keys: lk,
                                    children: lc,
                                },
                                Node::Internal {
                                    keys: rk,
                                    children: rc,
                                },
                            ) => {
                                lk.extend(rk);
                                lc.extend(rc);
                            }
                            _ => {
                                return Err(PdataError::Corrupt {
                                    block: nb,
                                    what: "siblings of different kinds".into(),
                                })
                            }
                        }
                        self.dirty.insert(lb, left);
                        children[l] = lb;
                        keys.remove(r);
                        children.remove(r);
                    }
                }
            }
        }
        self.dirty.insert(nb, node);
        Ok(nb)
    }

    /// Write every node this transaction changed to its (new) block and make it the clean
    /// version in the cache. The caller then syncs, flips the root in the superblock, syncs,
    /// and only then frees `released`.
    pub fn commit(self) -> PResult<Commit> {
        let written = self.dirty.len();
        let mut blocks: Vec<BlockNo> = self.dirty.keys().copied().collect();
        // In block order: neighbouring nodes go out as neighbouring writes.
        blocks.sort_unstable();
        let mut dirty = self.dirty;
        for b in blocks {
            let node = dirty.remove(&b).expect("listed");
            let bytes = node.encode(b, self.txn);
            self.io
                .write_block(b, &bytes[..])
                .map_err(|source| PdataError::Io { block: b, source })?;
            self.cache.insert(b, Arc::new(node));
        }
        Ok(Commit {
            root: self.root,
            written,
        })
    }
}

#[cfg(test)]
mod tests;

/// Capacities, for callers sizing things.
pub const CAPACITY: (usize, usize) = (LEAF_CAP, INTERNAL_CAP);
