//! Drivers: where facts about VMs come from and where changes go.
//!
//! Small consumer-side traits, so the VM service can be unit-tested with
//! fakes while system tests use the real programs. Nothing here knows about
//! clients or the live model: drivers report what the programs say.
//!
//! - [`Units`]: the service manager (systemd over D-Bus, [`systemd`]) that
//!   runs each VM as a unit (`microvm@NAME.service`): unit state without
//!   loading units, the signals of the declared units, start/stop/kill/
//!   restart and freeze/thaw with a deadline.
//! - [`VmControl`]: the hypervisor's control sockets (QEMU QMP, [`qemu`]):
//!   vmd's own monitor, held for the VM's life and reporting the
//!   hypervisor's events, and short sessions on the VM's shared socket.
//!   Either gives a [`Control`]: live facts, pause/resume, vCPU hot-plug,
//!   balloon target, ACPI power button.
//! - [`cgroup`]: CPU time and memory of a unit, read from its cgroup on
//!   request (no bus call).
//!
//! A crosvm driver would be another [`VmControl`] (crosvm's control socket
//! speaks its own protocol); crosvm ships in no package registry and cannot
//! run a guest on this project's test machines, so it is not written yet:
//! crosvm VMs get what systemd and the kernel give.

pub mod cgroup;
#[cfg(any(test, feature = "test-backends"))]
pub mod fake;
pub mod qemu;
pub mod systemd;

use std::path::Path;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;

/// What the service manager signals about the followed units: see
/// [`Units::events`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UnitEvent {
    /// The unit's state changed or one of its jobs ended.
    Changed(String),
    /// Any unit may have changed (the manager reloaded or restarted):
    /// read them all again.
    Resync,
}

/// A stream of [`UnitEvent`]s.
pub type UnitEvents = BoxStream<'static, UnitEvent>;

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
    /// A stop finished, but systemd says the unit did not end cleanly
    /// (its `ExecStop` timed out and the processes were killed, …).
    #[error("{unit} stopped, but not cleanly (systemd's result: {result})")]
    Unclean {
        /// The unit.
        unit: String,
        /// systemd's `Result` of the unit (`timeout`, `signal`, …).
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
/// reports "not set".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnitStatus {
    /// `LoadState` (`loaded`, `not-found`, …), or [`NOT_LOADED`] for a
    /// unit systemd has not loaded: it is inactive (a template instance
    /// before its first start, or after systemd unloaded it).
    pub load_state: String,
    /// `ActiveState`.
    pub active_state: ActiveState,
    /// `SubState` (`running`, `dead`, `auto-restart`, …).
    pub sub_state: String,
    /// `FreezerState` (`running`, `frozen`, …).
    pub freezer_state: Option<String>,
    /// `MainPID`, if there is one.
    pub main_pid: Option<u32>,
    /// `ActiveEnterTimestamp`, in microseconds since the Unix epoch.
    pub active_enter_usec: Option<u64>,
    /// The service's `Result` (`success`, `exit-code`, `signal`,
    /// `timeout`, …).
    pub result: Option<String>,
    /// How the main process last ended, if it did.
    pub exit: Option<ProcessExit>,
    /// `NRestarts`: automatic restarts since the unit was loaded.
    pub n_restarts: Option<u32>,
    /// `ControlGroup`, relative to the cgroup hierarchy's root.
    pub control_group: Option<String>,
}

/// The `load_state` of a unit systemd has not loaded.
pub const NOT_LOADED: &str = "not-loaded";

impl UnitStatus {
    /// A unit systemd has not loaded: inactive, nothing known.
    pub fn not_loaded() -> Self {
        Self {
            load_state: NOT_LOADED.to_owned(),
            active_state: ActiveState::Inactive,
            sub_state: "dead".to_owned(),
            freezer_state: None,
            main_pid: None,
            active_enter_usec: None,
            result: None,
            exit: None,
            n_restarts: None,
            control_group: None,
        }
    }

    /// Whether the unit runs (`active` or `reloading`).
    pub fn is_active(&self) -> bool {
        matches!(
            self.active_state,
            ActiveState::Active | ActiveState::Reloading
        )
    }
}

/// How a unit's main process ended (`ExecMainCode`, `ExecMainStatus`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessExit {
    /// Exited with this status (`CLD_EXITED`).
    pub status: Option<i32>,
    /// Ended by this signal (`CLD_KILLED`, `CLD_DUMPED`).
    pub signal: Option<i32>,
    /// `ExecMainExitTimestamp`, in microseconds since the Unix epoch.
    pub at_usec: Option<u64>,
}

/// The service manager that runs VMs as units.
pub trait Units: Send + Sync + std::fmt::Debug {
    /// The unit's state. Never loads a unit: one systemd has not loaded
    /// is [`UnitStatus::not_loaded`].
    fn status<'a>(&'a self, unit: &'a str) -> BoxFuture<'a, Result<UnitStatus, BackendError>>;

    /// The states of `units`, in order, in as few calls as the manager
    /// allows; never loads a unit.
    fn statuses<'a>(
        &'a self,
        units: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<UnitStatus>, BackendError>>;

    /// The units `target` wants (autostart). Empty when the target does
    /// not exist.
    fn wants<'a>(&'a self, target: &'a str) -> BoxFuture<'a, Result<Vec<String>, BackendError>>;

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

    /// Freezes every process of the unit (cgroup freezer), and waits
    /// until it is frozen.
    fn freeze<'a>(
        &'a self,
        unit: &'a str,
        deadline: Duration,
    ) -> BoxFuture<'a, Result<(), BackendError>>;

    /// Thaws a frozen unit.
    fn thaw<'a>(
        &'a self,
        unit: &'a str,
        deadline: Duration,
    ) -> BoxFuture<'a, Result<(), BackendError>>;

    /// A stream of [`UnitEvent`]s for `units`: one each time one's state
    /// changes or a job of it ends, and a resync when the manager reloads,
    /// as the service manager signals it (nothing polls; other units'
    /// signals are not even delivered). It ends when the connection behind
    /// it does; events may have been lost then.
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
    /// Any other state, by QEMU's name (`inmigrate`, `guest-panicked`, …).
    Other(String),
}

impl RunState {
    /// QEMU's name of the state.
    pub fn name(&self) -> &str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Shutdown => "shutdown",
            Self::Other(name) => name,
        }
    }
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

/// Live facts from the hypervisor.
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
    /// The devices the hypervisor has, as (id, type), including ones
    /// another client attached at run time.
    pub devices: Option<Vec<(String, String)>>,
}

/// An event of a hypervisor whose monitor vmd holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LiveEvent {
    /// The run state changed (`STOP`, `RESUME`, `SHUTDOWN`,
    /// `GUEST_PANICKED`).
    RunState(RunState),
    /// The balloon reached a new size (`BALLOON_CHANGE`), bytes.
    BalloonActual(u64),
    /// Something the event does not carry changed (`DEVICE_DELETED`,
    /// `ACPI_DEVICE_OST`, `MEMORY_DEVICE_SIZE_CHANGE`, `RESET`): query
    /// again.
    Changed,
    /// The monitor's connection ended: the hypervisor process is gone
    /// (or closed the monitor). Sent once, last.
    Gone,
}

/// Where a held monitor's events go.
pub type LiveEvents = std::sync::Arc<dyn Fn(LiveEvent) + Send + Sync>;

/// One channel to a VM's hypervisor: vmd's held monitor, or a session on
/// the VM's shared control socket (which ends when this is dropped).
pub trait Control: Send + Sync + std::fmt::Debug {
    /// Live facts: every query at once.
    fn query(&self) -> BoxFuture<'_, Result<LiveState, BackendError>>;

    /// Pauses the guest's vCPUs (`stop`).
    fn pause(&self) -> BoxFuture<'_, Result<(), BackendError>>;

    /// Resumes the guest (`cont`).
    fn resume(&self) -> BoxFuture<'_, Result<(), BackendError>>;

    /// Hot-adds or removes vCPUs until `count` are present.
    fn set_vcpus(&self, count: u32) -> BoxFuture<'_, Result<(), BackendError>>;

    /// Sets the balloon target: the guest's memory size, in bytes.
    fn set_balloon(&self, bytes: u64) -> BoxFuture<'_, Result<(), BackendError>>;

    /// Presses the ACPI power button (`system_powerdown`).
    fn powerdown(&self) -> BoxFuture<'_, Result<(), BackendError>>;
}

/// What [`VmControl::attach`] gives: the monitor and the live facts at
/// attach.
pub type Attach = (std::sync::Arc<dyn Control>, LiveState);

/// The hypervisor's control sockets.
pub trait VmControl: Send + Sync + std::fmt::Debug {
    /// Attaches vmd's own monitor at `socket` (a socket no one else uses)
    /// and holds it: returns a channel for commands and the live facts at
    /// attach; `events` receives every later event until the connection
    /// ends ([`LiveEvent::Gone`], last). Bounded by the driver's timeout.
    fn attach<'a>(
        &'a self,
        socket: &'a Path,
        events: LiveEvents,
    ) -> BoxFuture<'a, Result<Attach, BackendError>>;

    /// Opens a session on the VM's shared control socket, which serves
    /// one client at a time: [`BackendError::SocketBusy`] or
    /// [`BackendError::Timeout`] if another client holds it past
    /// `patience`. The session ends when the channel drops.
    fn open<'a>(
        &'a self,
        socket: &'a Path,
        patience: Duration,
    ) -> BoxFuture<'a, Result<Box<dyn Control>, BackendError>>;
}
