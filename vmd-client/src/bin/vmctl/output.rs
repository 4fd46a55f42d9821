//! Human-readable tables and `--json` output.

use std::fmt::Write;

use serde::Serialize;
use vmd_proto::{HostInfo, OperationInfo, OperationStatus, Rights, Virtualization, VmInfo};

/// JSON if asked, else the human form.
pub(crate) fn render<T: Serialize + ?Sized>(
    json: bool,
    value: &T,
    human: impl Fn(&T) -> String,
) -> Result<String, serde_json::Error> {
    if json {
        serde_json::to_string_pretty(value)
    } else {
        Ok(human(value).trim_end().to_owned())
    }
}

/// `key  value` lines with aligned values.
fn pairs(rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (key, value) in rows {
        let _ = writeln!(out, "{key:width$}  {value}");
    }
    out
}

/// `vmctl config`.
pub(crate) fn config(
    source: &str,
    endpoints: &[String],
    config: &vmd_client::ClientConfig,
) -> String {
    pairs(&[
        ("file", source.to_owned()),
        ("endpoints", endpoints.join(", ")),
        ("auto_tcp", config.auto_tcp.to_string()),
        ("ca", config.ca.display().to_string()),
        ("cert", config.cert.display().to_string()),
        ("key", config.key.display().to_string()),
        ("server_name", config.server_name.clone()),
        (
            "connect_timeout",
            format!("{} ms", config.connect_timeout.as_millis()),
        ),
        ("hosts", list_or_dash(config.hosts.keys().cloned())),
    ])
    .trim_end()
    .to_owned()
}

/// `vmctl whoami`.
pub(crate) fn rights(rights: &Rights) -> String {
    pairs(&[
        ("identity", rights.identity.clone()),
        ("role", or_dash(rights.role)),
        (
            "may change",
            list_or_dash(rights.changeable.iter().map(ToString::to_string)),
        ),
    ])
}

pub(crate) fn or_dash<T: ToString>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

pub(crate) fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// `vmctl host`.
pub(crate) fn host(host: &HostInfo) -> String {
    let cpu = &host.cpu;
    let mut rows = vec![
        ("Host", host.hostname.clone()),
        ("Kernel", host.kernel.clone()),
        (
            "vmd",
            format!(
                "{} (up {})",
                host.vmd_version,
                duration(host.vmd_uptime_secs)
            ),
        ),
        ("Uptime", duration(host.uptime_secs)),
        (
            "CPU",
            format!(
                "{} logical, {}{}",
                cpu.logical_cpus,
                cpu.model
                    .as_deref()
                    .or(cpu.vendor.as_deref())
                    .unwrap_or("unknown model"),
                cpu.virt_flag.map_or(String::new(), |f| format!(
                    ", {}",
                    format!("{f:?}").to_lowercase()
                ))
            ),
        ),
        (
            "Memory",
            format!(
                "{} total, {} in use, {} available",
                host.memory.total, host.memory.in_use, host.memory.available
            ),
        ),
        (
            "Load",
            host.load_milli
                .iter()
                .map(|l| format!("{}.{:02}", l / 1000, l % 1000 / 10))
                .collect::<Vec<_>>()
                .join(" "),
        ),
        (
            "CPU time",
            or_dash(host.cpu_times.as_ref().map(|t| {
                format!(
                    "{:.0}s user, {:.0}s system, {:.0}s idle, {:.0}s steal (since boot)",
                    t.user_ms as f64 / 1000.0,
                    t.system_ms as f64 / 1000.0,
                    t.idle_ms as f64 / 1000.0,
                    t.steal_ms as f64 / 1000.0
                )
            })),
        ),
    ];
    match &host.virtualization {
        Virtualization::Available(kvm) => {
            rows.push((
                "KVM",
                format!(
                    "available (API {}), {} recommended / {} max vCPUs, {} memslots",
                    kvm.api_version, kvm.recommended_vcpus, kvm.max_vcpus, kvm.max_memslots
                ),
            ));
            let (yes, no): (Vec<_>, Vec<_>) = kvm.capabilities.iter().partition(|c| c.supported);
            let names = |caps: Vec<&vmd_proto::KvmCapability>| {
                caps.iter()
                    .map(|c| c.name.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            rows.push(("Capabilities", names(yes)));
            if !no.is_empty() {
                rows.push(("Missing", names(no)));
            }
        }
        Virtualization::Unavailable { reason } => {
            rows.push(("KVM", format!("unavailable: {reason}")));
        }
    }
    pairs(&rows)
}

/// The columns of `vmctl list`.
const VM_COLUMNS: [&str; 8] = [
    "NAME",
    "STATE",
    "VCPUS",
    "MEMORY",
    "CID",
    "HYPERVISOR",
    "AUTOSTART",
    "RESTART",
];

/// One VM's cells under [`VM_COLUMNS`].
fn vm_cells(vm: &VmInfo) -> Vec<String> {
    vec![
        vm.name.to_string(),
        vm.state.to_string(),
        or_dash(vm.vcpus.current.or(vm.vcpus.declared)),
        or_dash(vm.memory.current.or(vm.memory.declared)),
        or_dash(vm.vsock_cid),
        or_dash(vm.hypervisor.as_ref()),
        or_dash(vm.autostart.map(|a| if a { "yes" } else { "no" })),
        restart(vm),
    ]
}

/// Aligned columns, two spaces apart, without trailing blanks.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let cells: Vec<String> = cells.zip(&widths).map(|(c, w)| format!("{c:w$}")).collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// `vmctl list`.
pub(crate) fn vm_table(vms: &[VmInfo]) -> String {
    if vms.is_empty() {
        return "no VMs".to_owned();
    }
    let rows: Vec<Vec<String>> = vms.iter().map(vm_cells).collect();
    table(&VM_COLUMNS, &rows)
}

/// `vmctl list --all-hosts`: a HOST column first; a host without a list
/// is one row with its state (`unreachable`, `error`) and, in a last
/// ERROR column, why.
pub(crate) fn hosts_table(answers: &[(String, crate::hosts::HostAnswer)]) -> String {
    let silent = answers.iter().any(|(_, a)| a.is_err());
    let mut header = vec!["HOST"];
    header.extend(VM_COLUMNS);
    if silent {
        header.push("ERROR");
    }
    let mut rows = Vec::new();
    for (host, answer) in answers {
        match answer {
            Ok(vms) => {
                for vm in vms {
                    let mut row = vec![host.clone()];
                    row.extend(vm_cells(vm));
                    if silent {
                        row.push(String::new());
                    }
                    rows.push(row);
                }
            }
            Err(why) => {
                let mut row = vec![host.clone(), "-".into(), why.state.into()];
                row.extend((2..VM_COLUMNS.len()).map(|_| "-".to_owned()));
                row.push(why.error.clone());
                rows.push(row);
            }
        }
    }
    if rows.is_empty() {
        return "no VMs".to_owned();
    }
    table(&header, &rows)
}

/// `vmctl info VM`.
pub(crate) fn vm_details(vm: &VmInfo) -> String {
    let counts = |declared: Option<String>, current: Option<String>, max: Option<String>| {
        format!(
            "{} now, {} declared, {} max",
            or_dash(current),
            or_dash(declared),
            or_dash(max)
        )
    };
    let rows = vec![
        ("Name", vm.name.to_string()),
        ("Description", or_dash(vm.description.as_ref())),
        ("State", vm.state.to_string()),
        ("Hypervisor", or_dash(vm.hypervisor.as_ref())),
        ("Autostart", or_dash(vm.autostart)),
        ("Protected", vm.protected.to_string()),
        ("vsock CID", or_dash(vm.vsock_cid)),
        (
            "vCPUs",
            counts(
                vm.vcpus.declared.map(|v| v.to_string()),
                vm.vcpus.current.map(|v| v.to_string()),
                vm.vcpus.max.map(|v| v.to_string()),
            ),
        ),
        (
            "Memory",
            counts(
                vm.memory.declared.map(|v| v.to_string()),
                vm.memory.current.map(|v| v.to_string()),
                vm.memory.max.map(|v| v.to_string()),
            ),
        ),
        ("Balloon", or_dash(vm.memory.balloon_actual)),
        ("PID", or_dash(vm.pid)),
        ("Uptime", or_dash(vm.uptime_secs.map(duration))),
        ("cgroup memory", or_dash(vm.cgroup_memory)),
        (
            "CPU time",
            or_dash(vm.cpu_time_ns.map(|ns| format!("{:.2}s", ns as f64 / 1e9))),
        ),
        ("Tasks", or_dash(vm.tasks)),
        ("Pending", pending(vm)),
        (
            "Unit",
            or_dash(vm.unit.as_ref().map(|u| {
                let frozen = u
                    .freezer_state
                    .as_deref()
                    .filter(|f| *f != "running")
                    .map(|f| format!(", {f}"))
                    .unwrap_or_default();
                format!("{} ({}/{}{frozen})", u.name, u.active_state, u.sub_state)
            })),
        ),
        ("Run state", or_dash(vm.run_state.as_ref())),
        ("Live facts", live_facts(vm)),
        ("Last exit", or_dash(vm.last_exit.as_ref().map(last_exit))),
        ("Restarts", or_dash(vm.restarts)),
        ("Restart needed", restart(vm)),
        (
            "Interfaces",
            list_or_dash(vm.resources.interfaces.iter().map(|i| match &i.mac {
                Some(mac) => format!("{} ({}, {mac})", i.name, i.kind),
                None => format!("{} ({})", i.name, i.kind),
            })),
        ),
        (
            "Shares",
            list_or_dash(
                vm.resources
                    .shares
                    .iter()
                    .map(|s| format!("{} <- {}", s.tag, s.source)),
            ),
        ),
        (
            "PCI devices",
            list_or_dash(vm.resources.pci_devices.iter().cloned()),
        ),
        (
            "USB devices",
            list_or_dash(vm.resources.usb_devices.iter().cloned()),
        ),
        (
            "Devices now",
            or_dash(
                vm.resources
                    .runtime_devices
                    .as_ref()
                    .map(|d| list_or_dash(d.iter().map(|d| format!("{} ({})", d.id, d.driver)))),
            ),
        ),
    ];
    pairs(&rows)
}

/// Whether the VM needs a restart for a newer configuration.
pub(crate) fn restart(vm: &VmInfo) -> String {
    or_dash(vm.restart_needed.map(|r| if r { "needed" } else { "no" }))
}

/// Where the live facts came from and how old they are.
fn live_facts(vm: &VmInfo) -> String {
    let source = match vm.live.source {
        vmd_proto::LiveSource::None => return or_dash(vm.live.note.as_ref()),
        vmd_proto::LiveSource::Monitor => "vmd's monitor",
        vmd_proto::LiveSource::SharedSocket => "shared control socket",
    };
    let age = vm
        .live
        .age_ms
        .map(|ms| format!(", {:.1}s old", ms as f64 / 1000.0))
        .unwrap_or_default();
    let note = vm
        .live
        .note
        .as_ref()
        .map(|n| format!(" ({n})"))
        .unwrap_or_default();
    format!("{source}{age}{note}")
}

/// `signal 9 (signal) at …`, `exit 1 (exit-code)`.
fn last_exit(exit: &vmd_proto::LastExit) -> String {
    let how = match (exit.signal, exit.exit_status) {
        (Some(signal), _) => format!("signal {signal}"),
        (None, Some(status)) => format!("exit {status}"),
        (None, None) => "ended".to_owned(),
    };
    format!("{how} ({})", exit.result)
}

fn list_or_dash(items: impl Iterator<Item = String>) -> String {
    let items: Vec<String> = items.collect();
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.join(", ")
    }
}

/// A VM's change in progress: `start (op-3)`, or `-`.
pub(crate) fn pending(vm: &VmInfo) -> String {
    or_dash(vm.pending.as_ref().map(|p| match p.id {
        Some(id) => format!("{} ({id})", p.kind),
        None => p.kind.to_string(),
    }))
}

/// `now/declared`, `-` for what is unknown.
pub(crate) fn now_of<T: ToString>(now: Option<T>, declared: Option<T>) -> String {
    format!("{}/{}", or_dash(now), or_dash(declared))
}

/// `vmctl watch`: one VM on one line,
/// `gui-vm  running  vcpus 2/2  memory 2 GiB/2 GiB  balloon -  up 5m 3s  pending -`.
pub(crate) fn watch_line(vm: &VmInfo) -> String {
    format!(
        "{}  {}  vcpus {}  memory {}  balloon {}  up {}  pending {}",
        vm.name,
        vm.state,
        now_of(vm.vcpus.current, vm.vcpus.declared),
        now_of(vm.memory.current, vm.memory.declared),
        or_dash(vm.memory.balloon_actual),
        or_dash(vm.uptime_secs.map(duration)),
        pending(vm),
    )
}

/// An operation: `op-3  start  gui-vm  succeeded (1.2s)`.
pub(crate) fn operation(op: &OperationInfo) -> String {
    let took = op.finished_unix_ms.map_or(String::new(), |end| {
        #[allow(clippy::cast_precision_loss)] // display only
        let secs = end.saturating_sub(op.started_unix_ms) as f64 / 1000.0;
        format!(" ({secs:.1}s)")
    });
    let status = match &op.status {
        OperationStatus::Running => "accepted, running".to_owned(),
        other => other.to_string(),
    };
    format!("{}  {}  {}  {status}{took}", op.id, op.kind, op.vm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(duration(5), "5s");
        assert_eq!(duration(65), "1m 5s");
        assert_eq!(duration(3700), "1h 1m");
        assert_eq!(duration(90_000), "1d 1h");
    }

    #[test]
    fn a_watch_line_names_the_vm_and_its_state_first() {
        let vm: VmInfo = serde_json::from_value(serde_json::json!({
            "name": "gui-vm", "description": null, "hypervisor": null, "state": "running",
            "autostart": null, "protected": false, "vsock_cid": null,
            "vcpus": {"declared": 2, "current": 2, "max": 4},
            "memory": {"declared": 2147483648_u64, "current": null, "balloon_actual": null, "max": null},
            "pid": 7, "uptime_secs": 303, "cgroup_memory": null, "cpu_time_ns": null,
            "tasks": null, "pending": null
        }))
        .expect("a VmInfo");
        assert_eq!(
            watch_line(&vm),
            "gui-vm  running  vcpus 2/2  memory -/2 GiB  balloon -  up 5m 3s  pending -"
        );
    }

    #[test]
    fn empty_list_says_so() {
        assert_eq!(vm_table(&[]), "no VMs");
    }
}
