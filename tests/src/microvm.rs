//! A microvm.nix-style host for system tests: the state directory layout,
//! vmd's inventory file, and the systemd units that run each VM as a real
//! QEMU (TCG, no guest OS) with a QMP socket.
//!
//! The units mirror Ghaf's: `microvm@NAME.service` runs the hypervisor,
//! its `ExecStop` asks the VM to power down over QMP and then quits it,
//! and `microvms.target` wants the VMs that start with the host.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

use crate::qemu::{DEFAULT_ARGS, QEMU};

/// Where the state directory appears inside the container (and where vmd
/// on the host is told it is: the same files through a bind mount).
pub const CONTAINER_STATE_DIR: &str = "/var/lib/microvms";

/// Where the graceful-stop script appears inside the container.
pub const CONTAINER_STOP_SCRIPT: &str = "/run/vmd-test/qmp-stop.py";

/// A VM the host declares.
#[derive(Clone, Debug)]
pub struct DeclaredVm {
    /// Its name.
    pub name: &'static str,
    /// Visible, never changed over the network.
    pub protected: bool,
    /// Wanted by `microvms.target`.
    pub autostart: bool,
}

/// The host side of a microvm.nix host.
#[derive(Debug)]
pub struct MicrovmHost {
    dir: TempDir,
    vms: Vec<DeclaredVm>,
}

/// The graceful stop: power button over QMP, a short grace for the guest
/// (there is none here), then `quit`. Written in Python because the
/// container shares this machine's root, where python3 is present.
const STOP_SCRIPT: &str = r#"import json, socket, sys, time
path = sys.argv[1]
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
try:
    s.connect(path)
except OSError:
    sys.exit(0)  # already gone
f = s.makefile("rw")
f.readline()  # greeting
for cmd in ("qmp_capabilities", "system_powerdown"):
    f.write(json.dumps({"execute": cmd}) + "\n"); f.flush()
    while "return" not in (msg := json.loads(f.readline())) and "error" not in msg:
        pass
time.sleep(0.5)
f.write(json.dumps({"execute": "quit"}) + "\n"); f.flush()
open(path + ".stopped", "w").close()
"#;

impl MicrovmHost {
    /// Lays out the state directory and the inventory for `vms`.
    ///
    /// # Panics
    /// If the temporary files cannot be written.
    pub fn new(vms: &[DeclaredVm]) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let host = Self {
            dir,
            vms: vms.to_vec(),
        };
        let mut inventory = String::new();
        for (cid, vm) in (3..).zip(vms) {
            let share = host.state_dir().join(vm.name).join("current/share/microvm");
            std::fs::create_dir_all(&share).expect("VM directory");
            std::fs::write(share.join("hypervisor"), "qemu\n").expect("hypervisor file");
            std::fs::write(share.join("vsock-cid"), format!("{cid}\n")).expect("CID file");
            let _ = writeln!(
                inventory,
                "[vm.{name}]\nvcpus = 1\nmax_vcpus = 4\nmemory_mib = 256\nmax_memory_mib = 256\n\
                 protected = {protected}\ndescription = \"test VM {name}\"\n\
                 control_socket = \"{socket}\"\n",
                name = vm.name,
                protected = vm.protected,
                socket = host.socket(vm.name).display(),
            );
        }
        std::fs::write(host.inventory(), inventory).expect("inventory");
        std::fs::write(host.stop_script(), STOP_SCRIPT).expect("stop script");
        host
    }

    /// The state directory on the host (bind it at [`CONTAINER_STATE_DIR`]).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("microvms")
    }

    /// vmd's inventory file.
    pub fn inventory(&self) -> PathBuf {
        self.dir.path().join("inventory.toml")
    }

    /// The stop script on the host (bind it at [`CONTAINER_STOP_SCRIPT`]).
    pub fn stop_script(&self) -> PathBuf {
        self.dir.path().join("qmp-stop.py")
    }

    /// A VM's QMP socket, as seen from the host.
    pub fn socket(&self, name: &str) -> PathBuf {
        self.state_dir().join(name).join(format!("{name}.sock"))
    }

    /// Whether the VM's graceful `ExecStop` has run (it leaves a marker).
    pub fn stopped_gracefully(&self, name: &str) -> bool {
        let mut marker = self.socket(name).into_os_string();
        marker.push(".stopped");
        Path::new(&marker).exists()
    }

    /// The unit files to place in the container's `/etc/systemd/system`.
    pub fn unit_files(&self) -> Vec<(String, String)> {
        let state = CONTAINER_STATE_DIR;
        let exec_start = format!(
            "/usr/bin/{QEMU} -name %i {} -qmp unix:{state}/%i/%i.sock,server=on,wait=off",
            DEFAULT_ARGS.join(" ")
        );
        let service = format!(
            "[Unit]\nDescription=MicroVM '%i'\n\n[Service]\nType=simple\n\
             ExecStartPre=/bin/rm -f {state}/%i/%i.sock {state}/%i/%i.sock.stopped\n\
             ExecStart={exec_start}\n\
             ExecStop=/usr/bin/python3 {CONTAINER_STOP_SCRIPT} {state}/%i/%i.sock\n\
             TimeoutStopSec=20\n"
        );
        let wants: Vec<String> = self
            .vms
            .iter()
            .filter(|vm| vm.autostart)
            .map(|vm| format!("microvm@{}.service", vm.name))
            .collect();
        let target = format!("[Unit]\nDescription=MicroVMs\nWants={}\n", wants.join(" "));
        vec![
            ("microvm@.service".to_owned(), service),
            ("microvms.target".to_owned(), target),
        ]
    }
}
