//! The connection cap, and who gives way when it is reached.
//!
//! 1. Every accepted connection needs a slot; there are `max_connections`.
//!    Of these, at most `max_connections - reserve` may hold sessions,
//!    where the reserve is an eighth of the cap (at least one, for a cap
//!    above one): a full house of sessions still leaves room for new
//!    handshakes, so an arriving admin can always be heard.
//! 2. At the cap, the oldest connection still in its handshake (TLS and
//!    `Hello` not yet done) is evicted to make room: a crowd of clients that
//!    connect and never finish their handshake (slowloris) cannot lock out
//!    a client that does.
//! 3. If no connection can be evicted in time, the new connection is shed:
//!    closed at once. Shedding is counted and logged sparingly, so a flood
//!    cannot flood the log.
//! 4. Only identities with a role hold sessions: a connection whose
//!    identity has no rights gets its `Welcome` (saying so) and is closed
//!    (see `connection`), so certificates that no policy rule names never
//!    take a session slot.
//! 5. When a handshake ends and every session slot is taken, a session of a
//!    *strictly lower* role gives way to the new one, the lowest role
//!    first (`reader`, then `operator`), the oldest session of that role
//!    first. An admin therefore always gets a session unless every session
//!    is an admin's; an operator displaces readers only; a reader displaces
//!    no one and is refused (`LimitExceeded`). Certificates no rule names
//!    have no role (step 4), so they never displace anyone: only an
//!    identity the policy grants more can.
//!
//! Memory is bounded by the cap: a shed connection costs only its accept.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::warn;
use vmd_proto::Role;

/// How long a new connection waits for an evicted one to give back its
/// slot before it is shed instead.
const EVICTION_WAIT: Duration = Duration::from_millis(200);

/// The session slots for a connection cap (module docs, step 1).
fn session_slots(max_connections: usize) -> usize {
    if max_connections <= 1 {
        return max_connections;
    }
    max_connections - (max_connections / 8).max(1)
}

#[derive(Debug, Default)]
struct State {
    /// Connections in their handshake, oldest first.
    handshaking: VecDeque<(u64, CancellationToken)>,
    /// Admitted sessions, oldest first.
    sessions: Vec<(u64, Role, CancellationToken)>,
}

/// The connection slots of one server.
#[derive(Debug)]
pub(crate) struct Slots {
    permits: Arc<Semaphore>,
    max_sessions: usize,
    state: Mutex<State>,
    next_id: AtomicU64,
    shed: AtomicU64,
}

/// A connection's place: evictable while in its handshake, then possibly
/// displaced as a session (module docs). Eviction cancels
/// [`Handshake::evicted`]; drop gives the place back.
#[derive(Debug)]
pub(crate) struct Handshake {
    id: u64,
    evict: CancellationToken,
    in_session: AtomicBool,
    slots: Arc<Slots>,
}

/// Every session slot holds a session of an equal or higher role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("connection cap reached: every session slot holds a session of an equal or higher role")]
pub(crate) struct SessionsFull;

impl Slots {
    pub(crate) fn new(max_connections: usize) -> Arc<Self> {
        Arc::new(Self {
            permits: Arc::new(Semaphore::new(max_connections)),
            max_sessions: session_slots(max_connections),
            state: Mutex::default(),
            next_id: AtomicU64::new(0),
            shed: AtomicU64::new(0),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Single push/remove updates: a poisoned state is consistent.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A slot for a new connection (steps 1 to 3), or `None` to shed it.
    pub(crate) async fn admit(self: &Arc<Self>) -> Option<(OwnedSemaphorePermit, Handshake)> {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let oldest = self.state().handshaking.pop_front();
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
                                "connection cap reached with no handshake to evict; shedding new connections"
                            );
                        }
                        return None;
                    }
                }
            }
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let evict = CancellationToken::new();
        self.state().handshaking.push_back((id, evict.clone()));
        Some((
            permit,
            Handshake {
                id,
                evict,
                in_session: AtomicBool::new(false),
                slots: self.clone(),
            },
        ))
    }
}

impl Handshake {
    /// Resolves when this connection is evicted or displaced to make room.
    pub(crate) async fn evicted(&self) {
        self.evict.cancelled().await;
    }

    /// Whether the connection had become a session (for the log).
    pub(crate) fn was_session(&self) -> bool {
        self.in_session.load(Ordering::Relaxed)
    }

    /// The handshake is over: the connection becomes a session of `role`,
    /// displacing a session of a lower role if every session slot is taken
    /// (module docs, step 5); no longer evictable as a handshake.
    ///
    /// # Errors
    /// [`SessionsFull`] if no session can give way.
    pub(crate) fn become_session(&self, role: Role) -> Result<(), SessionsFull> {
        let mut state = self.slots.state();
        if state.sessions.len() >= self.slots.max_sessions {
            let victim = state
                .sessions
                .iter()
                .enumerate()
                .filter(|(_, (_, have, _))| *have < role)
                // The lowest role; among equals the first (oldest).
                .min_by_key(|(i, (_, have, _))| (*have, *i))
                .map(|(i, _)| i)
                .ok_or(SessionsFull)?;
            let (_, _, token) = state.sessions.remove(victim);
            token.cancel();
        }
        state.handshaking.retain(|(id, _)| *id != self.id);
        state.sessions.push((self.id, role, self.evict.clone()));
        self.in_session.store(true, Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        let mut state = self.slots.state();
        state.handshaking.retain(|(id, _)| *id != self.id);
        state.sessions.retain(|(id, _, _)| *id != self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_eighth_of_the_slots_is_kept_for_handshakes() {
        assert_eq!(session_slots(256), 224);
        assert_eq!(session_slots(8), 7);
        assert_eq!(session_slots(2), 1);
        assert_eq!(session_slots(1), 1);
    }

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
    async fn a_full_house_of_sessions_leaves_room_for_a_handshake() {
        let slots = Slots::new(2);
        let (_permit, session) = slots.admit().await.expect("slot");
        session.become_session(Role::Admin).expect("session");
        let (_p, arriving) = slots.admit().await.expect("the reserve");
        assert_eq!(
            arriving.become_session(Role::Admin),
            Err(SessionsFull),
            "an equal role displaces no one"
        );
        assert!(!session.evict.is_cancelled());
    }

    #[tokio::test]
    async fn lower_roles_give_way_lowest_and_oldest_first() {
        let slots = Slots::new(4); // 3 session slots
        let mut held = Vec::new();
        for role in [Role::Operator, Role::Reader, Role::Reader] {
            let (permit, h) = slots.admit().await.expect("slot");
            h.become_session(role).expect("room");
            held.push((permit, h));
        }
        let (permit, reader) = slots.admit().await.expect("reserve");
        assert_eq!(
            reader.become_session(Role::Reader),
            Err(SessionsFull),
            "a reader displaces no one"
        );
        drop((permit, reader));
        let (_p, admin) = slots.admit().await.expect("reserve");
        admin.become_session(Role::Admin).expect("displaces");
        assert!(held[1].1.evict.is_cancelled(), "the oldest reader gave way");
        assert!(!held[0].1.evict.is_cancelled() && !held[2].1.evict.is_cancelled());
        assert!(held[1].1.was_session());
    }

    #[tokio::test(start_paused = true)]
    async fn an_evicted_connection_that_lingers_means_shedding() {
        let slots = Slots::new(1);
        let (_permit, handshake) = slots.admit().await.expect("slot");
        // Evicted, but its slot is not given back within EVICTION_WAIT.
        assert!(slots.admit().await.is_none());
        assert!(handshake.evict.is_cancelled());
    }

    #[tokio::test]
    async fn with_one_slot_a_session_means_shedding() {
        let slots = Slots::new(1);
        let (_permit, handshake) = slots.admit().await.expect("slot");
        handshake.become_session(Role::Reader).expect("session");
        assert!(slots.admit().await.is_none(), "shed");
        assert_eq!(slots.shed.load(Ordering::Relaxed), 1);
        assert!(!handshake.evict.is_cancelled());
    }
}
