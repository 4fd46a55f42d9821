//! A microvm host with vmd serving it, for `vmctl` system tests: systemd
//! in [`crate::nspawn`] runs [`crate::microvm`] VMs (three by default) as real QEMU, and
//! a [`TestServer`] on this machine reads the same state directory, talks
//! to that systemd over its bus and to QEMU over QMP.
//!
//! 1. [`MicrovmRig::start`] lays out the host, boots the container with
//!    the units, starts `microvms.target` (as the host does at boot) and
//!    waits until each autostarted QEMU answers on its QMP socket.
//! 2. It starts vmd with identities `admin` and `operator` that may change
//!    every VM; any other identity is a reader.
//! 3. [`MicrovmRig::vmctl`] runs the real `vmctl` binary against it.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use tokio::io::AsyncBufReadExt;
use tokio::net::UnixStream;
use vmd::policy::{IdentityRule, Scope};
use vmd::vms::inventory::InventorySource;
use vmd_proto::Role;

use crate::TestServer;
use crate::microvm::{CONTAINER_STOP_SCRIPT, DeclaredVm, MicrovmHost};
use crate::nspawn::SystemdContainer;

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
                DeclaredVm {
                    name: AUTO,
                    protected: false,
                    autostart: true,
                },
                DeclaredVm {
                    name: COLD,
                    protected: false,
                    autostart: false,
                },
                DeclaredVm {
                    name: GUARDED,
                    protected: true,
                    autostart: true,
                },
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
        let host = MicrovmHost::new(vms);
        let mut builder = SystemdContainer::builder()
            .state_dir(host.state_dir())
            .bind_ro(host.stop_script(), CONTAINER_STOP_SCRIPT);
        for (name, contents) in host.unit_files() {
            builder = builder.unit(&name, &contents);
        }
        let container = builder.boot().await;
        container.systemctl(&["start", "microvms.target"]).await;
        for vm in vms.iter().filter(|vm| vm.autostart) {
            wait_for_qmp(&host.socket(vm.name)).await;
        }
        let server = TestServer::start_with(|c| {
            c.vms.inventory = InventorySource {
                state_dir: host.state_dir(),
                file: Some(host.inventory()),
            };
            c.vms.systemd_bus = Some(container.bus_address());
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
        self.container
            .systemctl(&[
                "show",
                "-P",
                "ActiveState",
                &format!("microvm@{vm}.service"),
            ])
            .await
            .trim()
            .to_owned()
    }
}

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
