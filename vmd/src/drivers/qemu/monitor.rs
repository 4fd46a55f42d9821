//! vmd's own QMP monitor of one QEMU VM, held for the VM's life.
//!
//! QEMU accepts several `-qmp` monitors and sends every event to each, so
//! vmd gets a socket no other tool uses (`<state_dir>/<name>/vmd-qmp.sock`)
//! and never queues behind microvm.nix's shutdown, ghaf-mem-manager or
//! vhotplug on the shared one.
//!
//! 1. [`attach`] connects, reads the greeting, negotiates and runs the
//!    initial queries, all within the driver's timeout.
//! 2. Then a task owns the connection: it writes the commands sent through
//!    [`Monitor`] handles with ids of its own and answers each caller when
//!    the reply with that id arrives; it turns the hypervisor's events into
//!    [`LiveEvent`]s as they come.
//! 3. EOF (the process is gone), a broken or hostile stream, or the last
//!    handle dropped ends the task: pending callers get
//!    [`BackendError::Unavailable`], and [`LiveEvent::Gone`] is reported
//!    last. Nothing is polled: an idle VM costs no wakeup.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, LinesCodec};

use super::{Execute, MAX_LINE, Message, Session, balloon, query, reply, set_vcpus};
use crate::drivers::{BackendError, Control, LiveEvent, LiveEvents, LiveState, RunState};

/// Commands waiting to be written; a caller beyond this waits its turn.
const QUEUE: usize = 16;

/// A command for the monitor's task.
#[derive(Debug)]
struct Command {
    execute: String,
    arguments: Option<Value>,
    reply: oneshot::Sender<Result<Value, BackendError>>,
}

/// A handle to vmd's monitor of one VM: commands go over the held
/// connection. Cheap to clone; the connection closes when the last handle
/// drops or the VM's process goes away.
#[derive(Clone, Debug)]
pub struct Monitor {
    commands: mpsc::Sender<Command>,
    socket: PathBuf,
    timeout: Duration,
}

/// Attaches to the monitor at `socket` (module docs, step 1) and starts its
/// task; returns the handle and the live facts at attach.
///
/// # Errors
/// [`BackendError::Unavailable`] if nothing listens there,
/// [`BackendError::Timeout`] past `timeout`, [`BackendError::Protocol`] if
/// the peer does not speak QMP.
pub async fn attach(
    socket: &Path,
    events: LiveEvents,
    timeout: Duration,
) -> Result<(Monitor, LiveState), BackendError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let timed_out = || BackendError::Timeout(format!("QMP monitor {}", socket.display()));
    let stream = tokio::time::timeout_at(deadline, UnixStream::connect(socket))
        .await
        .map_err(|_| timed_out())?
        .map_err(|e| {
            tracing::debug!(socket = %socket.display(), error = %e, "monitor connect failed");
            BackendError::Unavailable(format!("QMP monitor {}", socket.display()))
        })?;
    let mut session = tokio::time::timeout_at(deadline, Session::open(stream, socket))
        .await
        .map_err(|_| timed_out())??;
    let live = tokio::time::timeout_at(deadline, query(&mut session))
        .await
        .map_err(|_| timed_out())??;
    let (tx, rx) = mpsc::channel(QUEUE);
    // The reader keeps what it has buffered past the last reply.
    tokio::spawn(serve(session.stream, socket.to_owned(), rx, events));
    tracing::debug!(socket = %socket.display(), "QMP monitor attached");
    Ok((
        Monitor {
            commands: tx,
            socket: socket.to_owned(),
            timeout,
        },
        live,
    ))
}

/// The task that owns the connection (module docs, steps 2 and 3).
async fn serve(
    stream: tokio::io::BufReader<UnixStream>,
    socket: PathBuf,
    mut commands: mpsc::Receiver<Command>,
    events: LiveEvents,
) {
    let (read, mut write) = tokio::io::split(stream);
    let mut lines = FramedRead::new(read, LinesCodec::new_with_max_length(MAX_LINE));
    let mut pending: HashMap<u64, (String, oneshot::Sender<Result<Value, BackendError>>)> =
        HashMap::new();
    let mut next_id: u64 = 0;
    let why = loop {
        tokio::select! {
            line = lines.next() => {
                let text = match line {
                    None => break "closed".to_owned(),
                    Some(Err(e)) => break e.to_string(),
                    Some(Ok(text)) => text,
                };
                let message: Message = match serde_json::from_str(&text) {
                    Ok(message) => message,
                    Err(e) => break format!("invalid message: {e}"),
                };
                if let Some(event) = &message.event {
                    if let Some(live) = live_event(event, &text) {
                        events(live);
                    }
                    continue;
                }
                let Some((command, caller)) = message
                    .id
                    .as_ref()
                    .and_then(Value::as_u64)
                    .and_then(|id| pending.remove(&id))
                else {
                    break format!("a reply with an unknown id {:?}", message.id);
                };
                // The caller may have given up (its deadline); that is fine.
                let _ = caller.send(reply(message, &command, &socket));
            }
            command = commands.recv() => {
                let Some(command) = command else {
                    break "released".to_owned();
                };
                next_id += 1;
                let mut request = json!({ "execute": command.execute, "id": next_id });
                if let Some(arguments) = command.arguments {
                    request["arguments"] = arguments;
                }
                let mut bytes = request.to_string().into_bytes();
                bytes.push(b'\n');
                if let Err(e) = write.write_all(&bytes).await {
                    let _ = command.reply.send(Err(gone(&socket)));
                    break e.to_string();
                }
                pending.insert(next_id, (command.execute, command.reply));
            }
        }
    };
    tracing::debug!(socket = %socket.display(), why, "QMP monitor ended");
    for (_, (_, caller)) in pending.drain() {
        let _ = caller.send(Err(gone(&socket)));
    }
    events(LiveEvent::Gone);
}

/// What a QMP event means for the live facts; `None` for events that change
/// none of them.
fn live_event(event: &str, text: &str) -> Option<LiveEvent> {
    Some(match event {
        "STOP" => LiveEvent::RunState(RunState::Paused),
        "RESUME" => LiveEvent::RunState(RunState::Running),
        "SHUTDOWN" => LiveEvent::RunState(RunState::Shutdown),
        "GUEST_PANICKED" => LiveEvent::RunState(RunState::Other("guest-panicked".into())),
        "BALLOON_CHANGE" => {
            let value: Value = serde_json::from_str(text).ok()?;
            LiveEvent::BalloonActual(value.get("data")?.get("actual")?.as_u64()?)
        }
        "RESET"
        | "DEVICE_DELETED"
        | "ACPI_DEVICE_OST"
        | "MEMORY_DEVICE_SIZE_CHANGE"
        | "DEVICE_UNPLUG_GUEST_ERROR" => LiveEvent::Changed,
        _ => return None,
    })
}

fn gone(socket: &Path) -> BackendError {
    BackendError::Unavailable(format!("QMP monitor {} (closed)", socket.display()))
}

impl Execute for Monitor {
    async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, BackendError> {
        let (reply, answer) = oneshot::channel();
        let command = Command {
            execute: command.to_owned(),
            arguments,
            reply,
        };
        let work = async {
            self.commands
                .send(command)
                .await
                .map_err(|_| gone(&self.socket))?;
            answer.await.map_err(|_| gone(&self.socket))?
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| BackendError::Timeout(format!("QMP monitor {}", self.socket.display())))?
    }
}

impl Control for Monitor {
    fn query(&self) -> BoxFuture<'_, Result<LiveState, BackendError>> {
        let mut monitor = self.clone();
        Box::pin(async move { query(&mut monitor).await })
    }

    fn pause(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        let mut monitor = self.clone();
        Box::pin(async move { monitor.execute("stop", None).await.map(drop) })
    }

    fn resume(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        let mut monitor = self.clone();
        Box::pin(async move { monitor.execute("cont", None).await.map(drop) })
    }

    fn set_vcpus(&self, count: u32) -> BoxFuture<'_, Result<(), BackendError>> {
        let mut monitor = self.clone();
        Box::pin(async move { set_vcpus(&mut monitor, count).await })
    }

    fn set_balloon(&self, bytes: u64) -> BoxFuture<'_, Result<(), BackendError>> {
        let mut monitor = self.clone();
        Box::pin(async move { balloon(&mut monitor, bytes).await })
    }

    fn powerdown(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        let mut monitor = self.clone();
        Box::pin(async move { monitor.execute("system_powerdown", None).await.map(drop) })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::UnixListener;

    use super::*;

    /// A fake QEMU monitor that answers every command with `{}` (and
    /// `query-status` with running), then sends `extra` lines after the
    /// first command that follows negotiation and the initial queries.
    async fn fake(dir: &Path, after_setup: Vec<String>) -> PathBuf {
        let path = dir.join("vmd-qmp.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let (read, mut write) = stream.into_split();
            let mut lines = BufReader::new(read).lines();
            write
                .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .await
                .expect("greet");
            let mut after = Some(after_setup);
            while let Ok(Some(line)) = lines.next_line().await {
                let request: Value = serde_json::from_str(&line).expect("json");
                let id = request["id"].clone();
                let command = request["execute"].as_str().unwrap_or_default().to_owned();
                let ret = match command.as_str() {
                    "query-status" => json!({"status": "running", "running": true}),
                    "query-cpus-fast" => json!([{}, {}]),
                    "query-balloon" => json!({"actual": 268_435_456_u64}),
                    "query-hotpluggable-cpus" | "qom-list" => json!([]),
                    "query-memory-size-summary" => json!({"base-memory": 268_435_456_u64}),
                    _ => json!({}),
                };
                let reply = json!({"return": ret, "id": id}).to_string() + "\n";
                write.write_all(reply.as_bytes()).await.expect("reply");
                if command == "cont" {
                    for line in after.take().unwrap_or_default() {
                        write.write_all(line.as_bytes()).await.expect("event");
                    }
                    // Then QEMU exits.
                    break;
                }
            }
        });
        path
    }

    #[tokio::test]
    async fn events_are_reported_and_eof_is_gone() {
        let dir = tempfile::tempdir().expect("dir");
        let socket = fake(
            dir.path(),
            vec![
                "{\"event\": \"STOP\", \"data\": {}}\n".into(),
                "{\"event\": \"BALLOON_CHANGE\", \"data\": {\"actual\": 1048576}}\n".into(),
                "{\"event\": \"VNC_CONNECTED\", \"data\": {}}\n".into(),
            ],
        )
        .await;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink: LiveEvents = {
            let seen = Arc::clone(&seen);
            Arc::new(move |event| seen.lock().expect("lock").push(event))
        };
        let (monitor, live) = attach(&socket, sink, Duration::from_secs(5))
            .await
            .expect("attached");
        assert_eq!(live.run_state, Some(RunState::Running));
        assert_eq!(live.vcpus, Some(2));
        assert_eq!(live.balloon_actual, Some(268_435_456));
        monitor.resume().await.expect("cont answered");
        // The task ends on EOF and reports Gone last.
        for _ in 0..100 {
            if seen.lock().expect("lock").last() == Some(&LiveEvent::Gone) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            *seen.lock().expect("lock"),
            [
                LiveEvent::RunState(RunState::Paused),
                LiveEvent::BalloonActual(1_048_576),
                LiveEvent::Gone
            ]
        );
        assert!(matches!(
            monitor.pause().await,
            Err(BackendError::Unavailable(_))
        ));
    }

    #[tokio::test]
    async fn nothing_listening_is_unavailable() {
        let dir = tempfile::tempdir().expect("dir");
        let error = attach(
            &dir.path().join("none.sock"),
            Arc::new(|_| {}),
            Duration::from_secs(1),
        )
        .await
        .expect_err("no monitor");
        assert!(matches!(error, BackendError::Unavailable(_)), "{error}");
    }
}
