//! `vmctl watch`: one line per VM change, the current state first.
//!
//! 1. Signal handlers for SIGINT and SIGTERM are installed before the first
//!    request, so an interrupt at any time ends the watch with exit 0.
//! 2. The snapshot prints one line per watched VM, sorted by name.
//! 3. Each change prints one line per changed VM and one per removed VM;
//!    `--count N` exits after N such lines (the first snapshot's lines do
//!    not count, so `--count 0` prints the snapshot and exits).
//! 4. A connection or server error ends the watch with its exit code; a
//!    closed stdout (`vmctl watch | head -3`) ends it quietly.

use std::collections::BTreeSet;
use std::io::{self, Write};

use futures_util::StreamExt;
use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};
use vmd_client::{Client, ClientError};
use vmd_proto::{VmInfo, VmName, WatchEvent};

use crate::{Failure, output};

/// What one `vmctl watch` prints.
#[derive(Debug)]
pub(crate) struct WatchArgs {
    pub(crate) vms: Vec<VmName>,
    pub(crate) count: Option<u64>,
    pub(crate) json: bool,
}

/// Runs `vmctl watch` on `client` until interrupted, `--count` is reached,
/// or the watch fails.
pub(crate) async fn run(
    client: &Client,
    args: WatchArgs,
    fail: impl Fn(ClientError) -> Failure,
) -> Result<(), Failure> {
    let signal_failure = |e: io::Error| Failure::Usage(format!("cannot handle signals: {e}"));
    let mut interrupt = signal(SignalKind::interrupt()).map_err(signal_failure)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(signal_failure)?;
    let mut events = client.watch_stream(args.vms);
    let mut known = BTreeSet::new();
    let mut first = true;
    let mut counted = 0u64;
    loop {
        let event = tokio::select! {
            event = events.next() => event,
            _ = interrupt.recv() => return Ok(()),
            _ = terminate.recv() => return Ok(()),
        };
        let event = match event {
            Some(Ok(event)) => event,
            Some(Err(e)) => return Err(fail(e)),
            None => return Err(fail(ClientError::Closed)),
        };
        let lines = lines(&event, &mut known, args.json)?;
        let mut stdout = io::stdout().lock();
        for line in lines {
            if !first {
                counted += 1;
            }
            if writeln!(stdout, "{line}")
                .and_then(|()| stdout.flush())
                .is_err()
            {
                // Whoever read our output is gone: nothing left to do.
                return Ok(());
            }
            if !first && args.count.is_some_and(|n| counted >= n) {
                return Ok(());
            }
        }
        if first && args.count == Some(0) {
            return Ok(());
        }
        first = false;
    }
}

/// The lines for one event, and `known` updated to the VMs that exist.
fn lines(
    event: &WatchEvent,
    known: &mut BTreeSet<VmName>,
    json: bool,
) -> Result<Vec<String>, Failure> {
    let mut changed: Vec<&VmInfo> = event.changed.iter().collect();
    changed.sort_by(|a, b| a.name.cmp(&b.name));
    let mut removed: BTreeSet<VmName> = event.removed.iter().cloned().collect();
    if event.snapshot {
        // A snapshot names every watched VM: any other one we knew is gone.
        removed.extend(
            known
                .iter()
                .filter(|name| !changed.iter().any(|vm| &vm.name == *name))
                .cloned(),
        );
    }
    let mut lines = Vec::with_capacity(changed.len() + removed.len());
    for vm in changed {
        known.insert(vm.name.clone());
        lines.push(if json {
            serde_json::to_string(vm)
                .map_err(|e| Failure::Usage(format!("cannot format output: {e}")))?
        } else {
            output::watch_line(vm)
        });
    }
    for name in removed {
        known.remove(&name);
        lines.push(if json {
            json!({ "name": name, "removed": true }).to_string()
        } else {
            format!("{name}  removed")
        });
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str) -> VmInfo {
        serde_json::from_value(json!({
            "name": name, "description": null, "hypervisor": null, "state": "running",
            "autostart": null, "protected": false, "vsock_cid": null,
            "vcpus": {"declared": 1, "current": 1, "max": 4},
            "memory": {"declared": 268435456, "current": null, "balloon_actual": null, "max": null},
            "pid": null, "uptime_secs": null, "cgroup_memory": null, "cpu_time_ns": null,
            "tasks": null, "pending": null
        }))
        .expect("a VmInfo")
    }

    fn name(text: &str) -> VmName {
        VmName::new(text).expect("valid")
    }

    fn lines_of(event: &WatchEvent, known: &mut BTreeSet<VmName>, json: bool) -> Vec<String> {
        match lines(event, known, json) {
            Ok(lines) => lines,
            Err(_) => panic!("lines could not be formatted"),
        }
    }

    #[test]
    fn a_later_snapshot_reports_the_vms_it_lacks_as_removed() {
        let mut known = BTreeSet::new();
        let snapshot = |vms: Vec<VmInfo>| WatchEvent {
            generation: 1,
            snapshot: true,
            changed: vms,
            removed: Vec::new(),
        };
        let first = lines_of(&snapshot(vec![vm("b"), vm("a")]), &mut known, false);
        assert_eq!(first.len(), 2);
        assert!(first[0].starts_with("a  running"), "{first:?}");
        let again = lines_of(&snapshot(vec![vm("b")]), &mut known, true);
        assert_eq!(again.len(), 2);
        assert_eq!(again[1], r#"{"name":"a","removed":true}"#);
        assert_eq!(known, BTreeSet::from([name("b")]));
    }

    #[test]
    fn json_lines_are_the_vm_info() {
        let event = WatchEvent {
            generation: 2,
            snapshot: false,
            changed: vec![vm("a")],
            removed: vec![name("gone")],
        };
        let lines = lines_of(&event, &mut BTreeSet::new(), true);
        let parsed: VmInfo = serde_json::from_str(&lines[0]).expect("VmInfo JSON");
        assert_eq!(parsed, vm("a"));
        assert_eq!(lines[1], r#"{"name":"gone","removed":true}"#);
    }
}
