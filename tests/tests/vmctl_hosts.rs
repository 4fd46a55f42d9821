//! `vmctl` across hosts, against two real microvm hosts (each systemd in
//! nspawn running QEMU, with its own vmd, PKI and CA, see
//! [`vmd_tests::rig`]) and two that do not answer: a port nobody listens
//! on, and a listener that accepts and never says a word (the timeout
//! path). The real `vmctl` binary reads a `client.toml` with `[hosts.NAME]`
//! tables.

#![cfg(feature = "system-tests")]

use std::net::TcpListener;
use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use vmd::pki::Validity;
use vmd_tests::microvm::DeclaredVm;
use vmd_tests::rig::{AUTO, COLD, GUARDED, MicrovmRig};
use vmd_tests::vmctl;

/// How long one vmctl run may take before the test gives up (a limit on
/// waiting, not a claim about speed).
const PATIENCE: Duration = Duration::from_secs(90);
/// The second host's one VM.
const EDGE: &str = "edge-vm";
/// `connect_timeout_ms` of the config: the mute host's handshake waits
/// this long.
const TIMEOUT_MS: u64 = 2000;

/// Runs `sh -c script` with no other config in reach.
async fn sh(script: &str) -> Output {
    let child = tokio::process::Command::new("sh")
        .args(["-c", script])
        .env_remove("XDG_CONFIG_HOME")
        .env("HOME", "/nonexistent")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("sh starts");
    tokio::time::timeout(PATIENCE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("must not hang: {script}"))
        .expect("output")
}

/// The `[hosts.NAME]` table of a rig: its endpoint and an `admin`
/// certificate of its own CA.
fn host_table(name: &str, rig: &MicrovmRig) -> String {
    let pki = &rig.server.pki;
    let (cert, key) = pki.client_files(pki.ca(), "admin", Validity::days_from_now(1));
    format!(
        "[hosts.{name}]\nendpoints = [\"tcp://{}\"]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        rig.server.tcp_addr(),
        pki.ca_cert(),
        cert,
        key
    )
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn vmctl_across_two_real_hosts_and_two_silent_ones() {
    let edge = [DeclaredVm::new(EDGE).autostart()];
    let (alpha, beta) = tokio::join!(
        MicrovmRig::start(|_| {}),
        MicrovmRig::with_vms(&edge, |_| {}),
    );
    // A port nobody listens on (bound, then let go) ...
    let dead = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("address");
    // ... and one whose kernel accepts the connection but no one answers.
    let mute = TcpListener::bind("127.0.0.1:0").expect("bind");
    let mute_addr = mute.local_addr().expect("address");

    let dir = tempfile::tempdir().expect("temporary directory");
    let config = dir.path().join("client.toml");
    // The silent hosts set no files of their own: they use the top-level
    // ones (alpha's), so their rows are about the network, not the files.
    let alpha_table = host_table("alpha", &alpha);
    let top_files: String = alpha_table
        .lines()
        .filter(|l| l.starts_with("ca =") || l.starts_with("cert =") || l.starts_with("key ="))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(
        &config,
        format!(
            "connect_timeout_ms = {TIMEOUT_MS}\n{top_files}\n{alpha_table}\n{}\n\
             [hosts.dead]\nendpoints = [\"tcp://{dead}\"]\n\n\
             [hosts.mute]\nendpoints = [\"tcp://{mute_addr}\"]\n",
            host_table("beta", &beta)
        ),
    )
    .expect("write client.toml");
    let command = format!("{} --config {}", vmctl().display(), config.display());
    let vmctl = command.as_str();

    // --host picks one host; its JSON says "running" in lower case.
    let out = sh(&format!(
        "{vmctl} --host alpha list --json | jq -r '.[].state'"
    ))
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "running\nrunning\nstopped\n",
        "{GUARDED}, {AUTO}, {COLD}"
    );
    let out = sh(&format!(
        "{vmctl} --host beta list --json | jq -r '.[].name'"
    ))
    .await;
    assert_eq!(text(&out.stdout), format!("{EDGE}\n"));
    let out = sh(&format!("{vmctl} --host gamma list")).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("no host \"gamma\"; known hosts: alpha, beta, dead, mute"),
        "{}",
        text(&out.stderr)
    );

    // list --all-hosts: one table, both hosts' VMs, a row per silent host.
    let out = sh(&format!("{vmctl} list --all-hosts")).await;
    let table = text(&out.stdout);
    assert_eq!(out.status.code(), Some(4), "{table}\n{}", text(&out.stderr));
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows[0][..3], ["HOST", "NAME", "STATE"], "{table}");
    assert_eq!(rows[0].last(), Some(&"ERROR"), "{table}");
    let row = |host: &str, name: &str| {
        rows.iter()
            .find(|r| r[0] == host && r[1] == name)
            .unwrap_or_else(|| panic!("no row {host} {name}: {table}"))
            .clone()
    };
    assert_eq!(row("alpha", AUTO)[2], "running");
    assert_eq!(row("alpha", COLD)[2], "stopped");
    assert_eq!(row("alpha", GUARDED)[2], "running");
    assert_eq!(row("beta", EDGE)[2], "running");
    assert_eq!(row("dead", "-")[2], "unreachable");
    assert_eq!(row("mute", "-")[2], "unreachable");
    let line = |host: &str| {
        table
            .lines()
            .find(|l| l.starts_with(host))
            .expect("a row")
            .to_owned()
    };
    assert!(line("dead").contains("refused"), "{table}");
    assert!(line("mute").contains("timed out"), "{table}");
    assert_eq!(rows.len(), 1 + 3 + 1 + 2, "{table}");

    // The same as JSON: a host field on every VM, the silent hosts as
    // objects with their state and error.
    let out = sh(&format!("{vmctl} list --all-hosts --json")).await;
    assert_eq!(out.status.code(), Some(4));
    let json: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let items = json.as_array().expect("an array");
    let hosts: Vec<(&str, &str, &str)> = items
        .iter()
        .map(|v| {
            (
                v["host"].as_str().expect("host"),
                v["name"].as_str().unwrap_or("-"),
                v["state"].as_str().expect("state"),
            )
        })
        .collect();
    assert_eq!(
        hosts,
        [
            ("alpha", GUARDED, "running"),
            ("alpha", AUTO, "running"),
            ("alpha", COLD, "stopped"),
            ("beta", EDGE, "running"),
            ("dead", "-", "unreachable"),
            ("mute", "-", "unreachable"),
        ]
    );
    assert!(
        items[5]["error"]
            .as_str()
            .is_some_and(|e| e.contains("timed out"))
    );

    // Every host answers: exit 0 (the silent ones taken out of the file).
    let two = dir.path().join("two.toml");
    std::fs::write(
        &two,
        format!("{alpha_table}\n{}", host_table("beta", &beta)),
    )
    .expect("write");
    let out = sh(&format!(
        "{} --config {} list --all-hosts",
        vmd_tests::vmctl().display(),
        two.display()
    ))
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    drop(mute);
    several_vms_per_change(vmctl, &alpha).await;
}

/// `vmctl stop|start VM VM --wait` on alpha: each VM's outcome on its own
/// line, exit 1 if any was refused, and both end as asked.
async fn several_vms_per_change(vmctl: &str, alpha: &MicrovmRig) {
    let vmctl = format!("{vmctl} --host alpha");
    // auto-vm runs, cold-vm is already stopped: one stops, one is refused.
    let out = sh(&format!("{vmctl} stop {AUTO} {COLD} --wait")).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(
        stdout.contains(&format!("shutdown  {AUTO}  succeeded")),
        "{stdout}"
    );
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with(&format!("vmctl: {COLD}: invalid argument")),
        "{stderr}"
    );
    assert_eq!(alpha.active_state(AUTO).await, "inactive");

    // Both start, both waited for: two lines, exit 0, both running.
    let out = sh(&format!("{vmctl} start {AUTO} {COLD} --wait")).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[0].contains(&format!("start  {AUTO}  succeeded")),
        "{stdout}"
    );
    assert!(
        lines[1].contains(&format!("start  {COLD}  succeeded")),
        "{stdout}"
    );
    let out = sh(&format!(
        "{vmctl} list --json | jq -r '.[] | select(.name == \"{AUTO}\" or .name == \"{COLD}\") | .state'"
    ))
    .await;
    assert_eq!(text(&out.stdout), "running\nrunning\n");
    for vm in [AUTO, COLD] {
        assert_eq!(alpha.active_state(vm).await, "active", "{vm}");
    }
}
