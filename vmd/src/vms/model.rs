//! The live model: one record per declared VM, in memory.
//!
//! Every read (`GetVm`, `ListVms`, `Watch`, metrics) answers from here
//! without a bus call or a control-socket session. [`super::follow`] keeps
//! the records current from systemd's signals and vmd's own hypervisor
//! monitors; vmd's operations add their own bumps.
//!
//! 1. The inventory is read at start and on reload; a record exists for
//!    every declared VM.
//! 2. Each record holds what systemd last said of the VM's unit, what the
//!    hypervisor last said (and where from, and when), the last exit seen,
//!    and whether `microvms.target` wants it.
//! 3. [`Model::update`] changes a record under the lock and bumps the VM's
//!    [`Changes`] generation if anything a client can see changed, so
//!    watches wake exactly for real changes (no repeated identical lines).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use vmd_proto::{LastExit, LiveSource, VmName};

use super::inventory::VmSpec;
use super::watch::Changes;
use crate::drivers::{Control, LiveState, UnitStatus};

/// What a client can see of a VM beyond its declaration: a change here
/// wakes watches.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    /// systemd's view of the unit; `None` while unknown (bus down, not yet
    /// read).
    pub unit: Option<UnitStatus>,
    /// The hypervisor's live facts; `None` while it does not run or cannot
    /// be asked.
    pub live: Option<LiveState>,
    /// Where `live` came from.
    pub source: LiveSource,
    /// Why live facts are missing or may be stale.
    pub note: Option<String>,
    /// How the VM's process last ended.
    pub last_exit: Option<LastExit>,
    /// `microvms.target` wants the unit.
    pub autostart: Option<bool>,
    /// The running unit's cgroup is frozen, as the kernel last told
    /// (followed with inotify); `None` while not running or not known.
    pub cgroup_frozen: Option<bool>,
}

/// vmd's monitor of a running VM.
#[derive(Clone, Debug)]
pub struct Attached {
    /// Which attach this is: events of an older one are ignored.
    pub epoch: u64,
    /// Commands go here.
    pub control: Arc<dyn Control>,
}

/// One VM's record.
#[derive(Clone, Debug)]
pub struct Record {
    /// The declaration.
    pub spec: VmSpec,
    /// What clients see.
    pub facts: Facts,
    /// When systemd last confirmed `facts.unit`.
    pub unit_at: Option<Instant>,
    /// When the hypervisor last confirmed `facts.live`.
    pub live_at: Option<Instant>,
    /// vmd's monitor, while attached.
    pub monitor: Option<Attached>,
    /// A monitor attach is being tried.
    pub attaching: bool,
    /// A background refresh of the live facts is in flight.
    pub refreshing: bool,
}

impl Record {
    /// A record of `spec` with nothing known yet.
    pub fn new(spec: VmSpec) -> Self {
        Self {
            spec,
            facts: Facts::default(),
            unit_at: None,
            live_at: None,
            monitor: None,
            attaching: false,
            refreshing: false,
        }
    }

    /// Whether vmd speaks to this VM's hypervisor: QEMU, over its own
    /// monitor or the VM's shared QMP socket.
    pub fn speaks_qmp(&self) -> bool {
        self.spec.hypervisor == Some(vmd_proto::Hypervisor::Qemu)
            && (self.spec.monitor_socket.is_some() || self.spec.control_socket.is_some())
    }

    /// Whether the unit runs, as last signalled.
    pub fn is_active(&self) -> bool {
        self.facts.unit.as_ref().is_some_and(UnitStatus::is_active)
    }

    /// The cgroup of the unit while it is active (systemd's
    /// `ControlGroup`).
    pub fn running_cgroup(&self) -> Option<&str> {
        self.facts
            .unit
            .as_ref()
            .filter(|u| u.is_active())
            .and_then(|u| u.control_group.as_deref())
    }

    /// Applies a unit status: remembers the last exit and restart count
    /// systemd forgets when it unloads a unit or restarts the process.
    pub fn apply_unit(&mut self, mut status: UnitStatus) {
        if let Some(exit) = &status.exit {
            self.facts.last_exit = Some(LastExit {
                result: status.result.clone().unwrap_or_else(|| "unknown".into()),
                exit_status: exit.status,
                signal: exit.signal,
                at_unix_ms: exit.at_usec.map(|us| us / 1000),
            });
        }
        if status.n_restarts.is_none() {
            status.n_restarts = self.facts.unit.as_ref().and_then(|u| u.n_restarts);
        }
        self.facts.unit = Some(status);
        self.unit_at = Some(Instant::now());
        if !self.is_active() {
            // Nothing runs: no live facts, no monitor.
            self.detach(None);
        }
    }

    /// Drops the monitor and the live facts.
    pub fn detach(&mut self, note: Option<String>) {
        self.monitor = None;
        self.facts.live = None;
        self.facts.source = LiveSource::None;
        self.facts.note = note;
        self.live_at = None;
    }

    /// Records live facts from `source`.
    pub fn apply_live(&mut self, live: LiveState, source: LiveSource) {
        self.facts.live = Some(live);
        self.facts.source = source;
        self.facts.note = None;
        self.live_at = Some(Instant::now());
    }
}

/// The records and their generations.
#[derive(Debug)]
pub struct Model {
    records: Mutex<Records>,
    changes: Arc<Changes>,
}

#[derive(Debug, Default)]
struct Records {
    /// By name; names sorted.
    by_name: std::collections::BTreeMap<VmName, Record>,
    /// Unit → VM.
    by_unit: HashMap<String, VmName>,
}

impl Model {
    /// An empty model.
    pub fn new() -> Self {
        Self {
            records: Mutex::new(Records::default()),
            changes: Arc::new(Changes::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Records> {
        // Every update replaces whole values: a poisoned lock is consistent.
        self.records.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The change generations.
    pub fn changes(&self) -> &Arc<Changes> {
        &self.changes
    }

    /// Replaces the declarations: records of VMs still declared keep their
    /// facts (with the new spec), new VMs get empty records, VMs no longer
    /// declared go. Every VM counts as changed.
    pub fn declare(&self, specs: Vec<VmSpec>) {
        let mut records = self.lock();
        let mut old = std::mem::take(&mut records.by_name);
        records.by_unit.clear();
        for spec in specs {
            records.by_unit.insert(spec.unit.clone(), spec.name.clone());
            let record = match old.remove(&spec.name) {
                Some(mut record) => {
                    record.spec = spec;
                    record
                }
                None => Record::new(spec),
            };
            records.by_name.insert(record.spec.name.clone(), record);
        }
        drop(records);
        self.changes.bump_all();
    }

    /// The declared units, sorted by VM name.
    pub fn units(&self) -> Vec<String> {
        self.lock()
            .by_name
            .values()
            .map(|r| r.spec.unit.clone())
            .collect()
    }

    /// The VM that runs as `unit`.
    pub fn vm_of_unit(&self, unit: &str) -> Option<VmName> {
        self.lock().by_unit.get(unit).cloned()
    }

    /// A copy of one record.
    pub fn get(&self, name: &VmName) -> Option<Record> {
        self.lock().by_name.get(name).cloned()
    }

    /// Copies of the records `keep` selects, sorted by name.
    pub fn select(&self, keep: impl Fn(&VmName) -> bool) -> Vec<Record> {
        self.lock()
            .by_name
            .values()
            .filter(|r| keep(&r.spec.name))
            .cloned()
            .collect()
    }

    /// Every declaration, sorted by name.
    pub fn specs(&self) -> Vec<VmSpec> {
        self.lock()
            .by_name
            .values()
            .map(|r| r.spec.clone())
            .collect()
    }

    /// Runs `f` on the record of `name` (if declared) and bumps the VM's
    /// generation if its facts changed.
    pub fn update<R>(&self, name: &VmName, f: impl FnOnce(&mut Record) -> R) -> Option<R> {
        let mut records = self.lock();
        let record = records.by_name.get_mut(name)?;
        let before = record.facts.clone();
        let result = f(record);
        let changed = record.facts != before;
        drop(records);
        if changed {
            self.changes.bump(name);
        }
        Some(result)
    }

    /// Runs `f` on every record; bumps each whose facts changed.
    pub fn update_all(&self, mut f: impl FnMut(&mut Record)) {
        let mut changed = Vec::new();
        {
            let mut records = self.lock();
            for record in records.by_name.values_mut() {
                let before = record.facts.clone();
                f(record);
                if record.facts != before {
                    changed.push(record.spec.name.clone());
                }
            }
        }
        for name in changed {
            self.changes.bump(&name);
        }
    }

    /// Sets which units `microvms.target` wants.
    pub fn set_autostart(&self, wanted: &HashSet<String>) {
        self.update_all(|record| {
            record.facts.autostart = Some(wanted.contains(&record.spec.unit));
        });
    }
}

impl Default for Model {
    fn default() -> Self {
        Self::new()
    }
}

/// Milliseconds since `at`.
pub fn age_ms(at: Option<Instant>) -> Option<u64> {
    at.map(|at| u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::drivers::{ActiveState, ProcessExit};

    /// A VM declared by name only, with microvm.nix's default unit.
    pub(crate) fn spec(name: &str) -> VmSpec {
        VmSpec {
            name: VmName::new(name).expect("valid"),
            description: None,
            hypervisor: None,
            vcpus: None,
            max_vcpus: None,
            memory: None,
            max_memory: None,
            vsock_cid: None,
            control_socket: None,
            monitor_socket: None,
            dir: None,
            resources: vmd_proto::Resources::default(),
            vsock_uds: None,
            unit: format!("microvm@{name}.service"),
            protected: false,
        }
    }

    fn running() -> UnitStatus {
        UnitStatus {
            active_state: ActiveState::Active,
            sub_state: "running".into(),
            load_state: "loaded".into(),
            n_restarts: Some(2),
            ..UnitStatus::not_loaded()
        }
    }

    #[test]
    fn only_visible_changes_bump() {
        let model = Model::new();
        model.declare(vec![spec("a"), spec("b")]);
        let a = VmName::new("a").expect("valid");
        let start = model.changes().generation();
        model.update(&a, |r| r.apply_unit(running()));
        let after_first = model.changes().generation();
        assert!(after_first > start);
        // The same status again (systemd signals several properties at
        // once): only the confirmation time moves, nothing wakes.
        model.update(&a, |r| r.apply_unit(running()));
        assert_eq!(model.changes().generation(), after_first);
    }

    #[test]
    fn last_exit_and_restarts_outlive_the_unit_forgetting_them() {
        let model = Model::new();
        model.declare(vec![spec("a")]);
        let a = VmName::new("a").expect("valid");
        let mut crashed = running();
        crashed.active_state = ActiveState::Activating;
        crashed.sub_state = "auto-restart".into();
        crashed.result = Some("signal".into());
        crashed.exit = Some(ProcessExit {
            status: None,
            signal: Some(9),
            at_usec: Some(5_000),
        });
        model.update(&a, |r| r.apply_unit(crashed));
        let mut gone = UnitStatus::not_loaded();
        gone.n_restarts = None;
        model.update(&a, |r| r.apply_unit(gone));
        let record = model.get(&a).expect("declared");
        assert_eq!(
            record.facts.last_exit,
            Some(LastExit {
                result: "signal".into(),
                exit_status: None,
                signal: Some(9),
                at_unix_ms: Some(5),
            })
        );
        assert_eq!(record.facts.unit.and_then(|u| u.n_restarts), Some(2));
    }

    #[test]
    fn declare_keeps_facts_of_vms_still_declared() {
        let model = Model::new();
        model.declare(vec![spec("a"), spec("b")]);
        let a = VmName::new("a").expect("valid");
        model.update(&a, |r| r.apply_unit(running()));
        model.declare(vec![spec("a"), spec("c")]);
        assert!(model.get(&a).expect("kept").is_active());
        assert!(model.get(&VmName::new("b").expect("valid")).is_none());
        assert_eq!(
            model.vm_of_unit("microvm@c.service"),
            Some(VmName::new("c").expect("valid"))
        );
        assert_eq!(model.vm_of_unit("microvm@b.service"), None);
    }
}
