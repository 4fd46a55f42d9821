//! The `vmd` binary's argument and config handling (needs no network).
//! Its presence also makes `cargo test --workspace` build the `vmd` binary
//! that the system tests in `tests/` start.

use std::process::Command;

fn vmd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vmd"))
        .args(args)
        .output()
        .expect("vmd runs")
}

#[test]
fn help_lists_the_subcommands() {
    let out = vmd(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for word in ["serve", "pki", "check-config"] {
        assert!(help.contains(word), "--help lacks {word}");
    }
}

#[test]
fn check_config_names_the_bad_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vmd.toml");
    std::fs::write(&path, "[limits]\nidle_timeout_secs = 0\n").expect("write");
    let out = vmd(&["check-config", "-c", path.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("limits.idle_timeout_secs"), "{stderr}");
}

#[test]
fn check_config_reports_missing_tls_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vmd.toml");
    std::fs::write(&path, "[tls]\nca = \"/nonexistent/ca.pem\"\n").expect("write");
    let out = vmd(&["check-config", "-c", path.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/ca.pem"));
}
