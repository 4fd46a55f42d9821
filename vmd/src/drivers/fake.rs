//! In-memory fakes of the backend traits, for unit tests and fuzzing of the
//! handler and VM-service logic only (feature `test-backends`). System
//! tests use the real systemd and QEMU.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use tokio::sync::{Semaphore, mpsc};

use super::{
    ActiveState, BackendError, EventSink, LiveState, RunState, UnitEvents, UnitStatus, Units,
    VmControl,
};

/// Units that change state when told to. Changes wait for a permit of
/// `gate` when one is set, so a test can hold an operation open.
#[derive(Debug, Default)]
pub struct FakeUnits {
    /// Each unit's state (absent: inactive).
    pub states: Mutex<HashMap<String, ActiveState>>,
    /// Units `microvms.target` wants.
    pub wanted: Mutex<HashSet<String>>,
    /// If set, each change waits for a permit.
    pub gate: Option<Arc<Semaphore>>,
    /// Simulates the bus being gone.
    pub down: Mutex<bool>,
    /// Every change made, as `"start unit"`.
    pub calls: Mutex<Vec<String>>,
    /// Open [`Units::events`] streams.
    pub subscribers: Mutex<Vec<mpsc::UnboundedSender<String>>>,
}

impl FakeUnits {
    /// Sets a unit's state and signals it, as systemd does for a change
    /// made by anyone.
    pub fn set(&self, unit: &str, state: ActiveState) {
        self.states
            .lock()
            .expect("lock")
            .insert(unit.to_owned(), state);
        self.signal(unit);
    }

    /// Sends `unit` to every open event stream.
    pub fn signal(&self, unit: &str) {
        self.subscribers
            .lock()
            .expect("lock")
            .retain(|tx| tx.send(unit.to_owned()).is_ok());
    }

    /// Ends every open event stream (the bus went away).
    pub fn drop_subscribers(&self) {
        self.subscribers.lock().expect("lock").clear();
    }

    async fn change(&self, call: &str, unit: &str, to: ActiveState) -> Result<(), BackendError> {
        if let Some(gate) = &self.gate {
            gate.acquire().await.expect("gate open").forget();
        }
        self.calls
            .lock()
            .expect("lock")
            .push(format!("{call} {unit}"));
        self.set(unit, to);
        Ok(())
    }
}

impl Units for FakeUnits {
    fn status<'a>(&'a self, unit: &'a str) -> BoxFuture<'a, Result<UnitStatus, BackendError>> {
        Box::pin(async move {
            if *self.down.lock().expect("lock") {
                return Err(BackendError::Unavailable("systemd".into()));
            }
            let state = self
                .states
                .lock()
                .expect("lock")
                .get(unit)
                .cloned()
                .unwrap_or(ActiveState::Inactive);
            let active = state == ActiveState::Active;
            Ok(UnitStatus {
                load_state: "loaded".into(),
                active_state: state,
                sub_state: if active { "running" } else { "dead" }.into(),
                main_pid: active.then_some(4242),
                active_enter_usec: active.then_some(1),
                memory_current: active.then_some(300 << 20),
                cpu_usage_nsec: active.then_some(5_000_000_000),
                tasks_current: active.then_some(9),
            })
        })
    }

    fn wanted_by<'a>(
        &'a self,
        unit: &'a str,
        _: &'a str,
    ) -> BoxFuture<'a, Result<bool, BackendError>> {
        Box::pin(async move { Ok(self.wanted.lock().expect("lock").contains(unit)) })
    }

    fn start<'a>(&'a self, unit: &'a str, _: Duration) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(self.change("start", unit, ActiveState::Active))
    }

    fn stop<'a>(&'a self, unit: &'a str, _: Duration) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(self.change("stop", unit, ActiveState::Inactive))
    }

    fn kill<'a>(&'a self, unit: &'a str, _: Duration) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(self.change("kill", unit, ActiveState::Failed))
    }

    fn restart<'a>(
        &'a self,
        unit: &'a str,
        _: Duration,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(self.change("restart", unit, ActiveState::Active))
    }

    fn events<'a>(&'a self, _: &'a [String]) -> BoxFuture<'a, Result<UnitEvents, BackendError>> {
        Box::pin(async move {
            if *self.down.lock().expect("lock") {
                return Err(BackendError::Unavailable("systemd".into()));
            }
            let (tx, rx) = mpsc::unbounded_channel();
            self.subscribers.lock().expect("lock").push(tx);
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|unit| (unit, rx))
            });
            Ok(stream.boxed())
        })
    }
}

/// A control socket whose live state tests set and changes update.
#[derive(Debug, Default)]
pub struct FakeControl {
    /// Live state per socket (absent: unavailable).
    pub live: Mutex<HashMap<PathBuf, LiveState>>,
    /// The event sink the VM service set.
    pub sink: Mutex<Option<EventSink>>,
}

impl FakeControl {
    fn update(&self, socket: &Path, f: impl FnOnce(&mut LiveState)) -> Result<(), BackendError> {
        let mut live = self.live.lock().expect("lock");
        let state = live.get_mut(socket).ok_or_else(|| {
            BackendError::Unavailable(format!("control socket {}", socket.display()))
        })?;
        f(state);
        Ok(())
    }
}

impl VmControl for FakeControl {
    fn set_event_sink(&self, sink: EventSink) {
        *self.sink.lock().expect("lock") = Some(sink);
    }

    fn query<'a>(&'a self, socket: &'a Path) -> BoxFuture<'a, Result<LiveState, BackendError>> {
        Box::pin(async move {
            self.live
                .lock()
                .expect("lock")
                .get(socket)
                .cloned()
                .ok_or_else(|| {
                    BackendError::Unavailable(format!("control socket {}", socket.display()))
                })
        })
    }

    fn pause<'a>(&'a self, socket: &'a Path) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move { self.update(socket, |l| l.run_state = Some(RunState::Paused)) })
    }

    fn resume<'a>(&'a self, socket: &'a Path) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move { self.update(socket, |l| l.run_state = Some(RunState::Running)) })
    }

    fn set_vcpus<'a>(
        &'a self,
        socket: &'a Path,
        count: u32,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move { self.update(socket, |l| l.vcpus = Some(count)) })
    }

    fn set_balloon<'a>(
        &'a self,
        socket: &'a Path,
        bytes: u64,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move { self.update(socket, |l| l.balloon_actual = Some(bytes)) })
    }

    fn powerdown<'a>(&'a self, socket: &'a Path) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move { self.update(socket, |l| l.run_state = Some(RunState::Shutdown)) })
    }
}
