//! Request handling: one routing `match` from [`Op`] to its handler, and
//! the one place internal errors become wire errors.
//!
//! Reads (`Host`, `ListVms`, `GetVm`) answer from the backends on request;
//! nothing is polled in between. VM backends (inventory, systemd, QMP) and
//! operations are not part of this version: the inventory is empty, so
//! `ListVms` is empty and every VM lookup or change answers `NotFound`, and
//! `Watch` answers `Unsupported`.

use std::sync::Arc;

use tracing::{Instrument, debug, error, info_span};
use vmd_proto::{ErrorReply, Op, Reply, Request, Response, Role, VmName};

use crate::connection::Session;
use crate::host::HostProbe;

/// Everything a request handler may fail with. Converted to the wire
/// error in exactly one place: `impl From<HandlerError> for ErrorReply`.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// The VM is not in the inventory the client can see.
    #[error("no VM named {0}")]
    UnknownVm(VmName),
    /// The operation id is unknown (or expired).
    #[error("no operation {0}")]
    UnknownOperation(vmd_proto::OperationId),
    /// The request is valid but this daemon cannot serve it.
    #[error("{0}")]
    Unsupported(&'static str),
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
    /// An invariant broke; logged in full, sent as `Internal`.
    #[error("internal error: {0}")]
    Internal(String),
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
            HandlerError::UnknownVm(name) => ErrorReply::NotFound {
                what: format!("VM {name}"),
            },
            HandlerError::UnknownOperation(id) => ErrorReply::NotFound {
                what: format!("operation {id}"),
            },
            HandlerError::Unsupported(reason) => ErrorReply::Unsupported {
                reason: reason.to_owned(),
            },
            e @ HandlerError::Forbidden { .. } => ErrorReply::Forbidden {
                reason: e.to_string(),
            },
            HandlerError::Internal(detail) => {
                error!(%detail, "internal error");
                ErrorReply::Internal
            }
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
        | Op::Watch { .. } => Role::Reader,
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
}

impl Handler {
    /// A handler over the given host probe.
    pub fn new(host: HostProbe) -> Self {
        Self { host }
    }

    /// Answers one request. Never fails: errors become the response.
    pub async fn handle(self: Arc<Self>, session: Arc<Session>, request: Request) -> Response {
        let span = info_span!("request", id = request.id, op = request.body.name());
        let id = request.id;
        let result = self
            .dispatch(&session, request.body)
            .instrument(span.clone())
            .await;
        let result = result.map_err(|err| {
            let _guard = span.enter();
            debug!(error = %err, "request failed");
            ErrorReply::from(err)
        });
        Response { id, result }
    }

    async fn dispatch(&self, session: &Session, op: Op) -> Result<Reply, HandlerError> {
        let need = required_role(&op);
        if session.role < Some(need) {
            return Err(HandlerError::Forbidden {
                op: op.name(),
                have: RoleName(session.role),
                need,
            });
        }
        match op {
            Op::Host => Ok(Reply::Host(self.host.probe())),
            Op::ListVms => Ok(Reply::Vms(Vec::new())),
            Op::GetVm { name }
            | Op::Start { name }
            | Op::Shutdown { name, .. }
            | Op::Restart { name }
            | Op::Pause { name }
            | Op::Resume { name }
            | Op::Resize { name, .. } => Err(HandlerError::UnknownVm(name)),
            Op::GetOperation { id } | Op::WaitOperation { id, .. } => {
                Err(HandlerError::UnknownOperation(id))
            }
            Op::Watch { .. } => Err(HandlerError::Unsupported(
                "watch is not available in this vmd version",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use vmd_proto::OperationId;

    use super::*;
    use crate::tls::PeerIdentity;
    use crate::transport::PeerAddr;

    fn session(role: Option<Role>) -> Arc<Session> {
        Arc::new(Session {
            identity: PeerIdentity {
                name: "t".into(),
                spki_sha256: String::new(),
            },
            peer: PeerAddr::Tcp("127.0.0.1:1".parse().expect("addr")),
            role,
        })
    }

    async fn ask(role: Option<Role>, body: Op) -> Result<Reply, ErrorReply> {
        let handler = Arc::new(Handler::new(HostProbe::new(Instant::now())));
        let response = handler.handle(session(role), Request { id: 7, body }).await;
        assert_eq!(response.id, 7);
        response.result
    }

    fn vm() -> VmName {
        VmName::new("gui-vm").expect("valid")
    }

    #[tokio::test]
    async fn host_answers_for_readers() {
        assert!(matches!(
            ask(Some(Role::Reader), Op::Host).await,
            Ok(Reply::Host(_))
        ));
    }

    #[tokio::test]
    async fn empty_inventory_is_not_faked() {
        assert_eq!(
            ask(Some(Role::Reader), Op::ListVms).await,
            Ok(Reply::Vms(vec![]))
        );
        assert!(matches!(
            ask(Some(Role::Reader), Op::GetVm { name: vm() }).await,
            Err(ErrorReply::NotFound { what }) if what == "VM gui-vm"
        ));
        assert!(matches!(
            ask(Some(Role::Admin), Op::Start { name: vm() }).await,
            Err(ErrorReply::NotFound { .. })
        ));
        assert!(matches!(
            ask(Some(Role::Reader), Op::GetOperation { id: OperationId(1) }).await,
            Err(ErrorReply::NotFound { .. })
        ));
        assert!(matches!(
            ask(
                Some(Role::Reader),
                Op::Watch {
                    since: 0,
                    timeout_ms: 1
                }
            )
            .await,
            Err(ErrorReply::Unsupported { .. })
        ));
    }

    #[tokio::test]
    async fn roles_gate_requests() {
        let err = ask(Some(Role::Reader), Op::Start { name: vm() }).await;
        assert!(matches!(err, Err(ErrorReply::Forbidden { .. })), "{err:?}");
        let force = Op::Shutdown {
            name: vm(),
            force: true,
            timeout_secs: None,
        };
        assert!(matches!(
            ask(Some(Role::Operator), force).await,
            Err(ErrorReply::Forbidden { .. })
        ));
        assert!(matches!(
            ask(None, Op::Host).await,
            Err(ErrorReply::Forbidden { .. })
        ));
    }

    #[test]
    fn internal_details_do_not_leak() {
        let wire = ErrorReply::from(HandlerError::Internal("secret path /x".into()));
        assert_eq!(wire, ErrorReply::Internal);
    }
}
