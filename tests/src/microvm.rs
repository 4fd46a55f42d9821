//! A microvm.nix host for system tests, shaped like the files microvm.nix
//! really installs (`nixos-modules/host/default.nix` and `lib/runner.nix`,
//! `lib/runners/qemu.nix` of github.com/microvm-nix/microvm.nix), with
//! QEMU under TCG and no guest OS in place of the guest.
//!
//! 1. Each VM gets a *runner*, a directory in a store
//!    (`<tmp>/store/<hash>-microvm-qemu-<name>`, like the Nix store path of
//!    `declaredRunner`) holding `bin/microvm-run`, `bin/microvm-shutdown`
//!    and `share/microvm/` (`hypervisor`, `vsock-cid`, `tap-flags`,
//!    `tap-interfaces`, `macvtap-interfaces`, `pci-devices`, `usb-devices`,
//!    `virtiofs/<tag>/{socket,source}`) in microvm.nix's formats.
//!    `<state>/<name>/current` links to it, as `install-microvm-<name>`
//!    leaves it.
//! 2. `microvm@.service` is microvm.nix's template: `WorkingDirectory`
//!    is the VM's state directory, `ExecStart=<state>/%i/current/bin/microvm-run`,
//!    `ExecStop=<state>/%i/booted/bin/microvm-shutdown`, `Restart=always`,
//!    `TimeoutSec`, and it requires `microvm-set-booted@%i.service`, which
//!    links `booted` to what `current` points at when the VM starts and
//!    removes it when the VM stops. Two differences, both for the tests:
//!    [`RESTART_SEC`] is 2 s instead of 5 s, and there is no `User=microvm`
//!    (the container has no such user; QEMU runs as root).
//! 3. `microvm-run` execs QEMU with the main QMP socket `<name>.sock`
//!    (relative to the working directory, as microvm.nix's default
//!    `microvm.socket` is), and, for VMs declared with vmd's monitor, a
//!    second `-qmp unix:<state>/<name>/vmd-qmp.sock,server=on,wait=off`
//!    (what vmd's NixOS module adds through `microvm.qemu.extraArgs`);
//!    vmd's inventory names it (`monitor_socket`).
//! 4. `microvm-shutdown` is microvm.nix's in shape: it negotiates and
//!    presses a button through `socat` on the main socket and holds that
//!    connection until QEMU exits. microvm.nix presses Ctrl+Alt+Delete
//!    (`input-send-event`); without a guest OS the firmware answers that
//!    itself with a reset, which `-no-reboot` turns into an exit at once,
//!    so no guest could take its time or ignore it. Here it presses the
//!    ACPI power button (`system_powerdown`), which the firmware ignores,
//!    and, as a stand-in for the guest powering off, sends `quit` on the
//!    same held connection after [`DeclaredVm::powerdown_delay`]. A VM
//!    whose guest ignores the button ([`DeclaredVm::ignores_powerdown`])
//!    never quits: its stop runs into its `TimeoutStopSec`
//!    ([`IGNORED_POWERDOWN_STOP_TIMEOUT`], a per-VM drop-in as microvm.nix
//!    writes per-VM drop-ins) and systemd kills it.
//! 5. `microvms.target` wants the VMs that start with the host.
//!
//! [`MicrovmHost::container`] puts all of it into a
//! [`SystemdContainerBuilder`]; vmd on the test's host reads the same
//! state directory and store through bind mounts at the same paths.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;

use crate::nspawn::{SystemdContainer, SystemdContainerBuilder};
use crate::qemu::{DEFAULT_ARGS, QEMU};

/// Where the state directory appears inside the container (and where vmd
/// on the host is told it is: the same files through a bind mount).
pub const CONTAINER_STATE_DIR: &str = "/var/lib/microvms";

/// The unit's `RestartSec`. microvm.nix uses 5 s; 2 s keeps a test that
/// kills QEMU short while leaving the `auto-restart` window (the VM reads
/// `restarting`) long enough to be seen on a loaded two-core machine.
pub const RESTART_SEC: Duration = Duration::from_secs(2);

/// The template's `TimeoutSec` (start and stop; microvm.nix: 150 s, its
/// `startupTimeout`). Never reached by a VM whose stand-in guest quits.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// `TimeoutStopSec` of VMs whose guest ignores the power button: their
/// stop always ends with systemd's timeout, so it is kept short.
pub const IGNORED_POWERDOWN_STOP_TIMEOUT: Duration = Duration::from_secs(4);

/// How long the stand-in guest takes to power off by default.
pub const DEFAULT_POWERDOWN_DELAY: Duration = Duration::from_millis(500);

/// The name of vmd's own QMP socket in a VM's state directory (vmd's
/// default `monitor_socket`).
pub const MONITOR_SOCKET: &str = "vmd-qmp.sock";

/// What `microvm-shutdown` writes to `<state>/<name>/microvm-shutdown.log`
/// once QEMU has exited while it held the main socket.
const SHUTDOWN_DONE: &str = "qemu exited";

/// A VM the host declares.
#[derive(Clone, Debug)]
pub struct DeclaredVm {
    /// Its name.
    pub name: &'static str,
    /// Visible, never changed over the network.
    pub protected: bool,
    /// Wanted by `microvms.target`.
    pub autostart: bool,
    /// QEMU gets a second QMP socket for vmd ([`MONITOR_SOCKET`]).
    pub monitor: bool,
    /// The stand-in guest ignores the power button: `microvm-shutdown` never sends
    /// `quit`, the stop runs into `TimeoutStopSec`.
    pub ignores_powerdown: bool,
    /// How long after the power button the stand-in guest powers off
    /// (`microvm-shutdown` holds the main socket meanwhile).
    pub powerdown_delay: Duration,
    /// Interfaces, shares and devices declared in `share/microvm`.
    pub resources: DeclaredResources,
    /// QEMU's arguments before the QMP sockets (default
    /// [`DEFAULT_ARGS`]); `-name` is always first.
    pub qemu_args: Option<Vec<String>>,
    /// A socket vmd's inventory names as the VM's control socket instead
    /// of its real main socket (one that never answers, for fault tests).
    pub inventory_control_socket: Option<PathBuf>,
    /// Boot vCPUs and memory (MiB), declared in the inventory and given to
    /// QEMU; `None`: [`DEFAULT_ARGS`]' one vCPU and 256 MiB.
    pub size: Option<(u32, u32)>,
    /// The inventory's description (default `test VM <name>`).
    pub description: Option<&'static str>,
}

impl DeclaredVm {
    /// A VM with vmd's monitor, not protected, not autostarted, whose
    /// guest powers off [`DEFAULT_POWERDOWN_DELAY`] after the power button.
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            protected: false,
            autostart: false,
            monitor: true,
            ignores_powerdown: false,
            powerdown_delay: DEFAULT_POWERDOWN_DELAY,
            resources: DeclaredResources::default(),
            qemu_args: None,
            inventory_control_socket: None,
            size: None,
            description: None,
        }
    }

    /// Boots with `vcpus` vCPUs (of at least four slots) and `memory_mib`
    /// MiB, declared so in the inventory (QEMU under TCG allocates guest
    /// memory lazily: an idle VM costs far less than its size).
    #[must_use]
    pub fn sized(mut self, vcpus: u32, memory_mib: u32) -> Self {
        self.size = Some((vcpus, memory_mib));
        self
    }

    /// Described so in the inventory.
    #[must_use]
    pub fn described(mut self, description: &'static str) -> Self {
        self.description = Some(description);
        self
    }

    /// Boot vCPUs, their maximum, and memory in MiB, as declared.
    fn shape(&self) -> (u32, u32, u32) {
        let (vcpus, memory) = self.size.unwrap_or((1, 256));
        (vcpus, vcpus.max(4), memory)
    }

    /// Started with the host.
    #[must_use]
    pub fn autostart(mut self) -> Self {
        self.autostart = true;
        self
    }

    /// Protected.
    #[must_use]
    pub fn protected(mut self) -> Self {
        self.protected = true;
        self
    }

    /// Without vmd's monitor: only the main socket, shared with others.
    #[must_use]
    pub fn without_monitor(mut self) -> Self {
        self.monitor = false;
        self
    }

    /// The guest ignores the power button.
    #[must_use]
    pub fn ignoring_powerdown(mut self) -> Self {
        self.ignores_powerdown = true;
        self
    }

    /// The guest powers off `delay` after the power button.
    #[must_use]
    pub fn powering_down_after(mut self, delay: Duration) -> Self {
        self.powerdown_delay = delay;
        self
    }

    /// Declares interfaces, shares and devices.
    #[must_use]
    pub fn with_resources(mut self, resources: DeclaredResources) -> Self {
        self.resources = resources;
        self
    }
}

/// Resources microvm.nix records in a runner's `share/microvm`. They are
/// declarations only: no tap device, share or host device exists here
/// (QEMU gets none of them, except the USB controller that microvm.nix
/// adds when USB devices are declared).
#[derive(Clone, Debug, Default)]
pub struct DeclaredResources {
    /// `tap-interfaces`: one interface id a line.
    pub taps: Vec<String>,
    /// `macvtap-interfaces`: `id mac link mode` a line.
    pub macvtaps: Vec<Macvtap>,
    /// `virtiofs/<tag>/source` (and `socket`).
    pub shares: Vec<(String, String)>,
    /// `pci-devices`: one PCI address a line.
    pub pci_devices: Vec<String>,
    /// `usb-devices`: one QEMU `usb-host` selector a line
    /// (`vendorid=0xabcd,productid=0x0123`).
    pub usb_devices: Vec<String>,
}

/// One line of `macvtap-interfaces`.
#[derive(Clone, Debug)]
pub struct Macvtap {
    /// The interface id (its host-side name).
    pub id: String,
    /// The guest's MAC address.
    pub mac: String,
    /// The host link it sits on.
    pub link: String,
    /// The macvtap mode (`bridge`, `vepa`, …).
    pub mode: String,
}

/// The host side of a microvm.nix host.
#[derive(Debug)]
pub struct MicrovmHost {
    dir: TempDir,
    vms: Vec<DeclaredVm>,
}

impl MicrovmHost {
    /// Lays out the store with one runner per VM, the state directory with
    /// each VM's `current` link, and vmd's inventory.
    ///
    /// # Panics
    /// If the temporary files cannot be written.
    pub fn new(vms: &[DeclaredVm]) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let host = Self {
            dir,
            vms: vms.to_vec(),
        };
        std::fs::create_dir_all(host.store_dir()).expect("store directory");
        let mut inventory = String::new();
        for (cid, vm) in (3..).zip(vms) {
            std::fs::create_dir_all(host.state_dir().join(vm.name)).expect("VM state directory");
            let runner = host.write_runner(vm, cid, 1).expect("runner");
            host.link_current(vm.name, &runner).expect("current link");
            let (vcpus, max_vcpus, memory) = vm.shape();
            let _ = write!(
                inventory,
                "[vm.{name}]\nvcpus = {vcpus}\nmax_vcpus = {max_vcpus}\nmemory_mib = {memory}\n\
                 max_memory_mib = {memory}\n\
                 protected = {protected}\ndescription = \"{description}\"\n\
                 control_socket = \"{socket}\"\n",
                name = vm.name,
                description = vm
                    .description
                    .map_or_else(|| format!("test VM {}", vm.name), str::to_owned),
                protected = vm.protected,
                socket = vm
                    .inventory_control_socket
                    .clone()
                    .unwrap_or_else(|| host.socket(vm.name))
                    .display(),
            );
            if vm.monitor {
                // What vmd's NixOS module writes next to the extraArgs.
                let _ = writeln!(
                    inventory,
                    "monitor_socket = \"{}\"",
                    host.monitor_socket(vm.name).display()
                );
            }
            inventory.push('\n');
        }
        std::fs::write(host.inventory(), inventory).expect("inventory");
        host
    }

    /// The declared VMs.
    pub fn vms(&self) -> &[DeclaredVm] {
        &self.vms
    }

    /// The declared VM `name`.
    pub fn vm(&self, name: &str) -> Option<&DeclaredVm> {
        self.vms.iter().find(|vm| vm.name == name)
    }

    /// The state directory on the host (bound at [`CONTAINER_STATE_DIR`]
    /// and at its own path).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("microvms")
    }

    /// The store that holds the runners (bound read-only at its own path).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// vmd's inventory file.
    pub fn inventory(&self) -> PathBuf {
        self.dir.path().join("inventory.toml")
    }

    /// A VM's main QMP socket (microvm.nix's `<name>.sock`), as seen from
    /// the host.
    pub fn socket(&self, name: &str) -> PathBuf {
        self.state_dir().join(name).join(format!("{name}.sock"))
    }

    /// vmd's own QMP socket of a VM, as seen from the host (QEMU opens it
    /// only for VMs declared with the monitor).
    pub fn monitor_socket(&self, name: &str) -> PathBuf {
        self.state_dir().join(name).join(MONITOR_SOCKET)
    }

    /// Where `current` of a VM points (a runner in the store), if it is set.
    pub fn current(&self, name: &str) -> Option<PathBuf> {
        std::fs::read_link(self.state_dir().join(name).join("current")).ok()
    }

    /// Where `booted` of a VM points, if the VM runs (microvm-set-booted
    /// links it at start and removes it at stop).
    pub fn booted(&self, name: &str) -> Option<PathBuf> {
        std::fs::read_link(self.state_dir().join(name).join("booted")).ok()
    }

    /// Whether the VM's last `microvm-shutdown` saw QEMU exit while it held
    /// the main socket (a graceful stop; `microvm-run` clears the record).
    pub fn stopped_gracefully(&self, name: &str) -> bool {
        std::fs::read_to_string(self.state_dir().join(name).join("microvm-shutdown.log"))
            .is_ok_and(|log| log.lines().any(|l| l == SHUTDOWN_DONE))
    }

    /// Installs a new runner generation for `name` and points `current` at
    /// it, as a host rebuild does (`install-microvm-<name>`: `ln -sTf`).
    /// The running VM keeps its `booted` runner until it restarts.
    ///
    /// # Errors
    /// If `name` is not declared or the files cannot be written.
    pub fn switch_current(&self, name: &str) -> std::io::Result<PathBuf> {
        let (index, vm) = self
            .vms
            .iter()
            .enumerate()
            .find(|(_, vm)| vm.name == name)
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{name} is not declared"),
                )
            })?;
        let suffix = format!("-microvm-qemu-{name}");
        let generations = std::fs::read_dir(self.store_dir())?
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(&suffix))
            .count();
        let cid = 3 + u32::try_from(index).unwrap_or(u32::MAX - 3);
        let runner = self.write_runner(vm, cid, generations + 1)?;
        self.link_current(name, &runner)?;
        Ok(runner)
    }

    /// A container builder holding this host: the state directory, the
    /// store, `microvm@.service`, `microvm-set-booted@.service`,
    /// `microvms.target` and the per-VM drop-ins.
    pub fn container(&self) -> SystemdContainerBuilder {
        let mut builder = SystemdContainer::builder()
            .state_dir(self.state_dir())
            .bind_ro(self.store_dir(), self.store_dir());
        for (name, contents) in self.unit_files() {
            builder = builder.unit(&name, &contents);
        }
        builder
    }

    /// The unit files to place in the container's `/etc/systemd/system`
    /// (names may hold a drop-in directory: `microvm@x.service.d/…`).
    pub fn unit_files(&self) -> Vec<(String, String)> {
        let state = CONTAINER_STATE_DIR;
        let restart_sec = RESTART_SEC.as_secs();
        let timeout = STOP_TIMEOUT.as_secs();
        // nixos-modules/host/default.nix, "microvm@", without User/Group.
        let service = format!(
            "[Unit]\nDescription=MicroVM '%i'\n\
             Requires=microvm-set-booted@%i.service\n\
             After=network.target microvm-set-booted@%i.service\n\
             ConditionPathExists={state}/%i/current/bin/microvm-run\n\n\
             [Service]\nType=simple\nWorkingDirectory={state}/%i\n\
             ExecStart={state}/%i/current/bin/microvm-run\n\
             ExecStop={state}/%i/booted/bin/microvm-shutdown\n\
             TimeoutSec={timeout}\nRestart=always\nRestartSec={restart_sec}s\n\
             SyslogIdentifier=microvm@%i\nLimitNOFILE=1048576\nNotifyAccess=all\n\
             LimitMEMLOCK=infinity\n"
        );
        // "microvm-set-booted@": its `script` as ExecStart (`$$` is a
        // literal `$` to systemd).
        let set_booted = format!(
            "[Unit]\nDescription=Save MicroVM '%i' booted configuration\n\
             Before=microvm@%i.service\nPartOf=microvm@%i.service\n\n\
             [Service]\nType=oneshot\nRemainAfterExit=true\n\
             SyslogIdentifier=microvm-set-booted@%i\nWorkingDirectory={state}/%i\n\
             ExecStart=/bin/sh -c 'rm -f booted; ln -s $$(readlink current) booted'\n\
             ExecStop=/bin/rm booted\n"
        );
        let wants: Vec<String> = self
            .vms
            .iter()
            .filter(|vm| vm.autostart)
            .map(|vm| format!("microvm@{}.service", vm.name))
            .collect();
        let target = format!("[Unit]\nDescription=MicroVMs\nWants={}\n", wants.join(" "));
        let mut units = vec![
            ("microvm@.service".to_owned(), service),
            ("microvm-set-booted@.service".to_owned(), set_booted),
            ("microvms.target".to_owned(), target),
        ];
        for vm in self.vms.iter().filter(|vm| vm.ignores_powerdown) {
            units.push((
                format!("microvm@{}.service.d/stop-timeout.conf", vm.name),
                format!(
                    "[Service]\nTimeoutStopSec={}\n",
                    IGNORED_POWERDOWN_STOP_TIMEOUT.as_secs()
                ),
            ));
        }
        units
    }

    /// Writes runner generation `generation` of `vm` into the store.
    fn write_runner(
        &self,
        vm: &DeclaredVm,
        cid: u32,
        generation: usize,
    ) -> std::io::Result<PathBuf> {
        let runner = self.store_dir().join(format!(
            "{}-microvm-qemu-{}",
            store_hash(vm.name, generation),
            vm.name
        ));
        let bin = runner.join("bin");
        let share = runner.join("share/microvm");
        std::fs::create_dir_all(&bin)?;
        std::fs::create_dir_all(&share)?;
        write_executable(&bin.join("microvm-run"), &microvm_run(vm, generation))?;
        write_executable(&bin.join("microvm-shutdown"), &microvm_shutdown(vm))?;

        std::fs::write(share.join("hypervisor"), "qemu\n")?;
        std::fs::write(share.join("vsock-cid"), format!("{cid}\n"))?;
        std::fs::write(share.join("tap-flags"), "vnet_hdr\n")?;
        let r = &vm.resources;
        let lines = |items: &[String]| items.iter().map(|i| format!("{i}\n")).collect::<String>();
        if !r.taps.is_empty() {
            std::fs::write(share.join("tap-interfaces"), lines(&r.taps))?;
        }
        if !r.macvtaps.is_empty() {
            let text: String = r
                .macvtaps
                .iter()
                .map(|m| format!("{} {} {} {}\n", m.id, m.mac, m.link, m.mode))
                .collect();
            std::fs::write(share.join("macvtap-interfaces"), text)?;
        }
        for (tag, source) in &r.shares {
            let dir = share.join("virtiofs").join(tag);
            std::fs::create_dir_all(&dir)?;
            std::fs::write(
                dir.join("socket"),
                format!("{}-virtiofs-{tag}.sock\n", vm.name),
            )?;
            std::fs::write(dir.join("source"), format!("{source}\n"))?;
        }
        if !r.pci_devices.is_empty() {
            std::fs::write(share.join("pci-devices"), lines(&r.pci_devices))?;
        }
        if !r.usb_devices.is_empty() {
            std::fs::write(share.join("usb-devices"), lines(&r.usb_devices))?;
        }
        Ok(runner)
    }

    /// `ln -sTf runner <state>/<name>/current`, atomically.
    fn link_current(&self, name: &str, runner: &Path) -> std::io::Result<()> {
        let dir = self.state_dir().join(name);
        let staged = dir.join(".current.new");
        let _ = std::fs::remove_file(&staged);
        std::os::unix::fs::symlink(runner, &staged)?;
        std::fs::rename(staged, dir.join("current"))
    }
}

/// A Nix-store-like hash for runner `generation` of `name` (32 base-32
/// characters; only its uniqueness matters).
fn store_hash(name: &str, generation: usize) -> String {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    const ALPHABET: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let hasher = BuildHasherDefault::<DefaultHasher>::default();
    let mut hash = String::new();
    for part in 0..2u8 {
        let mut value = hasher.hash_one((name, generation, part));
        for _ in 0..16 {
            hash.push(char::from(
                ALPHABET[usize::try_from(value % 32).unwrap_or(0)],
            ));
            value /= 32;
        }
    }
    hash
}

/// `bin/microvm-run`: microvm.nix's script (`exec` of the hypervisor
/// command) with the test's QEMU arguments.
fn microvm_run(vm: &DeclaredVm, generation: usize) -> String {
    let name = vm.name;
    let mut args: Vec<String> = vec![format!("/usr/bin/{QEMU}"), "-name".into(), name.into()];
    match &vm.qemu_args {
        Some(own) => args.extend(own.iter().cloned()),
        None => {
            let (vcpus, max_vcpus, memory) = vm.shape();
            let mut previous = "";
            for arg in DEFAULT_ARGS {
                args.push(match previous {
                    "-smp" if vm.size.is_some() => format!("{vcpus},maxcpus={max_vcpus}"),
                    "-m" if vm.size.is_some() => {
                        format!("{memory}M,slots=2,maxmem={}M", memory + 768)
                    }
                    _ => (*arg).to_owned(),
                });
                previous = arg;
            }
        }
    }
    args.extend(["-no-user-config", "-no-reboot"].map(str::to_owned));
    if !vm.resources.usb_devices.is_empty() {
        // microvm.nix adds an xHCI controller when USB devices are declared
        // (the devices themselves do not exist here).
        args.extend(["-device", "qemu-xhci,id=usb"].map(str::to_owned));
    }
    args.extend(["-qmp".to_owned(), format!("unix:{name}.sock,server,nowait")]);
    if vm.monitor {
        args.extend([
            "-qmp".to_owned(),
            format!("unix:{CONTAINER_STATE_DIR}/{name}/{MONITOR_SOCKET},server=on,wait=off"),
        ]);
    }
    let command: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
    format!(
        "#!/bin/sh\n# microvm-run of {name}, runner generation {generation}\nset -eu\n\
         # test record of the last microvm-shutdown, cleared at each start\n\
         rm -f microvm-shutdown.log\n\
         exec {}\n",
        command.join(" ")
    )
}

/// `bin/microvm-shutdown`: microvm.nix's `shutdownCommand` for QEMU, with
/// the ACPI power button instead of Ctrl+Alt+Delete, the stand-in guest's
/// power-off (`quit` on the held connection) and a record of what
/// happened in `microvm-shutdown.log`.
fn microvm_shutdown(vm: &DeclaredVm) -> String {
    let name = vm.name;
    let guest = if vm.ignores_powerdown {
        "  # the guest ignores the button: nothing more is sent\n".to_owned()
    } else {
        format!(
            "  # stand-in for the guest powering off\n  sleep {:.3}\n  \
             echo '{{\"execute\":\"quit\"}}'\n  echo 'quit sent' >>microvm-shutdown.log\n",
            vm.powerdown_delay.as_secs_f64()
        )
    };
    format!(
        "#!/bin/sh\n# microvm-shutdown of {name} (microvm.nix lib/runners/qemu.nix)\n\
         # Exit gracefully if QEMU is already gone\n\
         if [ ! -S {name}.sock ]; then\n  exit 0\nfi\n\
         echo 'powerdown sent' >microvm-shutdown.log\n\
         (\n  echo '{{\"execute\":\"qmp_capabilities\"}}'\n  \
         echo '{{\"execute\":\"system_powerdown\"}}'\n{guest}\
         \x20 # wait for exit, holding the connection (microvm.nix: cat)\n\
         \x20 tail --pid=\"${{MAINPID:?}}\" -s 0.1 -f /dev/null\n\
         ) | socat STDIO UNIX:{name}.sock,shut-none && \\\n\
         \x20 echo '{SHUTDOWN_DONE}' >>microvm-shutdown.log\n"
    )
}

fn write_executable(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, text)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
}

/// Quotes `arg` for sh where needed.
fn shell_quote(arg: &str) -> String {
    if arg
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./:,=+@%".contains(c))
    {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}
