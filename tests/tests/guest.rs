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
use vmd_tests::guest::{Guest, GuestAssets, Initramfs, NET_SETUP, VsockDevice, processes_using};

/// The guest's CID (vhost-device-vsock's own namespace, not the host's).
const GUEST_CID: u32 = 4;

/// The host port the guest connects to.
const PORT: u32 = 9876;

/// A TCG boot plus two TLS sessions takes seconds; this bounds a hang.
const GUEST_TIMEOUT: Duration = Duration::from_secs(180);

/// Fails if any process the test started outlived it.
fn assert_no_strays(dir: &std::path::Path) {
    let strays = processes_using(dir);
    assert!(strays.is_empty(), "processes outlived the test: {strays:?}");
}

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
    let assets = GuestAssets::ready().await;
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
    drop(device);
    assert_no_strays(dir.path());

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
    let assets = GuestAssets::ready().await;
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
    assert_no_strays(dir.path());
    println!(
        "guest without vsock: guest boot {:.2?}, guest run {:.2?}, whole test {:.2?}",
        run.boot,
        run.total,
        started.elapsed(),
    );
}

/// A guest without vsock whose only way out is a contained user-mode
/// network forwarding 10.0.2.100:9876 to the daemon's loopback TCP port:
/// `vmctl --endpoint auto` (its `client.toml` names that address as
/// `auto_tcp`) finds no vsock and falls back to TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmctl_auto_falls_back_to_tcp_in_a_guest_without_vsock() {
    const FORWARDED: &str = "10.0.2.100:9876";
    let started = Instant::now();
    let assets = GuestAssets::ready().await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let server = TestServer::start().await;
    let (cert, key) =
        server
            .pki
            .client_files(server.pki.ca(), "gui-vm", Validity::days_from_now(1));
    // What the NixOS guest module writes: auto, with the host's address.
    let client_toml = format!(
        "endpoints = [\"auto\"]\nauto_tcp = \"tcp://{FORWARDED}\"\n\
         ca = \"/etc/vmd/ca.pem\"\ncert = \"/etc/vmd/client.pem\"\nkey = \"/etc/vmd/client.key\"\n"
    );
    let script = format!(
        "{NET_SETUP}\
         vmctl --verbose --endpoint auto --json host > /tmp/out 2> /tmp/err\n\
         echo \"VMD-RC $?\"\n\
         echo \"VMD-HOST $(tr -d '\\n' < /tmp/out)\"\n\
         sed 's/^/VMD-VERBOSE /' /tmp/err\n"
    );
    let initramfs = dir.path().join("initramfs.cpio");
    Initramfs::new(&assets)
        .copy("etc/vmd/ca.pem", &server.pki.ca_cert(), 0o644)
        .copy("etc/vmd/client.pem", &cert, 0o644)
        .copy("etc/vmd/client.key", &key, 0o600)
        .file("etc/vmd/client.toml", client_toml, 0o644)
        .script(&script)
        .write(&initramfs);

    let run = Guest::builder(&assets, dir.path(), &initramfs)
        .forward_to_host(FORWARDED, server.tcp_addr().port())
        .boot()
        .wait(GUEST_TIMEOUT)
        .await;
    assert_eq!(run.rc, 0, "guest script failed:\n{}", run.console);
    assert_eq!(
        run.tagged("VMD-RC").next(),
        Some("0"),
        "vmctl over the fallback:\n{}",
        run.console
    );
    let verbose: Vec<&str> = run.tagged("VMD-VERBOSE").collect();
    // First vsock, which fails at once (no device: an error, not a wait),
    // then the forwarded TCP address, which answers.
    match &verbose[..] {
        [vsock, tcp] => {
            assert!(
                vsock.starts_with("vmctl: vsock://2:9876 failed after"),
                "{verbose:?}"
            );
            assert!(
                !vsock.contains("timed out"),
                "vsock must fail, not time out: {vsock}"
            );
            assert!(
                tcp.starts_with(&format!("vmctl: connected to tcp://{FORWARDED} in ")),
                "{verbose:?}"
            );
        }
        other => panic!("expected a vsock failure then a TCP connection, got {other:?}"),
    }
    let client = server.client("tcp-check").await;
    let expected = serde_json::to_value(client.host().await.expect("host over TCP"))
        .expect("host info as JSON");
    assert_eq!(
        tagged_json(&run, "VMD-HOST")["hostname"],
        expected["hostname"],
        "the guest reached this daemon"
    );
    drop(client);
    server.stop().await;
    assert_no_strays(dir.path());
    println!(
        "auto fallback in a guest: {}; guest boot {:.2?}, whole test {:.2?}",
        verbose.join(" / "),
        run.boot,
        started.elapsed()
    );
}

/// Console lines of a guest that are JSON log records (vmd's, run inside
/// the guest with `--log-format json`).
fn json_records(console: &str) -> Vec<Value> {
    console
        .lines()
        .filter_map(|l| l.find('{').map(|at| &l[at..]))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// vmd's own AF_VSOCK listener, with peer CIDs reported by a real guest
/// kernel: vmd runs inside guest A (CID 4); vmctl runs in guest B (CID 5)
/// and then in guest C (CID 6), all behind one `vhost-device-vsock`, so
/// they reach A's CID over AF_VSOCK as siblings. The policy binds the
/// `gui-vm` identity to CID 5: B is served; the same certificate from C
/// is refused, and vmd audits both with the kernel's peer CID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmd_in_a_guest_binds_identities_to_kernel_reported_cids() {
    const SERVER_CID: u32 = 4;
    const BOUND_CID: u32 = 5;
    const OTHER_CID: u32 = 6;
    let started = Instant::now();
    let assets = GuestAssets::ready().await;
    let dir = tempfile::tempdir().expect("temporary directory");
    let pki = vmd_tests::TestPki::new();
    let server_tls = pki.server_paths();
    let (cert, key) = pki.client_files(pki.ca(), "gui-vm", Validity::days_from_now(1));
    let device =
        VsockDevice::start_siblings(&assets, dir.path(), &[SERVER_CID, BOUND_CID, OTHER_CID]).await;

    // Guest A: vmd on AF_VSOCK only, gui-vm bound to CID 5.
    let vmd_toml = format!(
        "[listen]\ntcp = []\n[listen.vsock]\nenable = true\nport = {PORT}\nrequired = true\n\
         [tls]\nca = \"/etc/vmd/ca.pem\"\ncert = \"/etc/vmd/server.pem\"\nkey = \"/etc/vmd/server.key\"\n\
         [log]\nformat = \"json\"\nlevel = \"info\"\n\
         [vms]\nstate_dir = \"/tmp/microvms\"\ninventory = \"/etc/vmd/inventory.toml\"\n\
         [[policy.identity]]\nname = \"gui-vm\"\nrole = \"reader\"\nbind_cid = {BOUND_CID}\n"
    );
    // The log file exists before `tail -f` opens it (a background
    // redirection may come after `tail` starts).
    let server_script = "mkdir -p /tmp/microvms\n\
         : > /tmp/vmd.log\n\
         vmd serve --config /etc/vmd/vmd.toml > /tmp/vmd.log 2>&1 &\n\
         tail -f /tmp/vmd.log &\n\
         i=0; until grep -q '\"listening\"' /tmp/vmd.log; do\n\
         \x20 i=$((i+1)); [ $i -gt 600 ] && { echo 'vmd did not listen'; exit 1; }; usleep 50000\n\
         done\n\
         echo VMD-SERVER-READY\n\
         sleep 600\n";
    let server_image = dir.path().join("server.cpio");
    Initramfs::new(&assets)
        .with_vmd(&assets)
        .copy("etc/vmd/ca.pem", &server_tls.ca, 0o644)
        .copy("etc/vmd/server.pem", &server_tls.cert, 0o644)
        .copy("etc/vmd/server.key", &server_tls.key, 0o600)
        .file("etc/vmd/vmd.toml", vmd_toml, 0o644)
        .file(
            "etc/vmd/inventory.toml",
            "[vm.gui-vm]\nvsock_cid = 5\n",
            0o644,
        )
        .script(server_script)
        .write(&server_image);

    // Guests B and C: the same client image, the same certificate.
    let client_script = format!(
        "vmctl --endpoint vsock://{SERVER_CID}:{PORT} --ca /etc/vmd/ca.pem \
         --cert /etc/vmd/client.pem --key /etc/vmd/client.key --json host > /tmp/out 2>&1\n\
         echo \"VMD-RC $?\"\n\
         echo \"VMD-OUT $(tr -d '\\n' < /tmp/out)\"\n"
    );
    let client_image = dir.path().join("client.cpio");
    Initramfs::new(&assets)
        .copy("etc/vmd/ca.pem", &server_tls.ca, 0o644)
        .copy("etc/vmd/client.pem", &cert, 0o644)
        .copy("etc/vmd/client.key", &key, 0o600)
        .script(&client_script)
        .write(&client_image);

    let mut server = Guest::builder(&assets, dir.path(), &server_image)
        .name("a")
        .vsock(device.guest(SERVER_CID))
        .boot();
    server.wait_for("VMD-SERVER-READY", GUEST_TIMEOUT).await;
    let server_ready = started.elapsed();
    // One guest at a time: two guests negotiating vhost-user with the
    // device at once can wedge it.
    let mut runs = Vec::new();
    for (name, cid) in [("b", BOUND_CID), ("c", OTHER_CID)] {
        let run = Guest::builder(&assets, dir.path(), &client_image)
            .name(name)
            .vsock(device.guest(cid))
            .boot()
            .wait(GUEST_TIMEOUT)
            .await;
        assert_eq!(run.rc, 0, "guest {name} script failed:\n{}", run.console);
        runs.push(run);
    }
    // The guest's `tail -f` copies vmd's log to the console once a second.
    server
        .wait_for(&format!("\"peer\":\"vsock:{OTHER_CID}:"), GUEST_TIMEOUT)
        .await;
    let server_console = server.kill();
    let (bound, other) = (&runs[0], &runs[1]);

    // B, from CID 5: served, with guest A's host facts.
    assert_eq!(
        bound.tagged("VMD-RC").next(),
        Some("0"),
        "from CID {BOUND_CID}:\n{}\n--- guest A ---\n{server_console}\n--- vhost-device-vsock ---\n{}",
        bound.console,
        device.log()
    );
    let host = tagged_json(bound, "VMD-OUT");
    // Facts of guest A (256 MiB, no /dev/kvm), not of this machine.
    assert_eq!(host["virtualization"]["status"], "unavailable", "{host}");
    assert!(
        host["memory"]["total"]
            .as_u64()
            .is_some_and(|b| b <= 256 << 20),
        "{host}"
    );
    // C, from CID 6, with B's certificate: refused, and told why.
    let refused = other.tagged("VMD-OUT").next().unwrap_or_default();
    assert_eq!(
        other.tagged("VMD-RC").next(),
        Some("1"),
        "{}",
        other.console
    );
    assert!(
        refused.contains(&format!(
            "gui-vm is bound to CID {BOUND_CID} but connected from CID {OTHER_CID}"
        )),
        "{refused}"
    );

    // vmd's audit log in guest A names the kernel-reported peer CIDs.
    let records = json_records(&server_console);
    let audited = |cid: u32, result: &str| {
        records.iter().any(|r| {
            let f = &r["fields"];
            r["target"] == "vmd::audit"
                && f["event"] == "connection"
                && f["identity"] == "gui-vm"
                && f["peer"]
                    .as_str()
                    .is_some_and(|p| p.starts_with(&format!("vsock:{cid}:")))
                && f["result"].as_str().is_some_and(|r| r.starts_with(result))
        })
    };
    assert!(
        audited(BOUND_CID, "admitted"),
        "admission from CID {BOUND_CID} audited:\n{server_console}"
    );
    assert!(
        audited(OTHER_CID, "refused: gui-vm is bound to CID 5"),
        "refusal from CID {OTHER_CID} audited:\n{server_console}"
    );
    drop(device);
    assert_no_strays(dir.path());
    println!(
        "vmd in guest A ready after {server_ready:.2?}; guest B {:.2?}, guest C {:.2?}; \
         whole test {:.2?}",
        bound.total,
        other.total,
        started.elapsed()
    );
}
