//! `vmd-demo`, the demo host in one command, as a user runs it: the real
//! binary as a child process (systemd in nspawn, QEMU VMs, the real `vmd`
//! on 127.0.0.1:9876), the real `vmctl --dev list` against it, and after
//! SIGINT, SIGTERM or SIGHUP nothing of it left: no process, mount,
//! cgroup or state directory.
//!
//! The demo listens on the fixed development address, so these tests run
//! one at a time.

#![cfg(feature = "system-tests")]

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use vmd_tests::demo::{READY, STATE_DIR_NAME, VMS};

/// The development address is one: one demo at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Bound on start-up (a loaded two-core machine boots slowly).
const START_LIMIT: Duration = Duration::from_secs(120);
/// Bound on the demo's exit after a signal (vmd stops, the container
/// halts, within its 15 s halt timeout, and is torn down).
const STOP_LIMIT: Duration = Duration::from_secs(60);

fn demo_command(dev_dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_vmd-demo"));
    command
        .arg("--vmd")
        .arg(vmd_tests::vmd())
        .env("VMD_DEV_DIR", dev_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// A running `vmd-demo` and what it printed.
struct RunningDemo {
    child: Child,
    pid: u32,
    dev_dir: TempDir,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl RunningDemo {
    /// Spawns the demo with a fresh development directory; returns once
    /// `marker` starts a line of its stdout or stderr.
    async fn spawn_until(marker: &str) -> Self {
        let dev_dir = tempfile::tempdir().expect("temporary directory");
        let mut child = demo_command(dev_dir.path())
            .spawn()
            .expect("vmd-demo starts");
        let pid = child.id().expect("running");
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
        for (pipe, sink) in [
            (
                Box::new(child.stdout.take().expect("stdout"))
                    as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                stdout.clone(),
            ),
            (
                Box::new(child.stderr.take().expect("stderr")),
                stderr.clone(),
            ),
        ] {
            let (marker, seen) = (marker.to_owned(), seen_tx.clone());
            tokio::spawn(async move {
                let mut lines = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.starts_with(&marker) {
                        let _ = seen.send(());
                    }
                    let mut text = sink.lock().expect("output lock");
                    text.push_str(&line);
                    text.push('\n');
                }
            });
        }
        let demo = Self {
            child,
            pid,
            dev_dir,
            stdout,
            stderr,
        };
        let seen = tokio::time::timeout(START_LIMIT, seen_rx.recv()).await;
        assert!(
            matches!(seen, Ok(Some(()))),
            "vmd-demo never printed {marker:?}\nstdout:\n{}\nstderr:\n{}",
            demo.stdout(),
            demo.stderr()
        );
        demo
    }

    fn stdout(&self) -> String {
        self.stdout.lock().expect("output lock").clone()
    }

    fn stderr(&self) -> String {
        self.stderr.lock().expect("output lock").clone()
    }

    fn state_dir(&self) -> PathBuf {
        self.dev_dir.path().join(STATE_DIR_NAME)
    }

    /// Sends `SIG<name>` and waits for the exit.
    async fn signal_and_wait(&mut self, name: &str) -> ExitStatus {
        let sent = std::process::Command::new("kill")
            .args([&format!("-{name}"), &self.pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(sent.success(), "kill -{name} {}", self.pid);
        match tokio::time::timeout(STOP_LIMIT, self.child.wait()).await {
            Ok(status) => status.expect("exit status"),
            Err(_) => panic!(
                "vmd-demo did not exit within {STOP_LIMIT:?} of SIG{name}\nstderr:\n{}",
                self.stderr()
            ),
        }
    }
}

impl Drop for RunningDemo {
    /// A failing test stops the demo as a user would (SIGTERM) and waits
    /// for its clean-up: a SIGKILL would leave its container behind.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &self.pid.to_string()])
                .status();
            let deadline = std::time::Instant::now() + STOP_LIMIT;
            while matches!(self.child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// `vmctl --dev list` with the demo's development directory: name → state.
async fn vmctl_dev_list(dev_dir: &Path) -> Vec<(String, String)> {
    let out = Command::new(vmd_tests::vmctl())
        .args(["--dev", "list"])
        .env("VMD_DEV_DIR", dev_dir)
        .env("HOME", "/nonexistent")
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("XDG_STATE_HOME")
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), out)
        .await
        .expect("vmctl must not hang")
        .expect("vmctl runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "vmctl --dev list: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            Some((fields.next()?.to_owned(), fields.next()?.to_owned()))
        })
        .collect()
}

/// A process as it was seen: PID and start time (so a reused PID is not
/// mistaken for it).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Proc {
    pid: u32,
    start: String,
    comm: String,
}

fn proc_of(pid: u32) -> Option<Proc> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm is in parentheses and may hold spaces; fields after it.
    let (head, rest) = stat.rsplit_once(") ")?;
    let comm = head.split_once(" (")?.1.to_owned();
    // rest starts at field 3 (state); starttime is field 22.
    let start = rest.split_whitespace().nth(19)?.to_owned();
    Some(Proc { pid, start, comm })
}

/// `pid` and every process below it (through other PID namespaces too).
fn descendants(pid: u32) -> Vec<Proc> {
    let mut found = Vec::new();
    let mut queue = vec![pid];
    while let Some(pid) = queue.pop() {
        if let Some(p) = proc_of(pid) {
            found.push(p);
        }
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(children) = std::fs::read_to_string(task.path().join("children")) {
                queue.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
    }
    found
}

/// Processes whose command line holds `needle`.
fn processes_naming(needle: &str) -> Vec<(u32, String)> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
            cmdline.contains(needle).then_some((pid, cmdline))
        })
        .collect()
}

/// Cgroup directories anywhere under /sys/fs/cgroup whose name starts
/// with `prefix`.
fn cgroups_named(prefix: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut queue = vec![PathBuf::from("/sys/fs/cgroup")];
    while let Some(dir) = queue.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                if entry.file_name().to_string_lossy().starts_with(prefix) {
                    found.push(entry.path());
                }
                queue.push(entry.path());
            }
        }
    }
    found
}

fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    vmd_tests::demo::mounts_below(&info, dir)
}

/// The container's machine name prefix: the harness names it
/// `vmd-<pid of the demo>-<n>` (in nspawn's command line and its cgroup).
fn machine_prefix(pid: u32) -> String {
    format!("vmd-{pid}-")
}

/// What a running demo consists of, checked to be there so that its
/// absence afterwards means something.
fn footprint(demo: &RunningDemo) -> Vec<Proc> {
    let procs = descendants(demo.pid);
    let count = |comm: &str| procs.iter().filter(|p| p.comm.starts_with(comm)).count();
    let running = VMS.iter().filter(|vm| vm.4).count();
    assert_eq!(
        count("qemu-system-x86"),
        running,
        "one QEMU per running VM below the demo: {procs:?}"
    );
    assert_eq!(
        procs.iter().filter(|p| p.comm == "vmd").count(),
        1,
        "vmd below the demo: {procs:?}"
    );
    assert_eq!(
        count("systemd-nspawn"),
        1,
        "nspawn below the demo: {procs:?}"
    );
    assert!(
        !processes_naming(&format!("--machine={}", machine_prefix(demo.pid))).is_empty(),
        "nspawn's command line names the machine"
    );
    assert!(
        !mounts_under(&demo.state_dir()).is_empty(),
        "the container's root is mounted under the state directory"
    );
    assert!(
        !cgroups_named(&machine_prefix(demo.pid)).is_empty(),
        "the container has its cgroup"
    );
    procs
}

/// Nothing of the demo is left.
fn assert_nothing_left(pid: u32, state_dir: &Path, seen: &[Proc]) {
    let alive: Vec<&Proc> = seen
        .iter()
        .filter(|p| proc_of(p.pid).is_some_and(|now| now.start == p.start))
        .collect();
    assert!(alive.is_empty(), "processes of the demo left: {alive:?}");
    let named = processes_naming(&machine_prefix(pid));
    assert!(named.is_empty(), "processes naming its machine: {named:?}");
    let named = processes_naming(&state_dir.display().to_string());
    assert!(
        named.is_empty(),
        "processes naming its directory: {named:?}"
    );
    let mounts = mounts_under(state_dir);
    assert!(mounts.is_empty(), "mounts left: {mounts:?}");
    let cgroups = cgroups_named(&machine_prefix(pid));
    assert!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
    assert!(
        !state_dir.exists(),
        "the state directory {} is left",
        state_dir.display()
    );
}

/// Starts a demo, checks what it serves with `f`, stops it with `signal`
/// and checks that it exits 0 leaving nothing.
async fn run_and_stop(signal: &str, check: impl AsyncFnOnce(&RunningDemo)) {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut demo = RunningDemo::spawn_until(READY).await;
    let seen = footprint(&demo);
    check(&demo).await;
    let status = demo.signal_and_wait(signal).await;
    assert!(
        status.success(),
        "vmd-demo after SIG{signal}: {status}\nstderr:\n{}",
        demo.stderr()
    );
    assert_nothing_left(demo.pid, &demo.state_dir(), &seen);
    // The development PKI stays for the next run, as `vmd serve --dev`'s does.
    assert!(demo.dev_dir.path().join("pki/ca.pem").is_file());
}

#[tokio::test]
async fn vmctl_lists_the_demo_vms_and_ctrl_c_leaves_nothing() {
    run_and_stop("INT", async |demo| {
        let out = demo.stdout();
        assert!(
            out.contains("vmctl --dev list") && out.contains("vmctl --dev top"),
            "the demo says what to run next:\n{out}"
        );
        let listed = vmctl_dev_list(demo.dev_dir.path()).await;
        let expected: Vec<(String, String)> = VMS
            .iter()
            .map(|vm| {
                let state = if vm.4 { "running" } else { "stopped" };
                (vm.0.to_owned(), state.to_owned())
            })
            .collect();
        for vm in &expected {
            assert!(listed.contains(vm), "{vm:?} not in {listed:?}");
        }
        assert_eq!(listed.len(), expected.len(), "{listed:?}");

        // A second demo on the same development directory, and one on
        // another (the address is taken): clear errors, nothing started.
        let second = demo_command(demo.dev_dir.path())
            .output()
            .await
            .expect("second demo runs");
        let err = String::from_utf8_lossy(&second.stderr);
        assert!(!second.status.success(), "{err}");
        assert!(err.contains("another vmd-demo is running"), "{err}");
        let other = tempfile::tempdir().expect("temporary directory");
        let third = demo_command(other.path())
            .output()
            .await
            .expect("third demo runs");
        let err = String::from_utf8_lossy(&third.stderr);
        assert!(!third.status.success(), "{err}");
        assert!(err.contains("127.0.0.1:9876 is in use"), "{err}");
        assert!(!other.path().join(STATE_DIR_NAME).exists());
        // The first one still serves.
        assert_eq!(vmctl_dev_list(demo.dev_dir.path()).await.len(), VMS.len());
    })
    .await;
}

#[tokio::test]
async fn sigterm_leaves_nothing() {
    run_and_stop("TERM", async |_| {}).await;
}

#[tokio::test]
async fn sighup_leaves_nothing() {
    run_and_stop("HUP", async |_| {}).await;
}

#[tokio::test]
async fn a_signal_during_start_up_leaves_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut demo = RunningDemo::spawn_until("vmd-demo: booting").await;
    let status = demo.signal_and_wait("INT").await;
    assert!(
        status.success(),
        "vmd-demo after SIGINT in start-up: {status}\nstderr:\n{}",
        demo.stderr()
    );
    assert!(
        !demo.stdout().contains(READY),
        "the signal came after start-up; the test proves nothing:\n{}",
        demo.stdout()
    );
    assert_nothing_left(demo.pid, &demo.state_dir(), &[]);
}

#[tokio::test]
async fn non_root_is_refused_with_a_clear_error() {
    let dev_dir = tempfile::tempdir().expect("temporary directory");
    let dev = dev_dir.path().join("dev");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_vmd-demo"))
        .arg("--vmd")
        .arg(vmd_tests::vmd())
        .env("VMD_DEV_DIR", &dev)
        .output()
        .await
        .expect("setpriv (util-linux) runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("must run as root") && err.contains("sudo ./scripts/demo"),
        "{err}"
    );
    assert!(!dev.exists(), "nothing is made before the check");
}
