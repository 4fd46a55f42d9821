//! The audit log: every change request and every denial, as a structured
//! record on its own tracing target ([`TARGET`]), so it can be routed to
//! the journal (or a file) apart from operational logs, e.g. with
//! `RUST_LOG=vmd::audit=info` or a JSON log filtered on `target`.
//!
//! A record names who (certificate identity and key fingerprint), from
//! where (transport peer), what (operation, VM), and how it ended (result,
//! operation id). Records never carry key material or request payloads
//! beyond these fields.

use std::fmt;

use tracing::info;
use vmd_proto::{ErrorReply, Op, OperationId};

use crate::tls::PeerIdentity;
use crate::transport::PeerAddr;

/// The tracing target of audit records.
pub const TARGET: &str = "vmd::audit";

/// How an audited request or connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A connection was admitted.
    Admitted,
    /// A change was accepted and runs as this operation.
    Accepted(OperationId),
    /// A change ended (its operation's final state).
    Finished(Result<(), ErrorReply>),
    /// Refused: by TLS, the policy, a limit, or the request's own error.
    Refused(String),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Admitted => f.write_str("admitted"),
            Self::Accepted(_) => f.write_str("accepted"),
            Self::Finished(Ok(())) => f.write_str("succeeded"),
            Self::Finished(Err(e)) => write!(f, "failed: {e}"),
            Self::Refused(why) => write!(f, "refused: {why}"),
        }
    }
}

/// Records a connection that was refused before a session existed (TLS
/// handshake failure, policy denial, connection limit).
pub fn connection(peer: &PeerAddr, identity: Option<&PeerIdentity>, outcome: &Outcome) {
    info!(
        target: TARGET,
        event = "connection",
        identity = identity.map_or("-", |i| i.name.as_str()),
        fingerprint = identity.map_or("-", |i| i.spki_sha256.as_str()),
        transport = transport(peer),
        %peer,
        result = %outcome,
    );
}

/// Records a request: every change, and every request that was denied.
pub fn request(identity: &PeerIdentity, peer: &PeerAddr, op: &Op, outcome: &Outcome) {
    let operation = match outcome {
        Outcome::Accepted(id) => id.to_string(),
        _ => "-".to_owned(),
    };
    info!(
        target: TARGET,
        event = "request",
        identity = %identity.name,
        fingerprint = %identity.spki_sha256,
        transport = transport(peer),
        %peer,
        vm = op.vm().map_or("-", |vm| vm.as_str()),
        op = op.name(),
        result = %outcome,
        operation = %operation,
    );
}

/// Records the end of an accepted change.
pub fn finished(identity: &str, vm: &str, operation: OperationId, kind: &str, outcome: &Outcome) {
    info!(
        target: TARGET,
        event = "operation",
        identity,
        vm,
        op = kind,
        operation = %operation,
        result = %outcome,
    );
}

fn transport(peer: &PeerAddr) -> &'static str {
    match peer {
        PeerAddr::Tcp(_) => "tcp",
        PeerAddr::Vsock { .. } => "vsock",
        PeerAddr::HybridVsock { .. } => "hvsock",
    }
}

/// Whether a request's answer is audited: every change, and every denial.
pub fn is_audited(op: &Op, result: &Result<vmd_proto::Reply, ErrorReply>) -> bool {
    let change = !matches!(
        op,
        Op::Host
            | Op::ListVms
            | Op::GetVm { .. }
            | Op::GetOperation { .. }
            | Op::WaitOperation { .. }
            | Op::Watch { .. }
    );
    change
        || matches!(
            result,
            Err(ErrorReply::Forbidden { .. } | ErrorReply::LimitExceeded { .. })
        )
}
