//! `Watch` against a real microvm host: systemd booted in nspawn runs
//! `microvm@NAME.service` units with real QEMU (TCG, no guest OS); vmd on
//! this machine follows systemd's unit signals over D-Bus. Changes made
//! behind vmd's back (`systemctl` inside the container, a QEMU killed with
//! SIGKILL and restarted by systemd) wake pending watches, which answer the VM's fresh state; a
//! watcher is woken only for VMs it watches and may see.
//!
//! Wake-up latencies are printed, never asserted: a watch is held with a
//! long timeout, so an answer with the VM in it can only come from the
//! change.

#![cfg(feature = "system-tests")]

use std::time::{Duration, Instant};

use vmd::policy::{IdentityRule, Scope};
use vmd_client::Client;
use vmd_proto::{Role, VmName, VmState, WatchEvent};
use vmd_tests::microvm::DeclaredVm;
use vmd_tests::rig::MicrovmRig;

const GUI: &str = "gui-vm";
const NET: &str = "net-vm";

/// Long enough that only a change can end a watch in this test.
const HOLD_MS: u32 = 120_000;

/// Two stopped VMs; `admin` sees both, `gui` only gui-vm, `net` only
/// net-vm.
async fn rig() -> MicrovmRig {
    MicrovmRig::with_vms(&[DeclaredVm::new(GUI), DeclaredVm::new(NET)], |c| {
        let reader = |name: &str, visible: Scope| IdentityRule {
            visible,
            ..IdentityRule::new(name, Some(Role::Reader))
        };
        c.policy.identities = vec![
            reader("admin", Scope::all()),
            reader("gui", Scope::of([GUI])),
            reader("net", Scope::of([NET])),
        ];
    })
    .await
}

fn vm(name: &str) -> VmName {
    VmName::new(name).expect("valid")
}

fn names(event: &WatchEvent) -> Vec<&str> {
    event.changed.iter().map(|i| i.name.as_str()).collect()
}

/// The generation of a first (snapshot) watch.
async fn snapshot(client: &Client) -> u64 {
    let event = client.watch(0, Vec::new(), 1).await.expect("snapshot");
    assert!(event.snapshot, "{event:?}");
    event.generation
}

/// Watches `vms` from `since` until `pred` holds for an answer, skipping
/// answers about other intermediate states; returns it and how long it
/// took. Each answer must name a VM: only a change ends a held watch.
async fn watch_until(
    client: &Client,
    mut since: u64,
    vms: &[&str],
    pred: impl Fn(&WatchEvent) -> bool,
) -> (WatchEvent, Duration) {
    let started = Instant::now();
    loop {
        let event = client
            .watch(since, vms.iter().map(|n| vm(n)).collect(), HOLD_MS)
            .await
            .expect("watch");
        assert!(
            !event.changed.is_empty() || !event.removed.is_empty(),
            "a held watch ended without a change: {event:?}"
        );
        if pred(&event) {
            return (event, started.elapsed());
        }
        since = event.generation;
    }
}

fn state_of(event: &WatchEvent, name: &str) -> Option<VmState> {
    event
        .changed
        .iter()
        .find(|i| i.name.as_str() == name)
        .map(|i| i.state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_behind_vmds_back_wake_pending_watches() {
    let rig = rig().await;
    let admin = rig.server.client("admin").await;
    let since = snapshot(&admin).await;

    // `systemctl start` inside the container, not through vmd.
    let watching = tokio::spawn({
        let admin = admin.clone();
        async move {
            watch_until(&admin, since, &[], |e| {
                state_of(e, GUI) == Some(VmState::Running)
            })
            .await
        }
    });
    // Let the watch reach vmd before the change.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let unit = format!("microvm@{GUI}.service");
    let started_at = Instant::now();
    rig.container.systemctl(&["start", &unit]).await;
    let (event, _) = watching.await.expect("watch task");
    println!(
        "systemctl start woke the watch {:.1?} after the command was sent",
        started_at.elapsed()
    );
    let info = event
        .changed
        .iter()
        .find(|i| i.name.as_str() == GUI)
        .expect("gui-vm in the answer");
    assert!(info.pid.is_some(), "{info:?}");

    // QEMU killed with SIGKILL from outside systemd and vmd.
    let since = event.generation;
    let pid = info.pid.expect("running").to_string();
    let watching = tokio::spawn({
        let admin = admin.clone();
        async move {
            watch_until(&admin, since, &[GUI], |e| {
                matches!(
                    state_of(e, GUI),
                    Some(VmState::Restarting | VmState::Failed)
                )
            })
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let killed_at = Instant::now();
    let out = rig.container.exec("kill", &["-KILL", &pid]).await;
    assert!(out.status.success(), "{out:?}");
    let (event, _) = watching.await.expect("watch task");
    println!(
        "SIGKILL of QEMU woke the watch {:.1?} after kill ran; state {:?}",
        killed_at.elapsed(),
        state_of(&event, GUI)
    );

    // systemd restarts it (Restart=always, as microvm.nix's units): the
    // watch sees it running again, with its live facts (vmd's monitor
    // attaches once QEMU runs, maybe in a later change).
    let (event, _) = watch_until(&admin, event.generation, &[GUI], |e| {
        e.changed.iter().any(|i| {
            i.name.as_str() == GUI && i.state == VmState::Running && i.vcpus.current.is_some()
        })
    })
    .await;

    // vmd's own reads (which load and unload units in systemd) are not
    // echoed back as changes: with nothing happening, a watch times out
    // empty.
    admin.get_vm(&vm(NET)).await.expect("read net-vm");
    let quiet = admin
        .watch(event.generation, Vec::new(), 1500)
        .await
        .expect("watch");
    assert!(
        quiet.changed.is_empty() && !quiet.snapshot,
        "nothing changed, yet: {quiet:?}"
    );
    rig.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_are_woken_only_for_their_own_vms() {
    let rig = rig().await;
    let gui = rig.server.client("gui").await;
    let net = rig.server.client("net").await;
    // Each snapshot holds only what the identity may see.
    let gui_snapshot = gui.watch(0, Vec::new(), 1).await.expect("snapshot");
    assert_eq!(names(&gui_snapshot), [GUI]);
    let net_snapshot = net.watch(0, Vec::new(), 1).await.expect("snapshot");
    assert_eq!(names(&net_snapshot), [NET]);

    let gui_watch = tokio::spawn({
        let gui = gui.clone();
        let since = gui_snapshot.generation;
        async move { gui.watch(since, Vec::new(), HOLD_MS).await }
    });
    let net_watch = tokio::spawn({
        let net = net.clone();
        let since = net_snapshot.generation;
        async move { net.watch(since, Vec::new(), HOLD_MS).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;

    // net-vm changes: only net's watcher answers; gui's stays pending.
    rig.container
        .systemctl(&["start", &format!("microvm@{NET}.service")])
        .await;
    let event = net_watch.await.expect("task").expect("net's watch");
    assert_eq!(names(&event), [NET], "{event:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    if gui_watch.is_finished() {
        panic!(
            "gui's watcher was answered for a VM it cannot see: {:?}",
            gui_watch.await
        );
    }

    // gui-vm changes: now gui's watcher answers, with gui-vm only.
    rig.container
        .systemctl(&["start", &format!("microvm@{GUI}.service")])
        .await;
    let event = gui_watch.await.expect("task").expect("gui's watch");
    assert_eq!(names(&event), [GUI], "{event:?}");
    assert!(event.removed.is_empty());
    rig.server.stop().await;
}

/// The bus going away ends vmd's signal subscription: pending watches are
/// answered with a full snapshot (events may have been lost). Once the bus
/// is back, the next watch subscribes again and sees changes made outside
/// vmd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_resubscribe_after_the_bus_returns() {
    let rig = rig().await;
    let admin = rig.server.client("admin").await;
    let since = snapshot(&admin).await;
    let pending = tokio::spawn({
        let admin = admin.clone();
        async move { admin.watch(since, Vec::new(), HOLD_MS).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    rig.container.stop_bus().await;
    let event = pending.await.expect("task").expect("watch");
    // Lost signals: every VM's unit state is unknown now, and says so.
    assert!(
        event.changed.iter().all(|i| i.state == VmState::Unknown),
        "lost signals make the states unknown: {event:?}"
    );
    assert_eq!(names(&event), [GUI, NET]);

    rig.container.start_bus().await;
    // The first watch after the return resubscribes (its answer may be
    // another snapshot while systemd's state settles); then a change made
    // with systemctl wakes a held watch.
    let since = admin
        .watch(event.generation, Vec::new(), 1)
        .await
        .expect("watch after the bus returned")
        .generation;
    let watching = tokio::spawn({
        let admin = admin.clone();
        async move {
            watch_until(&admin, since, &[NET], |e| {
                state_of(e, NET) == Some(VmState::Running)
            })
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    rig.container
        .systemctl(&["start", &format!("microvm@{NET}.service")])
        .await;
    let (event, waited) = watching.await.expect("watch task");
    println!(
        "after the bus returned, systemctl start woke the watch in {waited:.1?}: {:?}",
        state_of(&event, NET)
    );
    rig.server.stop().await;
}
