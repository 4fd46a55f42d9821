//! The connection cap, and who gives way when it is reached.
//!
//! 1. Every accepted connection needs a slot; there are `max_connections`.
//! 2. At the cap, the oldest connection still in its handshake (TLS and
//!    `Hello` not yet done) is evicted to make room: a crowd of clients that
//!    connect and never finish their handshake (slowloris) cannot lock out
//!    a client that does. Admitted sessions are never evicted.
//! 3. If no connection can be evicted (all slots hold admitted sessions),
//!    the new connection is shed: closed at once. Shedding is counted and
//!    logged sparingly, so a flood cannot flood the log.
//!
//! Memory is bounded by the cap: a shed connection costs only its accept.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// How long a new connection waits for an evicted one to give back its
/// slot before it is shed instead.
const EVICTION_WAIT: Duration = Duration::from_millis(200);

/// The connection slots of one server.
#[derive(Debug)]
pub(crate) struct Slots {
    permits: Arc<Semaphore>,
    /// Connections in their handshake, oldest first.
    handshaking: Mutex<VecDeque<(u64, CancellationToken)>>,
    next_id: AtomicU64,
    shed: AtomicU64,
}

/// A connection's place while it is in its handshake. Eviction cancels
/// [`Handshake::evicted`]; [`Handshake::done`] (or drop) leaves the queue.
#[derive(Debug)]
pub(crate) struct Handshake {
    id: u64,
    evict: CancellationToken,
    slots: Arc<Slots>,
}

impl Slots {
    pub(crate) fn new(max_connections: usize) -> Arc<Self> {
        Arc::new(Self {
            permits: Arc::new(Semaphore::new(max_connections)),
            handshaking: Mutex::default(),
            next_id: AtomicU64::new(0),
            shed: AtomicU64::new(0),
        })
    }

    fn queue(&self) -> MutexGuard<'_, VecDeque<(u64, CancellationToken)>> {
        // Single push/remove updates: a poisoned queue is consistent.
        self.handshaking
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A slot for a new connection (steps 1 to 3), or `None` to shed it.
    pub(crate) async fn admit(self: &Arc<Self>) -> Option<(OwnedSemaphorePermit, Handshake)> {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let oldest = self.queue().pop_front();
                let evicted = oldest.map(|(_, token)| token.cancel()).is_some();
                let waited = if evicted {
                    tokio::time::timeout(EVICTION_WAIT, self.permits.clone().acquire_owned())
                        .await
                        .ok()
                        .and_then(Result::ok)
                } else {
                    None
                };
                match waited {
                    Some(permit) => permit,
                    None => {
                        let shed = self.shed.fetch_add(1, Ordering::Relaxed) + 1;
                        if shed.is_power_of_two() {
                            warn!(
                                shed,
                                "connection cap reached with every slot in a session; shedding new connections"
                            );
                        }
                        return None;
                    }
                }
            }
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let evict = CancellationToken::new();
        self.queue().push_back((id, evict.clone()));
        Some((
            permit,
            Handshake {
                id,
                evict,
                slots: self.clone(),
            },
        ))
    }
}

impl Handshake {
    /// Resolves when this connection is evicted to make room.
    pub(crate) async fn evicted(&self) {
        self.evict.cancelled().await;
    }

    /// The handshake is over (the session was admitted): no longer evictable.
    pub(crate) fn done(&self) {
        self.slots.queue().retain(|(id, _)| *id != self.id);
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        self.done();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn oldest_handshake_gives_way() {
        let slots = Slots::new(2);
        let (p1, h1) = slots.admit().await.expect("slot 1");
        let (_p2, h2) = slots.admit().await.expect("slot 2");
        // The evicted connection's task would end and give back its slot.
        let release = tokio::spawn(async move {
            h1.evicted().await;
            drop(p1);
        });
        let (_p3, _h3) = slots.admit().await.expect("made room by eviction");
        release.await.expect("evicted");
        assert!(!h2.evict.is_cancelled(), "only the oldest gives way");
        assert_eq!(slots.shed.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn sessions_are_never_evicted_new_connections_are_shed() {
        let slots = Slots::new(1);
        let (_permit, handshake) = slots.admit().await.expect("slot");
        handshake.done();
        assert!(slots.admit().await.is_none(), "shed");
        assert_eq!(slots.shed.load(Ordering::Relaxed), 1);
        assert!(!handshake.evict.is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn an_evicted_connection_that_lingers_means_shedding() {
        let slots = Slots::new(1);
        let (_permit, handshake) = slots.admit().await.expect("slot");
        // Evicted, but its slot is not given back within EVICTION_WAIT.
        assert!(slots.admit().await.is_none());
        assert!(handshake.evict.is_cancelled());
    }
}
