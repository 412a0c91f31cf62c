//! Who has each volume open, so a delete never races an open: a volume that is open is not
//! deleted (unless forced, and then only once its users are gone), and a volume being deleted
//! cannot be opened. Front ends (NBD exports, FUSE files) count their users here.

use std::collections::HashMap;
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
}

impl Drop for Use {
    fn drop(&mut self) {
        let mut st = self.users.lock();
        if let Some(n) = st.open.get_mut(&self.volume) {
            *n -= 1;
            if *n == 0 {
                st.open.remove(&self.volume);
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
        let mut st = self.lock();
        if st.doomed.values().any(|d| d.covers(volume)) {
            return Err(format!("{volume} is being deleted"));
        }
        *st.open.entry(volume.to_string()).or_default() += 1;
        Ok(Use {
            users: self.clone(),
            volume: volume.to_string(),
        })
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
}
