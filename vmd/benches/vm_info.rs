//! Building `VmInfo` replies: `vms::vm_info` renders a live record (the
//! declared spec, systemd's unit status, QEMU's live facts) and the
//! cgroup's usage, once per VM per request; `list_100` builds and frames a
//! whole `ListVms` reply of 100 VMs. The cgroup reads themselves are not in
//! here (they are files of the host).
//!
//! `cargo bench -p vmd --bench vm_info` (`-- --test` runs each once).

#![forbid(unsafe_code)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use vmd::drivers::cgroup::Usage;
use vmd::drivers::{ActiveState, LiveState, RunState, UnitStatus};
use vmd::vms::inventory::VmSpec;
use vmd::vms::model::Record;
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
        monitor_socket: Some(format!("/var/lib/microvms/{name}/vmd-qmp.sock").into()),
        dir: None,
        resources: vmd_proto::Resources::default(),
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
        n_restarts: Some(0),
        control_group: Some("/system.slice/system-microvm.slice/microvm@x.service".into()),
        ..UnitStatus::not_loaded()
    }
}

fn usage() -> Usage {
    Usage {
        cpu_ns: Some(123_456_789_000),
        memory: Some(2100 << 20),
        tasks: Some(9),
        frozen: Some(false),
    }
}

fn record(spec: VmSpec, status: &UnitStatus, live: Option<&LiveState>) -> Record {
    let mut record = Record::new(spec);
    record.apply_unit(status.clone());
    if let Some(live) = live {
        record.apply_live(live.clone(), vmd_proto::LiveSource::Monitor);
    }
    record
}

fn live() -> LiveState {
    LiveState {
        run_state: Some(RunState::Running),
        vcpus: Some(2),
        vcpu_slots: Some(4),
        base_memory: Some(2048 << 20),
        plugged_memory: Some(0),
        balloon_actual: Some(1536 << 20),
        devices: Some(vec![("balloon0".into(), "virtio-balloon-pci".into())]),
    }
}

fn build(c: &mut Criterion) {
    let (status, live) = (status(), live());
    let one = record(spec(1), &status, Some(&live));
    c.bench_function("vm_info/running", |b| {
        b.iter(|| vm_info(black_box(&one), usage(), NOW_USEC));
    });
    c.bench_function("vm_info/stopped", |b| {
        let stopped = UnitStatus {
            active_state: ActiveState::Inactive,
            sub_state: "dead".into(),
            main_pid: None,
            ..status.clone()
        };
        let one = record(spec(1), &stopped, None);
        b.iter(|| vm_info(black_box(&one), Usage::default(), NOW_USEC));
    });
    let records: Vec<Record> = (0..100)
        .map(|i| record(spec(i), &status, Some(&live)))
        .collect();
    c.bench_function("reply/list_100_build_and_frame", |b| {
        b.iter(|| {
            let vms = records
                .iter()
                .map(|r| vm_info(r, usage(), NOW_USEC))
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
