//! Frame encode and decode of the main messages (postcard body plus the
//! length prefix), as the daemon and the client do per request.
//!
//! `cargo bench -p vmd-proto --bench frame` (`-- --test` runs each once).

#![forbid(unsafe_code)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use vmd_proto::frame::{HEADER_LEN, MAX_REPLY_FRAME, MAX_REQUEST_FRAME, decode, encode};
use vmd_proto::{
    Bytes, Cid, CpuInfo, CpuTimes, HostInfo, Hypervisor, KvmCapability, KvmInfo, LiveFacts,
    LiveSource, MemoryCounts, MemoryInfo, Op, Reply, Request, Resources, Response, UnitInfo,
    VcpuCounts, VirtFlag, Virtualization, VmInfo, VmName, VmState,
};

fn host() -> HostInfo {
    HostInfo {
        hostname: "ghaf-host".into(),
        kernel: "6.12.30".into(),
        vmd_version: "0.1.0".into(),
        uptime_secs: 86_400,
        vmd_uptime_secs: 3_600,
        cpu: CpuInfo {
            vendor: Some("GenuineIntel".into()),
            model: Some("13th Gen Intel(R) Core(TM) i7-1365U".into()),
            logical_cpus: 12,
            virt_flag: Some(VirtFlag::Vmx),
        },
        memory: MemoryInfo {
            total: Bytes::mib(32 * 1024),
            available: Bytes::mib(20 * 1024),
            in_use: Bytes::mib(12 * 1024),
        },
        virtualization: Virtualization::Available(KvmInfo {
            api_version: 12,
            recommended_vcpus: 12,
            max_vcpus: 4096,
            max_memslots: 32_764,
            capabilities: ["user-memory", "irqchip", "hlt", "ioeventfd", "irqfd"]
                .iter()
                .map(|name| KvmCapability {
                    name: (*name).into(),
                    supported: true,
                })
                .collect(),
        }),
        load_milli: [1_250, 900, 700],
        cpu_times: Some(CpuTimes {
            user_ms: 3_600_000,
            system_ms: 900_000,
            idle_ms: 80_000_000,
            steal_ms: 0,
        }),
    }
}

/// A running VM with every field known.
fn vm(i: usize) -> VmInfo {
    VmInfo {
        name: VmName::new(format!("app-vm-{i}")).expect("valid name"),
        description: Some("application VM".into()),
        hypervisor: Some(Hypervisor::Qemu),
        state: VmState::Running,
        autostart: Some(true),
        protected: false,
        vsock_cid: Some(Cid(u32::try_from(i).unwrap_or(0) + 3)),
        vcpus: VcpuCounts {
            declared: Some(2),
            current: Some(2),
            max: Some(4),
        },
        memory: MemoryCounts {
            declared: Some(Bytes::mib(2048)),
            current: Some(Bytes::mib(2048)),
            balloon_actual: Some(Bytes::mib(1536)),
            max: Some(Bytes::mib(4096)),
        },
        pid: Some(4242),
        uptime_secs: Some(3_600),
        cgroup_memory: Some(Bytes::mib(2100)),
        cpu_time_ns: Some(123_456_789_000),
        tasks: Some(9),
        pending: None,
        unit: Some(UnitInfo {
            name: format!("microvm@app-vm-{i}.service"),
            active_state: "active".into(),
            sub_state: "running".into(),
            freezer_state: Some("running".into()),
            age_ms: Some(40_000),
        }),
        run_state: Some("running".into()),
        live: LiveFacts {
            source: LiveSource::Monitor,
            age_ms: Some(40_000),
            note: None,
        },
        last_exit: None,
        restarts: Some(0),
        restart_needed: Some(false),
        resources: Resources::default(),
    }
}

fn bench_round_trip<T>(c: &mut Criterion, name: &str, msg: &T, max: u32)
where
    T: serde::Serialize + serde::de::DeserializeOwned,
{
    let bytes = encode(msg, max).expect("encodes");
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.bench_function("encode", |b| {
        b.iter(|| encode(black_box(msg), max).expect("encodes"));
    });
    group.bench_function("decode", |b| {
        b.iter(|| decode::<T>(black_box(&bytes[HEADER_LEN..])).expect("decodes"));
    });
    group.finish();
}

fn frames(c: &mut Criterion) {
    let host_request = Request {
        id: 7,
        body: Op::Host,
    };
    let get_request = Request {
        id: 8,
        body: Op::GetVm {
            name: VmName::new("app-vm-1").expect("valid name"),
        },
    };
    bench_round_trip(c, "request_host", &host_request, MAX_REQUEST_FRAME);
    bench_round_trip(c, "request_get_vm", &get_request, MAX_REQUEST_FRAME);
    let host_reply = Response {
        id: 7,
        result: Ok(Reply::Host(host())),
    };
    bench_round_trip(c, "response_host", &host_reply, MAX_REPLY_FRAME);
    let vm_reply = Response {
        id: 8,
        result: Ok(Reply::Vm(vm(1))),
    };
    bench_round_trip(c, "response_vm", &vm_reply, MAX_REPLY_FRAME);
    let list_reply = Response {
        id: 9,
        result: Ok(Reply::Vms((0..100).map(vm).collect())),
    };
    bench_round_trip(c, "response_list_100", &list_reply, MAX_REPLY_FRAME);
}

criterion_group!(benches, frames);
criterion_main!(benches);
