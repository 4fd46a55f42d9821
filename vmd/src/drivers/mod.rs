//! Backends: where facts about VMs come from and where changes go.
//!
//! Two small consumer-side traits, so request handling can be unit-tested
//! with fakes while system tests use the real programs:
//!
//! - [`Units`]: the service manager (systemd over D-Bus, [`systemd`]) that
//!   runs each VM as a unit (`microvm@NAME.service`): unit state and cgroup
//!   accounting, start/stop/kill/restart with a deadline.
//! - [`VmControl`]: the hypervisor's control socket (QEMU QMP, [`qmp`]):
//!   live vCPUs, memory and balloon, pause/resume, vCPU hot-plug, balloon
//!   target, ACPI power button.
//!
//! Both are queried on request only; nothing here polls. [`Units::events`]
//! streams the service manager's own signals for `Watch`.

#[cfg(any(test, feature = "test-backends"))]
pub mod fake;
pub mod qemu;
pub mod systemd;

use std::path::Path;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;

/// The names of units as they change (state, jobs, loading): see
/// [`Units::events`].
pub type UnitEvents = BoxStream<'static, String>;

/// A backend call failed. Mapped to the wire error in `handler`.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The backend cannot be reached (bus down, socket missing or refusing).
    #[error("{0} is unavailable")]
    Unavailable(String),
    /// The control socket is held by another client (QMP serves one at a time).
    #[error("{0} is busy with another client")]
    SocketBusy(String),
    /// The service manager has no such unit.
    #[error("no unit {0}")]
    NoSuchUnit(String),
    /// A systemd job ended with a result other than `done`.
    #[error("{unit}: job ended with result {result}")]
    JobFailed {
        /// The unit.
        unit: String,
        /// systemd's job result (`failed`, `timeout`, `canceled`, …).
        result: String,
    },
    /// The call did not finish within its deadline.
    #[error("{0} timed out")]
    Timeout(String),
    /// The backend refused a command (a QMP command, a systemd method).
    #[error("{command} failed: {description}")]
    Command {
        /// The command or method.
        command: String,
        /// The backend's error description.
        description: String,
    },
    /// The peer spoke something unexpected.
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// systemd's `ActiveState` of a unit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ActiveState {
    /// `active`
    Active,
    /// `reloading`
    Reloading,
    /// `inactive`
    Inactive,
    /// `failed`
    Failed,
    /// `activating`
    Activating,
    /// `deactivating`
    Deactivating,
    /// Any other state (`maintenance`, `refreshing`, …).
    Other(String),
}

impl ActiveState {
    /// Parses systemd's string form.
    pub fn parse(s: &str) -> Self {
        match s {
            "active" => Self::Active,
            "reloading" => Self::Reloading,
            "inactive" => Self::Inactive,
            "failed" => Self::Failed,
            "activating" => Self::Activating,
            "deactivating" => Self::Deactivating,
            other => Self::Other(other.to_owned()),
        }
    }
}

/// What the service manager knows of one unit. `None` where systemd
/// reports "not set" (for example no cgroup accounting).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnitStatus {
    /// `LoadState` (`loaded`, `not-found`, …).
    pub load_state: String,
    /// `ActiveState`.
    pub active_state: ActiveState,
    /// `SubState` (`running`, `dead`, `exited`, …).
    pub sub_state: String,
    /// `MainPID`, if there is one.
    pub main_pid: Option<u32>,
    /// `ActiveEnterTimestamp`, in microseconds since the Unix epoch.
    pub active_enter_usec: Option<u64>,
    /// `MemoryCurrent`, in bytes.
    pub memory_current: Option<u64>,
    /// `CPUUsageNSec`.
    pub cpu_usage_nsec: Option<u64>,
    /// `TasksCurrent`.
    pub tasks_current: Option<u64>,
}

/// The service manager that runs VMs as units.
pub trait Units: Send + Sync + std::fmt::Debug {
    /// The unit's state and accounting.
    fn status<'a>(&'a self, unit: &'a str) -> BoxFuture<'a, Result<UnitStatus, BackendError>>;

    /// Whether `target` wants `unit` (autostart). `Ok(false)` when the
    /// target does not exist.
    fn wanted_by<'a>(
        &'a self,
        unit: &'a str,
        target: &'a str,
    ) -> BoxFuture<'a, Result<bool, BackendError>>;

    /// Starts the unit and waits until its job finishes or `deadline`.
    fn start<'a>(
        &'a self,
        unit: &'a str,
        deadline: Duration,
    ) -> BoxFuture<'a, Result<(), BackendError>>;

    /// Stops the unit (its own `ExecStop` runs) and waits for the job.
    fn stop<'a>(
        &'a self,
        unit: &'a str,
        deadline: Duration,
    ) -> BoxFuture<'a, Result<(), BackendError>>;

    /// Sends SIGKILL to every process of the unit, then waits until it is
    /// inactive or failed.
    fn kill<'a>(
        &'a self,
        unit: &'a str,
        deadline: Duration,
    ) -> BoxFuture<'a, Result<(), BackendError>>;

    /// Restarts the unit (starts it if stopped) and waits for the job.
    fn restart<'a>(
        &'a self,
        unit: &'a str,
        deadline: Duration,
    ) -> BoxFuture<'a, Result<(), BackendError>>;

    /// A stream of the names of `units`, one each time one's state
    /// changes or a job of it ends, as the service manager signals it
    /// (nothing polls; other units' signals are not even delivered). It
    /// ends when the connection behind it does; events may have been lost
    /// then.
    fn events<'a>(&'a self, units: &'a [String])
    -> BoxFuture<'a, Result<UnitEvents, BackendError>>;
}

/// The hypervisor's run state (QMP `query-status`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunState {
    /// vCPUs run.
    Running,
    /// Stopped by a client (`stop`) or waiting to be resumed.
    Paused,
    /// Shutting down or shut down.
    Shutdown,
    /// Any other state, by QEMU's name (`inmigrate`, `internal-error`, …).
    Other(String),
}

/// A hot-pluggable vCPU slot (QMP `query-hotpluggable-cpus`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuSlot {
    /// The device type to `device_add` (e.g. `qemu64-x86_64-cpu`).
    pub driver: String,
    /// The slot's properties (`socket-id`, `core-id`, `thread-id`, …).
    pub props: Vec<(String, i64)>,
    /// The QOM path of the vCPU plugged in this slot, if any.
    pub qom_path: Option<String>,
}

/// Live facts from the control socket.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LiveState {
    /// `query-status`.
    pub run_state: Option<RunState>,
    /// vCPUs present (`query-cpus-fast`).
    pub vcpus: Option<u32>,
    /// Slots for vCPUs (`query-hotpluggable-cpus`): the hot-plug maximum.
    pub vcpu_slots: Option<u32>,
    /// Boot memory (`query-memory-size-summary` `base-memory`), bytes.
    pub base_memory: Option<u64>,
    /// Hot-plugged memory (`plugged-memory`), bytes.
    pub plugged_memory: Option<u64>,
    /// The balloon's guest size (`query-balloon` `actual`), bytes.
    pub balloon_actual: Option<u64>,
}

/// The hypervisor's control socket of one VM. Implementations serialize
/// calls per socket and bound each by their own timeout.
pub trait VmControl: Send + Sync + std::fmt::Debug {
    /// Live facts: every query in one short session.
    fn query<'a>(&'a self, socket: &'a Path) -> BoxFuture<'a, Result<LiveState, BackendError>>;

    /// Pauses the guest's vCPUs (`stop`).
    fn pause<'a>(&'a self, socket: &'a Path) -> BoxFuture<'a, Result<(), BackendError>>;

    /// Resumes the guest (`cont`).
    fn resume<'a>(&'a self, socket: &'a Path) -> BoxFuture<'a, Result<(), BackendError>>;

    /// Hot-adds or removes vCPUs until `count` are present.
    fn set_vcpus<'a>(
        &'a self,
        socket: &'a Path,
        count: u32,
    ) -> BoxFuture<'a, Result<(), BackendError>>;

    /// Sets the balloon target: the guest's memory size, in bytes.
    fn set_balloon<'a>(
        &'a self,
        socket: &'a Path,
        bytes: u64,
    ) -> BoxFuture<'a, Result<(), BackendError>>;

    /// Presses the ACPI power button (`system_powerdown`).
    fn powerdown<'a>(&'a self, socket: &'a Path) -> BoxFuture<'a, Result<(), BackendError>>;

    /// Where the hypervisor's events go (QMP `STOP`, `RESUME`, `SHUTDOWN`,
    /// `BALLOON_CHANGE`, `DEVICE_DELETED`, …), as `sink(socket, event)`.
    /// Only events that arrive while vmd holds a session (a query or a
    /// change) are seen: vmd holds no connection between them. Default:
    /// none are reported.
    fn set_event_sink(&self, sink: EventSink) {
        let _ = sink;
    }
}

/// Receives a hypervisor's events: the control socket and the event name.
#[derive(Clone)]
pub struct EventSink(std::sync::Arc<EventFn>);

/// What an [`EventSink`] calls.
type EventFn = dyn Fn(&Path, &str) + Send + Sync;

impl EventSink {
    /// A sink calling `f(socket, event)`.
    pub fn new(f: impl Fn(&Path, &str) + Send + Sync + 'static) -> Self {
        Self(std::sync::Arc::new(f))
    }

    /// Reports `event` from `socket`.
    pub fn report(&self, socket: &Path, event: &str) {
        (self.0)(socket, event);
    }
}

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventSink")
    }
}
