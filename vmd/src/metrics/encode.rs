//! The OpenMetrics text encoding of a scrape's registry, through
//! `prometheus-client` (no hand-written exposition).

use prometheus_client::registry::Registry;

/// The `Content-Type` of an OpenMetrics text exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The registry as OpenMetrics text, ending in `# EOF`.
///
/// # Errors
/// [`std::fmt::Error`] if a metric cannot be encoded (the encoder's own
/// failure; writing to a `String` does not fail).
pub fn encode(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut text = String::with_capacity(8 * 1024);
    prometheus_client::encoding::text::encode(&mut text, registry)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use vmd_proto::{
        Bytes, CpuInfo, CpuTimes, ErrorReply, HostInfo, MemoryCounts, MemoryInfo, Op,
        OperationKind, VcpuCounts, Virtualization, VmInfo, VmName, VmState,
    };

    use super::*;
    use crate::metrics::{Counters, Scrape, TlsRefusal, collect};

    fn host() -> HostInfo {
        HostInfo {
            hostname: "h".into(),
            kernel: "6.1".into(),
            vmd_version: "0".into(),
            uptime_secs: 1,
            vmd_uptime_secs: 1,
            cpu: CpuInfo {
                vendor: None,
                model: None,
                logical_cpus: 4,
                virt_flag: None,
            },
            memory: MemoryInfo {
                total: Bytes::mib(1024),
                available: Bytes::mib(512),
                in_use: Bytes::mib(512),
            },
            virtualization: Virtualization::Unavailable {
                reason: "test".into(),
            },
            load_milli: [1500, 250, 0],
            cpu_times: Some(CpuTimes {
                user_ms: 2500,
                system_ms: 1000,
                idle_ms: 9000,
                steal_ms: 0,
            }),
        }
    }

    fn vm(name: &str, state: VmState) -> VmInfo {
        let mut info = bare(name, state);
        info.vcpus = VcpuCounts {
            declared: Some(2),
            current: Some(3),
            max: None,
        };
        info.memory = MemoryCounts {
            declared: Some(Bytes::mib(512)),
            current: Some(Bytes::mib(768)),
            balloon_actual: Some(Bytes::mib(256)),
            max: None,
        };
        info.cpu_time_ns = Some(1_500_000_000);
        info.cgroup_memory = Some(Bytes::mib(100));
        info.restarts = Some(2);
        info.restart_needed = Some(true);
        info
    }

    fn bare(name: &str, state: VmState) -> VmInfo {
        VmInfo::new(VmName::new(name).expect("name"), state)
    }

    fn text(vms: &[VmInfo], counters: &Counters) -> String {
        let host = host();
        encode(&collect(&Scrape {
            host: &host,
            vms,
            watchers: 3,
            counters,
        }))
        .expect("encodes")
    }

    #[test]
    fn series_names_labels_and_units() {
        let counters = Counters::new();
        counters.request(Op::ListVms.name(), Ok(()));
        counters.request(
            Op::ListVms.name(),
            Err(&ErrorReply::Forbidden { reason: "x".into() }),
        );
        counters.operation(OperationKind::Start, true);
        counters.tls_refusal(TlsRefusal::UnknownCa);
        let text = text(&[vm("net-vm", VmState::Running)], &counters);
        for line in [
            "vmd_host_cpu_seconds_total{mode=\"user\"} 2.5",
            "# TYPE vmd_host_cpu_seconds counter",
            "# UNIT vmd_host_cpu_seconds seconds",
            "vmd_host_memory_total_bytes 1073741824",
            "vmd_host_memory_available_bytes 536870912",
            "vmd_host_load1 1.5",
            "vmd_host_load5 0.25",
            "vmd_host_load15 0.0",
            "vmd_host_kvm_available 0",
            "vmd_vm_state{vm=\"net-vm\",state=\"running\"} 1",
            "vmd_vm_state{vm=\"net-vm\",state=\"stopped\"} 0",
            "vmd_vm_state{vm=\"net-vm\",state=\"frozen\"} 0",
            "vmd_vm_vcpus{vm=\"net-vm\"} 3",
            "vmd_vm_memory_declared_bytes{vm=\"net-vm\"} 536870912",
            "vmd_vm_memory_current_bytes{vm=\"net-vm\"} 805306368",
            "vmd_vm_memory_balloon_bytes{vm=\"net-vm\"} 268435456",
            "vmd_vm_cpu_seconds_total{vm=\"net-vm\"} 1.5",
            "vmd_vm_memory_in_use_bytes{vm=\"net-vm\"} 104857600",
            "vmd_vm_restarts_total{vm=\"net-vm\"} 2",
            "vmd_vm_restart_needed{vm=\"net-vm\"} 1",
            "vmd_requests_total{op=\"list-vms\",result=\"ok\"} 1",
            "vmd_requests_total{op=\"list-vms\",result=\"forbidden\"} 1",
            "vmd_operations_total{kind=\"start\",outcome=\"succeeded\"} 1",
            "vmd_tls_refusals_total{reason=\"unknown_ca\"} 1",
            "vmd_tls_refusals_total{reason=\"no_certificate\"} 0",
            "vmd_watchers 3",
            "vmd_connections_total{listener=\"main\",transport=\"tcp\"} 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn one_state_is_one() {
        let text = text(&[vm("a", VmState::Stopped)], &Counters::new());
        let ones: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("vmd_vm_state{") && l.ends_with(" 1"))
            .collect();
        assert_eq!(ones, ["vmd_vm_state{vm=\"a\",state=\"stopped\"} 1"]);
        let states = text
            .lines()
            .filter(|l| l.starts_with("vmd_vm_state{"))
            .count();
        assert_eq!(states, crate::metrics::STATES.len());
    }

    #[test]
    fn unknown_values_are_left_out() {
        let text = text(&[bare("bare", VmState::Stopped)], &Counters::new());
        assert!(text.contains("vmd_vm_state{vm=\"bare\",state=\"stopped\"} 1"));
        for family in [
            "vmd_vm_cpu_seconds_total{",
            "vmd_vm_memory_in_use_bytes{",
            "vmd_vm_restart_needed{",
        ] {
            assert!(!text.contains(family), "{family} without a value:\n{text}");
        }
    }
}
