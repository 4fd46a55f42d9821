//! Changes to VMs: validated against the live model, run as operations.
//!
//! 1. The VM must exist and not be protected.
//! 2. The VM is claimed in the operations registry before anything is
//!    awaited, so of concurrent changes exactly the first wins and the rest
//!    answer busy at once.
//! 3. The change must make sense in the VM's state as the model has it
//!    (start needs stopped, shutdown needs running, pause needs running
//!    and not paused, resume needs paused or frozen, resize needs running)
//!    and resize values must fit the VM's limits. Otherwise the claim is
//!    abandoned and the answer is `InvalidArgument`, with nothing done:
//!    starting a running VM is an error, like `virsh start` of an active
//!    domain.
//! 4. The way is chosen before the change is accepted: pause and resume
//!    of a QEMU VM, and resize, go over vmd's own monitor, or else over a
//!    session on the VM's shared control socket that is opened now (a
//!    socket another client holds fails the request at once, it does not
//!    fail the operation later); pause and resume of any other VM freeze
//!    and thaw its unit's cgroup (what Ghaf's givc does).
//! 5. The change runs in its own task with a deadline; the request returns
//!    the accepted operation immediately.

use std::sync::Arc;
use std::time::Duration;

use tracing::{Instrument, info, info_span, warn};
use vmd_proto::{Bytes, ErrorReply, Hypervisor, OperationInfo, OperationKind, VmName, VmState};

use super::model::Record;
use super::{VmError, VmService};
use crate::audit;
use crate::drivers::{ActiveState, BackendError, Control, LiveState};

/// The smallest memory a resize may ask for.
pub const MIN_MEMORY: Bytes = Bytes::mib(128);

/// How long a change waits to be served on a shared control socket.
pub const SHARED_SOCKET_PATIENCE: Duration = Duration::from_secs(1);

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
    /// Pause, resume and resize (control socket or freezer work).
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

/// How a change reaches the VM (step 4).
enum Way {
    /// Through systemd's jobs.
    Unit,
    /// Freezing or thawing the unit's cgroup.
    Freezer,
    /// Over vmd's monitor.
    Monitor(Arc<dyn Control>),
    /// Over a session on the shared socket, held until the change ends.
    Session(Box<dyn Control>),
}

impl Way {
    fn control(&self) -> Option<&dyn Control> {
        match self {
            Way::Monitor(c) => Some(c.as_ref()),
            Way::Session(c) => Some(c.as_ref()),
            Way::Unit | Way::Freezer => None,
        }
    }
}

impl VmService {
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
        let record = self
            .inner
            .model
            .get(name)
            .ok_or_else(|| VmError::NotFound(name.clone()))?;
        if record.spec.protected {
            return Err(VmError::Protected(name.clone()));
        }
        let guard = self.inner.ops.begin(name, change.kind(), owner)?;
        let way = match self.check(&record, &change).await {
            Ok(way) => way,
            Err(e) => {
                guard.abandon();
                return Err(e);
            }
        };
        let accepted = guard.info().clone();
        // Watchers see the pending operation now and its end later.
        self.changes().bump(name);
        let service = self.clone();
        let owner = owner.to_owned();
        let span = info_span!("operation", id = %accepted.id, vm = %name, kind = %accepted.kind);
        tokio::spawn(
            async move {
                info!("started");
                let result = service.run(&record, &change, way).await;
                match &result {
                    Ok(()) => info!("succeeded"),
                    Err(e) => warn!(error = %e, "failed"),
                }
                let result = result.map_err(ErrorReply::from);
                crate::metrics::COUNTERS.operation(guard.info().kind, result.is_ok());
                let kind = guard.info().kind.to_string();
                audit::finished(
                    &owner,
                    record.spec.name.as_str(),
                    guard.info().id,
                    &kind,
                    &audit::Outcome::Finished(result.clone()),
                );
                guard.finish(result);
                service.changes().bump(&record.spec.name);
            }
            .instrument(span),
        );
        Ok(accepted)
    }

    /// Whether `change` makes sense for the VM now (step 3), and how it
    /// goes (step 4).
    async fn check(&self, record: &Record, change: &Change) -> Result<Way, VmError> {
        let name = &record.spec.name;
        let fresh;
        let unit = match &record.facts.unit {
            Some(unit) => unit,
            None => {
                // systemd was out of reach: ask it now (a change may wait
                // on the bus; a read never does), and if it answers, have
                // the follower subscribe again at once.
                fresh = self.inner.units.status(&record.spec.unit).await?;
                self.inner.resubscribe.notify_one();
                &fresh
            }
        };
        let running = unit.is_active();
        let state = self.state_now(record);
        match change {
            Change::Start if running || unit.active_state == ActiveState::Activating => {
                return Err(VmError::Invalid(format!("{name} is already running")));
            }
            Change::Start | Change::Restart => return Ok(Way::Unit),
            Change::Shutdown { .. } if !running && state != VmState::Restarting => {
                return Err(VmError::Invalid(format!("{name} is not running")));
            }
            Change::Shutdown { .. } => return Ok(Way::Unit),
            _ if !running => return Err(VmError::Invalid(format!("{name} is not running"))),
            _ => {}
        }
        match change {
            Change::Pause if matches!(state, VmState::Paused | VmState::Frozen) => {
                Err(VmError::Invalid(format!("{name} is already paused")))
            }
            Change::Resume if state == VmState::Frozen => Ok(Way::Freezer),
            Change::Resume if state != VmState::Paused => {
                Err(VmError::Invalid(format!("{name} is not paused")))
            }
            Change::Pause if !record.speaks_qmp() => Ok(Way::Freezer),
            Change::Pause | Change::Resume => self.control_way(record).await,
            Change::Resize { vcpus, memory } => {
                if vcpus.is_none() && memory.is_none() {
                    return Err(VmError::Invalid(
                        "resize needs a vCPU count, a memory size, or both".into(),
                    ));
                }
                if !record.speaks_qmp() {
                    return Err(VmError::Unsupported(unsupported_resize(record)));
                }
                let way = self.control_way(record).await?;
                let live = match (&way, &record.facts.live) {
                    (Way::Monitor(_), Some(live)) => live.clone(),
                    _ => match way.control() {
                        Some(control) => control.query().await?,
                        None => LiveState::default(),
                    },
                };
                check_resize(record, &live, *vcpus, *memory)?;
                Ok(way)
            }
            Change::Start | Change::Restart | Change::Shutdown { .. } => Ok(Way::Unit),
        }
    }

    /// vmd's monitor, else a session on the shared socket opened now.
    async fn control_way(&self, record: &Record) -> Result<Way, VmError> {
        if let Some(monitor) = &record.monitor {
            return Ok(Way::Monitor(Arc::clone(&monitor.control)));
        }
        let Some(socket) = &record.spec.control_socket else {
            return Err(VmError::Unsupported(format!(
                "{}: no QEMU control socket is declared",
                record.spec.name
            )));
        };
        match self
            .inner
            .control
            .open(socket, SHARED_SOCKET_PATIENCE)
            .await
        {
            Ok(session) => Ok(Way::Session(session)),
            Err(BackendError::SocketBusy(_) | BackendError::Timeout(_)) => {
                Err(VmError::SocketHeld(record.spec.name.clone()))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Runs a change to its end, bounded by its deadline.
    async fn run(&self, record: &Record, change: &Change, way: Way) -> Result<(), VmError> {
        let d = self.inner.deadlines;
        let units = &self.inner.units;
        let unit = record.spec.unit.as_str();
        let work = async {
            match change {
                Change::Start => {
                    units.start(unit, d.start).await?;
                    self.await_live(record).await?;
                }
                Change::Shutdown { force: true, .. } => {
                    units.kill(unit, d.kill).await?;
                    // A unit with Restart= (microvm.nix sets it) comes back
                    // after a kill; a stop job cancels the pending restart.
                    units.stop(unit, d.kill).await?;
                }
                Change::Shutdown {
                    force: false,
                    timeout,
                } => {
                    units.stop(unit, timeout.unwrap_or(d.shutdown)).await?;
                    // The stop job is done even when ExecStop timed out and
                    // systemd killed the VM: that is no clean shutdown.
                    let status = units.status(unit).await?;
                    match status.result.as_deref() {
                        Some("success") | None => {}
                        Some(result) => {
                            return Err(VmError::Backend(BackendError::Unclean {
                                unit: unit.to_owned(),
                                result: result.to_owned(),
                            }));
                        }
                    }
                }
                Change::Restart => {
                    units.restart(unit, d.restart).await?;
                    self.await_live(record).await?;
                }
                Change::Pause | Change::Resume if matches!(way, Way::Freezer) => {
                    if *change == Change::Pause {
                        units.freeze(unit, d.control).await?;
                    } else {
                        units.thaw(unit, d.control).await?;
                    }
                }
                Change::Pause | Change::Resume | Change::Resize { .. } => {
                    let control = way.control().ok_or_else(|| {
                        VmError::Unsupported(format!("{}: no control channel", record.spec.name))
                    })?;
                    match change {
                        Change::Pause => control.pause().await?,
                        Change::Resume => control.resume().await?,
                        Change::Resize { vcpus, memory } => {
                            if let Some(n) = vcpus {
                                control.set_vcpus(*n).await?;
                            }
                            if let Some(bytes) = memory {
                                control.set_balloon(bytes.0).await?;
                            }
                        }
                        _ => {}
                    }
                    // What the change did, without waiting for events.
                    if let Ok(live) = control.query().await {
                        self.apply_change_result(record, live, &way);
                    }
                }
            }
            Ok(())
        };
        // The drivers bound their own calls; this caps the whole change.
        let cap = match change {
            Change::Start => d.start,
            Change::Shutdown { force: true, .. } => d.kill * 2,
            Change::Shutdown { timeout, .. } => timeout.unwrap_or(d.shutdown),
            Change::Restart => d.restart,
            _ => d.control,
        } + Duration::from_secs(5);
        let result = tokio::time::timeout(cap, work)
            .await
            .unwrap_or_else(|_| Err(VmError::Backend(BackendError::Timeout(unit.to_owned()))));
        if matches!(way, Way::Unit | Way::Freezer) {
            // What systemd says now, before the operation ends: a client
            // that saw it succeed reads the new state (the follower's
            // signal may come a moment later).
            if let Ok(status) = units.status(unit).await {
                self.apply_unit(&record.spec.name, status);
            }
        }
        result
    }

    /// After a start, waits until the model has the hypervisor's live
    /// facts, so a succeeded start means a VM that can be queried and
    /// resized. (A unit of `Type=simple` is active the moment its process
    /// is forked, before QEMU has opened its sockets.) Woken by the model;
    /// the caller's deadline bounds it.
    async fn await_live(&self, record: &Record) -> Result<(), VmError> {
        if !record.speaks_qmp() {
            return Ok(());
        }
        let name = &record.spec.name;
        let mut wake = self.changes().subscribe();
        // The start job is done: what systemd says now is current.
        let status = self.inner.units.status(&record.spec.unit).await?;
        self.apply_unit(name, status);
        loop {
            wake.borrow_and_update();
            let Some(now) = self.inner.model.get(name) else {
                return Err(VmError::NotFound(name.clone()));
            };
            if now.facts.live.is_some() && now.is_active() {
                return Ok(());
            }
            let unit = now.facts.unit.as_ref();
            if !unit.is_some_and(|u| {
                matches!(
                    u.active_state,
                    ActiveState::Active | ActiveState::Activating | ActiveState::Reloading
                )
            }) {
                return Err(VmError::Backend(BackendError::JobFailed {
                    unit: record.spec.unit.clone(),
                    result: format!(
                        "stopped during start ({})",
                        unit.map_or("unknown", |u| u.sub_state.as_str())
                    ),
                }));
            }
            if now.monitor.is_none() && !now.attaching && !now.refreshing {
                // No monitor of vmd's own: ask the shared socket.
                self.refresh(name);
            }
            // The sender lives as long as the model.
            let _ = wake.changed().await;
        }
    }

    /// Records the live facts read after a change.
    fn apply_change_result(&self, record: &Record, live: LiveState, way: &Way) {
        let source = match way {
            Way::Monitor(_) => vmd_proto::LiveSource::Monitor,
            _ => vmd_proto::LiveSource::SharedSocket,
        };
        self.inner.model.update(&record.spec.name, |r| {
            if r.is_active() {
                r.apply_live(live, source);
            }
        });
    }
}

/// Why a VM cannot be resized.
fn unsupported_resize(record: &Record) -> String {
    let name = &record.spec.name;
    match &record.spec.hypervisor {
        Some(Hypervisor::Qemu) => format!("{name}: no QEMU control socket is declared"),
        Some(h) => format!(
            "{name} runs on {h}: vmd resizes VMs over QEMU's QMP only; \
             a driver for {h}'s control socket is not written yet"
        ),
        None => format!("{name}: its hypervisor is not declared"),
    }
}

/// Resize values against the VM's limits.
fn check_resize(
    record: &Record,
    live: &LiveState,
    vcpus: Option<u32>,
    memory: Option<Bytes>,
) -> Result<(), VmError> {
    let spec = &record.spec;
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
