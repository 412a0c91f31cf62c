//! Who has each volume open, so a delete never races an open: a volume that is open is not
//! deleted (unless forced, and then only once its users are gone), and a volume being deleted
//! cannot be opened. Front ends (NBD exports, FUSE files) count their users here.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The volumes a delete or an origin removal takes away.
#[derive(Clone, Debug)]
pub enum Doomed {
    /// One snapshot, `ORIGIN@TAG`.
    Snapshot(String),
    /// An origin and every snapshot of it.
    Origin(String),
}

impl std::fmt::Display for Doomed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Doomed::Snapshot(name) => write!(f, "snapshot {name}"),
            Doomed::Origin(id) => write!(f, "origin {id}"),
        }
    }
}

impl Doomed {
    /// Whether `volume` goes with it.
    pub fn covers(&self, volume: &str) -> bool {
        match self {
            Doomed::Snapshot(name) => volume == name,
            Doomed::Origin(id) => {
                volume == id
                    || volume
                        .strip_prefix(id.as_str())
                        .is_some_and(|r| r.starts_with('@'))
            }
        }
    }
}

#[derive(Default)]
struct State {
    open: HashMap<String, usize>,
    /// Uses that a forced delete may cut off (open files), by id: their volume and flag.
    revocable: HashMap<u64, (String, Arc<AtomicBool>)>,
    /// Deletes in progress, by a sequence number.
    doomed: HashMap<u64, Doomed>,
    next: u64,
}

#[derive(Default)]
pub struct Users {
    state: Mutex<State>,
    left: Condvar,
}

/// One user of a volume; dropping it ends the use.
pub struct Use {
    users: Arc<Users>,
    volume: String,
    /// Set when a forced delete cut this use off: it no longer counts, and its owner fails
    /// every later I/O.
    revoked: Arc<AtomicBool>,
    /// Its entry in `revocable`, if it may be cut off.
    id: Option<u64>,
}

impl Use {
    pub fn revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }
}

impl Drop for Use {
    fn drop(&mut self) {
        let mut st = self.users.lock();
        if let Some(id) = self.id {
            st.revocable.remove(&id);
        }
        // A revoked use stopped counting when it was revoked.
        if !self.revoked() {
            if let Some(n) = st.open.get_mut(&self.volume) {
                *n -= 1;
                if *n == 0 {
                    st.open.remove(&self.volume);
                }
            }
        }
        drop(st);
        self.users.left.notify_all();
    }
}

/// A delete in progress: opens of what it covers are refused until it is dropped.
pub struct Reservation {
    users: Arc<Users>,
    id: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.users.lock().doomed.remove(&self.id);
    }
}

impl Reservation {
    /// Wait until nobody uses what this reservation covers; false on timeout.
    pub fn wait_unused(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.users.lock();
        loop {
            let what = &st.doomed[&self.id];
            if !st.open.keys().any(|v| what.covers(v)) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self
                .users
                .left
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Users {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Count one more user of `volume`, unless a delete of it is in progress.
    pub fn enter(self: &Arc<Self>, volume: &str) -> Result<Use, String> {
        self.enter_as(volume, false)
    }

    /// [`Users::enter`] for a user that cannot be disconnected (an open file): a forced
    /// delete revokes it instead ([`Users::revoke`]).
    pub fn enter_revocable(self: &Arc<Self>, volume: &str) -> Result<Use, String> {
        self.enter_as(volume, true)
    }

    fn enter_as(self: &Arc<Self>, volume: &str, revocable: bool) -> Result<Use, String> {
        let mut st = self.lock();
        if st.doomed.values().any(|d| d.covers(volume)) {
            return Err(format!("{volume} is being deleted"));
        }
        *st.open.entry(volume.to_string()).or_default() += 1;
        let revoked = Arc::new(AtomicBool::new(false));
        let id = revocable.then(|| {
            let id = st.next;
            st.next += 1;
            st.revocable
                .insert(id, (volume.to_string(), revoked.clone()));
            id
        });
        Ok(Use {
            users: self.clone(),
            volume: volume.to_string(),
            revoked,
            id,
        })
    }

    /// Cut off the revocable uses of what `what` covers: they stop counting at once, and their
    /// owners fail every later I/O. Returns how many.
    pub fn revoke(&self, what: &Doomed) -> usize {
        let mut st = self.lock();
        let hit: Vec<(String, Arc<AtomicBool>)> = st
            .revocable
            .values()
            .filter(|(v, flag)| what.covers(v) && !flag.load(Ordering::Acquire))
            .cloned()
            .collect();
        for (volume, flag) in &hit {
            flag.store(true, Ordering::Release);
            if let Some(n) = st.open.get_mut(volume) {
                *n -= 1;
                if *n == 0 {
                    st.open.remove(volume);
                }
            }
        }
        drop(st);
        self.left.notify_all();
        hit.len()
    }

    /// Reserve `what` for a delete. Unless `force`, refused with the volumes in use when any
    /// is; with `force` the reservation is made anyway (new opens are refused) and the caller
    /// disconnects the users and waits for them to leave.
    pub fn reserve(
        self: &Arc<Self>,
        what: Doomed,
        force: bool,
    ) -> Result<Reservation, Vec<String>> {
        let mut st = self.lock();
        let mut busy: Vec<String> = st.open.keys().filter(|v| what.covers(v)).cloned().collect();
        if !busy.is_empty() && !force {
            busy.sort();
            return Err(busy);
        }
        let id = st.next;
        st.next += 1;
        st.doomed.insert(id, what);
        Ok(Reservation {
            users: self.clone(),
            id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_volume_is_not_reserved_and_a_reserved_one_is_not_opened() {
        let u = Arc::new(Users::default());
        let a = u.enter("d@a").unwrap();
        assert_eq!(
            u.reserve(Doomed::Snapshot("d@a".into()), false).err(),
            Some(vec!["d@a".to_string()])
        );
        assert_eq!(
            u.reserve(Doomed::Origin("d".into()), false).err(),
            Some(vec!["d@a".to_string()])
        );
        // Another origin whose name starts the same is not covered.
        let r = u.reserve(Doomed::Origin("d2".into()), false).unwrap();
        assert!(u.enter("d2@x").is_err());
        assert!(u.enter("d2").is_err());
        assert!(u.enter("d").is_ok());
        drop(r);
        assert!(u.enter("d2").is_ok());
        // Forced: new opens are refused, and it waits for the last user.
        let r = u.reserve(Doomed::Snapshot("d@a".into()), true).unwrap();
        assert!(u.enter("d@a").is_err());
        assert!(!r.wait_unused(Duration::from_millis(10)));
        let t = std::thread::spawn(move || drop(a));
        assert!(r.wait_unused(Duration::from_secs(10)));
        t.join().unwrap();
        drop(r);
        let _b = u.enter("d@a").unwrap();
    }

    #[test]
    fn a_forced_delete_revokes_open_files_and_stops_waiting_for_them() {
        let u = Arc::new(Users::default());
        let file = u.enter_revocable("d@a").unwrap();
        let other = u.enter_revocable("d@b").unwrap();
        let nbd = u.enter("d@a").unwrap();
        let r = u.reserve(Doomed::Snapshot("d@a".into()), true).unwrap();
        assert_eq!(u.revoke(&Doomed::Snapshot("d@a".into())), 1);
        assert!(file.revoked() && !other.revoked() && !nbd.revoked());
        // The NBD client still counts; the file no longer does.
        assert!(!r.wait_unused(Duration::from_millis(10)));
        drop(nbd);
        assert!(r.wait_unused(Duration::from_millis(10)));
        // Its late release counts nothing twice.
        drop(r);
        let again = u.enter("d@a").unwrap();
        drop(file);
        let r = u.reserve(Doomed::Snapshot("d@a".into()), false);
        assert!(
            r.is_err(),
            "the new user still counts after the revoked one left"
        );
        drop(again);
        assert!(u.reserve(Doomed::Snapshot("d@a".into()), false).is_ok());
        assert_eq!(u.revoke(&Doomed::Origin("d".into())), 1);
        assert!(other.revoked());
    }
}
