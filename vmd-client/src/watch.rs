//! Following VMs without polling: a chain of `Watch` long-polls.
//!
//! 1. The first request asks with `since = 0`; the server answers at once
//!    with a snapshot of every watched VM ([`WatchEvent::snapshot`] set).
//! 2. Each next request passes the generation of the last answer; the
//!    server holds it until a watched VM changes or the wait ends.
//! 3. An answer with nothing in it (the wait ended) is not yielded; the
//!    next long-poll goes out at once: there is no pause between polls.
//! 4. The first error ends the watch: a [`Watcher`] then yields `None`.
//!    The caller decides whether to reconnect and start from a snapshot.
//!
//! Every long-poll has a deadline of its requested wait plus
//! [`WATCH_GRACE`]: a server that stays silent past it is taken for gone.

use std::time::Duration;

use futures_util::Stream;
use tokio::time::timeout;
use vmd_proto::{VmName, WatchEvent};

use crate::client::{Client, ClientError};

/// Default longest wait of one long-poll: vmd's own cap (300 s), so an
/// idle watch costs the daemon one wake-up per five minutes (the server
/// may cap it lower).
pub const DEFAULT_WATCH_WAIT: Duration = Duration::from_secs(300);

/// How long past the requested wait an answer may take before the watch
/// fails with [`ClientError::Timeout`].
pub const WATCH_GRACE: Duration = Duration::from_secs(15);

/// A watch on some VMs (or all the client may see): yields the initial
/// snapshot, then each change, until the first error.
#[derive(Debug)]
pub struct Watcher {
    client: Client,
    vms: Vec<VmName>,
    since: u64,
    wait: Duration,
    ended: bool,
}

impl Watcher {
    /// A watch on `vms` (empty: every VM the client may see). Nothing is
    /// sent until the first [`Watcher::next`].
    pub fn new(client: Client, vms: Vec<VmName>) -> Self {
        Self {
            client,
            vms,
            since: 0,
            wait: DEFAULT_WATCH_WAIT,
            ended: false,
        }
    }

    /// Asks the server to hold each long-poll at most `wait` (default
    /// [`DEFAULT_WATCH_WAIT`]; at most `u32::MAX` milliseconds).
    #[must_use]
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// The generation of the last answer (0 before the first).
    pub fn generation(&self) -> u64 {
        self.since
    }

    /// The next snapshot or change: the first call answers with the
    /// snapshot, later calls as soon as a watched VM changes. `None` once
    /// an error has been yielded.
    pub async fn next(&mut self) -> Option<Result<WatchEvent, ClientError>> {
        if self.ended {
            return None;
        }
        let wait_ms = u32::try_from(self.wait.as_millis()).unwrap_or(u32::MAX);
        let deadline = Duration::from_millis(u64::from(wait_ms)) + WATCH_GRACE;
        loop {
            let poll = self.client.watch(self.since, self.vms.clone(), wait_ms);
            let result = match timeout(deadline, poll).await {
                Ok(result) => result,
                Err(_) => Err(ClientError::Timeout {
                    endpoint: self.client.endpoint().clone(),
                    step: "watch",
                    after: deadline,
                }),
            };
            match result {
                Ok(event) => {
                    self.since = event.generation;
                    if event.snapshot || !event.changed.is_empty() || !event.removed.is_empty() {
                        return Some(Ok(event));
                    }
                }
                Err(e) => {
                    self.ended = true;
                    return Some(Err(e));
                }
            }
        }
    }

    /// The watch as a [`Stream`], for `select!` loops and combinators.
    /// Polling it is cancel-safe: a long-poll in flight when a `select!`
    /// takes another branch stays in flight, and is not sent again.
    pub fn into_stream(self) -> impl Stream<Item = Result<WatchEvent, ClientError>> + Send + Unpin {
        Box::pin(futures_util::stream::unfold(
            self,
            |mut watcher| async move {
                let item = watcher.next().await?;
                Some((item, watcher))
            },
        ))
    }
}

impl Client {
    /// A [`Watcher`] on `vms` (empty: every VM you may see) over this
    /// connection; other calls on it go on being served meanwhile.
    pub fn watcher(&self, vms: Vec<VmName>) -> Watcher {
        Watcher::new(self.clone(), vms)
    }

    /// The snapshot of `vms` (empty: every VM you may see), then every
    /// change, as a stream that ends after its first error.
    pub fn watch_stream(
        &self,
        vms: Vec<VmName>,
    ) -> impl Stream<Item = Result<WatchEvent, ClientError>> + Send + Unpin + use<> {
        self.watcher(vms).into_stream()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures_util::{SinkExt, StreamExt};
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    use tokio::sync::mpsc;
    use tokio_util::codec::Framed;
    use vmd_proto::codec::FrameCodec;
    use vmd_proto::frame::{MAX_REPLY_FRAME, MAX_REQUEST_FRAME};
    use vmd_proto::{
        ErrorReply, Hello, HelloReply, Op, Reply, Request, Response, VmInfo, VmState, Welcome,
    };

    use super::*;
    use crate::client::ConnectOptions;
    use crate::endpoint::Endpoint;
    use crate::tls::{ALPN, ClientTls};

    /// What the fake server does with the next request.
    #[allow(clippy::large_enum_variant)] // a test script of a few steps
    enum Step {
        Answer(Result<Reply, ErrorReply>),
        /// Never answer (the connection stays open).
        Hold,
    }

    /// A vmd stand-in over an in-memory pipe with real TLS: it starts the
    /// session, answers each request with the next step of `script`,
    /// reports each request's body on the returned channel, and closes
    /// the connection after the script.
    async fn fake_server(script: Vec<Step>) -> (Client, mpsc::UnboundedReceiver<Op>) {
        let issued = rcgen::generate_simple_self_signed(vec!["vmd".to_owned()]).expect("cert");
        let cert: CertificateDer<'static> = issued.cert.der().clone();
        let key =
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(issued.signing_key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .expect("server certificate");
        server.alpn_protocols = vec![ALPN.to_vec()];
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).expect("root");
        let client_tls = crate::tls::builder()
            .expect("TLS 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let client_tls = ClientTls::from_config(client_tls, "vmd").expect("client TLS");

        let (near, far) = tokio::io::duplex(64 * 1024);
        let (seen, requests) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
            let stream = acceptor.accept(far).await.expect("TLS accept");
            let mut framed = Framed::new(
                stream,
                FrameCodec::<Hello, HelloReply>::new(MAX_REQUEST_FRAME, MAX_REPLY_FRAME),
            );
            let _hello = framed.next().await.expect("Hello").expect("frame");
            let welcome: HelloReply = Ok(Welcome {
                protocol: vmd_proto::PROTOCOL_VERSION,
                server_version: "fake".into(),
                identity: "tester".into(),
                role: None,
            });
            framed.send(&welcome).await.expect("Welcome");
            let mut framed = framed.map_codec(FrameCodec::retype::<Request, Response>);
            let mut held = Vec::new();
            for step in script {
                let Some(Ok(Ok(request))) = framed.next().await else {
                    return;
                };
                let _ = seen.send(request.body);
                match step {
                    Step::Answer(result) => {
                        let response = Response {
                            id: request.id,
                            result,
                        };
                        framed.send(&response).await.expect("response");
                    }
                    Step::Hold => held.push(request.id),
                }
            }
            if !held.is_empty() {
                // Hold the connection open, answering nothing more.
                std::future::pending::<()>().await;
            }
        });
        let endpoint = Endpoint::Tcp {
            host: "fake".into(),
            port: 1,
        };
        let client = Client::over_stream(near, &endpoint, &client_tls, &ConnectOptions::default())
            .await
            .expect("session");
        (client, requests)
    }

    fn vm(name: &str, state: VmState) -> VmInfo {
        VmInfo::new(VmName::new(name).expect("valid name"), state)
    }

    fn event(generation: u64, snapshot: bool, changed: Vec<VmInfo>) -> Step {
        Step::Answer(Ok(Reply::Changed(WatchEvent {
            generation,
            snapshot,
            changed,
            removed: Vec::new(),
        })))
    }

    /// The `(since, vms)` of each request the server saw.
    fn polls(requests: &mut mpsc::UnboundedReceiver<Op>) -> Vec<(u64, Vec<VmName>)> {
        let mut seen = Vec::new();
        while let Ok(op) = requests.try_recv() {
            match op {
                Op::Watch { since, vms, .. } => seen.push((since, vms)),
                other => panic!("expected Watch, got {other:?}"),
            }
        }
        seen
    }

    #[tokio::test]
    async fn snapshot_then_changes_with_timeouts_skipped_until_an_error() {
        let (client, mut requests) = fake_server(vec![
            event(3, true, vec![vm("a", VmState::Stopped)]),
            event(3, false, Vec::new()),
            event(3, false, Vec::new()),
            event(5, false, vec![vm("a", VmState::Running)]),
        ])
        .await;
        let only_a = vec![VmName::new("a").expect("valid")];
        let mut watcher = client.watcher(only_a.clone());

        let first = watcher.next().await.expect("an item").expect("snapshot");
        assert!(first.snapshot);
        assert_eq!(first.changed[0].state, VmState::Stopped);
        // The two empty answers are skipped; the change comes next.
        let second = watcher.next().await.expect("an item").expect("change");
        assert_eq!((second.generation, second.snapshot), (5, false));
        assert_eq!(second.changed[0].state, VmState::Running);
        assert_eq!(watcher.generation(), 5);
        // The server closes after its script: the error ends the watch.
        match watcher.next().await {
            Some(Err(ClientError::Closed)) => {}
            other => panic!("expected the connection closed, got {other:?}"),
        }
        assert!(watcher.next().await.is_none());

        let since: Vec<u64> = polls(&mut requests)
            .into_iter()
            .map(|(since, vms)| {
                assert_eq!(vms, only_a);
                since
            })
            .collect();
        assert_eq!(&since[..4], &[0, 3, 3, 3]);
    }

    #[tokio::test]
    async fn an_empty_snapshot_is_yielded() {
        let (client, _requests) = fake_server(vec![event(1, true, Vec::new())]).await;
        let first = client.watch_stream(Vec::new()).next().await;
        let first = first.expect("an item").expect("snapshot");
        assert!(first.snapshot && first.changed.is_empty());
    }

    #[tokio::test]
    async fn a_server_error_ends_the_stream() {
        let limit = ErrorReply::LimitExceeded {
            limit: "watchers".into(),
            retry_after_ms: None,
        };
        let (client, _requests) = fake_server(vec![Step::Answer(Err(limit.clone()))]).await;
        let items: Vec<_> = client.watch_stream(Vec::new()).collect().await;
        match &items[..] {
            [Err(ClientError::Server(e))] => assert_eq!(e, &limit),
            other => panic!("expected one server error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_reply_of_the_wrong_kind_ends_the_stream() {
        let (client, _requests) = fake_server(vec![Step::Answer(Ok(Reply::Vms(Vec::new())))]).await;
        let items: Vec<_> = client.watch_stream(Vec::new()).collect().await;
        assert!(
            matches!(&items[..], [Err(ClientError::UnexpectedReply("watch"))]),
            "{items:?}"
        );
    }

    /// A server that holds a long-poll past its wait plus the grace is
    /// taken for gone (virtual time: the test does not wait it out).
    #[tokio::test(start_paused = true)]
    async fn a_silent_server_times_the_watch_out() {
        let (client, _requests) = fake_server(vec![event(2, true, Vec::new()), Step::Hold]).await;
        let mut watcher = client.watcher(Vec::new()).wait(Duration::from_secs(1));
        watcher.next().await.expect("an item").expect("snapshot");
        match watcher.next().await {
            Some(Err(ClientError::Timeout { step, after, .. })) => {
                assert_eq!(
                    (step, after),
                    ("watch", Duration::from_secs(1) + WATCH_GRACE)
                );
            }
            other => panic!("expected a timeout, got {other:?}"),
        }
        assert!(watcher.next().await.is_none());
    }
}
