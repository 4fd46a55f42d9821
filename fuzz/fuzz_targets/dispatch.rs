//! Arbitrary request bodies through the daemon's request handler.
//!
//! 1. The input is decoded as one `Request` body; inputs that do not
//!    decode are skipped (the `frame_decode` target covers those).
//! 2. Waits are clamped to 1 ms (`WaitOperation`, `Watch`) so no input can
//!    stall the fuzzer.
//! 3. Each input gets fresh in-memory backends (`FakeUnits`, `FakeControl`)
//!    and operation registry, so a finding reproduces from its input
//!    alone. The inventory (five VMs in every state the handler branches
//!    on) lives in a temporary directory written once per process.
//! 4. `Handler::handle` runs on a current-thread runtime built once, with
//!    time and IO as the daemon's, for an admin session whose grant covers
//!    every VM.
//! 5. Checks: the response carries the request id; a VM the inventory does
//!    not declare is `NotFound`; the response fits in a reply frame; an
//!    accepted change runs to its end (its task is where backends are
//!    called; a panic there aborts through libFuzzer's panic hook).

#![no_main]

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use tokio::runtime::Runtime;
use vmd::drivers::fake::{FakeControl, FakeUnits};
use vmd::drivers::{ActiveState, LiveState, RunState};
use vmd::connection::Session;
use vmd::handler::Handler;
use vmd::host::HostProbe;
use vmd::vms::inventory::InventorySource;
use vmd::vms::ops::{OperationLimits, Operations};
use vmd::policy::{Grant, Scope};
use vmd::tls::PeerIdentity;
use vmd::transport::PeerAddr;
use vmd::vms::{ChangeDeadlines, VmService};
use vmd_proto::frame::{self, MAX_REPLY_FRAME};
use vmd_proto::{ErrorReply, Op, OperationStatus, Reply, Request};

/// The session's certificate name (operations are visible to their owner).
const IDENTITY: &str = "fuzz-admin";

/// The declared VMs, with their unit state and whether they have a live
/// QEMU control socket.
const VMS: [(&str, ActiveState, bool); 5] = [
    ("app-vm", ActiveState::Inactive, true),
    ("net-vm", ActiveState::Active, true),
    ("admin-vm", ActiveState::Active, true),
    ("chv", ActiveState::Active, false),
    ("bare", ActiveState::Failed, false),
];

const INVENTORY: &str = r#"
[vm.app-vm]
hypervisor = "qemu"
vcpus = 1
max_vcpus = 4
memory_mib = 1024
max_memory_mib = 2048
vsock_cid = 3
[vm.net-vm]
description = "net"
hypervisor = "qemu"
vcpus = 2
max_vcpus = 8
memory_mib = 512
vsock_cid = 4
[vm.admin-vm]
hypervisor = "qemu"
protected = true
[vm.chv]
hypervisor = "cloud-hypervisor"
vsock_cid = 5
[vm.bare]
"#;

/// Built once per process.
struct World {
    runtime: Runtime,
    state_dir: PathBuf,
    inventory: PathBuf,
    started: Instant,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        // Kept for the life of the process; `scripts/fuzz` points TMPDIR
        // into fuzz/target so these do not pile up in /tmp.
        let dir = tempfile::Builder::new()
            .prefix("vmd-fuzz-dispatch-")
            .tempdir()
            .expect("a temporary directory for the inventory")
            .keep();
        let state_dir = dir.join("microvms");
        for (name, _, live) in VMS {
            std::fs::create_dir_all(state_dir.join(name)).expect("VM state directory");
            if live {
                std::fs::write(socket(&state_dir, name), "").expect("control socket stand-in");
            }
        }
        let inventory = dir.join("inventory.toml");
        std::fs::write(&inventory, INVENTORY).expect("inventory file");
        // IO as well as time: the service follows running units' cgroup
        // events through inotify, an IO source of the runtime's reactor.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        World {
            runtime,
            state_dir,
            inventory,
            started: Instant::now(),
        }
    })
}

/// Where the inventory puts a QEMU VM's control socket by default.
fn socket(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join(name).join(format!("{name}.sock"))
}

/// Fresh backends and registry over the shared inventory (step 3).
fn service(world: &World) -> VmService {
    let units = Arc::new(FakeUnits::default());
    let control = Arc::new(FakeControl::default());
    for (name, state, live) in VMS {
        let unit = format!("microvm@{name}.service");
        units.set(&unit, state.clone());
        if state == ActiveState::Active {
            units.wanted.lock().expect("fresh lock").insert(unit);
        }
        if live {
            control.live.lock().expect("fresh lock").insert(
                socket(&world.state_dir, name),
                LiveState {
                    run_state: Some(RunState::Running),
                    vcpus: Some(1),
                    vcpu_slots: Some(4),
                    base_memory: Some(1024 << 20),
                    plugged_memory: Some(0),
                    balloon_actual: Some(1024 << 20),
                    devices: None,
                },
            );
        }
    }
    VmService::new(
        InventorySource {
            state_dir: world.state_dir.clone(),
            file: Some(world.inventory.clone()),
        },
        units,
        control,
        Operations::new(OperationLimits::default()),
        ChangeDeadlines::default(),
    )
}

fn admin_session() -> Arc<Session> {
    Arc::new(Session {
        identity: PeerIdentity {
            name: IDENTITY.into(),
            spki_sha256: "00".repeat(32),
        },
        peer: PeerAddr::Tcp(([127, 0, 0, 1], 40000).into()),
        grant: Grant {
            role: Some(vmd_proto::Role::Admin),
            visible: Scope::all(),
            change: Scope::all(),
            matched: true,
        },
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(mut request) = frame::decode::<Request>(data) else {
        return;
    };
    // Step 2.
    match &mut request.body {
        Op::WaitOperation { timeout_ms, .. } | Op::Watch { timeout_ms, .. } => {
            *timeout_ms = (*timeout_ms).min(1);
        }
        _ => {}
    }
    let world = world();
    let service = service(world);
    world
        .runtime
        .block_on(service.start())
        .expect("the inventory reads");
    let handler = Arc::new(Handler::new(HostProbe::new(world.started), service.clone()));
    let id = request.id;
    let unknown_vm = request
        .body
        .vm()
        .filter(|name| !VMS.iter().any(|(known, ..)| name.as_str() == *known))
        .cloned();
    world.runtime.block_on(async {
        let response = handler.handle(admin_session(), request).await;
        assert_eq!(response.id, id, "the response answers another request");
        if let Some(name) = unknown_vm {
            assert!(
                matches!(&response.result, Err(ErrorReply::NotFound { .. })),
                "undeclared VM {name}: {:?}",
                response.result
            );
        }
        frame::encode(&response, MAX_REPLY_FRAME).expect("the response fits in a reply frame");
        if let Ok(Reply::Accepted(op)) = &response.result {
            // The fakes answer at once; only a stuck operation waits long.
            let done = service
                .operations()
                .wait(op.id, Duration::from_secs(10), IDENTITY)
                .await
                .expect("an accepted operation is known to its owner");
            assert_ne!(
                done.status,
                OperationStatus::Running,
                "operation {} did not finish",
                op.id
            );
        }
    });
});
