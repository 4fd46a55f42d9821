//! What the window shows, without GTK: the VM rows kept current by the
//! watch, their graph samples, the host summary, the actions a role may
//! take, and the words for every answer. Everything here is unit-tested.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use vmd_proto::{
    Bytes, ErrorReply, HostInfo, OperationInfo, OperationStatus, Role, Virtualization, VmInfo,
    VmName, VmState, WatchEvent,
};

/// How many samples a graph keeps (one a second while visible).
pub const GRAPH_SAMPLES: usize = 60;

/// A change a row's button asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Start a stopped VM.
    Start,
    /// Shut it down gracefully.
    Stop,
    /// Restart (or start) it.
    Restart,
    /// Pause its vCPUs (or freeze its unit).
    Pause,
    /// Resume it.
    Resume,
    /// Kill it (admin only, after a confirmation).
    ForceStop,
    /// Change its vCPUs and memory target (admin only, after a
    /// confirmation).
    Resize,
}

impl Action {
    /// Every action, in the order the buttons are laid out.
    pub const ALL: [Action; 7] = [
        Action::Start,
        Action::Stop,
        Action::Restart,
        Action::Pause,
        Action::Resume,
        Action::ForceStop,
        Action::Resize,
    ];

    /// The button's label.
    pub fn label(self) -> &'static str {
        match self {
            Action::Start => "Start",
            Action::Stop => "Stop",
            Action::Restart => "Restart",
            Action::Pause => "Pause",
            Action::Resume => "Resume",
            Action::ForceStop => "Force stop",
            Action::Resize => "Resize",
        }
    }

    /// The verb in outcome lines (`start accepted`).
    pub fn verb(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Stop => "stop",
            Action::Restart => "restart",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::ForceStop => "force stop",
            Action::Resize => "resize",
        }
    }

    /// The least role the server lets take this action (vmd-proto's
    /// [`Role`] docs).
    pub fn min_role(self) -> Role {
        match self {
            Action::Start | Action::Stop | Action::Restart | Action::Pause | Action::Resume => {
                Role::Operator
            }
            Action::ForceStop | Action::Resize => Role::Admin,
        }
    }

    /// Whether the window asks "are you sure?" first.
    pub fn needs_confirmation(self) -> bool {
        matches!(self, Action::ForceStop | Action::Resize)
    }

    /// Whether the action makes sense in `state` (its button is sensitive).
    /// The server is the judge; this only avoids offering the obviously
    /// pointless (starting a running VM).
    pub fn fits(self, state: VmState) -> bool {
        use VmState as S;
        match self {
            Action::Start => matches!(state, S::Stopped | S::Failed),
            Action::Stop => matches!(
                state,
                S::Running | S::Paused | S::Frozen | S::Starting | S::Restarting
            ),
            Action::ForceStop => !matches!(state, S::Stopped | S::Failed),
            Action::Restart => matches!(
                state,
                S::Running | S::Paused | S::Frozen | S::Stopped | S::Failed
            ),
            Action::Pause | Action::Resize => state == S::Running,
            Action::Resume => matches!(state, S::Paused | S::Frozen),
        }
    }
}

/// Whether `role` may read the host and its VMs on the main listener: a
/// `metrics` identity (which may only scrape the metrics listener) or one
/// without a role gets `forbidden` for every request, so the panel shows
/// why instead of rows.
pub fn may_read(role: Option<Role>) -> bool {
    role.is_some_and(|r| r >= Role::Reader)
}

/// Which VMs the session may change, as the server says (`Op::Rights`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ChangeScope {
    /// Not said (a server older than `Op::Rights`, or not asked yet): the
    /// role alone decides, and a VM outside the identity's change scope
    /// gets `forbidden` on its row when a button is pressed.
    #[default]
    Unknown,
    /// Exactly these VMs (inside the change scope and not protected).
    Only(BTreeSet<VmName>),
}

impl ChangeScope {
    /// Whether changes to `vm` may be offered.
    pub fn covers(&self, vm: &VmName) -> bool {
        match self {
            Self::Unknown => true,
            Self::Only(vms) => vms.contains(vm),
        }
    }
}

/// The actions offered on `vm`'s row to a client with `role` and change
/// `scope`: those the role allows, on a VM the scope covers; none on a
/// protected VM (the server never changes it over the network) and none
/// without a role.
pub fn offered(role: Option<Role>, scope: &ChangeScope, vm: &VmInfo) -> Vec<Action> {
    let Some(role) = role else {
        return Vec::new();
    };
    if vm.protected || !scope.covers(&vm.name) {
        return Vec::new();
    }
    Action::ALL
        .into_iter()
        .filter(|a| role >= a.min_role())
        .collect()
}

/// A fixed-length history of one quantity, oldest first.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Series {
    values: VecDeque<f64>,
}

impl Series {
    /// Appends a value, dropping the oldest past [`GRAPH_SAMPLES`].
    pub fn push(&mut self, value: f64) {
        if self.values.len() == GRAPH_SAMPLES {
            self.values.pop_front();
        }
        self.values.push_back(value);
    }

    /// The values, oldest first.
    pub fn values(&self) -> impl ExactSizeIterator<Item = f64> + '_ {
        self.values.iter().copied()
    }

    /// The newest value.
    pub fn last(&self) -> Option<f64> {
        self.values.back().copied()
    }

    /// The largest value (0 when empty).
    pub fn max(&self) -> f64 {
        self.values.iter().copied().fold(0.0, f64::max)
    }
}

/// What became of the last action asked on a row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Sent; no answer yet.
    Sent(Action),
    /// The server accepted it as an operation that is still running.
    Accepted(Action, OperationInfo),
    /// The operation ended well.
    Succeeded(Action),
    /// The server refused it or the operation failed.
    Refused(Action, ErrorReply),
    /// The connection failed before an answer.
    Lost(Action, String),
}

impl Outcome {
    /// The line shown on the row: `start accepted (op-3)`, `stop refused:
    /// forbidden: …`, `restart busy: …`.
    pub fn text(&self) -> String {
        match self {
            Outcome::Sent(a) => format!("{}: sent", a.verb()),
            Outcome::Accepted(a, op) => format!("{}: accepted ({})", a.verb(), op.id),
            Outcome::Succeeded(a) => format!("{}: done", a.verb()),
            Outcome::Refused(a, e) => format!("{}: {}", a.verb(), refusal(e)),
            Outcome::Lost(a, why) => format!("{}: no answer: {why}", a.verb()),
        }
    }

    /// The outcome an operation's final state stands for.
    pub fn from_operation(action: Action, op: OperationInfo) -> Self {
        match op.status {
            OperationStatus::Running => Outcome::Accepted(action, op),
            OperationStatus::Succeeded => Outcome::Succeeded(action),
            OperationStatus::Failed(e) => Outcome::Refused(action, e),
        }
    }
}

/// A server refusal in the row's words; the first word names the kind
/// (`busy`, `forbidden`, `unsupported`, …) so a glance tells it.
pub fn refusal(e: &ErrorReply) -> String {
    match e {
        ErrorReply::Busy { vm, operation, .. } => format!("busy: {vm} is running {operation}"),
        other => other.to_string(),
    }
}

/// One VM's row.
#[derive(Clone, Debug)]
pub struct VmRow {
    /// The newest facts (from the watch or a graph read).
    pub info: VmInfo,
    /// CPU use, in percent of one host CPU.
    pub cpu: Series,
    /// Memory in use (cgroup), in MiB.
    pub memory: Series,
    /// The last action's outcome.
    pub outcome: Option<Outcome>,
    /// The CPU time of the previous graph read, and when it was taken.
    last_cpu: Option<(Instant, u64)>,
}

impl VmRow {
    fn new(info: VmInfo) -> Self {
        Self {
            info,
            cpu: Series::default(),
            memory: Series::default(),
            outcome: None,
            last_cpu: None,
        }
    }

    /// The state as shown: `running`, `stopped`, … with the change in
    /// progress, if any (`starting (start in progress)`).
    pub fn state_text(&self) -> String {
        match &self.info.pending {
            Some(p) => format!("{} ({} in progress)", self.info.state, p.kind),
            None => self.info.state.to_string(),
        }
    }

    /// vCPUs, memory, balloon and flags in one line.
    pub fn details_text(&self) -> String {
        let info = &self.info;
        let mut parts = Vec::new();
        let vcpus = info.vcpus.current.or(info.vcpus.declared);
        parts.push(match vcpus {
            Some(n) => format!("{n} vCPU{}", if n == 1 { "" } else { "s" }),
            None => "vCPUs ?".to_owned(),
        });
        let memory = info.memory.current.or(info.memory.declared);
        parts.push(match memory {
            Some(m) => format!("memory {m}"),
            None => "memory ?".to_owned(),
        });
        if let Some(b) = info.memory.balloon_actual {
            parts.push(format!("balloon {b}"));
        }
        if let Some(m) = info.cgroup_memory {
            parts.push(format!("in use {m}"));
        }
        if info.restart_needed == Some(true) {
            parts.push("restart needed".to_owned());
        }
        if info.protected {
            parts.push("protected".to_owned());
        }
        parts.join(" · ")
    }

    /// Takes a graph read: CPU use since the previous read (the first
    /// read only sets the baseline) and memory in use.
    pub fn sample(&mut self, info: VmInfo, at: Instant) {
        match (info.cpu_time_ns, self.last_cpu) {
            (Some(now), Some((then_at, then))) if at > then_at => {
                let ns = now.saturating_sub(then);
                let elapsed = at.duration_since(then_at).as_secs_f64();
                #[allow(clippy::cast_precision_loss)] // a percentage for a graph
                let percent = ns as f64 / 1e9 / elapsed * 100.0;
                self.cpu.push(percent);
            }
            (None, _) => self.cpu.push(0.0),
            _ => {}
        }
        self.last_cpu = info.cpu_time_ns.map(|ns| (at, ns));
        #[allow(clippy::cast_precision_loss)] // MiB for a graph
        self.memory
            .push(info.cgroup_memory.map_or(0.0, |b| b.0 as f64 / 1_048_576.0));
        self.info = info;
    }
}

/// What a watch answer did to the rows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RowChange {
    /// A VM appeared: add its row.
    Added(VmName),
    /// A VM's facts changed: redraw its row.
    Updated(VmName),
    /// A VM is gone (or no longer visible): drop its row.
    Removed(VmName),
}

/// Every VM row, by name.
#[derive(Clone, Debug, Default)]
pub struct Rows {
    rows: BTreeMap<VmName, VmRow>,
}

impl Rows {
    /// Applies a watch answer: a snapshot replaces the set (VMs not in it
    /// are gone), a change updates or removes the VMs it names.
    pub fn apply(&mut self, event: WatchEvent) -> Vec<RowChange> {
        let mut changes = Vec::new();
        if event.snapshot {
            let keep: Vec<&VmName> = event.changed.iter().map(|vm| &vm.name).collect();
            let gone: Vec<VmName> = self
                .rows
                .keys()
                .filter(|name| !keep.contains(name))
                .cloned()
                .collect();
            for name in gone {
                self.rows.remove(&name);
                changes.push(RowChange::Removed(name));
            }
        }
        for info in event.changed {
            let name = info.name.clone();
            match self.rows.get_mut(&name) {
                Some(row) => {
                    // A watch answer carries no newer graph facts than the
                    // last read; keep the state it brings.
                    row.info = info;
                    changes.push(RowChange::Updated(name));
                }
                None => {
                    self.rows.insert(name.clone(), VmRow::new(info));
                    changes.push(RowChange::Added(name));
                }
            }
        }
        for name in event.removed {
            if self.rows.remove(&name).is_some() {
                changes.push(RowChange::Removed(name));
            }
        }
        changes
    }

    /// A row by name.
    pub fn get(&self, name: &VmName) -> Option<&VmRow> {
        self.rows.get(name)
    }

    /// A row by name, to change.
    pub fn get_mut(&mut self, name: &VmName) -> Option<&mut VmRow> {
        self.rows.get_mut(name)
    }

    /// The names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &VmName> {
        self.rows.keys()
    }

    /// Forgets every row (a new session starts from a snapshot).
    pub fn clear(&mut self) -> Vec<RowChange> {
        let names: Vec<VmName> = self.rows.keys().cloned().collect();
        self.rows.clear();
        names.into_iter().map(RowChange::Removed).collect()
    }
}

/// The host summary, with what it takes to show CPU use between reads.
#[derive(Clone, Debug, Default)]
pub struct HostSummary {
    info: Option<HostInfo>,
    cpu_percent: Option<f64>,
}

impl HostSummary {
    /// Takes a host read.
    pub fn update(&mut self, info: HostInfo) {
        if let (Some(old), Some(new)) = (
            self.info.as_ref().and_then(|i| i.cpu_times.as_ref()),
            info.cpu_times.as_ref(),
        ) {
            let busy = |t: &vmd_proto::CpuTimes| t.user_ms + t.system_ms + t.steal_ms;
            let busy_delta = busy(new).saturating_sub(busy(old));
            let total_delta = busy_delta + new.idle_ms.saturating_sub(old.idle_ms);
            if total_delta > 0 {
                #[allow(clippy::cast_precision_loss)] // a percentage
                let percent = busy_delta as f64 / total_delta as f64 * 100.0;
                self.cpu_percent = Some(percent);
            }
        }
        self.info = Some(info);
    }

    /// The summary lines: virtualization, CPU, memory, load.
    pub fn lines(&self) -> [String; 4] {
        let Some(host) = &self.info else {
            return [
                "Host: not read yet".to_owned(),
                String::new(),
                String::new(),
                String::new(),
            ];
        };
        let virt = match &host.virtualization {
            Virtualization::Available(kvm) => format!(
                "{}: virtualization available (KVM API {}, up to {} vCPUs per VM)",
                host.hostname, kvm.api_version, kvm.max_vcpus
            ),
            Virtualization::Unavailable { reason } => {
                format!("{}: virtualization unavailable: {reason}", host.hostname)
            }
        };
        let model = host.cpu.model.as_deref().unwrap_or("unknown CPU");
        let cpu = match self.cpu_percent {
            Some(p) => format!("CPU: {model}, {} CPUs, {p:.0}% busy", host.cpu.logical_cpus),
            None => format!("CPU: {model}, {} CPUs", host.cpu.logical_cpus),
        };
        let memory = format!(
            "Memory: {} of {} in use ({} available)",
            host.memory.in_use, host.memory.total, host.memory.available
        );
        let [a, b, c] = host.load_milli.map(|l| f64::from(l) / 1000.0);
        let load = format!("Load: {a:.2} {b:.2} {c:.2}");
        [virt, cpu, memory, load]
    }
}

/// Waits between reconnection attempts: 1 s, doubling, at most 30 s.
#[derive(Clone, Debug)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    /// The first wait.
    pub const FIRST: Duration = Duration::from_secs(1);
    /// The longest wait.
    pub const MAX: Duration = Duration::from_secs(30);

    /// The next wait, then doubles it.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        delay
    }

    /// Back to the first wait (after a session worked).
    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: Self::FIRST }
    }
}

/// Memory for the resize dialog's default: the VM's current or declared
/// memory, in MiB.
pub fn memory_mib(info: &VmInfo) -> u64 {
    info.memory
        .current
        .or(info.memory.declared)
        .map_or(0, |Bytes(b)| b / 1_048_576)
}

#[cfg(test)]
mod tests {
    use vmd_proto::{
        CpuInfo, CpuTimes, KvmInfo, MemoryInfo, OperationId, OperationKind, PendingOperation,
    };

    use super::*;

    fn vm(name: &str, state: VmState) -> VmInfo {
        VmInfo::new(VmName::new(name).expect("name"), state)
    }

    fn event(snapshot: bool, changed: Vec<VmInfo>, removed: Vec<&str>) -> WatchEvent {
        WatchEvent {
            generation: 1,
            snapshot,
            changed,
            removed: removed
                .into_iter()
                .map(|n| VmName::new(n).expect("name"))
                .collect(),
        }
    }

    #[test]
    fn roles_get_their_buttons_and_protected_vms_none() {
        let running = vm("a", VmState::Running);
        let offered = |role, vm: &VmInfo| offered(role, &ChangeScope::Unknown, vm);
        assert!(offered(None, &running).is_empty());
        assert!(offered(Some(Role::Reader), &running).is_empty());
        assert!(offered(Some(Role::Metrics), &running).is_empty());
        assert!(!may_read(None) && !may_read(Some(Role::Metrics)));
        assert!(may_read(Some(Role::Reader)) && may_read(Some(Role::Admin)));
        let operator = offered(Some(Role::Operator), &running);
        assert_eq!(
            operator,
            [
                Action::Start,
                Action::Stop,
                Action::Restart,
                Action::Pause,
                Action::Resume
            ]
        );
        assert!(!operator.contains(&Action::ForceStop));
        let admin = offered(Some(Role::Admin), &running);
        assert!(admin.contains(&Action::ForceStop) && admin.contains(&Action::Resize));
        let protected = VmInfo {
            protected: true,
            ..running
        };
        assert!(offered(Some(Role::Admin), &protected).is_empty());
    }

    #[test]
    fn only_vms_the_server_names_get_buttons() {
        let (a, b) = (vm("a", VmState::Running), vm("b", VmState::Running));
        let scope = ChangeScope::Only([a.name.clone()].into());
        assert!(!offered(Some(Role::Admin), &scope, &a).is_empty());
        assert!(offered(Some(Role::Admin), &scope, &b).is_empty());
        assert!(
            offered(
                Some(Role::Operator),
                &ChangeScope::Only(BTreeSet::new()),
                &a
            )
            .is_empty()
        );
        // An older server says nothing: the role decides.
        assert!(!offered(Some(Role::Operator), &ChangeScope::Unknown, &b).is_empty());
    }

    #[test]
    fn buttons_fit_the_state() {
        assert!(Action::Start.fits(VmState::Stopped));
        assert!(Action::Start.fits(VmState::Failed));
        assert!(!Action::Start.fits(VmState::Running));
        assert!(Action::Stop.fits(VmState::Running));
        assert!(!Action::Stop.fits(VmState::Stopped));
        assert!(Action::Resume.fits(VmState::Frozen));
        assert!(!Action::Pause.fits(VmState::Paused));
        assert!(Action::ForceStop.fits(VmState::Stopping));
        assert!(Action::ForceStop.needs_confirmation() && Action::Resize.needs_confirmation());
        assert!(!Action::Stop.needs_confirmation());
    }

    #[test]
    fn snapshot_replaces_and_changes_update() {
        let mut rows = Rows::default();
        let changes = rows.apply(event(
            true,
            vec![vm("a", VmState::Running), vm("b", VmState::Stopped)],
            vec![],
        ));
        assert_eq!(changes.len(), 2);
        assert_eq!(rows.names().count(), 2);
        let b = VmName::new("b").expect("name");
        let changes = rows.apply(event(false, vec![vm("b", VmState::Starting)], vec![]));
        assert_eq!(changes, [RowChange::Updated(b.clone())]);
        assert_eq!(rows.get(&b).expect("b").state_text(), "starting");
        // A new snapshot without `a`: its row goes.
        let changes = rows.apply(event(true, vec![vm("b", VmState::Running)], vec![]));
        assert!(changes.contains(&RowChange::Removed(VmName::new("a").expect("name"))));
        assert_eq!(rows.names().collect::<Vec<_>>(), [&b]);
        let changes = rows.apply(event(false, vec![], vec!["b", "zzz"]));
        assert_eq!(changes, [RowChange::Removed(b)]);
        assert_eq!(rows.names().count(), 0);
    }

    #[test]
    fn row_texts() {
        let mut info = vm("a", VmState::Running);
        info.vcpus.current = Some(2);
        info.memory.declared = Some(Bytes::mib(512));
        info.memory.balloon_actual = Some(Bytes::mib(384));
        info.restart_needed = Some(true);
        info.pending = Some(PendingOperation {
            id: Some(OperationId(3)),
            kind: OperationKind::Shutdown,
            since_unix_ms: 0,
        });
        let row = VmRow::new(info);
        assert_eq!(row.state_text(), "running (shutdown in progress)");
        assert_eq!(
            row.details_text(),
            "2 vCPUs · memory 512 MiB · balloon 384 MiB · restart needed"
        );
    }

    #[test]
    fn cpu_graph_is_use_between_reads() {
        let mut row = VmRow::new(vm("a", VmState::Running));
        let t0 = Instant::now();
        let mut info = vm("a", VmState::Running);
        info.cpu_time_ns = Some(1_000_000_000);
        info.cgroup_memory = Some(Bytes::mib(100));
        row.sample(info.clone(), t0);
        assert_eq!(row.cpu.last(), None, "the first read is the baseline");
        assert_eq!(row.memory.last(), Some(100.0));
        info.cpu_time_ns = Some(1_500_000_000);
        row.sample(info, t0 + Duration::from_secs(1));
        let cpu = row.cpu.last().expect("a CPU sample");
        assert!((cpu - 50.0).abs() < 1e-9, "{cpu}");
    }

    #[test]
    fn series_keeps_the_newest() {
        let mut s = Series::default();
        for i in 0..(GRAPH_SAMPLES + 5) {
            #[allow(clippy::cast_precision_loss)]
            s.push(i as f64);
        }
        assert_eq!(s.values().len(), GRAPH_SAMPLES);
        assert_eq!(s.values().next(), Some(5.0));
        #[allow(clippy::cast_precision_loss)]
        let last = (GRAPH_SAMPLES + 4) as f64;
        assert_eq!(s.max(), last);
    }

    #[test]
    fn refusals_name_their_kind() {
        let busy = ErrorReply::Busy {
            vm: "a".into(),
            operation: OperationKind::Start,
            since_unix_ms: 1,
        };
        assert_eq!(
            Outcome::Refused(Action::Stop, busy).text(),
            "stop: busy: a is running start"
        );
        let forbidden = ErrorReply::Forbidden {
            reason: "not in scope".into(),
        };
        assert_eq!(
            Outcome::Refused(Action::Start, forbidden).text(),
            "start: forbidden: not in scope"
        );
        let unsupported = ErrorReply::Unsupported {
            reason: "no KVM".into(),
        };
        assert!(
            Outcome::Refused(Action::Pause, unsupported)
                .text()
                .starts_with("pause: unsupported")
        );
    }

    #[test]
    fn host_lines_and_cpu_use() {
        let times = |busy: u64, idle: u64| CpuTimes {
            user_ms: busy,
            system_ms: 0,
            idle_ms: idle,
            steal_ms: 0,
        };
        let host = |t| HostInfo {
            hostname: "h".into(),
            kernel: "6".into(),
            vmd_version: "0".into(),
            uptime_secs: 1,
            vmd_uptime_secs: 1,
            cpu: CpuInfo {
                vendor: None,
                model: Some("Z80".into()),
                logical_cpus: 2,
                virt_flag: None,
            },
            memory: MemoryInfo {
                total: Bytes::mib(1024),
                available: Bytes::mib(768),
                in_use: Bytes::mib(256),
            },
            virtualization: Virtualization::Unavailable {
                reason: "no /dev/kvm".into(),
            },
            load_milli: [1500, 250, 0],
            cpu_times: Some(t),
        };
        let mut summary = HostSummary::default();
        assert_eq!(summary.lines()[0], "Host: not read yet");
        summary.update(host(times(100, 100)));
        assert_eq!(summary.lines()[1], "CPU: Z80, 2 CPUs");
        summary.update(host(times(130, 170)));
        let lines = summary.lines();
        assert_eq!(lines[0], "h: virtualization unavailable: no /dev/kvm");
        assert_eq!(lines[1], "CPU: Z80, 2 CPUs, 30% busy");
        assert_eq!(
            lines[2],
            "Memory: 256 MiB of 1 GiB in use (768 MiB available)"
        );
        assert_eq!(lines[3], "Load: 1.50 0.25 0.00");
        let mut available = host(times(0, 0));
        available.virtualization = Virtualization::Available(KvmInfo {
            api_version: 12,
            recommended_vcpus: 4,
            max_vcpus: 710,
            max_memslots: 32,
            capabilities: vec![],
        });
        summary.update(available);
        assert!(summary.lines()[0].contains("virtualization available (KVM API 12"));
    }

    #[test]
    fn backoff_doubles_to_a_cap_and_resets() {
        let mut b = Backoff::default();
        let waits: Vec<u64> = (0..7).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
        b.reset();
        assert_eq!(b.next_delay(), Backoff::FIRST);
    }
}
