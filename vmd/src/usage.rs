//! Per-identity limits: concurrent connections and request rate.
//!
//! 1. [`Usage::connect`] counts an identity's connections against its cap
//!    and returns a [`ConnectionSlot`] that gives the place back on drop.
//! 2. [`Usage::take`] spends one token of the identity's bucket per
//!    request. Buckets refill lazily from the time elapsed when a token is
//!    taken: no timer runs, so an idle daemon does no work.
//! 3. [`Usage::penalize`]: an identity whose connection was closed for
//!    spending its refusal budget, or for having no role at all, is
//!    *penalized* for [`PENALTY`]: its new
//!    connections in that time are held until their handshake deadline and
//!    then refused (see `connection`), so reconnecting to refuse again
//!    costs the client that wait, and the host one handshake per held
//!    connection and deadline, within the identity's connection cap.
//! 4. An identity's entry lives as long as it has connections or a
//!    penalty, so memory is bounded by the connection cap plus
//!    [`MAX_PENALIZED`] (reconnecting refills the bucket, but every
//!    reconnect costs the client a full mTLS handshake).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Limits per identity.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct IdentityLimits {
    /// Concurrent connections per identity.
    pub max_connections: usize,
    /// Sustained requests per second per identity.
    pub requests_per_second: f64,
    /// Requests an identity may send in a burst.
    pub burst: u32,
    /// `Watch` requests an identity may hold open at once.
    pub max_watchers: usize,
}

impl Default for IdentityLimits {
    fn default() -> Self {
        Self {
            max_connections: 32,
            requests_per_second: 200.0,
            burst: 400,
            max_watchers: 16,
        }
    }
}

/// How long an identity stays penalized (module docs, step 3).
pub const PENALTY: Duration = Duration::from_secs(10);

/// Identities kept penalized without a connection, at most.
pub const MAX_PENALIZED: usize = 4096;

#[derive(Debug)]
struct Entry {
    connections: usize,
    tokens: f64,
    refilled: Instant,
    penalized_until: Option<Instant>,
}

impl Entry {
    fn new(burst: u32) -> Self {
        Self {
            connections: 0,
            tokens: f64::from(burst),
            refilled: Instant::now(),
            penalized_until: None,
        }
    }

    fn penalty_left(&self, now: Instant) -> Option<Duration> {
        self.penalized_until
            .and_then(|until| until.checked_duration_since(now))
            .filter(|left| !left.is_zero())
    }
}

/// Usage of every connected identity.
#[derive(Debug)]
pub struct Usage {
    limits: IdentityLimits,
    entries: Arc<Mutex<HashMap<String, Entry>>>,
}

/// A connection counted against its identity's cap; released on drop.
#[derive(Debug)]
pub struct ConnectionSlot {
    identity: String,
    entries: Arc<Mutex<HashMap<String, Entry>>>,
}

/// The identity has reached its connection cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("too many connections for this identity (limit {0})")]
pub struct TooManyConnections(pub usize);

fn lock(entries: &Mutex<HashMap<String, Entry>>) -> MutexGuard<'_, HashMap<String, Entry>> {
    // Every update is a single field write: a poisoned map is consistent.
    entries
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Usage {
    /// Empty usage under `limits`.
    pub fn new(limits: IdentityLimits) -> Self {
        Self {
            limits,
            entries: Arc::default(),
        }
    }

    /// Counts a new connection of `identity`.
    ///
    /// # Errors
    /// [`TooManyConnections`] at the cap.
    pub fn connect(&self, identity: &str) -> Result<ConnectionSlot, TooManyConnections> {
        let mut entries = lock(&self.entries);
        let entry = entries
            .entry(identity.to_owned())
            .or_insert_with(|| Entry::new(self.limits.burst));
        if entry.connections >= self.limits.max_connections {
            return Err(TooManyConnections(self.limits.max_connections));
        }
        entry.connections += 1;
        Ok(ConnectionSlot {
            identity: identity.to_owned(),
            entries: self.entries.clone(),
        })
    }

    /// Penalizes `identity` for [`PENALTY`] (module docs, step 3).
    pub fn penalize(&self, identity: &str) {
        let mut entries = lock(&self.entries);
        let now = Instant::now();
        if entries.len() >= MAX_PENALIZED && !entries.contains_key(identity) {
            entries.retain(|_, e| e.connections > 0 || e.penalty_left(now).is_some());
        }
        if entries.len() < MAX_PENALIZED || entries.contains_key(identity) {
            entries
                .entry(identity.to_owned())
                .or_insert_with(|| Entry::new(self.limits.burst))
                .penalized_until = Some(now + PENALTY);
        }
    }

    /// How long `identity` stays penalized, `None` if it is not.
    pub fn penalty(&self, identity: &str) -> Option<Duration> {
        let entries = lock(&self.entries);
        entries
            .get(identity)
            .and_then(|e| e.penalty_left(Instant::now()))
    }

    /// Spends a request token of `identity` (which must hold a slot).
    ///
    /// # Errors
    /// How long until a token is available, when the bucket is empty.
    pub fn take(&self, identity: &str) -> Result<(), Duration> {
        let mut entries = lock(&self.entries);
        let Some(entry) = entries.get_mut(identity) else {
            return Ok(()); // no slot: nothing to account against
        };
        let now = Instant::now();
        let rate = self.limits.requests_per_second;
        let elapsed = now.duration_since(entry.refilled).as_secs_f64();
        entry.tokens = (entry.tokens + elapsed * rate).min(f64::from(self.limits.burst));
        entry.refilled = now;
        if entry.tokens >= 1.0 {
            entry.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - entry.tokens) / rate))
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut entries = lock(&self.entries);
        if let Some(entry) = entries.get_mut(&self.identity) {
            entry.connections -= 1;
            if entry.connections == 0 && entry.penalty_left(Instant::now()).is_none() {
                entries.remove(&self.identity);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(max_connections: usize, rate: f64, burst: u32) -> Usage {
        Usage::new(IdentityLimits {
            max_connections,
            requests_per_second: rate,
            burst,
            ..IdentityLimits::default()
        })
    }

    #[test]
    fn connections_are_capped_per_identity_and_released() {
        let usage = usage(2, 1.0, 1);
        let a = usage.connect("a").expect("first");
        let _b = usage.connect("a").expect("second");
        assert_eq!(
            usage.connect("a").expect_err("third"),
            TooManyConnections(2)
        );
        assert!(usage.connect("other").is_ok(), "others are not affected");
        drop(a);
        assert!(usage.connect("a").is_ok(), "released on drop");
    }

    #[test]
    fn entries_go_away_with_the_last_connection() {
        let usage = usage(4, 1.0, 1);
        drop(usage.connect("a").expect("slot"));
        assert!(lock(&usage.entries).is_empty());
    }

    #[test]
    fn penalties_outlive_connections_and_expire() {
        let usage = usage(4, 1.0, 1);
        let slot = usage.connect("a").expect("slot");
        usage.penalize("a");
        drop(slot);
        let left = usage.penalty("a").expect("penalized");
        assert!(left <= PENALTY);
        assert!(usage.penalty("b").is_none());
        lock(&usage.entries)
            .get_mut("a")
            .expect("kept while penalized")
            .penalized_until = Some(Instant::now());
        assert!(usage.penalty("a").is_none(), "expired");
    }

    #[test]
    fn bucket_allows_a_burst_then_the_rate() {
        let usage = usage(1, 10.0, 3);
        let _slot = usage.connect("a").expect("slot");
        for _ in 0..3 {
            usage.take("a").expect("within the burst");
        }
        let retry = usage.take("a").expect_err("bucket empty");
        assert!(
            retry > Duration::ZERO && retry <= Duration::from_millis(100),
            "{retry:?}"
        );
        // Pretend time passed: the bucket refills lazily.
        lock(&usage.entries).get_mut("a").expect("entry").refilled -= Duration::from_secs(1);
        for _ in 0..3 {
            usage.take("a").expect("refilled up to the burst");
        }
        assert!(usage.take("a").is_err(), "never beyond the burst");
    }
}
