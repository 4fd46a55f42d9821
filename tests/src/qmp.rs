//! Another QMP client on a VM's main socket, as the other programs of a
//! Ghaf host are: microvm.nix's `microvm-balloon`, Ghaf's
//! `ghaf-mem-manager` (every second) and `vhotplug` (`device_add`,
//! `device_del`). A QEMU socket chardev serves one client at a time, so
//! while one of them holds the socket, every other client waits in the
//! listen backlog.
//!
//! 1. [`QmpClient::connect`] connects, reads the greeting and negotiates
//!    (`qmp_capabilities`) within a patience; a socket held by someone
//!    else accepts the connection but sends no greeting, which ends in
//!    [`QmpError::Timeout`].
//! 2. [`QmpClient::execute`] sends one command and returns its `return`,
//!    keeping the events that arrive meanwhile.
//! 3. [`HeldSocket::hold`] negotiates and then holds the session for a
//!    while (reading events, sending nothing), until released or dropped.
//!
//! Nothing here panics on what a socket may do: errors are values.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// What went wrong with a QMP session.
#[derive(Debug)]
pub enum QmpError {
    /// The socket could not be connected to (no QEMU, stale file).
    Connect(PathBuf, std::io::Error),
    /// No greeting or answer within the patience (someone else holds
    /// the socket, or QEMU hangs).
    Timeout(&'static str),
    /// QEMU closed the connection (it exited).
    Closed,
    /// Reading or writing failed.
    Io(std::io::Error),
    /// A line was not QMP's JSON.
    Protocol(String),
    /// QEMU answered the command with an error.
    Command {
        /// QMP's error class.
        class: String,
        /// Its description.
        desc: String,
    },
}

impl fmt::Display for QmpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connect(path, e) => write!(f, "cannot connect to {}: {e}", path.display()),
            Self::Timeout(what) => write!(f, "no {what} in time"),
            Self::Closed => f.write_str("QEMU closed the connection"),
            Self::Io(e) => write!(f, "QMP I/O: {e}"),
            Self::Protocol(line) => write!(f, "not QMP: {line}"),
            Self::Command { class, desc } => write!(f, "QMP error {class}: {desc}"),
        }
    }
}

impl std::error::Error for QmpError {}

/// A negotiated QMP session.
#[derive(Debug)]
pub struct QmpClient {
    lines: Lines<BufReader<OwnedReadHalf>>,
    write: OwnedWriteHalf,
    events: Vec<Value>,
    patience: Duration,
}

impl QmpClient {
    /// Connects to `socket`, reads the greeting and negotiates, each step
    /// within `patience`.
    ///
    /// # Errors
    /// [`QmpError`] if any step fails or takes longer.
    pub async fn connect(socket: &Path, patience: Duration) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|e| QmpError::Connect(socket.to_owned(), e))?;
        let (read, write) = stream.into_split();
        let mut client = Self {
            lines: BufReader::new(read).lines(),
            write,
            events: Vec::new(),
            patience,
        };
        // QEMU first writes what the previous client left unread (an
        // event emitted as it left); keep such events, as any other.
        loop {
            let greeting = client.next("greeting").await?;
            if greeting.get("QMP").is_some() {
                break;
            }
            if greeting.get("event").is_none() {
                return Err(QmpError::Protocol(greeting.to_string()));
            }
            client.events.push(greeting);
        }
        client.execute("qmp_capabilities", None).await?;
        Ok(client)
    }

    /// Runs `command` (with `arguments`) and returns its `return` value.
    ///
    /// # Errors
    /// [`QmpError::Command`] if QEMU refuses it, others if the session
    /// breaks or QEMU does not answer within the patience.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let mut request = json!({ "execute": command });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        self.write
            .write_all(line.as_bytes())
            .await
            .map_err(QmpError::Io)?;
        loop {
            let message = self.next("answer").await?;
            if let Some(ret) = message.get("return") {
                return Ok(ret.clone());
            }
            if let Some(error) = message.get("error") {
                return Err(QmpError::Command {
                    class: error["class"].as_str().unwrap_or_default().to_owned(),
                    desc: error["desc"].as_str().unwrap_or_default().to_owned(),
                });
            }
            self.events.push(message);
        }
    }

    /// The events seen so far.
    pub fn events(&self) -> &[Value] {
        &self.events
    }

    /// Waits for the next event (or returns one already seen and not yet
    /// taken), within the patience.
    ///
    /// # Errors
    /// As [`QmpClient::execute`].
    pub async fn next_event(&mut self) -> Result<Value, QmpError> {
        if !self.events.is_empty() {
            return Ok(self.events.remove(0));
        }
        loop {
            let message = self.next("event").await?;
            if message.get("event").is_some() {
                return Ok(message);
            }
        }
    }

    async fn next(&mut self, what: &'static str) -> Result<Value, QmpError> {
        let line = tokio::time::timeout(self.patience, self.lines.next_line())
            .await
            .map_err(|_| QmpError::Timeout(what))?
            .map_err(QmpError::Io)?
            .ok_or(QmpError::Closed)?;
        serde_json::from_str(&line).map_err(|_| QmpError::Protocol(line))
    }
}

/// A QMP session held open by the test, as `ghaf-mem-manager` or a
/// `microvm-shutdown` waiting for QEMU to exit holds it. Released after
/// its time, by [`HeldSocket::release`], or when dropped.
#[derive(Debug)]
pub struct HeldSocket {
    release: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<Vec<Value>, QmpError>>,
}

impl HeldSocket {
    /// Connects and negotiates (within `patience`), then holds the
    /// session for `hold`; returns once it is held.
    ///
    /// # Errors
    /// As [`QmpClient::connect`].
    pub async fn hold(socket: &Path, hold: Duration, patience: Duration) -> Result<Self, QmpError> {
        let client = QmpClient::connect(socket, patience).await?;
        let (release, released) = oneshot::channel();
        let task = tokio::spawn(async move {
            // The whole session moves in, its write half too: dropping
            // that would shut the connection's sending side, and QEMU
            // closes a session whose client stopped sending.
            let mut client = client;
            let until = tokio::time::sleep(hold);
            tokio::pin!(until);
            tokio::pin!(released);
            loop {
                tokio::select! {
                    () = &mut until => break,
                    _ = &mut released => break,
                    line = client.lines.next_line() => match line {
                        Ok(Some(line)) => {
                            if let Ok(event) = serde_json::from_str(&line) {
                                client.events.push(event);
                            }
                        }
                        Ok(None) => return Err(QmpError::Closed),
                        Err(e) => return Err(QmpError::Io(e)),
                    },
                }
            }
            Ok(client.events)
        });
        Ok(Self {
            release: Some(release),
            task,
        })
    }

    /// Whether the session is still held (its time has not run out and
    /// QEMU has not closed it).
    pub fn is_held(&self) -> bool {
        !self.task.is_finished()
    }

    /// Releases the socket now; returns the events seen while it was held.
    ///
    /// # Errors
    /// [`QmpError::Closed`] or [`QmpError::Io`] if QEMU ended the session
    /// before.
    pub async fn release(mut self) -> Result<Vec<Value>, QmpError> {
        if let Some(release) = self.release.take() {
            let _ = release.send(());
        }
        match (&mut self.task).await {
            Ok(result) => result,
            Err(e) => Err(QmpError::Io(std::io::Error::other(e))),
        }
    }
}

impl Drop for HeldSocket {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            let _ = release.send(());
        }
    }
}
