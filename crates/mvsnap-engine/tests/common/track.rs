//! The model of a volume across crashes: what it held at its last flush and what was written
//! since.

/// A volume whose recent writes may or may not survive a crash.
#[derive(Clone)]
pub struct Track {
    /// Content at the last returned flush (or creation).
    pub flushed: Vec<u8>,
    /// Content as the engine reads it now.
    pub cur: Vec<u8>,
    /// Writes since `flushed` (including ones whose call failed: they may have happened).
    pub since: Vec<(u64, Vec<u8>)>,
}

impl Track {
    pub fn new(content: Vec<u8>) -> Track {
        Track {
            flushed: content.clone(),
            cur: content,
            since: Vec::new(),
        }
    }

    pub fn write(&mut self, off: u64, data: &[u8], completed: bool) {
        if completed {
            self.cur[off as usize..off as usize + data.len()].copy_from_slice(data);
        }
        self.since.push((off, data.to_vec()));
    }

    pub fn flushed(&mut self) {
        self.flushed = self.cur.clone();
        self.since.clear();
    }

    /// A FUA write returned: its bytes are durable (earlier writes it covers wholly can no
    /// longer show through; ones it covers in part still may, elsewhere).
    pub fn flushed_range(&mut self, off: u64, data: &[u8]) {
        let (lo, hi) = (off as usize, off as usize + data.len());
        self.flushed[lo..hi].copy_from_slice(data);
        self.since
            .retain(|(o, d)| !(*o as usize >= lo && *o as usize + d.len() <= hi));
    }

    /// Every byte is its flushed value or one some write since then put there.
    pub fn explain(&self, got: &[u8]) -> Result<(), (usize, String)> {
        if got.len() != self.flushed.len() {
            return Err((0, format!("length {} != {}", got.len(), self.flushed.len())));
        }
        for (i, &b) in got.iter().enumerate() {
            if !self.explains_byte(i, b) {
                return Err((
                    i,
                    format!(
                        "byte {i} (block {}) is {b:#04x}: neither its flushed value {:#04x} nor \
                         any of the {} writes since the last flush",
                        i / 4096,
                        self.flushed[i],
                        self.since.len()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Byte `i` reads `b`: its flushed value, or one some write since then put there.
    pub fn explains_byte(&self, i: usize, b: u8) -> bool {
        b == self.flushed[i]
            || self.since.iter().any(|(off, d)| {
                let off = *off as usize;
                i >= off && i < off + d.len() && d[i - off] == b
            })
    }
}
