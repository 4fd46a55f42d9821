//! The inventory: which VMs this host declares, read on request.
//!
//! 1. Discovery: every `<state_dir>/<name>/current/share/microvm/` (the
//!    microvm.nix layout) is a VM; its `hypervisor` and `vsock-cid` files
//!    are read when present.
//! 2. The inventory file (TOML, written by the NixOS module) declares VMs
//!    and facts discovery cannot know: vCPUs, memory, limits, `protected`,
//!    a description. Per VM, a value in the file overrides discovery;
//!    discovery covers VMs the file omits.
//! 3. Defaults fill the rest: unit `microvm@<name>.service`, and for QEMU
//!    the shared QMP socket `<state_dir>/<name>/<name>.sock` and vmd's own
//!    monitor `<state_dir>/<name>/vmd-qmp.sock` (the NixOS module adds it
//!    to each QEMU VM; a VM without it is served over the shared socket).
//! 4. Resources as declared come from microvm.nix's files of the runner
//!    the VM booted (`booted`, else `current`): `tap-interfaces` (an id a
//!    line), `macvtap-interfaces` (`id mac link mode`), `virtiofs/<tag>/
//!    source`, `pci-devices` and `usb-devices` (a path a line).
//!
//! ```toml
//! [vm.gui-vm]
//! description = "GUI VM"
//! hypervisor = "qemu"
//! vcpus = 2
//! max_vcpus = 4
//! memory_mib = 2048
//! max_memory_mib = 4096
//! vsock_cid = 3
//! control_socket = "/var/lib/microvms/gui-vm/gui-vm.sock"
//! monitor_socket = "/var/lib/microvms/gui-vm/vmd-qmp.sock"  # vmd's own QMP monitor
//! vsock_uds = "/var/lib/microvms/gui-vm/vsock.sock"   # hybrid vsock (host side)
//! unit = "microvm@gui-vm.service"
//! protected = false
//! ```
//!
//! The live model reads the inventory at start and on reload (`SIGHUP`,
//! `vmd reload`); the NixOS module restarts vmd when it changes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use vmd_proto::{Bytes, Cid, Hypervisor, NetInterface, Resources, Share, VmName};

/// Where microvm.nix keeps its VMs.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/microvms";

/// The inventory file the NixOS module writes.
pub const DEFAULT_INVENTORY_FILE: &str = "/etc/vmd/inventory.toml";

/// The target whose `Wants` makes a microvm start at boot.
pub const AUTOSTART_TARGET: &str = "microvms.target";

/// Where the inventory comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InventorySource {
    /// The microvm.nix state directory to discover VMs in.
    pub state_dir: PathBuf,
    /// The inventory file; a missing file declares nothing.
    pub file: Option<PathBuf>,
}

impl Default for InventorySource {
    fn default() -> Self {
        Self {
            state_dir: DEFAULT_STATE_DIR.into(),
            file: Some(DEFAULT_INVENTORY_FILE.into()),
        }
    }
}

/// The inventory could not be read.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// The inventory file exists but cannot be read.
    #[error("cannot read inventory {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The inventory file is invalid (the message names the key).
    #[error("inventory {}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// One VM as the host declares it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmSpec {
    /// The VM's name.
    pub name: VmName,
    /// Free-form description.
    pub description: Option<String>,
    /// The hypervisor.
    pub hypervisor: Option<Hypervisor>,
    /// Declared vCPUs.
    pub vcpus: Option<u32>,
    /// Most vCPUs it may have.
    pub max_vcpus: Option<u32>,
    /// Declared memory.
    pub memory: Option<Bytes>,
    /// Most memory it may have.
    pub max_memory: Option<Bytes>,
    /// The guest's vsock CID.
    pub vsock_cid: Option<Cid>,
    /// The hypervisor's shared control socket, if it has one vmd can
    /// speak to.
    pub control_socket: Option<PathBuf>,
    /// vmd's own monitor socket (QEMU), held for the VM's life.
    pub monitor_socket: Option<PathBuf>,
    /// microvm.nix's directory of the VM (`booted`, `current`), if any.
    pub dir: Option<PathBuf>,
    /// Network interfaces, shares and devices as declared.
    pub resources: Resources,
    /// The host side of the VM's hybrid vsock device (cloud-hypervisor,
    /// Firecracker, vhost-device-vsock): vmd listens on `<vsock_uds>_<port>`.
    pub vsock_uds: Option<PathBuf>,
    /// The systemd unit that runs it.
    pub unit: String,
    /// Visible but never changed over the network.
    pub protected: bool,
}

/// The inventory file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    vm: BTreeMap<VmName, FileVm>,
}

/// One `[vm.NAME]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileVm {
    description: Option<String>,
    hypervisor: Option<String>,
    vcpus: Option<u32>,
    max_vcpus: Option<u32>,
    memory_mib: Option<u64>,
    max_memory_mib: Option<u64>,
    vsock_cid: Option<u32>,
    control_socket: Option<PathBuf>,
    monitor_socket: Option<PathBuf>,
    vsock_uds: Option<PathBuf>,
    unit: Option<String>,
    protected: Option<bool>,
}

/// What discovery found in the state directory for one VM.
#[derive(Debug, Default)]
struct Discovered {
    hypervisor: Option<String>,
    vsock_cid: Option<u32>,
}

/// Parses microvm.nix's hypervisor names.
pub fn parse_hypervisor(name: &str) -> Hypervisor {
    match name.trim() {
        "qemu" => Hypervisor::Qemu,
        "cloud-hypervisor" => Hypervisor::CloudHypervisor,
        "crosvm" => Hypervisor::Crosvm,
        "firecracker" => Hypervisor::Firecracker,
        other => Hypervisor::Other(other.to_owned()),
    }
}

impl InventorySource {
    /// Reads the whole inventory, sorted by name.
    ///
    /// # Errors
    /// [`InventoryError`] if the inventory file exists but is unreadable
    /// or invalid. An unreadable state directory only logs (nothing there
    /// to discover).
    pub fn load(&self) -> Result<Vec<VmSpec>, InventoryError> {
        let file = self.read_file()?;
        let mut found = self.discover();
        let mut names: Vec<VmName> = file.vm.keys().cloned().collect();
        names.extend(found.keys().cloned());
        names.sort();
        names.dedup();
        Ok(names
            .into_iter()
            .map(|name| {
                let declared = file.vm.get(&name);
                let discovered = found.remove(&name).unwrap_or_default();
                self.merge(name, declared, &discovered)
            })
            .collect())
    }

    /// Reads one VM; `Ok(None)` if the host does not declare it.
    ///
    /// # Errors
    /// As [`InventorySource::load`].
    pub fn get(&self, name: &VmName) -> Result<Option<VmSpec>, InventoryError> {
        let file = self.read_file()?;
        let discovered = self.discover_one(name);
        let declared = file.vm.get(name);
        if declared.is_none() && discovered.is_none() {
            return Ok(None);
        }
        Ok(Some(self.merge(
            name.clone(),
            declared,
            &discovered.unwrap_or_default(),
        )))
    }

    fn merge(&self, name: VmName, declared: Option<&FileVm>, found: &Discovered) -> VmSpec {
        let empty = FileVm::default();
        let d = declared.unwrap_or(&empty);
        let hypervisor = d
            .hypervisor
            .as_deref()
            .or(found.hypervisor.as_deref())
            .map(parse_hypervisor);
        let qemu = hypervisor == Some(Hypervisor::Qemu);
        let dir = self.state_dir.join(name.as_str());
        // microvm.nix gives QEMU a QMP socket named after the VM.
        let control_socket = d
            .control_socket
            .clone()
            .or_else(|| qemu.then(|| dir.join(format!("{name}.sock"))));
        let monitor_socket = d
            .monitor_socket
            .clone()
            .or_else(|| qemu.then(|| dir.join(MONITOR_SOCKET)));
        let resources = declared_resources(&dir);
        let mib = |m: Option<u64>| m.map(Bytes::mib);
        VmSpec {
            description: d.description.clone(),
            hypervisor,
            vcpus: d.vcpus,
            max_vcpus: d.max_vcpus,
            memory: mib(d.memory_mib),
            max_memory: mib(d.max_memory_mib),
            vsock_cid: d.vsock_cid.or(found.vsock_cid).map(Cid),
            control_socket,
            monitor_socket,
            dir: dir.is_dir().then_some(dir),
            resources,
            vsock_uds: d.vsock_uds.clone(),
            unit: d
                .unit
                .clone()
                .unwrap_or_else(|| format!("microvm@{name}.service")),
            protected: d.protected.unwrap_or(false),
            name,
        }
    }

    fn read_file(&self) -> Result<File, InventoryError> {
        let Some(path) = &self.file else {
            return Ok(File::default());
        };
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(File::default()),
            Err(source) => {
                return Err(InventoryError::Read {
                    path: path.clone(),
                    source,
                });
            }
        };
        toml::from_str(&text).map_err(|e| InventoryError::Parse {
            path: path.clone(),
            message: e.to_string().trim_end().to_owned(),
        })
    }

    /// Every VM directory with a microvm.nix `share/microvm`.
    fn discover(&self) -> BTreeMap<VmName, Discovered> {
        let entries = match std::fs::read_dir(&self.state_dir) {
            Ok(entries) => entries,
            Err(e) => {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(dir = %self.state_dir.display(), error = %e, "cannot read the microvm state directory");
                }
                return BTreeMap::new();
            }
        };
        entries
            .filter_map(Result::ok)
            .filter_map(|entry| {
                // Names that are not valid VM names are not ours to manage.
                let name = VmName::new(entry.file_name().to_str()?).ok()?;
                let found = self.discover_one(&name)?;
                Some((name, found))
            })
            .collect()
    }

    fn discover_one(&self, name: &VmName) -> Option<Discovered> {
        let share = self
            .state_dir
            .join(name.as_str())
            .join("current/share/microvm");
        if !share.is_dir() {
            return None;
        }
        let read = |file: &str| read_small(&share.join(file));
        Some(Discovered {
            hypervisor: read("hypervisor").filter(|h| !h.is_empty()),
            vsock_cid: read("vsock-cid").and_then(|c| c.parse().ok()),
        })
    }
}

/// The file name of vmd's own monitor socket in a VM's directory.
pub const MONITOR_SOCKET: &str = "vmd-qmp.sock";

/// The runner the VM booted, else the current one.
fn runner_share(dir: &Path) -> PathBuf {
    let booted = dir.join("booted/share/microvm");
    if booted.is_dir() {
        booted
    } else {
        dir.join("current/share/microvm")
    }
}

/// What microvm.nix declares the VM uses (module docs, step 4).
pub fn declared_resources(dir: &Path) -> Resources {
    let share = runner_share(dir);
    let lines = |file: &str| -> Vec<String> {
        read_small(&share.join(file))
            .map(|text| {
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut interfaces: Vec<NetInterface> = lines("tap-interfaces")
        .into_iter()
        .map(|name| NetInterface {
            name,
            kind: "tap".into(),
            mac: None,
        })
        .collect();
    interfaces.extend(lines("macvtap-interfaces").into_iter().filter_map(|line| {
        let mut fields = line.split_whitespace();
        Some(NetInterface {
            name: fields.next()?.to_owned(),
            kind: "macvtap".into(),
            mac: fields.next().map(str::to_owned),
        })
    }));
    let mut shares: Vec<Share> = std::fs::read_dir(share.join("virtiofs"))
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|entry| {
            Some(Share {
                tag: entry.file_name().to_str()?.to_owned(),
                source: read_small(&entry.path().join("source"))?,
            })
        })
        .collect();
    shares.sort_by(|a, b| a.tag.cmp(&b.tag));
    Resources {
        interfaces,
        shares,
        pci_devices: lines("pci-devices"),
        usb_devices: lines("usb-devices"),
        runtime_devices: None,
    }
}

/// Whether the VM runs an older configuration than the host installed:
/// `booted` and `current` name different runners. `None` where either
/// link is missing (not a microvm.nix VM, or never booted).
pub fn restart_needed(dir: &Path) -> Option<bool> {
    let booted = std::fs::canonicalize(dir.join("booted")).ok()?;
    let current = std::fs::canonicalize(dir.join("current")).ok()?;
    Some(booted != current)
}

/// A small text file, trimmed; `None` if absent or unreadable.
fn read_small(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str) -> VmName {
        VmName::new(name).expect("valid name")
    }

    /// A microvm.nix-style VM directory.
    fn microvm(state: &Path, name: &str, hypervisor: &str, cid: Option<u32>) {
        let share = state.join(name).join("current/share/microvm");
        std::fs::create_dir_all(&share).expect("mkdir");
        std::fs::write(share.join("hypervisor"), format!("{hypervisor}\n")).expect("write");
        if let Some(cid) = cid {
            std::fs::write(share.join("vsock-cid"), cid.to_string()).expect("write");
        }
    }

    fn source(dir: &Path, file: Option<&str>) -> InventorySource {
        let path = dir.join("inventory.toml");
        if let Some(text) = file {
            std::fs::write(&path, text).expect("write inventory");
        }
        InventorySource {
            state_dir: dir.join("microvms"),
            file: Some(path),
        }
    }

    #[test]
    fn discovery_reads_the_microvm_layout() {
        let dir = tempfile::tempdir().expect("tempdir");
        microvm(&dir.path().join("microvms"), "net-vm", "qemu", Some(5));
        microvm(
            &dir.path().join("microvms"),
            "chv",
            "cloud-hypervisor",
            None,
        );
        // Not VMs: no share/microvm, or a name vmd would never accept.
        std::fs::create_dir_all(dir.path().join("microvms/stray")).expect("mkdir");
        microvm(&dir.path().join("microvms"), ".hidden", "qemu", None);

        let vms = source(dir.path(), None).load().expect("loads");
        let names: Vec<_> = vms.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["chv", "net-vm"]);
        let net = &vms[1];
        assert_eq!(net.hypervisor, Some(Hypervisor::Qemu));
        assert_eq!(net.vsock_cid, Some(Cid(5)));
        assert_eq!(net.unit, "microvm@net-vm.service");
        assert_eq!(
            net.control_socket,
            Some(dir.path().join("microvms/net-vm/net-vm.sock"))
        );
        assert_eq!(net.vcpus, None, "discovery does not invent vCPUs");
        assert_eq!(vms[0].hypervisor, Some(Hypervisor::CloudHypervisor));
        assert_eq!(vms[0].control_socket, None);
    }

    #[test]
    fn file_overrides_discovery_and_adds_vms() {
        let dir = tempfile::tempdir().expect("tempdir");
        microvm(&dir.path().join("microvms"), "net-vm", "qemu", Some(5));
        let src = source(
            dir.path(),
            Some(
                r#"
                [vm.net-vm]
                vsock_cid = 7
                vcpus = 2
                max_vcpus = 4
                memory_mib = 512
                max_memory_mib = 1024
                protected = true
                description = "network"

                [vm.admin-vm]
                hypervisor = "qemu"
                unit = "admin.service"
                control_socket = "/run/admin.sock"
                "#,
            ),
        );
        let vms = src.load().expect("loads");
        assert_eq!(vms.len(), 2);
        let admin = &vms[0];
        assert_eq!(admin.name, vm("admin-vm"));
        assert_eq!(admin.unit, "admin.service");
        assert_eq!(admin.control_socket, Some(PathBuf::from("/run/admin.sock")));
        let net = &vms[1];
        assert_eq!(net.vsock_cid, Some(Cid(7)), "the file wins");
        assert_eq!(net.hypervisor, Some(Hypervisor::Qemu), "discovery fills in");
        assert_eq!(net.memory, Some(Bytes::mib(512)));
        assert_eq!(net.max_vcpus, Some(4));
        assert!(net.protected);
        assert_eq!(src.get(&vm("net-vm")).expect("reads"), Some(net.clone()));
        assert_eq!(src.get(&vm("nope")).expect("reads"), None);
    }

    #[test]
    fn missing_sources_are_an_empty_inventory() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(source(dir.path(), None).load().expect("loads").is_empty());
    }

    #[test]
    fn invalid_file_is_an_error_naming_the_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = source(dir.path(), Some("[vm.x]\nvcpu = 2\n"))
            .load()
            .expect_err("typo");
        assert!(err.to_string().contains("vcpu"), "{err}");
        let err = source(dir.path(), Some("[vm.\"../x\"]\n"))
            .load()
            .expect_err("bad name");
        assert!(err.to_string().contains("VM name"), "{err}");
    }
}
