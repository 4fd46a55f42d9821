//! Every message that crosses the wire.
//!
//! A session runs in this order:
//! 1. The client sends [`Hello`].
//! 2. The server answers [`HelloReply`]: `Ok(Welcome)` or `Err(ErrorReply)`
//!    (for example [`ErrorReply::VersionMismatch`]), then closes on error.
//! 3. The client sends any number of [`Request`]s, without waiting for
//!    replies; the server answers each with a [`Response`] carrying the same
//!    `id`, in whatever order they finish.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::types::{Bytes, Cid, Hypervisor, OperationId, OperationKind, Role, VmName, VmState};

/// First frame from the client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The client's [`crate::PROTOCOL_VERSION`].
    pub protocol: u16,
    /// Free-form client name and version, for the server's log.
    pub client_name: String,
}

/// The server's answer to [`Hello`].
pub type HelloReply = Result<Welcome, ErrorReply>;

/// The server accepted the session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The server's [`crate::PROTOCOL_VERSION`] (equal to the client's).
    pub protocol: u16,
    /// The daemon's version string.
    pub server_version: String,
    /// The identity the server verified from the client certificate.
    pub identity: String,
    /// The client's role, or `None` if its identity has no rights.
    pub role: Option<Role>,
}

/// A request. `id` is chosen by the client and echoed in the [`Response`];
/// ids of requests in flight on one connection should be distinct.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Correlates the response.
    pub id: u32,
    /// What to do.
    pub body: Op,
}

/// The operation vocabulary. Reads answer at once; changes answer
/// [`Reply::Accepted`] at once and run as an operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Host capabilities and resources. Replies [`Reply::Host`]. The
    /// host facts may be up to a second old (requests within a second
    /// share one reading); `vmd_uptime_secs` is always current.
    Host,
    /// Every VM the client may see. Replies [`Reply::Vms`].
    ListVms,
    /// One VM. Replies [`Reply::Vm`]; [`ErrorReply::NotFound`] if unknown.
    GetVm {
        /// The VM.
        name: VmName,
    },
    /// Start a stopped VM. Replies [`Reply::Accepted`].
    Start {
        /// The VM.
        name: VmName,
    },
    /// Shut a running VM down: gracefully through its unit's stop, or by
    /// killing it when `force` is set (admin only). Replies [`Reply::Accepted`].
    Shutdown {
        /// The VM.
        name: VmName,
        /// Kill instead of a graceful stop.
        force: bool,
        /// How long the graceful stop may take before the operation fails,
        /// in seconds; `None` for the server default.
        timeout_secs: Option<u32>,
    },
    /// Restart a VM (start it if stopped). Replies [`Reply::Accepted`].
    Restart {
        /// The VM.
        name: VmName,
    },
    /// Pause a running VM's vCPUs, where the hypervisor can.
    Pause {
        /// The VM.
        name: VmName,
    },
    /// Resume a paused VM.
    Resume {
        /// The VM.
        name: VmName,
    },
    /// Change a running VM's resources live (admin only). At least one of
    /// `vcpus` and `memory` is set. Replies [`Reply::Accepted`].
    Resize {
        /// The VM.
        name: VmName,
        /// New number of online vCPUs.
        vcpus: Option<u32>,
        /// New guest memory target.
        memory: Option<Bytes>,
    },
    /// The state of an operation. Replies [`Reply::Operation`].
    GetOperation {
        /// The operation.
        id: OperationId,
    },
    /// Wait until an operation ends or `timeout_ms` passes, then reply
    /// [`Reply::Operation`] with its state at that moment.
    WaitOperation {
        /// The operation.
        id: OperationId,
        /// Longest wait, in milliseconds (the server caps it).
        timeout_ms: u32,
    },
    /// Long-poll for changes: reply [`Reply::Changed`] at once if a VM
    /// the caller may see (and named in `vms`, if any) changed after
    /// generation `since`, else as soon as one does, or with nothing
    /// changed when `timeout_ms` passes. Other requests on the connection
    /// are served meanwhile.
    Watch {
        /// The generation of the caller's last [`WatchEvent`]; 0 (or a
        /// generation of an earlier daemon run) for a full snapshot.
        since: u64,
        /// Only these VMs; empty for every VM the caller may see.
        vms: Vec<VmName>,
        /// Longest wait, in milliseconds (the server caps it).
        timeout_ms: u32,
    },
    /// What this session may do: its role and which of the VMs it sees
    /// it may change. Replies [`Reply::Rights`]. Appended in protocol 2:
    /// an older server answers [`ErrorReply::Malformed`].
    Rights,
}

impl Op {
    /// A short name for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::ListVms => "list-vms",
            Self::GetVm { .. } => "get-vm",
            Self::Start { .. } => "start",
            Self::Shutdown { .. } => "shutdown",
            Self::Restart { .. } => "restart",
            Self::Pause { .. } => "pause",
            Self::Resume { .. } => "resume",
            Self::Resize { .. } => "resize",
            Self::GetOperation { .. } => "get-operation",
            Self::WaitOperation { .. } => "wait-operation",
            Self::Watch { .. } => "watch",
            Self::Rights => "rights",
        }
    }

    /// The VM the request names, if any.
    pub fn vm(&self) -> Option<&VmName> {
        match self {
            Self::GetVm { name }
            | Self::Start { name }
            | Self::Shutdown { name, .. }
            | Self::Restart { name }
            | Self::Pause { name }
            | Self::Resume { name }
            | Self::Resize { name, .. } => Some(name),
            Self::Host
            | Self::ListVms
            | Self::GetOperation { .. }
            | Self::WaitOperation { .. }
            | Self::Watch { .. }
            | Self::Rights => None,
        }
    }
}

/// The answer to the [`Request`] with the same `id`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The request's id; 0 when the request was too broken to read one.
    pub id: u32,
    /// The reply or the error.
    pub result: Result<Reply, ErrorReply>,
}

/// A successful reply; the variant matches the request (see [`Op`]).
// A reply lives for one encode; boxing `Vm` would only move the bytes.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// For [`Op::Host`].
    Host(HostInfo),
    /// For [`Op::ListVms`], sorted by name.
    Vms(Vec<VmInfo>),
    /// For [`Op::GetVm`].
    Vm(VmInfo),
    /// For changes: the operation now running.
    Accepted(OperationInfo),
    /// For [`Op::GetOperation`] and [`Op::WaitOperation`].
    Operation(OperationInfo),
    /// For [`Op::Watch`].
    Changed(WatchEvent),
    /// For [`Op::Rights`].
    Rights(Rights),
}

/// What a session may do, as the server's policy decides it for the
/// identity the session was opened with (a policy reload applies to new
/// sessions).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rights {
    /// The identity the server verified from the client certificate.
    pub identity: String,
    /// The session's role, or `None` if its identity has no rights.
    pub role: Option<Role>,
    /// The VMs, among those the session sees now, that its role may
    /// change: inside its change scope and not protected. Sorted; empty
    /// for a reader. Which changes the role allows follows from the role
    /// (`operator`: start, stop, restart, pause, resume; `admin`: also
    /// force stop and resize).
    pub changeable: Vec<VmName>,
}

impl Rights {
    /// Whether the session may change `vm`.
    pub fn may_change(&self, vm: &VmName) -> bool {
        self.changeable.binary_search(vm).is_ok()
    }
}

/// Why a request failed. The set is closed: a client can handle every case.
/// Messages are for people; they never carry server internals.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(remote = "Self")]
pub enum ErrorReply {
    /// The peer has no verified identity.
    #[error("not authenticated")]
    Unauthenticated,
    /// The identity may not do this (role, scope, protected VM, transport).
    #[error("forbidden: {reason}")]
    Forbidden {
        /// Which rule refused it.
        reason: String,
    },
    /// No such VM or operation (or none the client may see).
    #[error("not found: {what}")]
    NotFound {
        /// What was looked up.
        what: String,
    },
    /// The VM is in the middle of another change, or the host runs as many
    /// changes as it allows. Retry later; nothing was done.
    #[error("busy: {vm} is running {operation} (since {since_unix_ms} ms after the epoch)")]
    Busy {
        /// The VM (or `*` for the host-wide cap).
        vm: String,
        /// The change in progress.
        operation: OperationKind,
        /// When that change started, in milliseconds since the Unix epoch.
        since_unix_ms: u64,
    },
    /// This server, VM or hypervisor cannot do this.
    #[error("unsupported: {reason}")]
    Unsupported {
        /// Why.
        reason: String,
    },
    /// A request field is out of range or inconsistent.
    #[error("invalid argument: {reason}")]
    InvalidArgument {
        /// Which field and why.
        reason: String,
    },
    /// The work did not finish in time.
    #[error("timed out")]
    Timeout,
    /// A backend the request needs (systemd, a control socket) is down.
    #[error("unavailable: {reason}")]
    Unavailable {
        /// What is down.
        reason: String,
    },
    /// The server failed; details are in its log.
    #[error("internal server error")]
    Internal,
    /// The client speaks a protocol version the server does not.
    #[error("protocol version mismatch: client speaks {client}, server speaks {server}")]
    VersionMismatch {
        /// The client's version.
        client: u16,
        /// The server's version.
        server: u16,
    },
    /// A frame could not be read (too large, undecodable, out of order).
    #[error("malformed frame: {reason}")]
    Malformed {
        /// What was wrong.
        reason: String,
    },
    /// The change was attempted and failed: the unit's job failed, or the
    /// hypervisor refused a command.
    #[error("failed: {reason}")]
    Failed {
        /// What failed, in the backend's words.
        reason: String,
    },
    /// A limit of this client was reached (request rate, connections).
    #[error("limit exceeded: {limit}")]
    LimitExceeded {
        /// Which limit.
        limit: String,
        /// When a retry may succeed, in milliseconds, if known.
        retry_after_ms: Option<u64>,
    },
}

/// Host capabilities and resources.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    /// The host name.
    pub hostname: String,
    /// The kernel release (`uname -r`).
    pub kernel: String,
    /// The daemon's version.
    pub vmd_version: String,
    /// Seconds since the host booted.
    pub uptime_secs: u64,
    /// Seconds since the daemon started.
    pub vmd_uptime_secs: u64,
    /// The host CPU.
    pub cpu: CpuInfo,
    /// Host memory.
    pub memory: MemoryInfo,
    /// Whether VMs can run here, and what KVM offers.
    pub virtualization: Virtualization,
    /// Load average over 1, 5 and 15 minutes, in thousandths.
    pub load_milli: [u32; 3],
    /// Time all CPUs spent in each mode since boot (`/proc/stat`): the
    /// difference of two reads gives the host's CPU use between them.
    pub cpu_times: Option<CpuTimes>,
}

/// Cumulative CPU time by mode, in milliseconds, summed over all CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuTimes {
    /// User mode (including `nice`).
    pub user_ms: u64,
    /// Kernel mode (including interrupts).
    pub system_ms: u64,
    /// Idle (including I/O wait).
    pub idle_ms: u64,
    /// Taken by the hypervisor this host runs under.
    pub steal_ms: u64,
}

/// The host CPU.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuInfo {
    /// `vendor_id` from `/proc/cpuinfo` (`GenuineIntel`, `AuthenticAMD`).
    pub vendor: Option<String>,
    /// `model name` from `/proc/cpuinfo`.
    pub model: Option<String>,
    /// Logical CPUs online.
    pub logical_cpus: u32,
    /// The hardware virtualization flag the CPU advertises, if any.
    pub virt_flag: Option<VirtFlag>,
}

/// A CPU's hardware virtualization extension flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VirtFlag {
    /// Intel VT-x.
    Vmx,
    /// AMD-V.
    Svm,
}

/// Host memory, from `/proc/meminfo`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryInfo {
    /// `MemTotal`.
    pub total: Bytes,
    /// `MemAvailable`.
    pub available: Bytes,
    /// In use: `MemTotal - MemAvailable`.
    pub in_use: Bytes,
}

/// Whether this host can run VMs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self")]
pub enum Virtualization {
    /// `/dev/kvm` answered.
    Available(KvmInfo),
    /// No usable KVM; VM changes answer [`ErrorReply::Unsupported`].
    Unavailable {
        /// Why, in words an operator can act on.
        reason: String,
    },
}

/// What `/dev/kvm` reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvmInfo {
    /// `KVM_GET_API_VERSION` (12 on every supported kernel).
    pub api_version: i32,
    /// `KVM_CAP_NR_VCPUS`: recommended vCPUs per VM.
    pub recommended_vcpus: u32,
    /// `KVM_CAP_MAX_VCPUS`: hard vCPU limit per VM.
    pub max_vcpus: u32,
    /// `KVM_CAP_NR_MEMSLOTS`: memory slots per VM.
    pub max_memslots: u32,
    /// Selected capabilities and whether KVM has them.
    pub capabilities: Vec<KvmCapability>,
}

/// One KVM capability.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvmCapability {
    /// Its name, e.g. `irqfd`.
    pub name: String,
    /// Whether `KVM_CHECK_EXTENSION` reports it.
    pub supported: bool,
}

/// What the host knows of one VM. Every `Option` is `None` when the host
/// cannot know the value right now; values are never invented. The fields
/// after `pending` (protocol 2) default when absent from JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// The VM's name.
    pub name: VmName,
    /// Free-form description from the inventory.
    pub description: Option<String>,
    /// The hypervisor, if declared or discovered.
    pub hypervisor: Option<Hypervisor>,
    /// Combined state.
    pub state: VmState,
    /// Started with the host (`microvms.target` wants it).
    pub autostart: Option<bool>,
    /// Visible but never changed over the network.
    pub protected: bool,
    /// The guest's vsock CID.
    pub vsock_cid: Option<Cid>,
    /// vCPUs.
    pub vcpus: VcpuCounts,
    /// Memory.
    pub memory: MemoryCounts,
    /// The hypervisor process.
    pub pid: Option<u32>,
    /// Seconds since the unit became active.
    pub uptime_secs: Option<u64>,
    /// The unit's cgroup memory use (`MemoryCurrent`).
    pub cgroup_memory: Option<Bytes>,
    /// The unit's CPU time (`CPUUsageNSec`), in nanoseconds.
    pub cpu_time_ns: Option<u64>,
    /// Tasks in the unit's cgroup (`TasksCurrent`).
    pub tasks: Option<u64>,
    /// The change in progress, if any.
    pub pending: Option<PendingOperation>,
    /// The unit that runs the VM and systemd's view of it.
    #[serde(default)]
    pub unit: Option<UnitInfo>,
    /// The hypervisor's own run state (QMP `query-status`: `running`,
    /// `paused`, `shutdown`, `guest-panicked`, …), while it runs.
    #[serde(default)]
    pub run_state: Option<String>,
    /// Where the live facts (vCPUs, memory, balloon, run state, devices)
    /// came from and how old they are.
    #[serde(default)]
    pub live: LiveFacts,
    /// How the VM's process last ended, if vmd or systemd saw it end.
    #[serde(default)]
    pub last_exit: Option<LastExit>,
    /// How often systemd restarted the unit by itself (`NRestarts`) since
    /// it was loaded.
    #[serde(default)]
    pub restarts: Option<u32>,
    /// The VM runs an older configuration than the host has installed
    /// (microvm.nix's `booted` differs from `current`): a restart picks up
    /// the new one. `None` where the host keeps no such record.
    #[serde(default)]
    pub restart_needed: Option<bool>,
    /// Other resources the VM holds: network interfaces, shares, devices.
    #[serde(default)]
    pub resources: Resources,
}

impl VmInfo {
    /// A VM of which only the name and state are known, every other fact
    /// empty; a server fills in what it knows, a client's test what it
    /// needs.
    pub fn new(name: VmName, state: VmState) -> Self {
        Self {
            name,
            description: None,
            hypervisor: None,
            state,
            autostart: None,
            protected: false,
            vsock_cid: None,
            vcpus: VcpuCounts::default(),
            memory: MemoryCounts::default(),
            pid: None,
            uptime_secs: None,
            cgroup_memory: None,
            cpu_time_ns: None,
            tasks: None,
            pending: None,
            unit: None,
            run_state: None,
            live: LiveFacts::default(),
            last_exit: None,
            restarts: None,
            restart_needed: None,
            resources: Resources::default(),
        }
    }
}

/// The systemd unit that runs a VM, as systemd last signalled it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnitInfo {
    /// The unit's name (`microvm@gui-vm.service`).
    pub name: String,
    /// `ActiveState` (`active`, `activating`, `failed`, …); `not-loaded`
    /// for a unit systemd has not loaded (it is inactive).
    pub active_state: String,
    /// `SubState` (`running`, `auto-restart`, `stop-sigterm`, …).
    pub sub_state: String,
    /// `FreezerState` (`running`, `frozen`, …), where systemd reports it.
    pub freezer_state: Option<String>,
    /// Milliseconds since systemd last confirmed these facts (a signal or
    /// a read after one); `None` if it never did (the bus is down).
    pub age_ms: Option<u64>,
}

/// Where a VM's live facts come from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LiveSource {
    /// No live facts: the VM does not run, or vmd has no way to ask.
    #[default]
    None,
    /// vmd's own hypervisor monitor, held for the VM's life: facts change
    /// with the hypervisor's events and are current.
    Monitor,
    /// The VM's shared control socket (microvm.nix's, also used by other
    /// tools): facts are as old as `age_ms` says, refreshed in the
    /// background when read.
    SharedSocket,
}

/// Freshness of a VM's live facts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveFacts {
    /// Where they came from.
    pub source: LiveSource,
    /// Milliseconds since the hypervisor last confirmed them.
    pub age_ms: Option<u64>,
    /// Why they may be stale or missing (`the control socket is held by
    /// another client`), in words for a human.
    pub note: Option<String>,
}

/// How a VM's process ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastExit {
    /// systemd's `Result` of the unit (`success`, `exit-code`, `signal`,
    /// `timeout`, `core-dump`, `watchdog`, …).
    pub result: String,
    /// The main process's exit status, if it exited.
    pub exit_status: Option<i32>,
    /// The signal that ended it, if one did (9 = SIGKILL).
    pub signal: Option<i32>,
    /// When, in milliseconds since the Unix epoch.
    pub at_unix_ms: Option<u64>,
}

/// Resources a VM holds besides CPU and memory.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// Network interfaces on the host side.
    pub interfaces: Vec<NetInterface>,
    /// Host directories shared with the guest (virtiofs).
    pub shares: Vec<Share>,
    /// Host PCI devices passed through, as declared (`0000:00:02.0`).
    pub pci_devices: Vec<String>,
    /// Host USB devices passed through, as declared.
    pub usb_devices: Vec<String>,
    /// The devices the hypervisor has now, including ones attached at run
    /// time by another client (`None` where vmd cannot ask it).
    pub runtime_devices: Option<Vec<RuntimeDevice>>,
}

/// A host-side network interface of a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetInterface {
    /// The interface's name on the host (`vm-net`, `macvtap0`).
    pub name: String,
    /// `tap` or `macvtap`.
    pub kind: String,
    /// The guest's MAC address, if declared.
    pub mac: Option<String>,
}

/// A host directory shared with a guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// The tag the guest mounts.
    pub tag: String,
    /// The host directory.
    pub source: String,
}

/// A device the hypervisor reports (QEMU: `/machine/peripheral`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeDevice {
    /// The device's id.
    pub id: String,
    /// Its type (`usb-host`, `vfio-pci`, `virtio-balloon-pci`, …).
    pub driver: String,
}

/// Declared and live vCPU counts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuCounts {
    /// What the host configuration declares.
    pub declared: Option<u32>,
    /// Online now, as the hypervisor reports.
    pub current: Option<u32>,
    /// The most the VM can hot-plug.
    pub max: Option<u32>,
}

/// Declared and live memory.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryCounts {
    /// What the host configuration declares.
    pub declared: Option<Bytes>,
    /// Guest RAM plugged now, as the hypervisor reports.
    pub current: Option<Bytes>,
    /// The balloon's actual guest size.
    pub balloon_actual: Option<Bytes>,
    /// The most memory the VM can have.
    pub max: Option<Bytes>,
}

/// The change a VM is busy with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingOperation {
    /// Its id (only shown to clients allowed to see it).
    pub id: Option<OperationId>,
    /// What it does.
    pub kind: OperationKind,
    /// When it started, in milliseconds since the Unix epoch.
    pub since_unix_ms: u64,
}

/// An operation and where it stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self")]
pub struct OperationInfo {
    /// Its id.
    pub id: OperationId,
    /// The VM it changes.
    pub vm: VmName,
    /// What it does.
    pub kind: OperationKind,
    /// Where it stands.
    pub status: OperationStatus,
    /// When it started, in milliseconds since the Unix epoch.
    pub started_unix_ms: u64,
    /// When it ended, if it has.
    pub finished_unix_ms: Option<u64>,
}

/// Where an operation stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(remote = "Self")]
pub enum OperationStatus {
    /// Still running.
    Running,
    /// Done.
    Succeeded,
    /// Ended with this error.
    Failed(ErrorReply),
}

/// The answer to [`Op::Watch`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchEvent {
    /// The server's generation now; pass it as the next `since`.
    /// Generations only grow, also across daemon restarts.
    pub generation: u64,
    /// Whether this is a full snapshot (`since` was 0 or unknown to this
    /// daemon run): `changed` then holds every watched VM, and VMs the
    /// caller knew but that are not in it are gone.
    pub snapshot: bool,
    /// Fresh information on each watched VM that changed after `since`
    /// (empty when the wait timed out).
    pub changed: Vec<VmInfo>,
    /// Watched VMs that changed after `since` and no longer exist.
    pub removed: Vec<VmName>,
}

impl fmt::Display for OperationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Running => f.write_str("running"),
            Self::Succeeded => f.write_str("succeeded"),
            Self::Failed(e) => write!(f, "failed: {e}"),
        }
    }
}
