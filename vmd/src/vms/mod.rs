//! VMs: what the host declares, their live state, and changes to them.
//!
//! Reads (`list`, `get`):
//! 1. The inventory is read (see [`crate::vms::inventory`]).
//! 2. For each VM, concurrently: the unit's state and accounting from
//!    systemd, whether `microvms.target` wants it, and the hypervisor's
//!    live facts over its control socket (only used while the unit runs).
//! 3. [`vm_info`] combines them; what the host cannot know stays `None`.
//!
//! Changes (`change`):
//! 1. The VM must exist and not be protected.
//! 2. The VM is claimed in the operations registry before anything is
//!    awaited, so of concurrent changes exactly the first wins and the rest
//!    answer busy at once.
//! 3. The change must make sense in the VM's state (start needs stopped,
//!    shutdown needs running, pause needs running and not paused, resume
//!    needs paused, resize needs running; the last three under a hypervisor
//!    vmd can control) and resize values must fit the VM's limits. Otherwise the claim is abandoned and the answer is
//!    `InvalidArgument`, with nothing done: starting a running VM is an
//!    error, like `virsh start` of an active domain.
//! 4. The change runs in its own task with a deadline; the request returns
//!    the accepted operation immediately.

pub mod inventory;
pub mod ops;
pub mod watch;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use futures_util::future::join_all;
use tracing::{Instrument, info, info_span, warn};
use vmd_proto::{
    Bytes, ErrorReply, Hypervisor, MemoryCounts, OperationInfo, OperationKind, VcpuCounts, VmInfo,
    VmName, VmState, WatchEvent,
};

use crate::audit;
use crate::drivers::{
    ActiveState, BackendError, LiveState, RunState, UnitStatus, Units, VmControl,
};
use crate::vms::inventory::{AUTOSTART_TARGET, InventoryError, InventorySource, VmSpec};
use crate::vms::ops::{Busy, Operations};
use crate::policy::Scope;
use crate::vms::watch::{Changed, Changes};

/// The smallest memory a resize may ask for.
pub const MIN_MEMORY: Bytes = Bytes::mib(128);

/// Deadlines of the changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChangeDeadlines {
    /// Start (the unit's start job).
    pub start: Duration,
    /// Graceful shutdown when the request names none.
    pub shutdown: Duration,
    /// Forced shutdown (SIGKILL until inactive).
    pub kill: Duration,
    /// Restart.
    pub restart: Duration,
    /// Pause, resume and resize (control socket work).
    pub control: Duration,
}

impl Default for ChangeDeadlines {
    fn default() -> Self {
        Self {
            start: Duration::from_secs(120),
            shutdown: Duration::from_secs(120),
            kill: Duration::from_secs(30),
            restart: Duration::from_secs(240),
            control: Duration::from_secs(30),
        }
    }
}

/// A change to a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Start the unit.
    Start,
    /// Stop the unit gracefully, or kill it.
    Shutdown {
        /// Kill instead of stopping.
        force: bool,
        /// Deadline of a graceful stop.
        timeout: Option<Duration>,
    },
    /// Restart the unit.
    Restart,
    /// Pause the guest.
    Pause,
    /// Resume the guest.
    Resume,
    /// Change vCPUs and/or the memory target.
    Resize {
        /// Target vCPU count.
        vcpus: Option<u32>,
        /// Target guest memory (balloon).
        memory: Option<Bytes>,
    },
}

impl Change {
    /// The operation kind it runs as.
    pub fn kind(&self) -> OperationKind {
        match self {
            Change::Start => OperationKind::Start,
            Change::Shutdown { .. } => OperationKind::Shutdown,
            Change::Restart => OperationKind::Restart,
            Change::Pause => OperationKind::Pause,
            Change::Resume => OperationKind::Resume,
            Change::Resize { .. } => OperationKind::Resize,
        }
    }
}

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
    /// A backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// The VMs of this host.
#[derive(Clone, Debug)]
pub struct VmService {
    inventory: InventorySource,
    units: Arc<dyn Units>,
    control: Arc<dyn VmControl>,
    ops: Operations,
    deadlines: ChangeDeadlines,
    changes: Arc<Changes>,
    /// Whether a task follows the service manager's unit signals.
    following: Arc<AtomicBool>,
    /// That task, to stop it when the inventory may have changed.
    follower: Arc<std::sync::Mutex<Option<tokio::task::AbortHandle>>>,
}

impl VmService {
    /// A service over the given inventory and backends.
    pub fn new(
        inventory: InventorySource,
        units: Arc<dyn Units>,
        control: Arc<dyn VmControl>,
        ops: Operations,
        deadlines: ChangeDeadlines,
    ) -> Self {
        let changes = Arc::new(Changes::new());
        // Hypervisor events seen during vmd's own sessions (a balloon that
        // moved, a vCPU unplugged, a guest that stopped) bump their VM.
        control.set_event_sink({
            let changes = Arc::clone(&changes);
            let inventory = inventory.clone();
            crate::drivers::EventSink::new(move |socket: &std::path::Path, event: &str| {
                let Ok(specs) = inventory.load() else {
                    return;
                };
                if let Some(spec) = specs
                    .iter()
                    .find(|spec| spec.control_socket.as_deref() == Some(socket))
                {
                    tracing::debug!(vm = %spec.name, event, "hypervisor event");
                    changes.bump(&spec.name);
                }
            })
        });
        Self {
            inventory,
            units,
            control,
            ops,
            deadlines,
            changes,
            following: Arc::new(AtomicBool::new(false)),
            follower: Arc::new(std::sync::Mutex::new(None)),
        }
    }

    /// The change generations `Watch` waits on.
    pub fn changes(&self) -> &Arc<Changes> {
        &self.changes
    }

    /// The operations registry.
    pub fn operations(&self) -> &Operations {
        &self.ops
    }

    /// Every VM in `visible`, sorted by name, gathered concurrently, as
    /// `viewer` may see them.
    ///
    /// # Errors
    /// [`VmError::Inventory`] if the inventory file is broken. Backend
    /// failures do not fail the list: the affected fields read unknown.
    pub async fn list(&self, visible: &Scope, viewer: &str) -> Result<Vec<VmInfo>, VmError> {
        let specs = self.inventory.load()?;
        let specs = specs.iter().filter(|spec| visible.contains(&spec.name));
        Ok(join_all(specs.map(|spec| self.info(spec, viewer))).await)
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
        let spec = self.spec(name)?;
        Ok(self.info(&spec, viewer).await)
    }

    /// The VMs with a hybrid vsock socket, read from the inventory now.
    ///
    /// # Errors
    /// [`VmError::Inventory`] if the inventory file is broken.
    pub fn hybrid_vsock(&self) -> Result<Vec<(VmName, std::path::PathBuf)>, VmError> {
        Ok(self
            .inventory
            .load()?
            .into_iter()
            .filter_map(|spec| Some((spec.name, spec.vsock_uds?)))
            .collect())
    }

    /// The vsock CID the inventory declares for `name`.
    pub fn cid_of(&self, name: &VmName) -> Option<u32> {
        match self.inventory.get(name) {
            Ok(spec) => spec.and_then(|s| s.vsock_cid).map(|cid| cid.0),
            Err(e) => {
                warn!(error = %vmd_proto::error_chain(&e), "inventory unreadable for a CID lookup");
                None
            }
        }
    }

    fn spec(&self, name: &VmName) -> Result<VmSpec, VmError> {
        self.inventory
            .get(name)?
            .ok_or_else(|| VmError::NotFound(name.clone()))
    }

    /// Gathers one VM's facts (step 2 and 3 of the module docs).
    async fn info(&self, spec: &VmSpec, viewer: &str) -> VmInfo {
        let live = async {
            match &spec.control_socket {
                Some(socket) if socket.exists() => Some(self.control.query(socket).await),
                _ => None,
            }
        };
        let (status, autostart, live) = tokio::join!(
            self.units.status(&spec.unit),
            self.units.wanted_by(&spec.unit, AUTOSTART_TARGET),
            live
        );
        if let Err(e) = &status {
            warn!(vm = %spec.name, error = %e, "cannot read unit state");
        }
        let live = match live {
            Some(Ok(live)) => Some(live),
            Some(Err(e)) => {
                // Expected while the VM is stopped (a stale socket).
                tracing::debug!(vm = %spec.name, error = %e, "no live facts");
                None
            }
            None => None,
        };
        let mut info = vm_info(spec, status.ok().as_ref(), live.as_ref(), now_usec());
        info.autostart = autostart.ok();
        info.pending = self.ops.pending(&spec.name, viewer);
        info
    }

    /// `Watch`: the VMs in `visible` (and in `only`, unless empty) that
    /// changed after generation `since`, as `viewer` may see them; waits
    /// up to `timeout` for one to change if none has. A `since` this run
    /// does not know (0, an earlier run's) or lost events answer a full
    /// snapshot at once.
    ///
    /// # Errors
    /// [`VmError::Inventory`] if the inventory file is broken.
    pub async fn watch(
        &self,
        since: u64,
        only: &[VmName],
        visible: &Scope,
        viewer: &str,
        timeout: Duration,
    ) -> Result<WatchEvent, VmError> {
        self.follow_units().await;
        let watched =
            |name: &VmName| visible.contains(name) && (only.is_empty() || only.contains(name));
        let deadline = tokio::time::Instant::now() + timeout;
        let mut wake = self.changes.subscribe();
        loop {
            wake.borrow_and_update();
            let (generation, changed) = self.changes.since(since);
            let names: Option<Vec<VmName>> = match changed {
                Changed::Snapshot | Changed::All => None,
                Changed::Some(names) => Some(names.into_iter().filter(|n| watched(n)).collect()),
            };
            match names {
                Some(names) if names.is_empty() => {}
                names => {
                    return self
                        .watch_event(generation, names, only, &watched, viewer)
                        .await;
                }
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
    async fn watch_event(
        &self,
        generation: u64,
        names: Option<Vec<VmName>>,
        only: &[VmName],
        watched: &(dyn Fn(&VmName) -> bool + Sync),
        viewer: &str,
    ) -> Result<WatchEvent, VmError> {
        let specs = self.inventory.load()?;
        let exists = |name: &VmName| specs.iter().any(|s| s.name == *name);
        let snapshot = names.is_none();
        let (changed, removed): (Vec<&VmSpec>, Vec<VmName>) = match names {
            None => (
                specs.iter().filter(|s| watched(&s.name)).collect(),
                only.iter()
                    .filter(|n| watched(n) && !exists(n))
                    .cloned()
                    .collect(),
            ),
            Some(names) => (
                specs.iter().filter(|s| names.contains(&s.name)).collect(),
                names.into_iter().filter(|n| !exists(n)).collect(),
            ),
        };
        let changed = join_all(changed.into_iter().map(|spec| self.info(spec, viewer))).await;
        Ok(WatchEvent {
            generation,
            snapshot,
            changed,
            removed,
        })
    }

    /// Makes sure a task follows the service manager's signals about the
    /// declared VMs' units and bumps the VMs they are about. Started by
    /// the first watch, not before: a daemon nobody watches holds no
    /// subscription. When the signal stream ends (the bus went away) every
    /// VM counts as changed and the next watch subscribes again; nothing
    /// retries in between. [`VmService::refollow`] makes the next watch
    /// subscribe anew (after a reload: the inventory may have changed).
    async fn follow_units(&self) {
        if self.following.swap(true, Ordering::SeqCst) {
            return;
        }
        let units: Vec<String> = match self.inventory.load() {
            Ok(specs) => specs.into_iter().map(|spec| spec.unit).collect(),
            Err(e) => {
                warn!(error = %vmd_proto::error_chain(&e), "inventory unreadable; not following units");
                self.following.store(false, Ordering::SeqCst);
                return;
            }
        };
        match self.units.events(&units).await {
            Ok(mut events) => {
                let service = self.clone();
                let task = tokio::spawn(async move {
                    while let Some(unit) = events.next().await {
                        service.unit_changed(&unit);
                    }
                    warn!("the service manager's unit signals ended; the next watch resubscribes");
                    service.following.store(false, Ordering::SeqCst);
                    service.changes.bump_all();
                });
                let old = self
                    .follower
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .replace(task.abort_handle());
                if let Some(old) = old {
                    old.abort();
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot follow unit signals; watches see vmd's own changes only");
                self.following.store(false, Ordering::SeqCst);
            }
        }
    }

    /// Drops the unit-signal subscription (if any) so the next watch
    /// subscribes for the units the inventory declares then, and marks
    /// every VM changed so pending watches answer a snapshot.
    pub fn refollow(&self) {
        let task = self
            .follower
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            task.abort();
        }
        self.following.store(false, Ordering::SeqCst);
        self.changes.bump_all();
    }

    /// A unit signal: bumps the VM that runs as `unit`, if any.
    fn unit_changed(&self, unit: &str) {
        match self.inventory.load() {
            Ok(specs) => {
                if let Some(spec) = specs.iter().find(|s| s.unit == unit) {
                    tracing::debug!(vm = %spec.name, unit, "unit changed");
                    self.changes.bump(&spec.name);
                }
            }
            Err(e) => {
                warn!(error = %vmd_proto::error_chain(&e), "inventory unreadable on a unit signal");
                self.changes.bump_all();
            }
        }
    }

    /// Validates and starts a change; returns the accepted operation.
    ///
    /// # Errors
    /// [`VmError`] when the change cannot begin (see module docs).
    pub async fn change(
        &self,
        name: &VmName,
        change: Change,
        owner: &str,
    ) -> Result<OperationInfo, VmError> {
        let spec = self.spec(name)?;
        if spec.protected {
            return Err(VmError::Protected(spec.name));
        }
        let guard = self.ops.begin(name, change.kind(), owner)?;
        if let Err(e) = self.check(&spec, &change).await {
            guard.abandon();
            return Err(e);
        }
        let accepted = guard.info().clone();
        // Watchers see the pending operation now and its end later.
        self.changes.bump(name);
        let service = self.clone();
        let owner = owner.to_owned();
        let span = info_span!("operation", id = %accepted.id, vm = %name, kind = %accepted.kind);
        tokio::spawn(
            async move {
                info!("started");
                let result = service.run(&spec, &change).await;
                match &result {
                    Ok(()) => info!("succeeded"),
                    Err(e) => warn!(error = %e, "failed"),
                }
                let result = result.map_err(ErrorReply::from);
                let kind = guard.info().kind.to_string();
                audit::finished(
                    &owner,
                    spec.name.as_str(),
                    guard.info().id,
                    &kind,
                    &audit::Outcome::Finished(result.clone()),
                );
                guard.finish(result);
                service.changes.bump(&spec.name);
            }
            .instrument(span),
        );
        Ok(accepted)
    }

    /// Whether `change` makes sense for the VM now (step 3).
    async fn check(&self, spec: &VmSpec, change: &Change) -> Result<(), VmError> {
        let name = &spec.name;
        let status = self.units.status(&spec.unit).await?;
        let running = matches!(
            status.active_state,
            ActiveState::Active | ActiveState::Reloading
        );
        match change {
            Change::Start if running => {
                return Err(VmError::Invalid(format!("{name} is already running")));
            }
            Change::Shutdown { .. } | Change::Pause | Change::Resume | Change::Resize { .. }
                if !running =>
            {
                return Err(VmError::Invalid(format!("{name} is not running")));
            }
            Change::Pause | Change::Resume | Change::Resize { .. } => {
                self.check_controllable(spec)?;
            }
            _ => {}
        }
        match change {
            Change::Resize { vcpus, memory } => self.check_resize(spec, *vcpus, *memory).await?,
            Change::Pause | Change::Resume => {
                let socket = spec
                    .control_socket
                    .as_deref()
                    .expect("check_controllable ran first");
                // Refuse only what is known to make no sense; if the socket
                // cannot tell, the change is tried and its operation says
                // how it went.
                let Ok(live) = self.control.query(socket).await else {
                    return Ok(());
                };
                let paused = live.run_state == Some(RunState::Paused);
                if paused && *change == Change::Pause {
                    return Err(VmError::Invalid(format!("{name} is already paused")));
                }
                if !paused && *change == Change::Resume {
                    return Err(VmError::Invalid(format!("{name} is not paused")));
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// After a start, waits until the hypervisor answers on its control
    /// socket, so a succeeded start means a VM that can be queried and
    /// resized. A unit of `Type=simple` is "active" the moment its process
    /// is forked, before QEMU has opened its socket. This retries with a
    /// growing pause only while a start operation runs (the caller's
    /// deadline bounds it); an idle daemon never does it.
    async fn await_control(&self, spec: &VmSpec) -> Result<(), VmError> {
        let Some(socket) = spec.control_socket.as_deref() else {
            return Ok(());
        };
        if spec.hypervisor != Some(Hypervisor::Qemu) {
            return Ok(());
        }
        let mut pause = Duration::from_millis(20);
        loop {
            match self.control.query(socket).await {
                Ok(_) => return Ok(()),
                Err(BackendError::Unavailable(_) | BackendError::SocketBusy(_)) => {
                    // The unit may have died meanwhile: then say so.
                    let status = self.units.status(&spec.unit).await?;
                    if !matches!(
                        status.active_state,
                        ActiveState::Active | ActiveState::Activating
                    ) {
                        return Err(VmError::Backend(BackendError::JobFailed {
                            unit: spec.unit.clone(),
                            result: format!("stopped during start ({})", status.sub_state),
                        }));
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Pause, resume and resize need a hypervisor vmd speaks to.
    fn check_controllable(&self, spec: &VmSpec) -> Result<(), VmError> {
        match (&spec.hypervisor, &spec.control_socket) {
            (Some(Hypervisor::Qemu), Some(_)) => Ok(()),
            (Some(h), _) if *h != Hypervisor::Qemu => Err(VmError::Unsupported(format!(
                "{}: live control of {h} VMs is not supported yet",
                spec.name
            ))),
            _ => Err(VmError::Unsupported(format!(
                "{}: no QEMU control socket is declared",
                spec.name
            ))),
        }
    }

    async fn check_resize(
        &self,
        spec: &VmSpec,
        vcpus: Option<u32>,
        memory: Option<Bytes>,
    ) -> Result<(), VmError> {
        if vcpus.is_none() && memory.is_none() {
            return Err(VmError::Invalid(
                "resize needs a vCPU count, a memory size, or both".into(),
            ));
        }
        let socket = spec
            .control_socket
            .as_deref()
            .expect("check_controllable ran first");
        let live = self.control.query(socket).await?;
        if let Some(n) = vcpus {
            let max = spec.max_vcpus.or(live.vcpu_slots);
            if n == 0 {
                return Err(VmError::Invalid("vcpus must be at least 1".into()));
            }
            if let Some(max) = max.filter(|max| n > *max) {
                return Err(VmError::Invalid(format!(
                    "vcpus {n} exceeds the maximum of {max} for {}",
                    spec.name
                )));
            }
        }
        if let Some(mem) = memory {
            if mem < MIN_MEMORY {
                return Err(VmError::Invalid(format!(
                    "memory {mem} is below the minimum of {MIN_MEMORY}"
                )));
            }
            // The balloon can only give back memory the guest booted with.
            let ceiling = match (spec.max_memory, live.base_memory.map(Bytes)) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if let Some(max) = ceiling.filter(|max| mem > *max) {
                return Err(VmError::Invalid(format!(
                    "memory {mem} exceeds the maximum of {max} for {}",
                    spec.name
                )));
            }
        }
        Ok(())
    }

    /// Runs a change to its end, bounded by its deadline.
    async fn run(&self, spec: &VmSpec, change: &Change) -> Result<(), VmError> {
        let d = self.deadlines;
        let unit = spec.unit.as_str();
        let socket = spec.control_socket.as_deref();
        // Validation made sure a socket exists for the control changes.
        let socket = || socket.ok_or_else(|| VmError::Unsupported("no control socket".into()));
        let work = async {
            match change {
                Change::Start => {
                    self.units.start(unit, d.start).await?;
                    self.await_control(spec).await?;
                }
                Change::Shutdown { force: true, .. } => {
                    self.units.kill(unit, d.kill).await?;
                    // A unit with Restart= (microvm.nix sets it) comes back
                    // after a kill; a stop job cancels the pending restart.
                    self.units.stop(unit, d.kill).await?;
                }
                Change::Shutdown {
                    force: false,
                    timeout,
                } => self.units.stop(unit, timeout.unwrap_or(d.shutdown)).await?,
                Change::Restart => {
                    self.units.restart(unit, d.restart).await?;
                    self.await_control(spec).await?;
                }
                Change::Pause => self.control.pause(socket()?).await?,
                Change::Resume => self.control.resume(socket()?).await?,
                Change::Resize { vcpus, memory } => {
                    if let Some(n) = vcpus {
                        self.control.set_vcpus(socket()?, *n).await?;
                    }
                    if let Some(bytes) = memory {
                        self.control.set_balloon(socket()?, bytes.0).await?;
                    }
                }
            }
            Ok(())
        };
        // The backends bound their own calls; this caps the whole change.
        let cap = match change {
            Change::Start => d.start,
            Change::Shutdown { force: true, .. } => d.kill * 2,
            Change::Shutdown { timeout, .. } => timeout.unwrap_or(d.shutdown),
            Change::Restart => d.restart,
            _ => d.control,
        } + Duration::from_secs(5);
        tokio::time::timeout(cap, work)
            .await
            .unwrap_or_else(|_| Err(VmError::Backend(BackendError::Timeout(spec.unit.clone()))))
    }
}

/// Microseconds since the Unix epoch.
fn now_usec() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Combines the declared spec, the unit's status and the live facts.
/// `status` is `None` when systemd could not be asked.
pub fn vm_info(
    spec: &VmSpec,
    status: Option<&UnitStatus>,
    live: Option<&LiveState>,
    now_usec: u64,
) -> VmInfo {
    let active = status
        .is_some_and(|s| matches!(s.active_state, ActiveState::Active | ActiveState::Reloading));
    // Live facts only describe a running unit (a stopped VM may leave a
    // stale socket behind, or another process may hold the path).
    let live = live.filter(|_| active);
    let state = match status {
        None => VmState::Unknown,
        Some(s) if s.load_state == "not-found" => VmState::Unknown,
        Some(s) => match s.active_state {
            ActiveState::Active | ActiveState::Reloading => {
                match live.and_then(|l| l.run_state.as_ref()) {
                    Some(RunState::Paused) => VmState::Paused,
                    Some(RunState::Shutdown) => VmState::Stopping,
                    _ => VmState::Running,
                }
            }
            ActiveState::Activating => VmState::Starting,
            ActiveState::Deactivating => VmState::Stopping,
            ActiveState::Inactive => VmState::Stopped,
            ActiveState::Failed => VmState::Failed,
            ActiveState::Other(_) => VmState::Unknown,
        },
    };
    let running = status.filter(|_| active);
    let uptime_secs = running
        .and_then(|s| s.active_enter_usec)
        .map(|since| now_usec.saturating_sub(since) / 1_000_000);
    let current_memory = live.and_then(|l| {
        l.base_memory
            .map(|base| Bytes(base.saturating_add(l.plugged_memory.unwrap_or(0))))
    });
    VmInfo {
        name: spec.name.clone(),
        description: spec.description.clone(),
        hypervisor: spec.hypervisor.clone(),
        state,
        autostart: None,
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
        pid: running.and_then(|s| s.main_pid),
        uptime_secs,
        cgroup_memory: running.and_then(|s| s.memory_current).map(Bytes),
        cpu_time_ns: running.and_then(|s| s.cpu_usage_nsec),
        tasks: running.and_then(|s| s.tasks_current),
        pending: None,
        unit: None,
        run_state: None,
        live: vmd_proto::LiveFacts::default(),
        last_exit: None,
        restarts: None,
        restart_needed: None,
        resources: vmd_proto::Resources::default(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::Path;

    use tokio::sync::Semaphore;
    use vmd_proto::{Cid, OperationStatus};

    use futures_util::future::BoxFuture;

    use super::*;
    use crate::drivers::fake::{FakeControl, FakeUnits};
    use crate::vms::ops::OperationLimits;

    /// A host with three declared VMs: `app-vm` (QEMU, stopped),
    /// `admin-vm` (protected, running) and `chv` (cloud-hypervisor).
    pub(crate) struct Fixture {
        pub(crate) dir: tempfile::TempDir,
        pub(crate) units: Arc<FakeUnits>,
        pub(crate) control: Arc<FakeControl>,
        pub(crate) service: VmService,
    }

    pub(crate) fn fixture(gate: Option<Arc<Semaphore>>) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("microvms");
        for name in ["app-vm", "admin-vm"] {
            std::fs::create_dir_all(state.join(name)).expect("mkdir");
            std::fs::write(state.join(name).join(format!("{name}.sock")), "")
                .expect("socket stand-in");
        }
        let inventory = dir.path().join("inventory.toml");
        std::fs::write(
            &inventory,
            r#"
            [vm.app-vm]
            hypervisor = "qemu"
            vcpus = 1
            max_vcpus = 4
            memory_mib = 1024
            max_memory_mib = 1024
            vsock_cid = 3
            [vm.admin-vm]
            hypervisor = "qemu"
            protected = true
            [vm.chv]
            hypervisor = "cloud-hypervisor"
            "#,
        )
        .expect("write inventory");
        let units = Arc::new(FakeUnits {
            gate,
            ..FakeUnits::default()
        });
        units.set("microvm@admin-vm.service", ActiveState::Active);
        units
            .wanted
            .lock()
            .expect("lock")
            .insert("microvm@admin-vm.service".into());
        let control = Arc::new(FakeControl::default());
        for name in ["app-vm", "admin-vm"] {
            control.live.lock().expect("lock").insert(
                state.join(name).join(format!("{name}.sock")),
                LiveState {
                    run_state: Some(RunState::Running),
                    vcpus: Some(1),
                    vcpu_slots: Some(4),
                    base_memory: Some(1024 << 20),
                    plugged_memory: Some(0),
                    balloon_actual: Some(1024 << 20),
                },
            );
        }
        let service = VmService::new(
            InventorySource {
                state_dir: state,
                file: Some(inventory),
            },
            units.clone(),
            control.clone(),
            Operations::new(OperationLimits::default()),
            ChangeDeadlines::default(),
        );
        Fixture {
            dir,
            units,
            control,
            service,
        }
    }

    fn vm(name: &str) -> VmName {
        VmName::new(name).expect("valid")
    }

    async fn finish(service: &VmService, op: &OperationInfo) -> OperationStatus {
        service
            .operations()
            .wait(op.id, Duration::from_secs(10), "me")
            .await
            .expect("known")
            .status
    }

    #[tokio::test]
    async fn list_tells_the_truth() {
        let f = fixture(None);
        let vms = f.service.list(&Scope::all(), "me").await.expect("lists");
        let names: Vec<_> = vms.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["admin-vm", "app-vm", "chv"]);
        let admin = &vms[0];
        assert_eq!(admin.state, VmState::Running);
        assert_eq!(admin.autostart, Some(true));
        assert!(admin.protected);
        assert_eq!(admin.pid, Some(4242));
        assert_eq!(admin.vcpus.current, Some(1));
        assert_eq!(admin.memory.current, Some(Bytes::mib(1024)));
        let app = &vms[1];
        assert_eq!(app.state, VmState::Stopped);
        assert_eq!(app.autostart, Some(false));
        assert_eq!(app.vsock_cid, Some(Cid(3)));
        assert_eq!(app.vcpus.declared, Some(1));
        // A stopped VM's (stale) socket does not make up live facts.
        assert_eq!(app.vcpus.current, None);
        assert_eq!(app.pid, None);
        assert_eq!(vms[2].hypervisor, Some(Hypervisor::CloudHypervisor));
    }

    #[tokio::test]
    async fn systemd_down_reads_unknown_not_invented() {
        let f = fixture(None);
        *f.units.down.lock().expect("lock") = true;
        let admin = f
            .service
            .get(&vm("admin-vm"), &Scope::all(), "me")
            .await
            .expect("still answers");
        assert_eq!(admin.state, VmState::Unknown);
        assert_eq!(admin.pid, None);
        assert_eq!(
            admin.vcpus.current, None,
            "live facts need a known-running unit"
        );
        assert!(matches!(
            f.service.change(&vm("app-vm"), Change::Start, "me").await,
            Err(VmError::Backend(BackendError::Unavailable(_)))
        ));
    }

    #[tokio::test]
    async fn start_then_shutdown_run_through_the_unit() {
        let f = fixture(None);
        let op = f
            .service
            .change(&vm("app-vm"), Change::Start, "me")
            .await
            .expect("accepted");
        assert_eq!(op.kind, OperationKind::Start);
        assert_eq!(finish(&f.service, &op).await, OperationStatus::Succeeded);
        assert_eq!(
            f.service
                .get(&vm("app-vm"), &Scope::all(), "me")
                .await
                .expect("get")
                .state,
            VmState::Running
        );
        let stop = Change::Shutdown {
            force: false,
            timeout: None,
        };
        let op = f
            .service
            .change(&vm("app-vm"), stop, "me")
            .await
            .expect("accepted");
        assert_eq!(finish(&f.service, &op).await, OperationStatus::Succeeded);
        assert_eq!(
            *f.units.calls.lock().expect("lock"),
            [
                "start microvm@app-vm.service",
                "stop microvm@app-vm.service"
            ]
        );
    }

    #[tokio::test]
    async fn nonsensical_changes_are_refused_without_effect() {
        let f = fixture(None);
        let stop = Change::Shutdown {
            force: true,
            timeout: None,
        };
        assert!(matches!(
            f.service.change(&vm("app-vm"), stop, "me").await,
            Err(VmError::Invalid(m)) if m == "app-vm is not running"
        ));
        assert!(matches!(
            f.service
                .change(&vm("admin-vm"), Change::Restart, "me")
                .await,
            Err(VmError::Protected(_))
        ));
        assert!(matches!(
            f.service.change(&vm("ghost"), Change::Start, "me").await,
            Err(VmError::NotFound(_))
        ));
        f.units.set("microvm@chv.service", ActiveState::Active);
        assert!(matches!(
            f.service.change(&vm("chv"), Change::Start, "me").await,
            Err(VmError::Invalid(m)) if m == "chv is already running"
        ));
        assert!(matches!(
            f.service.change(&vm("chv"), Change::Pause, "me").await,
            Err(VmError::Unsupported(_))
        ));
        assert!(f.units.calls.lock().expect("lock").is_empty());
    }

    #[tokio::test]
    async fn pause_and_resume_need_the_matching_state() {
        let f = fixture(None);
        f.units.set("microvm@app-vm.service", ActiveState::Active);
        assert!(matches!(
            f.service.change(&vm("app-vm"), Change::Resume, "me").await,
            Err(VmError::Invalid(m)) if m == "app-vm is not paused"
        ));
        let op = f
            .service
            .change(&vm("app-vm"), Change::Pause, "me")
            .await
            .expect("accepted");
        assert_eq!(finish(&f.service, &op).await, OperationStatus::Succeeded);
        assert!(matches!(
            f.service.change(&vm("app-vm"), Change::Pause, "me").await,
            Err(VmError::Invalid(m)) if m == "app-vm is already paused"
        ));
        let op = f
            .service
            .change(&vm("app-vm"), Change::Resume, "me")
            .await
            .expect("accepted");
        assert_eq!(finish(&f.service, &op).await, OperationStatus::Succeeded);
    }

    #[tokio::test]
    async fn resize_is_checked_against_the_limits() {
        let f = fixture(None);
        f.units.set("microvm@app-vm.service", ActiveState::Active);
        let resize = |vcpus, memory| Change::Resize { vcpus, memory };
        for (change, needle) in [
            (resize(None, None), "needs"),
            (resize(Some(0), None), "at least 1"),
            (resize(Some(5), None), "maximum of 4"),
            (resize(None, Some(Bytes::mib(64))), "below the minimum"),
            (resize(None, Some(Bytes::mib(2048))), "exceeds the maximum"),
        ] {
            match f.service.change(&vm("app-vm"), change, "me").await {
                Err(VmError::Invalid(m)) => assert!(m.contains(needle), "{m}"),
                other => panic!("expected Invalid({needle}), got {other:?}"),
            }
        }
        let op = f
            .service
            .change(&vm("app-vm"), resize(Some(3), Some(Bytes::mib(512))), "me")
            .await
            .expect("accepted");
        assert_eq!(finish(&f.service, &op).await, OperationStatus::Succeeded);
        let info = f
            .service
            .get(&vm("app-vm"), &Scope::all(), "me")
            .await
            .expect("get");
        assert_eq!(info.vcpus.current, Some(3));
        assert_eq!(info.memory.balloon_actual, Some(Bytes::mib(512)));
        let _ = (&f.dir, &f.control);
    }

    #[tokio::test]
    async fn concurrent_changes_get_one_accept_and_the_rest_busy() {
        let gate = Arc::new(Semaphore::new(0));
        let f = fixture(Some(gate.clone()));
        let attempts = (0..20).map(|i| {
            let service = f.service.clone();
            async move {
                let change = if i % 2 == 0 {
                    Change::Start
                } else {
                    Change::Restart
                };
                service.change(&vm("app-vm"), change, "me").await
            }
        });
        let results = join_all(attempts).await;
        let accepted: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(accepted.len(), 1, "{results:?}");
        assert!(
            results
                .iter()
                .filter(|r| r.is_err())
                .all(|r| matches!(r, Err(VmError::Busy(b)) if b.vm == "app-vm")),
            "{results:?}"
        );
        // Reads do not wait behind the change, and show it pending.
        let info = f
            .service
            .get(&vm("app-vm"), &Scope::all(), "me")
            .await
            .expect("get");
        assert_eq!(info.pending.map(|p| p.id), Some(Some(accepted[0].id)));
        let op = accepted[0].clone();
        gate.add_permits(1);
        assert_eq!(finish(&f.service, &op).await, OperationStatus::Succeeded);
        assert_eq!(f.units.calls.lock().expect("lock").len(), 1);
        assert_eq!(
            f.service
                .get(&vm("app-vm"), &Scope::all(), "me")
                .await
                .expect("get")
                .pending,
            None
        );
    }

    #[test]
    fn vm_info_maps_unit_and_hypervisor_states() {
        let spec = |hypervisor| VmSpec {
            name: vm("x"),
            description: None,
            hypervisor,
            vcpus: None,
            max_vcpus: None,
            memory: None,
            max_memory: None,
            vsock_cid: None,
            control_socket: Some(Path::new("/x.sock").to_owned()),
            vsock_uds: None,
            unit: "microvm@x.service".into(),
            protected: false,
        };
        let status = |state: ActiveState| UnitStatus {
            load_state: "loaded".into(),
            active_state: state,
            sub_state: String::new(),
            main_pid: Some(7),
            active_enter_usec: Some(1_000_000),
            memory_current: None,
            cpu_usage_nsec: None,
            tasks_current: None,
        };
        let paused = LiveState {
            run_state: Some(RunState::Paused),
            ..LiveState::default()
        };
        let s = spec(Some(Hypervisor::Qemu));
        let info = vm_info(
            &s,
            Some(&status(ActiveState::Active)),
            Some(&paused),
            61_000_000,
        );
        assert_eq!(info.state, VmState::Paused);
        assert_eq!(info.uptime_secs, Some(60));
        assert_eq!(info.pid, Some(7));
        for (state, expected) in [
            (ActiveState::Activating, VmState::Starting),
            (ActiveState::Deactivating, VmState::Stopping),
            (ActiveState::Inactive, VmState::Stopped),
            (ActiveState::Failed, VmState::Failed),
            (ActiveState::Other("maintenance".into()), VmState::Unknown),
        ] {
            let info = vm_info(&s, Some(&status(state)), Some(&paused), 0);
            assert_eq!(info.state, expected);
            assert_eq!(info.pid, None, "no PID unless running");
            assert_eq!(info.uptime_secs, None);
        }
        let mut missing = status(ActiveState::Inactive);
        missing.load_state = "not-found".into();
        assert_eq!(vm_info(&s, Some(&missing), None, 0).state, VmState::Unknown);
        assert_eq!(vm_info(&s, None, None, 0).state, VmState::Unknown);
    }

    /// A backend whose reads each take [`Slow::DELAY`] (of tokio's clock).
    #[derive(Debug)]
    struct Slow<T>(Arc<T>);

    impl<T> Slow<T> {
        const DELAY: Duration = Duration::from_millis(100);
    }

    impl<T: Units> Units for Slow<T> {
        fn status<'a>(&'a self, unit: &'a str) -> BoxFuture<'a, Result<UnitStatus, BackendError>> {
            Box::pin(async move {
                tokio::time::sleep(Self::DELAY).await;
                self.0.status(unit).await
            })
        }
        fn wanted_by<'a>(
            &'a self,
            unit: &'a str,
            target: &'a str,
        ) -> BoxFuture<'a, Result<bool, BackendError>> {
            Box::pin(async move {
                tokio::time::sleep(Self::DELAY).await;
                self.0.wanted_by(unit, target).await
            })
        }
        fn start<'a>(&'a self, u: &'a str, d: Duration) -> BoxFuture<'a, Result<(), BackendError>> {
            self.0.start(u, d)
        }
        fn stop<'a>(&'a self, u: &'a str, d: Duration) -> BoxFuture<'a, Result<(), BackendError>> {
            self.0.stop(u, d)
        }
        fn kill<'a>(&'a self, u: &'a str, d: Duration) -> BoxFuture<'a, Result<(), BackendError>> {
            self.0.kill(u, d)
        }
        fn restart<'a>(
            &'a self,
            u: &'a str,
            d: Duration,
        ) -> BoxFuture<'a, Result<(), BackendError>> {
            self.0.restart(u, d)
        }
        fn events<'a>(
            &'a self,
            units: &'a [String],
        ) -> BoxFuture<'a, Result<crate::drivers::UnitEvents, BackendError>> {
            self.0.events(units)
        }
    }

    impl<T: VmControl> VmControl for Slow<T> {
        fn query<'a>(&'a self, s: &'a Path) -> BoxFuture<'a, Result<LiveState, BackendError>> {
            Box::pin(async move {
                tokio::time::sleep(Self::DELAY).await;
                self.0.query(s).await
            })
        }
        fn pause<'a>(&'a self, s: &'a Path) -> BoxFuture<'a, Result<(), BackendError>> {
            self.0.pause(s)
        }
        fn resume<'a>(&'a self, s: &'a Path) -> BoxFuture<'a, Result<(), BackendError>> {
            self.0.resume(s)
        }
        fn set_vcpus<'a>(&'a self, s: &'a Path, n: u32) -> BoxFuture<'a, Result<(), BackendError>> {
            self.0.set_vcpus(s, n)
        }
        fn set_balloon<'a>(
            &'a self,
            s: &'a Path,
            b: u64,
        ) -> BoxFuture<'a, Result<(), BackendError>> {
            self.0.set_balloon(s, b)
        }
        fn powerdown<'a>(&'a self, s: &'a Path) -> BoxFuture<'a, Result<(), BackendError>> {
            self.0.powerdown(s)
        }
    }

    /// Every VM's reads (unit state, autostart, QMP) run at once: with
    /// each read taking 100 ms, a list of three VMs takes 100 ms of tokio's
    /// (paused, so exact) clock, where one read after another would take
    /// 800 ms (three status, three autostart, two live queries).
    #[tokio::test(start_paused = true)]
    async fn list_gathers_every_vm_at_once() {
        let f = fixture(None);
        let service = VmService::new(
            f.service.inventory.clone(),
            Arc::new(Slow(f.units.clone())),
            Arc::new(Slow(f.control.clone())),
            Operations::new(OperationLimits::default()),
            ChangeDeadlines::default(),
        );
        let began = tokio::time::Instant::now();
        let vms = service.list(&Scope::all(), "t").await.expect("listed");
        assert_eq!(vms.len(), 3);
        assert_eq!(began.elapsed(), Slow::<FakeUnits>::DELAY);
    }

    /// A hypervisor event seen during one of vmd's sessions bumps the VM
    /// whose control socket it came from, and only that one.
    #[test]
    fn hypervisor_events_bump_their_vm() {
        let f = fixture(None);
        let sink = f.control.sink.lock().expect("lock").clone().expect("set");
        let start = f.service.changes().generation();
        let socket = f.dir.path().join("microvms/app-vm/app-vm.sock");
        sink.report(&socket, "BALLOON_CHANGE");
        sink.report(&f.dir.path().join("elsewhere.sock"), "STOP");
        assert_eq!(
            f.service.changes().since(start).1,
            crate::vms::watch::Changed::Some(vec![VmName::new("app-vm").expect("valid")])
        );
    }
}
