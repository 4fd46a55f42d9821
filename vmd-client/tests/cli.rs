//! `vmctl` argument handling (needs no daemon). Its presence also makes
//! `cargo test --workspace` build the `vmctl` binary that the system tests
//! in `tests/` drive.

use std::process::Command;

#[test]
fn help_and_version() {
    let out = Command::new(env!("CARGO_BIN_EXE_vmctl"))
        .arg("--help")
        .output()
        .expect("vmctl runs");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for word in ["host", "list", "info", "--endpoint", "--json", "--dev"] {
        assert!(help.contains(word), "--help lacks {word}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_vmctl"))
        .arg("--version")
        .output()
        .expect("vmctl runs");
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn bad_vm_name_is_a_usage_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_vmctl"))
        .args(["info", "../etc"])
        .output()
        .expect("vmctl runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("VM name"));
}
