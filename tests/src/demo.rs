//! A demo host in one command (`vmd-demo`, `scripts/demo`): the harness's
//! real microvm host, systemd in systemd-nspawn running microvm.nix-shaped
//! QEMU VMs, served by the real `vmd` binary in development mode, so
//! `vmctl --dev list`, `vmctl --dev top` and the panel show real VMs.
//!
//! 1. [`preflight`] checks what the demo needs before it touches anything:
//!    root, the programs it runs, the `vmd` binary, no other demo on the
//!    development directory ([`vmd_proto::dev::dir`]), `127.0.0.1:9876`
//!    free; then it makes `<dev dir>/demo`, the demo's state directory,
//!    with the demo's PID in it. Each failure is a [`DemoError`] that says
//!    what to do.
//! 2. [`Demo::start`] puts every temporary directory of the harness in
//!    the state directory; ensures the development PKI (as `vmd serve
//!    --dev` does); lays out [`VMS`] with [`MicrovmHost`]; boots the
//!    container; starts `microvms.target`; starts
//!    `vmd serve -c <dir>/vmd.toml` (the development PKI and address,
//!    `dev-admin` an admin of every VM, the container's bus and
//!    cgroups, no vsock); and waits until vmd answers `dev-admin` with
//!    every VM in its expected state. nspawn and vmd run in process groups of their own: a
//!    terminal's Ctrl-C reaches only the demo, which stops them in order.
//! 3. [`Demo::stop`] (on SIGINT, SIGTERM or SIGHUP, see [`run`]) stops vmd
//!    (SIGTERM), halts the container (its QEMUs end with it), tears down
//!    its cgroups and mounts, and removes the state directory, which it
//!    refuses to do while anything is still mounted below it.
//!
//! A signal during start-up drops what was built so far, which tears the
//! container down the same way. A demo killed outright (SIGKILL) leaves
//! its container behind; the next one then refuses to start and names the
//! mounts left under the state directory.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};
use tokio::signal::unix::{SignalKind, signal};
use vmd::pki::{self, EnsureSpec, PkiLayout};
use vmd_client::{Client, ClientTls, Endpoint};
use vmd_proto::VmState;

use crate::microvm::{DeclaredVm, MicrovmHost};
use crate::nspawn::SystemdContainer;

/// The demo's VMs: a Ghaf host's usual set, with varied sizes; audio-vm is
/// not autostarted and stays stopped until someone starts it.
pub fn vms() -> Vec<DeclaredVm> {
    VMS.iter()
        .map(
            |&(name, description, vcpus, memory, autostart, protected)| {
                let vm = DeclaredVm::new(name)
                    .sized(vcpus, memory)
                    .described(description);
                let vm = if autostart { vm.autostart() } else { vm };
                if protected { vm.protected() } else { vm }
            },
        )
        .collect()
}

/// Name, description, vCPUs, memory (MiB), autostarted, protected.
pub const VMS: &[(&str, &str, u32, u32, bool, bool)] = &[
    ("net-vm", "network VM", 1, 512, true, true),
    ("gui-vm", "GUI VM (desktop and panel)", 4, 3072, true, false),
    ("audio-vm", "audio VM", 1, 256, false, false),
    ("admin-vm", "admin VM", 2, 1024, true, true),
];

/// The state directory of the demo inside the development directory.
pub const STATE_DIR_NAME: &str = "demo";

/// The first line the demo prints on stdout once every VM is in its
/// expected state behind vmd.
pub const READY: &str = "vmd-demo: ready";

/// Programs the demo runs (directly, or in the container's units).
const PROGRAMS: &[(&str, &str)] = &[
    ("systemd-nspawn", "systemd-container"),
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("socat", "socat"),
    ("nsenter", "util-linux"),
    ("dbus-daemon", "dbus"),
];

/// How long vmd may take to serve every VM in its expected state.
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// How long vmd may take to stop after SIGTERM before it is killed.
const VMD_STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// Why the demo cannot run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Not root.
    #[error(
        "must run as root: it boots systemd in systemd-nspawn and \
         mounts (try `sudo ./scripts/demo`)"
    )]
    NotRoot,
    /// A program is missing.
    #[error("{program} is not installed (apt-get install {package})")]
    MissingProgram {
        /// The program.
        program: &'static str,
        /// The Debian package that has it.
        package: &'static str,
    },
    /// The vmd binary is missing.
    #[error("{} is missing: build it (`cargo build -p vmd`) or pass --vmd PATH", .0.display())]
    MissingVmd(PathBuf),
    /// Another demo holds the development directory.
    #[error(
        "another vmd-demo is running with {} (stop it with Ctrl-C first)",
        .0.display()
    )]
    AlreadyRunning(PathBuf),
    /// The development address is taken.
    #[error("{addr} is in use: another vmd-demo or `vmd serve --dev` is running (stop it first)")]
    AddressInUse {
        /// The address.
        addr: SocketAddr,
    },
    /// A demo that was killed left mounts behind.
    #[error(
        "{} is left from a demo that did not clean up (killed?), with mounts: {}; \
         unmount them (umount -l) and remove the directory",
        .dir.display(),
        .mounts.iter().map(|m| m.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    Leftover {
        /// The state directory.
        dir: PathBuf,
        /// Mount points below it.
        mounts: Vec<PathBuf>,
    },
    /// The development PKI could not be made.
    #[error("cannot create the development PKI")]
    Pki(#[source] vmd::pki::PkiError),
    /// A file or directory of the demo.
    #[error("{what} {}", .path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// vmd did not start or exited.
    #[error("vmd {0}")]
    Vmd(String),
    /// Start-up failed inside the harness (the message says where).
    #[error("setting up the demo host failed: {0}")]
    Setup(String),
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DemoError + 'a {
    move |source| DemoError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// What [`preflight`] found and made: where the demo lives (its state
/// directory, made, with the demo's PID in `pid`).
#[derive(Debug)]
pub struct Preflight {
    /// The development directory (`$VMD_DEV_DIR` or its default).
    pub dev_dir: PathBuf,
    /// The demo's state directory (`<dev dir>/demo`).
    pub state_dir: PathBuf,
    /// The `vmd` binary.
    pub vmd: PathBuf,
}

/// Whether the effective user is root, from a `/proc/<pid>/status` text
/// (`Uid:` real, effective, saved, filesystem).
pub fn is_root(status: &str) -> bool {
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0")
}

/// Mount points at or below `dir` in a `/proc/self/mountinfo` text,
/// deepest first.
pub fn mounts_below(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    let mut mounts: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        .map(unescape_mount_path)
        .filter(|point| point.starts_with(dir))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    mounts
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mount_path(field: &str) -> PathBuf {
    let mut out = Vec::with_capacity(field.len());
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(code) = bytes
                .get(i + 1..i + 4)
                .and_then(|o| std::str::from_utf8(o).ok())
                .and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            out.push(code);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    use std::os::unix::ffi::OsStringExt as _;
    PathBuf::from(std::ffi::OsString::from_vec(out))
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// The development address (`127.0.0.1:9876`).
pub fn dev_addr() -> SocketAddr {
    vmd_proto::dev::TCP_ADDR
        .parse()
        .expect("vmd_proto::dev::TCP_ADDR is a socket address")
}

/// Checks everything the demo needs before it changes anything (see the
/// module docs, step 1).
///
/// # Errors
/// The first [`DemoError`] found.
pub fn preflight(vmd: PathBuf) -> Result<Preflight, DemoError> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(io("cannot read", Path::new("/proc/self/status")))?;
    if !is_root(&status) {
        return Err(DemoError::NotRoot);
    }
    for &(program, package) in PROGRAMS {
        if !on_path(program) {
            return Err(DemoError::MissingProgram { program, package });
        }
    }
    if !vmd.is_file() {
        return Err(DemoError::MissingVmd(vmd));
    }
    let dev_dir = vmd_proto::dev::dir();
    std::fs::create_dir_all(&dev_dir).map_err(io("cannot create", &dev_dir))?;
    let dev_dir = dev_dir
        .canonicalize()
        .map_err(io("cannot resolve", &dev_dir))?;
    let state_dir = dev_dir.join(STATE_DIR_NAME);
    let pid_file = state_dir.join("pid");
    if let Ok(pid) = std::fs::read_to_string(&pid_file)
        && std::fs::read_to_string(format!("/proc/{}/comm", pid.trim()))
            .is_ok_and(|comm| comm.trim() == "vmd-demo")
    {
        return Err(DemoError::AlreadyRunning(dev_dir));
    }
    let addr = dev_addr();
    if let Err(e) = TcpListener::bind(addr) {
        return Err(if e.kind() == std::io::ErrorKind::AddrInUse {
            DemoError::AddressInUse { addr }
        } else {
            DemoError::Io {
                what: "cannot bind",
                path: PathBuf::from(addr.to_string()),
                source: e,
            }
        });
    }
    if state_dir.exists() {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(io("cannot read", Path::new("/proc/self/mountinfo")))?;
        let mounts = mounts_below(&mountinfo, &state_dir);
        if !mounts.is_empty() {
            return Err(DemoError::Leftover {
                dir: state_dir,
                mounts,
            });
        }
        // Left by a demo that died without mounts in place: only files.
        std::fs::remove_dir_all(&state_dir).map_err(io("cannot remove", &state_dir))?;
    }
    // Made atomically: of two demos starting at once, one gets it.
    match std::fs::create_dir(&state_dir) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(DemoError::AlreadyRunning(dev_dir));
        }
        made => made.map_err(io("cannot create", &state_dir))?,
    }
    std::fs::write(&pid_file, format!("{}\n", std::process::id()))
        .map_err(io("cannot write", &pid_file))?;
    Ok(Preflight {
        dev_dir,
        state_dir,
        vmd,
    })
}

/// A running demo host.
#[derive(Debug)]
pub struct Demo {
    vmd: Child,
    container: SystemdContainer,
    host: MicrovmHost,
    state_dir: PathBuf,
}

impl Demo {
    /// Builds the host and starts vmd (module docs, step 2).
    ///
    /// # Errors
    /// If the state directory, the PKI or vmd fail. The harness panics
    /// where the container or a VM does not come up; what was built is
    /// torn down as the panic unwinds.
    pub async fn start(pre: &Preflight) -> Result<Self, DemoError> {
        let state_dir = &pre.state_dir;
        // Every temporary directory of the harness (the host's store and
        // state directory, the container's root mount) lives in here.
        tempfile::env::override_temp_dir(state_dir)
            .map_err(|_| DemoError::Setup("the temporary directory was already chosen".into()))?;
        let pki_dir = pre.dev_dir.join("pki");
        pki::ensure(&PkiLayout::new(&pki_dir), &EnsureSpec::dev()).map_err(DemoError::Pki)?;

        let vms = vms();
        let host = MicrovmHost::new(&vms);
        let container = host.container().own_process_group().boot().await;
        container.systemctl(&["start", "microvms.target"]).await;
        for vm in vms.iter().filter(|vm| vm.autostart) {
            crate::rig::wait_for_qmp(&host.socket(vm.name)).await;
        }

        let config = state_dir.join("vmd.toml");
        let paths = HostPaths {
            state_dir: host.state_dir(),
            inventory: host.inventory(),
            bus: container.bus_address(),
            cgroup_root: container.cgroup_root(),
        };
        std::fs::write(&config, vmd_config(&pki_dir, &paths))
            .map_err(io("cannot write", &config))?;
        let vmd = Command::new(&pre.vmd)
            .args(["serve", "-c"])
            .arg(&config)
            .stdin(Stdio::null())
            // Its log goes to the demo's stderr; a terminal's Ctrl-C
            // reaches only the demo, which stops vmd first.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| DemoError::Vmd(format!("cannot start: {e}")))?;
        let mut demo = Self {
            vmd,
            container,
            host,
            state_dir: state_dir.clone(),
        };
        demo.wait_until_served(&pki_dir).await?;
        Ok(demo)
    }

    /// Waits until vmd answers `dev-admin` with every VM in the state the
    /// host gives it (autostarted running, the others stopped).
    async fn wait_until_served(&mut self, pki_dir: &Path) -> Result<(), DemoError> {
        let tls = ClientTls::from_files(
            &pki_dir.join("ca.pem"),
            &pki_dir.join(format!("clients/{}.pem", vmd_proto::dev::CLIENT_NAME)),
            &pki_dir.join(format!("clients/{}.key", vmd_proto::dev::CLIENT_NAME)),
            vmd_proto::SERVER_NAME,
        )
        .map_err(|e| DemoError::Vmd(format!("development client: {e}")))?;
        let endpoint = Endpoint::Tcp {
            host: dev_addr().ip().to_string(),
            port: dev_addr().port(),
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.vmd.try_wait() {
                return Err(DemoError::Vmd(format!("exited during start-up ({status})")));
            }
            let last = match Client::connect(&endpoint, &tls).await {
                Ok(client) => match client.list_vms().await {
                    Ok(list) => {
                        let wrong: Vec<String> = self
                            .host
                            .vms()
                            .iter()
                            .filter(|vm| {
                                let want = if vm.autostart {
                                    VmState::Running
                                } else {
                                    VmState::Stopped
                                };
                                !list
                                    .iter()
                                    .any(|i| i.name.as_str() == vm.name && i.state == want)
                            })
                            .map(|vm| vm.name.to_owned())
                            .collect();
                        if wrong.is_empty() {
                            client.close().await;
                            return Ok(());
                        }
                        client.close().await;
                        format!("not yet in their states: {}", wrong.join(", "))
                    }
                    Err(e) => format!("list: {e}"),
                },
                Err(e) => format!("connect: {e}"),
            };
            if Instant::now() > deadline {
                return Err(DemoError::Vmd(format!(
                    "did not serve the VMs within {READY_TIMEOUT:?} ({last})"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The container's machine name (in nspawn's command line and its
    /// cgroup's name).
    pub fn machine(&self) -> &str {
        self.container.machine()
    }

    /// vmd's PID, while it runs.
    pub fn vmd_pid(&self) -> Option<u32> {
        self.vmd.id()
    }

    /// Waits until vmd exits on its own (it should not while the demo
    /// runs).
    pub async fn vmd_exited(&mut self) -> std::io::Result<ExitStatus> {
        self.vmd.wait().await
    }

    /// Stops vmd, halts and tears down the container, removes the state
    /// directory (module docs, step 3).
    ///
    /// # Errors
    /// If something is still mounted below the state directory or it
    /// cannot be removed (it is then left in place, named in the error).
    pub async fn stop(mut self) -> Result<(), DemoError> {
        if let Some(pid) = self.vmd.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            if tokio::time::timeout(VMD_STOP_TIMEOUT, self.vmd.wait())
                .await
                .is_err()
            {
                let _ = self.vmd.kill().await;
            }
        }
        // A clean halt first (systemd stops the VMs), then the teardown
        // that dropping does: kill what is left, remove cgroups, unmount.
        let _clean = self.container.stop().await;
        drop(self.host);
        remove_state_dir(&self.state_dir)
    }
}

/// Removes the state directory, never through a mount.
///
/// # Errors
/// If something is mounted below it, or removal fails.
pub fn remove_state_dir(dir: &Path) -> Result<(), DemoError> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(io("cannot read", Path::new("/proc/self/mountinfo")))?;
    let mounts = mounts_below(&mountinfo, dir);
    if !mounts.is_empty() {
        return Err(DemoError::Leftover {
            dir: dir.to_owned(),
            mounts,
        });
    }
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io("cannot remove", dir)(e)),
        _ => Ok(()),
    }
}

/// Where vmd finds the demo host.
#[derive(Debug)]
struct HostPaths {
    state_dir: PathBuf,
    inventory: PathBuf,
    bus: String,
    cgroup_root: Option<PathBuf>,
}

/// vmd's config: `vmd serve --dev`'s PKI, address and policy, with the
/// demo host's inventory, the container's bus and cgroups, and no vsock.
fn vmd_config(pki_dir: &Path, host: &HostPaths) -> String {
    let path = |p: &Path| p.display().to_string();
    let mut config = format!(
        "[listen]\ntcp = [{addr:?}]\n[listen.vsock]\nenable = false\n\
         [listen.hybrid_vsock]\nenable = false\n\
         [tls]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n\
         [vms]\nstate_dir = {state:?}\ninventory = {inventory:?}\nsystemd_bus = {bus:?}\n",
        addr = vmd_proto::dev::TCP_ADDR,
        ca = path(&pki_dir.join("ca.pem")),
        cert = path(&pki_dir.join("server.pem")),
        key = path(&pki_dir.join("server.key")),
        state = path(&host.state_dir),
        inventory = path(&host.inventory),
        bus = host.bus,
    );
    if let Some(root) = &host.cgroup_root {
        let _ = writeln!(config, "cgroup_root = {:?}", path(root));
    }
    let _ = write!(
        config,
        "[[policy.identity]]\nname = {:?}\nrole = \"admin\"\nvms = [\"*\"]\n",
        vmd_proto::dev::CLIENT_NAME
    );
    config
}

/// What to run next, printed once the demo is ready.
fn instructions(pre: &Preflight, demo: &Demo) -> String {
    let here = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_owned));
    let tool = |name: &str| {
        here.as_ref()
            .map(|dir| dir.join(name))
            .filter(|p| p.is_file())
            .map_or_else(|| name.to_owned(), |p| p.display().to_string())
    };
    let running = demo.host.vms().iter().filter(|vm| vm.autostart).count();
    let vmctl = tool("vmctl");
    let mut text = format!(
        "{READY}: vmd serves {} VMs ({running} running) on {} (systemd in nspawn machine {}, \
         state in {})\n\nIn another terminal, as root:\n  export VMD_DEV_DIR={}\n  \
         {vmctl} --dev list\n  {vmctl} --dev top\n  {vmctl} --dev start audio-vm --wait\n",
        demo.host.vms().len(),
        vmd_proto::dev::TCP_ADDR,
        demo.machine(),
        pre.state_dir.display(),
        pre.dev_dir.display(),
    );
    let panel = tool("vmd-panel");
    if Path::new(&panel).is_file() {
        let _ = writeln!(text, "  {panel} --dev");
    }
    text.push_str("\nCtrl-C stops the demo and removes everything it made.\n");
    text
}

/// Runs the demo until SIGINT, SIGTERM or SIGHUP: preflight, start, print
/// what to run next, wait, stop. Messages go to stderr, the ready text to
/// stdout.
///
/// # Errors
/// A [`DemoError`] from any step; what was started is stopped first.
pub async fn run(vmd: PathBuf) -> Result<(), DemoError> {
    let signals = |kind: SignalKind| {
        signal(kind).map_err(|e| DemoError::Setup(format!("cannot handle signals: {e}")))
    };
    // Handlers first: a signal at any point ends the demo cleanly.
    let (mut int, mut term, mut hup) = (
        signals(SignalKind::interrupt())?,
        signals(SignalKind::terminate())?,
        signals(SignalKind::hangup())?,
    );
    let pre = preflight(vmd)?;
    eprintln!(
        "vmd-demo: booting systemd in systemd-nspawn with {} microvm.nix-shaped QEMU VMs…",
        VMS.len()
    );
    let started = Instant::now();
    let stop_signal = async {
        tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
            _ = hup.recv() => "SIGHUP",
        }
    };
    tokio::pin!(stop_signal);

    // Start-up runs in a task: a panic in the harness unwinds there (its
    // drops tear the container down) and comes back as an error.
    let pre_shared = std::sync::Arc::new(pre);
    let setup = {
        let pre = pre_shared.clone();
        tokio::spawn(async move { Demo::start(&pre).await })
    };
    let mut setup = setup;
    let outcome = tokio::select! {
        joined = &mut setup => Some(joined),
        sig = &mut stop_signal => {
            eprintln!("vmd-demo: {sig} during start-up: tearing down");
            setup.abort();
            // Completes once the task's future, and with it the partial
            // host, has been dropped (torn down).
            let _ = setup.await;
            None
        }
    };
    let pre = &*pre_shared;
    let mut demo = match outcome {
        Some(Ok(Ok(demo))) => demo,
        Some(Ok(Err(e))) => {
            remove_state_dir(&pre.state_dir)?;
            return Err(e);
        }
        Some(Err(joined)) => {
            remove_state_dir(&pre.state_dir)?;
            return Err(DemoError::Setup(panic_message(joined)));
        }
        None => {
            remove_state_dir(&pre.state_dir)?;
            return Ok(());
        }
    };
    eprintln!("vmd-demo: up in {:.1} s", started.elapsed().as_secs_f64());
    print!("{}", instructions(pre, &demo));
    let _ = std::io::stdout().flush();

    let vmd_ended = tokio::select! {
        sig = &mut stop_signal => {
            eprintln!("vmd-demo: {sig}: stopping vmd and the container…");
            None
        }
        status = demo.vmd_exited() => Some(status),
    };
    let stopped = demo.stop().await;
    match vmd_ended {
        Some(status) => {
            stopped?;
            Err(DemoError::Vmd(format!(
                "exited while the demo ran ({}); the demo is stopped",
                status.map_or_else(|e| e.to_string(), |s| s.to_string())
            )))
        }
        None => {
            stopped?;
            eprintln!("vmd-demo: stopped; removed {}", pre.state_dir.display());
            Ok(())
        }
    }
}

fn panic_message(joined: tokio::task::JoinError) -> String {
    match joined.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "a panic without a message".into()),
        Err(e) => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_the_effective_uid() {
        assert!(is_root("Name:\tx\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\n"));
        // sudo-less setuid view: real 1000, effective 0.
        assert!(is_root("Uid:\t1000\t0\t0\t0\n"));
        assert!(!is_root("Uid:\t0\t1000\t1000\t1000\n"));
        assert!(!is_root("Uid:\t1000\t1000\t1000\t1000\n"));
        assert!(!is_root("Name:\tx\n"));
    }

    #[test]
    fn mounts_below_finds_nested_and_escaped_points_deepest_first() {
        let info = "\
22 1 8:1 / / rw - ext4 /dev/sda1 rw
90 22 8:1 / /s/demo/vmd-nspawn-x/root ro - ext4 /dev/sda1 rw
91 90 0:5 / /s/demo/vmd-nspawn-x/root/proc rw - proc proc rw
92 22 0:6 / /s/demo\\040two rw - tmpfs t rw
93 22 0:7 / /s/demolition rw - tmpfs t rw
";
        assert_eq!(
            mounts_below(info, Path::new("/s/demo")),
            vec![
                PathBuf::from("/s/demo/vmd-nspawn-x/root/proc"),
                PathBuf::from("/s/demo/vmd-nspawn-x/root"),
            ]
        );
        assert_eq!(
            mounts_below(info, Path::new("/s/demo two")),
            vec![PathBuf::from("/s/demo two")]
        );
        assert!(mounts_below(info, Path::new("/elsewhere")).is_empty());
    }

    #[test]
    fn the_config_vmd_reads_is_dev_mode_on_the_demo_host() {
        let host = HostPaths {
            state_dir: "/d/demo/.tmp1/microvms".into(),
            inventory: "/d/demo/.tmp1/inventory.toml".into(),
            bus: "unix:path=/d/demo/vmd-nspawn-x/dbus/system_bus_socket".into(),
            cgroup_root: Some("/sys/fs/cgroup/x/vmd-1-0.nspawn".into()),
        };
        let text = vmd_config(Path::new("/d/pki"), &host);
        let config = vmd::Config::parse(&text, Path::new("demo.toml")).expect("valid config");
        let dev = vmd::Config::dev(Path::new("/d"));
        assert_eq!(config.tcp, vec![dev_addr()]);
        assert_eq!(config.tls, dev.tls);
        assert_eq!(config.vsock, None);
        assert_eq!(config.hybrid_vsock_port, None);
        assert_eq!(config.policy.identities, dev.policy.identities);
        assert_eq!(config.vms.inventory.state_dir, host.state_dir);
        assert_eq!(config.vms.inventory.file, Some(host.inventory));
        assert_eq!(config.vms.systemd_bus, Some(host.bus));
        assert_eq!(config.vms.cgroup_root, host.cgroup_root);
    }

    #[test]
    fn the_demo_declares_running_and_stopped_vms_of_varied_sizes() {
        let vms = vms();
        assert!(vms.iter().any(|vm| vm.autostart));
        assert!(vms.iter().any(|vm| !vm.autostart));
        let sizes: std::collections::BTreeSet<_> = vms.iter().map(|vm| vm.size).collect();
        assert_eq!(sizes.len(), vms.len());
    }
}
