//! The tables (origins, snapshots, events, dead nodes) as a chain of metadata blocks: written
//! by each tree commit, read at open.

use super::*;

/// Writes of the tables' blocks: (byte offset in the store, block).
pub(crate) type TableWrites = Vec<(u64, Vec<u8>)>;

/// The tables' stream as a chain of fresh blocks, allocated in the open transaction: the
/// blocks, and their writes. None: no room (nothing allocated).
pub(crate) fn table_blocks(
    st: &mut State,
    stamp: u64,
    stream: &[u8],
) -> std::result::Result<Option<(Vec<u64>, TableWrites)>, crate::pdata::PdataError> {
    Ok(alloc_table_blocks(st, stream.len())?.map(|blocks| {
        let writes = table_writes(st.geo, stamp, &blocks, stream);
        (blocks, writes)
    }))
}

/// Fresh blocks, in the open transaction, for a tables stream of `len` bytes. None: no room
/// (nothing allocated).
pub(crate) fn alloc_table_blocks(
    st: &mut State,
    len: usize,
) -> std::result::Result<Option<Vec<u64>>, crate::pdata::PdataError> {
    let n = table_block_count(len);
    let mut blocks = Vec::with_capacity(n);
    for _ in 0..n {
        match st.meta.alloc_block()? {
            Some(b) => blocks.push(b),
            None => {
                for b in blocks {
                    st.meta.free_block(b)?;
                }
                return Ok(None);
            }
        }
    }
    Ok(Some(blocks))
}

/// Blocks of a tables stream of `len` bytes.
pub(crate) fn table_block_count(len: usize) -> usize {
    len.div_ceil(META_BLOCK as usize - CK_HEADER).max(1)
}

/// The writes of `stream` as the chain of `blocks` (as many as [`table_block_count`] says).
pub(crate) fn table_writes(
    geo: Geometry,
    stamp: u64,
    blocks: &[u64],
    stream: &[u8],
) -> TableWrites {
    let payload = META_BLOCK as usize - CK_HEADER;
    debug_assert_eq!(blocks.len(), table_block_count(stream.len()));
    stream
        .chunks(payload)
        .enumerate()
        .map(|(i, piece)| {
            let next = blocks.get(i + 1).map_or(NO_SLOT, |&b| b as u32);
            (
                geo.slot_offset(blocks[i] as u32),
                table_block(stamp, i, next, piece),
            )
        })
        .collect()
}

/// One block of the tables' chain: a header (magic, checksum, the stamp of the commit that
/// wrote it, index, next block, payload length) and its piece of the stream.
fn table_block(stamp: u64, index: usize, next: u32, piece: &[u8]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(CK_HEADER + piece.len());
    buf.extend_from_slice(&CK_MAGIC.to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&stamp.to_le_bytes());
    buf.extend_from_slice(&(index as u32).to_le_bytes());
    buf.extend_from_slice(&next.to_le_bytes());
    buf.extend_from_slice(&(piece.len() as u32).to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(piece);
    let c = format::crc(format::SALT_CHECKPOINT, &buf[8..]);
    buf[4..8].copy_from_slice(&c.to_le_bytes());
    buf
}

/// The tables of the durable version: a chain of blocks, each with its own checksum, and
/// one over the whole stream in the metadata header.
pub(super) fn read_tables(
    dev: &dyn BlockDev,
    path: &Path,
    geo: Geometry,
    meta: &crate::pdata::meta::Meta,
    first: u64,
    len: u64,
    crc: u32,
) -> Result<(Vec<u8>, Vec<u64>)> {
    let mut stream = Vec::with_capacity(len as usize);
    let mut blocks = Vec::new();
    let mut block = first;
    let payload = META_BLOCK as usize - CK_HEADER;
    let mut buf = vec![0u8; META_BLOCK as usize];
    let mut tab_epoch = None;
    while (stream.len() as u64) < len || blocks.is_empty() {
        if block >= meta.limit() || blocks.len() as u64 > meta.limit() {
            return Err(Error::corrupt(
                path,
                format!("tables block {block} lies past the end of the store"),
            ));
        }
        let want = (len as usize - stream.len()).min(payload);
        let blk = &mut buf[..CK_HEADER + want];
        dev.read_at(blk, geo.slot_offset(block as u32))
            .map_err(|e| Error::io("read the tables of", path, e))?;
        let magic = u32::from_le_bytes(blk[0..4].try_into().unwrap());
        let c = u32::from_le_bytes(blk[4..8].try_into().unwrap());
        let e = u64::from_le_bytes(blk[8..16].try_into().unwrap());
        let idx = u32::from_le_bytes(blk[16..20].try_into().unwrap());
        let next = u32::from_le_bytes(blk[20..24].try_into().unwrap());
        let plen = u32::from_le_bytes(blk[24..28].try_into().unwrap()) as usize;
        if magic != CK_MAGIC
            || plen != want
            || idx as usize != blocks.len()
            || format::crc(format::SALT_CHECKPOINT, &blk[8..]) != c
        {
            return Err(Error::corrupt(
                path,
                format!("tables block {block} is damaged (checksum or header mismatch)"),
            ));
        }
        if *tab_epoch.get_or_insert(e) != e {
            return Err(Error::corrupt(path, "tables blocks of different commits"));
        }
        stream.extend_from_slice(&blk[CK_HEADER..]);
        blocks.push(block);
        block = next as u64;
    }
    if format::crc(format::SALT_CHECKPOINT, &stream) != crc {
        return Err(Error::corrupt(path, "tables checksum mismatch"));
    }
    Ok((stream, blocks))
}
