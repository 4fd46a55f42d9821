//! vmd against a real microvm host: systemd booted in systemd-nspawn runs
//! `microvm@NAME.service` units whose ExecStart is real QEMU (TCG, no guest
//! OS) with a QMP socket, and whose ExecStop powers down over QMP. vmd on
//! this machine reads the same state directory, talks to the container's
//! systemd over its bus and to QEMU over QMP; `vmctl` and the client
//! library drive it. Every claim vmd makes is checked independently:
//! systemd's state through `systemctl` inside the container, QEMU's through
//! a raw QMP session.

#![cfg(feature = "system-tests")]

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use vmd_client::{Client, ClientError};
use vmd_proto::{ErrorReply, OperationStatus, VmName, VmState};
use vmd_tests::microvm::DeclaredVm;
use vmd_tests::rig::{AUTO, COLD, GUARDED, MicrovmRig};

/// The three-VM rig (autostarted, stopped, protected) with `adjust` applied
/// to vmd's config.
async fn rig(adjust: impl FnOnce(&mut vmd::Config)) -> MicrovmRig {
    MicrovmRig::start(adjust).await
}

/// One raw QMP command, outside vmd.
async fn qmp(socket: &Path, command: &str) -> Value {
    let stream = UnixStream::connect(socket).await.expect("QMP socket");
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    lines
        .next_line()
        .await
        .expect("greeting")
        .expect("greeting line");
    for cmd in ["qmp_capabilities", command] {
        let mut line = json!({ "execute": cmd }).to_string();
        line.push('\n');
        write.write_all(line.as_bytes()).await.expect("send");
        loop {
            let reply: Value =
                serde_json::from_str(&lines.next_line().await.expect("reply").expect("line"))
                    .expect("JSON");
            if let Some(ret) = reply.get("return") {
                if cmd == command {
                    return ret.clone();
                }
                break;
            }
            assert!(reply.get("error").is_none(), "{cmd}: {reply}");
        }
    }
    unreachable!("the loop returns the command's reply")
}

/// Re-reads a VM until `done` holds for it; fails after 30 s.
async fn eventually(
    client: &Client,
    name: &str,
    done: impl Fn(&vmd_proto::VmInfo) -> bool,
) -> vmd_proto::VmInfo {
    let read = async {
        loop {
            let info = client.get_vm(&vm(name)).await.expect("get");
            if done(&info) {
                return info;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .unwrap_or_else(|_| panic!("{name} never reached the expected state"))
}

fn vm(name: &str) -> VmName {
    VmName::new(name).expect("valid")
}

fn list_json(stdout: &str) -> Vec<Value> {
    serde_json::from_str::<Value>(stdout)
        .expect("list --json is JSON")
        .as_array()
        .expect("an array")
        .clone()
}

fn find<'a>(vms: &'a [Value], name: &str) -> &'a Value {
    vms.iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("{name} missing from {vms:?}"))
}

#[tokio::test]
async fn vmctl_sees_and_changes_real_vms() {
    let rig = rig(|_| {}).await;

    // The true states, and what systemd says.
    let vms = list_json(&rig.vmctl_ok(&["list", "--json"]).await);
    assert_eq!(vms.len(), 3);
    assert_eq!(find(&vms, AUTO)["state"], "running");
    assert_eq!(find(&vms, AUTO)["autostart"], true);
    assert_eq!(find(&vms, AUTO)["vcpus"]["current"], 1);
    assert_eq!(find(&vms, AUTO)["vcpus"]["max"], 4);
    assert_eq!(find(&vms, AUTO)["memory"]["current"], 256 << 20);
    assert!(find(&vms, AUTO)["pid"].as_u64().is_some());
    assert_eq!(find(&vms, COLD)["state"], "stopped");
    assert_eq!(find(&vms, COLD)["autostart"], false);
    assert_eq!(find(&vms, COLD)["pid"], Value::Null);
    assert_eq!(find(&vms, GUARDED)["protected"], true);
    assert_eq!(rig.active_state(COLD).await, "inactive");
    let table = rig.vmctl_ok(&["list"]).await;
    assert!(table.contains(AUTO) && table.contains("running") && table.contains("stopped"));

    // Start: systemd itself reports the unit active.
    let out = rig.vmctl_ok(&["start", COLD, "--wait"]).await;
    assert!(out.contains("succeeded"), "{out}");
    assert_eq!(rig.active_state(COLD).await, "active");
    let info: Value =
        serde_json::from_str(&rig.vmctl_ok(&["info", COLD, "--json"]).await).expect("JSON");
    assert_eq!(info["state"], "running");

    // Resize vCPUs: QEMU itself reports three.
    rig.vmctl_ok(&["resize", COLD, "--vcpus", "3", "--wait"])
        .await;
    let cpus = qmp(&rig.host.socket(COLD), "query-cpus-fast").await;
    assert_eq!(cpus.as_array().map(Vec::len), Some(3), "{cpus}");
    // Beyond the declared maximum: refused, nothing changes.
    let out = rig.vmctl("admin", &["resize", COLD, "--vcpus", "5"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("maximum of 4"));

    // Balloon: QEMU accepts the target (the guest-visible effect needs a
    // guest kernel, so `actual` stays at boot size here).
    let out = rig
        .vmctl_ok(&["resize", COLD, "--memory", "128M", "--wait"])
        .await;
    assert!(out.contains("succeeded"), "{out}");
    let balloon = qmp(&rig.host.socket(COLD), "query-balloon").await;
    assert_eq!(balloon["actual"], 256 << 20, "{balloon}");

    // Pause and resume: QEMU's run state.
    rig.vmctl_ok(&["pause", AUTO, "--wait"]).await;
    assert_eq!(
        qmp(&rig.host.socket(AUTO), "query-status").await["status"],
        "paused"
    );
    let info: Value =
        serde_json::from_str(&rig.vmctl_ok(&["info", AUTO, "--json"]).await).expect("JSON");
    assert_eq!(info["state"], "paused");
    rig.vmctl_ok(&["resume", AUTO, "--wait"]).await;
    assert_eq!(
        qmp(&rig.host.socket(AUTO), "query-status").await["status"],
        "running"
    );

    // Stop runs the unit's own ExecStop (the graceful QMP power-down).
    rig.vmctl_ok(&["stop", COLD, "--wait"]).await;
    assert_eq!(rig.active_state(COLD).await, "inactive");
    assert!(rig.host.stopped_gracefully(COLD), "ExecStop did not run");

    // The protected VM: visible, never changed.
    let out = rig.vmctl("admin", &["restart", GUARDED]).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("forbidden") && stderr.contains("protected"),
        "{stderr}"
    );
    assert_eq!(rig.active_state(GUARDED).await, "active");

    // Roles: an operator may not resize; a reader may not start.
    let out = rig
        .vmctl("operator", &["resize", AUTO, "--vcpus", "2"])
        .await;
    assert_eq!(out.status.code(), Some(1));
    let out = rig.vmctl("someone", &["start", COLD]).await;
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(rig.active_state(COLD).await, "inactive");
    // And `whoami` says so before anyone tries: the operator may change
    // every VM but the protected one; the reader none.
    let out = rig.vmctl("operator", &["whoami", "--json"]).await;
    let rights: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(rights["identity"], "operator");
    assert_eq!(rights["role"], "operator");
    assert_eq!(rights["changeable"], serde_json::json!([AUTO, COLD]));
    let out = rig.vmctl("someone", &["whoami"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("role        reader") && text.contains("may change  -"),
        "{text}"
    );

    // Start of a running VM: a clear refusal, nothing done.
    let out = rig.vmctl("admin", &["start", AUTO]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already running"));
    rig.server.stop().await;
}

#[tokio::test]
async fn concurrent_changes_get_exactly_one_accept() {
    let rig = rig(|_| {}).await;
    let client = rig.server.client("admin").await;
    let name = vm(COLD);
    let attempts = (0..20).map(|i| {
        let (client, name) = (client.clone(), name.clone());
        async move {
            if i % 2 == 0 {
                client.start(&name).await
            } else {
                client.shutdown(&name, false, None).await
            }
        }
    });
    let results = futures_util::future::join_all(attempts).await;
    let accepted: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(accepted.len(), 1, "{results:?}");
    for result in &results {
        match result {
            Ok(_) => {}
            Err(ClientError::Server(ErrorReply::Busy { vm, .. })) => assert_eq!(vm, COLD),
            Err(e) => panic!("expected busy, got {e:?}"),
        }
    }
    let op = accepted[0].clone();
    // Reads answer while the change runs.
    let info = client.get_vm(&name).await.expect("GetVm during a change");
    assert_eq!(info.name, name);
    let done = client.wait_operation(op.id, 60_000).await.expect("wait");
    assert_eq!(done.status, OperationStatus::Succeeded, "{done:?}");
    // A consistent end state: vmd and systemd agree.
    let state = client.get_vm(&name).await.expect("get").state;
    let systemd = rig.active_state(COLD).await;
    assert!(
        (state == VmState::Running && systemd == "active")
            || (state == VmState::Stopped && systemd == "inactive"),
        "vmd says {state}, systemd says {systemd}"
    );

    // During a slow change (the graceful stop takes a while), GetVm
    // answers and shows the VM busy with it.
    let running = vm(AUTO);
    let stop = client
        .shutdown(&running, false, None)
        .await
        .expect("accepted");
    let info = client.get_vm(&running).await.expect("GetVm during stop");
    if let Some(pending) = info.pending {
        assert_eq!(pending.kind, vmd_proto::OperationKind::Shutdown);
    }
    client.wait_operation(stop.id, 60_000).await.expect("wait");
    rig.server.stop().await;
}

#[tokio::test]
async fn faults_are_reported_not_hung() {
    // A declared VM whose control socket accepts and never answers.
    let mute_dir = tempfile::tempdir().expect("tempdir");
    let mute_socket = mute_dir.path().join("mute.sock");
    let listener = tokio::net::UnixListener::bind(&mute_socket).expect("bind");
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    // The inventory names the mute socket as auto-vm's shared control
    // socket, and auto-vm has no monitor of vmd's own (a hand-made host).
    let rig = MicrovmRig::with_vms(
        &[
            DeclaredVm {
                inventory_control_socket: Some(mute_socket.clone()),
                ..DeclaredVm::new(AUTO).autostart().without_monitor()
            },
            DeclaredVm::new(COLD),
            DeclaredVm::new(GUARDED).autostart().protected(),
        ],
        |c| c.vms.qmp_timeout = Duration::from_secs(2),
    )
    .await;
    let client = rig.server.client("admin").await;

    // The mute socket: a change that needs it is refused at once, with a
    // reason; nothing is accepted to fail later.
    match client.pause(&vm(AUTO)).await {
        Err(ClientError::Server(ErrorReply::Unavailable { reason })) => {
            assert!(reason.contains("held by another client"), "{reason}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    // Reads answer at once, saying why the facts are missing.
    let info = client.get_vm(&vm(AUTO)).await.expect("get");
    assert_eq!(info.state, VmState::Running);
    holder.abort();

    // QEMU killed with SIGKILL: the VM reads as crashed (restarting, as
    // microvm.nix's units have Restart=always, or failed), promptly.
    let pid = client.get_vm(&vm(COLD)).await.expect("get").pid;
    assert_eq!(pid, None, "cold-vm is stopped");
    let op = client.start(&vm(COLD)).await.expect("accepted");
    let done = client.wait_operation(op.id, 60_000).await.expect("wait");
    assert_eq!(done.status, OperationStatus::Succeeded, "{done:?}");
    let info = client.get_vm(&vm(COLD)).await.expect("get");
    let pid = info.pid.expect("running QEMU has a PID").to_string();
    let out = rig.container.exec("kill", &["-KILL", &pid]).await;
    assert!(out.status.success(), "{out:?}");
    let state = eventually(&client, COLD, |i| i.state != VmState::Running)
        .await
        .state;
    assert!(
        matches!(state, VmState::Restarting | VmState::Failed),
        "{state}"
    );
    // systemd starts it again after RestartSec; vmd follows.
    eventually(&client, COLD, |i| i.state == VmState::Running).await;
    let restarts = rig.unit_property(COLD, "NRestarts").await;
    assert_eq!(restarts, "1", "systemd restarted it once");
    // Stopped again, for the rest of the test.
    rig.vmctl_ok(&["stop", COLD, "--wait"]).await;
    assert_eq!(rig.active_state(COLD).await, "inactive");

    // systemd's bus gone: changes answer Unavailable, reads say unknown.
    rig.container.stop_bus().await;
    match client.start(&vm(COLD)).await {
        Err(ClientError::Server(ErrorReply::Unavailable { reason })) => {
            assert!(reason.contains("systemd"), "{reason}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert_eq!(
        client.get_vm(&vm(COLD)).await.expect("get").state,
        VmState::Unknown
    );
    // And vmd recovers when it is back.
    rig.container.start_bus().await;
    let op = client
        .start(&vm(COLD))
        .await
        .expect("accepted after recovery");
    let done = client.wait_operation(op.id, 60_000).await.expect("wait");
    assert_eq!(done.status, OperationStatus::Succeeded, "{done:?}");
    assert_eq!(rig.active_state(COLD).await, "active");
    rig.server.stop().await;
}
