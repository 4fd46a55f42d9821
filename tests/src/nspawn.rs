//! Real systemd, booted as PID 1 in `systemd-nspawn`, for system tests.
//!
//! 1. [`SystemdContainerBuilder::boot`] waits for one of
//!    [`MAX_CONCURRENT`] slots, makes a temporary work directory and
//!    bind-mounts `/` read-only at `<work>/root` (nspawn refuses `/`
//!    itself; read-only so no path through the work directory can write to
//!    the host's root).
//! 2. It makes a cgroup of its own for the container under this process's
//!    cgroup in each writable hierarchy (cgroup2, and `name=systemd` on a
//!    hybrid host). Without it, containers started by parallel tests would
//!    share one cgroup tree, and stopping `dbus.service` in one would kill
//!    the bus of all.
//! 3. It runs `systemd-nspawn --volatile=overlay` on that root (writes go
//!    to a tmpfs overlay), with a private network, the unit files bound
//!    read-only into `/etc/systemd/system/`, the state directory bound at
//!    `/var/lib/microvms`, and `<work>/dbus` at `/run/dbus`, so the
//!    container's system bus is `<work>/dbus/system_bus_socket` on the
//!    host. It boots `basic.target` (which holds `dbus.socket`), not
//!    `multi-user.target`: the host's own enabled services stay out.
//! 4. It waits until systemd answers on that bus with `SystemState`
//!    `running` or `degraded`.
//! 5. [`SystemdContainer::stop`] asks for a clean halt (SIGTERM to nspawn,
//!    which sends `SIGRTMIN+3` to the container's systemd); dropping a
//!    container, also on a panicking test, SIGKILLs its PID 1 (the kernel
//!    then kills everything in it), reaps nspawn, kills whatever is left
//!    in its cgroups, removes them and unmounts the root. The work
//!    directory is deleted only once the root is verifiably unmounted.
//!
//! [`SystemdContainer::stop_bus`] and [`SystemdContainer::start_bus`] take
//! the container's D-Bus away and bring it back, through `systemctl` run
//! inside with `nsenter` (it talks to systemd on its private socket, not on
//! the bus).
//!
//! Needs root, `systemd-nspawn` (systemd-container), `dbus`, `nsenter`
//! (util-linux). A missing program panics: suites that need it fail,
//! never skip. A test process killed outright (SIGKILL) leaves its
//! container running and its root mounted.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio::sync::{Semaphore, SemaphorePermit};

/// The nspawn binary.
pub const NSPAWN: &str = "systemd-nspawn";

/// Where the state directory appears inside the container.
pub const MICROVMS_DIR: &str = "/var/lib/microvms";

/// How long systemd may take to come up (it takes well under a second
/// alone; parallel tests on a small machine slow it down).
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a clean halt may take before the container is killed.
const HALT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long nspawn may take to exit once its PID 1 is gone.
const REAP_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between probes of the bus while waiting for systemd.
const PROBE_INTERVAL: Duration = Duration::from_millis(20);

/// Containers one test process runs at once. Each systemd takes several
/// inotify instances, and all root processes of the host share one limit
/// (`fs.inotify.max_user_instances`, 128 by default); past it systemd
/// fails to boot. Tests beyond this wait for a container to go.
pub const MAX_CONCURRENT: usize = 8;

static SLOTS: Semaphore = Semaphore::const_new(MAX_CONCURRENT);

/// A bind mount into the container.
#[derive(Clone, Debug)]
struct Bind {
    host: PathBuf,
    container: PathBuf,
    read_only: bool,
}

impl Bind {
    fn arg(&self) -> String {
        let flag = if self.read_only {
            "--bind-ro"
        } else {
            "--bind"
        };
        format!(
            "{flag}={}:{}",
            self.host.display(),
            self.container.display()
        )
    }
}

/// What to put into a [`SystemdContainer`]; [`Self::boot`] starts it.
#[derive(Debug, Default)]
pub struct SystemdContainerBuilder {
    units: BTreeMap<String, String>,
    state_dir: Option<PathBuf>,
    binds: Vec<Bind>,
    boot_timeout: Option<Duration>,
    own_process_group: bool,
}

impl SystemdContainerBuilder {
    /// Places a unit file `name` (e.g. `microvm@.service`, or a drop-in
    /// such as `microvm@vm1.service.d/timeout.conf`) with `contents`
    /// read-only in the container's `/etc/systemd/system/`.
    #[must_use]
    pub fn unit(mut self, name: &str, contents: &str) -> Self {
        self.units.insert(name.to_owned(), contents.to_owned());
        self
    }

    /// Binds the host directory `dir` (absolute) read-write at `/var/lib/microvms`
    /// and at its own path, so files that units write there under either
    /// name are where vmd on the host looks. Without it, the container
    /// gets a fresh directory ([`SystemdContainer::state_dir`]).
    #[must_use]
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir = Some(dir.into());
        self
    }

    /// Binds host path `host` read-write at `container` (both absolute).
    #[must_use]
    pub fn bind(mut self, host: impl Into<PathBuf>, container: impl Into<PathBuf>) -> Self {
        self.binds.push(Bind {
            host: host.into(),
            container: container.into(),
            read_only: false,
        });
        self
    }

    /// Binds host path `host` read-only at `container` (both absolute).
    #[must_use]
    pub fn bind_ro(mut self, host: impl Into<PathBuf>, container: impl Into<PathBuf>) -> Self {
        self.binds.push(Bind {
            host: host.into(),
            container: container.into(),
            read_only: true,
        });
        self
    }

    /// Runs nspawn in a process group of its own, so a terminal's Ctrl-C
    /// reaches only this process, which then stops the container in its
    /// own order (`vmd-demo`: vmd first).
    #[must_use]
    pub fn own_process_group(mut self) -> Self {
        self.own_process_group = true;
        self
    }

    /// How long to wait for systemd (default 60 s).
    #[must_use]
    pub fn boot_timeout(mut self, timeout: Duration) -> Self {
        self.boot_timeout = Some(timeout);
        self
    }

    /// Boots the container and waits until systemd answers on its bus.
    ///
    /// # Panics
    /// If not root, if `systemd-nspawn` is missing, if nspawn exits, or if
    /// systemd does not come up in time (the boot log is in the message).
    /// Whatever was set up is torn down as the panic unwinds.
    pub async fn boot(self) -> SystemdContainer {
        assert!(
            which(NSPAWN),
            "{NSPAWN} is not installed (apt-get install systemd-container)"
        );
        let slot = SLOTS
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let work = tempfile::Builder::new()
            .prefix("vmd-nspawn-")
            .tempdir()
            .expect("temporary directory");
        let machine = format!("vmd-{}-{}", std::process::id(), next_id());
        let mut container = SystemdContainer {
            root: work.path().join("root"),
            bus_dir: work.path().join("dbus"),
            log: work.path().join("boot.log"),
            state_dir: self
                .state_dir
                .clone()
                .unwrap_or_else(|| work.path().join("microvms")),
            work: Some(work),
            machine,
            mounted: false,
            cgroups: Vec::new(),
            child: None,
            leader: None,
            boot_time: Duration::ZERO,
            _slot: slot,
        };
        container.setup(&self);
        let started = Instant::now();
        container.spawn(&self);
        container
            .wait_for_systemd(self.boot_timeout.unwrap_or(BOOT_TIMEOUT))
            .await;
        container.boot_time = started.elapsed();
        container.leader = Some(container.find_leader().unwrap_or_else(|| {
            panic!(
                "{}: no container PID 1 under systemd-nspawn",
                container.machine
            )
        }));
        container
    }
}

/// A booted systemd in `systemd-nspawn`; torn down when dropped.
#[derive(Debug)]
pub struct SystemdContainer {
    /// `None` once leaked because the root could not be unmounted.
    work: Option<TempDir>,
    root: PathBuf,
    bus_dir: PathBuf,
    log: PathBuf,
    state_dir: PathBuf,
    machine: String,
    mounted: bool,
    cgroups: Vec<PathBuf>,
    child: Option<Child>,
    leader: Option<u32>,
    boot_time: Duration,
    /// Dropped last, after teardown.
    _slot: SemaphorePermit<'static>,
}

impl SystemdContainer {
    /// A builder: add units, directories, binds, then boot.
    pub fn builder() -> SystemdContainerBuilder {
        SystemdContainerBuilder::default()
    }

    /// The D-Bus address of the container's system bus
    /// (`unix:path=<work>/dbus/system_bus_socket`).
    pub fn bus_address(&self) -> String {
        format!("unix:path={}", self.bus_socket().display())
    }

    /// The host path of the container's system bus socket.
    pub fn bus_socket(&self) -> PathBuf {
        self.bus_dir.join("system_bus_socket")
    }

    /// The host directory bound at `/var/lib/microvms` (and at its own path).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The container's machine name (unique per container).
    pub fn machine(&self) -> &str {
        &self.machine
    }

    /// The host PID of the container's PID 1 (systemd).
    ///
    /// # Panics
    /// Never after [`SystemdContainerBuilder::boot`] returned.
    pub fn leader(&self) -> u32 {
        self.leader.expect("a booted container knows its PID 1")
    }

    /// Where the container's systemd's `ControlGroup` paths are rooted in
    /// this host's unified cgroup hierarchy (what vmd's `cgroup_root` is on
    /// a host whose systemd is PID 1: `/sys/fs/cgroup`). `None` when the
    /// container does not run on cgroup2.
    pub fn cgroup_root(&self) -> Option<PathBuf> {
        let own = std::fs::read_to_string(format!("/proc/{}/cgroup", self.leader())).ok()?;
        let path = own.lines().find_map(|line| line.strip_prefix("0::"))?;
        let mount = cgroup_mounts()
            .into_iter()
            .find(|m| m.version == CgroupVersion::Unified)?
            .mount_point;
        let dir = mount.join(path.trim_start_matches('/'));
        // The container's PID 1 sits in `init.scope` under its root.
        Some(if dir.ends_with("init.scope") {
            dir.parent()?.to_owned()
        } else {
            dir
        })
    }

    /// How long the boot took, from spawning nspawn until systemd said
    /// `running`.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// nspawn's and the container's console output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `program` with `args` inside the container (all its namespaces,
    /// via `nsenter`) and returns its output.
    ///
    /// # Panics
    /// If `nsenter` cannot be run.
    pub async fn exec(&self, program: &str, args: &[&str]) -> Output {
        tokio::process::Command::new("nsenter")
            .arg("--target")
            .arg(self.leader().to_string())
            .arg("--all")
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .expect("nsenter (util-linux) runs")
    }

    /// Runs `systemctl` inside the container (it reaches systemd on its
    /// private socket, without D-Bus).
    ///
    /// # Panics
    /// If `systemctl` fails.
    pub async fn systemctl(&self, args: &[&str]) -> String {
        let out = self.exec("systemctl", args).await;
        assert!(
            out.status.success(),
            "systemctl {args:?} in {}: {}\n{}",
            self.machine,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Takes the system bus away: stops `dbus.socket` and `dbus.service`.
    /// Connections to it close; new ones are refused.
    ///
    /// # Panics
    /// If `systemctl` fails.
    pub async fn stop_bus(&self) {
        self.systemctl(&["stop", "dbus.socket", "dbus.service"])
            .await;
    }

    /// Brings the bus back (`dbus.socket`) and waits until systemd answers
    /// on it again.
    ///
    /// # Panics
    /// If `systemctl` fails or systemd does not return to the bus in time.
    pub async fn start_bus(&self) {
        self.systemctl(&["start", "dbus.socket"]).await;
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            if let Ok(state) = system_state(&self.bus_address()).await
                && (state == "running" || state == "degraded")
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "systemd in {} did not return to the bus",
                self.machine
            );
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    }

    /// Halts the container cleanly, or kills it if that takes longer than
    /// 15 s; then tears down as dropping does. Returns whether the halt
    /// was clean.
    pub async fn stop(mut self) -> bool {
        let Some(child) = self.child.as_mut() else {
            return false;
        };
        // nspawn passes SIGTERM on as --kill-signal (a clean halt).
        signal("TERM", child.id());
        let deadline = Instant::now() + HALT_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return status.success();
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
        false
    }

    /// Mounts the root, writes unit files, makes cgroups.
    fn setup(&mut self, spec: &SystemdContainerBuilder) {
        let work = self.work_dir().to_owned();
        for dir in [
            &self.root,
            &self.bus_dir,
            &work.join("units"),
            &self.state_dir,
        ] {
            std::fs::create_dir_all(dir)
                .unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        }
        for (name, contents) in &spec.units {
            let path = work.join("units").join(name);
            if let Some(dir) = path.parent() {
                // A drop-in (`microvm@x.service.d/…`) has a directory.
                std::fs::create_dir_all(dir)
                    .unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
            }
            std::fs::write(&path, contents)
                .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        }

        run("mount", &["--bind", "/", path_str(&self.root)]);
        self.mounted = true;
        run("mount", &["-o", "remount,bind,ro", path_str(&self.root)]);
        run("mount", &["--make-private", path_str(&self.root)]);

        for dir in container_cgroups(&self.machine) {
            std::fs::create_dir(&dir)
                .unwrap_or_else(|e| panic!("create cgroup {}: {e}", dir.display()));
            self.cgroups.push(dir);
        }
    }

    /// Spawns nspawn inside the container's cgroups.
    fn spawn(&mut self, spec: &SystemdContainerBuilder) {
        let work = self.work_dir().to_owned();
        let mut nspawn: Vec<String> = [
            NSPAWN,
            "--quiet",
            "--register=no",
            "--keep-unit",
            "--private-network",
            "--volatile=overlay",
            "--kill-signal=SIGRTMIN+3",
        ]
        .map(str::to_owned)
        .to_vec();
        nspawn.push(format!("--directory={}", self.root.display()));
        nspawn.push(format!("--machine={}", self.machine));
        nspawn.push(format!("--bind={}:/run/dbus", self.bus_dir.display()));
        let state = &self.state_dir;
        nspawn.push(format!("--bind={}:{MICROVMS_DIR}", state.display()));
        if state != Path::new(MICROVMS_DIR) {
            nspawn.push(format!("--bind={}:{}", state.display(), state.display()));
        }
        for name in spec.units.keys() {
            let file = work.join("units").join(name);
            nspawn.push(format!(
                "--bind-ro={}:/etc/systemd/system/{name}",
                file.display()
            ));
        }
        nspawn.extend(spec.binds.iter().map(Bind::arg));
        nspawn.extend(
            [
                "--boot",
                "systemd.firstboot=off",
                "systemd.unit=basic.target",
            ]
            .map(str::to_owned),
        );

        // A shell joins the cgroups, then becomes nspawn (no pre_exec: no
        // unsafe code).
        let procs: Vec<PathBuf> = self
            .cgroups
            .iter()
            .map(|c| c.join("cgroup.procs"))
            .collect();
        let script = r#"n=$1; shift
while [ "$n" -gt 0 ]; do echo $$ >"$1" || exit 125; shift; n=$((n - 1)); done
exec "$@""#;
        let log = File::create(&self.log).expect("boot log");
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(script)
            .arg("sh")
            .arg(procs.len().to_string())
            .args(&procs)
            .args(&nspawn)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("boot log"))
            .stderr(log);
        if spec.own_process_group {
            use std::os::unix::process::CommandExt as _;
            command.process_group(0);
        }
        if cgroup_mounts()
            .iter()
            .any(|m| m.version == CgroupVersion::Unified)
        {
            // The container's systemd on cgroup2 as on a Ghaf host; on a
            // hybrid host it also gets CPU accounting this way.
            command.env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1");
        }
        self.child = Some(command.spawn().expect("sh runs"));
    }

    async fn wait_for_systemd(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let address = self.bus_address();
        let mut last = String::from("no bus");
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "{NSPAWN} for {} exited during boot ({status}):\n{}",
                    self.machine,
                    self.log()
                );
            }
            if self.bus_socket().exists() {
                match system_state(&address).await {
                    Ok(state) if state == "running" || state == "degraded" => return,
                    Ok(state) => last = format!("SystemState {state}"),
                    Err(e) => last = e.to_string(),
                }
            }
            assert!(
                Instant::now() < deadline,
                "systemd in {} did not come up within {timeout:?} ({last}):\n{}",
                self.machine,
                self.log()
            );
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    }

    /// nspawn's child in another PID namespace as PID 1.
    fn find_leader(&self) -> Option<u32> {
        let nspawn = self.child.as_ref()?.id();
        let children =
            std::fs::read_to_string(format!("/proc/{nspawn}/task/{nspawn}/children")).ok()?;
        children
            .split_whitespace()
            .filter_map(|pid| pid.parse::<u32>().ok())
            .find(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .ok()
                    .and_then(|status| {
                        status
                            .lines()
                            .find_map(|l| l.strip_prefix("NSpid:"))
                            .map(|ids| ids.split_whitespace().last() == Some("1"))
                    })
                    .unwrap_or(false)
            })
    }

    fn work_dir(&self) -> &Path {
        self.work
            .as_ref()
            .expect("the work directory exists until drop")
            .path()
    }

    /// Kills everything, reaps nspawn, removes cgroups, unmounts the root.
    fn teardown(&mut self) {
        if let Some(leader) = self.leader.or_else(|| self.find_leader()) {
            // The kernel kills the whole PID namespace; nspawn then exits.
            signal("KILL", leader);
        }
        if let Some(mut child) = self.child.take()
            && wait_timeout(&mut child, REAP_TIMEOUT).is_none()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Whatever is left (a container still half-way through its boot,
        // nspawn itself) is in the container's cgroups.
        for cgroup in &self.cgroups {
            kill_cgroup(cgroup);
        }
        for cgroup in self.cgroups.drain(..).rev() {
            remove_cgroup(&cgroup);
        }
        if self.mounted {
            let root = path_str(&self.root);
            let ok = Command::new("umount")
                .arg(root)
                .status()
                .is_ok_and(|s| s.success())
                || Command::new("umount")
                    .args(["-l", root])
                    .status()
                    .is_ok_and(|s| s.success());
            self.mounted = !ok || is_mount_point(&self.root);
        }
        if self.mounted {
            // Never delete through a mount of the host's root.
            if let Some(work) = self.work.take() {
                let kept = work.keep();
                eprintln!(
                    "{}: {} is still mounted; leaving {}",
                    self.machine,
                    self.root.display(),
                    kept.display()
                );
            }
        }
    }
}

impl Drop for SystemdContainer {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Reads the Manager's `SystemState` on the bus at `address`.
async fn system_state(address: &str) -> zbus::Result<String> {
    let probe = async {
        let conn = zbus::connection::Builder::address(address)?.build().await?;
        let reply = conn
            .call_method(
                Some("org.freedesktop.systemd1"),
                "/org/freedesktop/systemd1",
                Some("org.freedesktop.DBus.Properties"),
                "Get",
                &("org.freedesktop.systemd1.Manager", "SystemState"),
            )
            .await?;
        let value: zbus::zvariant::OwnedValue = reply.body().deserialize()?;
        Ok(String::try_from(value)?)
    };
    tokio::time::timeout(Duration::from_secs(2), probe)
        .await
        .unwrap_or_else(|_| Err(zbus::Error::Failure("no answer in 2 s".into())))
}

fn next_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

/// Runs a setup command; panics with its stderr if it fails.
fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} cannot run: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}; the system tests need root): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sends `SIG<name>` to `pid` (with kill(1): no unsafe code here).
fn signal(name: &str, pid: u32) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(PROBE_INTERVAL),
            _ => return None,
        }
    }
}

/// SIGKILLs every process in the cgroup `dir` and below it.
fn kill_cgroup(dir: &Path) {
    if std::fs::write(dir.join("cgroup.kill"), "1").is_ok() {
        return;
    }
    // cgroup v1, or a kernel before 5.14: one process at a time.
    fn kill_tree(dir: &Path) {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.split_whitespace().filter_map(|p| p.parse().ok()) {
                signal("KILL", pid);
            }
        }
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                kill_tree(&entry.path());
            }
        }
    }
    kill_tree(dir);
}

/// Removes a cgroup and the ones systemd made below it, deepest first. The
/// kernel frees a cgroup a moment after its last process is reaped, so
/// this retries for a while.
fn remove_cgroup(dir: &Path) {
    fn remove_tree(dir: &Path) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                remove_tree(&entry.path())?;
            }
        }
        std::fs::remove_dir(dir)
    }
    let deadline = Instant::now() + REAP_TIMEOUT;
    loop {
        match remove_tree(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) if Instant::now() >= deadline => {
                eprintln!("cannot remove cgroup {}: {e}", dir.display());
                return;
            }
            Err(_) => std::thread::sleep(PROBE_INTERVAL),
        }
    }
}

fn is_mount_point(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return true;
    };
    let target = path_str(path);
    info.lines()
        .any(|line| line.split_whitespace().nth(4) == Some(target))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CgroupVersion {
    /// cgroup2.
    Unified,
    /// The v1 `name=systemd` hierarchy of a hybrid host.
    NamedSystemd,
}

#[derive(Debug)]
struct CgroupMount {
    version: CgroupVersion,
    mount_point: PathBuf,
}

/// The cgroup hierarchies nspawn places itself in.
fn cgroup_mounts() -> Vec<CgroupMount> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = PathBuf::from(left.split_whitespace().nth(4)?);
            let mut right = right.split_whitespace();
            let fstype = right.next()?;
            let options = right.nth(1).unwrap_or_default();
            let version = match fstype {
                "cgroup2" => CgroupVersion::Unified,
                "cgroup" if options.split(',').any(|o| o == "name=systemd") => {
                    CgroupVersion::NamedSystemd
                }
                _ => return None,
            };
            Some(CgroupMount {
                version,
                mount_point,
            })
        })
        .collect()
}

/// A new cgroup directory per hierarchy, below this process's own.
fn container_cgroups(machine: &str) -> Vec<PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let own_path = |version: CgroupVersion| {
        own.lines().find_map(|line| {
            let mut fields = line.splitn(3, ':');
            let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
            let matches = match version {
                CgroupVersion::Unified => controllers.is_empty(),
                CgroupVersion::NamedSystemd => controllers == "name=systemd",
            };
            matches.then(|| path.trim_start_matches('/').to_owned())
        })
    };
    cgroup_mounts()
        .into_iter()
        .filter_map(|mount| {
            let own = own_path(mount.version)?;
            Some(
                mount
                    .mount_point
                    .join(own)
                    .join(format!("{machine}.nspawn")),
            )
        })
        .collect()
}
