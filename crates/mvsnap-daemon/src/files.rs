//! The volumes as files (FUSE): the daemon's side of `mvsnap-fuse`. An open file counts as a
//! user of its volume, as an NBD export does, so a snapshot with an open file is not deleted.

use std::sync::Arc;

use crate::users::Users;

pub struct UsersGate(pub Arc<Users>);

impl mvsnap_fuse::Gate for UsersGate {
    fn enter(&self, volume: &str) -> Result<Box<dyn Send + Sync>, String> {
        self.0
            .enter(volume)
            .map(|u| Box::new(u) as Box<dyn Send + Sync>)
    }
}
