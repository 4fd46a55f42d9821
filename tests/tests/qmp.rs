//! vmd's QMP client against real QEMU (TCG, no guest OS).
//!
//! Without a guest OS, QEMU still answers every query and accepts every
//! command; what needs a guest's cooperation does not happen: the balloon
//! keeps its size, the power button changes nothing, and vCPU unplug is
//! refused. The tests assert exactly that.

#![cfg(feature = "system-tests")]

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use vmd::drivers::qemu::Qmp;
use vmd::drivers::{BackendError, LiveState, RunState, VmControl};
use vmd_tests::qemu::QemuVm;

const MIB: u64 = 1 << 20;

/// A client with a deadline far beyond any of these calls, so a result
/// other than `Timeout` shows the call did not hang.
fn qmp() -> Qmp {
    Qmp::new(Duration::from_secs(30))
}

async fn query(vm: &QemuVm) -> LiveState {
    qmp().query(vm.socket()).await.expect("query")
}

/// One shared-socket session per call, as vmd uses for VMs without its
/// own monitor.
trait Sessions {
    async fn query(&self, socket: &Path) -> Result<LiveState, BackendError>;
    async fn pause(&self, socket: &Path) -> Result<(), BackendError>;
    async fn resume(&self, socket: &Path) -> Result<(), BackendError>;
    async fn powerdown(&self, socket: &Path) -> Result<(), BackendError>;
    async fn set_vcpus(&self, socket: &Path, n: u32) -> Result<(), BackendError>;
    async fn set_balloon(&self, socket: &Path, bytes: u64) -> Result<(), BackendError>;
}

impl Sessions for Qmp {
    async fn query(&self, socket: &Path) -> Result<LiveState, BackendError> {
        self.open(socket, self.timeout()).await?.query().await
    }
    async fn pause(&self, socket: &Path) -> Result<(), BackendError> {
        self.open(socket, self.timeout()).await?.pause().await
    }
    async fn resume(&self, socket: &Path) -> Result<(), BackendError> {
        self.open(socket, self.timeout()).await?.resume().await
    }
    async fn powerdown(&self, socket: &Path) -> Result<(), BackendError> {
        self.open(socket, self.timeout()).await?.powerdown().await
    }
    async fn set_vcpus(&self, socket: &Path, n: u32) -> Result<(), BackendError> {
        self.open(socket, self.timeout()).await?.set_vcpus(n).await
    }
    async fn set_balloon(&self, socket: &Path, bytes: u64) -> Result<(), BackendError> {
        self.open(socket, self.timeout())
            .await?
            .set_balloon(bytes)
            .await
    }
}

/// A QMP session outside vmd's client, to check its work and to hold the
/// socket. Returns once negotiated.
async fn raw_session(socket: &Path) -> BufReader<UnixStream> {
    let mut stream = BufReader::new(UnixStream::connect(socket).await.expect("connect"));
    let greeting = read_json(&mut stream).await;
    assert!(greeting.get("QMP").is_some(), "greeting: {greeting}");
    raw_execute(&mut stream, "qmp_capabilities").await;
    stream
}

async fn read_json(stream: &mut BufReader<UnixStream>) -> Value {
    let mut line = String::new();
    stream.read_line(&mut line).await.expect("read");
    serde_json::from_str(&line).expect("QEMU sends JSON")
}

/// Runs `command` and returns its `return`, skipping events.
async fn raw_execute(stream: &mut BufReader<UnixStream>, command: &str) -> Value {
    let request = format!("{}\n", json!({ "execute": command }));
    stream
        .get_mut()
        .write_all(request.as_bytes())
        .await
        .expect("write");
    loop {
        let reply = read_json(stream).await;
        if reply.get("event").is_none() {
            return reply
                .get("return")
                .cloned()
                .unwrap_or_else(|| panic!("{command} failed: {reply}"));
        }
    }
}

#[tokio::test]
async fn query_reports_the_machine() {
    let vm = QemuVm::start("query").await;
    assert_eq!(
        query(&vm).await,
        LiveState {
            run_state: Some(RunState::Running),
            vcpus: Some(1),
            vcpu_slots: Some(4),
            base_memory: Some(256 * MIB),
            plugged_memory: Some(0),
            balloon_actual: Some(256 * MIB),
            devices: Some(vec![("balloon0".into(), "virtio-balloon-pci".into())]),
        }
    );
}

#[tokio::test]
async fn set_vcpus_hot_plugs_and_refuses_what_it_cannot_do() {
    let vm = QemuVm::start("vcpus").await;
    let qmp = qmp();
    qmp.set_vcpus(vm.socket(), 3).await.expect("plug two vCPUs");
    assert_eq!(query(&vm).await.vcpus, Some(3));

    let mut raw = raw_session(vm.socket()).await;
    let cpus = raw_execute(&mut raw, "query-cpus-fast").await;
    let paths: Vec<&str> = cpus
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|cpu| cpu["qom-path"].as_str())
        .collect();
    assert_eq!(paths.len(), 3, "{cpus}");
    assert!(
        paths.contains(&"/machine/peripheral/vmd-cpu-0-1-0"),
        "{cpus}"
    );
    assert!(
        paths.contains(&"/machine/peripheral/vmd-cpu-0-2-0"),
        "{cpus}"
    );
    drop(raw);

    // Already there: nothing to do.
    qmp.set_vcpus(vm.socket(), 3).await.expect("no change");
    for impossible in [0, 5] {
        let error = qmp
            .set_vcpus(vm.socket(), impossible)
            .await
            .expect_err("out of range");
        assert!(matches!(error, BackendError::Command { .. }), "{error:?}");
    }

    // Unplug needs the guest: QEMU refuses it while its ACPI CPU hot-plug
    // is in legacy mode (no OS switched it), or, with an OS, only asks the
    // guest to eject. Either way nothing is gone yet and nothing hangs.
    match qmp.set_vcpus(vm.socket(), 2).await {
        Ok(()) | Err(BackendError::Command { .. }) => {}
        Err(other) => panic!("unplug: {other:?}"),
    }
    assert_eq!(query(&vm).await.vcpus, Some(3));
}

#[tokio::test]
async fn balloon_target_is_accepted_but_needs_a_guest_to_move() {
    let vm = QemuVm::start("balloon").await;
    qmp()
        .set_balloon(vm.socket(), 128 * MIB)
        .await
        .expect("balloon");
    // No guest driver inflates the balloon, so the guest keeps its memory.
    assert_eq!(query(&vm).await.balloon_actual, Some(256 * MIB));
}

#[tokio::test]
async fn pause_and_resume() {
    let vm = QemuVm::start("pause").await;
    let qmp = qmp();
    qmp.pause(vm.socket()).await.expect("pause");
    assert_eq!(query(&vm).await.run_state, Some(RunState::Paused));
    qmp.resume(vm.socket()).await.expect("resume");
    assert_eq!(query(&vm).await.run_state, Some(RunState::Running));
}

#[tokio::test]
async fn powerdown_is_accepted() {
    let vm = QemuVm::start("powerdown").await;
    qmp().powerdown(vm.socket()).await.expect("powerdown");
    // No OS handles the ACPI power button, so the VM runs on.
    assert_eq!(query(&vm).await.run_state, Some(RunState::Running));
}

#[tokio::test]
async fn killed_qemu_is_unavailable() {
    let mut vm = QemuVm::start("killed").await;
    query(&vm).await;
    vm.kill();
    assert!(vm.socket().exists(), "SIGKILL leaves the socket file");
    let error = qmp().query(vm.socket()).await.expect_err("QEMU is gone");
    assert!(matches!(error, BackendError::Unavailable(_)), "{error:?}");
}

#[tokio::test]
async fn concurrent_queries_on_one_vm_both_succeed() {
    let vm = QemuVm::start("concurrent").await;
    let qmp = qmp();
    let (a, b) = tokio::join!(qmp.query(vm.socket()), qmp.query(vm.socket()));
    assert_eq!(a.expect("first query").vcpus, Some(1));
    assert_eq!(b.expect("second query").vcpus, Some(1));
}

#[tokio::test]
async fn concurrent_queries_from_two_clients_queue_in_qemu() {
    // Two independent clients (say, two daemons) are not serialized by
    // vmd; QEMU greets the second when the first leaves.
    let vm = QemuVm::start("two-clients").await;
    let (first, second) = (qmp(), qmp());
    let (a, b) = tokio::join!(first.query(vm.socket()), second.query(vm.socket()));
    assert_eq!(a.expect("first client").vcpus, Some(1));
    assert_eq!(b.expect("second client").vcpus, Some(1));
}

#[tokio::test]
async fn socket_held_by_another_client_is_reported_busy() {
    let vm = QemuVm::start("held").await;
    let short = Qmp::new(Duration::from_millis(500));

    // QEMU queues a second client without greeting it.
    let holder = raw_session(vm.socket()).await;
    let error = short.query(vm.socket()).await.expect_err("held");
    match &error {
        BackendError::Timeout(what) => assert!(what.contains("busy"), "{what}"),
        other => panic!("expected a timeout, got {other:?}"),
    }

    // With one client served and one queued, QEMU's accept queue (backlog
    // 1) is full and connecting fails at once.
    let queued = UnixStream::connect(vm.socket()).await.expect("queued");
    let error = short.query(vm.socket()).await.expect_err("queue full");
    assert!(matches!(error, BackendError::SocketBusy(_)), "{error:?}");

    drop(queued);
    drop(holder);
    assert_eq!(query(&vm).await.run_state, Some(RunState::Running));
}
