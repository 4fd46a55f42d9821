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
    ActiveState, BackendError, Control, LiveEvent, LiveEvents, LiveState, RunState, UnitEvent,
    UnitEvents, UnitStatus, Units, VmControl,
};

/// Units that change state when told to. Changes wait for a permit of
/// `gate` when one is set, so a test can hold an operation open.
#[derive(Debug, Default)]
pub struct FakeUnits {
    /// Each unit's state (absent: not loaded, inactive).
    pub states: Mutex<HashMap<String, ActiveState>>,
    /// Frozen units.
    pub frozen: Mutex<HashSet<String>>,
    /// Each unit's `Result` after its last stop (absent: `success`).
    pub results: Mutex<HashMap<String, String>>,
    /// Units `microvms.target` wants.
    pub wanted: Mutex<HashSet<String>>,
    /// If set, each change waits for a permit.
    pub gate: Option<Arc<Semaphore>>,
    /// Simulates the bus being gone.
    pub down: Mutex<bool>,
    /// Every change made, as `"start unit"`.
    pub calls: Mutex<Vec<String>>,
    /// Every read made, as `"status unit"` or `"statuses n"`.
    pub reads: Mutex<Vec<String>>,
    /// Open [`Units::events`] streams.
    pub subscribers: Mutex<Vec<mpsc::UnboundedSender<UnitEvent>>>,
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

    /// Sends a change of `unit` to every open event stream.
    pub fn signal(&self, unit: &str) {
        self.subscribers
            .lock()
            .expect("lock")
            .retain(|tx| tx.send(UnitEvent::Changed(unit.to_owned())).is_ok());
    }

    /// Ends every open event stream (the bus went away).
    pub fn drop_subscribers(&self) {
        self.subscribers.lock().expect("lock").clear();
    }

    fn check_up(&self) -> Result<(), BackendError> {
        if *self.down.lock().expect("lock") {
            return Err(BackendError::Unavailable("systemd".into()));
        }
        Ok(())
    }

    fn status_now(&self, unit: &str) -> UnitStatus {
        let Some(state) = self.states.lock().expect("lock").get(unit).cloned() else {
            return UnitStatus::not_loaded();
        };
        let active = state == ActiveState::Active;
        let frozen = self.frozen.lock().expect("lock").contains(unit);
        let result = self.results.lock().expect("lock").get(unit).cloned();
        UnitStatus {
            load_state: "loaded".into(),
            sub_state: if active { "running" } else { "dead" }.into(),
            freezer_state: Some(if frozen { "frozen" } else { "running" }.into()),
            main_pid: active.then_some(4242),
            active_enter_usec: active.then_some(1),
            result: Some(result.unwrap_or_else(|| "success".into())),
            exit: None,
            n_restarts: Some(0),
            control_group: Some(format!("/system.slice/{unit}")),
            active_state: state,
        }
    }

    async fn change(&self, call: &str, unit: &str, to: ActiveState) -> Result<(), BackendError> {
        if let Some(gate) = &self.gate {
            gate.acquire().await.expect("gate open").forget();
        }
        self.check_up()?;
        self.calls
            .lock()
            .expect("lock")
            .push(format!("{call} {unit}"));
        self.set(unit, to);
        Ok(())
    }

    async fn freezer(&self, call: &str, unit: &str, frozen: bool) -> Result<(), BackendError> {
        self.check_up()?;
        self.calls
            .lock()
            .expect("lock")
            .push(format!("{call} {unit}"));
        let mut set = self.frozen.lock().expect("lock");
        if frozen {
            set.insert(unit.to_owned());
        } else {
            set.remove(unit);
        }
        drop(set);
        self.signal(unit);
        Ok(())
    }
}

impl Units for FakeUnits {
    fn status<'a>(&'a self, unit: &'a str) -> BoxFuture<'a, Result<UnitStatus, BackendError>> {
        Box::pin(async move {
            self.check_up()?;
            self.reads
                .lock()
                .expect("lock")
                .push(format!("status {unit}"));
            Ok(self.status_now(unit))
        })
    }

    fn statuses<'a>(
        &'a self,
        units: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<UnitStatus>, BackendError>> {
        Box::pin(async move {
            self.check_up()?;
            self.reads
                .lock()
                .expect("lock")
                .push(format!("statuses {}", units.len()));
            Ok(units.iter().map(|u| self.status_now(u)).collect())
        })
    }

    fn wants<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<Vec<String>, BackendError>> {
        Box::pin(async move {
            self.check_up()?;
            Ok(self.wanted.lock().expect("lock").iter().cloned().collect())
        })
    }

    fn start<'a>(&'a self, unit: &'a str, _: Duration) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(self.change("start", unit, ActiveState::Active))
    }

    fn stop<'a>(&'a self, unit: &'a str, _: Duration) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            let failed = self
                .results
                .lock()
                .expect("lock")
                .get(unit)
                .is_some_and(|r| r != "success");
            let to = if failed {
                ActiveState::Failed
            } else {
                ActiveState::Inactive
            };
            self.change("stop", unit, to).await
        })
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

    fn freeze<'a>(&'a self, unit: &'a str, _: Duration) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(self.freezer("freeze", unit, true))
    }

    fn thaw<'a>(&'a self, unit: &'a str, _: Duration) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(self.freezer("thaw", unit, false))
    }

    fn events<'a>(&'a self, _: &'a [String]) -> BoxFuture<'a, Result<UnitEvents, BackendError>> {
        Box::pin(async move {
            self.check_up()?;
            let (tx, rx) = mpsc::unbounded_channel();
            self.subscribers.lock().expect("lock").push(tx);
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|event| (event, rx))
            });
            Ok(stream.boxed())
        })
    }
}

/// Hypervisor sockets whose live state tests set and changes update.
#[derive(Default)]
pub struct FakeControl {
    /// Live state per socket (absent: nothing listens there).
    pub live: Arc<Mutex<HashMap<PathBuf, LiveState>>>,
    /// Shared sockets another client holds: opening them is busy.
    pub held: Mutex<HashSet<PathBuf>>,
    /// Where each attached monitor's events go, by socket.
    pub monitors: Mutex<HashMap<PathBuf, LiveEvents>>,
    /// Every attach and open, as `"attach path"` / `"open path"`.
    pub calls: Mutex<Vec<String>>,
}

impl std::fmt::Debug for FakeControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeControl")
            .field("live", &self.live)
            .field("held", &self.held)
            .finish_non_exhaustive()
    }
}

impl FakeControl {
    /// Sends `event` from the monitor attached at `socket`, as QEMU would.
    pub fn emit(&self, socket: &Path, event: LiveEvent) {
        let sink = self.monitors.lock().expect("lock").get(socket).cloned();
        if let Some(sink) = sink {
            sink(event);
        }
    }

    fn channel(&self, socket: &Path) -> Result<FakeChannel, BackendError> {
        if !self.live.lock().expect("lock").contains_key(socket) {
            return Err(BackendError::Unavailable(format!(
                "control socket {}",
                socket.display()
            )));
        }
        Ok(FakeChannel {
            live: Arc::clone(&self.live),
            socket: socket.to_owned(),
        })
    }
}

impl VmControl for FakeControl {
    fn attach<'a>(
        &'a self,
        socket: &'a Path,
        events: LiveEvents,
    ) -> BoxFuture<'a, Result<super::Attach, BackendError>> {
        Box::pin(async move {
            self.calls
                .lock()
                .expect("lock")
                .push(format!("attach {}", socket.display()));
            let channel = self.channel(socket)?;
            let live = channel.now()?;
            self.monitors
                .lock()
                .expect("lock")
                .insert(socket.to_owned(), events);
            Ok((Arc::new(channel) as Arc<dyn Control>, live))
        })
    }

    fn open<'a>(
        &'a self,
        socket: &'a Path,
        _: Duration,
    ) -> BoxFuture<'a, Result<Box<dyn Control>, BackendError>> {
        Box::pin(async move {
            self.calls
                .lock()
                .expect("lock")
                .push(format!("open {}", socket.display()));
            if self.held.lock().expect("lock").contains(socket) {
                return Err(BackendError::SocketBusy(format!(
                    "QMP {} (another client holds it)",
                    socket.display()
                )));
            }
            Ok(Box::new(self.channel(socket)?) as Box<dyn Control>)
        })
    }
}

/// A channel to one fake socket.
#[derive(Debug)]
struct FakeChannel {
    live: Arc<Mutex<HashMap<PathBuf, LiveState>>>,
    socket: PathBuf,
}

impl FakeChannel {
    fn now(&self) -> Result<LiveState, BackendError> {
        self.live
            .lock()
            .expect("lock")
            .get(&self.socket)
            .cloned()
            .ok_or_else(|| BackendError::Unavailable(format!("{}", self.socket.display())))
    }

    fn update(&self, f: impl FnOnce(&mut LiveState)) -> Result<(), BackendError> {
        let mut live = self.live.lock().expect("lock");
        let state = live
            .get_mut(&self.socket)
            .ok_or_else(|| BackendError::Unavailable(format!("{}", self.socket.display())))?;
        f(state);
        Ok(())
    }
}

impl Control for FakeChannel {
    fn query(&self) -> BoxFuture<'_, Result<LiveState, BackendError>> {
        Box::pin(async move { self.now() })
    }

    fn pause(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move { self.update(|l| l.run_state = Some(RunState::Paused)) })
    }

    fn resume(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move { self.update(|l| l.run_state = Some(RunState::Running)) })
    }

    fn set_vcpus(&self, count: u32) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move { self.update(|l| l.vcpus = Some(count)) })
    }

    fn set_balloon(&self, bytes: u64) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move { self.update(|l| l.balloon_actual = Some(bytes)) })
    }

    fn powerdown(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move { self.update(|l| l.run_state = Some(RunState::Shutdown)) })
    }
}
