//! `vmctl` inside a real guest, talking to the daemon over real AF_VSOCK.
//!
//! 1. The daemon runs in-process on TCP `127.0.0.1:0` with a fresh PKI.
//! 2. `vhost-device-vsock` serves guest CID 4; a guest's connection to
//!    host (CID 2) port 9876 arrives at the unix socket `<uds>_9876`, the
//!    daemon's own hybrid-vsock listener for the VM that declares that
//!    `vsock_uds` in the inventory: the socket names the peer VM.
//! 3. A QEMU TCG guest boots a Debian kernel with an initramfs holding a
//!    static `vmctl` and a client certificate, runs `vmctl host --json`
//!    and `vmctl list --json` against `vsock://2:9876`, and powers off.
//! 4. The JSON printed on the guest's console must match what a TCP client
//!    gets from the same daemon, and another VM's certificate presented
//!    from this guest must be refused (vsock binding).
//!
//! The guest has no network: its only way out is vsock. No AF_VSOCK socket
//! is opened on this machine itself.

#![cfg(feature = "guest-tests")]

use std::time::{Duration, Instant};

use serde_json::Value;
use vmd::pki::Validity;
use vmd::policy::{Binding, IdentityRule};
use vmd::transport::ListenAddr;
use vmd_proto::{Role, VmName};
use vmd_tests::TestServer;
use vmd_tests::guest::{Guest, GuestAssets, Initramfs, VsockDevice};

/// The guest's CID (vhost-device-vsock's own namespace, not the host's).
const GUEST_CID: u32 = 4;

/// The host port the guest connects to.
const PORT: u32 = 9876;

/// A TCG boot plus two TLS sessions takes seconds; this bounds a hang.
const GUEST_TIMEOUT: Duration = Duration::from_secs(180);

/// The JSON a guest line tagged `tag` carries.
fn tagged_json(run: &vmd_tests::guest::GuestRun, tag: &str) -> Value {
    let line = run
        .tagged(tag)
        .next()
        .unwrap_or_else(|| panic!("no {tag} line on the guest console:\n{}", run.console));
    serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("{tag} is not JSON ({e}): {line}\n{}", run.console))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmctl_in_a_guest_reaches_the_daemon_over_vsock() {
    let started = Instant::now();
    let assets = tokio::task::spawn_blocking(GuestAssets::ensure)
        .await
        .expect("guest assets are made");
    let assets_ready = started.elapsed();

    // The guest's vsock device first: the daemon's hybrid listener for the
    // VM is bound at start, at `<uds>_9876` of the VM's declared socket.
    let dir = tempfile::tempdir().expect("temporary directory");
    let device = VsockDevice::start(&assets, dir.path(), GUEST_CID).await;
    let inventory = dir.path().join("inventory.toml");
    std::fs::write(
        &inventory,
        format!(
            "[vm.gui-vm]\nvsock_cid = {GUEST_CID}\nvsock_uds = {:?}\n[vm.net-vm]\nvsock_cid = 9\n",
            device.uds().display().to_string()
        ),
    )
    .expect("inventory");
    let server = TestServer::start_with(|c| {
        c.vms.inventory.file = Some(inventory.clone());
        c.hybrid_vsock_port = Some(PORT);
        let bound_to = |vm: &str| IdentityRule {
            binding: Some(Binding::Vm(VmName::new(vm).expect("valid"))),
            ..IdentityRule::new(vm, Some(Role::Reader))
        };
        c.policy.identities = vec![bound_to("gui-vm"), bound_to("net-vm")];
    })
    .await;
    assert!(
        server
            .addrs
            .iter()
            .any(|a| matches!(a, ListenAddr::HybridVsock { .. })),
        "the daemon listens on the guest's hybrid vsock socket"
    );
    let (cert, key) =
        server
            .pki
            .client_files(server.pki.ca(), "gui-vm", Validity::days_from_now(1));
    // Another VM's certificate, which this guest must not be able to use.
    let (other_cert, other_key) =
        server
            .pki
            .client_files(server.pki.ca(), "net-vm", Validity::days_from_now(1));

    let script = format!(
        "V='vmctl --endpoint vsock://2:{PORT} --ca /etc/vmd/ca.pem \
         --cert /etc/vmd/client.pem --key /etc/vmd/client.key --json'\n\
         out=$($V host) || {{ echo \"vmctl host failed: $out\"; exit 1; }}\n\
         echo \"VMD-HOST $(echo \"$out\" | tr -d '\\n')\"\n\
         out=$($V list) || {{ echo \"vmctl list failed: $out\"; exit 2; }}\n\
         echo \"VMD-LIST $(echo \"$out\" | tr -d '\\n')\"\n\
         vmctl --endpoint vsock://2:{PORT} --ca /etc/vmd/ca.pem \
         --cert /etc/vmd/other.pem --key /etc/vmd/other.key host > /tmp/o 2>&1\n\
         echo \"VMD-STOLEN rc=$? $(tr -d '\\n' < /tmp/o)\"\n"
    );
    let initramfs = dir.path().join("initramfs.cpio");
    Initramfs::new(&assets)
        .copy("etc/vmd/ca.pem", &server.pki.ca_cert(), 0o644)
        .copy("etc/vmd/client.pem", &cert, 0o644)
        .copy("etc/vmd/client.key", &key, 0o600)
        .copy("etc/vmd/other.pem", &other_cert, 0o644)
        .copy("etc/vmd/other.key", &other_key, 0o600)
        .script(&script)
        .write(&initramfs);

    let guest = Guest::boot(&assets, dir.path(), &initramfs, Some(&device));
    let run = guest.wait(GUEST_TIMEOUT).await;
    assert_eq!(
        run.rc,
        0,
        "guest script failed:\n{}\n--- vhost-device-vsock ---\n{}",
        run.console,
        device.log()
    );

    let client = server.client("tcp-check").await;
    let expected = serde_json::to_value(client.host().await.expect("host over TCP"))
        .expect("host info as JSON");
    let host = tagged_json(&run, "VMD-HOST");
    for field in ["hostname", "kernel", "virtualization"] {
        assert_eq!(
            host[field], expected[field],
            "{field}: over vsock from the guest vs over TCP"
        );
    }
    let vms = serde_json::to_value(client.list_vms().await.expect("list over TCP"))
        .expect("VM list as JSON");
    assert_eq!(tagged_json(&run, "VMD-LIST"), vms, "list over vsock vs TCP");
    // The stolen certificate, presented from the wrong VM: refused.
    let stolen: Vec<&str> = run.tagged("VMD-STOLEN").collect();
    assert!(
        stolen
            .iter()
            .any(|l| l.starts_with("rc=1") && l.contains("not bound to VM gui-vm")),
        "net-vm's certificate from gui-vm must be refused: {stolen:?}"
    );
    drop(client);
    server.stop().await;

    println!(
        "guest over vsock: assets {assets_ready:.1?}, guest boot {:.2?}, guest run {:.2?}, \
         whole test {:.2?} (initramfs {} bytes)",
        run.boot,
        run.total,
        started.elapsed(),
        std::fs::metadata(&initramfs).map_or(0, |m| m.len()),
    );
}

/// A guest without a vsock device: `vmctl` fails with its "cannot connect"
/// status (3) instead of hanging, and the guest still finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmctl_in_a_guest_without_vsock_fails_to_connect() {
    let started = Instant::now();
    let assets = tokio::task::spawn_blocking(GuestAssets::ensure)
        .await
        .expect("guest assets are made");
    let dir = tempfile::tempdir().expect("temporary directory");
    let server = TestServer::start().await;
    let (cert, key) =
        server
            .pki
            .client_files(server.pki.ca(), "gui-vm", Validity::days_from_now(1));
    let script = format!(
        "vmctl --endpoint vsock://2:{PORT} --ca /etc/vmd/ca.pem \
         --cert /etc/vmd/client.pem --key /etc/vmd/client.key host\n\
         echo \"VMD-VMCTL-RC $?\"\n"
    );
    let initramfs = dir.path().join("initramfs.cpio");
    Initramfs::new(&assets)
        .copy("etc/vmd/ca.pem", &server.pki.ca_cert(), 0o644)
        .copy("etc/vmd/client.pem", &cert, 0o644)
        .copy("etc/vmd/client.key", &key, 0o600)
        .script(&script)
        .write(&initramfs);
    server.stop().await;

    let run = Guest::boot(&assets, dir.path(), &initramfs, None)
        .wait(GUEST_TIMEOUT)
        .await;
    assert_eq!(run.rc, 0, "guest script failed:\n{}", run.console);
    assert_eq!(
        run.tagged("VMD-VMCTL-RC").next(),
        Some("3"),
        "vmctl's exit status without vsock:\n{}",
        run.console
    );
    println!(
        "guest without vsock: guest boot {:.2?}, guest run {:.2?}, whole test {:.2?}",
        run.boot,
        run.total,
        started.elapsed(),
    );
}
