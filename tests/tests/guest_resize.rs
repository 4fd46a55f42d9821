//! A live resize seen by the guest kernel.
//!
//! A `microvm@guest-vm.service` unit in systemd (booted in nspawn) runs
//! QEMU (TCG) with the test guest's Debian kernel and an initramfs whose
//! script loads `virtio_balloon`, prints what the kernel sees (present and
//! online CPUs, MemTotal, MemAvailable), waits for both to change, onlines
//! the new CPUs and prints them again. vmd on this machine starts the unit
//! over D-Bus and resizes the VM over QMP, driven by `vmctl`:
//!
//! - `vmctl resize --vcpus 2` hot-plugs a CPU: the guest's
//!   `/sys/devices/system/cpu/present` goes from `0` to `0-1`;
//! - `vmctl resize --memory 384M` sets the balloon of the 512 MiB guest:
//!   the guest driver gives 128 MiB back, so MemTotal drops by that much,
//!   and QEMU's `query-balloon` (through `vmctl info`) reports 384 MiB.
//!
//! Both before/after readings are printed in the test log.

#![cfg(all(feature = "system-tests", feature = "guest-tests"))]

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use vmd::policy::{IdentityRule, Scope};
use vmd::vms::inventory::InventorySource;
use vmd_proto::Role;
use vmd_tests::TestServer;
use vmd_tests::guest::{GuestAssets, Initramfs, KERNEL_APPEND, processes_using};
use vmd_tests::microvm::{CONTAINER_STATE_DIR, DeclaredVm, MicrovmHost};

const VM: &str = "guest-vm";

/// Where the kernel and initramfs appear inside the container.
const CONTAINER_GUEST_DIR: &str = "/run/vmd-test/guest";

/// Boot, two resizes and the guest's reaction under TCG; bounds a hang.
const TIMEOUT: Duration = Duration::from_secs(180);

/// The guest's script: report, wait (at most 3 minutes) until a CPU has
/// been added and the balloon has taken 124 MiB or more, online the new
/// CPUs, report again, and stay up until the unit is stopped.
const SCRIPT: &str = r#"insmod /lib/modules/virtio_balloon.ko || echo "insmod virtio_balloon failed"
cpu=/sys/devices/system/cpu
mem() { awk -v k="$1:" '$1 == k { print $2 }' /proc/meminfo; }
report() {
  echo "$1 present=$(cat $cpu/present) online=$(cat $cpu/online) memtotal_kib=$(mem MemTotal) memavailable_kib=$(mem MemAvailable)"
}
present0=$(cat $cpu/present)
memtotal0=$(mem MemTotal)
report VMD-BEFORE
i=0
while [ $i -lt 1800 ]; do
  if [ "$(cat $cpu/present)" != "$present0" ] && [ "$(mem MemTotal)" -le $((memtotal0 - 126976)) ]; then
    break
  fi
  usleep 100000
  i=$((i + 1))
done
for c in $cpu/cpu[1-9]*; do
  [ -e "$c/online" ] && [ "$(cat $c/online)" = 0 ] && echo 1 > "$c/online"
done
report VMD-AFTER
sleep 600
"#;

/// The guest VM's QEMU arguments (its runner's `microvm-run`, in
/// microvm.nix's host shape): the test guest with one of four vCPUs,
/// 512 MiB and a balloon; the serial console goes to a file the test reads
/// through the shared state dir.
fn guest_args() -> Vec<String> {
    let state = CONTAINER_STATE_DIR;
    [
        "-accel",
        "tcg",
        "-M",
        "pc",
        "-nodefaults",
        "-display",
        "none",
        "-monitor",
        "none",
        "-cpu",
        "max",
        "-smp",
        "1,maxcpus=4",
        "-m",
        "512M,slots=2,maxmem=1G",
        "-device",
        "virtio-balloon-pci,id=balloon0",
    ]
    .into_iter()
    .map(str::to_owned)
    .chain([
        "-serial".to_owned(),
        format!("file:{state}/{VM}/console.log"),
        "-kernel".to_owned(),
        format!("{CONTAINER_GUEST_DIR}/vmlinux"),
        "-initrd".to_owned(),
        format!("{CONTAINER_GUEST_DIR}/initramfs.cpio"),
        "-append".to_owned(),
        KERNEL_APPEND.to_owned(),
    ])
    .collect()
}

/// The `key=value` fields of the console line that starts with `tag`.
fn reading(console: &str, tag: &str) -> Option<HashMap<String, String>> {
    let line = console
        .lines()
        .find_map(|l| l.strip_prefix(tag)?.strip_prefix(' '))?;
    Some(
        line.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    )
}

/// Waits until the guest console at `path` has a `tag` line.
async fn wait_for_reading(path: &Path, tag: &str, started: Instant) -> HashMap<String, String> {
    loop {
        let console = std::fs::read(path)
            .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
            .unwrap_or_default();
        if let Some(values) = reading(&console, tag) {
            return values;
        }
        assert!(
            started.elapsed() < TIMEOUT,
            "no {tag} line from the guest within {TIMEOUT:?}:\n{console}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn kib(values: &HashMap<String, String>, key: &str) -> u64 {
    values
        .get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric {key} in {values:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resize_is_seen_by_the_guest_kernel() {
    let started = Instant::now();
    let assets = GuestAssets::ready().await;
    let guest_dir = tempfile::tempdir().expect("temporary directory");
    std::fs::copy(&assets.kernel, guest_dir.path().join("vmlinux")).expect("copy the kernel");
    Initramfs::new(&assets)
        .script(SCRIPT)
        .write(&guest_dir.path().join("initramfs.cpio"));

    let host = MicrovmHost::new(&[DeclaredVm {
        qemu_args: Some(guest_args()),
        ..DeclaredVm::new(VM)
    }]);
    // The guest's own sizes (MicrovmHost declares 256 MiB for its QEMUs
    // without a guest; this one boots a kernel, which needs room to give).
    std::fs::write(
        host.inventory(),
        format!(
            "[vm.{VM}]\nvcpus = 1\nmax_vcpus = 4\nmemory_mib = 512\nmax_memory_mib = 512\n\
             control_socket = \"{}\"\n",
            host.socket(VM).display()
        ),
    )
    .expect("inventory");
    let container = host
        .container()
        .bind_ro(guest_dir.path(), CONTAINER_GUEST_DIR)
        .boot()
        .await;
    let server = TestServer::start_with(|c| {
        c.vms.inventory = InventorySource {
            state_dir: host.state_dir(),
            file: Some(host.inventory()),
        };
        c.vms.systemd_bus = Some(container.bus_address());
        c.policy.identities = vec![IdentityRule {
            change: Scope::all(),
            ..IdentityRule::new("admin", Some(Role::Admin))
        }];
    })
    .await;

    server.vmctl_ok(&["start", VM, "--wait"]).await;
    let console = host.state_dir().join(VM).join("console.log");
    let before = wait_for_reading(&console, "VMD-BEFORE", started).await;
    let booted = started.elapsed();

    server
        .vmctl_ok(&["resize", VM, "--vcpus", "2", "--wait"])
        .await;
    server
        .vmctl_ok(&["resize", VM, "--memory", "384M", "--wait"])
        .await;
    let after = wait_for_reading(&console, "VMD-AFTER", started).await;
    println!("guest before resize: {before:?}");
    println!("guest after resize:  {after:?}");

    assert_eq!(before["present"], "0", "{before:?}");
    assert_eq!(after["present"], "0-1", "the hot-plugged CPU: {after:?}");
    assert_eq!(after["online"], "0-1", "onlined by the guest: {after:?}");
    let given_back = kib(&before, "memtotal_kib") - kib(&after, "memtotal_kib");
    assert!(
        given_back >= 124 << 10,
        "the balloon took {given_back} KiB of MemTotal, expected about 128 MiB: \
         {before:?} -> {after:?}"
    );
    assert!(
        kib(&after, "memavailable_kib") < kib(&before, "memavailable_kib"),
        "{before:?} -> {after:?}"
    );
    // QEMU's view through vmd: the balloon has reached its target (the
    // guest driver reports it), and two vCPUs run.
    let deadline = Instant::now() + Duration::from_secs(30);
    let info = loop {
        let info: Value = serde_json::from_str(&server.vmctl_ok(&["info", VM, "--json"]).await)
            .expect("info is JSON");
        if info["memory"]["balloon_actual"] == 384 << 20 || Instant::now() > deadline {
            break info;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(info["memory"]["balloon_actual"], 384 << 20, "{info}");
    assert_eq!(info["vcpus"]["current"], 2, "{info}");
    println!(
        "vmd's view after: vcpus {}, balloon actual {} bytes",
        info["vcpus"]["current"], info["memory"]["balloon_actual"]
    );

    server.vmctl_ok(&["stop", VM, "--wait"]).await;
    let state = container
        .systemctl(&[
            "show",
            "-P",
            "ActiveState",
            &format!("microvm@{VM}.service"),
        ])
        .await;
    assert_eq!(state.trim(), "inactive");
    server.stop().await;
    assert!(container.stop().await, "the container halts cleanly");
    let strays = processes_using(Path::new(CONTAINER_GUEST_DIR));
    assert!(
        strays.is_empty(),
        "guest QEMU outlived the test: {strays:?}"
    );
    println!(
        "resize seen by the guest: guest up after {booted:.2?}, whole test {:.2?}",
        started.elapsed()
    );
}
