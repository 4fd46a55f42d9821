//! The connection: TLS, `Hello`, then requests matched to responses by id.
//!
//! 1. [`Client::connect`] opens the transport and the TLS session and
//!    exchanges `Hello`/`Welcome`, every step within the connect timeout.
//! 2. A driver task owns the connection. Calls reach it over a channel with
//!    a one-shot reply slot; it writes the request and files the slot under
//!    the request id, and routes each response to its slot. Any number of
//!    calls may be in flight (pipelining), from any number of tasks.
//! 3. When the connection fails every waiting call gets the error; when the
//!    last `Client` handle is dropped the driver closes the connection.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_util::codec::Framed;
use vmd_proto::codec::FrameCodec;
use vmd_proto::frame::{FrameError, MAX_REPLY_FRAME, MAX_REQUEST_FRAME};
use vmd_proto::{
    Bytes, ErrorReply, Hello, HelloReply, HostInfo, Op, OperationId, OperationInfo,
    PROTOCOL_VERSION, Reply, Request, Response, Rights, VmInfo, VmName, WatchEvent, Welcome,
};

use crate::endpoint::Endpoint;
use crate::tls::ClientTls;

/// Default bound on each connection step (transport, TLS, `Hello`).
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Default [`ConnectOptions::fallback_after`].
pub const DEFAULT_FALLBACK_AFTER: Duration = Duration::from_secs(1);

/// How many calls may wait for the driver to write them.
const QUEUE_DEPTH: usize = 64;

/// A call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The transport connection failed.
    #[error("cannot connect to {endpoint}")]
    Connect {
        /// Where.
        endpoint: Endpoint,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A connection step did not finish in time.
    #[error("{step} with {endpoint} timed out after {after:?}")]
    Timeout {
        /// Where.
        endpoint: Endpoint,
        /// Which step.
        step: &'static str,
        /// The limit.
        after: Duration,
    },
    /// The TLS session failed or was refused (bad or missing certificate,
    /// wrong server, …).
    #[error("TLS with {endpoint} failed")]
    Tls {
        /// Where.
        endpoint: Endpoint,
        /// Why; a `rustls::Error` inside for TLS-level refusals.
        #[source]
        source: io::Error,
    },
    /// The server refused the session (`Hello` answered with an error).
    #[error("server refused the session")]
    Refused(#[source] ErrorReply),
    /// The server answered the request with an error.
    #[error(transparent)]
    Server(#[from] ErrorReply),
    /// The peer sent something that is not the protocol.
    #[error("protocol error")]
    Protocol(#[source] FrameError),
    /// The server's answer did not match the request.
    #[error("unexpected reply to {0}")]
    UnexpectedReply(&'static str),
    /// The connection is closed.
    #[error("connection closed")]
    Closed,
    /// Every endpoint of a list failed; each error is listed.
    #[error("no endpoint reachable: {}", .0.iter().map(|e| crate::error_chain(e)).collect::<Vec<_>>().join("; "))]
    AllFailed(Vec<ClientError>),
}

impl ClientError {
    /// The rustls error behind a TLS failure, if there is one.
    pub fn rustls_error(&self) -> Option<&rustls::Error> {
        match self {
            ClientError::Tls { source, .. } => source.get_ref()?.downcast_ref(),
            ClientError::Protocol(FrameError::Io(source)) => source.get_ref()?.downcast_ref(),
            _ => None,
        }
    }
}

type Slot = oneshot::Sender<Result<Result<Reply, ErrorReply>, ClientError>>;

/// What the driver task is asked to do.
enum Command {
    /// Send a request; answer into the slot.
    Call(Op, Slot),
    /// Close the connection (TLS close_notify), then signal.
    Close(oneshot::Sender<()>),
}

/// A connected, authenticated session with vmd. Cheap to clone; clones
/// share the connection.
#[derive(Clone, Debug)]
pub struct Client {
    calls: mpsc::Sender<Command>,
    welcome: Arc<Welcome>,
    endpoint: Arc<Endpoint>,
}

/// Connection options.
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    /// Bound on each step (transport, TLS, `Hello`).
    pub timeout: Duration,
    /// Sent in `Hello`, for the server's log.
    pub client_name: String,
    /// Bound on opening the transport of an endpoint that is not the last
    /// of a list (at most `timeout`): a vsock port nobody serves gives no
    /// reset, so `auto` must move on to TCP quickly rather than wait.
    pub fallback_after: Duration,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_CONNECT_TIMEOUT,
            client_name: format!("vmd-client/{}", env!("CARGO_PKG_VERSION")),
            fallback_after: DEFAULT_FALLBACK_AFTER,
        }
    }
}

impl Client {
    /// Connects to one endpoint.
    ///
    /// # Errors
    /// [`ClientError`] for the step that failed.
    pub async fn connect(endpoint: &Endpoint, tls: &ClientTls) -> Result<Self, ClientError> {
        Self::connect_with(endpoint, tls, &ConnectOptions::default()).await
    }

    /// Tries each endpoint in order and returns the first session. Opening
    /// the transport of any but the last endpoint is bounded by
    /// `options.fallback_after`; every other step by `options.timeout`.
    ///
    /// # Errors
    /// [`ClientError::AllFailed`] with one error per endpoint (or the only
    /// error, for a single endpoint); [`ClientError::Refused`] at once if a
    /// server answered and said no (another endpoint would not help).
    pub async fn connect_any(
        endpoints: &[Endpoint],
        tls: &ClientTls,
        options: &ConnectOptions,
    ) -> Result<Self, ClientError> {
        Self::connect_any_reporting(endpoints, tls, options, |_, _| {}).await
    }

    /// [`Client::connect_any`], calling `failed` with each endpoint that
    /// could not be used before the one that worked (for a verbose CLI).
    ///
    /// # Errors
    /// As [`Client::connect_any`].
    pub async fn connect_any_reporting(
        endpoints: &[Endpoint],
        tls: &ClientTls,
        options: &ConnectOptions,
        mut failed: impl FnMut(&Endpoint, &ClientError),
    ) -> Result<Self, ClientError> {
        let mut errors = Vec::new();
        let last = endpoints.len().saturating_sub(1);
        for (i, endpoint) in endpoints.iter().enumerate() {
            let open_within = if i < last {
                options.fallback_after.min(options.timeout)
            } else {
                options.timeout
            };
            match Self::connect_bounded(endpoint, tls, options, open_within).await {
                Ok(client) => return Ok(client),
                Err(e @ ClientError::Refused(_)) => return Err(e),
                Err(e) => {
                    failed(endpoint, &e);
                    errors.push(e);
                }
            }
        }
        if errors.len() == 1 {
            return Err(errors.remove(0));
        }
        Err(ClientError::AllFailed(errors))
    }

    /// Connects to one endpoint with explicit options.
    ///
    /// # Errors
    /// [`ClientError`] for the step that failed.
    pub async fn connect_with(
        endpoint: &Endpoint,
        tls: &ClientTls,
        options: &ConnectOptions,
    ) -> Result<Self, ClientError> {
        Self::connect_bounded(endpoint, tls, options, options.timeout).await
    }

    /// Opens the transport within `open_within`, then the session.
    async fn connect_bounded(
        endpoint: &Endpoint,
        tls: &ClientTls,
        options: &ConnectOptions,
        open_within: Duration,
    ) -> Result<Self, ClientError> {
        let step = |step| ClientError::Timeout {
            endpoint: endpoint.clone(),
            step,
            after: open_within,
        };
        let connect_err = |source| ClientError::Connect {
            endpoint: endpoint.clone(),
            source,
        };
        match endpoint {
            Endpoint::Tcp { host, port } => {
                let stream = timeout(open_within, TcpStream::connect((host.as_str(), *port)))
                    .await
                    .map_err(|_| step("TCP connect"))?
                    .map_err(connect_err)?;
                stream.set_nodelay(true).map_err(connect_err)?;
                Self::handshake(stream, endpoint, tls, options).await
            }
            Endpoint::Vsock { cid, port } => {
                let addr = tokio_vsock::VsockAddr::new(*cid, *port);
                let stream = timeout(open_within, tokio_vsock::VsockStream::connect(addr))
                    .await
                    .map_err(|_| step("vsock connect"))?
                    .map_err(connect_err)?;
                Self::handshake(stream, endpoint, tls, options).await
            }
            Endpoint::HybridVsock { path, port } => {
                let stream = timeout(open_within, connect_hybrid(path, *port))
                    .await
                    .map_err(|_| step("hybrid vsock connect"))?
                    .map_err(connect_err)?;
                Self::handshake(stream, endpoint, tls, options).await
            }
        }
    }

    /// Runs the session (TLS and `Hello`) over a stream the caller opened,
    /// for transports this library does not dial itself. `endpoint` names
    /// it in errors.
    ///
    /// # Errors
    /// As [`Client::connect`].
    pub async fn over_stream<S>(
        stream: S,
        endpoint: &Endpoint,
        tls: &ClientTls,
        options: &ConnectOptions,
    ) -> Result<Self, ClientError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        Self::handshake(stream, endpoint, tls, options).await
    }

    /// TLS and `Hello` over an open transport stream.
    async fn handshake<S>(
        stream: S,
        endpoint: &Endpoint,
        tls: &ClientTls,
        options: &ConnectOptions,
    ) -> Result<Self, ClientError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let step = |step| ClientError::Timeout {
            endpoint: endpoint.clone(),
            step,
            after: options.timeout,
        };
        let tls_err = |source| ClientError::Tls {
            endpoint: endpoint.clone(),
            source,
        };
        let connector = TlsConnector::from(tls.config.clone());
        let stream = timeout(
            options.timeout,
            connector.connect(tls.server_name.clone(), stream),
        )
        .await
        .map_err(|_| step("TLS handshake"))?
        .map_err(tls_err)?;
        let mut framed = Framed::new(
            stream,
            FrameCodec::<HelloReply, Hello>::new(MAX_REPLY_FRAME, MAX_REQUEST_FRAME),
        );
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            client_name: options.client_name.clone(),
        };
        // In TLS 1.3 the server judges the client certificate after the
        // client's handshake is done, so a refusal surfaces here, as an
        // alert on the first read (or a failed write).
        let exchange = async {
            framed.send(&hello).await?;
            framed.next().await.transpose()
        };
        let reply = match timeout(options.timeout, exchange).await {
            Err(_) => return Err(step("Hello")),
            Ok(Err(FrameError::Io(e))) if is_tls_error(&e) => return Err(tls_err(e)),
            Ok(Err(e)) => return Err(ClientError::Protocol(e)),
            Ok(Ok(None)) => return Err(ClientError::Closed),
            Ok(Ok(Some(Err(undecodable)))) => return Err(ClientError::Protocol(undecodable.error)),
            Ok(Ok(Some(Ok(reply)))) => reply,
        };
        let welcome = reply.map_err(ClientError::Refused)?;
        let framed = framed.map_codec(FrameCodec::retype::<Response, Request>);
        let (calls, rx) = mpsc::channel(QUEUE_DEPTH);
        tokio::spawn(drive(framed, rx));
        Ok(Self {
            calls,
            welcome: Arc::new(welcome),
            endpoint: Arc::new(endpoint.clone()),
        })
    }

    /// What the server said when the session started.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// The endpoint this client is connected to.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Sends any request and waits for its reply.
    ///
    /// # Errors
    /// [`ClientError::Server`] when the server answers with an error; other
    /// variants when the connection fails.
    pub async fn call(&self, op: Op) -> Result<Reply, ClientError> {
        let (slot, reply) = oneshot::channel();
        self.calls
            .send(Command::Call(op, slot))
            .await
            .map_err(|_| ClientError::Closed)?;
        reply
            .await
            .map_err(|_| ClientError::Closed)??
            .map_err(ClientError::Server)
    }

    /// Closes the connection cleanly (for every clone of this client);
    /// calls still in flight fail with [`ClientError::Closed`].
    pub async fn close(self) {
        let (done, closed) = oneshot::channel();
        if self.calls.send(Command::Close(done)).await.is_ok() {
            let _ = closed.await;
        }
    }

    /// Host capabilities and resources.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub async fn host(&self) -> Result<HostInfo, ClientError> {
        match self.call(Op::Host).await? {
            Reply::Host(host) => Ok(host),
            _ => Err(ClientError::UnexpectedReply("host")),
        }
    }

    /// Every VM this client may see.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub async fn list_vms(&self) -> Result<Vec<VmInfo>, ClientError> {
        match self.call(Op::ListVms).await? {
            Reply::Vms(vms) => Ok(vms),
            _ => Err(ClientError::UnexpectedReply("list-vms")),
        }
    }

    /// What this session may do: its role and the VMs it may change.
    ///
    /// # Errors
    /// As [`Client::call`]; a server older than `Op::Rights` answers
    /// `Malformed`.
    pub async fn rights(&self) -> Result<Rights, ClientError> {
        match self.call(Op::Rights).await? {
            Reply::Rights(rights) => Ok(rights),
            _ => Err(ClientError::UnexpectedReply("rights")),
        }
    }

    /// One VM.
    ///
    /// # Errors
    /// As [`Client::call`]; `NotFound` for an unknown VM.
    pub async fn get_vm(&self, name: &VmName) -> Result<VmInfo, ClientError> {
        match self.call(Op::GetVm { name: name.clone() }).await? {
            Reply::Vm(vm) => Ok(vm),
            _ => Err(ClientError::UnexpectedReply("get-vm")),
        }
    }

    /// Starts a VM; returns the operation.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub async fn start(&self, name: &VmName) -> Result<OperationInfo, ClientError> {
        self.change(Op::Start { name: name.clone() }, "start").await
    }

    /// Shuts a VM down (gracefully, or killed with `force`).
    ///
    /// # Errors
    /// As [`Client::call`].
    pub async fn shutdown(
        &self,
        name: &VmName,
        force: bool,
        timeout_secs: Option<u32>,
    ) -> Result<OperationInfo, ClientError> {
        let op = Op::Shutdown {
            name: name.clone(),
            force,
            timeout_secs,
        };
        self.change(op, "shutdown").await
    }

    /// Restarts a VM.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub async fn restart(&self, name: &VmName) -> Result<OperationInfo, ClientError> {
        self.change(Op::Restart { name: name.clone() }, "restart")
            .await
    }

    /// Pauses a running VM.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub async fn pause(&self, name: &VmName) -> Result<OperationInfo, ClientError> {
        self.change(Op::Pause { name: name.clone() }, "pause").await
    }

    /// Resumes a paused VM.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub async fn resume(&self, name: &VmName) -> Result<OperationInfo, ClientError> {
        self.change(Op::Resume { name: name.clone() }, "resume")
            .await
    }

    /// Changes a running VM's vCPUs and/or memory.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub async fn resize(
        &self,
        name: &VmName,
        vcpus: Option<u32>,
        memory: Option<Bytes>,
    ) -> Result<OperationInfo, ClientError> {
        let op = Op::Resize {
            name: name.clone(),
            vcpus,
            memory,
        };
        self.change(op, "resize").await
    }

    /// Where an operation stands.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub async fn get_operation(&self, id: OperationId) -> Result<OperationInfo, ClientError> {
        match self.call(Op::GetOperation { id }).await? {
            Reply::Operation(op) => Ok(op),
            _ => Err(ClientError::UnexpectedReply("get-operation")),
        }
    }

    /// Waits (up to `timeout_ms`) for an operation to end.
    ///
    /// # Errors
    /// As [`Client::call`].
    pub async fn wait_operation(
        &self,
        id: OperationId,
        timeout_ms: u32,
    ) -> Result<OperationInfo, ClientError> {
        match self.call(Op::WaitOperation { id, timeout_ms }).await? {
            Reply::Operation(op) => Ok(op),
            _ => Err(ClientError::UnexpectedReply("wait-operation")),
        }
    }

    /// One long-poll: waits (up to `timeout_ms`, capped by the server)
    /// until a VM of `vms` (empty: every VM you may see) changed after
    /// generation `since` (0: answer at once with a full snapshot).
    ///
    /// # Errors
    /// As [`Client::call`].
    pub async fn watch(
        &self,
        since: u64,
        vms: Vec<VmName>,
        timeout_ms: u32,
    ) -> Result<WatchEvent, ClientError> {
        match self
            .call(Op::Watch {
                since,
                vms,
                timeout_ms,
            })
            .await?
        {
            Reply::Changed(event) => Ok(event),
            _ => Err(ClientError::UnexpectedReply("watch")),
        }
    }

    async fn change(&self, op: Op, what: &'static str) -> Result<OperationInfo, ClientError> {
        match self.call(op).await? {
            Reply::Accepted(op) => Ok(op),
            _ => Err(ClientError::UnexpectedReply(what)),
        }
    }
}

/// The hybrid vsock handshake: connect to the VM's unix socket, ask for
/// the guest port with `CONNECT <port>\n`, and accept any `OK ` reply line
/// (implementations differ in what follows `OK`). The line is read a byte
/// at a time so no TLS byte after it is consumed; it is capped at 64 bytes.
///
/// # Errors
/// The connect error, or `ConnectionRefused` when the other side does not
/// answer `OK` (nothing listens on that guest port).
pub async fn connect_hybrid(path: &std::path::Path, port: u32) -> io::Result<UnixStream> {
    use tokio::io::AsyncReadExt;
    let mut stream = UnixStream::connect(path).await?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await?;
    let mut line = Vec::with_capacity(16);
    loop {
        let byte = stream.read_u8().await?;
        if byte == b'\n' {
            break;
        }
        line.push(byte);
        if line.len() > 64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "hybrid vsock reply too long",
            ));
        }
    }
    if line.starts_with(b"OK ") {
        Ok(stream)
    } else {
        Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!(
                "hybrid vsock refused port {port}: {}",
                String::from_utf8_lossy(&line)
            ),
        ))
    }
}

/// Whether an I/O error carries a TLS-level failure (an alert, a bad
/// certificate) rather than a plain transport error.
fn is_tls_error(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>())
}

/// The driver task (step 2 and 3 of the module docs).
async fn drive<T>(
    mut framed: Framed<T, FrameCodec<Response, Request>>,
    mut calls: mpsc::Receiver<Command>,
) where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let ids = AtomicU32::new(1);
    let mut pending: HashMap<u32, Slot> = HashMap::new();
    let mut closed = None;
    loop {
        tokio::select! {
            call = calls.recv() => {
                let (body, slot) = match call {
                    Some(Command::Call(body, slot)) => (body, slot),
                    Some(Command::Close(done)) => {
                        closed = Some(done);
                        break;
                    }
                    // Every Client handle is gone.
                    None => break,
                };
                // Skip ids still in flight (after wrap-around).
                let mut id = ids.fetch_add(1, Ordering::Relaxed);
                while pending.contains_key(&id) {
                    id = ids.fetch_add(1, Ordering::Relaxed);
                }
                if let Err(e) = framed.send(&Request { id, body }).await {
                    let _ = slot.send(Err(ClientError::Protocol(e)));
                    break;
                }
                pending.insert(id, slot);
            }
            frame = framed.next() => match frame {
                Some(Ok(Ok(Response { id, result }))) => match pending.remove(&id) {
                    Some(slot) => {
                        let _ = slot.send(Ok(result));
                    }
                    // Not ours (id 0: the server could not read a request):
                    // the session is out of step, so end it.
                    None => break,
                },
                Some(Ok(Err(_)) | Err(_)) | None => break,
            },
        }
    }
    // Callers still waiting learn that the connection is gone.
    for (_, slot) in pending.drain() {
        let _ = slot.send(Err(ClientError::Closed));
    }
    let _ = timeout(Duration::from_secs(1), framed.get_mut().shutdown()).await;
    if let Some(done) = closed {
        let _ = done.send(());
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    use tokio::net::UnixListener;

    use super::*;

    /// A stand-in for the hypervisor's side of the hybrid handshake: reads
    /// the CONNECT line and answers `reply`.
    async fn responder(reply: &'static str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vm.vsock");
        let listener = UnixListener::bind(&path).expect("bind");
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.expect("accept");
            let mut stream = BufReader::new(stream);
            let mut line = String::new();
            stream.read_line(&mut line).await.expect("CONNECT line");
            assert_eq!(line, "CONNECT 9876\n");
            stream
                .get_mut()
                .write_all(reply.as_bytes())
                .await
                .expect("reply");
            // Keep the connection open until the client is done.
            let _ = stream.read_line(&mut line).await;
        });
        (dir, path)
    }

    #[tokio::test]
    async fn hybrid_handshake_accepts_any_ok_line() {
        let (_dir, path) = responder("OK 1073741824\n").await;
        connect_hybrid(&path, 9876).await.expect("connected");
    }

    #[tokio::test]
    async fn hybrid_handshake_refusal_is_an_error() {
        let (_dir, path) = responder("ERR no listener\n").await;
        let err = connect_hybrid(&path, 9876).await.expect_err("refused");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        assert!(err.to_string().contains("ERR no listener"), "{err}");
    }

    /// A hybrid socket that accepts and then never answers `CONNECT`.
    fn mute_listener(dir: &Path) -> PathBuf {
        let path = dir.join("mute.vsock");
        let listener = UnixListener::bind(&path).expect("bind");
        tokio::spawn(async move {
            while let Ok(conn) = listener.accept().await {
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    drop(conn);
                });
            }
        });
        path
    }

    fn tls_without_roots() -> ClientTls {
        let tls = crate::tls::builder()
            .expect("TLS 1.3")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        ClientTls::from_config(tls, "vmd").expect("tls")
    }

    #[tokio::test]
    async fn hybrid_connect_without_an_answer_is_bounded_by_the_timeout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = mute_listener(dir.path());
        let options = ConnectOptions {
            timeout: Duration::from_millis(200),
            ..ConnectOptions::default()
        };
        let endpoint = Endpoint::HybridVsock { path, port: 9876 };
        match Client::connect_with(&endpoint, &tls_without_roots(), &options).await {
            Err(ClientError::Timeout { step, .. }) => assert_eq!(step, "hybrid vsock connect"),
            other => panic!("expected a timeout, got {other:?}"),
        }
    }

    /// A list moves on from a mute endpoint after `fallback_after`, not the
    /// whole connect timeout; the last endpoint gets the full timeout.
    #[tokio::test]
    async fn a_mute_endpoint_is_left_after_the_fallback_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mute = Endpoint::HybridVsock {
            path: mute_listener(dir.path()),
            port: 9876,
        };
        let missing = Endpoint::HybridVsock {
            path: dir.path().join("absent.vsock"),
            port: 9876,
        };
        let options = ConnectOptions {
            timeout: Duration::from_secs(30),
            fallback_after: Duration::from_millis(100),
            ..ConnectOptions::default()
        };
        let mut reported = Vec::new();
        let err = Client::connect_any_reporting(
            &[mute.clone(), missing.clone()],
            &tls_without_roots(),
            &options,
            |endpoint, _| reported.push(endpoint.clone()),
        )
        .await
        .expect_err("neither endpoint serves");
        let ClientError::AllFailed(errors) = err else {
            panic!("expected AllFailed, got {err:?}");
        };
        match &errors[..] {
            [
                ClientError::Timeout { step, after, .. },
                ClientError::Connect { endpoint, .. },
            ] => {
                assert_eq!(
                    (*step, *after),
                    ("hybrid vsock connect", options.fallback_after)
                );
                assert_eq!(endpoint, &missing);
            }
            other => panic!("unexpected errors {other:?}"),
        }
        assert_eq!(reported, vec![mute, missing]);
    }
}
