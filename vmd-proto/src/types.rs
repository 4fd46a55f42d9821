//! Domain values shared by requests and replies: names, sizes, states.
//!
//! Values that have rules (a VM name) are parsed once, at the edge: a
//! `VmName` that exists is valid, whether it came from a CLI argument or was
//! decoded from a frame.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest accepted VM name, in bytes.
pub const MAX_VM_NAME_LEN: usize = 64;

/// The name of a VM as the host declares it (`microvm@<name>.service`).
///
/// 1 to [`MAX_VM_NAME_LEN`] ASCII letters, digits, `-`, `_` or `.`, not
/// starting with `-` or `.`: safe as a systemd instance name and as a path
/// component.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VmName(String);

/// Why a string is not a [`VmName`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VmNameError {
    /// The name is empty.
    #[error("VM name is empty")]
    Empty,
    /// The name is longer than [`MAX_VM_NAME_LEN`].
    #[error("VM name is longer than {MAX_VM_NAME_LEN} bytes")]
    TooLong,
    /// The name contains a character outside `[A-Za-z0-9._-]`.
    #[error("VM name contains {0:?}; allowed are letters, digits, '-', '_' and '.'")]
    BadChar(char),
    /// The name starts with `-` or `.`.
    #[error("VM name must not start with '-' or '.'")]
    BadStart,
}

impl VmName {
    /// Parses a VM name.
    ///
    /// # Errors
    /// [`VmNameError`] says which rule the name breaks.
    pub fn new(name: impl Into<String>) -> Result<Self, VmNameError> {
        let name = name.into();
        if name.is_empty() {
            return Err(VmNameError::Empty);
        }
        if name.len() > MAX_VM_NAME_LEN {
            return Err(VmNameError::TooLong);
        }
        if let Some(c) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            return Err(VmNameError::BadChar(c));
        }
        if name.starts_with(['-', '.']) {
            return Err(VmNameError::BadStart);
        }
        Ok(Self(name))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for VmName {
    type Error = VmNameError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<VmName> for String {
    fn from(name: VmName) -> Self {
        name.0
    }
}

impl FromStr for VmName {
    type Err = VmNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for VmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An AF_VSOCK context id (a guest's address; 2 is the host).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Cid(pub u32);

impl fmt::Display for Cid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// An amount of memory in bytes. `Display` uses binary units (`512 MiB`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Bytes(pub u64);

impl Bytes {
    /// `n` mebibytes.
    pub const fn mib(n: u64) -> Self {
        Self(n * 1024 * 1024)
    }
}

impl fmt::Display for Bytes {
    /// Whole amounts in the largest exact unit (`512 MiB`), others with one
    /// decimal in the largest unit below them (`23.6 GiB`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut unit = 0;
        let mut scaled = self.0;
        while scaled >= 1024 && unit + 1 < UNITS.len() {
            scaled /= 1024;
            unit += 1;
        }
        let exact = self.0.is_multiple_of(1u64 << (10 * unit));
        if exact {
            return write!(f, "{scaled} {}", UNITS[unit]);
        }
        #[allow(clippy::cast_precision_loss)] // one decimal for display
        let value = self.0 as f64 / (1u64 << (10 * unit)) as f64;
        write!(f, "{value:.1} {}", UNITS[unit])
    }
}

/// A size string could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid size {0:?}: expected a number with an optional unit (B, K, M, G, T; KiB, MiB, GiB, TiB), e.g. 512M or 2G"
)]
pub struct BytesError(String);

impl FromStr for Bytes {
    type Err = BytesError;

    /// Parses `2G`, `512MiB`, `1024` (bytes); units are binary.
    fn from_str(s: &str) -> Result<Self, BytesError> {
        let err = || BytesError(s.to_owned());
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (number, unit) = t.split_at(split);
        let number: u64 = number.parse().map_err(|_| err())?;
        let shift = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 0,
            "k" | "kib" => 10,
            "m" | "mib" => 20,
            "g" | "gib" => 30,
            "t" | "tib" => 40,
            _ => return Err(err()),
        };
        number.checked_mul(1 << shift).map(Bytes).ok_or_else(err)
    }
}

/// Identifies an operation (a change in progress or recently finished).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OperationId(pub u64);

impl fmt::Display for OperationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "op-{}", self.0)
    }
}

impl FromStr for OperationId {
    type Err = std::num::ParseIntError;

    /// Parses `op-7` or `7`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.strip_prefix("op-").unwrap_or(s).parse().map(OperationId)
    }
}

/// What a client may do. Ordered: `metrics` < `reader` < `operator` <
/// `admin`, and each of `reader`, `operator` and `admin` includes the ones
/// before it. `metrics` includes nothing: it may only scrape the metrics
/// listener, and every request on the main listener answers `Forbidden`.
///
/// `Metrics` is declared last so the wire indices of the other roles stay
/// as they were; the order is the manual [`Ord`] below, not the
/// declaration order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Host facts, inventory, VM info, operations, watch.
    Reader,
    /// Reader, plus start, shutdown, restart, pause and resume.
    Operator,
    /// Operator, plus resize and forced shutdown.
    Admin,
    /// Scrapes the metrics listener and nothing else (below `Reader`).
    Metrics,
}

impl Role {
    /// The role's place in the order: `Metrics` below `Reader`.
    fn rank(self) -> u8 {
        match self {
            Self::Metrics => 0,
            Self::Reader => 1,
            Self::Operator => 2,
            Self::Admin => 3,
        }
    }
}

impl Ord for Role {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.rank().cmp(&other.rank())
    }
}

impl PartialOrd for Role {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Reader => "reader",
            Self::Operator => "operator",
            Self::Admin => "admin",
            Self::Metrics => "metrics",
        })
    }
}

/// The hypervisor that runs a VM. In JSON a string: `qemu`,
/// `cloud_hypervisor`, `crosvm`, `firecracker`, or the declared name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(remote = "Self")]
pub enum Hypervisor {
    /// QEMU, controlled over QMP.
    Qemu,
    /// cloud-hypervisor, controlled over its HTTP API socket.
    CloudHypervisor,
    /// crosvm.
    Crosvm,
    /// Firecracker.
    Firecracker,
    /// Any other hypervisor, by the name the host declares.
    Other(String),
}

impl Hypervisor {
    /// The JSON spelling: snake_case for the known hypervisors, the
    /// declared name for others.
    pub fn json_name(&self) -> &str {
        match self {
            Self::Qemu => "qemu",
            Self::CloudHypervisor => "cloud_hypervisor",
            Self::Crosvm => "crosvm",
            Self::Firecracker => "firecracker",
            Self::Other(name) => name,
        }
    }

    /// The hypervisor a name means: the JSON spelling or microvm.nix's
    /// (`cloud-hypervisor`); any other name is [`Hypervisor::Other`].
    pub fn from_name(name: &str) -> Self {
        match name {
            "qemu" => Self::Qemu,
            "cloud_hypervisor" | "cloud-hypervisor" => Self::CloudHypervisor,
            "crosvm" => Self::Crosvm,
            "firecracker" => Self::Firecracker,
            other => Self::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for Hypervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Qemu => "qemu",
            Self::CloudHypervisor => "cloud-hypervisor",
            Self::Crosvm => "crosvm",
            Self::Firecracker => "firecracker",
            Self::Other(name) => name,
        })
    }
}

/// The state of a VM, combined from systemd and the hypervisor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// The unit is active and the guest runs.
    Running,
    /// The hypervisor has stopped the guest's vCPUs.
    Paused,
    /// The unit is inactive.
    Stopped,
    /// The unit is activating.
    Starting,
    /// The unit is deactivating.
    Stopping,
    /// The unit failed.
    Failed,
    /// The host cannot tell (for example the bus or control socket is down).
    Unknown,
    /// The unit's processes are frozen by systemd (`FreezeUnit`, what
    /// Ghaf's givc does to pause any hypervisor's VM). Paused to a human;
    /// distinct from a hypervisor pause.
    Frozen,
    /// The VM's process ended and systemd restarts it after its
    /// `RestartSec` (`auto-restart`): see `last_exit` and `restarts`.
    Restarting,
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Stopped => "stopped",
            Self::Starting => "starting",
            Self::Stopping => "stopping",
            Self::Failed => "failed",
            Self::Unknown => "unknown",
            Self::Frozen => "frozen",
            Self::Restarting => "restarting",
        })
    }
}

/// The kind of change an operation makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperationKind {
    /// Start the VM's unit.
    Start,
    /// Graceful (or forced) shutdown.
    Shutdown,
    /// Restart the VM's unit.
    Restart,
    /// Pause the guest's vCPUs.
    Pause,
    /// Resume a paused guest.
    Resume,
    /// Change vCPUs and/or memory of a running guest.
    Resize,
}

impl fmt::Display for OperationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Start => "start",
            Self::Shutdown => "shutdown",
            Self::Restart => "restart",
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Resize => "resize",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_name_rules() {
        assert!(VmName::new("gui-vm").is_ok());
        assert!(VmName::new("net_vm.2").is_ok());
        assert_eq!(VmName::new(""), Err(VmNameError::Empty));
        assert_eq!(VmName::new("a/b"), Err(VmNameError::BadChar('/')));
        assert_eq!(VmName::new("../x"), Err(VmNameError::BadChar('/')));
        assert_eq!(VmName::new(".hidden"), Err(VmNameError::BadStart));
        assert_eq!(VmName::new("-x"), Err(VmNameError::BadStart));
        assert_eq!(VmName::new("x".repeat(65)), Err(VmNameError::TooLong));
        assert!(VmName::new("x".repeat(64)).is_ok());
    }

    #[test]
    fn bytes_display() {
        assert_eq!(Bytes(0).to_string(), "0 B");
        assert_eq!(Bytes(1000).to_string(), "1000 B");
        assert_eq!(Bytes(1536).to_string(), "1.5 KiB");
        assert_eq!(Bytes(24_731_708 * 1024).to_string(), "23.6 GiB");
        assert_eq!(Bytes::mib(512).to_string(), "512 MiB");
        assert_eq!(Bytes::mib(2048).to_string(), "2 GiB");
        assert_eq!(Bytes(1536 * 1024 * 1024 + 1).to_string(), "1.5 GiB");
    }

    #[test]
    fn bytes_parse() {
        assert_eq!("2G".parse(), Ok(Bytes::mib(2048)));
        assert_eq!("512MiB".parse(), Ok(Bytes::mib(512)));
        assert_eq!("512m".parse(), Ok(Bytes::mib(512)));
        assert_eq!("4096".parse(), Ok(Bytes(4096)));
        for bad in ["", "G", "1.5G", "2X", "-1M", "99999999999T"] {
            assert!(bad.parse::<Bytes>().is_err(), "{bad}");
        }
        assert_eq!("op-7".parse(), Ok(OperationId(7)));
        assert_eq!("7".parse(), Ok(OperationId(7)));
        assert!("op-x".parse::<OperationId>().is_err());
    }

    #[test]
    fn role_order() {
        assert!(Role::Reader < Role::Operator && Role::Operator < Role::Admin);
        assert!(Role::Metrics < Role::Reader);
        let mut roles = [Role::Admin, Role::Metrics, Role::Operator, Role::Reader];
        roles.sort();
        assert_eq!(
            roles,
            [Role::Metrics, Role::Reader, Role::Operator, Role::Admin]
        );
    }

    #[test]
    fn role_wire_indices() {
        // Declared last: the existing roles keep their postcard indices.
        for (role, index) in [
            (Role::Reader, 0u8),
            (Role::Operator, 1),
            (Role::Admin, 2),
            (Role::Metrics, 3),
        ] {
            assert_eq!(postcard::to_stdvec(&role).expect("encodes"), vec![index]);
        }
    }
}
