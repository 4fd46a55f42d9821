//! The connection to vmd, on a thread of its own with a tokio runtime;
//! it talks to the GTK main loop only through two channels.
//!
//! 1. While the window is hidden or minimised nothing is sent at all: no
//!    connection attempt, no graph read, no new `Watch` long-poll (one
//!    already in flight stays there; its answer waits until the window is
//!    shown again).
//! 2. Connect to the configured endpoints in order (`auto`: vsock to the
//!    host, then TCP). If none answers, tell the window which endpoints
//!    were tried and why each failed, wait (1 s, doubling to 30 s, or
//!    until "retry now"), and try again.
//! 3. Connected: follow every visible VM through a chain of `Watch`
//!    long-polls (no polling of state), and once a second read the host
//!    and each VM for the graphs. Before each snapshot, ask which VMs the
//!    session may change (`Rights`), so rows offer only what vmd accepts.
//! 4. A button's change runs as a task: the server's answer (accepted,
//!    busy, forbidden, unsupported, …) and then the operation's end go
//!    back to the row.
//! 5. A failed session goes back to step 2; a closed window ends the
//!    thread after closing the session.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use async_channel::{Receiver, Sender};
use futures_util::StreamExt;
use vmd_client::{Client, ClientConfig, ClientError, ClientTls, ConnectOptions, error_chain};
use vmd_proto::{Bytes, HostInfo, OperationStatus, Role, VmInfo, VmName, WatchEvent};

use crate::model::{Action, Backoff, ChangeScope, Outcome};

/// How often the graphs are read while the window is visible.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// How long one graph read may take before it is given up.
const SAMPLE_DEADLINE: Duration = Duration::from_secs(5);

/// How long the panel waits for an accepted operation to end, in
/// milliseconds (the state follows the watch anyway).
const WAIT_OPERATION_MS: u32 = 120_000;

/// From the window to the link.
#[derive(Debug)]
pub enum ToLink {
    /// The window became visible (mapped, not minimised) or stopped being.
    Visible(bool),
    /// A button was pressed (and confirmed, where it asks).
    Act {
        /// The VM.
        vm: VmName,
        /// What to do.
        action: Action,
        /// For [`Action::Resize`]: new vCPUs and memory target.
        resize: (Option<u32>, Option<Bytes>),
    },
    /// "Retry now" on the cannot-reach screen.
    RetryNow,
}

/// From the link to the window.
#[derive(Debug)]
pub enum FromLink {
    /// Trying the endpoints.
    Connecting,
    /// A session started.
    Connected {
        /// The endpoint that answered.
        endpoint: String,
        /// Who the server says we are.
        identity: String,
        /// What that identity may do.
        role: Option<Role>,
    },
    /// No endpoint answered (or the session was refused).
    Unreachable {
        /// One line per endpoint tried: where, and why it failed.
        attempts: Vec<String>,
        /// When the next attempt goes out.
        retry_in: Duration,
    },
    /// A host read.
    Host(Box<HostInfo>),
    /// Which VMs the session may change; sent before each snapshot.
    Rights(ChangeScope),
    /// A watch answer (the first is a snapshot).
    Watch(WatchEvent),
    /// A graph read of one VM.
    Sample(Box<VmInfo>, Instant),
    /// What became of a button's change.
    Outcome(VmName, Box<Outcome>),
}

/// Where and as whom to connect.
#[derive(Debug)]
pub struct Settings {
    /// Endpoints, timeouts.
    pub config: ClientConfig,
    /// The client's TLS identity.
    pub tls: ClientTls,
}

/// Starts the link thread. It ends when `from_ui` is closed (the window
/// is gone) or `to_ui` is.
///
/// # Errors
/// If the thread or its runtime cannot be started.
pub fn spawn(
    settings: Settings,
    to_ui: Sender<FromLink>,
    from_ui: Receiver<ToLink>,
) -> std::io::Result<JoinHandle<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("vmd-link".into())
        .spawn(move || runtime.block_on(run(settings, to_ui, from_ui)))
}

/// Why a session ended.
enum End {
    /// The window is gone.
    Quit,
    /// The connection failed; reconnect.
    Lost(String),
}

async fn run(settings: Settings, to_ui: Sender<FromLink>, from_ui: Receiver<ToLink>) {
    let options = ConnectOptions {
        timeout: settings.config.connect_timeout,
        client_name: format!("vmd-panel/{}", env!("CARGO_PKG_VERSION")),
        ..ConnectOptions::default()
    };
    let mut visible = false;
    let mut backoff = Backoff::default();
    let mut lost: Option<String> = None;
    loop {
        // 1. Nothing goes out while the window cannot be seen.
        while !visible {
            match from_ui.recv().await {
                Ok(ToLink::Visible(v)) => visible = v,
                Ok(ToLink::Act { vm, action, .. }) => not_connected(&to_ui, vm, action).await,
                Ok(ToLink::RetryNow) => {}
                Err(_) => return,
            }
        }
        // 2. Connect.
        if to_ui.send(FromLink::Connecting).await.is_err() {
            return;
        }
        let mut attempts = Vec::new();
        if let Some(why) = lost.take() {
            attempts.push(format!("the session ended: {why}"));
        }
        let connected = Client::connect_any_reporting(
            &settings.config.endpoints,
            &settings.tls,
            &options,
            |endpoint, e| {
                let why = error_chain(e);
                let at = endpoint.to_string();
                attempts.push(if why.contains(&at) {
                    why
                } else {
                    format!("{at}: {why}")
                });
            },
        )
        .await;
        let client = match connected {
            Ok(client) if crate::model::may_read(client.welcome().role) => Some(client),
            Ok(client) => {
                let welcome = client.welcome();
                attempts.push(match welcome.role {
                    Some(role) => format!(
                        "{}: this certificate ({}) has the role {role}, which may not read VMs",
                        client.endpoint(),
                        welcome.identity
                    ),
                    None => format!(
                        "{}: the server grants this certificate ({}) no rights",
                        client.endpoint(),
                        welcome.identity
                    ),
                });
                client.close().await;
                None
            }
            Err(e) => {
                // A single endpoint's error and a refusal are not reported
                // through the callback.
                if attempts.iter().all(|a| a.starts_with("the session ended"))
                    || matches!(e, ClientError::Refused(_))
                {
                    attempts.push(error_chain(&e));
                }
                None
            }
        };
        let Some(client) = client else {
            let retry_in = backoff.next_delay();
            let sent = to_ui
                .send(FromLink::Unreachable { attempts, retry_in })
                .await;
            if sent.is_err() || !wait_retry(retry_in, &to_ui, &from_ui, &mut visible).await {
                return;
            }
            continue;
        };
        backoff.reset();
        let welcome = client.welcome().clone();
        let hello = FromLink::Connected {
            endpoint: client.endpoint().to_string(),
            identity: welcome.identity,
            role: welcome.role,
        };
        if to_ui.send(hello).await.is_err() {
            client.close().await;
            return;
        }
        // 3. and 4.
        match session(&client, &to_ui, &from_ui, &mut visible).await {
            End::Quit => {
                client.close().await;
                return;
            }
            End::Lost(why) => lost = Some(why),
        }
    }
}

/// Waits `delay` before the next attempt, or less if "retry now" is
/// pressed; keeps `visible` current. `false` when the window is gone.
async fn wait_retry(
    delay: Duration,
    to_ui: &Sender<FromLink>,
    from_ui: &Receiver<ToLink>,
    visible: &mut bool,
) -> bool {
    let sleep = tokio::time::sleep(delay);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            () = &mut sleep => return true,
            msg = from_ui.recv() => match msg {
                Ok(ToLink::Visible(v)) => *visible = v,
                Ok(ToLink::RetryNow) => return true,
                Ok(ToLink::Act { vm, action, .. }) => not_connected(to_ui, vm, action).await,
                Err(_) => return false,
            },
        }
    }
}

async fn not_connected(to_ui: &Sender<FromLink>, vm: VmName, action: Action) {
    let outcome = Outcome::Lost(action, "not connected to vmd".into());
    // The window may be gone; then nobody needs the answer.
    let _ = to_ui.send(FromLink::Outcome(vm, Box::new(outcome))).await;
}

/// One connected session: the watch, the graph reads, the buttons.
async fn session(
    client: &Client,
    to_ui: &Sender<FromLink>,
    from_ui: &Receiver<ToLink>,
    visible: &mut bool,
) -> End {
    let mut watch = client.watch_stream(Vec::new());
    let mut names: Vec<VmName> = Vec::new();
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            // The long-poll is only driven while visible: while hidden, an
            // answer waits in its slot and no next poll is sent.
            event = watch.next(), if *visible => match event {
                Some(Ok(event)) => {
                    if event.snapshot {
                        names.clear();
                        // A snapshot starts a session or follows an
                        // inventory change: ask again which VMs may be
                        // changed, before their rows are drawn.
                        let scope = match change_scope(client).await {
                            Ok(scope) => scope,
                            Err(e) => return End::Lost(error_chain(&e)),
                        };
                        if to_ui.send(FromLink::Rights(scope)).await.is_err() {
                            return End::Quit;
                        }
                    }
                    names.retain(|n| !event.removed.contains(n));
                    for vm in &event.changed {
                        if !names.contains(&vm.name) {
                            names.push(vm.name.clone());
                        }
                    }
                    if to_ui.send(FromLink::Watch(event)).await.is_err() {
                        return End::Quit;
                    }
                }
                Some(Err(e)) => return End::Lost(error_chain(&e)),
                None => return End::Lost("the watch ended".into()),
            },
            _ = tick.tick(), if *visible => {
                match tokio::time::timeout(SAMPLE_DEADLINE, sample(client, &names, to_ui)).await {
                    Ok(Ok(true)) => {}
                    Ok(Ok(false)) => return End::Quit,
                    Ok(Err(e)) => return End::Lost(error_chain(&e)),
                    Err(_) => return End::Lost("a graph read timed out".into()),
                }
            },
            msg = from_ui.recv() => match msg {
                Ok(ToLink::Visible(v)) => {
                    *visible = v;
                    if v {
                        tick.reset_immediately();
                    }
                }
                Ok(ToLink::Act { vm, action, resize }) => {
                    tokio::spawn(act(client.clone(), vm, action, resize, to_ui.clone()));
                }
                Ok(ToLink::RetryNow) => {}
                Err(_) => return End::Quit,
            },
        }
    }
}

/// Which VMs the session may change. A server that cannot say (older
/// than `Op::Rights`, or refusing it) leaves it to the role.
async fn change_scope(client: &Client) -> Result<ChangeScope, ClientError> {
    match client.rights().await {
        Ok(rights) => Ok(ChangeScope::Only(rights.changeable.into_iter().collect())),
        Err(ClientError::Server(_)) => Ok(ChangeScope::Unknown),
        Err(e) => Err(e),
    }
}

/// Reads the host and each VM once for the graphs. `Ok(false)` when the
/// window is gone. A VM that vanished meanwhile (`NotFound`) is skipped:
/// the watch removes its row.
async fn sample(
    client: &Client,
    names: &[VmName],
    to_ui: &Sender<FromLink>,
) -> Result<bool, ClientError> {
    let host = client.host().await?;
    if to_ui.send(FromLink::Host(Box::new(host))).await.is_err() {
        return Ok(false);
    }
    for name in names {
        match client.get_vm(name).await {
            Ok(info) => {
                let sample = FromLink::Sample(Box::new(info), Instant::now());
                if to_ui.send(sample).await.is_err() {
                    return Ok(false);
                }
            }
            Err(ClientError::Server(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Runs one button's change and reports its outcome, then its end.
async fn act(
    client: Client,
    vm: VmName,
    action: Action,
    (vcpus, memory): (Option<u32>, Option<Bytes>),
    to_ui: Sender<FromLink>,
) {
    let report = |outcome: Outcome| {
        let to_ui = to_ui.clone();
        let vm = vm.clone();
        async move {
            // The window may be gone; then nobody needs the answer.
            let _ = to_ui.send(FromLink::Outcome(vm, Box::new(outcome))).await;
        }
    };
    report(Outcome::Sent(action)).await;
    let answer = match action {
        Action::Start => client.start(&vm).await,
        Action::Stop => client.shutdown(&vm, false, None).await,
        Action::ForceStop => client.shutdown(&vm, true, None).await,
        Action::Restart => client.restart(&vm).await,
        Action::Pause => client.pause(&vm).await,
        Action::Resume => client.resume(&vm).await,
        Action::Resize => client.resize(&vm, vcpus, memory).await,
    };
    let op = match answer {
        Ok(op) => op,
        Err(ClientError::Server(e)) => return report(Outcome::Refused(action, e)).await,
        Err(e) => return report(Outcome::Lost(action, error_chain(&e))).await,
    };
    let id = op.id;
    let running = op.status == OperationStatus::Running;
    report(Outcome::from_operation(action, op)).await;
    if running {
        match client.wait_operation(id, WAIT_OPERATION_MS).await {
            Ok(op) => report(Outcome::from_operation(action, op)).await,
            Err(ClientError::Server(e)) => report(Outcome::Refused(action, e)).await,
            Err(e) => report(Outcome::Lost(action, error_chain(&e))).await,
        }
    }
}
