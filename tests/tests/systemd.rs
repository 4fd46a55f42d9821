//! The systemd backend against a real systemd (booted in systemd-nspawn):
//! unit state, start/stop/restart/kill through jobs and signals, failures,
//! deadlines, a hung bus, and losing and regaining the bus.
//!
//! Every state the backend reports is also read independently with
//! `systemctl show` inside the container, which reaches systemd on its
//! private socket without D-Bus.

#![cfg(feature = "system-tests")]

use std::collections::HashMap;
use std::time::Duration;

use vmd::drivers::systemd::Systemd;
use vmd::drivers::{ActiveState, BackendError, UnitStatus, Units};
use vmd_tests::nspawn::SystemdContainer;

/// A stand-in for microvm.nix's template: a long-running main process,
/// a graceful `ExecStop` that leaves a marker where the host can see it.
const MICROVM_TEMPLATE: &str = "\
[Unit]
Description=MicroVM '%i'

[Service]
ExecStartPre=/bin/mkdir -p /var/lib/microvms/%i
ExecStart=/bin/sleep infinity
ExecStop=/bin/touch /var/lib/microvms/%i/exec-stop
";

const MICROVMS_TARGET: &str = "\
[Unit]
Description=MicroVMs started at boot
Wants=microvm@vm1.service
";

/// Its start job fails: `ExecStartPre` fails.
const BROKEN_SERVICE: &str = "\
[Service]
ExecStartPre=/bin/false
ExecStart=/bin/sleep infinity
";

/// Its start job takes half a minute.
const SLOW_SERVICE: &str = "\
[Service]
ExecStartPre=/bin/sleep 30
ExecStart=/bin/sleep infinity
";

/// Deadline for jobs that should finish at once.
const DEADLINE: Duration = Duration::from_secs(30);

/// Bounds a backend call so a hang fails the test instead of stalling it.
const NO_HANG: Duration = Duration::from_secs(20);

async fn boot() -> SystemdContainer {
    let container = SystemdContainer::builder()
        .unit("microvm@.service", MICROVM_TEMPLATE)
        .unit("microvms.target", MICROVMS_TARGET)
        .unit("broken.service", BROKEN_SERVICE)
        .unit("slow.service", SLOW_SERVICE)
        .boot()
        .await;
    eprintln!(
        "{}: systemd up in {:?}",
        container.machine(),
        container.boot_time()
    );
    container
}

fn backend(container: &SystemdContainer) -> Systemd {
    Systemd::new(Some(container.bus_address()))
}

/// The unit as `systemctl show` (no D-Bus) sees it.
async fn show(container: &SystemdContainer, unit: &str) -> HashMap<String, String> {
    let out = container
        .systemctl(&[
            "show",
            "--timestamp=unix",
            "--property=LoadState,ActiveState,SubState,MainPID,ActiveEnterTimestamp,\
             NRestarts,Result,ControlGroup,FreezerState,Wants",
            unit,
        ])
        .await;
    out.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// A `systemctl show` counter: `[not set]` is `None`.
fn counter(shown: &HashMap<String, String>, name: &str) -> Option<u64> {
    let value = &shown[name];
    (value != "[not set]").then(|| value.parse().unwrap_or_else(|_| panic!("{name}={value}")))
}

async fn status(systemd: &Systemd, unit: &str) -> UnitStatus {
    tokio::time::timeout(NO_HANG, systemd.status(unit))
        .await
        .expect("status answers")
        .unwrap_or_else(|e| panic!("status {unit}: {e}"))
}

/// Asserts the backend's status agrees with `systemctl show`.
async fn assert_agrees(container: &SystemdContainer, status: &UnitStatus, unit: &str) {
    let shown = show(container, unit).await;
    if status.load_state == vmd::drivers::NOT_LOADED {
        // vmd never loads a unit to read it; `systemctl show` does, and a
        // unit systemd had unloaded is inactive.
        assert_eq!(*status, UnitStatus::not_loaded(), "{unit}");
        assert_eq!(shown["ActiveState"], "inactive", "{unit}");
        return;
    }
    assert_eq!(status.load_state, shown["LoadState"], "{unit}");
    assert_eq!(
        status.active_state,
        ActiveState::parse(&shown["ActiveState"]),
        "{unit}"
    );
    assert_eq!(status.sub_state, shown["SubState"], "{unit}");
    let pid: u32 = shown["MainPID"].parse().expect("MainPID");
    assert_eq!(status.main_pid, (pid != 0).then_some(pid), "{unit}");
    let entered = shown["ActiveEnterTimestamp"]
        .strip_prefix('@')
        .map(|secs| secs.parse::<u64>().expect("unix timestamp"));
    assert_eq!(
        status.active_enter_usec.map(|us| us / 1_000_000),
        entered,
        "{unit}"
    );
    assert_eq!(
        status.n_restarts.map(u64::from),
        counter(&shown, "NRestarts"),
        "{unit}"
    );
    assert_eq!(
        status.result.as_deref(),
        Some(shown["Result"].as_str()),
        "{unit}"
    );
    assert_eq!(
        status.control_group.as_deref().unwrap_or(""),
        shown["ControlGroup"],
        "{unit}"
    );
    assert_eq!(
        status.freezer_state.as_deref(),
        shown.get("FreezerState").map(String::as_str),
        "{unit}"
    );
}

/// Asserts a call on a lost bus answered, and answered `Unavailable`.
fn assert_unavailable(
    what: &str,
    result: Result<Result<(), BackendError>, tokio::time::error::Elapsed>,
) {
    match result.unwrap_or_else(|_| panic!("{what} hangs on a lost bus")) {
        Err(BackendError::Unavailable(why)) => {
            assert!(why.contains("system_bus_socket"), "{what}: {why}");
        }
        other => panic!("{what}: expected Unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn never_started_instance_is_inactive() {
    let container = boot().await;
    let systemd = backend(&container);
    let unit = "microvm@fresh.service";

    // Reads never load a unit: a template instance never started is not
    // loaded, and inactive.
    let status = status(&systemd, unit).await;
    assert_eq!(status.load_state, vmd::drivers::NOT_LOADED);
    assert_eq!(status.active_state, ActiveState::Inactive);
    assert_eq!(status.sub_state, "dead");
    assert_eq!(status.main_pid, None);
    assert_eq!(status.active_enter_usec, None);
    assert_agrees(&container, &status, unit).await;
}

#[tokio::test]
async fn start_reports_the_running_unit() {
    let container = boot().await;
    let systemd = backend(&container);
    let unit = "microvm@vm1.service";

    systemd.start(unit, DEADLINE).await.expect("start");
    let status = status(&systemd, unit).await;
    assert_eq!(status.active_state, ActiveState::Active);
    assert_eq!(status.sub_state, "running");
    assert!(status.main_pid.is_some(), "{status:?}");
    assert!(status.active_enter_usec.is_some(), "{status:?}");
    eprintln!("accounting of a running unit: {status:?}");
    assert_agrees(&container, &status, unit).await;

    // Starting an active unit is a job that is done at once.
    systemd.start(unit, DEADLINE).await.expect("start again");
    assert_eq!(status.main_pid, self::status(&systemd, unit).await.main_pid);
}

#[tokio::test]
async fn stop_runs_the_units_exec_stop() {
    let container = boot().await;
    let systemd = backend(&container);
    let unit = "microvm@vm1.service";
    let marker = container.state_dir().join("vm1").join("exec-stop");

    systemd.start(unit, DEADLINE).await.expect("start");
    assert!(!marker.exists(), "ExecStop ran before stop");
    systemd.stop(unit, DEADLINE).await.expect("stop");

    let status = status(&systemd, unit).await;
    assert_eq!(status.active_state, ActiveState::Inactive);
    assert_eq!(status.main_pid, None);
    assert!(marker.exists(), "ExecStop left no {}", marker.display());
    assert_agrees(&container, &status, unit).await;

    // Stopping a stopped unit is a job that is done at once.
    systemd.stop(unit, DEADLINE).await.expect("stop again");
}

#[tokio::test]
async fn restart_replaces_the_main_process() {
    let container = boot().await;
    let systemd = backend(&container);
    let unit = "microvm@vm1.service";

    systemd.start(unit, DEADLINE).await.expect("start");
    let before = status(&systemd, unit).await.main_pid.expect("main PID");
    systemd.restart(unit, DEADLINE).await.expect("restart");
    let status = status(&systemd, unit).await;
    assert_eq!(status.active_state, ActiveState::Active);
    let after = status.main_pid.expect("main PID after restart");
    assert_ne!(before, after);
    assert!(container.state_dir().join("vm1/exec-stop").exists());
    assert_agrees(&container, &status, unit).await;

    // Restarting a stopped unit starts it.
    let idle = "microvm@vm2.service";
    systemd
        .restart(idle, DEADLINE)
        .await
        .expect("restart a stopped unit");
    let status = self::status(&systemd, idle).await;
    assert_eq!(status.active_state, ActiveState::Active);
    assert_agrees(&container, &status, idle).await;
}

#[tokio::test]
async fn kill_leaves_the_unit_down() {
    let container = boot().await;
    let systemd = backend(&container);
    let unit = "microvm@vm1.service";

    systemd.start(unit, DEADLINE).await.expect("start");
    systemd.kill(unit, DEADLINE).await.expect("kill");
    let status = status(&systemd, unit).await;
    assert!(
        matches!(
            status.active_state,
            ActiveState::Inactive | ActiveState::Failed
        ),
        "{status:?}"
    );
    assert_eq!(status.main_pid, None);
    assert_agrees(&container, &status, unit).await;

    // Killing a unit with no processes is done at once.
    systemd
        .kill("microvm@idle.service", DEADLINE)
        .await
        .expect("kill an inactive unit");
}

#[tokio::test]
async fn failing_start_is_job_failed() {
    let container = boot().await;
    let systemd = backend(&container);
    let unit = "broken.service";

    match systemd.start(unit, DEADLINE).await {
        Err(BackendError::JobFailed { unit: u, result }) => {
            assert_eq!(u, unit);
            assert_eq!(result, "failed");
        }
        other => panic!("expected JobFailed, got {other:?}"),
    }
    let status = status(&systemd, unit).await;
    assert_eq!(status.active_state, ActiveState::Failed);
    assert_agrees(&container, &status, unit).await;
}

#[tokio::test]
async fn unknown_unit_is_no_such_unit() {
    let container = boot().await;
    let systemd = backend(&container);
    let unit = "no-such.service";

    assert_eq!(show(&container, unit).await["LoadState"], "not-found");
    // Reads never load a unit: one systemd has not loaded is inactive.
    let read = status(&systemd, unit).await;
    assert_eq!(read, UnitStatus::not_loaded());
    let no_such = |what: &str, result: Result<(), BackendError>| match result {
        Err(BackendError::NoSuchUnit(u)) => assert_eq!(u, unit, "{what}"),
        other => panic!("{what}: expected NoSuchUnit, got {other:?}"),
    };
    no_such("start", systemd.start(unit, DEADLINE).await);
    no_such("stop", systemd.stop(unit, DEADLINE).await);
    no_such("restart", systemd.restart(unit, DEADLINE).await);
    no_such("kill", systemd.kill(unit, DEADLINE).await);
}

#[tokio::test]
async fn wanted_by_reads_the_targets_wants() {
    let container = boot().await;
    let systemd = backend(&container);
    let wanted = |unit: &'static str, target: &'static str| {
        let systemd = &systemd;
        async move {
            tokio::time::timeout(NO_HANG, systemd.wants(target))
                .await
                .expect("wants answers")
                .unwrap_or_else(|e| panic!("wants {target}: {e}"))
                .iter()
                .any(|u| u == unit)
        }
    };

    let shown = show(&container, "microvms.target").await;
    assert!(
        shown["Wants"]
            .split_whitespace()
            .any(|u| u == "microvm@vm1.service")
    );
    assert!(wanted("microvm@vm1.service", "microvms.target").await);
    assert!(!wanted("microvm@vm2.service", "microvms.target").await);
    assert!(!wanted("microvm@vm1.service", "no-such.target").await);
}

#[tokio::test]
async fn start_past_its_deadline_times_out() {
    let container = boot().await;
    let systemd = backend(&container);
    let unit = "slow.service";

    match systemd.start(unit, Duration::from_millis(300)).await {
        Err(BackendError::Timeout(what)) => assert!(what.contains(unit), "{what}"),
        other => panic!("expected Timeout, got {other:?}"),
    }
    // The job is left to systemd; its ExecStartPre takes 30 s.
    let status = status(&systemd, unit).await;
    assert_ne!(status.active_state, ActiveState::Active);
    assert_agrees(&container, &status, unit).await;
}

#[tokio::test]
async fn lost_bus_is_unavailable_until_it_returns() {
    let container = boot().await;
    let systemd = backend(&container);
    let unit = "microvm@vm1.service";
    systemd.start(unit, DEADLINE).await.expect("start");

    // A job being waited for when the bus goes away.
    let pending = systemd.start("slow.service", Duration::from_secs(120));
    let (pending, ()) = tokio::join!(pending, async {
        // The job is queued once systemd runs the unit's ExecStartPre.
        let queued = async {
            while show(&container, "slow.service").await["SubState"] != "start-pre" {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(NO_HANG, queued)
            .await
            .expect("slow.service starts");
        container.stop_bus().await;
    });
    assert!(
        matches!(pending, Err(BackendError::Unavailable(_))),
        "a job waited for on a lost bus: {pending:?}"
    );

    // Independently: nothing answers on the bus address.
    let probe = zbus::connection::Builder::address(container.bus_address().as_str())
        .expect("address")
        .build()
        .await;
    assert!(probe.is_err(), "the bus still answers");

    let status_now = tokio::time::timeout(NO_HANG, systemd.status(unit)).await;
    assert_unavailable("status", status_now.map(|r| r.map(drop)));
    let stop_now = tokio::time::timeout(NO_HANG, systemd.stop(unit, DEADLINE)).await;
    assert_unavailable("stop", stop_now);
    let wanted_now = tokio::time::timeout(NO_HANG, systemd.wants("microvms.target")).await;
    assert_unavailable("wants", wanted_now.map(|r| r.map(drop)));
    // systemd itself is fine and the unit still runs.
    assert_eq!(show(&container, unit).await["ActiveState"], "active");

    container.start_bus().await;
    let status = status(&systemd, unit).await;
    assert_eq!(status.active_state, ActiveState::Active);
    assert_agrees(&container, &status, unit).await;
    systemd
        .stop(unit, DEADLINE)
        .await
        .expect("stop after reconnecting");
    assert_eq!(show(&container, unit).await["ActiveState"], "inactive");
}

#[tokio::test]
async fn hung_bus_answers_within_the_call_timeout() {
    let container = boot().await;
    let call_timeout = Duration::from_millis(500);
    let connected = backend(&container).with_call_timeout(call_timeout);
    let unit = "microvm@vm1.service";
    status(&connected, unit).await;

    // Freeze the bus daemon: connections stay open, nothing answers.
    let dbus = show(&container, "dbus.service").await["MainPID"].clone();
    let freeze = container.exec("kill", &["-STOP", &dbus]).await;
    assert!(
        freeze.status.success(),
        "kill -STOP dbus-daemon: {freeze:?}"
    );

    let on_kept = tokio::time::timeout(NO_HANG, connected.status(unit)).await;
    match on_kept.expect("status on a kept connection answers") {
        Err(BackendError::Timeout(what)) => assert!(what.contains(unit), "{what}"),
        other => panic!("expected Timeout, got {other:?}"),
    }
    let fresh = backend(&container).with_call_timeout(call_timeout);
    let on_new = tokio::time::timeout(NO_HANG, fresh.start(unit, DEADLINE)).await;
    match on_new.expect("start on a new connection answers") {
        Err(BackendError::Unavailable(why)) => assert!(why.contains("timed out"), "{why}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    // The unit was never started behind the frozen bus.
    assert_eq!(show(&container, unit).await["ActiveState"], "inactive");

    let thaw = container.exec("kill", &["-CONT", &dbus]).await;
    assert!(thaw.status.success(), "kill -CONT dbus-daemon: {thaw:?}");
    connected
        .start(unit, DEADLINE)
        .await
        .expect("start after thawing");
    assert_eq!(status(&fresh, unit).await.active_state, ActiveState::Active);
}

#[tokio::test]
async fn container_halts_cleanly() {
    let container = boot().await;
    let bus_socket = container.bus_socket();
    let started = std::time::Instant::now();
    assert!(container.stop().await, "systemd did not halt cleanly");
    eprintln!("halted in {:?}", started.elapsed());
    assert!(!bus_socket.exists(), "the work directory is left behind");
}
