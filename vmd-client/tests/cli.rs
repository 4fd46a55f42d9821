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

/// `vmctl config` shows what a file and flags resolve to without
/// connecting: `auto` expands through the file's `auto_tcp`, flags win.
#[test]
fn config_shows_the_effective_settings_without_connecting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("client.toml");
    std::fs::write(
        &file,
        "endpoints = [\"auto\"]\nauto_tcp = \"tcp://10.0.2.100:9876\"\nca = \"/etc/vmd/tls/ca.pem\"\n",
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_vmctl"))
        .arg("--config")
        .arg(&file)
        .args(["--key", "/k.pem", "config", "--json"])
        .output()
        .expect("vmctl runs");
    assert!(out.status.success(), "{out:?}");
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        shown["endpoints"],
        serde_json::json!(["vsock://2:9876", "tcp://10.0.2.100:9876"])
    );
    assert_eq!(shown["ca"], "/etc/vmd/tls/ca.pem");
    assert_eq!(shown["key"], "/k.pem");

    // `--endpoint auto` also goes through the file's auto_tcp.
    let out = Command::new(env!("CARGO_BIN_EXE_vmctl"))
        .arg("--config")
        .arg(&file)
        .args([
            "--endpoint",
            "tcp://127.0.0.1:1",
            "--endpoint",
            "auto",
            "config",
        ])
        .output()
        .expect("vmctl runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("tcp://127.0.0.1:1, vsock://2:9876, tcp://10.0.2.100:9876"),
        "{text}"
    );

    // A bad auto_tcp is a configuration error that names the key.
    std::fs::write(&file, "auto_tcp = \"vsock://2:1\"\n").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_vmctl"))
        .arg("--config")
        .arg(&file)
        .arg("config")
        .output()
        .expect("vmctl runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("auto_tcp must be a tcp://"),
        "{out:?}"
    );
}
