//! Test guests: a QEMU (TCG) VM running a Debian kernel and a busybox
//! initramfs with this workspace's static `vmctl`, reaching the host over
//! real AF_VSOCK through `vhost-device-vsock`.
//!
//! 1. [`GuestAssets::ensure`] fills a cache (`$VMD_GUEST_CACHE`, else
//!    `<workspace>/target/guest-cache`) once: the Debian kernel that
//!    `linux-image-amd64` depends on (`apt-get download`, `dpkg -x`), its
//!    ELF `vmlinux` (cut out of `vmlinuz` so QEMU boots it via PVH), the
//!    virtio/vsock modules, busybox (`busybox-static`), static `vmctl` and
//!    `vmd` built from this workspace, and `vhost-device-vsock`
//!    (`cargo install`).
//! 2. [`Initramfs`] packs busybox, the modules, `vmctl`, the test's files
//!    and an `/init` that loads the modules, runs the test's shell script
//!    between `VMD-TEST-BEGIN` and `VMD-TEST-END rc=N` markers on the
//!    serial console, and powers off. The newc cpio is written here.
//! 3. [`VsockDevice::start`] runs `vhost-device-vsock` for one guest CID in
//!    UDS mode: a guest's AF_VSOCK connection to the host (CID 2) port `P`
//!    arrives at the unix socket `<uds>_P` ([`VsockDevice::host_port`]);
//!    the host reaches guest port `P` by writing `CONNECT P\n` on `<uds>`.
//! 4. [`Guest::boot`] starts QEMU with the kernel, the initramfs and
//!    (optionally) the vsock device, the serial console going to a file;
//!    [`Guest::wait`] waits for the end marker and returns a [`GuestRun`].
//!
//! No AF_VSOCK socket is ever opened on this machine: its vsock peer is
//! the hypervisor that runs it. The host side only uses unix sockets.
//!
//! Every process is killed (by PID) and reaped when its owner is dropped.
//! Under the `guest-tests` feature any missing prerequisite panics with
//! what to do: these suites fail loudly, never skip.

use std::fs::{self, File};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::qemu::QEMU;

/// The kernel modules the guest loads, in load order (virtio PCI, vsock).
pub const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
];

/// Modules cached and packed but not loaded by `/init` (tests load them,
/// in this order): the balloon, and virtio-net with its dependencies.
pub const EXTRA_MODULES: &[&str] = &["virtio_balloon", "failover", "net_failover", "virtio_net"];

/// Shell lines that bring up a guest's virtio-net `eth0` as 10.0.2.15/24
/// (QEMU user-mode networking's default guest address).
pub const NET_SETUP: &str = "for m in failover net_failover virtio_net; do \
                             insmod /lib/modules/$m.ko || echo \"insmod $m failed\"; done\n\
                             ip link set lo up\n\
                             ip addr add 10.0.2.15/24 dev eth0 && ip link set eth0 up\n";

/// The host's CID as a guest sees it.
pub const HOST_CID: u32 = 2;

/// The kernel command line: serial console, quiet, fast TCG boot, and a
/// power-off (not a reboot loop) on panic with `-no-reboot`.
pub const KERNEL_APPEND: &str = "console=ttyS0 quiet panic=-1 mitigations=off cryptomgr.notests";

/// Guest memory (shared memfd, as vhost-user needs).
const GUEST_MEM: &str = "256M";

/// The `vhost-device-vsock` program.
pub const VHOST_DEVICE_VSOCK: &str = "vhost-device-vsock";

/// Console marker printed by `/init` before the test script runs.
pub const BEGIN_MARKER: &str = "VMD-TEST-BEGIN";

/// Console marker printed by `/init` after it, followed by `rc=N`.
pub const END_MARKER: &str = "VMD-TEST-END rc=";

/// Everything a test guest is made of, cached on disk.
#[derive(Clone, Debug)]
pub struct GuestAssets {
    /// The cache directory.
    pub cache: PathBuf,
    /// The uncompressed ELF kernel (PVH boot).
    pub kernel: PathBuf,
    /// The directory of `<module>.ko` files ([`MODULES`], [`EXTRA_MODULES`]).
    pub modules: PathBuf,
    /// A static busybox.
    pub busybox: PathBuf,
    /// A static `vmctl` built from this workspace.
    pub vmctl: PathBuf,
    /// A static `vmd` built from this workspace (for guests that serve).
    pub vmd: PathBuf,
    /// The `vhost-device-vsock` binary.
    pub vhost_device_vsock: PathBuf,
}

impl GuestAssets {
    /// Makes sure every asset is in the cache and returns their paths. The
    /// work is done once per process; later calls return the same paths.
    /// The kernel is fetched once per cache; `vmctl` is rebuilt by cargo
    /// whenever the workspace changed (a no-op otherwise).
    ///
    /// # Panics
    /// If any asset cannot be made (no network for apt, no compiler, ...):
    /// the message says which step failed and why.
    pub fn ensure() -> Self {
        static ASSETS: OnceLock<GuestAssets> = OnceLock::new();
        ASSETS.get_or_init(Self::make).clone()
    }

    /// [`GuestAssets::ensure`] off the async runtime's threads (the first
    /// call downloads and builds for minutes).
    ///
    /// # Panics
    /// As [`GuestAssets::ensure`].
    pub async fn ready() -> Self {
        tokio::task::spawn_blocking(Self::ensure)
            .await
            .expect("guest assets are made")
    }

    fn make() -> Self {
        let started = Instant::now();
        let cache = cache_dir();
        fs::create_dir_all(&cache)
            .unwrap_or_else(|e| panic!("cannot create guest cache {}: {e}", cache.display()));
        let (kernel, modules) = ensure_kernel(&cache);
        let busybox = ensure_busybox();
        let vhost_device_vsock = ensure_vhost_device_vsock();
        let (vmctl, vmd) = build_static_binaries(&cache);
        eprintln!(
            "guest assets ready in {:.1?} (cache {})",
            started.elapsed(),
            cache.display()
        );
        Self {
            cache,
            kernel,
            modules,
            busybox,
            vmctl,
            vmd,
            vhost_device_vsock,
        }
    }

    /// The cached `<name>.ko`.
    pub fn module(&self, name: &str) -> PathBuf {
        self.modules.join(format!("{name}.ko"))
    }
}

/// The part of [`GuestAssets`] a guest needs that only runs its kernel's
/// drivers (a balloon that gives memory back): the kernel, its modules
/// and busybox, without the static workspace binaries or
/// `vhost-device-vsock`. Cached in the same place.
#[derive(Clone, Debug)]
pub struct GuestKernel {
    /// The uncompressed ELF kernel (PVH boot).
    pub kernel: PathBuf,
    /// The directory of `<module>.ko` files ([`MODULES`], [`EXTRA_MODULES`]).
    pub modules: PathBuf,
    /// A static busybox.
    pub busybox: PathBuf,
}

impl GuestKernel {
    /// Makes sure the kernel, its modules and busybox are in the cache
    /// (fetched once per cache with apt, as [`GuestAssets::ensure`] does).
    ///
    /// # Panics
    /// If any of them cannot be made; the message says which step failed.
    pub fn ensure() -> Self {
        static KERNEL: OnceLock<GuestKernel> = OnceLock::new();
        KERNEL
            .get_or_init(|| {
                let cache = cache_dir();
                fs::create_dir_all(&cache).unwrap_or_else(|e| {
                    panic!("cannot create guest cache {}: {e}", cache.display())
                });
                let (kernel, modules) = ensure_kernel(&cache);
                Self {
                    kernel,
                    modules,
                    busybox: ensure_busybox(),
                }
            })
            .clone()
    }

    /// [`GuestKernel::ensure`] off the async runtime's threads.
    ///
    /// # Panics
    /// As [`GuestKernel::ensure`].
    pub async fn ready() -> Self {
        tokio::task::spawn_blocking(Self::ensure)
            .await
            .expect("the guest kernel is made")
    }
}

/// `$VMD_GUEST_CACHE`, else `<workspace>/target/guest-cache`.
fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VMD_GUEST_CACHE") {
        return PathBuf::from(dir);
    }
    workspace_root().join("target").join("guest-cache")
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives inside the workspace")
        .to_path_buf()
}

/// Runs `cmd`, panicking with its output if it cannot start or fails.
fn run(cmd: &mut Command, what: &str) -> Vec<u8> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {cmd:?} failed with {}:\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The kernel and module directory in `<cache>/kernel`, fetched if missing.
fn ensure_kernel(cache: &Path) -> (PathBuf, PathBuf) {
    let dir = cache.join("kernel");
    let kernel = dir.join("vmlinux");
    let modules = dir.join("modules");
    let complete = |modules: &Path| {
        MODULES
            .iter()
            .chain(EXTRA_MODULES)
            .all(|m| modules.join(format!("{m}.ko")).is_file())
    };
    if kernel.is_file() && complete(&modules) {
        return (kernel, modules);
    }
    eprintln!("guest cache: fetching the Debian kernel");
    // Build in a scratch directory and rename: an interrupted fetch never
    // leaves a half-made kernel that looks complete.
    let work = tempfile::tempdir_in(cache).expect("scratch directory in the guest cache");
    let package = kernel_package();
    run(
        Command::new("apt-get")
            .args(["download", &package])
            .current_dir(work.path()),
        "downloading the guest kernel",
    );
    let deb = fs::read_dir(work.path())
        .expect("scratch directory")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .unwrap_or_else(|| panic!("apt-get download {package} left no .deb"));
    let root = work.path().join("root");
    run(
        Command::new("dpkg").arg("-x").arg(&deb).arg(&root),
        "unpacking the guest kernel",
    );
    let boot = root.join("boot");
    let vmlinuz = fs::read_dir(&boot)
        .unwrap_or_else(|e| panic!("{package} has no /boot ({e})"))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .unwrap_or_else(|| panic!("{package} has no /boot/vmlinuz-*"));
    let staged = work.path().join("kernel");
    let staged_modules = staged.join("modules");
    fs::create_dir_all(&staged_modules).expect("staging directory");
    let elf = extract_vmlinux(&fs::read(&vmlinuz).expect("read vmlinuz"));
    fs::write(staged.join("vmlinux"), elf).expect("write vmlinux");
    let mut found = Vec::new();
    find_files(&root.join("lib").join("modules"), &mut found);
    for name in MODULES.iter().chain(EXTRA_MODULES) {
        let ko = found
            .iter()
            .find(|p| {
                let file = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
                file.strip_prefix(name)
                    .is_some_and(|rest| rest == ".ko" || rest.starts_with(".ko."))
            })
            .unwrap_or_else(|| panic!("{package} has no module {name}"));
        let bytes = if ko.extension().is_some_and(|e| e == "xz") {
            run(
                Command::new("xz").arg("-dc").arg(ko),
                "decompressing a module",
            )
        } else {
            fs::read(ko).expect("read module")
        };
        fs::write(staged_modules.join(format!("{name}.ko")), bytes).expect("write module");
    }
    if dir.exists() {
        fs::remove_dir_all(&dir).expect("remove an incomplete kernel cache");
    }
    fs::rename(&staged, &dir).expect("move the kernel into the cache");
    (kernel, modules)
}

/// The `linux-image-<version>-amd64` package `linux-image-amd64` depends on,
/// running `apt-get update` first if apt knows none.
fn kernel_package() -> String {
    let query = || {
        let out = Command::new("apt-cache")
            .args(["depends", "linux-image-amd64"])
            .stderr(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run apt-cache (a Debian host is needed): {e}"));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|p| {
                p.strip_prefix("linux-image-")
                    .is_some_and(|v| v.starts_with(|c: char| c.is_ascii_digit()))
            })
            .map(str::to_owned)
    };
    if let Some(package) = query() {
        return package;
    }
    run(
        Command::new("apt-get").arg("update"),
        "updating apt's package lists",
    );
    query().expect("apt knows no linux-image-<version>-amd64 that linux-image-amd64 depends on")
}

/// The ELF kernel inside a bzImage whose payload is XZ-compressed.
fn extract_vmlinux(vmlinuz: &[u8]) -> Vec<u8> {
    const XZ_MAGIC: &[u8] = b"\xfd7zXZ\0";
    let start = vmlinuz
        .windows(XZ_MAGIC.len())
        .position(|w| w == XZ_MAGIC)
        .expect("vmlinuz has an XZ payload");
    let mut xz = Command::new("xz")
        .args(["-dc", "--single-stream"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run xz (apt-get install xz-utils): {e}"));
    let mut stdin = xz.stdin.take().expect("xz stdin is piped");
    let payload = vmlinuz[start..].to_vec();
    // Feed from a thread: xz's output fills its pipe before it reads all.
    let feeder = std::thread::spawn(move || {
        // Trailing bytes after the stream are not xz's: ignore its early exit.
        let _ = stdin.write_all(&payload);
    });
    let out = xz.wait_with_output().expect("xz runs");
    feeder.join().expect("xz feeder thread");
    assert!(
        out.stdout.starts_with(b"\x7fELF"),
        "the XZ payload of vmlinuz is not an ELF kernel ({} bytes out of xz, {})",
        out.stdout.len(),
        out.status
    );
    out.stdout
}

fn find_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let path = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            find_files(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// A program on `PATH` (or in `~/.cargo/bin`).
fn which(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo").join("bin"));
    }
    if let Some(cargo_home) = std::env::var_os("CARGO_HOME") {
        dirs.push(Path::new(&cargo_home).join("bin"));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// Debian's static busybox, installed with apt-get if missing.
fn ensure_busybox() -> PathBuf {
    let static_busybox = PathBuf::from("/bin/busybox");
    if static_busybox.is_file() && is_static(&static_busybox) {
        return static_busybox;
    }
    eprintln!("guest cache: installing busybox-static");
    run(
        Command::new("apt-get")
            .args(["install", "-y", "busybox-static"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
        "installing busybox-static",
    );
    assert!(
        is_static(&static_busybox),
        "{} is not a static binary after installing busybox-static",
        static_busybox.display()
    );
    static_busybox
}

/// `vhost-device-vsock`, installed with `cargo install` if missing.
fn ensure_vhost_device_vsock() -> PathBuf {
    if let Some(path) = which(VHOST_DEVICE_VSOCK) {
        return path;
    }
    eprintln!("guest cache: cargo install {VHOST_DEVICE_VSOCK} (about 80 s)");
    run(
        Command::new(cargo()).args(["install", VHOST_DEVICE_VSOCK, "--locked"]),
        "installing vhost-device-vsock",
    );
    which(VHOST_DEVICE_VSOCK)
        .expect("cargo install put vhost-device-vsock on PATH or in ~/.cargo/bin")
}

/// The cargo that runs these tests, else `cargo` on `PATH`.
fn cargo() -> PathBuf {
    std::env::var_os("CARGO").map_or_else(|| PathBuf::from("cargo"), PathBuf::from)
}

/// The target the static binaries are built for.
const STATIC_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Builds `vmctl` and `vmd` with static glibc into `<cache>/static-target`
/// (their own target directory, so they never invalidate the normal
/// build); returns their paths.
fn build_static_binaries(cache: &Path) -> (PathBuf, PathBuf) {
    let target_dir = cache.join("static-target");
    let started = Instant::now();
    let mut cmd = Command::new(cargo());
    cmd.args([
        "build",
        "--quiet",
        "--release",
        "--target",
        STATIC_TARGET,
        "-p",
        "vmd-client",
        "--bin",
        "vmctl",
        "-p",
        "vmd",
        "--bin",
        "vmd",
    ])
    .current_dir(workspace_root())
    .env("CARGO_TARGET_DIR", &target_dir)
    .env("RUSTFLAGS", "-C target-feature=+crt-static")
    // These would override RUSTFLAGS.
    .env_remove("CARGO_ENCODED_RUSTFLAGS")
    .env_remove("CARGO_BUILD_RUSTFLAGS");
    run(&mut cmd, "building static vmctl and vmd");
    let release = target_dir.join(STATIC_TARGET).join("release");
    let (vmctl, vmd) = (release.join("vmctl"), release.join("vmd"));
    for binary in [&vmctl, &vmd] {
        assert!(
            is_static(binary),
            "{} is not static (crt-static did not take)",
            binary.display()
        );
    }
    eprintln!(
        "static vmctl and vmd up to date in {:.1?}",
        started.elapsed()
    );
    (vmctl, vmd)
}

/// Whether `path` is an ELF executable without a program interpreter.
fn is_static(path: &Path) -> bool {
    const PT_INTERP: u32 = 3;
    let Ok(elf) = fs::read(path) else {
        return false;
    };
    // ELF64 little-endian: e_phoff at 32, e_phentsize at 54, e_phnum at 56.
    if elf.len() < 64 || !elf.starts_with(b"\x7fELF\x02\x01") {
        return false;
    }
    let u16_at = |o: usize| usize::from(u16::from_le_bytes([elf[o], elf[o + 1]]));
    let Some(phoff) = elf
        .get(32..40)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .and_then(|b| usize::try_from(u64::from_le_bytes(b)).ok())
    else {
        return false;
    };
    let (size, count) = (u16_at(54), u16_at(56));
    (0..count).all(|i| {
        let at = phoff + i * size;
        elf.get(at..at + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .is_some_and(|b| u32::from_le_bytes(b) != PT_INTERP)
    })
}

/// One entry of a newc cpio archive.
#[derive(Clone, Debug)]
enum Entry {
    Dir,
    File { data: Vec<u8>, mode: u32 },
    Symlink(String),
    CharDevice { major: u32, minor: u32 },
}

/// A guest's initramfs, packed as a newc cpio archive.
///
/// [`Initramfs::new`] holds busybox (with a link per applet), the modules,
/// `/bin/vmctl`, `/dev/console` and the `/init` that runs the test script
/// ([`Initramfs::script`]).
#[derive(Clone, Debug)]
pub struct Initramfs {
    entries: Vec<(String, Entry)>,
    script: String,
}

impl Initramfs {
    /// The base image made of `assets`.
    ///
    /// # Panics
    /// If an asset cannot be read.
    pub fn new(assets: &GuestAssets) -> Self {
        Self::with(&assets.busybox, &assets.modules).copy("bin/vmctl", &assets.vmctl, 0o755)
    }

    /// The base image of `kernel`'s modules and busybox, without `vmctl`.
    ///
    /// # Panics
    /// If an asset cannot be read.
    pub fn bare(kernel: &GuestKernel) -> Self {
        Self::with(&kernel.busybox, &kernel.modules)
    }

    fn with(busybox: &Path, modules: &Path) -> Self {
        let mut image = Self {
            entries: Vec::new(),
            script: "true\n".into(),
        };
        for dir in [
            "bin",
            "dev",
            "etc",
            "proc",
            "sys",
            "tmp",
            "lib",
            "lib/modules",
        ] {
            image.entries.push((dir.into(), Entry::Dir));
        }
        image.entries.push((
            "dev/console".into(),
            Entry::CharDevice { major: 5, minor: 1 },
        ));
        image = image.copy("bin/busybox", busybox, 0o755);
        let applets = run(
            Command::new(busybox).arg("--list"),
            "listing busybox applets",
        );
        for applet in String::from_utf8_lossy(&applets).lines() {
            let applet = applet.trim();
            if !applet.is_empty() && applet != "busybox" {
                image
                    .entries
                    .push((format!("bin/{applet}"), Entry::Symlink("busybox".into())));
            }
        }
        for module in MODULES.iter().chain(EXTRA_MODULES) {
            image = image.copy(
                &format!("lib/modules/{module}.ko"),
                &modules.join(format!("{module}.ko")),
                0o644,
            );
        }
        image
    }

    /// Adds a file at `path` (relative to `/`) with `data`; parent
    /// directories are created.
    #[must_use]
    pub fn file(mut self, path: &str, data: impl Into<Vec<u8>>, mode: u32) -> Self {
        let path = path.trim_start_matches('/');
        let mut parent = Path::new(path).parent();
        let mut parents = Vec::new();
        while let Some(dir) = parent.filter(|d| !d.as_os_str().is_empty()) {
            parents.push(dir.to_str().expect("UTF-8 path").to_owned());
            parent = dir.parent();
        }
        for dir in parents.into_iter().rev() {
            if !self.entries.iter().any(|(p, _)| *p == dir) {
                self.entries.push((dir, Entry::Dir));
            }
        }
        self.entries.retain(|(p, _)| p != path);
        self.entries.push((
            path.to_owned(),
            Entry::File {
                data: data.into(),
                mode,
            },
        ));
        self
    }

    /// Adds a copy of the host file `from` at `path`.
    ///
    /// # Panics
    /// If `from` cannot be read.
    #[must_use]
    pub fn copy(self, path: &str, from: &Path, mode: u32) -> Self {
        let data = fs::read(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display()));
        self.file(path, data, mode)
    }

    /// Adds the static `vmd` at `/bin/vmd` (several MiB: only for guests
    /// that run the daemon).
    #[must_use]
    pub fn with_vmd(self, assets: &GuestAssets) -> Self {
        self.copy("bin/vmd", &assets.vmd, 0o755)
    }

    /// The shell script `/init` runs (busybox `sh`, `/bin` on `PATH`); its
    /// exit status is reported as `VMD-TEST-END rc=N`.
    #[must_use]
    pub fn script(mut self, script: &str) -> Self {
        script.clone_into(&mut self.script);
        self
    }

    /// The `/init` program.
    fn init(&self) -> String {
        let modules = MODULES.join(" ");
        format!(
            "#!/bin/sh\n\
             export PATH=/bin\n\
             mount -t devtmpfs dev /dev\n\
             exec 0</dev/console 1>/dev/console 2>&1\n\
             mount -t proc proc /proc\n\
             mount -t sysfs sys /sys\n\
             mount -t tmpfs tmp /tmp\n\
             for m in {modules}; do\n\
             \x20 insmod /lib/modules/$m.ko || echo \"insmod $m failed\"\n\
             done\n\
             echo {BEGIN_MARKER}\n\
             sh /test.sh\n\
             echo \"{END_MARKER}$?\"\n\
             poweroff -f\n"
        )
    }

    /// The newc cpio archive.
    pub fn to_cpio(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut ino = 1;
        let mut put = |name: &str, mode: u32, data: &[u8], rdev: (u32, u32)| {
            let namesize = name.len() + 1;
            let header = format!(
                "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}\
                 {size:08x}{maj:08x}{min:08x}{rmaj:08x}{rmin:08x}{namesize:08x}{check:08x}",
                uid = 0,
                gid = 0,
                nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 },
                mtime = 0,
                size = data.len(),
                maj = 0,
                min = 0,
                rmaj = rdev.0,
                rmin = rdev.1,
                check = 0,
            );
            ino += 1;
            out.extend_from_slice(header.as_bytes());
            out.extend_from_slice(name.as_bytes());
            out.push(0);
            pad4(&mut out);
            out.extend_from_slice(data);
            pad4(&mut out);
        };
        let init = self.init();
        let files: [(&str, Entry); 2] = [
            (
                "init",
                Entry::File {
                    data: init.into_bytes(),
                    mode: 0o755,
                },
            ),
            (
                "test.sh",
                Entry::File {
                    data: self.script.clone().into_bytes(),
                    mode: 0o755,
                },
            ),
        ];
        let all = self
            .entries
            .iter()
            .map(|(p, e)| (p.as_str(), e))
            .chain(files.iter().map(|(p, e)| (*p, e)));
        for (path, entry) in all {
            match entry {
                Entry::Dir => put(path, 0o040_755, &[], (0, 0)),
                Entry::File { data, mode } => put(path, 0o100_000 | mode, data, (0, 0)),
                Entry::Symlink(target) => put(path, 0o120_777, target.as_bytes(), (0, 0)),
                Entry::CharDevice { major, minor } => put(path, 0o020_600, &[], (*major, *minor)),
            }
        }
        put("TRAILER!!!", 0, &[], (0, 0));
        out
    }

    /// Writes the archive to `path`.
    ///
    /// # Panics
    /// If it cannot be written.
    pub fn write(&self, path: &Path) {
        fs::write(path, self.to_cpio())
            .unwrap_or_else(|e| panic!("write initramfs {}: {e}", path.display()));
    }
}

fn pad4(out: &mut Vec<u8>) {
    out.resize(out.len().next_multiple_of(4), 0);
}

/// How long `vhost-device-vsock` may take to create its socket.
const DEVICE_READY: Duration = Duration::from_secs(10);

/// One guest's sockets on a [`VsockDevice`].
#[derive(Clone, Debug)]
pub struct VsockPorts {
    /// The guest's CID.
    pub cid: u32,
    /// The vhost-user socket QEMU connects to.
    pub socket: PathBuf,
    /// The host side of the guest's vsock (see [`VsockDevice::uds`]).
    pub uds: PathBuf,
}

/// A `vhost-device-vsock` serving guest CIDs in UDS mode; killed (by PID)
/// when dropped. Guests of one device are siblings: they reach each
/// other's CIDs over AF_VSOCK.
#[derive(Debug)]
pub struct VsockDevice {
    child: Child,
    guests: Vec<VsockPorts>,
    log: PathBuf,
}

impl VsockDevice {
    /// Starts the device for guest `cid` with its sockets in `dir`
    /// (`vhost<cid>.sock` for QEMU, `vm<cid>.vsock` for the host side) and
    /// waits until QEMU can connect.
    ///
    /// # Panics
    /// If it cannot start or its socket does not appear in time.
    pub async fn start(assets: &GuestAssets, dir: &Path, cid: u32) -> Self {
        Self::start_siblings(assets, dir, &[cid]).await
    }

    /// Starts one device for all of `cids` (sibling guests), sockets named
    /// as in [`VsockDevice::start`].
    ///
    /// # Panics
    /// As [`VsockDevice::start`].
    pub async fn start_siblings(assets: &GuestAssets, dir: &Path, cids: &[u32]) -> Self {
        let guests: Vec<VsockPorts> = cids
            .iter()
            .map(|&cid| VsockPorts {
                cid,
                socket: dir.join(format!("vhost{cid}.sock")),
                uds: dir.join(format!("vm{cid}.vsock")),
            })
            .collect();
        let log = dir.join(format!(
            "vhost{}.log",
            cids.first().copied().unwrap_or_default()
        ));
        let out = File::create(&log).expect("vhost-device-vsock log");
        let err = out.try_clone().expect("vhost-device-vsock log");
        let mut cmd = Command::new(&assets.vhost_device_vsock);
        for guest in &guests {
            cmd.arg("--vm").arg(format!(
                "guest-cid={},socket={},uds-path={}",
                guest.cid,
                guest.socket.display(),
                guest.uds.display()
            ));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {VHOST_DEVICE_VSOCK}: {e}"));
        let mut device = Self { child, guests, log };
        let deadline = Instant::now() + DEVICE_READY;
        while !device.guests.iter().all(|g| g.socket.exists()) {
            if let Some(status) = device.child.try_wait().expect("vhost-device-vsock status") {
                panic!(
                    "{VHOST_DEVICE_VSOCK} exited with {status}: {}",
                    fs::read_to_string(&device.log).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{VHOST_DEVICE_VSOCK} made no socket within {DEVICE_READY:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        device
    }

    /// The sockets of guest `cid`.
    ///
    /// # Panics
    /// If this device does not serve `cid`.
    pub fn guest(&self, cid: u32) -> &VsockPorts {
        self.guests
            .iter()
            .find(|g| g.cid == cid)
            .unwrap_or_else(|| panic!("this vsock device does not serve CID {cid}"))
    }

    fn first(&self) -> &VsockPorts {
        self.guests
            .first()
            .expect("a device serves at least one guest")
    }

    /// The (first) guest's CID.
    pub fn cid(&self) -> u32 {
        self.first().cid
    }

    /// The host side of the (first) guest's vsock: `CONNECT <port>\n` here
    /// reaches a guest listener; `<uds>_<port>` receives guest connections.
    pub fn uds(&self) -> &Path {
        &self.first().uds
    }

    /// The unix socket where the (first) guest's connection to host (CID
    /// 2) `port` arrives; a host listener must be bound there before the
    /// guest connects (an unserved port gives the guest no reset, only a
    /// hang).
    pub fn host_port(&self, port: u32) -> PathBuf {
        let mut path = self.uds().to_path_buf().into_os_string();
        path.push(format!("_{port}"));
        PathBuf::from(path)
    }

    /// The device's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for VsockDevice {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

fn kill(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        // `Child::kill` sends SIGKILL to this PID only.
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// What a guest did.
#[derive(Clone, Debug)]
pub struct GuestRun {
    /// The test script's exit status.
    pub rc: i32,
    /// The whole serial console (carriage returns removed).
    pub console: String,
    /// From starting QEMU to the `VMD-TEST-BEGIN` marker (kernel boot and
    /// module loading).
    pub boot: Duration,
    /// From starting QEMU to the end marker.
    pub total: Duration,
}

impl GuestRun {
    /// The rest of each console line that starts with `tag` and a space,
    /// in order: a script prints `echo "TAG $(cmd | tr -d '\n')"` to hand
    /// a value to the test.
    pub fn tagged<'a>(&'a self, tag: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.console.lines().filter_map(move |line| {
            line.strip_prefix(tag)
                .and_then(|rest| rest.strip_prefix(' '))
        })
    }
}

/// A running QEMU guest; killed (by PID) when dropped.
#[derive(Debug)]
pub struct Guest {
    child: Child,
    console: PathBuf,
    stderr: PathBuf,
    started: Instant,
}

/// How to boot a [`Guest`]: see [`Guest::builder`].
#[derive(Debug)]
pub struct GuestBuilder {
    kernel: PathBuf,
    dir: PathBuf,
    initramfs: PathBuf,
    name: String,
    vsock: Option<VsockPorts>,
    forward: Option<(String, u16)>,
}

impl GuestBuilder {
    /// Names the guest: its console is `<dir>/<name>.console`, QEMU's
    /// stderr `<dir>/<name>.qemu.log` (default `guest`).
    #[must_use]
    pub fn name(mut self, name: &str) -> Self {
        name.clone_into(&mut self.name);
        self
    }

    /// Gives the guest a vhost-user vsock device on `ports` (one guest of a
    /// [`VsockDevice`]).
    #[must_use]
    pub fn vsock(mut self, ports: &VsockPorts) -> Self {
        self.vsock = Some(ports.clone());
        self
    }

    /// Gives the guest a contained user-mode network (`restrict=on`: no
    /// route to the host or beyond) whose only way out is `guest_addr`
    /// (`IP:PORT`, in 10.0.2.0/24) forwarded to the host's loopback
    /// `host_port`. The guest must load virtio-net and configure `eth0`
    /// (10.0.2.15/24) itself.
    #[must_use]
    pub fn forward_to_host(mut self, guest_addr: &str, host_port: u16) -> Self {
        self.forward = Some((guest_addr.to_owned(), host_port));
        self
    }

    /// Starts QEMU.
    ///
    /// # Panics
    /// If QEMU cannot start.
    pub fn boot(self) -> Guest {
        let console = self.dir.join(format!("{}.console", self.name));
        let stderr = self.dir.join(format!("{}.qemu.log", self.name));
        let mem = format!("memory-backend-memfd,id=mem,size={GUEST_MEM},share=on");
        let mut cmd = Command::new(QEMU);
        cmd.args(["-M", "pc", "-accel", "tcg", "-cpu", "max", "-smp", "1"])
            .args(["-m", GUEST_MEM, "-object", &mem, "-numa", "node,memdev=mem"])
            .args(["-nographic", "-no-reboot"])
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initramfs)
            .args(["-append", KERNEL_APPEND]);
        match &self.forward {
            None => {
                cmd.args(["-nic", "none"]);
            }
            Some((guest_addr, host_port)) => {
                cmd.arg("-nic").arg(format!(
                    "user,model=virtio-net-pci,restrict=on,\
                     guestfwd=tcp:{guest_addr}-tcp:127.0.0.1:{host_port}"
                ));
            }
        }
        if let Some(ports) = &self.vsock {
            cmd.arg("-chardev")
                .arg(format!("socket,id=vsock0,path={}", ports.socket.display()))
                .args(["-device", "vhost-user-vsock-pci,chardev=vsock0"]);
        }
        let started = Instant::now();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(File::create(&console).expect("console file"))
            .stderr(File::create(&stderr).expect("QEMU log file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {QEMU} ({e}): apt-get install qemu-system-x86"));
        Guest {
            child,
            console,
            stderr,
            started,
        }
    }
}

impl Guest {
    /// A guest booting `initramfs` (a cpio file) under TCG, its files in
    /// `dir`, with no device but the serial console unless the builder
    /// adds vsock or a network.
    pub fn builder(assets: &GuestAssets, dir: &Path, initramfs: &Path) -> GuestBuilder {
        GuestBuilder {
            kernel: assets.kernel.clone(),
            dir: dir.to_owned(),
            initramfs: initramfs.to_owned(),
            name: "guest".into(),
            vsock: None,
            forward: None,
        }
    }

    /// Boots `initramfs` with the vsock device's (first) guest if given.
    ///
    /// # Panics
    /// If QEMU cannot start.
    pub fn boot(
        assets: &GuestAssets,
        dir: &Path,
        initramfs: &Path,
        vsock: Option<&VsockDevice>,
    ) -> Self {
        let mut builder = Self::builder(assets, dir, initramfs);
        if let Some(device) = vsock {
            builder = builder.vsock(device.first());
        }
        builder.boot()
    }

    /// The serial console so far.
    pub fn console(&self) -> String {
        fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
            .unwrap_or_default()
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until a console line contains `marker` (the guest keeps
    /// running), at most `timeout` from boot; returns the console so far.
    ///
    /// # Panics
    /// If the marker does not come in time or QEMU exits first.
    pub async fn wait_for(&mut self, marker: &str, timeout: Duration) -> String {
        let deadline = self.started + timeout;
        loop {
            let console = self.console();
            if console.lines().any(|l| l.contains(marker)) {
                return console;
            }
            let exited = self.child.try_wait().expect("QEMU status");
            if exited.is_some() || Instant::now() > deadline {
                let why = exited.map_or_else(
                    || format!("no {marker:?} within {timeout:?}"),
                    |s| format!("QEMU exited with {s} before {marker:?}"),
                );
                self.fail(&why);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn fail(&self, why: &str) -> ! {
        panic!(
            "guest failed: {why}\n--- console ---\n{}\n--- QEMU stderr ---\n{}",
            self.console(),
            fs::read_to_string(&self.stderr).unwrap_or_default()
        );
    }

    /// Kills the guest (by PID) and returns its whole console.
    pub fn kill(mut self) -> String {
        kill(&mut self.child);
        self.console()
    }

    /// Waits (asynchronously, so host-side tasks of the test keep running)
    /// until the guest prints the end marker and QEMU exits, at most
    /// `timeout`.
    ///
    /// # Panics
    /// If the marker does not come in time or QEMU dies first; the message
    /// holds the console and QEMU's stderr.
    pub async fn wait(mut self, timeout: Duration) -> GuestRun {
        let deadline = self.started + timeout;
        let mut boot = None;
        loop {
            let console = self.console();
            if boot.is_none() && console.contains(BEGIN_MARKER) {
                boot = Some(self.started.elapsed());
            }
            if let Some(rc) = end_rc(&console) {
                let total = self.started.elapsed();
                // `poweroff -f` follows the marker: give QEMU a moment.
                let exit_by = Instant::now() + Duration::from_secs(5);
                while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < exit_by {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                kill(&mut self.child);
                return GuestRun {
                    rc,
                    console: self.console(),
                    boot: boot.unwrap_or(total),
                    total,
                };
            }
            let exited = self.child.try_wait().expect("QEMU status");
            if exited.is_some() || Instant::now() > deadline {
                let why = exited.map_or_else(
                    || format!("no {END_MARKER}N within {timeout:?}"),
                    |s| format!("QEMU exited with {s} before {END_MARKER}N"),
                );
                self.fail(&why);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// Live processes whose command line mentions `dir` (a test's temporary
/// directory, which every QEMU and `vhost-device-vsock` of the test names
/// in its arguments), as `(pid, command line)`: after a test dropped its
/// guests and devices there must be none.
pub fn processes_using(dir: &Path) -> Vec<(u32, String)> {
    let needle = dir.to_string_lossy().into_owned();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(&needle).then_some((pid, cmdline))
        })
        .collect()
}

/// The status in the console's `VMD-TEST-END rc=N` line.
fn end_rc(console: &str) -> Option<i32> {
    // The marker may follow console output that ended without a newline.
    console.lines().find_map(|l| {
        let (_, rc) = l.split_once(END_MARKER)?;
        rc.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_is_newc_with_a_trailer() {
        let image = Initramfs {
            entries: Vec::new(),
            script: "exit 3\n".into(),
        }
        .file("/etc/vmd/ca.pem", "pem", 0o644);
        let cpio = image.to_cpio();
        assert!(cpio.starts_with(b"070701"));
        assert_eq!(cpio.len() % 4, 0);
        let text = String::from_utf8_lossy(&cpio);
        for name in [
            "etc\0",
            "etc/vmd\0",
            "etc/vmd/ca.pem\0",
            "init\0",
            "TRAILER!!!\0",
        ] {
            assert!(text.contains(name), "{name:?} in archive");
        }
    }

    #[test]
    fn end_marker_is_parsed() {
        assert_eq!(end_rc("x\nVMD-TEST-END rc=0\n"), Some(0));
        assert_eq!(end_rc("echo \"VMD-TEST-END rc=$?\"\n"), None);
        assert_eq!(end_rc("VMD-TEST-END rc=12 \n"), Some(12));
        assert_eq!(end_rc("Booting..VMD-TEST-END rc=1\n"), Some(1));
    }
}
