//! One B+tree node in one 4 KiB block.
//!
//! ```text
//!  0  magic u32 "MVBT"     4  crc32c u32 of bytes 8..4096, salted with the block number
//!  8  kind u8 (1 leaf, 2 internal)   9  reserved u8   10  count u16   12  reserved u32
//! 16  txn u64 (the transaction that wrote it)   24  block u64 (where it belongs)
//! 32  keys: count x 16 bytes, then (from 32 + cap x 16) values: leaf 16 bytes, internal u64
//! ```
//! The salt and the block number catch a node read from, or written to, the wrong place.

use super::{BlockNo, PResult, PdataError, NODE_SIZE};

pub type Key = [u8; 16];
pub type Value = [u8; 16];

const MAGIC: u32 = 0x5442_564d; // "MVBT"
const SALT_NODE: u32 = 0x4e44_0004;
const HEADER: usize = 32;
/// Entries of a leaf: (4096 - 32) / (16 + 16).
pub const LEAF_CAP: usize = (NODE_SIZE - HEADER) / 32;
/// Children of an internal node: (4096 - 32) / (16 + 8).
pub const INTERNAL_CAP: usize = (NODE_SIZE - HEADER) / 24;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    /// Sorted keys and their values.
    Leaf { keys: Vec<Key>, vals: Vec<Value> },
    /// `keys[i]` is at most every key under `children[i]`, and every key there is below
    /// `keys[i + 1]`.
    Internal {
        keys: Vec<Key>,
        children: Vec<BlockNo>,
    },
}

fn salt(block: BlockNo) -> u32 {
    SALT_NODE ^ block as u32 ^ (block >> 32) as u32
}

impl Node {
    /// Drop spare capacity: a node changed in RAM grew its vectors by doubling (up to twice
    /// its bytes), and the cache counts each node it holds as one block.
    pub fn shrink_to_fit(&mut self) {
        match self {
            Node::Leaf { keys, vals } => {
                keys.shrink_to_fit();
                vals.shrink_to_fit();
            }
            Node::Internal { keys, children } => {
                keys.shrink_to_fit();
                children.shrink_to_fit();
            }
        }
    }

    /// The RAM a cached node takes: its vectors as allocated, the node, its `Arc` and the
    /// allocator's headers. A leaf split by random inserts is half to three quarters full, so
    /// most nodes take well under the 4 KiB of their block; a cache that counted blocks held
    /// a third fewer nodes than its budget pays for.
    pub fn heap_bytes(&self) -> usize {
        const FIXED: usize = std::mem::size_of::<Node>() + 16 + 3 * 16;
        FIXED
            + match self {
                Node::Leaf { keys, vals } => keys.capacity() * 16 + vals.capacity() * 16,
                Node::Internal { keys, children } => keys.capacity() * 16 + children.capacity() * 8,
            }
    }

    pub fn len(&self) -> usize {
        match self {
            Node::Leaf { keys, .. } | Node::Internal { keys, .. } => keys.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn keys(&self) -> &[Key] {
        match self {
            Node::Leaf { keys, .. } | Node::Internal { keys, .. } => keys,
        }
    }

    pub fn cap(&self) -> usize {
        match self {
            Node::Leaf { .. } => LEAF_CAP,
            Node::Internal { .. } => INTERNAL_CAP,
        }
    }

    pub fn encode(&self, block: BlockNo, txn: u64) -> Box<[u8; NODE_SIZE]> {
        let mut b = Box::new([0u8; NODE_SIZE]);
        let (kind, keys) = match self {
            Node::Leaf { keys, .. } => (1u8, keys),
            Node::Internal { keys, .. } => (2u8, keys),
        };
        assert!(keys.len() <= self.cap(), "node over capacity");
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[8] = kind;
        b[10..12].copy_from_slice(&(keys.len() as u16).to_le_bytes());
        b[16..24].copy_from_slice(&txn.to_le_bytes());
        b[24..32].copy_from_slice(&block.to_le_bytes());
        for (i, k) in keys.iter().enumerate() {
            b[HEADER + i * 16..][..16].copy_from_slice(k);
        }
        let vals_at = HEADER + self.cap() * 16;
        match self {
            Node::Leaf { vals, .. } => {
                for (i, v) in vals.iter().enumerate() {
                    b[vals_at + i * 16..][..16].copy_from_slice(v);
                }
            }
            Node::Internal { children, .. } => {
                for (i, c) in children.iter().enumerate() {
                    b[vals_at + i * 8..][..8].copy_from_slice(&c.to_le_bytes());
                }
            }
        }
        let c = crate::format::crc(salt(block), &b[8..]);
        b[4..8].copy_from_slice(&c.to_le_bytes());
        b
    }

    /// The transaction a node's block says wrote it (the caller decoded the block first).
    pub fn stamped_txn(b: &[u8]) -> u64 {
        u64::from_le_bytes(b[16..24].try_into().unwrap())
    }

    pub fn decode(block: BlockNo, b: &[u8]) -> PResult<Node> {
        let bad = |what: String| PdataError::Corrupt { block, what };
        if b.len() != NODE_SIZE {
            return Err(bad(format!("{} bytes, not a node", b.len())));
        }
        let word = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
        if word(0) != MAGIC {
            return Err(bad("not a tree node (no magic)".into()));
        }
        if crate::format::crc(salt(block), &b[8..]) != word(4) {
            return Err(bad("checksum mismatch".into()));
        }
        let at = u64::from_le_bytes(b[24..32].try_into().unwrap());
        if at != block {
            return Err(bad(format!("it says it belongs at block {at}")));
        }
        let n = u16::from_le_bytes([b[10], b[11]]) as usize;
        let key = |i: usize| -> Key { b[HEADER + i * 16..][..16].try_into().unwrap() };
        match b[8] {
            1 if n <= LEAF_CAP => {
                let vals_at = HEADER + LEAF_CAP * 16;
                Ok(Node::Leaf {
                    keys: (0..n).map(key).collect(),
                    vals: (0..n)
                        .map(|i| b[vals_at + i * 16..][..16].try_into().unwrap())
                        .collect(),
                })
            }
            2 if (1..=INTERNAL_CAP).contains(&n) => {
                let vals_at = HEADER + INTERNAL_CAP * 16;
                Ok(Node::Internal {
                    keys: (0..n).map(key).collect(),
                    children: (0..n)
                        .map(|i| u64::from_le_bytes(b[vals_at + i * 8..][..8].try_into().unwrap()))
                        .collect(),
                })
            }
            k => Err(bad(format!("kind {k} with {n} entries"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(i: u64) -> Key {
        let mut k = [0u8; 16];
        k[8..].copy_from_slice(&i.to_be_bytes());
        k
    }

    #[test]
    fn full_nodes_round_trip_and_damage_is_caught() {
        let leaf = Node::Leaf {
            keys: (0..LEAF_CAP as u64).map(k).collect(),
            vals: (0..LEAF_CAP as u64).map(|i| k(i * 3)).collect(),
        };
        let int = Node::Internal {
            keys: (0..INTERNAL_CAP as u64).map(k).collect(),
            children: (0..INTERNAL_CAP as u64).map(|i| i + 1000).collect(),
        };
        for n in [leaf, int] {
            let b = n.encode(77, 5);
            assert_eq!(Node::decode(77, &b[..]).unwrap(), n);
            // The same bytes at another block: refused.
            assert!(Node::decode(78, &b[..]).is_err());
            // One flipped bit anywhere: refused.
            for at in [0, 5, 9, 40, 2000, 4095] {
                let mut d = b.clone();
                d[at] ^= 1;
                assert!(Node::decode(77, &d[..]).is_err(), "flip at {at}");
            }
        }
        assert_eq!(LEAF_CAP, 127);
        assert_eq!(INTERNAL_CAP, 169);
    }
}
