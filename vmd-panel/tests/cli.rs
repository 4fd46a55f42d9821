//! The `vmd-panel` command line, without a display: usage and
//! configuration errors are reported before any window opens. (This test
//! also makes `cargo test --workspace` build the binary that the GUI
//! suite of the `tests` crate runs.)

use std::process::Command;

fn panel() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_vmd-panel"));
    command
        .env_remove("DISPLAY")
        .env_remove("WAYLAND_DISPLAY")
        .env_remove("XDG_CONFIG_HOME")
        .env("HOME", "/nonexistent");
    command
}

#[test]
fn help_prints_usage() {
    let out = panel().arg("--help").output().expect("vmd-panel runs");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Usage: vmd-panel"), "{text}");
    assert!(
        text.contains("--config") && text.contains("--endpoint"),
        "{text}"
    );
}

#[test]
fn a_bad_config_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let config = dir.path().join("client.toml");
    std::fs::write(&config, "endpoints = [\"http://x\"]\n").expect("write config");
    let out = panel()
        .arg("--config")
        .arg(&config)
        .output()
        .expect("vmd-panel runs");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("vmd-panel: ") && stderr.contains("client.toml"),
        "{stderr}"
    );
}

#[test]
fn missing_certificates_are_named() {
    let out = panel()
        .args([
            "--ca",
            "/nonexistent/ca.pem",
            "--endpoint",
            "tcp://127.0.0.1:1",
        ])
        .output()
        .expect("vmd-panel runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/ca.pem"));
}

#[test]
fn a_bad_endpoint_is_a_usage_error() {
    let out = panel()
        .args(["--endpoint", "http://x"])
        .output()
        .expect("vmd-panel runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown scheme"));
}
