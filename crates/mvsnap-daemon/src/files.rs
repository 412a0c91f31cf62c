//! The volumes as files (FUSE): the daemon's side of `mvsnap-fuse`. An open file counts as a
//! user of its volume, as an NBD export does, so a snapshot with an open file is not deleted;
//! unless forced, which cannot close the file but revokes it (its I/O fails from then on).

use std::sync::Arc;

use crate::users::{Use, Users};

pub struct UsersGate(pub Arc<Users>);

impl mvsnap_fuse::Gate for UsersGate {
    fn enter(&self, volume: &str) -> Result<Box<dyn mvsnap_fuse::UseGuard>, String> {
        self.0
            .enter_revocable(volume)
            .map(|u| Box::new(u) as Box<dyn mvsnap_fuse::UseGuard>)
    }
}

impl mvsnap_fuse::UseGuard for Use {
    fn revoked(&self) -> bool {
        Use::revoked(self)
    }
}
