//! The engine's volumes as NBD exports: origin `ID` and `ID@TAG` for each snapshot.

use std::io;
use std::sync::Arc;

use mvsnap_engine::{Store, Volume};

use crate::users::{Use, Users};
use mvsnap_nbd::{
    BlockSizes, Export, ExportInfo, ExportRegistry, Extent, OpenError, STATE_HOLE, STATE_ZERO,
};

pub struct EngineRegistry {
    pub store: Store,
    /// Open exports count as users, so a delete never races an open.
    pub users: Arc<Users>,
}

impl ExportRegistry for EngineRegistry {
    fn list(&self) -> Vec<ExportInfo> {
        let mut out: Vec<ExportInfo> = self
            .store
            .origins()
            .into_iter()
            .map(|o| ExportInfo {
                name: o.id.clone(),
                description: format!("origin {} ({} bytes)", o.path, o.size),
            })
            .collect();
        for s in self.store.snapshots() {
            let mut d = format!(
                "snapshot of {} taken {} UTC",
                s.parent,
                crate::display::utc_time(s.created)
            );
            if !s.memo.is_empty() {
                d.push_str(": ");
                d.push_str(&s.memo);
            }
            if s.writable {
                d.push_str(" [writable]");
            }
            out.push(ExportInfo {
                name: s.name,
                description: d,
            });
        }
        out
    }

    fn open(&self, name: &str) -> Result<Arc<dyn Export>, OpenError> {
        let user = self.users.enter(name).map_err(OpenError::Unavailable)?;
        match self.store.volume(name) {
            Ok(v) => Ok(Arc::new(EngineExport {
                vol: v,
                _user: user,
            })),
            Err(mvsnap_engine::Error::NotFound(_)) => Err(OpenError::NotFound),
            Err(e) => Err(OpenError::Unavailable(e.to_string())),
        }
    }
}

pub struct EngineExport {
    vol: Volume,
    _user: Use,
}

impl Export for EngineExport {
    fn size(&self) -> u64 {
        self.vol.size()
    }

    fn read_only(&self) -> bool {
        self.vol.read_only()
    }

    fn block_sizes(&self) -> BlockSizes {
        BlockSizes {
            minimum: 1,
            preferred: self.vol.block_size().max(4096),
            maximum: 32 << 20,
        }
    }

    /// A flush syncs the one shared origin file, or commits the store's whole journal: it
    /// covers writes made on every connection.
    fn can_multi_conn(&self) -> bool {
        true
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        Ok(self.vol.read_at(offset, buf)?)
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        Ok(self.vol.write_at(offset, data, fua)?)
    }

    fn flush(&self) -> io::Result<()> {
        Ok(self.vol.flush()?)
    }

    fn trim(&self, offset: u64, length: u64) -> io::Result<()> {
        Ok(self.vol.trim(offset, length)?)
    }

    fn fast_zero(&self) -> bool {
        self.vol.can_zero_fast()
    }

    fn write_zeroes(&self, offset: u64, length: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        Ok(self.vol.zero_range(offset, length, may_trim, fua)?)
    }

    fn block_status(&self, offset: u64, length: u64) -> io::Result<Vec<Extent>> {
        let ext = self.vol.block_status(offset, length)?;
        Ok(ext
            .into_iter()
            .map(|e| Extent {
                length: e.length,
                flags: if e.zero { STATE_HOLE | STATE_ZERO } else { 0 },
            })
            .collect())
    }
}
