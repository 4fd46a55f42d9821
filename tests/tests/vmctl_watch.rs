//! `vmctl watch` and `vmctl top` against a real microvm host (systemd in
//! nspawn running QEMU, see [`vmd_tests::rig`]): the real `vmctl` binary
//! follows VMs that another process starts and stops, `watch` on its
//! stdout, `top` on a terminal that tmux emulates.

#![cfg(feature = "system-tests")]

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::ChildStdout;
use vmd_tests::rig::{AUTO, COLD, GUARDED, MicrovmRig};
use vmd_tests::tmux::TmuxSession;

/// How long anything here may take before the test gives up (a limit on
/// waiting, not a claim about speed).
const PATIENCE: Duration = Duration::from_secs(60);

/// The next line of `vmctl watch --json`, parsed; `None` at the end.
async fn next_json(lines: &mut Lines<BufReader<ChildStdout>>) -> Option<Value> {
    let line = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .expect("vmctl watch printed nothing more")
        .expect("read vmctl's stdout")?;
    Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}")))
}

/// Sends SIGINT to a process, as Ctrl-C in its terminal would.
async fn interrupt(pid: u32) {
    let status = tokio::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .await
        .expect("kill runs");
    assert!(status.success(), "kill -INT {pid}");
}

#[tokio::test]
async fn vmctl_watch_prints_the_vms_then_their_changes() {
    let rig = MicrovmRig::start(|_| {}).await;

    // --count 0: the current state of every VM, then exit.
    let out = rig.vmctl_ok(&["watch", "--json", "--count", "0"]).await;
    let snapshot: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    let names: Vec<&str> = snapshot.iter().filter_map(|v| v["name"].as_str()).collect();
    assert_eq!(names, [GUARDED, AUTO, COLD], "sorted by name: {out}");
    assert_eq!(snapshot[1]["state"], "running");
    assert_eq!(snapshot[2]["state"], "stopped");

    // Another process starts cold-vm: the watch shows it running.
    let mut watch = rig
        .vmctl_command("reader", &["watch", "--json", COLD])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("vmctl watch starts");
    let mut lines = BufReader::new(watch.stdout.take().expect("stdout")).lines();
    let first = next_json(&mut lines).await.expect("the snapshot line");
    assert_eq!(
        (&first["name"], &first["state"]),
        (&COLD.into(), &"stopped".into())
    );
    // --wait: the start ends once vmd's monitor has the VM's live facts,
    // which the next watch's first line shows.
    rig.vmctl_ok(&["start", "--wait", COLD]).await;
    loop {
        let line = next_json(&mut lines)
            .await
            .expect("a line for cold-vm running");
        assert_eq!(line["name"], COLD, "only the watched VM: {line}");
        if line["state"] == "running" {
            assert!(line["pid"].as_u64().is_some(), "{line}");
            // Its live facts come with it or in a later line (vmd's own
            // monitor attaches once QEMU runs); the next watch's first
            // line shows them.
            if line["vcpus"]["current"] == 1 {
                break;
            }
        }
    }
    assert_eq!(rig.active_state(COLD).await, "active");
    // Ctrl-C ends it with success.
    interrupt(watch.id().expect("still running")).await;
    let status = tokio::time::timeout(PATIENCE, watch.wait())
        .await
        .expect("vmctl watch exits on SIGINT")
        .expect("wait");
    assert!(status.success(), "{status}");

    // --count 1 (human lines): exits by itself after one change line.
    let mut watch = rig
        .vmctl_command("reader", &["watch", "--count", "1", COLD])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("vmctl watch starts");
    let mut lines = BufReader::new(watch.stdout.take().expect("stdout")).lines();
    let first = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .expect("the snapshot line")
        .expect("read")
        .expect("a line");
    assert!(first.starts_with("cold-vm  running  vcpus 1/1"), "{first}");
    rig.vmctl_ok(&["stop", COLD]).await;
    let change = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .expect("a change line")
        .expect("read")
        .expect("a line");
    assert!(change.starts_with("cold-vm  "), "{change}");
    let rest = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .expect("vmctl watch ends after --count lines")
        .expect("read");
    assert_eq!(rest, None);
    let status = watch.wait().await.expect("wait");
    assert!(status.success(), "{status}");
    rig.server.stop().await;
}

/// The table row of `vm` on a `vmctl top` screen, if it is shown.
fn row<'a>(screen: &'a str, vm: &str) -> Option<&'a str> {
    screen.lines().find(|line| {
        line.trim_start_matches(['>', ' '])
            .starts_with(&format!("{vm} "))
    })
}

fn row_shows(screen: &str, vm: &str, state: &str) -> bool {
    row(screen, vm).is_some_and(|r| r.split_whitespace().any(|word| word == state))
}

#[tokio::test]
async fn vmctl_top_follows_changes_and_acts_on_the_selected_vm() {
    let rig = MicrovmRig::start(|_| {}).await;
    let top = TmuxSession::start(160, 40, &rig.vmctl_argv("admin", &["top"]));

    // Every VM with its state.
    let screen = top
        .wait_for("the three VMs", PATIENCE, |s| {
            row_shows(s, AUTO, "running")
                && row_shows(s, COLD, "stopped")
                && row_shows(s, GUARDED, "running")
        })
        .await;
    assert!(screen.contains("3 VMs"), "{screen}");

    // Another process starts cold-vm: its row turns running.
    rig.vmctl_ok(&["start", COLD, "--wait"]).await;
    top.wait_for("cold-vm running", PATIENCE, |s| {
        row_shows(s, COLD, "running")
    })
    .await;

    // The first row (admin-vm, protected) is selected: stopping it is
    // refused, and the refusal shows in the status line.
    top.keys(&["x"]);
    top.wait_for("the refusal", PATIENCE, |s| {
        s.contains("stop admin-vm: forbidden")
    })
    .await;
    assert_eq!(rig.active_state(GUARDED).await, "active");

    // Down twice selects cold-vm; x stops it, through vmd and systemd.
    top.keys(&["Down", "Down", "x"]);
    let screen = top
        .wait_for("cold-vm stopped by top", PATIENCE, |s| {
            row_shows(s, COLD, "stopped") && s.contains("succeeded")
        })
        .await;
    assert!(screen.contains("shutdown  cold-vm  succeeded"), "{screen}");
    assert_eq!(rig.active_state(COLD).await, "inactive");
    assert!(rig.host.stopped_gracefully(COLD), "ExecStop did not run");

    // q quits, restoring the terminal, with exit status 0.
    top.keys(&["q"]);
    let screen = top
        .wait_for("vmctl's exit", PATIENCE, |s| s.contains("exited with"))
        .await;
    assert!(screen.contains("exited with 0"), "{screen}");
    assert!(row(&screen, AUTO).is_none(), "the table is gone: {screen}");
    drop(top);
    rig.server.stop().await;
}
