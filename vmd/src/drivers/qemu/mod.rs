//! QEMU's control sockets: a small async QMP client and [`Qmp`], the
//! [`VmControl`] of QEMU VMs.
//!
//! Two kinds of connection:
//!
//! - **vmd's own monitor** ([`monitor`]): a socket of vmd's own
//!   (`-qmp unix:…/vmd-qmp.sock`; QEMU sends every event to every
//!   monitor), held for the VM's life. Commands are matched by id; events
//!   are reported as they come; EOF means the process is gone.
//! - **short sessions on the shared socket** (`<name>.sock`, also used by
//!   microvm.nix's shutdown and balloon scripts, ghaf-mem-manager and
//!   vhotplug), for VMs without vmd's monitor, described below.
//!
//! QMP is line-delimited JSON over a unix socket and vmd needs about ten
//! commands, so this module speaks it directly instead of using the `qapi`
//! crate (0.15): that crate is generated from one QEMU version's schema and
//! brings a large generated API, while the few messages used here are
//! short to read by hand and ignore fields other QEMU versions add.
//!
//! A shared-socket session:
//!
//! 1. Take the per-socket lock. QEMU serves one QMP client at a time and
//!    queues the others, so [`Qmp`] serializes its own calls per socket
//!    path; a call waits its turn within its deadline, and a deadline spent
//!    waiting is [`BackendError::SocketBusy`].
//! 2. Connect to the unix socket. A missing socket or a refused connection
//!    (QEMU gone, stale socket file) is [`BackendError::Unavailable`]. A
//!    full accept queue (QEMU's backlog is one: another client holds the
//!    socket and one more waits) is retried; still full at the deadline, it
//!    is [`BackendError::SocketBusy`].
//! 3. Read the greeting (`{"QMP": {...}}`) and negotiate with
//!    `qmp_capabilities`. QEMU greets a second client only when the first
//!    one leaves, so a connection that gets no greeting before the deadline
//!    is reported as a [`BackendError::Timeout`] that says the socket may be
//!    busy.
//! 4. Run the commands, each `{"execute", "arguments", "id"}`, skipping
//!    asynchronous events (`{"event": ...}`) until the reply with the same
//!    `id`. `{"error": {"class", "desc"}}` becomes
//!    [`BackendError::Command`]; anything unexpected, including a line over
//!    [`MAX_LINE`] bytes, becomes [`BackendError::Protocol`].
//! 5. Close the socket (drop the [`Control`]), so the next client is served.
//!
//! Opening (lock wait, connect, greeting) is bounded by the timeout given
//! to [`Qmp::new`], and so is each command.
//!
//! # vCPU hot-plug
//!
//! [`Control::set_vcpus`] reads `query-hotpluggable-cpus`. To add, it
//! plugs empty slots in topology order with `device_add` (driver = the
//! slot's type, the slot's properties, id `vmd-cpu-<ids>`, for example
//! `vmd-cpu-0-2-0` for socket 0, core 2, thread 0). To remove, it unplugs
//! hot-plugged vCPUs (QOM path `/machine/peripheral/<id>`, or
//! `/machine/peripheral-anon/…` if plugged without an id), last first, with
//! `device_del`; vCPUs present at boot cannot be removed. Either way the
//! whole change is checked before the first command is sent.
//! Unplug is a request to the guest: QEMU returns at once and the vCPU goes
//! away only when the guest OS ejects it, so a call that lowers the count
//! returns before the count is lower. Without a guest OS that has switched
//! QEMU's ACPI CPU hot-plug to its modern interface (no OS at all, for
//! example), QEMU refuses the request (`acpi: device unplug request for not
//! supported device type`), which is returned as [`BackendError::Command`].
//! A failed `device_add` leaves the vCPUs plugged before it in place.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, Weak};
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::time::{Instant, timeout_at};

use super::{BackendError, Control, CpuSlot, LiveEvents, LiveState, RunState, VmControl};

pub mod monitor;

/// The longest line accepted from a QMP socket, in bytes. Real replies are
/// a few KiB; the cap keeps a hostile socket from exhausting memory.
pub const MAX_LINE: usize = 1 << 20;

/// The default bound of opening a session and of one command.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// The pause between connection attempts while QEMU's accept queue is
/// full.
const CONNECT_RETRY: Duration = Duration::from_millis(20);

/// Prefix of the ids vmd gives hot-plugged vCPUs.
const CPU_ID_PREFIX: &str = "vmd-cpu-";

/// Slot properties that give a vCPU's place, outermost first. They order
/// the slots and name the hot-plugged devices; any other property (such as
/// `node-id`) is passed to `device_add` but plays no part in either.
const TOPOLOGY: [&str; 7] = [
    "drawer-id",
    "book-id",
    "socket-id",
    "die-id",
    "cluster-id",
    "core-id",
    "thread-id",
];

/// Where QEMU lists the devices added with an id (`-device …,id=` or
/// `device_add`).
const PERIPHERALS: &str = "/machine/peripheral";

/// The QMP driver of QEMU VMs.
///
/// Sessions on one shared socket are serialized (QEMU serves one client
/// at a time and queues one more): the per-socket locks live in a map of
/// weak references: an entry keeps no lock alive, holders of a lock keep
/// it alive, and dead entries are dropped whenever a new socket is added,
/// so the map stays as small as the number of sockets in use.
#[derive(Debug)]
pub struct Qmp {
    timeout: Duration,
    locks: std::sync::Mutex<HashMap<PathBuf, Weak<tokio::sync::Mutex<()>>>>,
}

impl Qmp {
    /// A driver whose every open (lock wait, connect, greeting) and every
    /// command ends within `timeout`.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            locks: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// The bound of one open or command.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The lock that serializes sessions on `socket`.
    fn lock_for(&self, socket: &Path) -> Arc<tokio::sync::Mutex<()>> {
        // Nothing can panic while the map is locked; a poisoned map is
        // still consistent.
        let mut locks = self.locks.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(lock) = locks.get(socket).and_then(Weak::upgrade) {
            return lock;
        }
        locks.retain(|_, lock| lock.strong_count() > 0);
        let lock = Arc::new(tokio::sync::Mutex::new(()));
        locks.insert(socket.to_owned(), Arc::downgrade(&lock));
        lock
    }

    /// Opens a negotiated session on the shared `socket` within
    /// `patience` (at most the driver's timeout), holding vmd's turn on it
    /// until the session drops.
    async fn session(
        &self,
        socket: &Path,
        patience: Duration,
    ) -> Result<SharedSession, BackendError> {
        let deadline = Instant::now() + patience.min(self.timeout);
        let busy = || {
            BackendError::SocketBusy(format!(
                "QMP {} (another client holds it)",
                socket.display()
            ))
        };
        let turn = timeout_at(deadline, self.lock_for(socket).lock_owned())
            .await
            .map_err(|_| busy())?;
        let stream = timeout_at(deadline, connect(socket))
            .await
            .map_err(|_| busy())??;
        let session = timeout_at(deadline, Session::open(stream, socket))
            .await
            .map_err(|_| {
                BackendError::Timeout(format!(
                    "QMP greeting on {} (the socket is busy with another client)",
                    socket.display()
                ))
            })??;
        Ok(SharedSession {
            session: tokio::sync::Mutex::new(session),
            timeout: self.timeout,
            _turn: turn,
        })
    }
}

impl Default for Qmp {
    /// A driver with [`DEFAULT_TIMEOUT`].
    fn default() -> Self {
        Self::new(DEFAULT_TIMEOUT)
    }
}

impl VmControl for Qmp {
    fn attach<'a>(
        &'a self,
        socket: &'a Path,
        events: LiveEvents,
    ) -> BoxFuture<'a, Result<super::Attach, BackendError>> {
        Box::pin(async move {
            let (monitor, live) = monitor::attach(socket, events, self.timeout).await?;
            Ok((Arc::new(monitor) as Arc<dyn Control>, live))
        })
    }

    fn open<'a>(
        &'a self,
        socket: &'a Path,
        patience: Duration,
    ) -> BoxFuture<'a, Result<Box<dyn Control>, BackendError>> {
        Box::pin(async move {
            let session = self.session(socket, patience).await?;
            Ok(Box::new(session) as Box<dyn Control>)
        })
    }
}

/// Something that runs QMP commands: a session, or vmd's monitor.
trait Execute: Send {
    /// Runs `command` and returns its `return` value; a QMP error reply is
    /// [`BackendError::Command`].
    fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> impl Future<Output = Result<Value, BackendError>> + Send;

    /// Runs `command`; a QMP error reply is `Ok(None)`.
    fn optional(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> impl Future<Output = Result<Option<Value>, BackendError>> + Send {
        async move {
            match self.execute(command, arguments).await {
                Ok(value) => Ok(Some(value)),
                Err(BackendError::Command { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        }
    }

    /// Runs a query and parses its return; a QMP error reply is `Ok(None)`.
    fn query<T: serde::de::DeserializeOwned>(
        &mut self,
        command: &str,
    ) -> impl Future<Output = Result<Option<T>, BackendError>> + Send {
        async move {
            self.optional(command, None)
                .await?
                .map(|value| {
                    serde_json::from_value(value).map_err(|e| {
                        BackendError::Protocol(format!("unexpected {command} reply: {e}"))
                    })
                })
                .transpose()
        }
    }
}

/// A session on a shared socket, as a [`Control`]; each command is
/// bounded by the driver's timeout.
#[derive(Debug)]
struct SharedSession {
    session: tokio::sync::Mutex<Session>,
    timeout: Duration,
    _turn: tokio::sync::OwnedMutexGuard<()>,
}

impl SharedSession {
    async fn run<T, F>(&self, work: F) -> Result<T, BackendError>
    where
        F: AsyncFnOnce(&mut Session) -> Result<T, BackendError>,
    {
        let mut session = self.session.lock().await;
        let socket = session.socket.display().to_string();
        tokio::time::timeout(self.timeout, work(&mut session))
            .await
            .map_err(|_| BackendError::Timeout(format!("QMP {socket}")))?
    }
}

impl Control for SharedSession {
    fn query(&self) -> BoxFuture<'_, Result<LiveState, BackendError>> {
        Box::pin(self.run(async |s: &mut Session| query(s).await))
    }

    fn pause(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(self.run(async |s: &mut Session| s.execute("stop", None).await.map(drop)))
    }

    fn resume(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(self.run(async |s: &mut Session| s.execute("cont", None).await.map(drop)))
    }

    fn set_vcpus(&self, count: u32) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(self.run(async move |s: &mut Session| set_vcpus(s, count).await))
    }

    fn set_balloon(&self, bytes: u64) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(self.run(async move |s: &mut Session| balloon(s, bytes).await))
    }

    fn powerdown(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(
            self.run(async |s: &mut Session| s.execute("system_powerdown", None).await.map(drop)),
        )
    }
}

/// Sets the balloon target.
async fn balloon(qmp: &mut impl Execute, bytes: u64) -> Result<(), BackendError> {
    qmp.execute("balloon", Some(json!({ "value": bytes })))
        .await
        .map(drop)
}

/// Connects to `socket`. A full accept queue (QEMU serves another client
/// and one more waits) is retried until the caller's deadline, since it
/// clears as soon as QEMU moves on; the caller reports a deadline spent
/// here as [`BackendError::SocketBusy`].
async fn connect(socket: &Path) -> Result<UnixStream, BackendError> {
    loop {
        match UnixStream::connect(socket).await {
            Ok(stream) => return Ok(stream),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                tokio::time::sleep(CONNECT_RETRY).await;
            }
            Err(e) => {
                tracing::debug!(socket = %socket.display(), error = %e, "QMP connect failed");
                return Err(BackendError::Unavailable(format!(
                    "control socket {}",
                    socket.display()
                )));
            }
        }
    }
}

/// Maps QEMU's run state (QAPI `RunState`) to vmd's.
///
/// `paused` (a client's `stop`) and `prelaunch` (started with `-S`) are
/// [`RunState::Paused`]: `cont` resumes both. `suspended` (guest ACPI S3)
/// stays [`RunState::Other`], since `cont` does not wake it
/// (`system_wakeup` does); so do the error and migration states.
pub fn run_state(status: &str) -> RunState {
    match status {
        "running" => RunState::Running,
        "paused" | "prelaunch" => RunState::Paused,
        "shutdown" => RunState::Shutdown,
        other => RunState::Other(other.to_owned()),
    }
}

/// Every query of [`Control::query`] at once. A query QEMU
/// refuses (no balloon device, no hot-plug support, …) leaves its field
/// `None`. `vcpu_slots` counts the vCPUs the slots hold (`vcpus-count`,
/// one per slot on x86): the hot-plug maximum.
async fn query(session: &mut impl Execute) -> Result<LiveState, BackendError> {
    #[derive(Deserialize)]
    struct Status {
        status: String,
    }
    #[derive(Deserialize)]
    #[serde(rename_all = "kebab-case")]
    struct MemorySummary {
        base_memory: u64,
        plugged_memory: Option<u64>,
    }
    #[derive(Deserialize)]
    struct Balloon {
        actual: u64,
    }

    let mut state = LiveState::default();
    if let Some(status) = session.query::<Status>("query-status").await? {
        state.run_state = Some(run_state(&status.status));
    }
    if let Some(cpus) = session.query::<Vec<Value>>("query-cpus-fast").await? {
        state.vcpus = Some(count_u32(cpus.len()));
    }
    if let Some(slots) = session.optional("query-hotpluggable-cpus", None).await? {
        let slots = parse_slots(slots)?;
        state.vcpu_slots = Some(slots.iter().map(|s| s.vcpus).sum());
    }
    if let Some(memory) = session
        .query::<MemorySummary>("query-memory-size-summary")
        .await?
    {
        state.base_memory = Some(memory.base_memory);
        state.plugged_memory = memory.plugged_memory;
    }
    if let Some(balloon) = session.query::<Balloon>("query-balloon").await? {
        state.balloon_actual = Some(balloon.actual);
    }
    state.devices = devices(session).await?;
    Ok(state)
}

/// The devices under `/machine/peripheral`, as (id, type).
async fn devices(
    session: &mut impl Execute,
) -> Result<Option<Vec<(String, String)>>, BackendError> {
    #[derive(Deserialize)]
    struct Property {
        name: String,
        #[serde(rename = "type")]
        kind: String,
    }
    let Some(list) = session
        .optional("qom-list", Some(json!({ "path": PERIPHERALS })))
        .await?
    else {
        return Ok(None);
    };
    let list: Vec<Property> = serde_json::from_value(list)
        .map_err(|e| BackendError::Protocol(format!("unexpected qom-list reply: {e}")))?;
    let mut devices: Vec<(String, String)> = list
        .into_iter()
        .filter_map(|p| {
            let kind = p.kind.strip_prefix("child<")?.strip_suffix('>')?;
            Some((p.name, kind.to_owned()))
        })
        .collect();
    devices.sort();
    Ok(Some(devices))
}

/// Plugs or unplugs vCPUs until `count` are present (or, for unplug, until
/// the guest has been asked to eject the surplus).
async fn set_vcpus(session: &mut impl Execute, count: u32) -> Result<(), BackendError> {
    let slots = parse_slots(session.execute("query-hotpluggable-cpus", None).await?)?;
    let total: u32 = slots.iter().map(|s| s.vcpus).sum();
    let present: u32 = slots
        .iter()
        .filter(|s| s.cpu.qom_path.is_some())
        .map(|s| s.vcpus)
        .sum();
    if count == 0 {
        return Err(refused("device_del", "a VM needs at least one vCPU"));
    }
    if count > total {
        return Err(refused(
            "device_add",
            format!("{count} vCPUs requested but the VM has {total} vCPU slots"),
        ));
    }
    if count > present {
        // Plan first, so an unreachable count plugs nothing.
        let mut missing = count - present;
        let mut plan = Vec::new();
        for slot in slots.iter().filter(|s| s.cpu.qom_path.is_none()) {
            if missing == 0 {
                break;
            }
            if slot.vcpus > missing {
                return Err(refused(
                    "device_add",
                    format!(
                        "vCPUs plug in groups of {}: {count} is not reachable",
                        slot.vcpus
                    ),
                ));
            }
            plan.push(slot);
            missing -= slot.vcpus;
        }
        for slot in plan {
            session
                .execute("device_add", Some(device_add_args(&slot.cpu)))
                .await?;
        }
    } else if count < present {
        // Only vCPUs plugged by `device_add` can be unplugged, last first:
        // boot vCPUs are part of the machine.
        let mut surplus = present - count;
        let mut plan = Vec::new();
        for slot in slots.iter().rev() {
            if surplus == 0 {
                break;
            }
            let Some(device) = slot.cpu.qom_path.as_deref().and_then(unpluggable) else {
                continue;
            };
            if slot.vcpus > surplus {
                return Err(refused(
                    "device_del",
                    format!(
                        "vCPUs unplug in groups of {}: {count} is not reachable",
                        slot.vcpus
                    ),
                ));
            }
            plan.push(device);
            surplus -= slot.vcpus;
        }
        if surplus > 0 {
            return Err(refused(
                "device_del",
                format!(
                    "{count} vCPUs requested but {} were present at boot and cannot be removed",
                    count + surplus
                ),
            ));
        }
        for device in plan {
            session
                .execute("device_del", Some(json!({ "id": device })))
                .await?;
        }
    }
    Ok(())
}

/// What `device_del` takes to unplug the vCPU at `qom_path`: its id if it
/// has one, else its QOM path; `None` for a boot vCPU.
fn unpluggable(qom_path: &str) -> Option<&str> {
    if let Some(id) = qom_path.strip_prefix("/machine/peripheral/") {
        Some(id)
    } else if qom_path.starts_with("/machine/peripheral-anon/") {
        Some(qom_path)
    } else {
        None
    }
}

/// A refusal decided here rather than by QEMU.
fn refused(command: &str, description: impl Into<String>) -> BackendError {
    BackendError::Command {
        command: command.to_owned(),
        description: description.into(),
    }
}

/// A length as a `u32`, saturating (QEMU has far fewer than 2³² vCPUs).
fn count_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// A hot-plug slot and how many vCPUs it holds.
#[derive(Debug)]
struct Slot {
    cpu: CpuSlot,
    vcpus: u32,
}

/// Parses `query-hotpluggable-cpus`, sorted outermost topology id first.
fn parse_slots(value: Value) -> Result<Vec<Slot>, BackendError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "kebab-case")]
    struct Raw {
        #[serde(rename = "type")]
        driver: String,
        vcpus_count: Option<u32>,
        props: Map<String, Value>,
        qom_path: Option<String>,
    }

    let raw: Vec<Raw> = serde_json::from_value(value).map_err(|e| {
        BackendError::Protocol(format!("unexpected query-hotpluggable-cpus reply: {e}"))
    })?;
    let mut slots = raw
        .into_iter()
        .map(|raw| {
            let props = raw
                .props
                .into_iter()
                .map(|(name, value)| match value.as_i64() {
                    Some(n) => Ok((name, n)),
                    None => Err(BackendError::Protocol(format!(
                        "vCPU slot property {name} is not an integer"
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Slot {
                cpu: CpuSlot {
                    driver: raw.driver,
                    props,
                    qom_path: raw.qom_path,
                },
                vcpus: raw.vcpus_count.unwrap_or(1),
            })
        })
        .collect::<Result<Vec<_>, BackendError>>()?;
    slots.sort_by_key(|slot| topology(&slot.cpu));
    Ok(slots)
}

/// The slot's topology ids, outermost first (absent ones as -1).
fn topology(cpu: &CpuSlot) -> [i64; TOPOLOGY.len()] {
    TOPOLOGY.map(|name| {
        cpu.props
            .iter()
            .find(|(prop, _)| prop == name)
            .map_or(-1, |(_, value)| *value)
    })
}

/// The id vmd gives the vCPU it plugs into `cpu`.
fn cpu_id(cpu: &CpuSlot) -> String {
    let ids: Vec<String> = TOPOLOGY
        .iter()
        .filter_map(|name| {
            cpu.props
                .iter()
                .find(|(prop, _)| prop == name)
                .map(|(_, value)| value.to_string())
        })
        .collect();
    format!("{CPU_ID_PREFIX}{}", ids.join("-"))
}

/// `device_add` arguments that plug a vCPU into `cpu`.
fn device_add_args(cpu: &CpuSlot) -> Value {
    let mut args = Map::new();
    args.insert("driver".to_owned(), Value::from(cpu.driver.clone()));
    args.insert("id".to_owned(), Value::from(cpu_id(cpu)));
    for (name, value) in &cpu.props {
        args.insert(name.clone(), Value::from(*value));
    }
    Value::Object(args)
}

/// A reply's outcome: its `return`, or [`BackendError::Command`].
fn reply(message: Message, command: &str, socket: &Path) -> Result<Value, BackendError> {
    match (message.ret, message.error) {
        (Some(ret), None) => Ok(ret),
        (None, Some(error)) => {
            tracing::debug!(
                socket = %socket.display(),
                command,
                class = %error.class,
                "QMP command failed"
            );
            Err(BackendError::Command {
                command: command.to_owned(),
                description: error.desc,
            })
        }
        _ => Err(BackendError::Protocol(format!(
            "reply to {command} has neither return nor error"
        ))),
    }
}

/// One message from QEMU: a command's reply or an event.
#[derive(Debug, Deserialize)]
struct Message {
    #[serde(rename = "return")]
    ret: Option<Value>,
    error: Option<ErrorBody>,
    event: Option<String>,
    id: Option<Value>,
}

/// The body of an error reply.
#[derive(Debug, Deserialize)]
struct ErrorBody {
    class: String,
    desc: String,
}

/// One negotiated QMP connection. Dropping it closes the socket.
/// Events that arrive between replies are skipped: a session is short,
/// and vmd's monitor sees them all.
/// Events left by an earlier client that may precede the greeting.
const MAX_STALE_EVENTS: usize = 16;

#[derive(Debug)]
struct Session {
    stream: BufReader<UnixStream>,
    socket: PathBuf,
    next_id: u64,
    line: Vec<u8>,
}

impl Session {
    /// Reads the greeting on a fresh connection and leaves negotiation
    /// mode.
    async fn open(stream: UnixStream, socket: &Path) -> Result<Self, BackendError> {
        let mut session = Self {
            stream: BufReader::new(stream),
            socket: socket.to_owned(),
            next_id: 0,
            line: Vec::new(),
        };
        // QEMU writes what the previous client left unread (an event
        // emitted as it left, such as the BALLOON_CHANGE of another
        // client's `balloon`) to the next connection before its greeting:
        // skip a few events, nothing else.
        let mut stale = 0;
        loop {
            let greeting = session.read_value().await?;
            if greeting.get("QMP").is_some_and(Value::is_object) {
                break;
            }
            if greeting.get("event").is_none() || stale == MAX_STALE_EVENTS {
                return Err(BackendError::Protocol(format!(
                    "{} did not greet with a QMP banner",
                    socket.display()
                )));
            }
            stale += 1;
            tracing::debug!(socket = %socket.display(), event = %greeting["event"], "skipped an event left before the greeting");
        }
        session.execute("qmp_capabilities", None).await?;
        Ok(session)
    }

    /// Runs `command` and returns its `return` value.
    async fn run(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, BackendError> {
        self.next_id += 1;
        let id = self.next_id;
        let mut request = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut bytes = request.to_string().into_bytes();
        bytes.push(b'\n');
        self.stream
            .get_mut()
            .write_all(&bytes)
            .await
            .map_err(|e| self.gone(&e))?;
        loop {
            let value = self.read_value().await?;
            let message: Message = serde_json::from_value(value).map_err(|e| {
                BackendError::Protocol(format!("unexpected reply to {command}: {e}"))
            })?;
            if message.event.is_some() {
                continue;
            }
            if message.id.as_ref().and_then(Value::as_u64) != Some(id) {
                return Err(BackendError::Protocol(format!(
                    "reply to {command} carries id {:?}, expected {id}",
                    message.id
                )));
            }
            return reply(message, command, &self.socket);
        }
    }

    /// Reads one line, at most [`MAX_LINE`] bytes, as JSON.
    async fn read_value(&mut self) -> Result<Value, BackendError> {
        self.line.clear();
        let limit = u64::try_from(MAX_LINE + 1).unwrap_or(u64::MAX);
        let read = (&mut self.stream)
            .take(limit)
            .read_until(b'\n', &mut self.line)
            .await;
        match read {
            Err(e) => return Err(self.gone(&e)),
            Ok(0) => {
                tracing::debug!(socket = %self.socket.display(), "QMP socket closed");
                return Err(BackendError::Unavailable(format!(
                    "control socket {}",
                    self.socket.display()
                )));
            }
            Ok(_) => {}
        }
        if self.line.last() != Some(&b'\n') {
            return Err(if self.line.len() > MAX_LINE {
                BackendError::Protocol(format!(
                    "{} sent a line longer than {MAX_LINE} bytes",
                    self.socket.display()
                ))
            } else {
                BackendError::Protocol(format!(
                    "{} closed in the middle of a line",
                    self.socket.display()
                ))
            });
        }
        serde_json::from_slice(&self.line).map_err(|e| {
            BackendError::Protocol(format!("{} sent invalid JSON: {e}", self.socket.display()))
        })
    }

    /// The error for a connection that broke.
    fn gone(&self, error: &std::io::Error) -> BackendError {
        tracing::debug!(socket = %self.socket.display(), %error, "QMP connection broke");
        BackendError::Unavailable(format!("control socket {}", self.socket.display()))
    }
}

impl Execute for Session {
    async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, BackendError> {
        self.run(command, arguments).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::net::UnixListener;
    use tokio::net::unix::OwnedWriteHalf;

    /// What the fake does with one command: the lines it sends back, with
    /// `$ID` standing for the request's id.
    type Script = dyn Fn(&str, &Value) -> Vec<String> + Send + Sync;

    /// The last command of [`VmControl::query`]: the fake counts a session
    /// as over just before it replies to it. (Counting until it reads the
    /// client's EOF would race with the next client's accept; the reply to
    /// the last command comes, causally, before the next connect.)
    const LAST: &str = "query-balloon";

    /// A fake QEMU: greets, negotiates, answers commands with a script,
    /// records them and the most sessions it ever had at once.
    struct Fake {
        dir: tempfile::TempDir,
        log: Arc<Mutex<Vec<(String, Value)>>>,
        most_sessions: Arc<AtomicUsize>,
    }

    /// Counts one session in and, on drop or `end`, out.
    struct Counted {
        sessions: Arc<AtomicUsize>,
        live: bool,
    }

    impl Counted {
        fn end(&mut self) {
            if std::mem::take(&mut self.live) {
                self.sessions.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    impl Drop for Counted {
        fn drop(&mut self) {
            self.end();
        }
    }

    impl Fake {
        fn start(script: impl Fn(&str, &Value) -> Vec<String> + Send + Sync + 'static) -> Self {
            Self::start_after(None, script)
        }

        /// As [`Fake::start`], writing `stale` to each client before the
        /// greeting, as QEMU does with output the previous client left.
        fn start_after(
            stale: Option<&'static str>,
            script: impl Fn(&str, &Value) -> Vec<String> + Send + Sync + 'static,
        ) -> Self {
            let dir = tempfile::tempdir().expect("temporary directory");
            let listener = UnixListener::bind(dir.path().join("vm.sock")).expect("bind");
            let script: Arc<Script> = Arc::new(script);
            let log = Arc::new(Mutex::new(Vec::new()));
            let sessions = Arc::new(AtomicUsize::new(0));
            let most_sessions = Arc::new(AtomicUsize::new(0));
            let (log2, most2) = (log.clone(), most_sessions.clone());
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let now = sessions.fetch_add(1, Ordering::SeqCst) + 1;
                    most2.fetch_max(now, Ordering::SeqCst);
                    let counted = Counted {
                        sessions: sessions.clone(),
                        live: true,
                    };
                    tokio::spawn(serve(stream, stale, script.clone(), log2.clone(), counted));
                }
            });
            Self {
                dir,
                log,
                most_sessions,
            }
        }

        fn socket(&self) -> PathBuf {
            self.dir.path().join("vm.sock")
        }

        fn commands(&self) -> Vec<(String, Value)> {
            self.log.lock().expect("log").clone()
        }

        fn count(&self, command: &str) -> usize {
            self.commands().iter().filter(|(c, _)| c == command).count()
        }
    }

    async fn send(writer: &mut OwnedWriteHalf, line: &str) {
        let _ = writer.write_all(format!("{line}\r\n").as_bytes()).await;
    }

    async fn serve(
        stream: UnixStream,
        stale: Option<&'static str>,
        script: Arc<Script>,
        log: Arc<Mutex<Vec<(String, Value)>>>,
        mut counted: Counted,
    ) {
        let (reader, mut writer) = stream.into_split();
        if let Some(line) = stale {
            send(&mut writer, line).await;
        }
        send(
            &mut writer,
            r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": ["oob"]}}"#,
        )
        .await;
        let mut lines = BufReader::new(reader).lines();
        let mut negotiated = false;
        while let Ok(Some(line)) = lines.next_line().await {
            let request: Value = serde_json::from_str(&line).expect("client sends JSON");
            let command = request["execute"].as_str().expect("execute").to_owned();
            let id = request["id"].to_string();
            if !negotiated {
                assert_eq!(command, "qmp_capabilities", "negotiation comes first");
                negotiated = true;
                send(&mut writer, &format!(r#"{{"return": {{}}, "id": {id}}}"#)).await;
                continue;
            }
            let arguments = request.get("arguments").cloned().unwrap_or(Value::Null);
            log.lock()
                .expect("log")
                .push((command.clone(), arguments.clone()));
            if command == LAST {
                counted.end();
            }
            for reply in script(&command, &arguments) {
                send(&mut writer, &reply.replace("$ID", &id)).await;
            }
        }
    }

    fn ok(ret: &Value) -> Vec<String> {
        vec![format!(r#"{{"return": {ret}, "id": $ID}}"#)]
    }

    fn err(class: &str, desc: &str) -> Vec<String> {
        let error = json!({"class": class, "desc": desc});
        vec![format!(r#"{{"error": {error}, "id": $ID}}"#)]
    }

    fn slots(plugged: usize) -> Value {
        // QEMU lists slots last first.
        let mut slots: Vec<Value> = (0..4)
            .map(|core| {
                let mut slot = json!({
                    "props": {"core-id": core, "thread-id": 0, "node-id": 0, "socket-id": 0},
                    "vcpus-count": 1,
                    "type": "max-x86_64-cpu",
                });
                if core == 0 {
                    slot["qom-path"] = json!("/machine/unattached/device[0]");
                } else if core < plugged {
                    slot["qom-path"] = json!(format!("/machine/peripheral/vmd-cpu-0-{core}-0"));
                }
                slot
            })
            .collect();
        slots.reverse();
        Value::Array(slots)
    }

    fn qemu(command: &str, _: &Value) -> Vec<String> {
        match command {
            "query-status" => ok(&json!({"status": "running", "running": true})),
            "query-cpus-fast" => ok(&json!([{"cpu-index": 0}, {"cpu-index": 1}])),
            "query-hotpluggable-cpus" => ok(&slots(2)),
            "query-memory-size-summary" => {
                ok(&json!({"base-memory": 268_435_456, "plugged-memory": 0}))
            }
            "query-balloon" => ok(&json!({"actual": 134_217_728})),
            "qom-list" => ok(&json!([
                {"name": "type", "type": "string"},
                {"name": "balloon0", "type": "child<virtio-balloon-pci>"}
            ])),
            _ => ok(&json!({})),
        }
    }

    fn qmp() -> Qmp {
        Qmp::new(Duration::from_secs(5))
    }

    /// One shared-socket session per call, as vmd's background reads and
    /// changes of VMs without a monitor use them.
    impl Qmp {
        async fn query(&self, socket: &Path) -> Result<LiveState, BackendError> {
            self.open(socket, self.timeout).await?.query().await
        }
        async fn pause(&self, socket: &Path) -> Result<(), BackendError> {
            self.open(socket, self.timeout).await?.pause().await
        }
        async fn resume(&self, socket: &Path) -> Result<(), BackendError> {
            self.open(socket, self.timeout).await?.resume().await
        }
        async fn powerdown(&self, socket: &Path) -> Result<(), BackendError> {
            self.open(socket, self.timeout).await?.powerdown().await
        }
        async fn set_vcpus(&self, socket: &Path, n: u32) -> Result<(), BackendError> {
            self.open(socket, self.timeout).await?.set_vcpus(n).await
        }
        async fn set_balloon(&self, socket: &Path, bytes: u64) -> Result<(), BackendError> {
            self.open(socket, self.timeout)
                .await?
                .set_balloon(bytes)
                .await
        }
    }

    #[tokio::test]
    async fn query_reads_every_fact_in_one_session() {
        let fake = Fake::start(qemu);
        let state = qmp().query(&fake.socket()).await.expect("query");
        assert_eq!(
            state,
            LiveState {
                run_state: Some(RunState::Running),
                vcpus: Some(2),
                vcpu_slots: Some(4),
                base_memory: Some(268_435_456),
                plugged_memory: Some(0),
                balloon_actual: Some(134_217_728),
                devices: Some(vec![("balloon0".into(), "virtio-balloon-pci".into())]),
            }
        );
        assert_eq!(fake.most_sessions.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn refused_queries_leave_their_field_empty() {
        let fake = Fake::start(|command, args| match command {
            "query-balloon" => err("DeviceNotActive", "No balloon device has been activated"),
            "query-hotpluggable-cpus" => {
                err("GenericError", "machine does not support hot-plugging CPUs")
            }
            _ => qemu(command, args),
        });
        let state = qmp().query(&fake.socket()).await.expect("query");
        assert_eq!(state.balloon_actual, None);
        assert_eq!(state.vcpu_slots, None);
        assert_eq!(state.vcpus, Some(2));
        assert_eq!(state.run_state, Some(RunState::Running));
    }

    #[tokio::test]
    async fn events_between_replies_are_skipped() {
        let fake = Fake::start(|command, args| {
            let event = r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#;
            let mut lines = vec![event.to_owned(), event.to_owned()];
            lines.extend(qemu(command, args));
            lines
        });
        let qmp = qmp();
        qmp.pause(&fake.socket()).await.expect("pause");
        let state = qmp.query(&fake.socket()).await.expect("query");
        assert_eq!(state.vcpus, Some(2));
    }

    #[tokio::test]
    async fn error_reply_is_a_command_error() {
        let fake = Fake::start(|command, args| match command {
            "balloon" => err("DeviceNotActive", "No balloon device has been activated"),
            _ => qemu(command, args),
        });
        let error = qmp()
            .set_balloon(&fake.socket(), 1 << 27)
            .await
            .expect_err("balloon refused");
        match error {
            BackendError::Command {
                command,
                description,
            } => {
                assert_eq!(command, "balloon");
                assert_eq!(description, "No balloon device has been activated");
            }
            other => panic!("expected a command error, got {other:?}"),
        }
        assert_eq!(
            fake.commands(),
            vec![("balloon".to_owned(), json!({"value": 1 << 27}))]
        );
    }

    #[tokio::test]
    async fn simple_commands_send_their_qmp_names() {
        let fake = Fake::start(qemu);
        let qmp = qmp();
        qmp.pause(&fake.socket()).await.expect("pause");
        qmp.resume(&fake.socket()).await.expect("resume");
        qmp.powerdown(&fake.socket()).await.expect("powerdown");
        let names: Vec<String> = fake.commands().into_iter().map(|(c, _)| c).collect();
        assert_eq!(names, ["stop", "cont", "system_powerdown"]);
    }

    #[tokio::test]
    async fn set_vcpus_plugs_empty_slots_in_order() {
        let fake = Fake::start(qemu);
        qmp().set_vcpus(&fake.socket(), 4).await.expect("plug");
        let adds: Vec<Value> = fake
            .commands()
            .into_iter()
            .filter(|(c, _)| c == "device_add")
            .map(|(_, args)| args)
            .collect();
        assert_eq!(
            adds,
            [2, 3].map(|core| json!({
                "driver": "max-x86_64-cpu",
                "id": format!("vmd-cpu-0-{core}-0"),
                "socket-id": 0,
                "core-id": core,
                "thread-id": 0,
                "node-id": 0,
            }))
        );
    }

    #[tokio::test]
    async fn set_vcpus_unplugs_hot_plugged_vcpus_only() {
        let fake = Fake::start(|command, args| match command {
            "query-hotpluggable-cpus" => ok(&slots(3)),
            _ => qemu(command, args),
        });
        let qmp = qmp();
        qmp.set_vcpus(&fake.socket(), 2).await.expect("unplug one");
        let dels: Vec<Value> = fake
            .commands()
            .into_iter()
            .filter(|(c, _)| c == "device_del")
            .map(|(_, args)| args)
            .collect();
        assert_eq!(dels, [json!({"id": "vmd-cpu-0-2-0"})]);

        let error = qmp
            .set_vcpus(&fake.socket(), 0)
            .await
            .expect_err("zero vCPUs");
        assert!(matches!(error, BackendError::Command { .. }), "{error:?}");
        // The fake keeps reporting 3 present (1 boot, 2 plugged): 1 is the
        // boot vCPU alone and allowed; fewer is not, more than 4 is not.
        let error = qmp
            .set_vcpus(&fake.socket(), 5)
            .await
            .expect_err("more than the slots");
        assert!(matches!(error, BackendError::Command { .. }), "{error:?}");
        qmp.set_vcpus(&fake.socket(), 3).await.expect("no change");
        assert_eq!((fake.count("device_add"), fake.count("device_del")), (0, 1));
    }

    #[tokio::test]
    async fn boot_vcpus_are_not_unplugged() {
        let fake = Fake::start(|command, args| match command {
            "query-hotpluggable-cpus" => {
                let mut slots = slots(0);
                for slot in slots.as_array_mut().expect("array").iter_mut().take(2) {
                    slot["qom-path"] = json!("/machine/unattached/device[1]");
                }
                ok(&slots)
            }
            _ => qemu(command, args),
        });
        let error = qmp()
            .set_vcpus(&fake.socket(), 1)
            .await
            .expect_err("boot vCPUs stay");
        match error {
            BackendError::Command { description, .. } => {
                assert!(description.contains("present at boot"), "{description}");
            }
            other => panic!("expected a command error, got {other:?}"),
        }
        assert_eq!(fake.count("device_del"), 0);
    }

    #[tokio::test]
    async fn no_greeting_is_a_timeout() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let socket = dir.path().join("vm.sock");
        let listener = UnixListener::bind(&socket).expect("bind");
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let error = Qmp::new(Duration::from_millis(200))
            .query(&socket)
            .await
            .expect_err("no greeting");
        match error {
            BackendError::Timeout(what) => assert!(what.contains("busy"), "{what}"),
            other => panic!("expected a timeout, got {other:?}"),
        }
        server.abort();
    }

    #[tokio::test]
    async fn missing_socket_is_unavailable() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let error = qmp()
            .query(&dir.path().join("absent.sock"))
            .await
            .expect_err("no socket");
        assert!(matches!(error, BackendError::Unavailable(_)), "{error:?}");
    }

    #[tokio::test]
    async fn stale_socket_is_unavailable() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let socket = dir.path().join("vm.sock");
        drop(UnixListener::bind(&socket).expect("bind"));
        let error = qmp().query(&socket).await.expect_err("refused");
        assert!(matches!(error, BackendError::Unavailable(_)), "{error:?}");
    }

    #[tokio::test]
    async fn over_long_line_is_a_protocol_error() {
        let fake = Fake::start(|command, args| match command {
            "query-status" => vec![format!(
                r#"{{"return": {{"status": "{}"}}, "id": $ID}}"#,
                "x".repeat(MAX_LINE)
            )],
            _ => qemu(command, args),
        });
        let error = qmp().query(&fake.socket()).await.expect_err("too long");
        match error {
            BackendError::Protocol(what) => assert!(what.contains("longer"), "{what}"),
            other => panic!("expected a protocol error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn malformed_json_is_a_protocol_error() {
        let fake = Fake::start(|command, args| match command {
            "query-status" => vec!["{\"return\": ".to_owned()],
            _ => qemu(command, args),
        });
        let error = qmp().query(&fake.socket()).await.expect_err("bad JSON");
        assert!(matches!(error, BackendError::Protocol(_)), "{error:?}");
    }

    /// Output another client left unread reaches the next one before the
    /// greeting (seen with a real QEMU after another client's `balloon`).
    #[tokio::test]
    async fn an_event_left_before_the_greeting_is_skipped() {
        let stale = r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "BALLOON_CHANGE", "data": {"actual": 201326592}}"#;
        let fake = Fake::start_after(Some(stale), qemu);
        qmp()
            .query(&fake.socket())
            .await
            .expect("a query after a stale event");
        // Anything else before the greeting is still not QMP.
        let fake = Fake::start_after(Some(r#"{"return": {}}"#), qemu);
        let error = qmp().query(&fake.socket()).await.expect_err("not QMP");
        assert!(matches!(error, BackendError::Protocol(_)), "{error:?}");
    }

    #[tokio::test]
    async fn bad_greeting_is_a_protocol_error() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let socket = dir.path().join("vm.sock");
        let listener = UnixListener::bind(&socket).expect("bind");
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            stream.write_all(b"{\"hello\": 1}\n").await.expect("write");
            // Keep the connection open until the client leaves.
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest).await;
        });
        let error = qmp().query(&socket).await.expect_err("not QMP");
        assert!(matches!(error, BackendError::Protocol(_)), "{error:?}");
    }

    #[tokio::test]
    async fn concurrent_calls_on_one_socket_are_serialized() {
        let fake = Fake::start(qemu);
        let qmp = qmp();
        let socket = fake.socket();
        let calls = (0..8).map(|_| qmp.query(&socket));
        for result in futures_util::future::join_all(calls).await {
            result.expect("query");
        }
        assert_eq!(fake.most_sessions.load(Ordering::SeqCst), 1);
        assert_eq!(fake.count("query-status"), 8);
    }

    #[test]
    fn run_states() {
        assert_eq!(run_state("running"), RunState::Running);
        assert_eq!(run_state("paused"), RunState::Paused);
        assert_eq!(run_state("prelaunch"), RunState::Paused);
        assert_eq!(run_state("shutdown"), RunState::Shutdown);
        assert_eq!(
            run_state("suspended"),
            RunState::Other("suspended".to_owned())
        );
    }

    #[test]
    fn only_hot_plugged_vcpus_are_unpluggable() {
        assert_eq!(
            unpluggable("/machine/peripheral/vmd-cpu-0-1-0"),
            Some("vmd-cpu-0-1-0")
        );
        assert_eq!(
            unpluggable("/machine/peripheral-anon/device[3]"),
            Some("/machine/peripheral-anon/device[3]")
        );
        assert_eq!(unpluggable("/machine/unattached/device[0]"), None);
    }

    #[test]
    fn locks_are_shared_while_held_and_dropped_after() {
        let qmp = qmp();
        let a = qmp.lock_for(Path::new("/a.sock"));
        assert!(Arc::ptr_eq(&a, &qmp.lock_for(Path::new("/a.sock"))));
        drop(a);
        let _b = qmp.lock_for(Path::new("/b.sock"));
        let locks = qmp.locks.lock().expect("map");
        assert_eq!(locks.len(), 1, "the dead /a.sock entry is pruned");
    }
}
