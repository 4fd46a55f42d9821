//! Real QEMU processes with a QMP socket, for system tests.
//!
//! 1. [`QemuVm::start`] spawns `qemu-system-x86_64` under TCG (this host's
//!    `/dev/kvm` cannot run stock guests) with no guest OS, no display and
//!    no devices but a balloon, and a QMP server on `<dir>/<name>.sock`.
//! 2. It waits until the socket greets a client (QEMU's QMP banner), then
//!    closes that probe so the test's own client is served next.
//! 3. [`QemuVm::kill`] sends SIGKILL and reaps the process, leaving a stale
//!    socket file behind as a crashed VM would; dropping a [`QemuVm`] does
//!    the same, so no QEMU outlives its test.
//!
//! QEMU's stderr goes to `<dir>/<name>.log`, quoted in the panic message if
//! QEMU exits before it is ready. A missing `qemu-system-x86_64` panics
//! with the package to install: suites that need QEMU fail, never skip.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::UnixStream;

/// The QEMU binary.
pub const QEMU: &str = "qemu-system-x86_64";

/// The machine [`QemuVm::start`] runs: one vCPU of four slots, 256 MiB of
/// boot memory with room for 768 MiB more in two DIMM slots, a balloon
/// (`balloon0`), and nothing to boot (the firmware idles; QMP works).
pub const DEFAULT_ARGS: &[&str] = &[
    "-accel",
    "tcg",
    "-M",
    "pc",
    "-nodefaults",
    "-nographic",
    "-display",
    "none",
    "-serial",
    "none",
    "-monitor",
    "none",
    "-cpu",
    "max",
    "-smp",
    "1,maxcpus=4",
    "-m",
    "256M,slots=2,maxmem=1G",
    "-device",
    "virtio-balloon-pci,id=balloon0",
];

/// How long QEMU may take to open its QMP socket.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running QEMU, killed when dropped.
#[derive(Debug)]
pub struct QemuVm {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    _dir: Option<TempDir>,
}

impl QemuVm {
    /// Starts `name` with [`DEFAULT_ARGS`] in a fresh temporary directory
    /// and waits until its QMP socket answers.
    ///
    /// # Panics
    /// If QEMU is not installed, exits early, or its socket does not greet
    /// within 30 s.
    pub async fn start(name: &str) -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let mut vm = Self::start_in(dir.path(), name, DEFAULT_ARGS).await;
        vm._dir = Some(dir);
        vm
    }

    /// Starts `name` with `args` plus `-qmp unix:<dir>/<name>.sock` and
    /// waits until the socket answers. `dir` must exist and outlive the VM.
    ///
    /// # Panics
    /// As [`QemuVm::start`].
    pub async fn start_in(dir: &Path, name: &str, args: &[&str]) -> Self {
        let socket = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.log"));
        let stderr = File::create(&log).expect("QEMU log file");
        let child = Command::new(QEMU)
            .args(args)
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", socket.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {QEMU} ({e}): QEMU system tests need it \
                     (Debian: apt-get install qemu-system-x86)"
                )
            });
        let mut vm = Self {
            child,
            socket,
            log,
            _dir: None,
        };
        vm.wait_ready().await;
        vm
    }

    /// Polls until the socket sends QMP's greeting.
    async fn wait_ready(&mut self) {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("QEMU status") {
                panic!(
                    "{QEMU} exited with {status} before its QMP socket was ready: {}",
                    self.stderr()
                );
            }
            if greets(&self.socket).await {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{QEMU}'s QMP socket {} did not answer within {READY_TIMEOUT:?}: {}",
                self.socket.display(),
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// QEMU's stderr so far.
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The QMP socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills QEMU with SIGKILL and reaps it; the socket file stays, stale,
    /// as after a crash. Killing a dead VM does nothing.
    ///
    /// # Panics
    /// If QEMU cannot be reaped.
    pub fn kill(&mut self) {
        if self.child.try_wait().expect("QEMU status").is_none() {
            // `Child::kill` sends SIGKILL.
            let _ = self.child.kill();
            self.child.wait().expect("reap QEMU");
        }
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Whether `socket` accepts a client and sends QMP's greeting within a
/// second. The connection is closed on return.
async fn greets(socket: &Path) -> bool {
    let Ok(stream) = UnixStream::connect(socket).await else {
        return false;
    };
    let mut stream = BufReader::new(stream);
    let mut line = String::new();
    let read = stream.read_line(&mut line);
    matches!(
        tokio::time::timeout(Duration::from_secs(1), read).await,
        Ok(Ok(n)) if n > 0 && line.contains("\"QMP\"")
    )
}
