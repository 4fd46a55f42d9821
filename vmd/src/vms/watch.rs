//! Change generations: what `Watch` waits on.
//!
//! 1. The daemon's generation only grows. It starts at the start time in
//!    microseconds since the Unix epoch, so a generation a client got from
//!    an earlier run is always older than this run's first one and the
//!    client gets a full snapshot instead of a wrong "nothing changed".
//! 2. Events bump it: a systemd signal about a VM's unit, and vmd's own
//!    operations (accepted, finished). Each bump records the new
//!    generation as that VM's last change; a bump for "unknown which" (the
//!    bus went away, signals may be lost) marks every VM changed.
//! 3. Waiters hold a `tokio::sync::watch` receiver of the generation and
//!    check, when woken, whether a VM they watch changed; nothing ticks
//!    while nothing changes.
//! 4. [`Changes::enter`] caps concurrent watchers per identity; the slot is
//!    freed when the returned guard drops (the watch ended or its
//!    connection went away).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use vmd_proto::VmName;

/// Which VMs changed after a generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Changed {
    /// The caller's generation is not of this run (or is 0): it needs
    /// everything.
    Snapshot,
    /// Every VM may have changed (events were lost).
    All,
    /// These VMs changed (possibly none).
    Some(Vec<VmName>),
}

/// The change generations of this daemon run.
#[derive(Debug)]
pub struct Changes {
    first: u64,
    state: Mutex<State>,
    notify: watch::Sender<u64>,
}

#[derive(Debug)]
struct State {
    generation: u64,
    /// Each VM's last change.
    vms: HashMap<VmName, u64>,
    /// The last "everything may have changed".
    all: u64,
    /// Open watches per identity.
    watchers: HashMap<String, usize>,
}

/// Too many concurrent watches for one identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("at most {limit} concurrent watches per identity")]
pub struct TooManyWatchers {
    /// The cap.
    pub limit: usize,
}

impl Changes {
    /// A fresh run, its first generation taken from the clock.
    pub fn new() -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2));
        Self::starting_at(now.max(1))
    }

    /// A run whose first generation is `first` (at least 1).
    pub fn starting_at(first: u64) -> Self {
        let first = first.max(1);
        let (notify, _) = watch::channel(first);
        Self {
            first,
            state: Mutex::new(State {
                generation: first,
                vms: HashMap::new(),
                all: 0,
                watchers: HashMap::new(),
            }),
            notify,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the counters torn.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The generation now.
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Records a change of `vm` and wakes the waiters.
    pub fn bump(&self, vm: &VmName) {
        let generation = {
            let mut state = self.lock();
            state.generation += 1;
            let generation = state.generation;
            state.vms.insert(vm.clone(), generation);
            generation
        };
        self.notify.send_replace(generation);
    }

    /// Records that any VM may have changed (lost events) and wakes the
    /// waiters.
    pub fn bump_all(&self) {
        let generation = {
            let mut state = self.lock();
            state.generation += 1;
            state.all = state.generation;
            state.generation
        };
        self.notify.send_replace(generation);
    }

    /// A receiver woken on every bump.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.notify.subscribe()
    }

    /// What changed after `since`, and the generation it was judged at.
    pub fn since(&self, since: u64) -> (u64, Changed) {
        let state = self.lock();
        let now = state.generation;
        if since < self.first || since > now {
            return (now, Changed::Snapshot);
        }
        if state.all > since {
            return (now, Changed::All);
        }
        let mut names: Vec<VmName> = state
            .vms
            .iter()
            .filter(|(_, at)| **at > since)
            .map(|(name, _)| name.clone())
            .collect();
        names.sort();
        (now, Changed::Some(names))
    }

    /// Takes one of `identity`'s `limit` watch slots until the guard drops.
    ///
    /// # Errors
    /// [`TooManyWatchers`] when all are taken.
    pub fn enter(
        self: &Arc<Self>,
        identity: &str,
        limit: usize,
    ) -> Result<WatchSlot, TooManyWatchers> {
        let mut state = self.lock();
        let open = state.watchers.entry(identity.to_owned()).or_default();
        if *open >= limit {
            return Err(TooManyWatchers { limit });
        }
        *open += 1;
        Ok(WatchSlot {
            changes: Arc::clone(self),
            identity: identity.to_owned(),
        })
    }

    /// Open watches, all identities together.
    pub fn total_watchers(&self) -> usize {
        self.lock().watchers.values().sum()
    }

    /// Open watches of `identity`.
    pub fn watchers(&self, identity: &str) -> usize {
        self.lock().watchers.get(identity).copied().unwrap_or(0)
    }
}

impl Default for Changes {
    fn default() -> Self {
        Self::new()
    }
}

/// One open watch; frees its slot when dropped.
#[derive(Debug)]
pub struct WatchSlot {
    changes: Arc<Changes>,
    identity: String,
}

impl Drop for WatchSlot {
    fn drop(&mut self) {
        let mut state = self.changes.lock();
        if let Some(open) = state.watchers.get_mut(&self.identity) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                state.watchers.remove(&self.identity);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str) -> VmName {
        VmName::new(name).expect("valid")
    }

    #[test]
    fn generations_only_grow_and_name_what_changed() {
        let changes = Changes::starting_at(1000);
        assert_eq!(changes.since(0), (1000, Changed::Snapshot));
        assert_eq!(changes.since(1000), (1000, Changed::Some(vec![])));
        changes.bump(&vm("b"));
        changes.bump(&vm("a"));
        assert_eq!(
            changes.since(1000),
            (1002, Changed::Some(vec![vm("a"), vm("b")]))
        );
        assert_eq!(changes.since(1001), (1002, Changed::Some(vec![vm("a")])));
        assert_eq!(changes.since(1002), (1002, Changed::Some(vec![])));
        // From an earlier run (smaller) or from the future: a snapshot.
        assert_eq!(changes.since(999).1, Changed::Snapshot);
        assert_eq!(changes.since(5000).1, Changed::Snapshot);
        changes.bump_all();
        assert_eq!(changes.since(1002), (1003, Changed::All));
        assert_eq!(changes.since(1003), (1003, Changed::Some(vec![])));
    }

    #[tokio::test]
    async fn bumps_wake_subscribers() {
        let changes = Changes::starting_at(7);
        let mut rx = changes.subscribe();
        rx.borrow_and_update();
        changes.bump(&vm("a"));
        rx.changed().await.expect("sender alive");
        assert_eq!(*rx.borrow(), 8);
    }

    #[test]
    fn watch_slots_are_capped_per_identity_and_freed_on_drop() {
        let changes = Arc::new(Changes::starting_at(1));
        let first = changes.enter("gui", 2).expect("free");
        let _second = changes.enter("gui", 2).expect("free");
        assert_eq!(changes.enter("gui", 2).expect_err("full").limit, 2);
        let _other = changes.enter("admin", 2).expect("another identity");
        drop(first);
        assert_eq!(changes.watchers("gui"), 1);
        changes.enter("gui", 2).expect("freed");
    }
}
