//! The audit log: every change request and every denial, as a structured
//! record on its own tracing target ([`TARGET`]), so it can be routed to
//! the journal (or a file) apart from operational logs, e.g. with
//! `RUST_LOG=vmd::audit=info` or a JSON log filtered on `target`.
//!
//! A record names who (certificate identity and key fingerprint), from
//! where (transport peer), what (operation, VM), and how it ended (result,
//! operation id). Records never carry key material or request payloads
//! beyond these fields.
//!
//! # How much one identity can write
//!
//! Accepted changes and their ends are always recorded: they are bounded by
//! the operations themselves (one change per VM at a time, a host-wide
//! cap). Everything else — admissions, refusals at the connection and of
//! requests, refusal summaries — is *metered* per identity (per
//! certificate name; records without an identity share one meter):
//!
//! 1. A connection records its first [`REFUSALS_RECORDED_SINGLY`] refused
//!    requests one by one, and the rest as one `refusals` record with
//!    their `count` when it closes (see `connection`).
//! 2. Each metered record spends a token of the identity's bucket:
//!    [`METERED_BURST`] records at once, [`METERED_PER_SECOND`] per second
//!    sustained. Without a token the record is not written but counted; a
//!    `suppressed` record with that `count` follows as soon as a token is
//!    due (a timer runs only while something is being suppressed).
//!
//! So one identity adds at most `METERED_BURST` records at once and
//! `METERED_PER_SECOND` records per second after that, whatever it sends,
//! and a record is at most about 600 bytes of JSON: about 1.2 KB/s
//! sustained per identity.

use std::collections::HashMap;
use std::fmt;
use std::sync::{LazyLock, Mutex, MutexGuard};
use std::time::{Duration, Instant};

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

/// Refused requests a connection records one by one; the rest of its
/// refusals become one `refusals` record with a count.
pub const REFUSALS_RECORDED_SINGLY: u32 = 4;

/// Metered records one identity may write at once.
pub const METERED_BURST: u32 = 64;

/// Metered records one identity may write per second, sustained.
pub const METERED_PER_SECOND: u32 = 2;

/// Meters kept at most; beyond, records share one meter.
const MAX_METERS: usize = 4096;

/// The meter of records that carry no identity (TLS refusals).
const NO_IDENTITY: &str = "-";

/// The meter shared by identities beyond [`MAX_METERS`].
const OVERFLOW: &str = "(overflow)";

#[derive(Debug)]
struct Meter {
    tokens: f64,
    refilled: Instant,
    suppressed: u64,
    flush_scheduled: bool,
}

impl Meter {
    fn new(now: Instant) -> Self {
        Self {
            tokens: f64::from(METERED_BURST),
            refilled: now,
            suppressed: 0,
            flush_scheduled: false,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.tokens =
            (self.tokens + elapsed * f64::from(METERED_PER_SECOND)).min(f64::from(METERED_BURST));
        self.refilled = now;
    }

    fn is_full_and_quiet(&self) -> bool {
        self.tokens >= f64::from(METERED_BURST) && self.suppressed == 0 && !self.flush_scheduled
    }
}

/// The per-identity meters (module docs, step 2).
#[derive(Debug, Default)]
struct Meters {
    meters: Mutex<HashMap<String, Meter>>,
}

static METERS: LazyLock<Meters> = LazyLock::new(Meters::default);

/// What the meter says about one record.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Write it; this many records of the identity were suppressed before.
    Write { suppressed: u64 },
    /// Do not write it; schedule a `suppressed` record if `schedule`.
    Suppress { schedule: bool },
}

impl Meters {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Meter>> {
        // Every update leaves each meter consistent: a poisoned map is usable.
        self.meters
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn take(&self, key: &str, now: Instant) -> Verdict {
        let mut meters = self.lock();
        if !meters.contains_key(key) && meters.len() >= MAX_METERS {
            meters.retain(|_, m| {
                m.refill(now);
                !m.is_full_and_quiet()
            });
        }
        let key = if meters.contains_key(key) || meters.len() < MAX_METERS {
            key
        } else {
            OVERFLOW
        };
        let meter = meters
            .entry(key.to_owned())
            .or_insert_with(|| Meter::new(now));
        meter.refill(now);
        if meter.tokens >= 1.0 {
            meter.tokens -= 1.0;
            Verdict::Write {
                suppressed: std::mem::take(&mut meter.suppressed),
            }
        } else {
            meter.suppressed += 1;
            let schedule = !meter.flush_scheduled;
            meter.flush_scheduled = true;
            Verdict::Suppress { schedule }
        }
    }

    /// The scheduled flush: the count to write now, or `None` to try later.
    fn flush(&self, key: &str, now: Instant) -> Option<u64> {
        let mut meters = self.lock();
        let meter = meters.get_mut(key)?;
        meter.refill(now);
        if meter.suppressed == 0 {
            meter.flush_scheduled = false;
            return Some(0);
        }
        if meter.tokens < 1.0 {
            return None;
        }
        meter.tokens -= 1.0;
        meter.flush_scheduled = false;
        Some(std::mem::take(&mut meter.suppressed))
    }
}

/// Writes a metered record of `key` through `write`, or counts it.
fn metered(key: &str, write: impl FnOnce(u64)) {
    match METERS.take(key, Instant::now()) {
        Verdict::Write { suppressed } => write(suppressed),
        Verdict::Suppress { schedule: true } => schedule_flush(key.to_owned()),
        Verdict::Suppress { schedule: false } => {}
    }
}

/// Writes the `suppressed` record of `key` once a token is due. Outside a
/// runtime (never in the daemon) the count waits for the next record.
fn schedule_flush(key: String) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let interval = Duration::from_secs(1) / METERED_PER_SECOND;
    runtime.spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            match METERS.flush(&key, Instant::now()) {
                Some(0) => return,
                Some(count) => {
                    info!(target: TARGET, event = "suppressed", identity = %key, count, "audit records of this identity not written singly");
                    return;
                }
                None => {}
            }
        }
    });
}

/// Records a connection: its admission, or its refusal before or at
/// `Hello` (TLS handshake failure, policy denial, limits). Metered.
pub fn connection(peer: &PeerAddr, identity: Option<&PeerIdentity>, outcome: &Outcome) {
    let key = identity.map_or(NO_IDENTITY, |i| i.name.as_str());
    metered(key, |suppressed| {
        info!(
            target: TARGET,
            event = "connection",
            identity = identity.map_or("-", |i| i.name.as_str()),
            fingerprint = identity.map_or("-", |i| i.spki_sha256.as_str()),
            transport = transport(peer),
            %peer,
            result = %outcome,
            suppressed,
        );
    });
}

/// Records a request: an accepted change (always), or a refused request
/// (metered).
pub fn request(identity: &PeerIdentity, peer: &PeerAddr, op: &Op, outcome: &Outcome) {
    let write = |suppressed: u64| {
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
            suppressed,
        );
    };
    match outcome {
        Outcome::Refused(_) => metered(&identity.name, write),
        _ => write(0),
    }
}

/// Records the refused requests of one connection that were not recorded
/// singly, as one record with their `count` (metered).
pub fn refusals(identity: &PeerIdentity, peer: &PeerAddr, count: u32, why: &str) {
    metered(&identity.name, |suppressed| {
        info!(
            target: TARGET,
            event = "refusals",
            identity = %identity.name,
            fingerprint = %identity.spki_sha256,
            transport = transport(peer),
            %peer,
            count,
            result = %format_args!("refused: {count} more requests ({why})"),
            suppressed,
        );
    });
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

/// Whether the request handler records a request's answer: every change
/// that was taken. Refusals are the connection's to record, so that a burst
/// of them becomes one record ([`is_audited_refusal`]).
pub fn is_audited(op: &Op, result: &Result<vmd_proto::Reply, ErrorReply>) -> bool {
    is_change(op) && result.is_ok()
}

/// Whether a refused request is audited: a refused change, and any request
/// denied (`Forbidden`, `LimitExceeded`).
pub fn is_audited_refusal(op: &Op, error: &ErrorReply) -> bool {
    is_change(op) || is_denial(error)
}

/// Whether an error is a denial or a malformed request: what spends the
/// connection's refusal budget (`limits.max_refusals_per_connection`).
pub fn is_denial(error: &ErrorReply) -> bool {
    matches!(
        error,
        ErrorReply::Forbidden { .. }
            | ErrorReply::LimitExceeded { .. }
            | ErrorReply::Malformed { .. }
    )
}

fn is_change(op: &Op) -> bool {
    // Exhaustive, so that a new op must be placed on one side.
    match op {
        Op::Host
        | Op::ListVms
        | Op::GetVm { .. }
        | Op::GetOperation { .. }
        | Op::WaitOperation { .. }
        | Op::Watch { .. }
        | Op::Rights => false,
        Op::Start { .. }
        | Op::Shutdown { .. }
        | Op::Restart { .. }
        | Op::Pause { .. }
        | Op::Resume { .. }
        | Op::Resize { .. } => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meters_allow_a_burst_then_count_and_flush() {
        let meters = Meters::default();
        let now = Instant::now();
        for _ in 0..METERED_BURST {
            assert_eq!(meters.take("a", now), Verdict::Write { suppressed: 0 });
        }
        assert_eq!(meters.take("a", now), Verdict::Suppress { schedule: true });
        assert_eq!(meters.take("a", now), Verdict::Suppress { schedule: false });
        assert_eq!(
            meters.take("b", now),
            Verdict::Write { suppressed: 0 },
            "other identities have their own meter"
        );
        assert_eq!(meters.flush("a", now), None, "no token yet");
        let later = now + Duration::from_secs(1);
        assert_eq!(meters.flush("a", later), Some(2), "the count, once");
        assert_eq!(
            meters.take("a", later),
            Verdict::Write { suppressed: 0 },
            "a second token refilled"
        );
        assert_eq!(
            meters.take("a", later),
            Verdict::Suppress { schedule: true }
        );
    }

    #[test]
    fn meters_are_bounded() {
        let meters = Meters::default();
        let now = Instant::now();
        for i in 0..MAX_METERS + 10 {
            let _ = meters.take(&format!("id-{i}"), now);
        }
        assert!(meters.lock().len() <= MAX_METERS + 1);
    }

    #[test]
    fn only_denials_spend_the_refusal_budget() {
        assert!(is_denial(&ErrorReply::Forbidden {
            reason: String::new()
        }));
        assert!(is_denial(&ErrorReply::Malformed {
            reason: String::new()
        }));
        assert!(!is_denial(&ErrorReply::Timeout));
        assert!(!is_audited(&Op::Host, &Err(ErrorReply::Timeout)));
        assert!(is_audited_refusal(
            &Op::Host,
            &ErrorReply::Forbidden {
                reason: String::new()
            }
        ));
        assert!(!is_audited_refusal(&Op::ListVms, &ErrorReply::Timeout));
    }
}
