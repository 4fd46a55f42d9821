//! Readiness for systemd (`Type=notify`): `sd_notify(3)` messages on the
//! socket named by `NOTIFY_SOCKET`.
//!
//! 1. `READY=1` once every listener is bound, so units ordered after
//!    `vmd.service` can connect at once.
//! 2. `RELOADING=1` (with `MONOTONIC_USEC`, which systemd 253+ requires)
//!    before a SIGHUP reload, `READY=1` after it, whether or not the new
//!    configuration was taken (the daemon keeps serving either way).
//! 3. `STOPPING=1` when shutdown begins.
//!
//! Without `NOTIFY_SOCKET` (not started by systemd) every call does
//! nothing. A failed send is logged, never fatal: the service manager's
//! start timeout is the backstop.

use sd_notify::NotifyState;

/// Every listener is bound: clients can connect.
pub fn ready() {
    send(&[NotifyState::Ready], "READY");
}

/// A reload begins.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now], "RELOADING"),
        Err(e) => tracing::warn!(error = %e, "cannot read the monotonic clock for sd_notify"),
    }
}

/// Shutdown begins.
pub fn stopping() {
    send(&[NotifyState::Stopping], "STOPPING");
}

fn send(states: &[NotifyState<'_>], what: &str) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, state = what, "cannot notify the service manager");
    }
}
