//! The `vmctl` binary against the real daemon.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use vmd_tests::{TestServer, vmctl};

/// Runs vmctl with the given arguments, killing it if it hangs.
async fn run(args: Vec<String>, limit: Duration) -> Output {
    let child = tokio::process::Command::new(vmctl())
        .args(args)
        .env_remove("XDG_CONFIG_HOME")
        .env("HOME", "/nonexistent")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("vmctl starts");
    tokio::time::timeout(limit, child.wait_with_output())
        .await
        .expect("vmctl must not hang")
        .expect("vmctl output")
}

#[tokio::test]
async fn host_json_has_the_probe_fields() {
    let server = TestServer::start().await;
    let mut args = server.vmctl_args("admin-laptop");
    args.extend(["host".into(), "--json".into()]);
    let out = run(args, Duration::from_secs(20)).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stdout is JSON");
    for field in [
        "hostname",
        "kernel",
        "vmd_version",
        "uptime_secs",
        "cpu",
        "memory",
        "virtualization",
    ] {
        assert!(json.get(field).is_some(), "missing {field} in {json}");
    }
    assert!(json["memory"]["total"].as_u64().is_some_and(|t| t > 0));
    if kvm_ioctls::Kvm::new().is_ok() {
        assert_eq!(json["virtualization"]["status"], "available");
        assert_eq!(json["virtualization"]["api_version"], 12);
    }
    server.stop().await;
}

#[tokio::test]
async fn human_output_and_server_errors() {
    let server = TestServer::start().await;
    let base = server.vmctl_args("admin-laptop");

    let out = run(
        [base.clone(), vec!["host".into()]].concat(),
        Duration::from_secs(20),
    )
    .await;
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Kernel") && text.contains("KVM"), "{text}");

    let out = run(
        [base.clone(), vec!["list".into()]].concat(),
        Duration::from_secs(20),
    )
    .await;
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "no VMs");

    // A server error: exit code 1 and the server's message.
    let out = run(
        [base, vec!["info".into(), "gui-vm".into()]].concat(),
        Duration::from_secs(20),
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found: VM gui-vm"));
    server.stop().await;
}

/// Against a stopped server vmctl fails at once with a readable message.
#[tokio::test]
async fn stopped_server_gives_a_quick_readable_error() {
    let server = TestServer::start().await;
    let args = [server.vmctl_args("admin-laptop"), vec!["host".into()]].concat();
    let _pki = server.stop().await;
    let out = run(args, Duration::from_secs(1)).await;
    assert_eq!(out.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("vmctl: cannot connect to tcp://127.0.0.1:"),
        "{stderr}"
    );
    assert!(stderr.contains("refused"), "{stderr}");
}

#[test]
fn usage_errors_exit_2() {
    let out = Command::new(vmctl())
        .args(["--endpoint", "http://x", "host"])
        .output()
        .expect("vmctl runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown scheme"));

    let out = Command::new(vmctl())
        .args([
            "--ca",
            "/nonexistent/ca.pem",
            "--endpoint",
            "tcp://127.0.0.1:1",
            "host",
        ])
        .output()
        .expect("vmctl runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/ca.pem"));
}
