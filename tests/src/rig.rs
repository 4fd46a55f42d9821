//! A microvm host with vmd serving it, for `vmctl` system tests: systemd
//! in [`crate::nspawn`] runs [`crate::microvm`] VMs (three by default) as real QEMU, and
//! a [`TestServer`] on this machine reads the same state directory, talks
//! to that systemd over its bus and to QEMU over QMP.
//!
//! 1. [`MicrovmRig::start`] lays out the host, boots the container with
//!    the units, starts `microvms.target` (as the host does at boot) and
//!    waits until each autostarted QEMU answers on its QMP sockets (the
//!    main one, and vmd's monitor where declared).
//! 2. It starts vmd with identities `admin` and `operator` that may change
//!    every VM; any other identity is a reader.
//! 3. [`MicrovmRig::vmctl`] runs the real `vmctl` binary against it.
//!
//! Behind vmd's back: [`MicrovmRig::hold_main_socket`] and
//! [`MicrovmRig::main_socket_command`] are another client of a VM's main
//! QMP socket, [`MicrovmRig::kill_qemu`] crashes a VM's QEMU, and
//! [`MicrovmRig::switch_current`] installs a new configuration.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use tokio::io::AsyncBufReadExt;
use tokio::net::UnixStream;
use vmd::policy::{IdentityRule, Scope};
use vmd::vms::inventory::InventorySource;
use vmd_proto::Role;

use crate::TestServer;
use crate::microvm::{DeclaredVm, MicrovmHost};
use crate::nspawn::{SystemdContainer, SystemdContainerBuilder};
use crate::qmp::{HeldSocket, QmpClient, QmpError};

/// Autostarted, running once the rig is up.
pub const AUTO: &str = "auto-vm";
/// Not autostarted: stopped once the rig is up.
pub const COLD: &str = "cold-vm";
/// Protected and autostarted: visible, never changed over the network.
pub const GUARDED: &str = "admin-vm";

/// A microvm host in a container, and vmd serving it.
#[derive(Debug)]
pub struct MicrovmRig {
    /// The host's state directory, inventory and units.
    pub host: MicrovmHost,
    /// The container's systemd that runs the VMs.
    pub container: SystemdContainer,
    /// vmd.
    pub server: TestServer,
}

impl MicrovmRig {
    /// The rig with [`AUTO`], [`COLD`] and [`GUARDED`]; `adjust` changes
    /// vmd's config before it starts.
    ///
    /// # Panics
    /// If the container does not boot or a VM does not come up.
    pub async fn start(adjust: impl FnOnce(&mut vmd::Config)) -> Self {
        Self::with_vms(
            &[
                DeclaredVm::new(AUTO).autostart(),
                DeclaredVm::new(COLD),
                DeclaredVm::new(GUARDED).autostart().protected(),
            ],
            adjust,
        )
        .await
    }

    /// The rig with `vms` (the autostarted ones running once it is up);
    /// `adjust` changes vmd's config before it starts.
    ///
    /// # Panics
    /// If the container does not boot or a VM does not come up.
    pub async fn with_vms(vms: &[DeclaredVm], adjust: impl FnOnce(&mut vmd::Config)) -> Self {
        Self::with_container(vms, |builder| builder, adjust).await
    }

    /// As [`MicrovmRig::with_vms`], with the container's builder adjusted
    /// first (for example a directory a VM's QEMU reads, bound in).
    ///
    /// # Panics
    /// As [`MicrovmRig::with_vms`].
    pub async fn with_container(
        vms: &[DeclaredVm],
        container: impl FnOnce(SystemdContainerBuilder) -> SystemdContainerBuilder,
        adjust: impl FnOnce(&mut vmd::Config),
    ) -> Self {
        let host = MicrovmHost::new(vms);
        let container = container(host.container()).boot().await;
        container.systemctl(&["start", "microvms.target"]).await;
        for vm in vms.iter().filter(|vm| vm.autostart) {
            wait_for_qmp(&host.socket(vm.name)).await;
            if vm.monitor {
                wait_for_qmp(&host.monitor_socket(vm.name)).await;
            }
        }
        let server = TestServer::start_with(|c| {
            c.vms.inventory = InventorySource {
                state_dir: host.state_dir(),
                file: Some(host.inventory()),
            };
            c.vms.systemd_bus = Some(container.bus_address());
            // CPU and memory use come from the units' cgroups, which live
            // under the container's root in this host's hierarchy.
            c.vms.cgroup_root = container.cgroup_root();
            c.policy.identities = vec![
                IdentityRule {
                    change: Scope::all(),
                    ..IdentityRule::new("admin", Some(Role::Admin))
                },
                IdentityRule {
                    change: Scope::all(),
                    ..IdentityRule::new("operator", Some(Role::Operator))
                },
            ];
            adjust(c);
        })
        .await;
        Self {
            host,
            container,
            server,
        }
    }

    /// See [`TestServer::vmctl_argv`].
    pub fn vmctl_argv(&self, identity: &str, args: &[&str]) -> Vec<String> {
        self.server.vmctl_argv(identity, args)
    }

    /// See [`TestServer::vmctl_command`].
    pub fn vmctl_command(&self, identity: &str, args: &[&str]) -> tokio::process::Command {
        self.server.vmctl_command(identity, args)
    }

    /// See [`TestServer::vmctl`].
    pub async fn vmctl(&self, identity: &str, args: &[&str]) -> Output {
        self.server.vmctl(identity, args).await
    }

    /// See [`TestServer::vmctl_ok`].
    pub async fn vmctl_ok(&self, args: &[&str]) -> String {
        self.server.vmctl_ok(args).await
    }

    /// systemd's own word on a VM's unit (`active`, `inactive`, …).
    pub async fn active_state(&self, vm: &str) -> String {
        self.unit_property(vm, "ActiveState").await
    }

    /// A property of a VM's unit as `systemctl show` inside the container
    /// reads it (`Result`, `NRestarts`, `MainPID`, …).
    ///
    /// # Panics
    /// If `systemctl` fails.
    pub async fn unit_property(&self, vm: &str, property: &str) -> String {
        self.container
            .systemctl(&["show", "-P", property, &format!("microvm@{vm}.service")])
            .await
            .trim()
            .to_owned()
    }

    /// Connects to a VM's main QMP socket as another client would
    /// (ghaf-mem-manager, vhotplug), negotiates, and holds the session for
    /// `hold` (or until the returned handle is released or dropped).
    /// Returns once the socket is held.
    ///
    /// # Errors
    /// [`QmpError`] if QEMU does not answer within [`QMP_PATIENCE`]
    /// (someone else holds the socket) or is not there.
    pub async fn hold_main_socket(&self, vm: &str, hold: Duration) -> Result<HeldSocket, QmpError> {
        HeldSocket::hold(&self.host.socket(vm), hold, QMP_PATIENCE).await
    }

    /// Sends one command through a VM's main QMP socket as another client
    /// (`balloon`, `device_add`, `device_del`, `query-…`): connect,
    /// negotiate, run, close. Returns the command's `return`.
    ///
    /// # Errors
    /// [`QmpError`] if QEMU refuses the command or does not answer within
    /// [`QMP_PATIENCE`].
    pub async fn main_socket_command(
        &self,
        vm: &str,
        command: &str,
        arguments: Option<serde_json::Value>,
    ) -> Result<serde_json::Value, QmpError> {
        let mut client = QmpClient::connect(&self.host.socket(vm), QMP_PATIENCE).await?;
        client.execute(command, arguments).await
    }

    /// The PID of a VM's QEMU (its unit's `MainPID`), if it runs.
    pub async fn qemu_pid(&self, vm: &str) -> Option<u32> {
        self.unit_property(vm, "MainPID")
            .await
            .parse()
            .ok()
            .filter(|pid| *pid != 0)
    }

    /// Kills a VM's QEMU with SIGKILL from inside the container (behind
    /// systemd's and vmd's back, as a crash would); returns its PID.
    ///
    /// # Errors
    /// If the VM has no running QEMU or `kill` fails.
    pub async fn kill_qemu(&self, vm: &str) -> Result<u32, String> {
        let pid = self
            .qemu_pid(vm)
            .await
            .ok_or_else(|| format!("{vm} has no running QEMU"))?;
        let out = self
            .container
            .exec("kill", &["-KILL", &pid.to_string()])
            .await;
        if out.status.success() {
            Ok(pid)
        } else {
            Err(format!(
                "kill -KILL {pid}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Installs a new runner for `vm` and points its `current` at it, as a
    /// host rebuild does (see [`MicrovmHost::switch_current`]).
    ///
    /// # Errors
    /// If the files cannot be written.
    pub fn switch_current(&self, vm: &str) -> std::io::Result<std::path::PathBuf> {
        self.host.switch_current(vm)
    }
}

/// How long the harness's own QMP clients wait for QEMU's greeting and
/// answers (a bound on a hang, not a claim about speed).
pub const QMP_PATIENCE: Duration = Duration::from_secs(10);

/// Waits until QEMU answers on `socket` (it opens it shortly after its
/// unit turns active).
///
/// # Panics
/// After 30 s without an answer.
pub async fn wait_for_qmp(socket: &Path) {
    let ready = async {
        loop {
            if let Ok(stream) = UnixStream::connect(socket).await {
                let mut lines = tokio::io::BufReader::new(stream).lines();
                if let Ok(Some(_greeting)) = lines.next_line().await {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), ready)
        .await
        .unwrap_or_else(|_| panic!("QEMU never answered on {}", socket.display()));
}
