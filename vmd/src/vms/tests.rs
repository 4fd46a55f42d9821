//! The VM service's logic over fake drivers (system tests use the real
//! systemd and QEMU).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use vmd_proto::{Bytes, Cid, Hypervisor, OperationInfo, OperationKind, OperationStatus};

use super::*;
use crate::drivers::LiveState;
use crate::drivers::fake::{FakeControl, FakeUnits};
use crate::vms::ops::OperationLimits;

/// A host with three declared VMs: `app-vm` (QEMU, stopped),
/// `admin-vm` (protected, running) and `chv` (cloud-hypervisor), the QEMU
/// ones with vmd's monitor socket.
pub(crate) struct Fixture {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) units: Arc<FakeUnits>,
    pub(crate) control: Arc<FakeControl>,
    pub(crate) service: VmService,
}

impl Fixture {
    pub(crate) fn monitor(&self, name: &str) -> PathBuf {
        self.dir
            .path()
            .join("microvms")
            .join(name)
            .join("vmd-qmp.sock")
    }

    pub(crate) fn shared(&self, name: &str) -> PathBuf {
        self.dir
            .path()
            .join("microvms")
            .join(name)
            .join(format!("{name}.sock"))
    }
}

fn running_live() -> LiveState {
    LiveState {
        run_state: Some(RunState::Running),
        vcpus: Some(1),
        vcpu_slots: Some(4),
        base_memory: Some(1024 << 20),
        plugged_memory: Some(0),
        balloon_actual: Some(1024 << 20),
        devices: Some(vec![("balloon0".into(), "virtio-balloon-pci".into())]),
    }
}

/// The fixture, with `without_monitor` VMs lacking vmd's monitor socket.
pub(crate) async fn fixture_with(
    gate: Option<Arc<Semaphore>>,
    without_monitor: &[&str],
) -> Fixture {
    fixture_in(gate, without_monitor, None).await
}

/// As [`fixture_with`], reading units' cgroups under `cgroup_root`.
async fn fixture_in(
    gate: Option<Arc<Semaphore>>,
    without_monitor: &[&str],
    cgroup_root: Option<PathBuf>,
) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("microvms");
    let inventory = dir.path().join("inventory.toml");
    std::fs::write(
        &inventory,
        r#"
        [vm.app-vm]
        hypervisor = "qemu"
        vcpus = 1
        max_vcpus = 4
        memory_mib = 1024
        max_memory_mib = 1024
        vsock_cid = 3
        [vm.admin-vm]
        hypervisor = "qemu"
        protected = true
        [vm.chv]
        hypervisor = "cloud-hypervisor"
        "#,
    )
    .expect("write inventory");
    let units = Arc::new(FakeUnits {
        gate,
        ..FakeUnits::default()
    });
    units.set("microvm@admin-vm.service", ActiveState::Active);
    units
        .wanted
        .lock()
        .expect("lock")
        .insert("microvm@admin-vm.service".into());
    let control = Arc::new(FakeControl::default());
    let service = VmService::new(
        InventorySource {
            state_dir: state.clone(),
            file: Some(inventory),
        },
        units.clone(),
        control.clone(),
        Operations::new(OperationLimits::default()),
        ChangeDeadlines::default(),
    );
    let service = match cgroup_root {
        Some(root) => service.with_cgroup_root(root),
        None => service,
    };
    let f = Fixture {
        dir,
        units,
        control,
        service,
    };
    for name in ["app-vm", "admin-vm"] {
        std::fs::create_dir_all(state.join(name)).expect("mkdir");
        let mut sockets = vec![f.shared(name)];
        if !without_monitor.contains(&name) {
            sockets.push(f.monitor(name));
        }
        for socket in sockets {
            std::fs::write(&socket, "").expect("socket stand-in");
            f.control
                .live
                .lock()
                .expect("lock")
                .insert(socket, running_live());
        }
    }
    f.service.start().await.expect("started");
    f
}

pub(crate) async fn fixture(gate: Option<Arc<Semaphore>>) -> Fixture {
    let f = fixture_with(gate, &[]).await;
    settle(&f.service, "admin-vm", |i| {
        i.live.source == LiveSource::Monitor
    })
    .await;
    f
}

fn vm(name: &str) -> VmName {
    VmName::new(name).expect("valid")
}

/// Waits (woken by the model) until `name` reads as `done` says.
pub(crate) async fn settle(
    service: &VmService,
    name: &str,
    done: impl Fn(&VmInfo) -> bool,
) -> VmInfo {
    let work = async {
        let mut wake = service.changes().subscribe();
        loop {
            wake.borrow_and_update();
            let info = service
                .get(&vm(name), &Scope::all(), "me")
                .await
                .expect("declared");
            if done(&info) {
                return info;
            }
            wake.changed().await.expect("model alive");
        }
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .expect("settled")
}

async fn finish(service: &VmService, op: &OperationInfo) -> OperationStatus {
    service
        .operations()
        .wait(op.id, Duration::from_secs(10), "me")
        .await
        .expect("known")
        .status
}

#[tokio::test]
async fn list_tells_the_truth() {
    let f = fixture(None).await;
    let vms = f.service.list(&Scope::all(), "me").await.expect("lists");
    let names: Vec<_> = vms.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["admin-vm", "app-vm", "chv"]);
    let admin = &vms[0];
    assert_eq!(admin.state, VmState::Running);
    assert_eq!(admin.autostart, Some(true));
    assert!(admin.protected);
    assert_eq!(admin.pid, Some(4242));
    assert_eq!(admin.vcpus.current, Some(1));
    assert_eq!(admin.memory.current, Some(Bytes::mib(1024)));
    assert_eq!(admin.live.source, LiveSource::Monitor);
    assert_eq!(admin.run_state.as_deref(), Some("running"));
    assert_eq!(
        admin.resources.runtime_devices.as_ref().map(Vec::len),
        Some(1)
    );
    let unit = admin.unit.as_ref().expect("unit known");
    assert_eq!(
        (unit.active_state.as_str(), unit.sub_state.as_str()),
        ("active", "running")
    );
    let app = &vms[1];
    assert_eq!(app.state, VmState::Stopped);
    assert_eq!(app.autostart, Some(false));
    assert_eq!(app.vsock_cid, Some(Cid(3)));
    assert_eq!(app.vcpus.declared, Some(1));
    assert_eq!(app.vcpus.current, None, "no live facts for a stopped VM");
    assert_eq!(app.pid, None);
    assert_eq!(app.live.source, LiveSource::None);
    assert_eq!(
        app.unit.as_ref().map(|u| u.active_state.as_str()),
        Some("not-loaded")
    );
    assert_eq!(vms[2].hypervisor, Some(Hypervisor::CloudHypervisor));
}

/// Reads answer from the model: after the start, no read asks systemd or
/// a control socket again.
#[tokio::test]
async fn reads_make_no_backend_calls() {
    let f = fixture(None).await;
    let reads = f.units.reads.lock().expect("lock").len();
    let calls = f.control.calls.lock().expect("lock").len();
    for _ in 0..20 {
        f.service.list(&Scope::all(), "me").await.expect("list");
        f.service
            .get(&vm("admin-vm"), &Scope::all(), "me")
            .await
            .expect("get");
    }
    assert_eq!(f.units.reads.lock().expect("lock").len(), reads);
    assert_eq!(f.control.calls.lock().expect("lock").len(), calls);
}

#[tokio::test]
async fn systemd_down_reads_unknown_not_invented() {
    let f = fixture(None).await;
    *f.units.down.lock().expect("lock") = true;
    f.units.drop_subscribers();
    let admin = settle(&f.service, "admin-vm", |i| i.state == VmState::Unknown).await;
    assert_eq!(admin.pid, None);
    assert_eq!(admin.vcpus.current, None, "live facts need a running unit");
    assert!(matches!(
        f.service.change(&vm("app-vm"), Change::Start, "me").await,
        Err(VmError::Backend(BackendError::Unavailable(_)))
    ));
    // Back: the follower subscribes again by itself.
    *f.units.down.lock().expect("lock") = false;
    settle(&f.service, "admin-vm", |i| i.state == VmState::Running).await;
}

#[tokio::test]
async fn start_then_shutdown_run_through_the_unit() {
    let f = fixture(None).await;
    let op = f
        .service
        .change(&vm("app-vm"), Change::Start, "me")
        .await
        .expect("accepted");
    assert_eq!(op.kind, OperationKind::Start);
    assert_eq!(finish(&f.service, &op).await, OperationStatus::Succeeded);
    let info = settle(&f.service, "app-vm", |i| i.state == VmState::Running).await;
    assert_eq!(info.live.source, LiveSource::Monitor, "attached on start");
    let stop = Change::Shutdown {
        force: false,
        timeout: None,
    };
    let op = f
        .service
        .change(&vm("app-vm"), stop, "me")
        .await
        .expect("accepted");
    assert_eq!(finish(&f.service, &op).await, OperationStatus::Succeeded);
    assert_eq!(
        *f.units.calls.lock().expect("lock"),
        [
            "start microvm@app-vm.service",
            "stop microvm@app-vm.service"
        ]
    );
}

/// A stop whose unit ends with a result other than success (ExecStop
/// timed out and systemd killed it) is no clean shutdown.
#[tokio::test]
async fn a_stop_that_ends_uncleanly_fails() {
    let f = fixture(None).await;
    f.units
        .results
        .lock()
        .expect("lock")
        .insert("microvm@app-vm.service".into(), "timeout".into());
    f.units.set("microvm@app-vm.service", ActiveState::Active);
    settle(&f.service, "app-vm", |i| i.state == VmState::Running).await;
    let stop = Change::Shutdown {
        force: false,
        timeout: None,
    };
    let op = f
        .service
        .change(&vm("app-vm"), stop, "me")
        .await
        .expect("accepted");
    match finish(&f.service, &op).await {
        OperationStatus::Failed(vmd_proto::ErrorReply::Failed { reason }) => {
            assert!(
                reason.contains("not cleanly") && reason.contains("timeout"),
                "{reason}"
            );
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    settle(&f.service, "app-vm", |i| i.state == VmState::Failed).await;
}

#[tokio::test]
async fn nonsensical_changes_are_refused_without_effect() {
    let f = fixture(None).await;
    let stop = Change::Shutdown {
        force: true,
        timeout: None,
    };
    assert!(matches!(
        f.service.change(&vm("app-vm"), stop, "me").await,
        Err(VmError::Invalid(m)) if m == "app-vm is not running"
    ));
    assert!(matches!(
        f.service
            .change(&vm("admin-vm"), Change::Restart, "me")
            .await,
        Err(VmError::Protected(_))
    ));
    assert!(matches!(
        f.service.change(&vm("ghost"), Change::Start, "me").await,
        Err(VmError::NotFound(_))
    ));
    f.units.set("microvm@chv.service", ActiveState::Active);
    settle(&f.service, "chv", |i| i.state == VmState::Running).await;
    assert!(matches!(
        f.service.change(&vm("chv"), Change::Start, "me").await,
        Err(VmError::Invalid(m)) if m == "chv is already running"
    ));
    match f
        .service
        .change(
            &vm("chv"),
            Change::Resize {
                vcpus: Some(2),
                memory: None,
            },
            "me",
        )
        .await
    {
        Err(VmError::Unsupported(m)) => assert!(m.contains("cloud-hypervisor"), "{m}"),
        other => panic!("expected Unsupported, got {other:?}"),
    }
    assert!(f.units.calls.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn pause_and_resume_need_the_matching_state() {
    let f = fixture(None).await;
    f.units.set("microvm@app-vm.service", ActiveState::Active);
    settle(&f.service, "app-vm", |i| {
        i.live.source == LiveSource::Monitor
    })
    .await;
    assert!(matches!(
        f.service.change(&vm("app-vm"), Change::Resume, "me").await,
        Err(VmError::Invalid(m)) if m == "app-vm is not paused"
    ));
    let op = f
        .service
        .change(&vm("app-vm"), Change::Pause, "me")
        .await
        .expect("accepted");
    assert_eq!(finish(&f.service, &op).await, OperationStatus::Succeeded);
    settle(&f.service, "app-vm", |i| i.state == VmState::Paused).await;
    assert!(matches!(
        f.service.change(&vm("app-vm"), Change::Pause, "me").await,
        Err(VmError::Invalid(m)) if m == "app-vm is already paused"
    ));
    let op = f
        .service
        .change(&vm("app-vm"), Change::Resume, "me")
        .await
        .expect("accepted");
    assert_eq!(finish(&f.service, &op).await, OperationStatus::Succeeded);
    settle(&f.service, "app-vm", |i| i.state == VmState::Running).await;
}

/// A VM vmd has no hypervisor driver for is paused by freezing its unit,
/// and reads as frozen (also when someone else froze it).
#[tokio::test]
async fn other_hypervisors_pause_by_freezing_the_unit() {
    let f = fixture(None).await;
    f.units.set("microvm@chv.service", ActiveState::Active);
    settle(&f.service, "chv", |i| i.state == VmState::Running).await;
    let op = f
        .service
        .change(&vm("chv"), Change::Pause, "me")
        .await
        .expect("accepted");
    assert_eq!(finish(&f.service, &op).await, OperationStatus::Succeeded);
    settle(&f.service, "chv", |i| i.state == VmState::Frozen).await;
    let op = f
        .service
        .change(&vm("chv"), Change::Resume, "me")
        .await
        .expect("accepted");
    assert_eq!(finish(&f.service, &op).await, OperationStatus::Succeeded);
    settle(&f.service, "chv", |i| i.state == VmState::Running).await;
    assert_eq!(
        *f.units.calls.lock().expect("lock"),
        ["freeze microvm@chv.service", "thaw microvm@chv.service"]
    );
    // Frozen by someone else: a signal, and the model shows it.
    f.units
        .frozen
        .lock()
        .expect("lock")
        .insert("microvm@admin-vm.service".into());
    f.units.signal("microvm@admin-vm.service");
    settle(&f.service, "admin-vm", |i| i.state == VmState::Frozen).await;
}

/// Someone else freezes a running VM's cgroup (givc writes
/// `cgroup.freeze`; systemd sends no signal for it): the kernel marks
/// `cgroup.events` modified, and a waiting watch wakes with the VM frozen.
#[tokio::test]
async fn a_freeze_by_someone_else_wakes_watchers() {
    let cgroups = tempfile::tempdir().expect("tempdir");
    let unit = cgroups.path().join("system.slice/microvm@admin-vm.service");
    std::fs::create_dir_all(&unit).expect("mkdir");
    let events = unit.join("cgroup.events");
    std::fs::write(&events, "populated 1\nfrozen 0\n").expect("write");
    let f = fixture_in(None, &[], Some(cgroups.path().to_owned())).await;
    let (watched, all) = ([vm("admin-vm")], Scope::all());
    let wait = |since| {
        f.service
            .watch(since, &watched, &all, "me", Duration::from_secs(10))
    };
    let mut since = wait(0).await.expect("snapshot").generation;
    settle(&f.service, "admin-vm", |i| i.state == VmState::Running).await;

    std::fs::write(&events, "populated 1\nfrozen 1\n").expect("write");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let event = tokio::time::timeout_at(deadline, wait(since))
            .await
            .expect("a watch woke for the freeze")
            .expect("watch");
        assert!(!event.changed.is_empty(), "the watch timed out unwoken");
        if event.changed.iter().any(|i| i.state == VmState::Frozen) {
            break;
        }
        since = event.generation;
    }
}

#[tokio::test]
async fn resize_is_checked_against_the_limits() {
    let f = fixture(None).await;
    f.units.set("microvm@app-vm.service", ActiveState::Active);
    settle(&f.service, "app-vm", |i| {
        i.live.source == LiveSource::Monitor
    })
    .await;
    let resize = |vcpus, memory| Change::Resize { vcpus, memory };
    for (change, needle) in [
        (resize(None, None), "needs"),
        (resize(Some(0), None), "at least 1"),
        (resize(Some(5), None), "maximum of 4"),
        (resize(None, Some(Bytes::mib(64))), "below the minimum"),
        (resize(None, Some(Bytes::mib(2048))), "exceeds the maximum"),
    ] {
        match f.service.change(&vm("app-vm"), change, "me").await {
            Err(VmError::Invalid(m)) => assert!(m.contains(needle), "{m}"),
            other => panic!("expected Invalid({needle}), got {other:?}"),
        }
    }
    let op = f
        .service
        .change(&vm("app-vm"), resize(Some(3), Some(Bytes::mib(512))), "me")
        .await
        .expect("accepted");
    assert_eq!(finish(&f.service, &op).await, OperationStatus::Succeeded);
    let info = settle(&f.service, "app-vm", |i| i.vcpus.current == Some(3)).await;
    assert_eq!(info.memory.balloon_actual, Some(Bytes::mib(512)));
}

/// Without vmd's monitor, a change that needs the shared socket while
/// another client holds it is refused at once, not accepted to fail.
#[tokio::test]
async fn a_held_shared_socket_refuses_the_change_at_once() {
    let f = fixture_with(None, &["app-vm"]).await;
    f.units.set("microvm@app-vm.service", ActiveState::Active);
    let info = settle(&f.service, "app-vm", |i| {
        i.live.source == LiveSource::SharedSocket
    })
    .await;
    assert!(info.live.age_ms.is_some());
    f.control
        .held
        .lock()
        .expect("lock")
        .insert(f.shared("app-vm"));
    match f.service.change(&vm("app-vm"), Change::Pause, "me").await {
        Err(e @ VmError::SocketHeld(_)) => {
            assert!(e.to_string().contains("held by another client"), "{e}");
        }
        other => panic!("expected SocketHeld, got {other:?}"),
    }
    assert!(
        f.service
            .operations()
            .pending(&vm("app-vm"), "me")
            .is_none(),
        "the claim was abandoned"
    );
}

/// The monitor's events change the record without a read, and wake
/// watches; its end (the process gone) drops the live facts.
#[tokio::test]
async fn monitor_events_update_the_record() {
    let f = fixture(None).await;
    let since = f.service.changes().generation();
    f.control.emit(
        &f.monitor("admin-vm"),
        crate::drivers::LiveEvent::BalloonActual(512 << 20),
    );
    let event = f
        .service
        .watch(since, &[], &Scope::all(), "me", Duration::from_secs(5))
        .await
        .expect("watch");
    assert_eq!(event.changed.len(), 1);
    assert_eq!(
        event.changed[0].memory.balloon_actual,
        Some(Bytes::mib(512))
    );
    f.control.emit(
        &f.monitor("admin-vm"),
        crate::drivers::LiveEvent::RunState(RunState::Paused),
    );
    settle(&f.service, "admin-vm", |i| i.state == VmState::Paused).await;
    // The same event again changes nothing a client sees: no wakeup.
    let quiet = f.service.changes().generation();
    f.control.emit(
        &f.monitor("admin-vm"),
        crate::drivers::LiveEvent::RunState(RunState::Paused),
    );
    assert_eq!(f.service.changes().generation(), quiet);
    f.control
        .live
        .lock()
        .expect("lock")
        .remove(&f.monitor("admin-vm"));
    f.control
        .emit(&f.monitor("admin-vm"), crate::drivers::LiveEvent::Gone);
    let info = settle(&f.service, "admin-vm", |i| {
        i.live.source != LiveSource::Monitor
    })
    .await;
    assert_eq!(info.vcpus.current, None);
}

#[tokio::test]
async fn concurrent_changes_get_one_accept_and_the_rest_busy() {
    let gate = Arc::new(Semaphore::new(0));
    let f = fixture(Some(gate.clone())).await;
    let attempts = (0..20).map(|i| {
        let service = f.service.clone();
        async move {
            let change = if i % 2 == 0 {
                Change::Start
            } else {
                Change::Restart
            };
            service.change(&vm("app-vm"), change, "me").await
        }
    });
    let results = futures_util::future::join_all(attempts).await;
    let accepted: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(accepted.len(), 1, "{results:?}");
    assert!(
        results
            .iter()
            .filter(|r| r.is_err())
            .all(|r| matches!(r, Err(VmError::Busy(b)) if b.vm == "app-vm")),
        "{results:?}"
    );
    // Reads do not wait behind the change, and show it pending.
    let info = f
        .service
        .get(&vm("app-vm"), &Scope::all(), "me")
        .await
        .expect("get");
    assert_eq!(info.pending.map(|p| p.id), Some(Some(accepted[0].id)));
    let op = accepted[0].clone();
    gate.add_permits(1);
    assert_eq!(finish(&f.service, &op).await, OperationStatus::Succeeded);
    assert_eq!(f.units.calls.lock().expect("lock").len(), 1);
}

#[test]
fn states_combine_systemd_and_the_hypervisor() {
    use crate::drivers::UnitStatus;
    use crate::vms::model::Record;
    let record = |active: ActiveState, sub: &str, freezer: &str, run: Option<RunState>| {
        let mut r = Record::new(VmSpec {
            hypervisor: Some(Hypervisor::Qemu),
            ..crate::vms::model::tests::spec("x")
        });
        r.facts.unit = Some(UnitStatus {
            load_state: "loaded".into(),
            active_state: active,
            sub_state: sub.into(),
            freezer_state: Some(freezer.into()),
            ..UnitStatus::not_loaded()
        });
        r.facts.live = run.map(|run| LiveState {
            run_state: Some(run),
            ..LiveState::default()
        });
        r
    };
    for (r, expected) in [
        (
            record(ActiveState::Active, "running", "running", None),
            VmState::Running,
        ),
        (
            record(
                ActiveState::Active,
                "running",
                "running",
                Some(RunState::Paused),
            ),
            VmState::Paused,
        ),
        (
            record(ActiveState::Active, "running", "frozen", None),
            VmState::Frozen,
        ),
        (
            record(ActiveState::Activating, "auto-restart", "running", None),
            VmState::Restarting,
        ),
        (
            record(ActiveState::Activating, "start", "running", None),
            VmState::Starting,
        ),
        (
            record(ActiveState::Deactivating, "stop", "running", None),
            VmState::Stopping,
        ),
        (
            record(ActiveState::Inactive, "dead", "running", None),
            VmState::Stopped,
        ),
        (
            record(ActiveState::Failed, "failed", "running", None),
            VmState::Failed,
        ),
    ] {
        assert_eq!(vm_state(&r), expected, "{:?}", r.facts.unit);
    }
}
