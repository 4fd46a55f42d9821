//! Freezes made by someone else wake watchers.
//!
//! Ghaf's givc pauses a VM by freezing its unit's cgroup, and systemd up
//! to v255 sends no signal for a freeze (systemd issue 31115): the live
//! model would learn of it only at the next read, and a `Watch` (the
//! panel's, `vmctl top`'s) would not wake. The kernel does tell: a change
//! of a cgroup's `cgroup.events` (`frozen 0/1`) is an inotify
//! `IN_MODIFY` on that file.
//!
//! 1. While a VM's unit is active, its cgroup's `cgroup.events` is
//!    watched (one inotify instance for all VMs, made when the first VM
//!    runs); when the unit stops, or its cgroup changes, the watch goes.
//! 2. An event reads the file again and sets the record's
//!    `cgroup_frozen`; a change bumps the VM's generation like any other.
//!
//! The inotify descriptor waits in the runtime's epoll: an idle host, or a
//! running VM nobody freezes, costs no wakeup.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use futures_util::StreamExt;
use inotify::{Inotify, WatchDescriptor, WatchMask, Watches};
use tokio::task::AbortHandle;
use tracing::{debug, warn};
use vmd_proto::VmName;

use super::{Inner, VmService};

/// The watched `cgroup.events` files, by VM and by watch.
#[derive(Debug, Default)]
pub(super) struct Freezes {
    state: Mutex<Option<Following>>,
}

/// The inotify instance and what it watches.
#[derive(Debug)]
struct Following {
    watches: Watches,
    /// The file watched for each VM whose unit is active.
    by_vm: HashMap<VmName, (PathBuf, WatchDescriptor)>,
    /// The VM of each watch, by the watch's number.
    by_watch: HashMap<i32, VmName>,
    /// The task that reads the events.
    task: AbortHandle,
}

impl Drop for Following {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Freezes {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Following>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The VM a watch belongs to.
    fn vm_of(&self, watch: &WatchDescriptor) -> Option<VmName> {
        self.lock()
            .as_ref()?
            .by_watch
            .get(&watch.get_watch_descriptor_id())
            .cloned()
    }
}

impl VmService {
    /// Step 1: watches `events` (a running unit's `cgroup.events`) for
    /// `name`, or stops watching for `None`; then reads it once, so a
    /// freeze before the watch is not missed.
    pub(super) fn follow_freezes(&self, name: &VmName, events: Option<PathBuf>) {
        let mut state = self.inner.freezes.lock();
        let current = state
            .as_ref()
            .and_then(|f| f.by_vm.get(name))
            .map(|(path, _)| path.clone());
        if current == events {
            return;
        }
        if let Some(following) = state.as_mut()
            && let Some((_, watch)) = following.by_vm.remove(name)
        {
            following.by_watch.remove(&watch.get_watch_descriptor_id());
            // Fails when the cgroup is already gone (the kernel dropped
            // the watch then): nothing to undo.
            let _ = following.watches.remove(watch);
        }
        let Some(path) = events else {
            drop(state);
            self.set_cgroup_frozen(name, None);
            return;
        };
        if state.is_none() {
            match start(Arc::downgrade(&self.inner)) {
                Ok(following) => *state = Some(following),
                Err(e) => {
                    warn!(error = %e, "cannot watch cgroups: freezes made by others wake no watch");
                    return;
                }
            }
        }
        let Some(following) = state.as_mut() else {
            return;
        };
        match following.watches.add(&path, WatchMask::MODIFY) {
            Ok(watch) => {
                following
                    .by_watch
                    .insert(watch.get_watch_descriptor_id(), name.clone());
                following.by_vm.insert(name.clone(), (path, watch));
            }
            Err(e) => {
                debug!(vm = %name, path = %path.display(), error = %e, "cgroup.events not watched");
            }
        }
        drop(state);
        self.read_frozen(name);
    }

    /// Step 2: reads whether `name`'s cgroup is frozen now.
    fn read_frozen(&self, name: &VmName) {
        let frozen = self
            .inner
            .model
            .get(name)
            .and_then(|record| self.inner.cgroups.frozen(record.running_cgroup()?));
        self.set_cgroup_frozen(name, frozen);
    }

    fn set_cgroup_frozen(&self, name: &VmName, frozen: Option<bool>) {
        self.inner.model.update(name, |record| {
            record.facts.cgroup_frozen = frozen;
        });
    }
}

/// Makes the inotify instance and the task that reads its events.
fn start(weak: Weak<Inner>) -> std::io::Result<Following> {
    let inotify = Inotify::init()?;
    let watches = inotify.watches();
    let mut events = inotify.into_event_stream([0u8; 1024])?;
    let task = tokio::spawn(async move {
        while let Some(event) = events.next().await {
            let Some(service) = VmService::from_weak(&weak) else {
                return;
            };
            match event {
                Ok(event) => {
                    if let Some(name) = service.inner.freezes.vm_of(&event.wd) {
                        service.read_frozen(&name);
                    }
                }
                Err(e) => {
                    warn!(error = %e, "cannot read cgroup events; freezes made by others wake no watch");
                    return;
                }
            }
        }
    });
    Ok(Following {
        watches,
        by_vm: HashMap::new(),
        by_watch: HashMap::new(),
        task: task.abort_handle(),
    })
}
