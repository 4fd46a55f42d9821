//! Keeping the live model current: systemd's signals and vmd's monitors.
//!
//! systemd:
//! 1. Subscribe first (two matches per declared unit, and the Manager's
//!    `Reloading`), then read every declared unit's state in one
//!    `ListUnitsByPatterns` plus a read per loaded unit, and the units
//!    `microvms.target` wants: no signal between the two is lost.
//! 2. Each signal names a unit: its state is read again (a burst of
//!    signals is read once) and applied. `Reloading` reads everything.
//! 3. When the signal stream ends (the bus went away), every VM's unit
//!    state becomes unknown, and the follower subscribes again after a
//!    pause that grows to a minute (or at once when a change finds systemd
//!    back). An idle host sends no signal and costs no wakeup; a host that
//!    declares no VM is not followed at all.
//!
//! QEMU:
//! 4. A QEMU VM whose unit becomes active gets vmd's monitor attached:
//!    bounded retries while QEMU opens its sockets, then the initial
//!    queries; after that the hypervisor's events update the record. EOF
//!    means the process is gone; the unit's next activation attaches again.
//! 5. A VM without vmd's monitor (a hand-made host) is read over its shared
//!    socket, in the background, when its facts are older than
//!    [`super::REFRESH_AFTER`] at a read; the record keeps its age and why.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use tracing::{debug, warn};
use vmd_proto::{LiveSource, VmName};

use super::inventory::AUTOSTART_TARGET;
use super::model::Attached;
use super::{Inner, VmService};
use crate::drivers::{BackendError, LiveEvent, LiveEvents, UnitEvent, UnitEvents, UnitStatus};

/// The longest pause between attempts to reach systemd again.
const MAX_RESUBSCRIBE_PAUSE: Duration = Duration::from_secs(60);

/// How long a starting VM's monitor socket is waited for.
const MONITOR_PATIENCE: Duration = Duration::from_secs(10);

/// After this long without vmd's monitor socket appearing, a VM whose
/// shared socket is there is taken to have none.
const NO_MONITOR_AFTER: Duration = Duration::from_secs(2);

/// How long a background read waits for the shared socket.
const SHARED_REFRESH_PATIENCE: Duration = Duration::from_secs(3);

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = self
            .follower
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            task.abort();
        }
    }
}

impl VmService {
    pub(super) fn from_weak(weak: &Weak<Inner>) -> Option<Self> {
        weak.upgrade().map(|inner| Self { inner })
    }

    /// (Re)starts following systemd (module docs, steps 1–3); returns once
    /// the first read is applied or systemd could not be reached.
    pub(super) async fn follow(&self) {
        let old = self
            .inner
            .follower
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(old) = old {
            old.abort();
        }
        let units = self.inner.model.units();
        if units.is_empty() {
            // Nothing declared: nothing to follow, no bus connection.
            return;
        }
        let mut events = self.subscribe_and_sync(&units).await;
        let weak = Arc::downgrade(&self.inner);
        let task = tokio::spawn(async move {
            let mut pause = Duration::from_millis(500);
            loop {
                if let Some(stream) = events.take() {
                    consume(&weak, stream).await;
                    let Some(service) = Self::from_weak(&weak) else {
                        return;
                    };
                    warn!("systemd's unit signals ended (the bus went away); reconnecting");
                    service.lost_systemd();
                    pause = Duration::from_millis(500);
                }
                let Some(service) = Self::from_weak(&weak) else {
                    return;
                };
                let inner = Arc::clone(&service.inner);
                drop(service);
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = inner.resubscribe.notified() => {}
                }
                drop(inner);
                pause = (pause * 2).min(MAX_RESUBSCRIBE_PAUSE);
                let Some(service) = Self::from_weak(&weak) else {
                    return;
                };
                events = service.subscribe_and_sync(&units).await;
            }
        });
        *self
            .inner
            .follower
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(task.abort_handle());
    }

    /// Subscribes to `units`' signals, then reads their state (step 1).
    async fn subscribe_and_sync(&self, units: &[String]) -> Option<UnitEvents> {
        let result = async {
            let events = self.inner.units.events(units).await?;
            self.sync_all(units).await?;
            Ok::<_, BackendError>(events)
        }
        .await;
        match result {
            Ok(events) => Some(events),
            Err(e) => {
                debug!(error = %e, "cannot follow systemd now");
                self.lost_systemd();
                None
            }
        }
    }

    /// Reads every declared unit and the autostart target.
    async fn sync_all(&self, units: &[String]) -> Result<(), BackendError> {
        let statuses = self.inner.units.statuses(units).await?;
        for (unit, status) in units.iter().zip(statuses) {
            if let Some(name) = self.inner.model.vm_of_unit(unit) {
                self.apply_unit(&name, status);
            }
        }
        let wanted = self.inner.units.wants(AUTOSTART_TARGET).await?;
        self.inner
            .model
            .set_autostart(&wanted.into_iter().collect());
        Ok(())
    }

    /// systemd cannot be asked: units' states are unknown until it can.
    fn lost_systemd(&self) {
        self.inner.model.update_all(|record| {
            record.facts.unit = None;
            record.unit_at = None;
        });
        for name in self
            .inner
            .model
            .select(|_| true)
            .iter()
            .map(|r| &r.spec.name)
        {
            self.follow_freezes(name, None);
        }
    }

    /// Applies a unit's state; attaches the monitor of a QEMU VM that
    /// became active.
    pub(super) fn apply_unit(&self, name: &VmName, status: UnitStatus) {
        let Some((active, cgroup)) = self.inner.model.update(name, |record| {
            record.apply_unit(status);
            (
                record.is_active(),
                record.running_cgroup().map(str::to_owned),
            )
        }) else {
            return;
        };
        let events = cgroup.and_then(|cg| self.inner.cgroups.events_file(&cg));
        self.follow_freezes(name, events);
        if active {
            self.ensure_live(name);
        }
    }

    /// Starts attaching vmd's monitor (step 4), or reading the shared
    /// socket (step 5), unless one is attached or underway.
    fn ensure_live(&self, name: &VmName) {
        let go = self.inner.model.update(name, |record| {
            let go = record.is_active()
                && record.monitor.is_none()
                && !record.attaching
                && record.speaks_qmp();
            if go {
                record.attaching = true;
            }
            go
        });
        if go != Some(true) {
            return;
        }
        let weak = Arc::downgrade(&self.inner);
        let name = name.clone();
        tokio::spawn(async move { attach(weak, name).await });
    }

    /// Where a monitor attached with `epoch` reports its events.
    fn live_events(&self, name: &VmName, epoch: u64) -> LiveEvents {
        let weak = Arc::downgrade(&self.inner);
        let name = name.clone();
        Arc::new(move |event| {
            if let Some(service) = Self::from_weak(&weak) {
                service.on_live_event(&name, epoch, event);
            }
        })
    }

    /// A hypervisor event from the monitor attached with `epoch`.
    fn on_live_event(&self, name: &VmName, epoch: u64, event: LiveEvent) {
        let current = |record: &super::model::Record| {
            record.monitor.as_ref().is_some_and(|m| m.epoch == epoch)
        };
        debug!(vm = %name, ?event, "hypervisor event");
        match event {
            LiveEvent::RunState(state) => {
                self.inner.model.update(name, |record| {
                    if current(record)
                        && let Some(live) = &mut record.facts.live
                    {
                        live.run_state = Some(state);
                        record.live_at = Some(Instant::now());
                    }
                });
            }
            LiveEvent::BalloonActual(bytes) => {
                self.inner.model.update(name, |record| {
                    if current(record)
                        && let Some(live) = &mut record.facts.live
                    {
                        live.balloon_actual = Some(bytes);
                        record.live_at = Some(Instant::now());
                    }
                });
            }
            LiveEvent::Changed => self.refresh(name),
            LiveEvent::Gone => {
                let active = self.inner.model.update(name, |record| {
                    if current(record) {
                        record.detach(Some("the hypervisor's monitor closed".into()));
                    }
                    record.is_active()
                });
                if active == Some(true) {
                    // Closed but the unit runs: QEMU may have closed only
                    // the monitor; try again within the bound.
                    self.ensure_live(name);
                }
            }
        }
    }

    /// Reads the live facts again in the background (step 5 and events
    /// that carry no facts); one read per VM at a time.
    pub(super) fn refresh(&self, name: &VmName) {
        let target = self.inner.model.update(name, |record| {
            if record.refreshing || record.attaching || !record.is_active() {
                return None;
            }
            let how = match (&record.monitor, &record.spec.control_socket) {
                (Some(monitor), _) => Some((Some(monitor.clone()), None)),
                (None, Some(socket)) if record.speaks_qmp() => Some((None, Some(socket.clone()))),
                _ => None,
            };
            record.refreshing = how.is_some();
            how
        });
        let Some(Some((monitor, socket))) = target else {
            return;
        };
        let service = self.clone();
        let name = name.clone();
        tokio::spawn(async move {
            let result = match (&monitor, socket) {
                (Some(monitor), _) => monitor
                    .control
                    .query()
                    .await
                    .map(|live| (live, LiveSource::Monitor)),
                (None, Some(socket)) => {
                    let read = async {
                        let session = service
                            .inner
                            .control
                            .open(&socket, SHARED_REFRESH_PATIENCE)
                            .await?;
                        session.query().await
                    };
                    read.await.map(|live| (live, LiveSource::SharedSocket))
                }
                (None, None) => Err(BackendError::Unavailable("no control socket".into())),
            };
            service.inner.model.update(&name, |record| {
                record.refreshing = false;
                let same_monitor = match (&monitor, &record.monitor) {
                    (Some(a), Some(b)) => a.epoch == b.epoch,
                    (None, None) => true,
                    _ => false,
                };
                if !record.is_active() || !same_monitor {
                    return;
                }
                match result {
                    Ok((live, source)) => record.apply_live(live, source),
                    Err(e) => {
                        debug!(vm = %name, error = %e, "live facts not refreshed");
                        record.facts.note = Some(stale_note(&e));
                    }
                }
            });
        });
    }
}

/// Why live facts could not be read, in words for a client (no paths).
fn stale_note(error: &BackendError) -> String {
    match error {
        BackendError::SocketBusy(_) | BackendError::Timeout(_) => {
            "the control socket is held by another client; these facts are as old as age_ms says"
                .into()
        }
        BackendError::Unavailable(_) => "the control socket does not answer".into(),
        _ => "the hypervisor's answer was not understood".into(),
    }
}

/// Step 2: applies signals until the stream ends.
async fn consume(weak: &Weak<Inner>, mut events: UnitEvents) {
    while let Some(first) = events.next().await {
        // A start or stop signals several properties at once: read each
        // unit once per burst.
        let mut resync = false;
        let mut units = BTreeSet::new();
        let mut event = Some(first);
        while let Some(e) = event {
            match e {
                UnitEvent::Resync => resync = true,
                UnitEvent::Changed(unit) => {
                    units.insert(unit);
                }
            }
            event = events.next().now_or_never().flatten();
        }
        let Some(service) = VmService::from_weak(weak) else {
            return;
        };
        if resync {
            let all = service.inner.model.units();
            if let Err(e) = service.sync_all(&all).await {
                warn!(error = %e, "cannot read the units again after systemd reloaded");
            }
            continue;
        }
        for unit in units {
            let Some(name) = service.inner.model.vm_of_unit(&unit) else {
                continue;
            };
            match service.inner.units.status(&unit).await {
                Ok(status) => service.apply_unit(&name, status),
                Err(e) => warn!(vm = %name, error = %e, "cannot read a unit after its signal"),
            }
        }
    }
}

/// Step 4: attaches vmd's monitor of `name`, retrying while QEMU starts;
/// a VM without one is read over its shared socket instead.
async fn attach(weak: Weak<Inner>, name: VmName) {
    let began = Instant::now();
    let mut pause = Duration::from_millis(25);
    loop {
        let Some(service) = VmService::from_weak(&weak) else {
            return;
        };
        let Some(record) = service.inner.model.get(&name) else {
            return;
        };
        if !record.is_active() {
            service.inner.model.update(&name, |r| r.attaching = false);
            return;
        }
        let monitor = record.spec.monitor_socket.clone();
        if let Some(socket) = monitor.as_deref().filter(|s| s.exists()) {
            let epoch = service.inner.epochs.fetch_add(1, Ordering::Relaxed) + 1;
            let events = service.live_events(&name, epoch);
            match service.inner.control.attach(socket, events).await {
                Ok((control, live)) => {
                    service.inner.model.update(&name, |r| {
                        r.attaching = false;
                        if r.is_active() {
                            r.monitor = Some(Attached { epoch, control });
                            r.apply_live(live, LiveSource::Monitor);
                        }
                    });
                    debug!(vm = %name, "vmd's monitor attached");
                    return;
                }
                Err(e) => debug!(vm = %name, error = %e, "monitor not attached yet"),
            }
        }
        let shared = record.spec.control_socket.as_deref().filter(|s| s.exists());
        // A VM that has run for a while (vmd started after it) will not
        // open a monitor socket now.
        let running_for = record
            .facts
            .unit
            .as_ref()
            .and_then(|u| u.active_enter_usec)
            .map(|since| Duration::from_micros(super::now_usec().saturating_sub(since)));
        let waited = began.elapsed().max(running_for.unwrap_or_default());
        let give_up = waited >= MONITOR_PATIENCE
            || (waited >= NO_MONITOR_AFTER
                && shared.is_some()
                && !monitor.as_deref().is_some_and(std::path::Path::exists))
            || (monitor.is_none() && shared.is_some());
        if give_up {
            service.inner.model.update(&name, |r| {
                r.attaching = false;
                r.facts.note = Some(
                    "vmd has no monitor of its own for this VM; facts come from its shared \
                     control socket"
                        .into(),
                );
            });
            service.refresh(&name);
            return;
        }
        drop(service);
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}
