//! Building `VmInfo` replies: `vms::vm_info` combines the declared spec,
//! systemd's unit status and QEMU's live facts, once per VM per request;
//! `list_100` builds and frames a whole `ListVms` reply of 100 VMs.
//!
//! `cargo bench -p vmd --bench vm_info` (`-- --test` runs each once).

#![forbid(unsafe_code)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use vmd::drivers::{ActiveState, LiveState, RunState, UnitStatus};
use vmd::vms::inventory::VmSpec;
use vmd::vms::vm_info;
use vmd_proto::frame::{MAX_REPLY_FRAME, encode};
use vmd_proto::{Bytes, Cid, Hypervisor, Reply, Response, VmName};

const NOW_USEC: u64 = 1_750_000_000_000_000;

fn spec(i: usize) -> VmSpec {
    let name = format!("app-vm-{i}");
    VmSpec {
        description: Some("application VM".into()),
        hypervisor: Some(Hypervisor::Qemu),
        vcpus: Some(2),
        max_vcpus: Some(4),
        memory: Some(Bytes::mib(2048)),
        max_memory: Some(Bytes::mib(4096)),
        vsock_cid: Some(Cid(u32::try_from(i).unwrap_or(0) + 3)),
        control_socket: Some(format!("/var/lib/microvms/{name}/{name}.sock").into()),
        vsock_uds: None,
        unit: format!("microvm@{name}.service"),
        protected: false,
        name: VmName::new(name).expect("valid name"),
    }
}

fn status() -> UnitStatus {
    UnitStatus {
        load_state: "loaded".into(),
        active_state: ActiveState::Active,
        sub_state: "running".into(),
        main_pid: Some(4242),
        active_enter_usec: Some(NOW_USEC - 3_600_000_000),
        memory_current: Some(2100 << 20),
        cpu_usage_nsec: Some(123_456_789_000),
        tasks_current: Some(9),
    }
}

fn live() -> LiveState {
    LiveState {
        run_state: Some(RunState::Running),
        vcpus: Some(2),
        vcpu_slots: Some(4),
        base_memory: Some(2048 << 20),
        plugged_memory: Some(0),
        balloon_actual: Some(1536 << 20),
    }
}

fn build(c: &mut Criterion) {
    let (one, status, live) = (spec(1), status(), live());
    c.bench_function("vm_info/running", |b| {
        b.iter(|| vm_info(black_box(&one), Some(&status), Some(&live), NOW_USEC));
    });
    c.bench_function("vm_info/stopped", |b| {
        let stopped = UnitStatus {
            active_state: ActiveState::Inactive,
            sub_state: "dead".into(),
            main_pid: None,
            ..status.clone()
        };
        b.iter(|| vm_info(black_box(&one), Some(&stopped), None, NOW_USEC));
    });
    let specs: Vec<VmSpec> = (0..100).map(spec).collect();
    c.bench_function("reply/list_100_build_and_frame", |b| {
        b.iter(|| {
            let vms = specs
                .iter()
                .map(|s| vm_info(s, Some(&status), Some(&live), NOW_USEC))
                .collect();
            let response = Response {
                id: 1,
                result: Ok(Reply::Vms(vms)),
            };
            encode(black_box(&response), MAX_REPLY_FRAME).expect("encodes")
        });
    });
}

criterion_group!(benches, build);
criterion_main!(benches);
