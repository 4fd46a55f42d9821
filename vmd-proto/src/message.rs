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
            | Self::Watch { .. } => None,
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
}

/// Why a request failed. The set is closed: a client can handle every case.
/// Messages are for people; they never carry server internals.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
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
}

/// Whether this host can run VMs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
/// cannot know the value right now; values are never invented.
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
