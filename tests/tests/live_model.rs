//! Issue 12: every read answers from vmd's live model, kept current by
//! systemd's signals and by vmd's own QMP monitor of each QEMU VM, on a
//! host shaped like a real microvm.nix host ([`vmd_tests::microvm`]):
//! `microvm@.service` with `Restart=always`, a `microvm-shutdown` that
//! holds the VM's main QMP socket until QEMU exits, and other programs
//! using that socket ([`MicrovmRig::hold_main_socket`],
//! [`MicrovmRig::main_socket_command`]).
//!
//! Counts and states are asserted, not speed, with two exceptions the
//! issue names: a read while the main socket is held answers "in under a
//! second, long before the socket is freed", and a crash shows "within
//! 1 s". Both are bounds on waiting, far from what they guard against:
//! before the live model a read waited for `qmp_timeout_secs` (5 s) on a
//! held socket, and the holder here keeps it for 30 s. Every other wait
//! is bounded by [`PATIENCE`] only, so a hang fails instead of stalling.
//! Where a claim of vmd can be checked independently it is: systemd's
//! word through `systemctl show` in the container, QEMU's through another
//! QMP client.

#![cfg(feature = "system-tests")]

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::net::UnixDatagram;
use vmd_client::{Client, ClientError, Endpoint};
use vmd_proto::{
    Bytes, LiveSource, OperationInfo, OperationStatus, VmInfo, VmName, VmState, WatchEvent,
};
use vmd_tests::TestPki;
use vmd_tests::microvm::{DeclaredResources, DeclaredVm, Macvtap, MicrovmHost};
use vmd_tests::qmp::{QmpClient, QmpError};
use vmd_tests::rig::{MicrovmRig, wait_for_qmp};

/// The issue's bound on a read while the main socket is held, and on a
/// crash reaching the record and a pending watch.
const AT_ONCE: Duration = Duration::from_secs(1);

/// How long another client holds the main socket (the issue's 30 s).
const HOLD: Duration = Duration::from_secs(30);

/// A bound on waiting for anything else (a hang fails, nothing is timed).
const PATIENCE: Duration = Duration::from_secs(60);

/// A watch held this long can only end because of a change.
const HOLD_MS: u32 = 120_000;

fn vm(name: &str) -> VmName {
    VmName::new(name).expect("valid")
}

/// `GetVm`, asserted to answer within [`AT_ONCE`].
async fn read(client: &Client, name: &str) -> VmInfo {
    let started = Instant::now();
    let info = client.get_vm(&vm(name)).await.expect("GetVm");
    let took = started.elapsed();
    assert!(took < AT_ONCE, "GetVm {name} took {took:?}");
    info
}

/// `ListVms`, asserted to answer within [`AT_ONCE`].
async fn list(client: &Client) -> Vec<VmInfo> {
    let started = Instant::now();
    let vms = client.list_vms().await.expect("ListVms");
    let took = started.elapsed();
    assert!(took < AT_ONCE, "ListVms took {took:?}");
    vms
}

fn find<'a>(vms: &'a [VmInfo], name: &str) -> &'a VmInfo {
    vms.iter()
        .find(|i| i.name.as_str() == name)
        .unwrap_or_else(|| panic!("{name} missing from {vms:#?}"))
}

/// Re-reads a VM until `done` holds; fails after [`PATIENCE`] with the
/// last reading.
async fn eventually(
    client: &Client,
    name: &str,
    what: &str,
    done: impl Fn(&VmInfo) -> bool,
) -> VmInfo {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let info = client.get_vm(&vm(name)).await.expect("GetVm");
        if done(&info) {
            return info;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never {what}; last read: {info:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether vmd's own monitor serves the VM's live facts, all present.
fn monitored(info: &VmInfo) -> bool {
    info.live.source == LiveSource::Monitor
        && info.vcpus.current.is_some()
        && info.memory.current.is_some()
        && info.memory.balloon_actual.is_some()
}

/// Asserts a VM with vmd's monitor reads with full, current facts.
fn assert_full_facts(info: &VmInfo) {
    assert_eq!(info.live.source, LiveSource::Monitor, "{info:#?}");
    assert!(info.vcpus.current.is_some(), "vCPUs: {info:#?}");
    assert_eq!(info.vcpus.max, Some(4), "{info:#?}");
    assert_eq!(info.memory.current, Some(Bytes::mib(256)), "{info:#?}");
    assert!(info.memory.balloon_actual.is_some(), "balloon: {info:#?}");
}

/// The first watch: a snapshot's generation.
async fn snapshot(client: &Client, vms: &[&str]) -> u64 {
    let event = client
        .watch(0, vms.iter().map(|n| vm(n)).collect(), 1)
        .await
        .expect("snapshot");
    assert!(event.snapshot, "{event:?}");
    event.generation
}

/// The VM's info in a watch answer.
fn in_event<'a>(event: &'a WatchEvent, name: &str) -> Option<&'a VmInfo> {
    event.changed.iter().find(|i| i.name.as_str() == name)
}

/// Follows `name` with held watches from `since` until `done` holds for
/// its info; returns every state seen on the way, the matching info and
/// when it arrived. Each answer must name the VM: only a change ends a
/// held watch.
async fn follow(
    client: Client,
    since: u64,
    name: &'static str,
    done: impl Fn(&VmInfo) -> bool,
) -> (Vec<VmState>, VmInfo, Instant) {
    let mut since = since;
    let mut states = Vec::new();
    loop {
        let event = client
            .watch(since, vec![vm(name)], HOLD_MS)
            .await
            .expect("watch");
        let info = in_event(&event, name)
            .unwrap_or_else(|| panic!("a held watch ended without {name}: {event:?}"))
            .clone();
        states.push(info.state);
        if done(&info) {
            return (states, info, Instant::now());
        }
        since = event.generation;
    }
}

/// Waits for an operation to end.
async fn finish(client: &Client, op: &OperationInfo) -> OperationInfo {
    let done = client
        .wait_operation(op.id, 120_000)
        .await
        .expect("WaitOperation");
    assert_ne!(done.status, OperationStatus::Running, "{done:?}");
    done
}

/// The error text of a change that could not be made, whether refused at
/// once or accepted and failed; `None` if it succeeded.
async fn change_error(
    client: &Client,
    change: Result<OperationInfo, ClientError>,
) -> Option<String> {
    match change {
        Err(e) => Some(e.to_string()),
        Ok(op) => match finish(client, &op).await.status {
            OperationStatus::Failed(e) => Some(e.to_string()),
            _ => None,
        },
    }
}

/// vmd's bound on one session on a shared control socket (the default).
const QMP_TIMEOUT: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_answer_at_once_while_another_client_holds_the_main_socket() {
    const MON: &str = "mon-vm";
    const BARE: &str = "bare-vm";
    let rig = MicrovmRig::with_vms(
        &[
            DeclaredVm::new(MON).autostart(),
            DeclaredVm::new(BARE).autostart().without_monitor(),
        ],
        |c| c.vms.qmp_timeout = QMP_TIMEOUT,
    )
    .await;
    let client = rig.server.client("admin").await;

    // vmd attaches its monitor by itself; the VM without one is read
    // through the shared socket in the background.
    eventually(&client, MON, "monitored", monitored).await;
    let bare = eventually(&client, BARE, "had live facts", |i| {
        i.live.source == LiveSource::SharedSocket && i.vcpus.current.is_some()
    })
    .await;
    println!("{BARE} before the hold: {:?}", bare.live);

    // Another client takes both main sockets, as ghaf-mem-manager would.
    let held_mon = rig
        .hold_main_socket(MON, HOLD)
        .await
        .expect("hold mon-vm's main socket");
    let held_bare = rig
        .hold_main_socket(BARE, HOLD)
        .await
        .expect("hold bare-vm's main socket");
    let held_at = Instant::now();

    // `found_held`: vmd has met the held socket (a change through it
    // failed, and a background refresh, bounded by qmp_timeout, has had
    // time to give up), so the facts of the VM without a monitor are
    // stale and their note must say why.
    let check_round = |vms: Vec<VmInfo>, mon: VmInfo, bare: VmInfo, found_held: bool| {
        assert_eq!(find(&vms, MON).state, mon.state);
        assert_eq!(find(&vms, BARE).state, VmState::Running);
        assert_full_facts(&mon);
        assert_full_facts(find(&vms, MON));
        assert_eq!(bare.state, VmState::Running, "{bare:#?}");
        assert_eq!(bare.live.source, LiveSource::SharedSocket, "{bare:#?}");
        assert!(bare.live.age_ms.is_some(), "age-marked: {bare:#?}");
        if found_held {
            let note = bare.live.note.clone().unwrap_or_default();
            assert!(
                note.to_lowercase().contains("socket"),
                "the note says why the facts may be stale: {bare:#?}"
            );
        }
        assert_eq!(
            bare.vcpus.current,
            Some(1),
            "the recorded facts stay: {bare:#?}"
        );
        bare.live.age_ms.unwrap_or_default()
    };
    let first_age = check_round(
        list(&client).await,
        read(&client, MON).await,
        read(&client, BARE).await,
        false,
    );

    // Changes of the VM with vmd's monitor go through it meanwhile.
    let op = client.pause(&vm(MON)).await.expect("pause accepted");
    let done = finish(&client, &op).await;
    assert_eq!(done.status, OperationStatus::Succeeded, "{done:?}");
    let paused = read(&client, MON).await;
    assert_eq!(paused.state, VmState::Paused, "{paused:#?}");
    assert_eq!(paused.run_state.as_deref(), Some("paused"), "{paused:#?}");
    let op = client.resume(&vm(MON)).await.expect("resume accepted");
    assert_eq!(
        finish(&client, &op).await.status,
        OperationStatus::Succeeded
    );
    let op = client
        .resize(&vm(MON), Some(2), None)
        .await
        .expect("resize accepted");
    let done = finish(&client, &op).await;
    assert_eq!(done.status, OperationStatus::Succeeded, "{done:?}");
    let resized = read(&client, MON).await;
    assert_eq!(resized.vcpus.current, Some(2), "{resized:#?}");
    assert_eq!(resized.state, VmState::Running, "{resized:#?}");

    // A change that needs the held socket of the VM without a monitor
    // fails while the socket is still held, saying why: it never waits
    // for the socket (nor is it accepted and failed 10 s later).
    let refused = change_error(&client, client.pause(&vm(BARE)).await)
        .await
        .expect("pausing through a held socket cannot succeed");
    assert!(
        held_bare.is_held(),
        "the pause of {BARE} ended only after the socket was released: {refused}"
    );
    assert!(
        refused.to_lowercase().contains("socket"),
        "the reason names the socket: {refused}"
    );
    println!("pause of {BARE} with its socket held: {refused}");

    // Reads go on answering at once for as long as the socket is held.
    let note_due = held_at + QMP_TIMEOUT + Duration::from_secs(2);
    let mut rounds = 1;
    let mut last_age = first_age;
    while held_at.elapsed() < HOLD - Duration::from_secs(5) {
        last_age = check_round(
            list(&client).await,
            read(&client, MON).await,
            read(&client, BARE).await,
            Instant::now() > note_due,
        );
        rounds += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(held_mon.is_held() && held_bare.is_held(), "held throughout");
    assert!(
        last_age > first_age,
        "the age of {BARE}'s facts grows while its socket is held: {first_age} -> {last_age} ms"
    );
    println!(
        "{rounds} rounds of reads while both main sockets were held; {BARE}: {:?}",
        read(&client, BARE).await.live
    );

    // QEMU's own word once the sockets are free: two vCPUs, not paused.
    held_mon.release().await.expect("released");
    held_bare.release().await.expect("released");
    let cpus = rig
        .main_socket_command(MON, "query-cpus-fast", None)
        .await
        .expect("query-cpus-fast");
    assert_eq!(cpus.as_array().map(Vec::len), Some(2), "{cpus}");
    let status = rig
        .main_socket_command(BARE, "query-status", None)
        .await
        .expect("query-status");
    assert_eq!(status["status"], "running", "{status}");
    rig.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_holding_the_main_socket_reads_at_once_and_ends_as_it_ended() {
    const SLOW: &str = "slow-vm";
    const STUBBORN: &str = "stubborn-vm";
    let rig = MicrovmRig::with_vms(
        &[
            // The guest takes 3 s to power off: microvm-shutdown holds the
            // main socket that long.
            DeclaredVm::new(SLOW)
                .autostart()
                .powering_down_after(Duration::from_secs(3)),
            DeclaredVm::new(STUBBORN).autostart().ignoring_powerdown(),
        ],
        |_| {},
    )
    .await;
    let client = rig.server.client("admin").await;
    eventually(&client, SLOW, "monitored", monitored).await;
    eventually(&client, STUBBORN, "monitored", monitored).await;

    // A graceful stop, followed with Watch and read throughout.
    let since = snapshot(&client, &[SLOW]).await;
    let following = tokio::spawn(follow(client.clone(), since, SLOW, |i| {
        matches!(i.state, VmState::Stopped | VmState::Failed)
    }));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let op = client
        .shutdown(&vm(SLOW), false, None)
        .await
        .expect("stop accepted");
    let mut read_states = Vec::new();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let info = read(&client, SLOW).await;
        let vms = list(&client).await;
        assert_eq!(find(&vms, SLOW).state, info.state);
        read_states.push(info.state);
        let now = client.get_operation(op.id).await.expect("GetOperation");
        if now.status != OperationStatus::Running {
            break;
        }
        assert!(Instant::now() < deadline, "the stop never ended");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let done = finish(&client, &op).await;
    assert_eq!(done.status, OperationStatus::Succeeded, "{done:?}");
    let (states, last, _) = tokio::time::timeout(PATIENCE, following)
        .await
        .expect("the watch saw the end")
        .expect("watch task");
    println!("watch saw {states:?}; reads saw {read_states:?}");
    assert_eq!(last.state, VmState::Stopped, "{last:#?}");
    let stopping = states.iter().position(|s| *s == VmState::Stopping);
    assert!(
        stopping.is_some(),
        "running -> stopping -> stopped: {states:?}"
    );
    assert!(
        !states.contains(&VmState::Failed),
        "a graceful stop never reads failed: {states:?}"
    );
    assert!(
        read_states.contains(&VmState::Stopping),
        "reads during the stop answered with it: {read_states:?}"
    );
    assert!(
        rig.host.stopped_gracefully(SLOW),
        "microvm-shutdown saw QEMU exit while it held the socket"
    );
    assert_eq!(rig.active_state(SLOW).await, "inactive");
    let info = read(&client, SLOW).await;
    assert_eq!(info.state, VmState::Stopped, "{info:#?}");
    if let Some(exit) = &info.last_exit {
        assert_eq!(exit.result, "success", "a clean stop: {info:#?}");
    }

    // A guest that ignores the button: systemd's TimeoutStopSec ends the
    // stop. That is not a clean success.
    let op = client
        .shutdown(&vm(STUBBORN), false, None)
        .await
        .expect("stop accepted");
    let during = read(&client, STUBBORN).await;
    assert!(
        matches!(during.state, VmState::Running | VmState::Stopping),
        "{during:#?}"
    );
    let done = finish(&client, &op).await;
    match &done.status {
        OperationStatus::Failed(e) => {
            let reason = e.to_string();
            assert!(
                reason.to_lowercase().contains("time"),
                "the failure says it timed out: {reason}"
            );
        }
        other => panic!("a stop that timed out reads {other:?}"),
    }
    assert_eq!(rig.unit_property(STUBBORN, "Result").await, "timeout");
    assert_eq!(rig.active_state(STUBBORN).await, "failed");
    let info = read(&client, STUBBORN).await;
    assert_eq!(info.state, VmState::Failed, "{info:#?}");
    let exit = info.last_exit.as_ref().expect("last exit recorded");
    assert_eq!(exit.result, "timeout", "{info:#?}");
    assert!(!rig.host.stopped_gracefully(STUBBORN));
    rig.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_qemu_shows_at_once_restarts_and_is_monitored_again() {
    const CRASH: &str = "crash-vm";
    let rig = MicrovmRig::with_vms(&[DeclaredVm::new(CRASH).autostart()], |_| {}).await;
    let client = rig.server.client("admin").await;
    let before = eventually(&client, CRASH, "monitored", monitored).await;
    let restarts = before.restarts.expect("restarts counted");
    let old_pid = before.pid.expect("running QEMU has a PID");

    let since = snapshot(&client, &[CRASH]).await;
    let following = tokio::spawn(follow(client.clone(), since, CRASH, |i| {
        matches!(i.state, VmState::Restarting | VmState::Failed)
            && i.last_exit.as_ref().and_then(|e| e.signal) == Some(9)
    }));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pid = rig.kill_qemu(CRASH).await.expect("kill QEMU");
    assert_eq!(pid, old_pid);
    let killed_at = Instant::now();

    // The record, without waiting.
    let (states, seen, seen_at) = tokio::time::timeout(PATIENCE, following)
        .await
        .expect("the watch saw the crash")
        .expect("watch task");
    let info = read(&client, CRASH).await;
    let read_at = Instant::now();
    println!(
        "the watch saw {states:?} {:?} after the kill; the record read {} {:?} after it",
        seen_at.saturating_duration_since(killed_at),
        info.state,
        read_at.saturating_duration_since(killed_at)
    );
    assert!(
        seen_at.saturating_duration_since(killed_at) < AT_ONCE,
        "a pending watch showed the crash within 1 s"
    );
    assert!(
        read_at.saturating_duration_since(killed_at) < AT_ONCE,
        "read within 1 s of the kill"
    );
    assert!(
        matches!(info.state, VmState::Restarting | VmState::Failed),
        "{info:#?}"
    );
    let exit = info.last_exit.as_ref().expect("last exit");
    assert_eq!(exit.signal, Some(9), "{info:#?}");
    assert_eq!(seen.last_exit.as_ref().and_then(|e| e.signal), Some(9));

    // systemd restarts it after RestartSec; vmd attaches its monitor to
    // the new QEMU by itself.
    let after = eventually(&client, CRASH, "restarted and monitored", |i| {
        i.state == VmState::Running && monitored(i) && i.pid.is_some_and(|p| p != old_pid)
    })
    .await;
    assert_full_facts(&after);
    assert_eq!(after.restarts, Some(restarts + 1), "{after:#?}");
    assert_eq!(rig.unit_property(CRASH, "NRestarts").await, "1");
    assert_eq!(
        after.last_exit.as_ref().and_then(|e| e.signal),
        Some(9),
        "the crash stays recorded: {after:#?}"
    );
    // QEMU serves one client per socket: vmd holds its monitor, so it
    // greets nobody else.
    match QmpClient::connect(&rig.host.monitor_socket(CRASH), Duration::from_secs(2)).await {
        Err(QmpError::Timeout(_)) => {}
        other => panic!("vmd's monitor socket is not held by vmd: {other:?}"),
    }
    rig.server.stop().await;
}

/// A `vmd serve -c <config>` process under a `Type=notify`-like manager.
struct NotifiedDaemon {
    child: tokio::process::Child,
}

impl NotifiedDaemon {
    /// Starts vmd with `config` and returns once it sent `READY=1`.
    async fn start(config: &Path, notify_dir: &Path) -> Self {
        let socket_path = notify_dir.join("notify.sock");
        let _ = std::fs::remove_file(&socket_path);
        let notify = UnixDatagram::bind(&socket_path).expect("notify socket");
        // Its log, kept next to the config for a failing test's reader.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(notify_dir.join("vmd.log"))
            .expect("vmd log");
        let child = tokio::process::Command::new(vmd_tests::vmd())
            .arg("serve")
            .arg("-c")
            .arg(config)
            .env("NOTIFY_SOCKET", &socket_path)
            .env_remove("RUST_LOG")
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("vmd starts");
        let mut buf = vec![0u8; 4096];
        let ready = async {
            loop {
                let len = notify.recv(&mut buf).await.expect("recv");
                if String::from_utf8_lossy(&buf[..len])
                    .lines()
                    .any(|l| l == "READY=1")
                {
                    return;
                }
            }
        };
        tokio::time::timeout(PATIENCE, ready)
            .await
            .expect("vmd sends READY=1");
        Self { child }
    }

    /// SIGTERM and a clean exit.
    async fn stop(mut self) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill runs");
        assert!(status.success());
        let status = tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("vmd stops")
            .expect("exit status");
        assert!(status.success(), "vmd exited with {status}");
    }
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address").port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_list_after_a_restart_of_vmd_is_right() {
    const PAUSED: &str = "paused-vm";
    const BARE: &str = "bare-vm";
    const IDLE: &str = "idle-vm";
    // The host without the rig's vmd: here vmd runs as the daemon it is
    // (a process that says READY), never in the test's process, so
    // nothing of an earlier run outlives it.
    let host = MicrovmHost::new(&[
        DeclaredVm::new(PAUSED).autostart(),
        DeclaredVm::new(BARE).autostart().without_monitor(),
        DeclaredVm::new(IDLE),
    ]);
    let container = host.container().boot().await;
    container.systemctl(&["start", "microvms.target"]).await;
    wait_for_qmp(&host.socket(PAUSED)).await;
    wait_for_qmp(&host.monitor_socket(PAUSED)).await;
    wait_for_qmp(&host.socket(BARE)).await;
    let pki = TestPki::new();
    let port = free_port();
    let config = pki.scratch().join("vmd.toml");
    let tls = pki.server_paths();
    std::fs::write(
        &config,
        format!(
            r#"
[listen]
tcp = ["127.0.0.1:{port}"]
[listen.vsock]
enable = false
[tls]
ca = {ca:?}
cert = {cert:?}
key = {key:?}
[vms]
state_dir = {state:?}
inventory = {inventory:?}
systemd_bus = {bus:?}
[[policy.identity]]
name = "admin"
role = "admin"
vms = ["*"]
"#,
            ca = tls.ca.display().to_string(),
            cert = tls.cert.display().to_string(),
            key = tls.key.display().to_string(),
            state = host.state_dir().display().to_string(),
            inventory = host.inventory().display().to_string(),
            bus = container.bus_address(),
        ),
    )
    .expect("config");
    let endpoint = Endpoint::Tcp {
        host: "127.0.0.1".into(),
        port,
    };
    let admin = pki.client("admin");

    // The first run: pause one VM and give it a second vCPU.
    let daemon = NotifiedDaemon::start(&config, pki.scratch()).await;
    let client = Client::connect(&endpoint, &admin).await.expect("connect");
    eventually(&client, PAUSED, "monitored", monitored).await;
    let op = client
        .resize(&vm(PAUSED), Some(2), None)
        .await
        .expect("resize");
    assert_eq!(
        finish(&client, &op).await.status,
        OperationStatus::Succeeded
    );
    let op = client.pause(&vm(PAUSED)).await.expect("pause");
    assert_eq!(
        finish(&client, &op).await.status,
        OperationStatus::Succeeded
    );
    drop(client);
    daemon.stop().await;

    // The second run: the first ListVms after READY=1.
    let daemon = NotifiedDaemon::start(&config, pki.scratch()).await;
    let client = Client::connect(&endpoint, &admin).await.expect("connect");
    let vms = client.list_vms().await.expect("ListVms");
    println!("first ListVms after READY: {vms:#?}");
    let paused = find(&vms, PAUSED);
    assert_eq!(paused.state, VmState::Paused, "{paused:#?}");
    assert_eq!(paused.run_state.as_deref(), Some("paused"), "{paused:#?}");
    assert_eq!(paused.vcpus.current, Some(2), "{paused:#?}");
    assert_full_facts(paused);
    // Without a monitor its live facts come later, from the shared socket
    // in the background; its state and process are right at once.
    let bare = find(&vms, BARE);
    assert_eq!(bare.state, VmState::Running, "{bare:#?}");
    assert_ne!(bare.live.source, LiveSource::Monitor, "{bare:#?}");
    assert!(bare.pid.is_some(), "{bare:#?}");
    let idle = find(&vms, IDLE);
    assert_eq!(idle.state, VmState::Stopped, "{idle:#?}");
    assert_eq!(idle.live.source, LiveSource::None, "{idle:#?}");
    assert_eq!(idle.pid, None);
    // QEMU agrees.
    let status = QmpClient::connect(&host.socket(PAUSED), Duration::from_secs(10))
        .await
        .expect("main socket")
        .execute("query-status", None)
        .await
        .expect("query-status");
    assert_eq!(status["status"], "paused", "{status}");
    drop(client);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_needed_and_resources_follow_the_host() {
    const RES: &str = "res-vm";
    let resources = DeclaredResources {
        taps: vec!["vm-res".into()],
        macvtaps: vec![Macvtap {
            id: "mvt-res".into(),
            mac: "02:00:00:00:00:05".into(),
            link: "eth0".into(),
            mode: "bridge".into(),
        }],
        shares: vec![
            ("ro-store".into(), "/nix/store".into()),
            ("data".into(), "/var/lib/res-data".into()),
        ],
        pci_devices: vec!["0000:00:02.0".into()],
        usb_devices: vec!["vendorid=0x0bda,productid=0x8153".into()],
    };
    let rig = MicrovmRig::with_vms(
        &[DeclaredVm::new(RES).autostart().with_resources(resources)],
        |_| {},
    )
    .await;
    let client = rig.server.client("admin").await;
    eventually(&client, RES, "monitored", monitored).await;
    let info_json = || async {
        serde_json::from_str::<Value>(&rig.vmctl_ok(&["info", RES, "--json"]).await)
            .expect("info --json is JSON")
    };

    // share/microvm, as vmctl shows it.
    let info = info_json().await;
    let r = &info["resources"];
    let interfaces = r["interfaces"].as_array().cloned().unwrap_or_default();
    assert!(
        interfaces
            .iter()
            .any(|i| i["name"] == "vm-res" && i["kind"] == "tap"),
        "{r}"
    );
    assert!(
        interfaces.iter().any(|i| i["name"] == "mvt-res"
            && i["kind"] == "macvtap"
            && i["mac"] == "02:00:00:00:00:05"),
        "{r}"
    );
    assert_eq!(interfaces.len(), 2, "{r}");
    let shares = r["shares"].as_array().cloned().unwrap_or_default();
    assert!(
        shares
            .iter()
            .any(|s| s["tag"] == "ro-store" && s["source"] == "/nix/store"),
        "{r}"
    );
    assert!(
        shares
            .iter()
            .any(|s| s["tag"] == "data" && s["source"] == "/var/lib/res-data"),
        "{r}"
    );
    assert_eq!(r["pci_devices"], json!(["0000:00:02.0"]), "{r}");
    assert_eq!(
        r["usb_devices"],
        json!(["vendorid=0x0bda,productid=0x8153"]),
        "{r}"
    );
    assert_eq!(info["restart_needed"], false, "{info}");

    // A USB tablet added by another client (as vhotplug does) shows, and
    // goes when that client deletes it.
    let has_tablet = |i: &VmInfo| {
        i.resources.runtime_devices.as_ref().is_some_and(|d| {
            d.iter()
                .any(|d| d.id == "tablet0" && d.driver == "usb-tablet")
        })
    };
    assert!(!has_tablet(&read(&client, RES).await));
    rig.main_socket_command(
        RES,
        "device_add",
        Some(json!({ "driver": "usb-tablet", "id": "tablet0" })),
    )
    .await
    .expect("device_add usb-tablet");
    eventually(&client, RES, "showed the tablet", has_tablet).await;
    let info = info_json().await;
    let runtime = info["resources"]["runtime_devices"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        runtime
            .iter()
            .any(|d| d["id"] == "tablet0" && d["driver"] == "usb-tablet"),
        "{info}"
    );
    rig.main_socket_command(RES, "device_del", Some(json!({ "id": "tablet0" })))
        .await
        .expect("device_del");
    eventually(&client, RES, "dropped the tablet", |i| {
        i.resources.runtime_devices.is_some() && !has_tablet(i)
    })
    .await;

    // A rebuild installs a new runner: the running VM needs a restart.
    let new_runner = rig.switch_current(RES).expect("switch current");
    assert_ne!(rig.host.booted(RES), Some(new_runner.clone()));
    eventually(&client, RES, "needed a restart", |i| {
        i.restart_needed == Some(true)
    })
    .await;
    assert_eq!(info_json().await["restart_needed"], true);
    rig.vmctl_ok(&["restart", RES, "--wait"]).await;
    assert_eq!(rig.host.booted(RES), Some(new_runner), "booted follows");
    let info = eventually(&client, RES, "no longer needed a restart", |i| {
        i.restart_needed == Some(false) && i.state == VmState::Running
    })
    .await;
    assert_eq!(info_json().await["restart_needed"], false);
    println!("after the restart: {:?} {:?}", info.state, info.live);
    rig.server.stop().await;
}

/// A balloon moves only when a guest driver gives memory back, so this
/// VM boots the guest suite's Debian kernel (a busybox initramfs that
/// loads `virtio_balloon`) under its unit: the test runs with
/// `guest-tests` (which fetches that kernel) as well as `system-tests`.
#[cfg(feature = "guest-tests")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balloon_set_by_another_client_wakes_a_watch() {
    use vmd_tests::guest::{GuestKernel, Initramfs, KERNEL_APPEND};
    use vmd_tests::microvm::CONTAINER_STATE_DIR;
    const BALLOON: &str = "balloon-vm";
    const GUEST_DIR: &str = "/run/vmd-test/guest";
    const READY: &str = "VMD-BALLOON-READY";

    let kernel = GuestKernel::ready().await;
    let guest_dir = tempfile::tempdir().expect("temporary directory");
    std::fs::copy(&kernel.kernel, guest_dir.path().join("vmlinux")).expect("copy the kernel");
    Initramfs::bare(&kernel)
        .script(&format!(
            "insmod /lib/modules/virtio_balloon.ko && echo {READY} || echo 'insmod virtio_balloon failed'\n\
             while true; do sleep 60; done\n"
        ))
        .write(&guest_dir.path().join("initramfs.cpio"));
    let args: Vec<String> = [
        "-accel",
        "tcg",
        "-M",
        "pc",
        "-nodefaults",
        "-display",
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
        "-append",
        KERNEL_APPEND,
    ]
    .into_iter()
    .map(str::to_owned)
    .chain([
        "-serial".to_owned(),
        format!("file:{CONTAINER_STATE_DIR}/{BALLOON}/console.log"),
        "-kernel".to_owned(),
        format!("{GUEST_DIR}/vmlinux"),
        "-initrd".to_owned(),
        format!("{GUEST_DIR}/initramfs.cpio"),
    ])
    .collect();
    let rig = MicrovmRig::with_container(
        &[DeclaredVm {
            qemu_args: Some(args),
            ..DeclaredVm::new(BALLOON).autostart()
        }],
        |builder| builder.bind_ro(guest_dir.path(), GUEST_DIR),
        |_| {},
    )
    .await;
    let console = rig.host.state_dir().join(BALLOON).join("console.log");
    let deadline = Instant::now() + PATIENCE * 3;
    loop {
        let text = std::fs::read(&console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        if text.contains(READY) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the guest never loaded its balloon driver:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let client = rig.server.client("admin").await;
    let before = eventually(&client, BALLOON, "monitored", monitored).await;
    assert_eq!(
        before.memory.balloon_actual,
        Some(Bytes::mib(256)),
        "{before:#?}"
    );

    // Another client (microvm-balloon, ghaf-mem-manager) sets the
    // balloon through the main socket; only held watches follow it.
    let since = snapshot(&client, &[BALLOON]).await;
    let target = Bytes::mib(192);
    let following = tokio::spawn(follow(client.clone(), since, BALLOON, move |i| {
        i.memory.balloon_actual == Some(target)
    }));
    tokio::time::sleep(Duration::from_millis(200)).await;
    rig.main_socket_command(BALLOON, "balloon", Some(json!({ "value": 192u64 << 20 })))
        .await
        .expect("balloon through the main socket");
    let (states, seen, _) = tokio::time::timeout(PATIENCE, following)
        .await
        .expect("a watch saw the balloon move")
        .expect("watch task");
    println!("watch answers: {states:?}, last {:?}", seen.memory);
    let info = read(&client, BALLOON).await;
    assert_eq!(info.memory.balloon_actual, Some(target), "{info:#?}");
    let balloon = rig
        .main_socket_command(BALLOON, "query-balloon", None)
        .await
        .expect("query-balloon");
    assert_eq!(balloon["actual"], 192u64 << 20, "QEMU agrees: {balloon}");
    rig.server.stop().await;
}
