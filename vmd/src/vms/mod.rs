//! VMs: what the host declares, their live state, and changes to them.
//!
//! Reads (`list`, `get`, `watch`) answer from the live [`model`]: no bus
//! call, no control-socket session, nothing waited for. What no event
//! announces (CPU time, memory in use) is read from the unit's cgroup on
//! request ([`crate::drivers::cgroup`]); live facts older than
//! [`REFRESH_AFTER`] are refreshed in the background, never waited for.
//!
//! [`follow`] keeps the model current: systemd's signals for the declared
//! units, and vmd's own QMP monitor of every running QEMU VM. [`change`]
//! validates changes against the model and runs them as [`ops`].

pub mod change;
pub mod follow;
mod freezes;
pub mod inventory;
pub mod model;
pub mod ops;
pub mod watch;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::task::AbortHandle;
use vmd_proto::{
    Bytes, LiveFacts, LiveSource, MemoryCounts, UnitInfo, VcpuCounts, VmInfo, VmName, VmState,
    WatchEvent,
};

pub use change::{Change, ChangeDeadlines, MIN_MEMORY};

use crate::drivers::cgroup::{Cgroups, Usage};
use crate::drivers::{ActiveState, BackendError, NOT_LOADED, RunState, Units, VmControl};
use crate::policy::Scope;
use inventory::{InventoryError, InventorySource, VmSpec};
use model::{Model, Record, age_ms};
use ops::{Busy, Operations};
use watch::{Changed, Changes};

/// Live facts from a shared socket older than this are refreshed in the
/// background when read.
pub const REFRESH_AFTER: Duration = Duration::from_secs(2);

/// The same for facts from vmd's monitor: its events keep them current;
/// this only catches what QEMU announces with no event (a device another
/// client attached, a vCPU it hot-plugged).
pub const MONITOR_REFRESH_AFTER: Duration = Duration::from_secs(10);

/// What is read on request (a unit's CPU time, memory and tasks; whether
/// the VM needs a restart) is reused for this long: a panel that reads
/// every VM each second costs the host one read per VM per second,
/// however many clients ask. Freezing is always read fresh.
pub const ON_REQUEST_FRESH: Duration = Duration::from_secs(1);

/// How long start-up waits for running VMs' live facts.
const START_SETTLE: Duration = Duration::from_secs(5);

/// A VM request could not be served.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The host does not declare this VM.
    #[error("no VM named {0}")]
    NotFound(VmName),
    /// The inventory file is broken.
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    /// The VM is protected: visible, never changed over the network.
    #[error("{0} is protected and cannot be changed over the network")]
    Protected(VmName),
    /// The VM is busy with another change (or the host-wide cap is hit).
    #[error(transparent)]
    Busy(#[from] Busy),
    /// The change makes no sense for this VM now.
    #[error("{0}")]
    Invalid(String),
    /// The VM's hypervisor cannot do this.
    #[error("{0}")]
    Unsupported(String),
    /// The change needs the VM's shared control socket, another client
    /// holds it, and vmd has no monitor of its own for the VM.
    #[error(
        "{0}'s control socket is held by another client (microvm.nix's shutdown or \
         balloon, ghaf-mem-manager or vhotplug, for example) and vmd has no monitor \
         of its own for this VM; try again"
    )]
    SocketHeld(VmName),
    /// A backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// The VMs of this host. Cheap to clone.
#[derive(Clone, Debug)]
pub struct VmService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    inventory: InventorySource,
    units: Arc<dyn Units>,
    control: Arc<dyn VmControl>,
    cgroups: Cgroups,
    ops: Operations,
    deadlines: ChangeDeadlines,
    model: Model,
    /// The task that follows systemd's signals.
    follower: Mutex<Option<AbortHandle>>,
    /// Numbers monitor attaches, so a closed monitor's late events are
    /// told from the current one's.
    epochs: AtomicU64,
    /// Wakes the follower's pause before subscribing again (a change found
    /// systemd reachable).
    resubscribe: tokio::sync::Notify,
    /// The last on-request reads per VM (see [`ON_REQUEST_FRESH`]).
    on_request: Mutex<std::collections::HashMap<VmName, OnRequest>>,
    /// The running units' `cgroup.events` watches.
    freezes: freezes::Freezes,
}

/// What a read of one VM found outside the model, and when.
#[derive(Clone, Copy, Debug)]
struct OnRequest {
    at: std::time::Instant,
    /// The unit state it was read under: a new one reads again.
    unit_at: Option<std::time::Instant>,
    usage: Usage,
    restart_needed: Option<bool>,
}

impl VmService {
    /// A service over the given inventory and drivers. Nothing is read
    /// until [`VmService::start`].
    pub fn new(
        inventory: InventorySource,
        units: Arc<dyn Units>,
        control: Arc<dyn VmControl>,
        ops: Operations,
        deadlines: ChangeDeadlines,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                inventory,
                units,
                control,
                cgroups: Cgroups::detect(),
                ops,
                deadlines,
                model: Model::new(),
                follower: Mutex::new(None),
                epochs: AtomicU64::new(0),
                resubscribe: tokio::sync::Notify::new(),
                on_request: Mutex::new(std::collections::HashMap::new()),
                freezes: freezes::Freezes::default(),
            }),
        }
    }

    /// Reads units' CPU and memory use from the unified cgroup hierarchy
    /// at `root` instead of the one found on this host.
    #[must_use]
    pub fn with_cgroup_root(self, root: std::path::PathBuf) -> Self {
        let mut inner = Arc::into_inner(self.inner).expect("configured before it is shared");
        inner.cgroups = Cgroups::at(Some(root));
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Reads the inventory, takes systemd's state of every declared unit,
    /// attaches to running VMs' monitors, and then follows changes (see
    /// [`follow`]). Returns once the model is current (or systemd could
    /// not be reached: then it keeps trying in the background).
    ///
    /// # Errors
    /// [`VmError::Inventory`] if the inventory file is broken.
    pub async fn start(&self) -> Result<(), VmError> {
        self.inner.model.declare(self.inner.inventory.load()?);
        self.follow().await;
        self.settle(START_SETTLE).await;
        Ok(())
    }

    /// Waits (woken by the model, at most `bound`) until every running
    /// QEMU VM has its live facts or vmd has given up asking, so the first
    /// answers after start are complete.
    async fn settle(&self, bound: Duration) {
        let mut wake = self.changes().subscribe();
        let work = async {
            loop {
                wake.borrow_and_update();
                let pending = self.inner.model.select(|_| true).into_iter().any(|r| {
                    r.is_active() && r.facts.live.is_none() && (r.attaching || r.refreshing)
                });
                if !pending {
                    return;
                }
                if wake.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(bound, work).await;
    }

    /// After a reload: reads the inventory again and follows the units it
    /// declares now; pending watches answer a snapshot.
    ///
    /// # Errors
    /// [`VmError::Inventory`] if the inventory file is broken (the model
    /// keeps the old declarations).
    pub async fn reload(&self) -> Result<(), VmError> {
        let specs = self.inner.inventory.load()?;
        self.inner.model.declare(specs);
        self.follow().await;
        Ok(())
    }

    /// The change generations `Watch` waits on.
    pub fn changes(&self) -> &Arc<Changes> {
        self.inner.model.changes()
    }

    /// The operations registry.
    pub fn operations(&self) -> &Operations {
        &self.inner.ops
    }

    /// Every VM in `visible`, sorted by name, as `viewer` may see them.
    ///
    /// # Errors
    /// None today; kept fallible for backends that may fail.
    pub async fn list(&self, visible: &Scope, viewer: &str) -> Result<Vec<VmInfo>, VmError> {
        let records = self.inner.model.select(|name| visible.contains(name));
        Ok(records.iter().map(|r| self.info(r, viewer)).collect())
    }

    /// One VM, if it is in `visible`.
    ///
    /// # Errors
    /// [`VmError::NotFound`] if the host does not declare it, or it is
    /// outside `visible` (indistinguishable on purpose).
    pub async fn get(
        &self,
        name: &VmName,
        visible: &Scope,
        viewer: &str,
    ) -> Result<VmInfo, VmError> {
        if !visible.contains(name) {
            return Err(VmError::NotFound(name.clone()));
        }
        let record = self
            .inner
            .model
            .get(name)
            .ok_or_else(|| VmError::NotFound(name.clone()))?;
        Ok(self.info(&record, viewer))
    }

    /// The VMs with a hybrid vsock socket, as the inventory declares them
    /// now.
    ///
    /// # Errors
    /// [`VmError::Inventory`] if the inventory file is broken.
    pub fn hybrid_vsock(&self) -> Result<Vec<(VmName, std::path::PathBuf)>, VmError> {
        Ok(self
            .inner
            .inventory
            .load()?
            .into_iter()
            .filter_map(|spec| Some((spec.name, spec.vsock_uds?)))
            .collect())
    }

    /// The vsock CID the inventory declares for `name`.
    pub fn cid_of(&self, name: &VmName) -> Option<u32> {
        self.inner
            .model
            .get(name)
            .and_then(|r| r.spec.vsock_cid)
            .map(|cid| cid.0)
    }

    /// One VM as `viewer` sees it, from its record; starts a background
    /// refresh of stale live facts.
    fn info(&self, record: &Record, viewer: &str) -> VmInfo {
        let refresh_after = if record.monitor.is_some() {
            MONITOR_REFRESH_AFTER
        } else {
            REFRESH_AFTER
        };
        if record.is_active()
            && record
                .live_at
                .is_none_or(|at| at.elapsed() >= refresh_after)
        {
            self.refresh(&record.spec.name);
        }
        let read = self.on_request(record);
        let mut info = vm_info(record, read.usage, now_usec());
        info.restart_needed = read.restart_needed;
        info.pending = self.inner.ops.pending(&record.spec.name, viewer);
        info
    }

    /// The on-request reads of a VM, reused while fresh; `frozen` always
    /// read now.
    fn on_request(&self, record: &Record) -> OnRequest {
        let name = &record.spec.name;
        let cached = self
            .inner
            .on_request
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .copied()
            .filter(|c| c.at.elapsed() < ON_REQUEST_FRESH && c.unit_at == record.unit_at);
        let control_group = record.running_cgroup();
        let mut read = cached.unwrap_or_else(|| {
            let read = OnRequest {
                at: std::time::Instant::now(),
                unit_at: record.unit_at,
                usage: control_group
                    .map(|cg| self.inner.cgroups.usage(cg))
                    .unwrap_or_default(),
                restart_needed: record
                    .spec
                    .dir
                    .as_deref()
                    .and_then(inventory::restart_needed),
            };
            self.inner
                .on_request
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(name.clone(), read);
            read
        });
        if cached.is_some() {
            read.usage.frozen = control_group.and_then(|cg| self.inner.cgroups.frozen(cg));
        }
        if control_group.is_none() {
            read.usage = Usage::default();
        }
        read
    }

    /// The state now, with the cgroup's word on freezing.
    pub(crate) fn state_now(&self, record: &Record) -> VmState {
        let frozen = record
            .running_cgroup()
            .and_then(|cg| self.inner.cgroups.frozen(cg));
        state_with(record, frozen)
    }

    /// `Watch`: the VMs in `visible` (and in `only`, unless empty) that
    /// changed after generation `since`, as `viewer` may see them; waits
    /// up to `timeout` for one to change if none has. A `since` this run
    /// does not know (0, an earlier run's) or lost events answer a full
    /// snapshot at once.
    ///
    /// # Errors
    /// None today; kept fallible for backends that may fail.
    pub async fn watch(
        &self,
        since: u64,
        only: &[VmName],
        visible: &Scope,
        viewer: &str,
        timeout: Duration,
    ) -> Result<WatchEvent, VmError> {
        let watched =
            |name: &VmName| visible.contains(name) && (only.is_empty() || only.contains(name));
        let deadline = tokio::time::Instant::now() + timeout;
        let mut wake = self.changes().subscribe();
        loop {
            wake.borrow_and_update();
            let (generation, changed) = self.changes().since(since);
            let names: Option<Vec<VmName>> = match changed {
                Changed::Snapshot | Changed::All => None,
                Changed::Some(names) => Some(names.into_iter().filter(|n| watched(n)).collect()),
            };
            match names {
                Some(names) if names.is_empty() => {}
                names => return Ok(self.watch_event(generation, names, only, &watched, viewer)),
            }
            tokio::select! {
                // The sender lives as long as `self`: `changed` cannot fail.
                _ = wake.changed() => {}
                () = tokio::time::sleep_until(deadline) => {
                    return Ok(WatchEvent {
                        generation,
                        snapshot: false,
                        changed: Vec::new(),
                        removed: Vec::new(),
                    });
                }
            }
        }
    }

    /// The answer of a watch: `names` changed (`None`: a snapshot of
    /// every watched VM).
    fn watch_event(
        &self,
        generation: u64,
        names: Option<Vec<VmName>>,
        only: &[VmName],
        watched: &(dyn Fn(&VmName) -> bool + Sync),
        viewer: &str,
    ) -> WatchEvent {
        let snapshot = names.is_none();
        let records = match &names {
            None => self.inner.model.select(watched),
            Some(names) => self.inner.model.select(|n| names.contains(n)),
        };
        let exists = |name: &VmName| records.iter().any(|r| r.spec.name == *name);
        let removed = match names {
            None => only
                .iter()
                .filter(|n| watched(n) && self.inner.model.get(n).is_none())
                .cloned()
                .collect(),
            Some(names) => names.into_iter().filter(|n| !exists(n)).collect(),
        };
        WatchEvent {
            generation,
            snapshot,
            changed: records.iter().map(|r| self.info(r, viewer)).collect(),
            removed,
        }
    }
}

/// Microseconds since the Unix epoch.
fn now_usec() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The state a human reads, from systemd's view, the hypervisor's and
/// the kernel's last word on freezing.
pub fn vm_state(record: &Record) -> VmState {
    state_with(record, record.facts.cgroup_frozen)
}

/// As [`vm_state`]; `cgroup_frozen` is the kernel's word, read now.
fn state_with(record: &Record, cgroup_frozen: Option<bool>) -> VmState {
    let Some(unit) = &record.facts.unit else {
        return VmState::Unknown;
    };
    if unit.load_state == "not-found" {
        return VmState::Unknown;
    }
    let frozen = cgroup_frozen.unwrap_or(false)
        || matches!(
            unit.freezer_state.as_deref(),
            Some("frozen" | "freezing" | "freezing-by-parent" | "frozen-by-parent")
        );
    match unit.active_state {
        ActiveState::Active | ActiveState::Reloading if frozen => VmState::Frozen,
        ActiveState::Active | ActiveState::Reloading => {
            match record
                .facts
                .live
                .as_ref()
                .and_then(|l| l.run_state.as_ref())
            {
                Some(RunState::Paused) => VmState::Paused,
                Some(RunState::Shutdown) => VmState::Stopping,
                _ => VmState::Running,
            }
        }
        ActiveState::Activating if unit.sub_state == "auto-restart" => VmState::Restarting,
        ActiveState::Activating => VmState::Starting,
        ActiveState::Deactivating => VmState::Stopping,
        ActiveState::Inactive => VmState::Stopped,
        ActiveState::Failed => VmState::Failed,
        ActiveState::Other(_) => VmState::Unknown,
    }
}

/// Renders a record (and the cgroup's usage) as the wire's `VmInfo`.
/// `pending` is left for the caller (it depends on the viewer).
pub fn vm_info(record: &Record, usage: Usage, now_usec: u64) -> VmInfo {
    let spec: &VmSpec = &record.spec;
    let facts = &record.facts;
    let running = facts.unit.as_ref().filter(|_| record.is_active());
    // Live facts only describe a running unit.
    let live = facts.live.as_ref().filter(|_| record.is_active());
    let current_memory = live.and_then(|l| {
        l.base_memory
            .map(|base| Bytes(base.saturating_add(l.plugged_memory.unwrap_or(0))))
    });
    let mut resources = spec.resources.clone();
    resources.runtime_devices = live.and_then(|l| l.devices.as_ref()).map(|devices| {
        devices
            .iter()
            .map(|(id, driver)| vmd_proto::RuntimeDevice {
                id: id.clone(),
                driver: driver.clone(),
            })
            .collect()
    });
    VmInfo {
        name: spec.name.clone(),
        description: spec.description.clone(),
        hypervisor: spec.hypervisor.clone(),
        state: state_with(record, usage.frozen),
        autostart: facts.autostart,
        protected: spec.protected,
        vsock_cid: spec.vsock_cid,
        vcpus: VcpuCounts {
            declared: spec.vcpus,
            current: live.and_then(|l| l.vcpus),
            max: spec.max_vcpus.or(live.and_then(|l| l.vcpu_slots)),
        },
        memory: MemoryCounts {
            declared: spec.memory,
            current: current_memory,
            balloon_actual: live.and_then(|l| l.balloon_actual).map(Bytes),
            max: spec.max_memory,
        },
        pid: running.and_then(|u| u.main_pid),
        uptime_secs: running
            .and_then(|u| u.active_enter_usec)
            .map(|since| now_usec.saturating_sub(since) / 1_000_000),
        cgroup_memory: usage.memory.map(Bytes),
        cpu_time_ns: usage.cpu_ns,
        tasks: usage.tasks,
        pending: None,
        unit: facts.unit.as_ref().map(|u| UnitInfo {
            name: spec.unit.clone(),
            active_state: if u.load_state == NOT_LOADED {
                NOT_LOADED.to_owned()
            } else {
                active_state_name(&u.active_state).to_owned()
            },
            sub_state: u.sub_state.clone(),
            freezer_state: match usage.frozen {
                Some(true) => Some("frozen".to_owned()),
                _ => u.freezer_state.clone(),
            },
            age_ms: age_ms(record.unit_at),
        }),
        run_state: live
            .and_then(|l| l.run_state.as_ref())
            .map(|r| r.name().to_owned()),
        live: LiveFacts {
            source: if live.is_some() {
                facts.source
            } else {
                LiveSource::None
            },
            age_ms: live.and(age_ms(record.live_at)),
            note: facts.note.clone(),
        },
        last_exit: facts.last_exit.clone(),
        restarts: facts.unit.as_ref().and_then(|u| u.n_restarts),
        // Read on request by the caller (it may reuse a recent read).
        restart_needed: None,
        resources,
    }
}

/// systemd's name of an `ActiveState`.
fn active_state_name(state: &ActiveState) -> &str {
    match state {
        ActiveState::Active => "active",
        ActiveState::Reloading => "reloading",
        ActiveState::Inactive => "inactive",
        ActiveState::Failed => "failed",
        ActiveState::Activating => "activating",
        ActiveState::Deactivating => "deactivating",
        ActiveState::Other(name) => name,
    }
}

#[cfg(test)]
pub(crate) mod tests;
