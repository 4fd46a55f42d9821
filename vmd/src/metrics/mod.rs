//! The metrics listener: `GET /metrics` in the OpenMetrics text format,
//! over HTTPS with the same mutual TLS as the other listeners.
//!
//! 1. `[listen.metrics] address = "…:9100"` turns it on (off by default).
//!    The server binds it beside the other listeners; its connections take
//!    slots under the same connection cap (`slots`), and go through the
//!    same TLS 1.3 server config, client-certificate verifier and CRLs
//!    (reloaded on SIGHUP), the same policy admission, per-identity
//!    connection cap, request rate and refusal penalty (see [`http`]).
//! 2. Who may scrape is policy: an identity with any role, `metrics`
//!    (which may do nothing else) or `reader` and up. An identity without
//!    one gets `403`, audited like a refusal on the main listener.
//! 3. Nothing is computed between scrapes: a scrape reads the live model
//!    (the records `GetVm` answers from, with the same on-request cgroup
//!    reads), the host probe (`/proc`, shared within a second as `Host`
//!    does) and the [`Counters`], builds a fresh [`Registry`] of the
//!    families below ([`collect`]) and encodes it ([`encode`]). No timer
//!    runs for metrics, so an idle daemon that is not scraped stays idle.
//! 4. The identity's `visible` scope filters the per-VM series: a VM it
//!    may not see has no series at all.
//!
//! Series (prefix `vmd_`):
//! - host: `host_cpu_seconds_total{mode}`, `host_memory_total_bytes`,
//!   `host_memory_available_bytes`, `host_load1`, `host_load5`,
//!   `host_load15`, `host_logical_cpus`, `host_kvm_available`;
//! - per VM (label `vm`): `vm_state{state}` (1 for the current state, 0
//!   for the others), `vm_vcpus`, `vm_memory_declared_bytes`,
//!   `vm_memory_current_bytes`, `vm_memory_balloon_bytes`,
//!   `vm_cpu_seconds_total`, `vm_memory_in_use_bytes`, `vm_restarts_total`,
//!   `vm_restart_needed` (a value the host cannot tell is left out);
//! - vmd itself: `connections_total{listener,transport}`,
//!   `requests_total{op,result}`, `tls_refusals_total{reason}`,
//!   `watchers`, `operations_total{kind,outcome}`.

pub mod encode;
pub mod http;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use vmd_proto::{ErrorReply, HostInfo, OperationKind, Virtualization, VmInfo, VmState};

use crate::transport::PeerAddr;

/// Every state a VM can be in: `vm_state` has one series per state.
pub const STATES: [VmState; 9] = [
    VmState::Running,
    VmState::Paused,
    VmState::Stopped,
    VmState::Starting,
    VmState::Stopping,
    VmState::Failed,
    VmState::Unknown,
    VmState::Frozen,
    VmState::Restarting,
];

/// Labels of one series: `(name, value)` pairs.
type Labels = Vec<(&'static str, String)>;
/// A gauge that holds a float.
type FloatGauge = Gauge<f64, AtomicU64>;
/// A counter that holds a float (seconds).
type FloatCounter = Counter<f64, AtomicU64>;

/// The listener a connection came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenerKind {
    /// The vmd protocol (TCP, vsock, hybrid vsock).
    Main,
    /// The metrics listener.
    Metrics,
}

/// Transports of [`Counters::connection`], in label order.
const TRANSPORTS: [&str; 3] = ["tcp", "vsock", "hvsock"];

/// Why a TLS handshake was refused, for `tls_refusals_total{reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsRefusal {
    /// The client presented no certificate.
    NoCertificate,
    /// The client certificate does not chain to vmd's CA.
    UnknownCa,
    /// The client certificate is revoked by a CRL.
    Revoked,
    /// The client certificate is expired or not yet valid.
    Expired,
    /// Another certificate problem.
    BadCertificate,
    /// Any other handshake failure (protocol version, ALPN, I/O).
    Handshake,
    /// The handshake did not finish within the handshake timeout.
    Timeout,
    /// The certificate names no usable identity.
    NoIdentity,
}

impl TlsRefusal {
    const ALL: [Self; 8] = [
        Self::NoCertificate,
        Self::UnknownCa,
        Self::Revoked,
        Self::Expired,
        Self::BadCertificate,
        Self::Handshake,
        Self::Timeout,
        Self::NoIdentity,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoCertificate => "no_certificate",
            Self::UnknownCa => "unknown_ca",
            Self::Revoked => "revoked",
            Self::Expired => "expired",
            Self::BadCertificate => "bad_certificate",
            Self::Handshake => "handshake",
            Self::Timeout => "timeout",
            Self::NoIdentity => "no_identity",
        }
    }

    /// The reason of a failed TLS accept.
    pub fn of(error: &std::io::Error) -> Self {
        use rustls::{CertificateError, Error};
        match error.get_ref().and_then(|e| e.downcast_ref::<Error>()) {
            Some(Error::NoCertificatesPresented) => Self::NoCertificate,
            Some(Error::InvalidCertificate(e)) => match e {
                CertificateError::UnknownIssuer => Self::UnknownCa,
                CertificateError::Revoked => Self::Revoked,
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => Self::Expired,
                _ => Self::BadCertificate,
            },
            _ => Self::Handshake,
        }
    }
}

/// vmd's own counters, bumped where the events happen (atomic adds and,
/// for the labelled pairs, a short lock) and read by a scrape.
#[derive(Debug)]
pub struct Counters {
    /// `[listener][transport]`.
    connections: [[AtomicU64; 3]; 2],
    tls_refusals: [AtomicU64; 8],
    requests: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    operations: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
}

/// The daemon's counters (one set per process).
pub static COUNTERS: Counters = Counters::new();

impl Counters {
    /// All zero.
    pub const fn new() -> Self {
        Self {
            connections: [const { [const { AtomicU64::new(0) }; 3] }; 2],
            tls_refusals: [const { AtomicU64::new(0) }; 8],
            requests: Mutex::new(BTreeMap::new()),
            operations: Mutex::new(BTreeMap::new()),
        }
    }

    /// An accepted connection.
    pub fn connection(&self, listener: ListenerKind, peer: &PeerAddr) {
        let t = match peer {
            PeerAddr::Tcp(_) => 0,
            PeerAddr::Vsock { .. } => 1,
            PeerAddr::HybridVsock { .. } => 2,
        };
        self.connections[listener as usize][t].fetch_add(1, Ordering::Relaxed);
    }

    /// A refused TLS handshake.
    pub fn tls_refusal(&self, reason: TlsRefusal) {
        self.tls_refusals[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// An answered request: its operation name and result.
    pub fn request(&self, op: &'static str, result: Result<(), &ErrorReply>) {
        self.request_labelled(op, result.err().map_or("ok", error_name));
    }

    /// An answered request with its result's label value.
    pub fn request_labelled(&self, op: &'static str, result: &'static str) {
        bump(&self.requests, (op, result));
    }

    /// A finished operation.
    pub fn operation(&self, kind: OperationKind, succeeded: bool) {
        let outcome = if succeeded { "succeeded" } else { "failed" };
        bump(&self.operations, (kind_name(kind), outcome));
    }

    fn pairs(
        map: &Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    ) -> Vec<((&'static str, &'static str), u64)> {
        lock(map).iter().map(|(k, v)| (*k, *v)).collect()
    }
}

impl Default for Counters {
    fn default() -> Self {
        Self::new()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Single increments: a poisoned map is consistent.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn bump(
    map: &Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    key: (&'static str, &'static str),
) {
    *lock(map).entry(key).or_default() += 1;
}

/// The label value of an error answer.
pub fn error_name(error: &ErrorReply) -> &'static str {
    match error {
        ErrorReply::Unauthenticated => "unauthenticated",
        ErrorReply::Forbidden { .. } => "forbidden",
        ErrorReply::NotFound { .. } => "not_found",
        ErrorReply::Busy { .. } => "busy",
        ErrorReply::Unsupported { .. } => "unsupported",
        ErrorReply::InvalidArgument { .. } => "invalid_argument",
        ErrorReply::Timeout => "timeout",
        ErrorReply::Unavailable { .. } => "unavailable",
        ErrorReply::Internal => "internal",
        ErrorReply::VersionMismatch { .. } => "version_mismatch",
        ErrorReply::Malformed { .. } => "malformed",
        ErrorReply::Failed { .. } => "failed",
        ErrorReply::LimitExceeded { .. } => "limit_exceeded",
    }
}

fn kind_name(kind: OperationKind) -> &'static str {
    match kind {
        OperationKind::Start => "start",
        OperationKind::Shutdown => "shutdown",
        OperationKind::Restart => "restart",
        OperationKind::Pause => "pause",
        OperationKind::Resume => "resume",
        OperationKind::Resize => "resize",
    }
}

/// What one scrape reads: the facts, already filtered by the identity's
/// scope.
#[derive(Debug)]
pub struct Scrape<'a> {
    /// Host facts.
    pub host: &'a HostInfo,
    /// The VMs the identity may see.
    pub vms: &'a [VmInfo],
    /// Open `Watch` requests, all identities.
    pub watchers: usize,
    /// vmd's counters.
    pub counters: &'a Counters,
}

fn labels<const N: usize>(pairs: [(&'static str, &str); N]) -> Labels {
    pairs.into_iter().map(|(k, v)| (k, v.to_owned())).collect()
}

fn as_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Millisecond and nanosecond counts as seconds (float metrics).
#[allow(clippy::cast_precision_loss)]
fn secs(value: u64, per_sec: f64) -> f64 {
    value as f64 / per_sec
}

/// Builds a fresh registry of every family from `scrape` (module docs).
pub fn collect(scrape: &Scrape<'_>) -> Registry {
    let mut registry = Registry::with_prefix("vmd");
    host(&mut registry, scrape.host);
    vms(&mut registry, scrape.vms);
    daemon(&mut registry, scrape);
    registry
}

fn host(registry: &mut Registry, host: &HostInfo) {
    let cpu = Family::<Labels, FloatCounter>::default();
    if let Some(t) = &host.cpu_times {
        for (mode, ms) in [
            ("user", t.user_ms),
            ("system", t.system_ms),
            ("idle", t.idle_ms),
            ("steal", t.steal_ms),
        ] {
            cpu.get_or_create(&labels([("mode", mode)]))
                .inc_by(secs(ms, 1e3));
        }
    }
    registry.register_with_unit(
        "host_cpu",
        "CPU time of the host by mode",
        Unit::Seconds,
        cpu,
    );
    let total = Gauge::<i64>::default();
    total.set(as_i64(host.memory.total.0));
    registry.register_with_unit(
        "host_memory_total",
        "Memory of the host",
        Unit::Bytes,
        total,
    );
    let available = Gauge::<i64>::default();
    available.set(as_i64(host.memory.available.0));
    registry.register_with_unit(
        "host_memory_available",
        "Memory available for new work (MemAvailable)",
        Unit::Bytes,
        available,
    );
    for (i, name) in ["host_load1", "host_load5", "host_load15"]
        .into_iter()
        .enumerate()
    {
        let load = FloatGauge::default();
        load.set(secs(host.load_milli[i].into(), 1e3));
        registry.register(name, "Load average of the host", load);
    }
    let cpus = Gauge::<i64>::default();
    cpus.set(host.cpu.logical_cpus.into());
    registry.register("host_logical_cpus", "Logical CPUs of the host", cpus);
    let kvm = Gauge::<i64>::default();
    kvm.set(i64::from(matches!(
        host.virtualization,
        Virtualization::Available(_)
    )));
    registry.register(
        "host_kvm_available",
        "1 when KVM is usable on the host, else 0",
        kvm,
    );
}

fn vms(registry: &mut Registry, vms: &[VmInfo]) {
    let state = Family::<Labels, Gauge>::default();
    let vcpus = Family::<Labels, Gauge>::default();
    let declared = Family::<Labels, Gauge>::default();
    let current = Family::<Labels, Gauge>::default();
    let balloon = Family::<Labels, Gauge>::default();
    let cpu = Family::<Labels, FloatCounter>::default();
    let in_use = Family::<Labels, Gauge>::default();
    let restarts = Family::<Labels, Counter>::default();
    let restart_needed = Family::<Labels, Gauge>::default();
    for vm in vms {
        let name = vm.name.as_str();
        let by_vm = labels([("vm", name)]);
        for s in STATES {
            let value = i64::from(vm.state == s);
            state
                .get_or_create(&labels([("vm", name), ("state", &s.to_string())]))
                .set(value);
        }
        if let Some(n) = vm.vcpus.current.or(vm.vcpus.declared) {
            vcpus.get_or_create(&by_vm).set(n.into());
        }
        for (family, bytes) in [
            (&declared, vm.memory.declared),
            (&current, vm.memory.current),
            (&balloon, vm.memory.balloon_actual),
            (&in_use, vm.cgroup_memory),
        ] {
            if let Some(b) = bytes {
                family.get_or_create(&by_vm).set(as_i64(b.0));
            }
        }
        if let Some(ns) = vm.cpu_time_ns {
            cpu.get_or_create(&by_vm).inc_by(secs(ns, 1e9));
        }
        if let Some(n) = vm.restarts {
            restarts.get_or_create(&by_vm).inc_by(n.into());
        }
        if let Some(needed) = vm.restart_needed {
            restart_needed.get_or_create(&by_vm).set(needed.into());
        }
    }
    registry.register(
        "vm_state",
        "1 for the VM's current state, 0 for the others",
        state,
    );
    registry.register(
        "vm_vcpus",
        "vCPUs of the VM (current, else declared)",
        vcpus,
    );
    registry.register_with_unit(
        "vm_memory_declared",
        "Memory the VM is declared with",
        Unit::Bytes,
        declared,
    );
    registry.register_with_unit(
        "vm_memory_current",
        "Memory the hypervisor gives the VM now (base plus hot-plugged)",
        Unit::Bytes,
        current,
    );
    registry.register_with_unit(
        "vm_memory_balloon",
        "The balloon's actual size: memory the guest may use",
        Unit::Bytes,
        balloon,
    );
    registry.register_with_unit("vm_cpu", "CPU time of the VM's unit", Unit::Seconds, cpu);
    registry.register_with_unit(
        "vm_memory_in_use",
        "Memory the VM's unit uses (its cgroup)",
        Unit::Bytes,
        in_use,
    );
    registry.register(
        "vm_restarts",
        "Automatic restarts of the VM's unit",
        restarts,
    );
    registry.register(
        "vm_restart_needed",
        "1 when the VM runs an older configuration than the one installed",
        restart_needed,
    );
}

fn daemon(registry: &mut Registry, scrape: &Scrape<'_>) {
    let c = scrape.counters;
    let connections = Family::<Labels, Counter>::default();
    for (l, listener) in ["main", "metrics"].into_iter().enumerate() {
        for (t, transport) in TRANSPORTS.into_iter().enumerate() {
            let n = c.connections[l][t].load(Ordering::Relaxed);
            if n > 0 || (l == 0 && t == 0) {
                connections
                    .get_or_create(&labels([("listener", listener), ("transport", transport)]))
                    .inc_by(n);
            }
        }
    }
    registry.register("connections", "Accepted connections", connections);
    let requests = Family::<Labels, Counter>::default();
    for ((op, result), n) in Counters::pairs(&c.requests) {
        requests
            .get_or_create(&labels([("op", op), ("result", result)]))
            .inc_by(n);
    }
    registry.register(
        "requests",
        "Answered requests by operation and result",
        requests,
    );
    let tls = Family::<Labels, Counter>::default();
    for reason in TlsRefusal::ALL {
        tls.get_or_create(&labels([("reason", reason.as_str())]))
            .inc_by(c.tls_refusals[reason as usize].load(Ordering::Relaxed));
    }
    registry.register("tls_refusals", "Refused TLS handshakes by reason", tls);
    let watchers = Gauge::<i64>::default();
    watchers.set(i64::try_from(scrape.watchers).unwrap_or(i64::MAX));
    registry.register("watchers", "Watch requests held open", watchers);
    let operations = Family::<Labels, Counter>::default();
    for ((kind, outcome), n) in Counters::pairs(&c.operations) {
        operations
            .get_or_create(&labels([("kind", kind), ("outcome", outcome)]))
            .inc_by(n);
    }
    registry.register(
        "operations",
        "Finished operations by kind and outcome",
        operations,
    );
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::host::HostProbe;
    use crate::policy::Scope;
    use crate::vms::tests::fixture;

    /// The series of a scrape by an identity that sees `visible`, from the
    /// live model.
    async fn scrape_seeing(visible: &Scope) -> String {
        let f = fixture(None).await;
        let host = HostProbe::new(Instant::now()).recent();
        let vms = f.service.list(visible, "scraper").await.expect("lists");
        encode::encode(&collect(&Scrape {
            host: &host,
            vms: &vms,
            watchers: 0,
            counters: &Counters::new(),
        }))
        .expect("encodes")
    }

    #[tokio::test]
    async fn the_visible_scope_filters_vm_series() {
        let all = scrape_seeing(&Scope::all()).await;
        for vm in ["admin-vm", "app-vm", "chv"] {
            assert!(
                all.contains(&format!("vmd_vm_state{{vm=\"{vm}\"")),
                "{vm}:\n{all}"
            );
        }
        assert!(
            all.contains("vmd_vm_state{vm=\"admin-vm\",state=\"running\"} 1"),
            "{all}"
        );
        let some = scrape_seeing(&Scope::of(["app-*"])).await;
        assert!(some.contains("vm=\"app-vm\""), "{some}");
        assert!(!some.contains("vm=\"admin-vm\""), "{some}");
        assert!(!some.contains("vm=\"chv\""), "{some}");
        // Host and daemon series are there whatever the scope.
        assert!(
            some.contains("# TYPE vmd_host_memory_total_bytes gauge"),
            "{some}"
        );
        let none = scrape_seeing(&Scope::none()).await;
        assert!(!none.contains("vm=\""), "{none}");
    }
}
