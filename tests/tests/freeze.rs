//! VMs of hypervisors vmd has no driver for (crosvm on Ghaf's laptops):
//! real systemd in nspawn runs a `microvm@` unit whose process is not
//! QEMU, and vmd pauses and resumes it by freezing the unit's cgroup, as
//! Ghaf's givc does. A freeze made by someone else (`systemctl freeze`)
//! reads the same and wakes a waiting watch. CPU time comes from the unit's cgroup, not the bus.

#![cfg(feature = "system-tests")]

use std::time::Duration;

use vmd::policy::{IdentityRule, Scope};
use vmd_client::{Client, ClientError};
use vmd_proto::{ErrorReply, OperationStatus, Role, VmName, VmState, WatchEvent};
use vmd_tests::TestServer;
use vmd_tests::nspawn::SystemdContainer;

/// The stand-in for crosvm: a process that runs until stopped.
const TEMPLATE: &str = "\
[Unit]
Description=MicroVM '%i'

[Service]
Type=simple
ExecStart=/bin/sh -c 'while :; do sleep 1; done'
Restart=always
RestartSec=1
";

const VM: &str = "cvm";
const UNIT: &str = "microvm@cvm.service";

fn vm() -> VmName {
    VmName::new(VM).expect("valid")
}

/// Waits for watch answers until `cvm` reads `state`; returns the event.
async fn watch_until(client: &Client, since: u64, state: VmState) -> WatchEvent {
    let mut since = since;
    let work = async {
        loop {
            let event = client
                .watch(since, vec![vm()], 10_000)
                .await
                .expect("watch");
            since = event.generation;
            if event.changed.iter().any(|i| i.state == state) {
                return event;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(30), work)
        .await
        .unwrap_or_else(|_| panic!("{VM} never read {state}"))
}

#[tokio::test]
async fn other_hypervisors_pause_by_freezing_and_read_frozen() {
    let state = tempfile::tempdir().expect("state dir");
    let share = state.path().join(VM).join("current/share/microvm");
    std::fs::create_dir_all(&share).expect("share dir");
    std::fs::write(share.join("hypervisor"), "crosvm\n").expect("hypervisor file");
    let container = SystemdContainer::builder()
        .unit("microvm@.service", TEMPLATE)
        .state_dir(state.path())
        .boot()
        .await;
    let cgroup_root = container
        .cgroup_root()
        .expect("the container runs on cgroup2 (freezing needs it)");
    let server = TestServer::start_with(|c| {
        c.vms.inventory.state_dir = state.path().to_owned();
        c.vms.inventory.file = None;
        c.vms.systemd_bus = Some(container.bus_address());
        c.vms.cgroup_root = Some(cgroup_root);
        c.policy.identities = vec![IdentityRule {
            change: Scope::all(),
            ..IdentityRule::new("admin", Some(Role::Admin))
        }];
    })
    .await;
    let client = server.client("admin").await;

    let info = client.get_vm(&vm()).await.expect("declared by discovery");
    assert_eq!(info.state, VmState::Stopped);
    let op = client.start(&vm()).await.expect("accepted");
    let done = client.wait_operation(op.id, 60_000).await.expect("wait");
    assert_eq!(done.status, OperationStatus::Succeeded, "{done:?}");
    let since = client
        .watch(0, vec![vm()], 1)
        .await
        .expect("snapshot")
        .generation;
    let info = client.get_vm(&vm()).await.expect("get");
    assert_eq!(info.state, VmState::Running, "{info:?}");
    // CPU time and tasks come from the unit's cgroup.
    assert!(info.cpu_time_ns.is_some(), "{info:?}");
    assert!(info.tasks.is_some_and(|t| t >= 1), "{info:?}");

    // vmd's pause freezes the unit; a watch wakes for it.
    let op = client.pause(&vm()).await.expect("pause accepted");
    let done = client.wait_operation(op.id, 30_000).await.expect("wait");
    assert_eq!(done.status, OperationStatus::Succeeded, "{done:?}");
    let shown = container
        .systemctl(&["show", "-P", "FreezerState", UNIT])
        .await;
    assert_eq!(shown.trim(), "frozen", "systemd's own word");
    let frozen = watch_until(&client, since, VmState::Frozen).await;
    let op = client.resume(&vm()).await.expect("resume accepted");
    let done = client.wait_operation(op.id, 30_000).await.expect("wait");
    assert_eq!(done.status, OperationStatus::Succeeded, "{done:?}");
    let running = watch_until(&client, frozen.generation, VmState::Running).await;

    // Frozen behind vmd's back (as givc does): systemd 252 sends no
    // signal for a freeze (systemd issue 31115), but the kernel marks the
    // cgroup's cgroup.events modified, so a waiting watch wakes, and the
    // next read says the same.
    let waiting = {
        let client = server.client("admin").await;
        tokio::spawn(async move { watch_until(&client, running.generation, VmState::Frozen).await })
    };
    // The watch is waiting before the freeze.
    tokio::time::sleep(Duration::from_millis(500)).await;
    container.systemctl(&["freeze", UNIT]).await;
    waiting.await.expect("the watch saw the freeze");
    let info = client.get_vm(&vm()).await.expect("get");
    assert_eq!(info.state, VmState::Frozen, "{info:?}");
    assert_eq!(
        info.unit.and_then(|u| u.freezer_state).as_deref(),
        Some("frozen")
    );
    // vmd's resume thaws what someone else froze.
    let op = client.resume(&vm()).await.expect("resume accepted");
    let done = client.wait_operation(op.id, 30_000).await.expect("wait");
    assert_eq!(done.status, OperationStatus::Succeeded, "{done:?}");
    assert_eq!(
        client.get_vm(&vm()).await.expect("get").state,
        VmState::Running
    );

    // Resize names the hypervisor and why.
    match client.resize(&vm(), Some(2), None).await {
        Err(ClientError::Server(ErrorReply::Unsupported { reason })) => {
            assert!(reason.contains("crosvm"), "{reason}");
        }
        other => panic!("expected Unsupported, got {other:?}"),
    }
    server.stop().await;
    assert!(container.stop().await, "the container halts cleanly");
}
