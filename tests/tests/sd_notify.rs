//! The `vmd` binary under a `Type=notify` service manager: a unix datagram
//! socket named by `NOTIFY_SOCKET`, as systemd provides it. `READY=1`
//! arrives only when the TCP listener already accepts connections;
//! SIGHUP is bracketed by `RELOADING=1` and `READY=1`; SIGTERM sends
//! `STOPPING=1`.

use std::process::Stdio;
use std::time::Duration;

use tokio::net::{TcpStream, UnixDatagram};
use tokio::process::{Child, Command};
use vmd_client::{Client, Endpoint};

/// Longest wait for one notification or for the daemon to stop.
const PATIENCE: Duration = Duration::from_secs(20);

/// The next notification datagram, as text.
async fn next_message(socket: &UnixDatagram) -> String {
    let mut buf = vec![0u8; 4096];
    let len = tokio::time::timeout(PATIENCE, socket.recv(&mut buf))
        .await
        .expect("a notification arrives in time")
        .expect("recv on the notify socket");
    String::from_utf8_lossy(&buf[..len]).into_owned()
}

/// A loopback port nothing listens on (bound once, then released).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

fn signal(child: &Child, name: &str) {
    let pid = child.id().expect("running").to_string();
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{name} {pid}");
}

#[tokio::test]
async fn ready_only_after_listening_then_reloading_and_stopping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind the notify socket");
    let port = free_port();
    assert!(
        TcpStream::connect(("127.0.0.1", port)).await.is_err(),
        "port {port} must be free before vmd starts"
    );

    let mut child = Command::new(vmd_tests::vmd())
        .args(["serve", "--dev", "--no-vsock", "--tcp"])
        .arg(format!("127.0.0.1:{port}"))
        .env("VMD_DEV_DIR", dir.path().join("dev"))
        .env("NOTIFY_SOCKET", &notify_path)
        .env_remove("RUST_LOG")
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("vmd starts");

    // The first message is READY=1, and at that moment the listener
    // already accepts: a connect right after it must succeed.
    let first = next_message(&notify).await;
    assert_eq!(first.lines().collect::<Vec<_>>(), ["READY=1"], "{first:?}");
    TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("READY=1 was sent after the TCP listener was bound");
    let endpoint = Endpoint::Tcp {
        host: "127.0.0.1".into(),
        port,
    };
    let client = Client::connect(&endpoint, &vmd_tests::dev_client(&dir.path().join("dev")))
        .await
        .expect("a full mTLS session right after READY=1");
    client.host().await.expect("host reply");

    // SIGHUP: RELOADING=1 with the monotonic timestamp, then READY=1.
    signal(&child, "HUP");
    let reloading = next_message(&notify).await;
    let lines: Vec<&str> = reloading.lines().collect();
    assert_eq!(lines.first(), Some(&"RELOADING=1"), "{reloading:?}");
    assert!(
        lines.iter().any(|l| l
            .strip_prefix("MONOTONIC_USEC=")
            .is_some_and(|v| v.parse::<u64>().is_ok())),
        "{reloading:?}"
    );
    assert_eq!(next_message(&notify).await.trim_end(), "READY=1");

    // SIGTERM: STOPPING=1, then a clean exit.
    signal(&child, "TERM");
    assert_eq!(next_message(&notify).await.trim_end(), "STOPPING=1");
    let status = tokio::time::timeout(PATIENCE, child.wait())
        .await
        .expect("vmd stops after SIGTERM")
        .expect("exit status");
    assert!(status.success(), "vmd exited with {status}");
}
