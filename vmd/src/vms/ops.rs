//! Operations: changes to VMs, one at a time per VM.
//!
//! 1. [`Operations::begin`] claims the VM for a change. If the VM already
//!    has one, or the host runs as many changes as it allows, it answers
//!    busy at once: nothing waits for a lock.
//! 2. The claim is an [`OperationGuard`]. The change runs in its own task
//!    and ends with [`OperationGuard::finish`]; a change refused before it
//!    starts is [`OperationGuard::abandon`]ed and leaves no record; if the
//!    task ends any other way (panic, cancellation) dropping the guard
//!    records a failure. On every path the VM is released, by RAII.
//! 3. Finished operations are kept for a while (count and age bounded) so
//!    clients can fetch the result; old ones are pruned lazily when new
//!    ones begin, so an idle daemon runs no timer.
//! 4. [`Operations::wait`] waits for an operation to end, woken by the
//!    operation itself (a watch channel), never by polling.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;
use vmd_proto::{
    ErrorReply, OperationId, OperationInfo, OperationKind, OperationStatus, PendingOperation,
    VmName,
};

/// Limits of the operation registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OperationLimits {
    /// Changes running at once, host-wide.
    pub max_concurrent: usize,
    /// How long a finished operation stays visible.
    pub retention: Duration,
    /// How many finished operations stay visible at most.
    pub max_retained: usize,
}

impl Default for OperationLimits {
    fn default() -> Self {
        Self {
            max_concurrent: 8,
            retention: Duration::from_secs(600),
            max_retained: 1024,
        }
    }
}

/// Why a change could not begin.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{vm} is busy with {kind}")]
pub struct Busy {
    /// The VM, or `*` for the host-wide cap.
    pub vm: String,
    /// The change in the way (for the cap: the oldest running one).
    pub kind: OperationKind,
    /// When it started, in milliseconds since the Unix epoch.
    pub since_unix_ms: u64,
}

#[derive(Debug)]
struct Record {
    info: OperationInfo,
    /// The identity that asked for the change; only it sees the operation.
    owner: String,
    /// Flips to `true` when the operation ends.
    done: watch::Sender<bool>,
    finished_at: Option<Instant>,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    records: HashMap<OperationId, Record>,
    /// The running operation of each busy VM.
    running: HashMap<VmName, OperationId>,
    /// Finished operations, oldest first, for pruning.
    finished: VecDeque<OperationId>,
}

/// The registry of operations. Cheap to share (`Arc` inside).
#[derive(Clone, Debug)]
pub struct Operations {
    state: Arc<Mutex<State>>,
    limits: OperationLimits,
}

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Operations {
    /// An empty registry.
    pub fn new(limits: OperationLimits) -> Self {
        Self {
            state: Arc::default(),
            limits,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the maps half
        // updated (every update is a single insert/remove), so a poisoned
        // lock is still consistent.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Claims `vm` for a change of `kind`.
    ///
    /// # Errors
    /// [`Busy`] if the VM has a change running or the host-wide cap is
    /// reached.
    pub fn begin(
        &self,
        vm: &VmName,
        kind: OperationKind,
        owner: &str,
    ) -> Result<OperationGuard, Busy> {
        let mut state = self.lock();
        if let Some(id) = state.running.get(vm) {
            let info = &state.records[id].info;
            return Err(Busy {
                vm: vm.to_string(),
                kind: info.kind,
                since_unix_ms: info.started_unix_ms,
            });
        }
        if state.running.len() >= self.limits.max_concurrent {
            let oldest = state
                .running
                .values()
                .map(|id| &state.records[id].info)
                .min_by_key(|info| info.started_unix_ms)
                .expect("the cap is at least 1, so something is running");
            return Err(Busy {
                vm: "*".into(),
                kind: oldest.kind,
                since_unix_ms: oldest.started_unix_ms,
            });
        }
        self.prune(&mut state);
        state.next_id += 1;
        let id = OperationId(state.next_id);
        let info = OperationInfo {
            id,
            vm: vm.clone(),
            kind,
            status: OperationStatus::Running,
            started_unix_ms: now_unix_ms(),
            finished_unix_ms: None,
        };
        let (done, _) = watch::channel(false);
        state.records.insert(
            id,
            Record {
                info: info.clone(),
                owner: owner.to_owned(),
                done,
                finished_at: None,
            },
        );
        state.running.insert(vm.clone(), id);
        Ok(OperationGuard {
            registry: self.clone(),
            info,
            finished: false,
        })
    }

    /// Drops finished operations past their retention (age or count).
    fn prune(&self, state: &mut State) {
        let now = Instant::now();
        while let Some(id) = state.finished.front().copied() {
            let expired = state
                .records
                .get(&id)
                .and_then(|r| r.finished_at)
                .is_none_or(|at| now.duration_since(at) > self.limits.retention);
            if !expired && state.finished.len() <= self.limits.max_retained {
                break;
            }
            state.finished.pop_front();
            state.records.remove(&id);
        }
    }

    /// Forgets a claim that never became a change.
    fn forget(&self, id: OperationId) {
        let mut state = self.lock();
        if let Some(record) = state.records.remove(&id) {
            state.running.remove(&record.info.vm);
            record.done.send_replace(true);
        }
    }

    fn end(&self, id: OperationId, status: OperationStatus) {
        let mut state = self.lock();
        let Some(record) = state.records.get_mut(&id) else {
            return;
        };
        record.info.status = status;
        record.info.finished_unix_ms = Some(now_unix_ms());
        record.finished_at = Some(Instant::now());
        record.done.send_replace(true);
        let vm = record.info.vm.clone();
        if state.running.get(&vm) == Some(&id) {
            state.running.remove(&vm);
        }
        state.finished.push_back(id);
    }

    /// An operation's current state, if `viewer` owns it. Others' operations
    /// are not disclosed: for them the id is unknown.
    pub fn get(&self, id: OperationId, viewer: &str) -> Option<OperationInfo> {
        self.lock()
            .records
            .get(&id)
            .filter(|r| r.owner == viewer)
            .map(|r| r.info.clone())
    }

    /// The change running on `vm`, if any; its id only for its owner.
    pub fn pending(&self, vm: &VmName, viewer: &str) -> Option<PendingOperation> {
        let state = self.lock();
        let record = &state.records[state.running.get(vm)?];
        Some(PendingOperation {
            id: (record.owner == viewer).then_some(record.info.id),
            kind: record.info.kind,
            since_unix_ms: record.info.started_unix_ms,
        })
    }

    /// Waits until `viewer`'s operation ends or `timeout` passes; returns
    /// its state then (`None` if unknown to `viewer`).
    pub async fn wait(
        &self,
        id: OperationId,
        timeout: Duration,
        viewer: &str,
    ) -> Option<OperationInfo> {
        let mut done = {
            let state = self.lock();
            let record = state.records.get(&id).filter(|r| r.owner == viewer)?;
            record.done.subscribe()
        };
        // Err only if the record (and its sender) was pruned meanwhile.
        let _ = tokio::time::timeout(timeout, done.wait_for(|d| *d)).await;
        self.get(id, viewer)
    }
}

/// A VM claimed for a change. Ends the operation when finished or dropped.
#[derive(Debug)]
#[must_use = "dropping the guard ends the operation as failed"]
pub struct OperationGuard {
    registry: Operations,
    info: OperationInfo,
    finished: bool,
}

impl OperationGuard {
    /// The operation as it started.
    pub fn info(&self) -> &OperationInfo {
        &self.info
    }

    /// Releases the VM without recording an operation: the change was
    /// refused before it started (for example by validation).
    pub fn abandon(mut self) {
        self.finished = true;
        self.registry.forget(self.info.id);
    }

    /// Ends the operation with the change's result and releases the VM.
    pub fn finish(mut self, result: Result<(), ErrorReply>) {
        self.finished = true;
        let status = match result {
            Ok(()) => OperationStatus::Succeeded,
            Err(e) => OperationStatus::Failed(e),
        };
        self.registry.end(self.info.id, status);
    }
}

impl Drop for OperationGuard {
    fn drop(&mut self) {
        if !self.finished {
            tracing::error!(operation = %self.info.id, vm = %self.info.vm, "operation ended without a result");
            self.registry
                .end(self.info.id, OperationStatus::Failed(ErrorReply::Internal));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str) -> VmName {
        VmName::new(name).expect("valid")
    }

    fn registry(max_concurrent: usize) -> Operations {
        Operations::new(OperationLimits {
            max_concurrent,
            ..OperationLimits::default()
        })
    }

    #[test]
    fn second_change_to_a_vm_is_busy_at_once() {
        let ops = registry(8);
        let first = ops
            .begin(&vm("a"), OperationKind::Start, "me")
            .expect("free");
        let busy = ops
            .begin(&vm("a"), OperationKind::Shutdown, "me")
            .expect_err("busy");
        assert_eq!(busy.vm, "a");
        assert_eq!(busy.kind, OperationKind::Start);
        assert_eq!(busy.since_unix_ms, first.info().started_unix_ms);
        // Another VM is not affected.
        let _other = ops
            .begin(&vm("b"), OperationKind::Start, "me")
            .expect("free");
        assert_eq!(
            ops.pending(&vm("a"), "me").map(|p| p.kind),
            Some(OperationKind::Start)
        );
        first.finish(Ok(()));
        assert_eq!(ops.pending(&vm("a"), "me"), None);
        ops.begin(&vm("a"), OperationKind::Shutdown, "me")
            .expect("released")
            .finish(Ok(()));
    }

    #[test]
    fn abandoned_claims_leave_no_trace() {
        let ops = registry(8);
        let guard = ops
            .begin(&vm("a"), OperationKind::Start, "me")
            .expect("free");
        let id = guard.info().id;
        guard.abandon();
        assert_eq!(ops.get(id, "me"), None);
        assert_eq!(ops.pending(&vm("a"), "me"), None);
        ops.begin(&vm("a"), OperationKind::Start, "me")
            .expect("released")
            .finish(Ok(()));
    }

    #[test]
    fn operations_are_private_to_their_owner() {
        let ops = registry(8);
        let guard = ops
            .begin(&vm("a"), OperationKind::Start, "gui-vm")
            .expect("free");
        let id = guard.info().id;
        assert!(ops.get(id, "gui-vm").is_some());
        assert_eq!(ops.get(id, "other"), None);
        let seen_by_other = ops.pending(&vm("a"), "other").expect("busy is visible");
        assert_eq!(seen_by_other.id, None, "but not whose or which operation");
        assert_eq!(seen_by_other.kind, OperationKind::Start);
        assert_eq!(ops.pending(&vm("a"), "gui-vm").and_then(|p| p.id), Some(id));
        guard.finish(Ok(()));
    }

    #[test]
    fn host_wide_cap_answers_busy() {
        let ops = registry(2);
        let _a = ops
            .begin(&vm("a"), OperationKind::Start, "me")
            .expect("free");
        let _b = ops
            .begin(&vm("b"), OperationKind::Restart, "me")
            .expect("free");
        let busy = ops
            .begin(&vm("c"), OperationKind::Start, "me")
            .expect_err("cap");
        assert_eq!(busy.vm, "*");
    }

    #[test]
    fn dropped_guard_fails_and_releases() {
        let ops = registry(8);
        let guard = ops
            .begin(&vm("a"), OperationKind::Resize, "me")
            .expect("free");
        let id = guard.info().id;
        drop(guard);
        let info = ops.get(id, "me").expect("kept");
        assert_eq!(info.status, OperationStatus::Failed(ErrorReply::Internal));
        assert!(info.finished_unix_ms.is_some());
        ops.begin(&vm("a"), OperationKind::Resize, "me")
            .expect("released")
            .finish(Ok(()));
    }

    #[test]
    fn finished_operations_are_pruned_by_count() {
        let ops = Operations::new(OperationLimits {
            max_retained: 2,
            ..OperationLimits::default()
        });
        let mut ids = Vec::new();
        for _ in 0..5 {
            let guard = ops
                .begin(&vm("a"), OperationKind::Start, "me")
                .expect("free");
            ids.push(guard.info().id);
            guard.finish(Err(ErrorReply::Timeout));
        }
        assert!(ops.get(ids[0], "me").is_none(), "oldest pruned");
        assert!(ops.get(ids[4], "me").is_some(), "newest kept");
        assert_eq!(
            ops.get(ids[4], "me").map(|i| i.status),
            Some(OperationStatus::Failed(ErrorReply::Timeout))
        );
    }

    #[tokio::test]
    async fn wait_is_woken_by_the_end() {
        let ops = registry(8);
        let guard = ops
            .begin(&vm("a"), OperationKind::Start, "me")
            .expect("free");
        let id = guard.info().id;
        let waiter = tokio::spawn({
            let ops = ops.clone();
            async move { ops.wait(id, Duration::from_secs(60), "me").await }
        });
        tokio::task::yield_now().await;
        guard.finish(Ok(()));
        let info = waiter.await.expect("joins").expect("known");
        assert_eq!(info.status, OperationStatus::Succeeded);
    }

    #[tokio::test(start_paused = true)]
    async fn wait_times_out_with_the_running_state() {
        let ops = registry(8);
        let guard = ops
            .begin(&vm("a"), OperationKind::Start, "me")
            .expect("free");
        let info = ops
            .wait(guard.info().id, Duration::from_secs(5), "me")
            .await
            .expect("known");
        assert_eq!(info.status, OperationStatus::Running);
        assert!(
            ops.wait(OperationId(999), Duration::from_secs(1), "me")
                .await
                .is_none()
        );
        guard.finish(Ok(()));
    }
}
