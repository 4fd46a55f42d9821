//! The `vmd` binary as the README runs it: `vmd serve --dev` creates its
//! development PKI on first run, serves, and stops cleanly on SIGTERM.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use vmd_client::{Client, Endpoint};

/// Longest wait for the daemon to start or stop.
const PATIENCE: Duration = Duration::from_secs(20);

/// Starts `vmd serve --dev` on an ephemeral port; returns the child, the
/// bound TCP port, and the stderr reader (the rest of the log).
async fn start_dev(
    dev_dir: &Path,
) -> (
    Child,
    u16,
    tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
) {
    let mut child = Command::new(vmd_tests::vmd())
        .args(["serve", "--dev", "--tcp", "127.0.0.1:0", "--no-vsock"])
        .env("VMD_DEV_DIR", dev_dir)
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("vmd starts");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let port = tokio::time::timeout(PATIENCE, async {
        while let Some(line) = lines.next_line().await.expect("log line") {
            if let Some(rest) = line.split("addr=tcp://").nth(1) {
                let addr: std::net::SocketAddr = rest
                    .split_whitespace()
                    .next()
                    .expect("address")
                    .parse()
                    .expect("socket address");
                return addr.port();
            }
        }
        panic!("vmd exited before listening");
    })
    .await
    .expect("vmd listens in time");
    (child, port, lines)
}

async fn sigterm_and_wait(mut child: Child) -> std::process::ExitStatus {
    let pid = child.id().expect("running").to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs");
    assert!(kill.success());
    tokio::time::timeout(PATIENCE, child.wait())
        .await
        .expect("vmd stops after SIGTERM")
        .expect("exit status")
}

#[tokio::test]
async fn dev_mode_creates_its_pki_serves_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (child, port, mut log) = start_dev(dir.path()).await;

    let endpoint = Endpoint::Tcp {
        host: "127.0.0.1".into(),
        port,
    };
    let client = Client::connect(&endpoint, &vmd_tests::dev_client(dir.path()))
        .await
        .expect("dev-admin connects");
    assert_eq!(client.welcome().identity, "dev-admin");
    client.host().await.expect("host reply");

    let status = sigterm_and_wait(child).await;
    assert!(status.success(), "vmd exit status {status}");
    let mut rest = Vec::new();
    while let Ok(Some(line)) = log.next_line().await {
        rest.push(line);
    }
    assert!(
        rest.iter().any(|l| l.contains("SIGTERM received")),
        "{rest:#?}"
    );
    assert!(rest.iter().any(|l| l.contains("stopped")), "{rest:#?}");
    // The session that was open was closed by the server, not dropped.
    assert!(client.host().await.is_err());
}

#[tokio::test]
async fn dev_pki_is_reused_on_the_next_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (child, _, mut first_log) = start_dev(dir.path()).await;
    let key = std::fs::read(dir.path().join("pki/ca.key")).expect("CA key");
    let cert = std::fs::read(dir.path().join("pki/clients/dev-admin.pem")).expect("client cert");
    let status = sigterm_and_wait(child).await;
    let mut rest = Vec::new();
    while let Ok(Some(line)) = first_log.next_line().await {
        rest.push(line);
    }
    assert!(status.success(), "vmd exit status {status}: {rest:#?}");

    let (child, port, _log) = start_dev(dir.path()).await;
    assert_eq!(
        std::fs::read(dir.path().join("pki/ca.key")).expect("CA key"),
        key
    );
    let endpoint = Endpoint::Tcp {
        host: "127.0.0.1".into(),
        port,
    };
    // The client certificate from the first run still works.
    assert_eq!(
        std::fs::read(dir.path().join("pki/clients/dev-admin.pem")).expect("cert"),
        cert
    );
    Client::connect(&endpoint, &vmd_tests::dev_client(dir.path()))
        .await
        .expect("old dev-admin certificate accepted");
    assert!(sigterm_and_wait(child).await.success());
}

/// `vmd reload` (SIGHUP) answers a pending `Watch` with a snapshot, so a
/// hand-edited inventory reaches watchers without anyone polling.
#[tokio::test]
async fn a_reload_answers_pending_watches_with_a_snapshot() {
    let pki = vmd_tests::TestPki::new();
    let dir = pki.scratch().to_path_buf();
    let inventory = dir.join("inventory.toml");
    std::fs::write(&inventory, "[vm.app-vm]\n").expect("inventory");
    let tls = pki.server_paths();
    let config = dir.join("vmd.toml");
    std::fs::write(
        &config,
        format!(
            "[listen]\ntcp = [\"127.0.0.1:0\"]\n[listen.vsock]\nenable = false\n\
             [tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n\
             [vms]\nstate_dir = {:?}\ninventory = {:?}\nsystemd_bus = \"unix:path=/nonexistent/bus\"\n\
             [policy]\ndefault_role = \"reader\"\n",
            tls.ca,
            tls.cert,
            tls.key,
            dir.join("microvms"),
            inventory
        ),
    )
    .expect("config");
    let daemon = vmd_tests::process::DaemonProcess::start(&config).await;
    let endpoint = Endpoint::Tcp {
        host: "127.0.0.1".into(),
        port: daemon.port(),
    };
    let client = Client::connect(&endpoint, &pki.client("reader"))
        .await
        .expect("connects");
    let names = |e: &vmd_proto::WatchEvent| -> Vec<String> {
        e.changed.iter().map(|i| i.name.to_string()).collect()
    };
    let first = client.watch(0, Vec::new(), 1).await.expect("snapshot");
    assert_eq!(names(&first), ["app-vm"]);
    let held = tokio::spawn({
        let client = client.clone();
        async move { client.watch(first.generation, Vec::new(), 120_000).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::fs::write(&inventory, "[vm.app-vm]\n[vm.web-vm]\n").expect("edit");
    daemon.signal("HUP");
    let event = held.await.expect("task").expect("watch");
    assert!(event.snapshot, "{event:?}");
    assert_eq!(names(&event), ["app-vm", "web-vm"]);
    daemon.stop().await;
}
