//! systemd over D-Bus: the [`Units`] backend.
//!
//! 1. [`Systemd::new`] only stores the bus address. The first request
//!    connects (bounded by the call timeout), calls the Manager's
//!    `Subscribe` so systemd emits job and unit signals, and keeps the
//!    connection for later requests.
//! 2. Reads never load a unit: `GetUnit` gives a loaded unit's object path;
//!    a unit systemd has not loaded (a template instance before its first
//!    start, or after systemd unloaded it) is inactive
//!    ([`UnitStatus::not_loaded`]). `GetAll` on the `Unit` interface and,
//!    for a unit with a cgroup, its type's interface (`Service`, …) gives
//!    the properties; systemd's "not set" sentinels become `None`. Many
//!    units at once: one `ListUnitsByPatterns` names the loaded ones.
//!    Jobs and kills load the unit they act on (`LoadUnit`); a unit whose
//!    `LoadState` is `not-found` is [`BackendError::NoSuchUnit`] there.
//! 3. Jobs (start, stop, restart): a match for the Manager's `JobRemoved`
//!    signals of the unit is added *before* the method call, so a job that
//!    ends before the call returns is not missed. The call returns the job's
//!    path; the request then waits for that job's `JobRemoved`: result
//!    `done` is success, anything else [`BackendError::JobFailed`].
//! 4. Kill: `KillUnit(unit, "all", SIGKILL)` makes no job. A match for the
//!    unit's `PropertiesChanged` is added first, the state is read once
//!    after the call, then signals are awaited until the unit is down.
//! 5. Failures: each bus call has its own timeout and each job or kill the
//!    caller's deadline ([`BackendError::Timeout`]; the job itself is left
//!    to systemd). An I/O error or a closed connection drops the connection
//!    so the next request reconnects; until one succeeds requests answer
//!    [`BackendError::Unavailable`]. Nothing polls and nothing reconnects in
//!    the background.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use tokio::sync::Mutex;
use zbus::message::Type;
use zbus::zvariant::{DynamicType, OwnedObjectPath, OwnedValue};
use zbus::{Connection, MatchRule, Message, MessageStream};

use super::{ActiveState, BackendError, ProcessExit, UnitEvent, UnitEvents, UnitStatus, Units};

/// The system bus, used when no address is configured.
pub const SYSTEM_BUS_ADDRESS: &str = "unix:path=/run/dbus/system_bus_socket";

/// How long one bus call (or connecting) may take by default.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(5);

const DESTINATION: &str = "org.freedesktop.systemd1";
const MANAGER_PATH: &str = "/org/freedesktop/systemd1";
const MANAGER: &str = "org.freedesktop.systemd1.Manager";
const UNIT: &str = "org.freedesktop.systemd1.Unit";
const PROPERTIES: &str = "org.freedesktop.DBus.Properties";
/// Job mode: replace conflicting queued jobs, as `systemctl` does.
const MODE: &str = "replace";
/// Signals queued per wait. The match rules select one unit, so few arrive.
const SIGNAL_QUEUE: usize = 64;
const SIGKILL: i32 = 9;

/// A unit's properties as `GetAll` returns them.
type Props = HashMap<String, OwnedValue>;

/// The service manager over D-Bus. Cheap to create; connects on first use.
#[derive(Debug)]
pub struct Systemd {
    address: String,
    call_timeout: Duration,
    conn: Mutex<Option<Connection>>,
}

impl Systemd {
    /// systemd on the bus at `address` (a D-Bus address such as
    /// `unix:path=/run/dbus/system_bus_socket`); `None` is the system bus
    /// ([`SYSTEM_BUS_ADDRESS`]). Does not connect yet.
    pub fn new(address: Option<String>) -> Self {
        Self {
            address: address.unwrap_or_else(|| SYSTEM_BUS_ADDRESS.to_owned()),
            call_timeout: DEFAULT_CALL_TIMEOUT,
            conn: Mutex::new(None),
        }
    }

    /// Bounds each bus call, and connecting, by `timeout` instead of
    /// [`DEFAULT_CALL_TIMEOUT`].
    #[must_use]
    pub fn with_call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = timeout;
        self
    }

    /// The bus address.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The kept connection, or a new one if there is none or it closed.
    /// Waiting behind another request's connection attempt counts against
    /// the same call timeout, so a hung bus stalls no request for longer.
    async fn connection(&self) -> Result<Connection, BackendError> {
        tokio::time::timeout(self.call_timeout, self.kept_or_new())
            .await
            .unwrap_or_else(|_| Err(self.unavailable("connecting timed out")))
    }

    async fn kept_or_new(&self) -> Result<Connection, BackendError> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = slot.as_ref() {
            if !conn.is_closed() {
                return Ok(conn.clone());
            }
            tracing::info!(address = %self.address, "systemd D-Bus connection closed");
            *slot = None;
        }
        let conn = self.connect().await?;
        tracing::debug!(address = %self.address, "connected to systemd over D-Bus");
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Connects and subscribes to systemd's signals.
    async fn connect(&self) -> Result<Connection, BackendError> {
        let conn = async {
            zbus::connection::Builder::address(self.address.as_str())?
                .method_timeout(self.call_timeout)
                .build()
                .await
        }
        .await
        .map_err(|e| self.error(classify(&e), "connect", ""))?;
        // Without a subscriber systemd may not emit unit and job signals.
        self.raw_call(&conn, MANAGER_PATH, MANAGER, "Subscribe", &(), "")
            .await
            .map_err(|fault| self.error(fault, "Subscribe", ""))?;
        Ok(conn)
    }

    /// Forgets `broken` so the next request reconnects.
    async fn forget(&self, broken: &Connection) {
        let mut slot = self.conn.lock().await;
        let same = slot
            .as_ref()
            .is_some_and(|c| c.is_closed() || c.unique_name() == broken.unique_name());
        if same {
            tracing::info!(address = %self.address, "dropping the D-Bus connection to systemd");
            *slot = None;
        }
    }

    /// One method call to systemd, bounded by the call timeout.
    async fn raw_call<B>(
        &self,
        conn: &Connection,
        path: &str,
        interface: &str,
        method: &str,
        body: &B,
        subject: &str,
    ) -> Result<Message, Fault>
    where
        B: serde::Serialize + DynamicType,
    {
        let call = conn.call_method(Some(DESTINATION), path, Some(interface), method, body);
        match tokio::time::timeout(self.call_timeout, call).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => {
                let fault = classify(&e);
                tracing::debug!(method, subject, error = %e, "systemd call failed");
                Err(fault)
            }
            Err(_) => Err(Fault::Timeout),
        }
    }

    /// As [`Self::raw_call`]; a broken connection is forgotten.
    async fn call<B>(
        &self,
        conn: &Connection,
        path: &str,
        interface: &str,
        method: &str,
        body: &B,
        subject: &str,
    ) -> Result<Message, Fault>
    where
        B: serde::Serialize + DynamicType,
    {
        let result = self
            .raw_call(conn, path, interface, method, body, subject)
            .await;
        if matches!(result, Err(Fault::Transport(_))) || conn.is_closed() {
            self.forget(conn).await;
        }
        result
    }

    /// A signal stream for `rule`, set up on the bus before returning.
    async fn subscribe(
        &self,
        conn: &Connection,
        rule: MatchRule<'_>,
        subject: &str,
    ) -> Result<MessageStream, BackendError> {
        let add = MessageStream::for_match_rule(rule, conn, Some(SIGNAL_QUEUE));
        let fault = match tokio::time::timeout(self.call_timeout, add).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => classify(&e),
            Err(_) => Fault::Timeout,
        };
        if matches!(fault, Fault::Transport(_)) || conn.is_closed() {
            self.forget(conn).await;
        }
        Err(self.error(fault, "AddMatch", subject))
    }

    /// The unit's object path, loading the unit if systemd has not.
    async fn unit_path(
        &self,
        conn: &Connection,
        unit: &str,
    ) -> Result<OwnedObjectPath, BackendError> {
        let reply = match self
            .call(conn, MANAGER_PATH, MANAGER, "GetUnit", &unit, unit)
            .await
        {
            Ok(reply) => reply,
            Err(Fault::NoSuchUnit) => self
                .call(conn, MANAGER_PATH, MANAGER, "LoadUnit", &unit, unit)
                .await
                .map_err(|fault| self.error(fault, "LoadUnit", unit))?,
            Err(fault) => return Err(self.error(fault, "GetUnit", unit)),
        };
        decode(&reply, "GetUnit", unit)
    }

    /// Every property of `interface` on the object at `path`.
    async fn properties(
        &self,
        conn: &Connection,
        path: &str,
        interface: &str,
        unit: &str,
    ) -> Result<Props, BackendError> {
        let reply = self
            .call(conn, path, PROPERTIES, "GetAll", &interface, unit)
            .await
            .map_err(|fault| self.error(fault, "GetAll", unit))?;
        decode(&reply, "GetAll", unit)
    }

    /// One property of `interface` on the object at `path`.
    async fn property(
        &self,
        conn: &Connection,
        path: &str,
        interface: &str,
        name: &str,
        unit: &str,
    ) -> Result<OwnedValue, BackendError> {
        let reply = self
            .call(conn, path, PROPERTIES, "Get", &(interface, name), unit)
            .await
            .map_err(|fault| self.error(fault, "Get", unit))?;
        decode(&reply, "Get", unit)
    }

    async fn status_of(&self, unit: &str) -> Result<UnitStatus, BackendError> {
        let conn = self.connection().await?;
        let reply = match self
            .call(&conn, MANAGER_PATH, MANAGER, "GetUnit", &unit, unit)
            .await
        {
            Ok(reply) => reply,
            Err(Fault::NoSuchUnit) => return Ok(UnitStatus::not_loaded()),
            Err(fault) => return Err(self.error(fault, "GetUnit", unit)),
        };
        let path: OwnedObjectPath = decode(&reply, "GetUnit", unit)?;
        self.status_at(&conn, &path, unit).await
    }

    /// The status of the loaded `unit` at `path`.
    async fn status_at(
        &self,
        conn: &Connection,
        path: &OwnedObjectPath,
        unit: &str,
    ) -> Result<UnitStatus, BackendError> {
        let conn = conn.clone();
        let props = self.properties(&conn, path.as_str(), UNIT, unit).await?;
        let cgroup = match cgroup_interface(unit) {
            Some(interface) => {
                self.properties(&conn, path.as_str(), interface, unit)
                    .await?
            }
            None => Props::new(),
        };
        unit_status(&props, &cgroup, unit)
    }

    /// [`Units::statuses`]: `ListUnitsByPatterns` names the loaded units
    /// (it loads none), then each loaded one is read.
    async fn statuses_of(&self, units: &[String]) -> Result<Vec<UnitStatus>, BackendError> {
        type Listed = (
            String,
            String,
            String,
            String,
            String,
            String,
            OwnedObjectPath,
            u32,
            String,
            OwnedObjectPath,
        );
        if units.is_empty() {
            return Ok(Vec::new());
        }
        let conn = self.connection().await?;
        let states: &[&str] = &[];
        let reply = self
            .call(
                &conn,
                MANAGER_PATH,
                MANAGER,
                "ListUnitsByPatterns",
                &(states, units),
                "",
            )
            .await
            .map_err(|fault| self.error(fault, "ListUnitsByPatterns", ""))?;
        let listed: Vec<Listed> = decode(&reply, "ListUnitsByPatterns", "")?;
        let paths: HashMap<String, OwnedObjectPath> = listed
            .into_iter()
            .map(|(name, _, _, _, _, _, path, _, _, _)| (name, path))
            .collect();
        let mut statuses = Vec::with_capacity(units.len());
        for unit in units {
            statuses.push(match paths.get(unit) {
                Some(path) => match self.status_at(&conn, path, unit).await {
                    // Unloaded between the list and the read.
                    Err(BackendError::NoSuchUnit(_)) => UnitStatus::not_loaded(),
                    other => other?,
                },
                None => UnitStatus::not_loaded(),
            });
        }
        Ok(statuses)
    }

    /// [`Units::wants`]: the target's `Wants`; nothing for a target that
    /// does not exist. The target (not a VM's unit, and read only when vmd
    /// syncs) is loaded to read it: its `Wants` come from its unit files.
    async fn wants_of(&self, target: &str) -> Result<Vec<String>, BackendError> {
        let conn = self.connection().await?;
        let path = match self.unit_path(&conn, target).await {
            Ok(path) => path,
            Err(BackendError::NoSuchUnit(_)) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let wants = self
            .property(&conn, path.as_str(), UNIT, "Wants", target)
            .await?;
        Vec::<String>::try_from(wants).map_err(|e| protocol("Get Wants", target, &e.to_string()))
    }

    /// `FreezeUnit` or `ThawUnit`: systemd answers once the cgroup's
    /// freezer is done.
    async fn freezer(&self, method: &'static str, unit: &str) -> Result<(), BackendError> {
        let conn = self.connection().await?;
        self.call(&conn, MANAGER_PATH, MANAGER, method, &unit, unit)
            .await
            .map(drop)
            .map_err(|fault| self.error(fault, method, unit))
    }

    /// Runs `job` on `unit` and waits until it ends or `deadline`.
    async fn job(&self, job: Job, unit: &str, deadline: Duration) -> Result<(), BackendError> {
        within(
            deadline,
            job.verb(),
            unit,
            self.job_until_removed(job, unit),
        )
        .await
    }

    async fn job_until_removed(&self, job: Job, unit: &str) -> Result<(), BackendError> {
        let conn = self.connection().await?;
        let rule = job_removed_rule(unit).map_err(|e| protocol("match", unit, &e.to_string()))?;
        let mut removed = self.subscribe(&conn, rule, unit).await?;
        let reply = self
            .call(
                &conn,
                MANAGER_PATH,
                MANAGER,
                job.method(),
                &(unit, MODE),
                unit,
            )
            .await
            .map_err(|fault| self.error(fault, job.method(), unit))?;
        let queued: OwnedObjectPath = decode(&reply, job.method(), unit)?;
        tracing::debug!(unit, job = %queued.as_str(), "{} job queued", job.verb());
        while let Some(signal) = removed.next().await {
            let signal = match signal {
                Ok(signal) => signal,
                Err(e) => {
                    self.forget(&conn).await;
                    return Err(self.error(classify(&e), "JobRemoved", unit));
                }
            };
            let (_id, path, _unit, result): (u32, OwnedObjectPath, String, String) =
                decode(&signal, "JobRemoved", unit)?;
            if path == queued {
                return job_result(unit, &result);
            }
        }
        self.forget(&conn).await;
        Err(self.unavailable("the connection closed while waiting for a job"))
    }

    async fn kill_unit(&self, unit: &str) -> Result<(), BackendError> {
        let conn = self.connection().await?;
        let path = self.unit_path(&conn, unit).await?;
        let rule = properties_changed_rule(path.as_str())
            .map_err(|e| protocol("match", unit, &e.to_string()))?;
        let mut changes = self.subscribe(&conn, rule, unit).await?;
        match self
            .call(
                &conn,
                MANAGER_PATH,
                MANAGER,
                "KillUnit",
                &(unit, "all", SIGKILL),
                unit,
            )
            .await
        {
            Ok(_) => {}
            // Nothing left to kill: the state below says whether it is down.
            Err(Fault::NoSuchUnit) => {}
            Err(Fault::Refused { name, .. }) if name == NO_SUCH_PROCESS => {}
            Err(fault) => return Err(self.error(fault, "KillUnit", unit)),
        }
        let props = self.properties(&conn, path.as_str(), UNIT, unit).await?;
        if text(&props, "LoadState", unit)? == "not-found" {
            return Err(BackendError::NoSuchUnit(unit.to_owned()));
        }
        if is_down(
            &text(&props, "ActiveState", unit)?,
            &text(&props, "SubState", unit)?,
        ) {
            return Ok(());
        }
        while let Some(signal) = changes.next().await {
            let signal = match signal {
                Ok(signal) => signal,
                Err(e) => {
                    self.forget(&conn).await;
                    return Err(self.error(classify(&e), "PropertiesChanged", unit));
                }
            };
            let (_interface, changed, invalidated): (String, Props, Vec<String>) =
                decode(&signal, "PropertiesChanged", unit)?;
            let state = if changed.contains_key("ActiveState") || changed.contains_key("SubState") {
                changed
            } else if invalidated
                .iter()
                .any(|p| p == "ActiveState" || p == "SubState")
            {
                self.properties(&conn, path.as_str(), UNIT, unit).await?
            } else {
                continue;
            };
            let active = text(&state, "ActiveState", unit).unwrap_or_default();
            let sub = text(&state, "SubState", unit).unwrap_or_default();
            if is_down(&active, &sub) {
                return Ok(());
            }
        }
        self.forget(&conn).await;
        Err(self.unavailable("the connection closed while waiting for the unit to stop"))
    }

    /// [`Units::events`]: on a connection of its own (so its lifetime is
    /// the stream's), subscribed, with two matches per unit: its
    /// `PropertiesChanged` on the `Unit` interface, at the object path
    /// systemd gives it, and the Manager's `JobRemoved` for it. Only those
    /// units' signals reach vmd: other units changing on a busy host never
    /// wake it. Not `UnitNew`/`UnitRemoved`: reading a stopped template
    /// instance loads it and systemd unloads it again soon after, so those
    /// would echo vmd's own reads back as changes (a watch answered,
    /// re-read, answered again, forever); loading changes no VM's state.
    ///
    /// The Manager's `Reloading(false)` (a `daemon-reload` or re-exec
    /// finished) is a [`UnitEvent::Resync`]: units may have changed
    /// without a signal.
    async fn unit_events(&self, units: Vec<String>) -> Result<UnitEvents, BackendError> {
        let conn = tokio::time::timeout(self.call_timeout, self.connect())
            .await
            .unwrap_or_else(|_| Err(self.unavailable("connecting timed out")))?;
        let mut streams = Vec::new();
        let reloading = reloading_rule().map_err(|e| protocol("AddMatch", "", &e.to_string()))?;
        streams.push(self.subscribe(&conn, reloading, "Reloading").await?);
        for unit in &units {
            let path = unit_object_path(unit);
            let rules = [properties_changed_rule(&path), job_removed_rule(unit)];
            for rule in rules {
                let rule = rule.map_err(|e| protocol("AddMatch", unit, &e.to_string()))?;
                streams.push(self.subscribe(&conn, rule, unit).await?);
            }
        }
        tracing::debug!(address = %self.address, units = units.len(), "following unit signals");
        let events = futures_util::stream::select_all(streams)
            .filter_map(|msg| async move { msg.ok().as_ref().and_then(unit_event) });
        // The streams keep `conn` open; it closes when they are dropped.
        Ok(events.boxed())
    }

    fn unavailable(&self, why: &str) -> BackendError {
        BackendError::Unavailable(format!("systemd (D-Bus at {}: {why})", self.address))
    }

    /// The error a request answers for `fault` of `method` on `subject`.
    fn error(&self, fault: Fault, method: &str, subject: &str) -> BackendError {
        match fault {
            Fault::Transport(why) => self.unavailable(&why),
            Fault::NotOnBus(why) => self.unavailable(&format!("systemd is not on the bus: {why}")),
            Fault::Timeout => BackendError::Timeout(format!("systemd {method} {subject}")),
            Fault::NoSuchUnit => BackendError::NoSuchUnit(subject.to_owned()),
            Fault::Refused { name, description } => BackendError::Command {
                command: format!("{method} {subject}"),
                description: format!("{name}: {description}"),
            },
            Fault::Protocol(why) => protocol(method, subject, &why),
        }
    }
}

impl Units for Systemd {
    fn status<'a>(&'a self, unit: &'a str) -> BoxFuture<'a, Result<UnitStatus, BackendError>> {
        Box::pin(self.status_of(unit))
    }

    fn statuses<'a>(
        &'a self,
        units: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<UnitStatus>, BackendError>> {
        Box::pin(self.statuses_of(units))
    }

    fn wants<'a>(&'a self, target: &'a str) -> BoxFuture<'a, Result<Vec<String>, BackendError>> {
        Box::pin(self.wants_of(target))
    }

    fn freeze<'a>(
        &'a self,
        unit: &'a str,
        deadline: Duration,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(within(
            deadline,
            "freeze",
            unit,
            self.freezer("FreezeUnit", unit),
        ))
    }

    fn thaw<'a>(
        &'a self,
        unit: &'a str,
        deadline: Duration,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(within(
            deadline,
            "thaw",
            unit,
            self.freezer("ThawUnit", unit),
        ))
    }

    fn start<'a>(
        &'a self,
        unit: &'a str,
        deadline: Duration,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(self.job(Job::Start, unit, deadline))
    }

    fn stop<'a>(
        &'a self,
        unit: &'a str,
        deadline: Duration,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(self.job(Job::Stop, unit, deadline))
    }

    fn kill<'a>(
        &'a self,
        unit: &'a str,
        deadline: Duration,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(within(deadline, "kill", unit, self.kill_unit(unit)))
    }

    fn restart<'a>(
        &'a self,
        unit: &'a str,
        deadline: Duration,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(self.job(Job::Restart, unit, deadline))
    }

    fn events<'a>(
        &'a self,
        units: &'a [String],
    ) -> BoxFuture<'a, Result<UnitEvents, BackendError>> {
        Box::pin(self.unit_events(units.to_vec()))
    }
}

/// A job-queueing Manager method.
#[derive(Clone, Copy, Debug)]
enum Job {
    Start,
    Stop,
    Restart,
}

impl Job {
    fn method(self) -> &'static str {
        match self {
            Self::Start => "StartUnit",
            Self::Stop => "StopUnit",
            Self::Restart => "RestartUnit",
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Stop => "stop",
            Self::Restart => "restart",
        }
    }
}

/// Why a bus call failed, before it becomes a [`BackendError`].
#[derive(Debug, PartialEq, Eq)]
enum Fault {
    /// The connection is unusable (refused, reset, closed): forget it.
    Transport(String),
    /// The bus works but systemd is not on it.
    NotOnBus(String),
    /// No answer in time.
    Timeout,
    /// systemd has no such unit.
    NoSuchUnit,
    /// systemd refused the call.
    Refused {
        /// The D-Bus error name.
        name: String,
        /// Its message.
        description: String,
    },
    /// An unexpected reply.
    Protocol(String),
}

const NO_SUCH_UNIT: &str = "org.freedesktop.systemd1.NoSuchUnit";
const NO_SUCH_PROCESS: &str = "org.freedesktop.systemd1.NoSuchProcess";

fn classify(err: &zbus::Error) -> Fault {
    match err {
        zbus::Error::InputOutput(e) if e.kind() == io::ErrorKind::TimedOut => Fault::Timeout,
        zbus::Error::InputOutput(e) | zbus::Error::Connection(e, _) => {
            Fault::Transport(e.to_string())
        }
        zbus::Error::Handshake(why) => Fault::Transport(format!("handshake failed: {why}")),
        zbus::Error::Address(why) => Fault::Transport(format!("bad address: {why}")),
        zbus::Error::MethodError(name, description, _) => {
            classify_reply(name.as_str(), description.as_deref().unwrap_or_default())
        }
        other => Fault::Protocol(other.to_string()),
    }
}

/// Classifies a D-Bus error reply by its name.
fn classify_reply(name: &str, description: &str) -> Fault {
    match name {
        NO_SUCH_UNIT => Fault::NoSuchUnit,
        "org.freedesktop.DBus.Error.ServiceUnknown"
        | "org.freedesktop.DBus.Error.NameHasNoOwner"
        | "org.freedesktop.DBus.Error.Disconnected"
        | "org.freedesktop.DBus.Error.NoServer" => Fault::NotOnBus(description.to_owned()),
        // The bus tried to activate systemd's name (it cannot).
        spawn if spawn.starts_with("org.freedesktop.DBus.Error.Spawn.") => {
            Fault::NotOnBus(description.to_owned())
        }
        "org.freedesktop.DBus.Error.NoReply"
        | "org.freedesktop.DBus.Error.Timeout"
        | "org.freedesktop.DBus.Error.TimedOut" => Fault::Timeout,
        _ => Fault::Refused {
            name: name.to_owned(),
            description: description.to_owned(),
        },
    }
}

/// Bounds `work` by the caller's `deadline`.
async fn within<T>(
    deadline: Duration,
    verb: &str,
    unit: &str,
    work: impl Future<Output = Result<T, BackendError>>,
) -> Result<T, BackendError> {
    tokio::time::timeout(deadline, work)
        .await
        .unwrap_or_else(|_| Err(BackendError::Timeout(format!("{verb} {unit}"))))
}

fn protocol(method: &str, subject: &str, why: &str) -> BackendError {
    BackendError::Protocol(format!("systemd {method} {subject}: {why}"))
}

/// Decodes a reply or signal body.
fn decode<T>(msg: &Message, method: &str, subject: &str) -> Result<T, BackendError>
where
    T: for<'d> zbus::zvariant::DynamicDeserialize<'d>,
{
    msg.body()
        .deserialize()
        .map_err(|e| protocol(method, subject, &e.to_string()))
}

/// Matches the Manager's `JobRemoved(id, job, unit, result)` for `unit`.
fn job_removed_rule(unit: &str) -> zbus::Result<MatchRule<'_>> {
    Ok(MatchRule::builder()
        .msg_type(Type::Signal)
        .sender(DESTINATION)?
        .path(MANAGER_PATH)?
        .interface(MANAGER)?
        .member("JobRemoved")?
        .arg(2, unit)?
        .build())
}

/// Where systemd puts unit objects.
const UNIT_PATH_NAMESPACE: &str = "/org/freedesktop/systemd1/unit";

/// The object path systemd gives `unit`: every byte outside
/// `[A-Za-z0-9]` (and a leading digit) escaped as `_xx` (hex).
fn unit_object_path(unit: &str) -> String {
    let mut path = String::with_capacity(UNIT_PATH_NAMESPACE.len() + 1 + unit.len() * 3);
    path.push_str(UNIT_PATH_NAMESPACE);
    path.push('/');
    for (i, byte) in unit.bytes().enumerate() {
        if byte.is_ascii_alphabetic() || (byte.is_ascii_digit() && i > 0) {
            path.push(char::from(byte));
        } else {
            path.push_str(&format!("_{byte:02x}"));
        }
    }
    path
}

/// What a signal says: the unit in `JobRemoved` (`uoss`), the unit at the
/// object path of `PropertiesChanged`, a resync after `Reloading(false)`.
fn unit_event(msg: &Message) -> Option<UnitEvent> {
    let header = msg.header();
    match header.member()?.as_str() {
        "JobRemoved" => msg
            .body()
            .deserialize::<(u32, OwnedObjectPath, String, String)>()
            .ok()
            .map(|(_, _, unit, _)| UnitEvent::Changed(unit)),
        "PropertiesChanged" => unit_from_path(header.path()?.as_str()).map(UnitEvent::Changed),
        "Reloading" => {
            let active: bool = msg.body().deserialize().ok()?;
            (!active).then_some(UnitEvent::Resync)
        }
        _ => None,
    }
}

/// Matches the Manager's `Reloading(active)`.
fn reloading_rule() -> zbus::Result<MatchRule<'static>> {
    Ok(MatchRule::builder()
        .msg_type(Type::Signal)
        .sender(DESTINATION)?
        .path(MANAGER_PATH)?
        .interface(MANAGER)?
        .member("Reloading")?
        .build())
}

/// The unit name of a unit object path: systemd escapes every byte outside
/// `[A-Za-z0-9]` as `_xx` (hex), e.g. `microvm_40gui_2dvm_2eservice`.
fn unit_from_path(path: &str) -> Option<String> {
    let escaped = path
        .strip_prefix(UNIT_PATH_NAMESPACE)?
        .strip_prefix('/')?
        .as_bytes();
    let mut name = Vec::with_capacity(escaped.len());
    let mut i = 0;
    while i < escaped.len() {
        if escaped[i] == b'_' {
            let hex = std::str::from_utf8(escaped.get(i + 1..i + 3)?).ok()?;
            name.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            name.push(escaped[i]);
            i += 1;
        }
    }
    String::from_utf8(name).ok()
}

/// Matches `PropertiesChanged` of the `Unit` interface at `path`.
fn properties_changed_rule(path: &str) -> zbus::Result<MatchRule<'_>> {
    Ok(MatchRule::builder()
        .msg_type(Type::Signal)
        .sender(DESTINATION)?
        .path(path)?
        .interface(PROPERTIES)?
        .member("PropertiesChanged")?
        .arg(0, UNIT)?
        .build())
}

fn job_result(unit: &str, result: &str) -> Result<(), BackendError> {
    if result == "done" {
        Ok(())
    } else {
        Err(BackendError::JobFailed {
            unit: unit.to_owned(),
            result: result.to_owned(),
        })
    }
}

/// Whether a killed unit has no processes left: inactive, failed, or
/// waiting to be restarted (`Restart=` makes `activating`/`auto-restart`
/// follow the kill instead of `failed`).
fn is_down(active_state: &str, sub_state: &str) -> bool {
    matches!(active_state, "inactive" | "failed") || sub_state == "auto-restart"
}

/// The interface holding the cgroup accounting (and, for services,
/// `MainPID`) of a unit, by its type.
fn cgroup_interface(unit: &str) -> Option<&'static str> {
    let (_, kind) = unit.rsplit_once('.')?;
    Some(match kind {
        "service" => "org.freedesktop.systemd1.Service",
        "scope" => "org.freedesktop.systemd1.Scope",
        "slice" => "org.freedesktop.systemd1.Slice",
        "socket" => "org.freedesktop.systemd1.Socket",
        "mount" => "org.freedesktop.systemd1.Mount",
        "swap" => "org.freedesktop.systemd1.Swap",
        _ => return None,
    })
}

/// Builds the status from the `Unit` properties and the cgroup interface's.
fn unit_status(unit_props: &Props, cgroup: &Props, unit: &str) -> Result<UnitStatus, BackendError> {
    let optional_text =
        |props: &Props, name: &str| props.get(name).map(|_| text(props, name, unit)).transpose();
    Ok(UnitStatus {
        load_state: text(unit_props, "LoadState", unit)?,
        active_state: ActiveState::parse(&text(unit_props, "ActiveState", unit)?),
        sub_state: text(unit_props, "SubState", unit)?,
        freezer_state: optional_text(unit_props, "FreezerState")?,
        main_pid: number::<u32>(cgroup, "MainPID", unit)?.and_then(pid),
        active_enter_usec: number::<u64>(unit_props, "ActiveEnterTimestamp", unit)?
            .and_then(timestamp),
        result: optional_text(cgroup, "Result")?,
        exit: process_exit(cgroup, unit)?,
        n_restarts: number::<u32>(cgroup, "NRestarts", unit)?,
        control_group: optional_text(cgroup, "ControlGroup")?.filter(|cg| !cg.is_empty()),
    })
}

/// `CLD_EXITED`, `CLD_KILLED` and `CLD_DUMPED` of `ExecMainCode`.
const CLD_EXITED: i32 = 1;
const CLD_KILLED: i32 = 2;
const CLD_DUMPED: i32 = 3;

/// How the main process ended, from `ExecMainCode`/`ExecMainStatus`/
/// `ExecMainExitTimestamp`; `None` while it has not.
fn process_exit(service: &Props, unit: &str) -> Result<Option<ProcessExit>, BackendError> {
    let code = number::<i32>(service, "ExecMainCode", unit)?.unwrap_or(0);
    let status = number::<i32>(service, "ExecMainStatus", unit)?;
    let at_usec = number::<u64>(service, "ExecMainExitTimestamp", unit)?.and_then(timestamp);
    Ok(match code {
        CLD_EXITED => Some(ProcessExit {
            status,
            signal: None,
            at_usec,
        }),
        CLD_KILLED | CLD_DUMPED => Some(ProcessExit {
            status: None,
            signal: status,
            at_usec,
        }),
        _ => None,
    })
}

/// A string property that must be there.
fn text(props: &Props, name: &str, unit: &str) -> Result<String, BackendError> {
    let value = props
        .get(name)
        .ok_or_else(|| protocol("GetAll", unit, &format!("no {name} property")))?;
    value
        .downcast_ref::<&str>()
        .map(str::to_owned)
        .map_err(|e| protocol("GetAll", unit, &format!("{name}: {e}")))
}

/// A numeric property; `None` if systemd does not have it.
fn number<T>(props: &Props, name: &str, unit: &str) -> Result<Option<T>, BackendError>
where
    T: for<'v> TryFrom<&'v OwnedValue, Error = zbus::zvariant::Error>,
{
    props
        .get(name)
        .map(|value| {
            T::try_from(value).map_err(|e| protocol("GetAll", unit, &format!("{name}: {e}")))
        })
        .transpose()
}

/// `MainPID`: 0 is "no process".
fn pid(value: u32) -> Option<u32> {
    (value != 0).then_some(value)
}

/// A timestamp in µs: 0 is "never".
fn timestamp(value: u64) -> Option<u64> {
    (value != 0).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(entries: &[(&str, OwnedValue)]) -> Props {
        entries
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.try_clone().expect("plain value")))
            .collect()
    }

    fn s(value: &str) -> OwnedValue {
        OwnedValue::try_from(zbus::zvariant::Value::from(value)).expect("string value")
    }

    fn unit_props(active: &str, sub: &str, entered: u64) -> Props {
        props(&[
            ("LoadState", s("loaded")),
            ("ActiveState", s(active)),
            ("SubState", s(sub)),
            ("ActiveEnterTimestamp", OwnedValue::from(entered)),
        ])
    }

    #[test]
    fn unit_names_escape_to_systemds_object_paths() {
        assert_eq!(
            unit_object_path("microvm@gui-vm.service"),
            "/org/freedesktop/systemd1/unit/microvm_40gui_2dvm_2eservice"
        );
        assert_eq!(
            unit_object_path("9p.mount"),
            "/org/freedesktop/systemd1/unit/_39p_2emount"
        );
        for unit in ["microvm@gui-vm.service", "a_b.service", "9p.mount"] {
            assert_eq!(
                unit_from_path(&unit_object_path(unit)).as_deref(),
                Some(unit)
            );
        }
    }

    #[test]
    fn unit_paths_unescape_to_unit_names() {
        assert_eq!(
            unit_from_path("/org/freedesktop/systemd1/unit/microvm_40gui_2dvm_2eservice")
                .as_deref(),
            Some("microvm@gui-vm.service")
        );
        assert_eq!(
            unit_from_path("/org/freedesktop/systemd1/unit/dbus_2eservice").as_deref(),
            Some("dbus.service")
        );
        assert_eq!(unit_from_path("/org/freedesktop/systemd1/unit/bad_4"), None);
        assert_eq!(unit_from_path("/org/freedesktop/systemd1"), None);
    }

    #[test]
    fn running_service_has_every_fact() {
        let service = props(&[
            ("MainPID", OwnedValue::from(42_u32)),
            ("Result", s("signal")),
            ("ExecMainCode", OwnedValue::from(2_i32)),
            ("ExecMainStatus", OwnedValue::from(9_i32)),
            (
                "ExecMainExitTimestamp",
                OwnedValue::from(1_600_000_000_000_000_u64),
            ),
            ("NRestarts", OwnedValue::from(3_u32)),
            ("ControlGroup", s("/system.slice/u.service")),
        ]);
        let status = unit_status(
            &unit_props("active", "running", 1_700_000_000_000_000),
            &service,
            "u",
        )
        .expect("complete properties");
        assert_eq!(
            status,
            UnitStatus {
                load_state: "loaded".into(),
                active_state: ActiveState::Active,
                sub_state: "running".into(),
                freezer_state: None,
                main_pid: Some(42),
                active_enter_usec: Some(1_700_000_000_000_000),
                result: Some("signal".into()),
                exit: Some(ProcessExit {
                    status: None,
                    signal: Some(9),
                    at_usec: Some(1_600_000_000_000_000),
                }),
                n_restarts: Some(3),
                control_group: Some("/system.slice/u.service".into()),
            }
        );
    }

    #[test]
    fn sentinels_become_none() {
        let service = props(&[
            ("MainPID", OwnedValue::from(0_u32)),
            ("ExecMainCode", OwnedValue::from(0_i32)),
            ("ControlGroup", s("")),
        ]);
        let status =
            unit_status(&unit_props("inactive", "dead", 0), &service, "u").expect("complete");
        assert_eq!(status.active_state, ActiveState::Inactive);
        assert_eq!(status.main_pid, None);
        assert_eq!(status.active_enter_usec, None);
        assert_eq!(status.exit, None);
        assert_eq!(status.control_group, None);
    }

    #[test]
    fn units_without_a_cgroup_interface_have_no_accounting() {
        let status = unit_status(
            &unit_props("active", "active", 1),
            &Props::new(),
            "t.target",
        )
        .expect("complete");
        assert_eq!(status.main_pid, None);
        assert_eq!(status.n_restarts, None);
        assert_eq!(
            cgroup_interface("microvm@a.service"),
            Some("org.freedesktop.systemd1.Service")
        );
        assert_eq!(
            cgroup_interface("machine.slice"),
            Some("org.freedesktop.systemd1.Slice")
        );
        assert_eq!(cgroup_interface("microvms.target"), None);
        assert_eq!(cgroup_interface("nodot"), None);
    }

    #[test]
    fn missing_or_mistyped_properties_are_protocol_errors() {
        let mut unit = unit_props("active", "running", 1);
        unit.remove("SubState");
        assert!(matches!(
            unit_status(&unit, &Props::new(), "u"),
            Err(BackendError::Protocol(_))
        ));

        let service = props(&[("MainPID", s("42"))]);
        assert!(matches!(
            unit_status(&unit_props("active", "running", 1), &service, "u"),
            Err(BackendError::Protocol(_))
        ));
    }

    #[test]
    fn active_states_parse() {
        for (text, state) in [
            ("active", ActiveState::Active),
            ("reloading", ActiveState::Reloading),
            ("inactive", ActiveState::Inactive),
            ("failed", ActiveState::Failed),
            ("activating", ActiveState::Activating),
            ("deactivating", ActiveState::Deactivating),
            ("maintenance", ActiveState::Other("maintenance".into())),
        ] {
            let status =
                unit_status(&unit_props(text, "x", 0), &Props::new(), "u").expect("complete");
            assert_eq!(status.active_state, state);
        }
    }

    #[test]
    fn down_means_no_processes_left() {
        assert!(is_down("inactive", "dead"));
        assert!(is_down("failed", "failed"));
        assert!(is_down("activating", "auto-restart"));
        assert!(!is_down("active", "running"));
        assert!(!is_down("deactivating", "stop-sigterm"));
        assert!(!is_down("activating", "start-pre"));
    }

    #[test]
    fn job_results() {
        assert!(job_result("u", "done").is_ok());
        for result in ["failed", "timeout", "canceled", "dependency", "skipped"] {
            match job_result("u", result) {
                Err(BackendError::JobFailed { unit, result: r }) => {
                    assert_eq!((unit.as_str(), r.as_str()), ("u", result));
                }
                other => panic!("{result}: {other:?}"),
            }
        }
    }

    #[test]
    fn error_replies_classify() {
        assert_eq!(
            classify_reply(NO_SUCH_UNIT, "Unit x not loaded."),
            Fault::NoSuchUnit
        );
        assert!(matches!(
            classify_reply("org.freedesktop.DBus.Error.ServiceUnknown", "gone"),
            Fault::NotOnBus(_)
        ));
        assert!(matches!(
            classify_reply("org.freedesktop.DBus.Error.Spawn.ChildExited", "no"),
            Fault::NotOnBus(_)
        ));
        assert_eq!(
            classify_reply("org.freedesktop.DBus.Error.NoReply", ""),
            Fault::Timeout
        );
        assert_eq!(
            classify_reply("org.freedesktop.systemd1.UnitMasked", "Unit x is masked."),
            Fault::Refused {
                name: "org.freedesktop.systemd1.UnitMasked".into(),
                description: "Unit x is masked.".into()
            }
        );
    }

    #[test]
    fn transport_errors_classify() {
        let refused =
            zbus::Error::InputOutput(io::Error::from(io::ErrorKind::ConnectionRefused).into());
        assert!(matches!(classify(&refused), Fault::Transport(_)));
        let timed_out = zbus::Error::InputOutput(io::Error::from(io::ErrorKind::TimedOut).into());
        assert_eq!(classify(&timed_out), Fault::Timeout);
        assert!(matches!(
            classify(&zbus::Error::InvalidReply),
            Fault::Protocol(_)
        ));
    }

    #[test]
    fn faults_map_to_backend_errors() {
        let systemd = Systemd::new(Some("unix:path=/nonexistent".into()));
        match systemd.error(Fault::Transport("refused".into()), "GetUnit", "u") {
            BackendError::Unavailable(why) => {
                assert!(why.contains("unix:path=/nonexistent"), "{why}");
                assert!(why.contains("refused"), "{why}");
            }
            other => panic!("expected Unavailable, got {other:?}"),
        }
        assert!(matches!(
            systemd.error(Fault::NoSuchUnit, "GetUnit", "u"),
            BackendError::NoSuchUnit(u) if u == "u"
        ));
        assert!(matches!(
            systemd.error(Fault::Timeout, "StartUnit", "u"),
            BackendError::Timeout(_)
        ));
    }

    #[test]
    fn default_address_is_the_system_bus() {
        assert_eq!(Systemd::new(None).address(), SYSTEM_BUS_ADDRESS);
    }

    #[tokio::test]
    async fn missing_bus_is_unavailable() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let address = format!("unix:path={}", dir.path().join("no-bus").display());
        let systemd = Systemd::new(Some(address));
        match systemd.status("microvm@a.service").await {
            Err(BackendError::Unavailable(why)) => assert!(why.contains("no-bus"), "{why}"),
            other => panic!("expected Unavailable, got {other:?}"),
        }
        match systemd
            .start("microvm@a.service", Duration::from_secs(5))
            .await
        {
            Err(BackendError::Unavailable(_)) => {}
            other => panic!("expected Unavailable, got {other:?}"),
        }
    }
}
