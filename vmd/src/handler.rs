//! Request handling: one routing `match` from [`Op`] to its handler, and
//! the one place internal errors become wire errors.
//!
//! 1. The client's role must cover the request (`reader` < `operator` <
//!    `admin`); VMs outside its visible scope do not exist for it, and its
//!    role only changes VMs in its change scope. `Rights` tells a client
//!    which VMs that is, so it offers only what would be accepted.
//! 2. Reads (`Host`, `ListVms`, `GetVm`, operations) answer from the
//!    backends on request; nothing is polled in between (`Host` shares a
//!    probe between requests within a second: `HostProbe::recent`).
//! 3. Changes need usable KVM on the host, then go to the VM service,
//!    which answers `Accepted` at once or refuses (busy, invalid,
//!    protected).
//! 4. Every error becomes an [`ErrorReply`] in `impl From<HandlerError> for
//!    ErrorReply`; backend details are logged there, never sent.
//! 5. Every change and every denial is written to the audit log.

use std::sync::Arc;
use std::time::Duration;

use tracing::{Instrument, debug, error, info_span, warn};
use vmd_proto::{
    ErrorReply, Op, OperationId, Reply, Request, Response, Rights, Role, Virtualization,
};

use crate::audit::{self, Outcome};
use crate::connection::Session;
use crate::drivers::BackendError;
use crate::host::HostProbe;
use crate::vms::ops::Busy;
use crate::vms::{Change, VmError, VmService};

/// The longest a `WaitOperation` may wait.
pub const MAX_WAIT: Duration = Duration::from_secs(300);

/// The longest a `Watch` may wait (a client re-issues it).
pub const MAX_WATCH: Duration = Duration::from_secs(300);

/// Everything a request handler may fail with. Converted to the wire
/// error in exactly one place: `impl From<HandlerError> for ErrorReply`.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// A VM request failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The operation id is unknown (or expired).
    #[error("no operation {0}")]
    UnknownOperation(OperationId),
    /// The request is valid but this daemon cannot serve it.
    #[error("{0}")]
    Unsupported(String),
    /// The VM is outside the scope the client's role applies to.
    #[error("{identity} may not change {vm}")]
    OutOfScope {
        /// The client.
        identity: String,
        /// The VM.
        vm: String,
    },
    /// The identity holds as many watches as it may.
    #[error(transparent)]
    Watchers(crate::vms::watch::TooManyWatchers),
    /// The client's role does not allow this request.
    #[error("role {have} may not {op} (needs {need})")]
    Forbidden {
        /// The request.
        op: &'static str,
        /// The client's role.
        have: RoleName,
        /// The role the request needs.
        need: Role,
    },
}

/// A client's role for messages, `none` when it has no rights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoleName(pub Option<Role>);

impl std::fmt::Display for RoleName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(role) => role.fmt(f),
            None => f.write_str("none"),
        }
    }
}

impl From<HandlerError> for ErrorReply {
    fn from(err: HandlerError) -> Self {
        match err {
            HandlerError::Vm(e) => e.into(),
            HandlerError::UnknownOperation(id) => ErrorReply::NotFound {
                what: format!("operation {id}"),
            },
            HandlerError::Unsupported(reason) => ErrorReply::Unsupported { reason },
            HandlerError::Watchers(e) => ErrorReply::LimitExceeded {
                limit: e.to_string(),
                retry_after_ms: None,
            },
            e @ (HandlerError::Forbidden { .. } | HandlerError::OutOfScope { .. }) => {
                ErrorReply::Forbidden {
                    reason: e.to_string(),
                }
            }
        }
    }
}

impl From<VmError> for ErrorReply {
    fn from(err: VmError) -> Self {
        match err {
            VmError::NotFound(name) => ErrorReply::NotFound {
                what: format!("VM {name}"),
            },
            VmError::Inventory(e) => {
                error!(error = %vmd_proto::error_chain(&e), "inventory unusable");
                ErrorReply::Unavailable {
                    reason: "the host's VM inventory cannot be read".into(),
                }
            }
            e @ VmError::Protected(_) => ErrorReply::Forbidden {
                reason: e.to_string(),
            },
            VmError::Busy(busy) => busy.into(),
            VmError::Invalid(reason) => ErrorReply::InvalidArgument { reason },
            VmError::Unsupported(reason) => ErrorReply::Unsupported { reason },
            e @ VmError::SocketHeld(_) => ErrorReply::Unavailable {
                reason: e.to_string(),
            },
            VmError::Backend(e) => e.into(),
        }
    }
}

impl From<Busy> for ErrorReply {
    fn from(busy: Busy) -> Self {
        ErrorReply::Busy {
            vm: busy.vm,
            operation: busy.kind,
            since_unix_ms: busy.since_unix_ms,
        }
    }
}

impl From<BackendError> for ErrorReply {
    /// Backend errors carry addresses, paths and the OS's words: they are
    /// logged here and the client gets a stable reason without them.
    fn from(err: BackendError) -> Self {
        let stable = |reason: &str| {
            error!(error = %err, reason, "backend error");
            reason.to_owned()
        };
        match &err {
            BackendError::Unavailable(what) if what.starts_with("systemd") => {
                ErrorReply::Unavailable {
                    reason: stable("systemd is unavailable"),
                }
            }
            BackendError::Unavailable(_) => ErrorReply::Unavailable {
                reason: stable("the VM's control socket is unavailable"),
            },
            BackendError::SocketBusy(_) => ErrorReply::Unavailable {
                reason: stable("the VM's control socket is busy with another client"),
            },
            BackendError::NoSuchUnit(unit) => ErrorReply::NotFound {
                what: format!("unit {unit}"),
            },
            BackendError::Timeout(_) => {
                stable("timed out");
                ErrorReply::Timeout
            }
            BackendError::JobFailed { .. } | BackendError::Unclean { .. } => ErrorReply::Failed {
                reason: err.to_string(),
            },
            BackendError::Command { command, .. } => ErrorReply::Failed {
                reason: stable(&format!(
                    "{command} was refused (the reason is in vmd's log)"
                )),
            },
            BackendError::Protocol(_) => ErrorReply::Unavailable {
                reason: stable("a backend answered something unexpected"),
            },
        }
    }
}

/// The role a request needs.
fn required_role(op: &Op) -> Role {
    match op {
        Op::Host
        | Op::ListVms
        | Op::GetVm { .. }
        | Op::GetOperation { .. }
        | Op::WaitOperation { .. }
        | Op::Watch { .. }
        | Op::Rights => Role::Reader,
        Op::Start { .. }
        | Op::Shutdown { force: false, .. }
        | Op::Restart { .. }
        | Op::Pause { .. }
        | Op::Resume { .. } => Role::Operator,
        Op::Shutdown { force: true, .. } | Op::Resize { .. } => Role::Admin,
    }
}

/// Serves requests; shared by every connection.
#[derive(Debug)]
pub struct Handler {
    host: HostProbe,
    vms: VmService,
    max_watchers: usize,
}

impl Handler {
    /// A handler over the host probe and the VM service.
    pub fn new(host: HostProbe, vms: VmService) -> Self {
        Self {
            host,
            vms,
            max_watchers: crate::usage::IdentityLimits::default().max_watchers,
        }
    }

    /// Caps the `Watch` requests one identity may hold open at once.
    #[must_use]
    pub fn with_max_watchers(mut self, max: usize) -> Self {
        self.max_watchers = max;
        self
    }

    /// After a reload: the inventory may have changed, so unit signals
    /// are followed anew and pending watches answer a snapshot.
    pub fn vms_changed(&self) {
        let vms = self.vms.clone();
        tokio::spawn(async move {
            if let Err(e) = vms.reload().await {
                warn!(error = %vmd_proto::error_chain(&e), "inventory unreadable; keeping the VMs declared before");
            }
        });
    }

    /// The host probe (the metrics listener reads it as `Host` does).
    pub fn host(&self) -> &HostProbe {
        &self.host
    }

    /// The VM service (the metrics listener reads the live model).
    pub fn vms(&self) -> &VmService {
        &self.vms
    }

    /// The vsock CID the inventory declares for a VM (for vsock binding).
    pub fn cid_of(&self, vm: &vmd_proto::VmName) -> Option<u32> {
        self.vms.cid_of(vm)
    }

    /// Answers one request. Never fails: errors become the response.
    /// Changes and denials are audited.
    pub async fn handle(self: Arc<Self>, session: Arc<Session>, request: Request) -> Response {
        let span = info_span!("request", id = request.id, op = request.body.name());
        let Request { id, body } = request;
        let result = self
            .dispatch(&session, body.clone())
            .instrument(span.clone())
            .await;
        let result = result.map_err(|err| {
            let _guard = span.enter();
            debug!(error = %err, "request failed");
            ErrorReply::from(err)
        });
        crate::metrics::COUNTERS.request(body.name(), result.as_ref().map(|_| ()));
        if audit::is_audited(&body, &result) {
            let outcome = match &result {
                Ok(Reply::Accepted(op)) => Outcome::Accepted(op.id),
                Ok(_) => Outcome::Admitted,
                Err(e) => Outcome::Refused(e.to_string()),
            };
            audit::request(&session.identity, &session.peer, &body, &outcome);
        }
        Response { id, result }
    }

    async fn dispatch(&self, session: &Session, op: Op) -> Result<Reply, HandlerError> {
        let need = required_role(&op);
        if session.role() < Some(need) {
            return Err(HandlerError::Forbidden {
                op: op.name(),
                have: RoleName(session.role()),
                need,
            });
        }
        let grant = &session.grant;
        let me = session.identity.name.as_str();
        let change = match op {
            Op::Host => return Ok(Reply::Host(self.host.recent())),
            Op::ListVms => return Ok(Reply::Vms(self.vms.list(&grant.visible, me).await?)),
            Op::GetVm { name } => {
                return Ok(Reply::Vm(self.vms.get(&name, &grant.visible, me).await?));
            }
            Op::GetOperation { id } => {
                return self
                    .vms
                    .operations()
                    .get(id, me)
                    .map(Reply::Operation)
                    .ok_or(HandlerError::UnknownOperation(id));
            }
            Op::WaitOperation { id, timeout_ms } => {
                let timeout = Duration::from_millis(timeout_ms.into()).min(MAX_WAIT);
                return self
                    .vms
                    .operations()
                    .wait(id, timeout, me)
                    .await
                    .map(Reply::Operation)
                    .ok_or(HandlerError::UnknownOperation(id));
            }
            Op::Watch {
                since,
                vms,
                timeout_ms,
            } => {
                let _slot = self
                    .vms
                    .changes()
                    .enter(me, self.max_watchers)
                    .map_err(HandlerError::Watchers)?;
                let timeout = Duration::from_millis(timeout_ms.into()).min(MAX_WATCH);
                return Ok(Reply::Changed(
                    self.vms
                        .watch(since, &vms, &grant.visible, me, timeout)
                        .await?,
                ));
            }
            Op::Rights => return Ok(Reply::Rights(self.rights(session).await?)),
            Op::Start { name } => (name, Change::Start),
            Op::Shutdown {
                name,
                force,
                timeout_secs,
            } => (
                name,
                Change::Shutdown {
                    force,
                    timeout: timeout_secs.map(|s| Duration::from_secs(s.into())),
                },
            ),
            Op::Restart { name } => (name, Change::Restart),
            Op::Pause { name } => (name, Change::Pause),
            Op::Resume { name } => (name, Change::Resume),
            Op::Resize {
                name,
                vcpus,
                memory,
            } => (name, Change::Resize { vcpus, memory }),
        };
        let (name, change) = change;
        // Outside the visible scope a VM does not exist for this client.
        if !grant.visible.contains(&name) {
            return Err(VmError::NotFound(name).into());
        }
        if !grant.change.contains(&name) {
            return Err(HandlerError::OutOfScope {
                identity: me.to_owned(),
                vm: name.to_string(),
            });
        }
        if let Virtualization::Unavailable { reason } = self.host.probe().virtualization {
            return Err(HandlerError::Unsupported(format!(
                "VMs cannot be changed on this host: {reason}"
            )));
        }
        Ok(Reply::Accepted(self.vms.change(&name, change, me).await?))
    }

    /// The session's role and the VMs it sees that it may change: the
    /// same rules as a change's (role, change scope, protected), so a
    /// client can offer only what would be accepted.
    async fn rights(&self, session: &Session) -> Result<Rights, HandlerError> {
        let grant = &session.grant;
        let mut changeable: Vec<_> = if session.role() >= Some(Role::Operator) {
            self.vms
                .list(&grant.visible, &session.identity.name)
                .await?
                .into_iter()
                .filter(|vm| !vm.protected && grant.change.contains(&vm.name))
                .map(|vm| vm.name)
                .collect()
        } else {
            Vec::new()
        };
        changeable.sort_unstable();
        Ok(Rights {
            identity: session.identity.name.clone(),
            role: session.role(),
            changeable,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use vmd_proto::{OperationId, VmName};

    use super::*;
    use crate::drivers::ActiveState;
    use crate::policy::{Grant, Scope};
    use crate::tls::PeerIdentity;
    use crate::transport::PeerAddr;
    use crate::vms::tests::{Fixture, fixture};

    fn session(role: Option<Role>) -> Arc<Session> {
        Arc::new(Session {
            identity: PeerIdentity {
                name: "t".into(),
                spki_sha256: String::new(),
            },
            peer: PeerAddr::Tcp("127.0.0.1:1".parse().expect("addr")),
            grant: Grant {
                role,
                visible: Scope::all(),
                change: Scope::all(),
                matched: true,
            },
        })
    }

    async fn ask(f: &Fixture, role: Option<Role>, body: Op) -> Result<Reply, ErrorReply> {
        let handler = Arc::new(Handler::new(
            HostProbe::new(Instant::now()),
            f.service.clone(),
        ));
        let response = handler.handle(session(role), Request { id: 7, body }).await;
        assert_eq!(response.id, 7);
        response.result
    }

    fn vm(name: &str) -> VmName {
        VmName::new(name).expect("valid")
    }

    fn kvm_usable() -> bool {
        kvm_ioctls::Kvm::new().is_ok()
    }

    #[tokio::test]
    async fn the_metrics_role_is_forbidden_everything() {
        let f = fixture(None).await;
        let app = || vm("app-vm");
        let every_op = [
            Op::Host,
            Op::ListVms,
            Op::GetVm { name: app() },
            Op::GetOperation { id: OperationId(1) },
            Op::WaitOperation {
                id: OperationId(1),
                timeout_ms: 1,
            },
            Op::Watch {
                since: 0,
                vms: Vec::new(),
                timeout_ms: 1,
            },
            Op::Start { name: app() },
            Op::Shutdown {
                name: app(),
                force: false,
                timeout_secs: None,
            },
            Op::Shutdown {
                name: app(),
                force: true,
                timeout_secs: None,
            },
            Op::Restart { name: app() },
            Op::Pause { name: app() },
            Op::Resume { name: app() },
            Op::Resize {
                name: app(),
                vcpus: Some(2),
                memory: None,
            },
        ];
        for op in every_op {
            let name = op.name();
            match ask(&f, Some(Role::Metrics), op).await {
                Err(ErrorReply::Forbidden { reason }) => {
                    assert!(reason.starts_with("role metrics may not"), "{reason}");
                }
                other => panic!("{name}: {other:?}"),
            }
        }
        // A reader still reads.
        assert!(matches!(
            ask(&f, Some(Role::Reader), Op::ListVms).await,
            Ok(Reply::Vms(_))
        ));
    }

    #[tokio::test]
    async fn reads_answer_for_readers() {
        let f = fixture(None).await;
        assert!(matches!(
            ask(&f, Some(Role::Reader), Op::Host).await,
            Ok(Reply::Host(_))
        ));
        match ask(&f, Some(Role::Reader), Op::ListVms).await {
            Ok(Reply::Vms(vms)) => assert_eq!(vms.len(), 3),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            ask(&f, Some(Role::Reader), Op::GetVm { name: vm("ghost") }).await,
            Err(ErrorReply::NotFound { what }) if what == "VM ghost"
        ));
        assert!(matches!(
            ask(
                &f,
                Some(Role::Reader),
                Op::GetOperation { id: OperationId(1) }
            )
            .await,
            Err(ErrorReply::NotFound { .. })
        ));
        match ask(
            &f,
            Some(Role::Reader),
            Op::Watch {
                since: 0,
                vms: Vec::new(),
                timeout_ms: 1,
            },
        )
        .await
        {
            Ok(Reply::Changed(event)) => {
                assert!(event.snapshot);
                assert_eq!(event.changed.len(), 3);
            }
            other => panic!("{other:?}"),
        }
    }

    fn watch(since: u64, vms: &[&str], timeout_ms: u32) -> Op {
        Op::Watch {
            since,
            vms: vms.iter().map(|n| vm(n)).collect(),
            timeout_ms,
        }
    }

    fn changed(reply: Result<Reply, ErrorReply>) -> vmd_proto::WatchEvent {
        match reply {
            Ok(Reply::Changed(event)) => event,
            other => panic!("expected Changed, got {other:?}"),
        }
    }

    /// A pending watch is woken by a unit signal (a change made outside
    /// vmd) and answers that VM's fresh state; the next one starts from
    /// the generation it returned.
    #[tokio::test]
    async fn a_watch_is_woken_by_a_unit_signal() {
        let f = fixture(None).await;
        let first = changed(ask(&f, Some(Role::Reader), watch(0, &[], 1)).await);
        assert!(first.snapshot);
        let waiting = tokio::spawn({
            let service = f.service.clone();
            async move {
                let handler = Arc::new(Handler::new(HostProbe::new(Instant::now()), service));
                handler
                    .handle(
                        session(Some(Role::Reader)),
                        Request {
                            id: 1,
                            body: watch(first.generation, &[], 60_000),
                        },
                    )
                    .await
                    .result
            }
        });
        // The watch subscribed when it was first asked; wait until the
        // second is parked, then change a unit the way systemctl would.
        while f.service.changes().watchers("t") == 0 {
            tokio::task::yield_now().await;
        }
        f.units.set("microvm@app-vm.service", ActiveState::Active);
        let event = changed(waiting.await.expect("watch task"));
        assert!(!event.snapshot);
        assert!(event.generation > first.generation);
        let names: Vec<&str> = event.changed.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["app-vm"]);
        assert_eq!(event.changed[0].state, vmd_proto::VmState::Running);
        // vmd's monitor attaches next; then nothing changes: a short watch
        // times out empty.
        let mut event = event;
        while event
            .changed
            .iter()
            .any(|i| i.live.source != vmd_proto::LiveSource::Monitor)
        {
            event = changed(ask(&f, Some(Role::Reader), watch(event.generation, &[], 5_000)).await);
        }
        let quiet = changed(ask(&f, Some(Role::Reader), watch(event.generation, &[], 10)).await);
        assert!(quiet.changed.is_empty() && !quiet.snapshot);
        assert_eq!(quiet.generation, event.generation);
    }

    /// Watchers are told only of VMs they watch and may see: a change of
    /// another VM leaves them waiting.
    #[tokio::test]
    async fn watches_answer_only_for_their_own_vms() {
        let f = fixture(None).await;
        let start = changed(ask(&f, Some(Role::Reader), watch(0, &[], 1)).await).generation;
        f.units.set("microvm@chv.service", ActiveState::Active);
        let only_app = changed(ask(&f, Some(Role::Reader), watch(start, &["app-vm"], 20)).await);
        assert!(only_app.changed.is_empty(), "{only_app:?}");
        let all = changed(ask(&f, Some(Role::Reader), watch(start, &[], 5_000)).await);
        let names: Vec<&str> = all.changed.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["chv"]);
    }

    /// Lost unit signals (the bus went away) make every VM's state
    /// unknown, which wakes watches; the follower subscribes again by
    /// itself and the states come back.
    #[tokio::test]
    async fn lost_signals_make_states_unknown_until_resubscribed() {
        let f = fixture(None).await;
        let start = changed(ask(&f, Some(Role::Reader), watch(0, &[], 1)).await).generation;
        f.units.drop_subscribers();
        let event = changed(ask(&f, Some(Role::Reader), watch(start, &[], 5_000)).await);
        assert_eq!(event.changed.len(), 3, "{event:?}");
        assert!(
            event
                .changed
                .iter()
                .all(|i| i.state == vmd_proto::VmState::Unknown),
            "{event:?}"
        );
        let mut generation = event.generation;
        loop {
            let next = changed(
                ask(
                    &f,
                    Some(Role::Reader),
                    watch(generation, &["admin-vm"], 5_000),
                )
                .await,
            );
            generation = next.generation;
            if next
                .changed
                .iter()
                .any(|i| i.state == vmd_proto::VmState::Running)
            {
                break;
            }
        }
        assert_eq!(
            f.units.subscribers.lock().expect("lock").len(),
            1,
            "resubscribed"
        );
    }

    #[tokio::test]
    async fn watches_are_capped_per_identity() {
        let f = fixture(None).await;
        let handler = Arc::new(
            Handler::new(HostProbe::new(Instant::now()), f.service.clone()).with_max_watchers(1),
        );
        let first = changed(
            handler
                .clone()
                .handle(
                    session(Some(Role::Reader)),
                    Request {
                        id: 1,
                        body: watch(0, &[], 1),
                    },
                )
                .await
                .result,
        );
        let held = tokio::spawn({
            let handler = handler.clone();
            async move {
                handler
                    .handle(
                        session(Some(Role::Reader)),
                        Request {
                            id: 2,
                            body: watch(first.generation, &[], 60_000),
                        },
                    )
                    .await
            }
        });
        while f.service.changes().watchers("t") == 0 {
            tokio::task::yield_now().await;
        }
        let refused = handler
            .clone()
            .handle(
                session(Some(Role::Reader)),
                Request {
                    id: 3,
                    body: watch(0, &[], 1),
                },
            )
            .await
            .result;
        assert!(
            matches!(&refused, Err(ErrorReply::LimitExceeded { limit, .. }) if limit.contains("at most 1")),
            "{refused:?}"
        );
        held.abort();
        let _ = held.await;
        // The aborted watch gave its slot back.
        assert_eq!(f.service.changes().watchers("t"), 0);
    }

    #[tokio::test]
    async fn roles_gate_requests() {
        let f = fixture(None).await;
        let err = ask(&f, Some(Role::Reader), Op::Start { name: vm("app-vm") }).await;
        assert!(matches!(err, Err(ErrorReply::Forbidden { .. })), "{err:?}");
        let force = Op::Shutdown {
            name: vm("app-vm"),
            force: true,
            timeout_secs: None,
        };
        assert!(matches!(
            ask(&f, Some(Role::Operator), force).await,
            Err(ErrorReply::Forbidden { .. })
        ));
        assert!(matches!(
            ask(&f, None, Op::Host).await,
            Err(ErrorReply::Forbidden { .. })
        ));
    }

    #[tokio::test]
    async fn changes_are_accepted_then_waited_for() {
        let f = fixture(None).await;
        let reply = ask(&f, Some(Role::Operator), Op::Start { name: vm("app-vm") }).await;
        if !kvm_usable() {
            assert!(
                matches!(reply, Err(ErrorReply::Unsupported { .. })),
                "{reply:?}"
            );
            return;
        }
        let Ok(Reply::Accepted(op)) = reply else {
            panic!("{reply:?}")
        };
        let waited = ask(
            &f,
            Some(Role::Reader),
            Op::WaitOperation {
                id: op.id,
                timeout_ms: 10_000,
            },
        )
        .await;
        assert!(
            matches!(&waited, Ok(Reply::Operation(info)) if info.status == vmd_proto::OperationStatus::Succeeded),
            "{waited:?}"
        );
        // The protected VM is Forbidden, even for admins.
        assert!(matches!(
            ask(&f, Some(Role::Admin), Op::Restart { name: vm("admin-vm") }).await,
            Err(ErrorReply::Forbidden { reason }) if reason.contains("protected")
        ));
    }

    #[tokio::test]
    async fn scopes_hide_and_fence_vms() {
        let f = fixture(None).await;
        let handler = Arc::new(Handler::new(
            HostProbe::new(Instant::now()),
            f.service.clone(),
        ));
        let session = Arc::new(Session {
            identity: PeerIdentity {
                name: "gui".into(),
                spki_sha256: String::new(),
            },
            peer: PeerAddr::Vsock { cid: 3, port: 1 },
            grant: Grant {
                role: Some(Role::Operator),
                visible: Scope::of(["app-vm", "admin-vm"]),
                change: Scope::of(["admin-vm"]),
                matched: true,
            },
        });
        let ask = |body| {
            let (handler, session) = (handler.clone(), session.clone());
            async move {
                handler
                    .handle(session, Request { id: 1, body })
                    .await
                    .result
            }
        };
        // Lists omit what is not visible; lookups cannot tell it exists.
        match ask(Op::ListVms).await {
            Ok(Reply::Vms(vms)) => {
                let names: Vec<_> = vms.iter().map(|v| v.name.as_str()).collect();
                assert_eq!(names, ["admin-vm", "app-vm"]);
            }
            other => panic!("{other:?}"),
        }
        for body in [Op::GetVm { name: vm("chv") }, Op::Start { name: vm("chv") }] {
            assert!(
                matches!(ask(body).await, Err(ErrorReply::NotFound { what }) if what == "VM chv"),
                "invisible VMs are not found"
            );
        }
        // Visible but outside the change scope: forbidden, with nothing done.
        assert!(matches!(
            ask(Op::Start { name: vm("app-vm") }).await,
            Err(ErrorReply::Forbidden { reason }) if reason == "gui may not change app-vm"
        ));
        assert!(f.units.calls.lock().expect("lock").is_empty());
        // Rights say so before anyone tries: app-vm is outside the change
        // scope, admin-vm is protected; chv, unseen, is not named.
        match ask(Op::Rights).await {
            Ok(Reply::Rights(rights)) => {
                assert_eq!(rights.identity, "gui");
                assert_eq!(rights.role, Some(Role::Operator));
                assert!(rights.changeable.is_empty(), "{rights:?}");
            }
            other => panic!("{other:?}"),
        }
    }

    /// `Rights` names the visible VMs a change would be accepted for:
    /// none for a reader, every unprotected one for an operator or admin
    /// whose change scope is everything; a metrics identity is refused it
    /// as any other request on the main listener.
    #[tokio::test]
    async fn rights_name_what_the_session_may_change() {
        let f = fixture(None).await;
        let changeable = |reply| match reply {
            Ok(Reply::Rights(rights)) => rights
                .changeable
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        };
        assert!(changeable(ask(&f, Some(Role::Reader), Op::Rights).await).is_empty());
        for role in [Role::Operator, Role::Admin] {
            let rights = changeable(ask(&f, Some(role), Op::Rights).await);
            assert_eq!(rights, ["app-vm", "chv"], "{role}");
        }
        for role in [Some(Role::Metrics), None] {
            assert!(matches!(
                ask(&f, role, Op::Rights).await,
                Err(ErrorReply::Forbidden { .. })
            ));
        }
    }

    #[test]
    fn backend_details_do_not_leak() {
        let wire = ErrorReply::from(BackendError::Protocol("secret path /x".into()));
        assert!(matches!(wire, ErrorReply::Unavailable { reason } if !reason.contains("/x")));
        for err in [
            BackendError::Unavailable(
                "systemd (D-Bus at unix:path=/run/x/no-such-bus: No such file or directory (os error 2))".into(),
            ),
            BackendError::Unavailable("control socket /var/lib/microvms/a/vmd-qmp.sock".into()),
            BackendError::SocketBusy("QMP /var/lib/microvms/a/a.sock".into()),
            BackendError::Command {
                command: "device_add".into(),
                description: "Could not open '/dev/vfio/7'".into(),
            },
        ] {
            let wire = ErrorReply::from(err).to_string();
            assert!(!wire.contains('/') && !wire.contains("os error"), "{wire}");
        }
        assert_eq!(
            ErrorReply::from(BackendError::Timeout("unit".into())),
            ErrorReply::Timeout
        );
    }
}
