//! One client connection, generic over the transport stream.
//!
//! 1. TLS handshake (TLS 1.3, client certificate required) within the
//!    handshake timeout; a failed or slow handshake just closes.
//! 2. The verified certificate names the peer ([`PeerIdentity`]); peer and
//!    identity go on the connection's tracing span, which every request
//!    span nests in. The policy admits the peer (key pin, transport, vsock
//!    CID binding) and grants it a role and scopes; refusals are audited.
//! 3. `Hello` → `Welcome`, also within the handshake timeout. A wrong
//!    protocol version, an unreadable `Hello` or a policy refusal gets an
//!    error reply, then the connection closes.
//! 4. Requests are read and handled concurrently (pipelining), at most
//!    `max_in_flight` at a time; responses go out as they finish, each
//!    carrying its request id. Responses that finish together are written
//!    together: one TLS record and one write for the batch. A framed-but-undecodable request gets a
//!    `Malformed` reply and the connection goes on; an oversized length
//!    prefix gets a `Malformed` reply and closes (the stream is no longer
//!    in sync).
//! 5. The connection closes when the peer closes, when it has been idle
//!    (nothing in flight) for the idle timeout, when a response cannot be
//!    written within the write timeout, or at shutdown — after in-flight
//!    requests have been answered.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};
use vmd_proto::codec::FrameCodec;
use vmd_proto::frame::{FrameError, MAX_REPLY_FRAME, peek_request_id};
use vmd_proto::{
    ErrorReply, Hello, HelloReply, PROTOCOL_VERSION, Request, Response, Role, Welcome,
};

use crate::audit::{self, Outcome};
use crate::config::Limits;
use crate::handler::Handler;
use crate::policy::{Grant, Policy};
use crate::slots::Handshake;
use crate::tls::PeerIdentity;
use crate::transport::PeerAddr;
use crate::usage::Usage;

/// What the server knows about an admitted client.
#[derive(Debug)]
pub struct Session {
    /// The verified certificate identity.
    pub identity: PeerIdentity,
    /// The transport peer.
    pub peer: PeerAddr,
    /// What the policy grants it.
    pub grant: Grant,
}

impl Session {
    /// The client's role, `None` for no rights.
    pub fn role(&self) -> Option<Role> {
        self.grant.role
    }
}

/// What a reload replaces at once: TLS material (with CRLs) and policy.
pub(crate) struct Reloadable {
    pub(crate) tls: TlsAcceptor,
    pub(crate) policy: Policy,
}

/// Shared by every connection of one server.
pub(crate) struct ConnectionContext {
    pub(crate) handler: Arc<Handler>,
    pub(crate) limits: Limits,
    usage: Usage,
    current: RwLock<Arc<Reloadable>>,
}

impl ConnectionContext {
    pub(crate) fn new(handler: Arc<Handler>, limits: Limits, reloadable: Reloadable) -> Self {
        Self {
            handler,
            limits,
            usage: Usage::new(limits.identity),
            current: RwLock::new(Arc::new(reloadable)),
        }
    }

    /// The TLS material and policy in force now. A connection keeps the
    /// snapshot it started with; a reload affects new connections.
    pub(crate) fn current(&self) -> Arc<Reloadable> {
        // Only `replace` writes, with a single assignment: a poisoned lock
        // still holds a consistent value.
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Swaps in new TLS material and policy, atomically for new connections.
    pub(crate) fn replace(&self, reloadable: Reloadable) {
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(reloadable);
    }
}

impl std::fmt::Debug for ConnectionContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionContext")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// Serves one accepted connection to the end. Never panics on peer input.
pub(crate) async fn serve<S>(
    stream: S,
    peer: PeerAddr,
    ctx: Arc<ConnectionContext>,
    shutdown: CancellationToken,
    handshake: Handshake,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Until the session is admitted, the connection may be evicted to make
    // room for another (see `slots`).
    tokio::select! {
        () = serve_inner(stream, peer.clone(), ctx, shutdown, &handshake) => {}
        () = handshake.evicted() => {
            info!(%peer, "evicted during its handshake: connection cap reached");
            audit::connection(&peer, None, &Outcome::Refused("evicted during handshake: connection cap".into()));
        }
    }
}

async fn serve_inner<S>(
    stream: S,
    peer: PeerAddr,
    ctx: Arc<ConnectionContext>,
    shutdown: CancellationToken,
    handshake: &Handshake,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = ctx.limits;
    let current = ctx.current();
    let tls = match timeout(limits.handshake_timeout, current.tls.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            info!(%peer, error = %e, "TLS handshake refused");
            audit::connection(&peer, None, &Outcome::Refused(format!("TLS: {e}")));
            return;
        }
        Err(_) => {
            info!(%peer, "TLS handshake timed out");
            audit::connection(
                &peer,
                None,
                &Outcome::Refused("TLS handshake timed out".into()),
            );
            return;
        }
    };
    let identity = match PeerIdentity::from_connection(tls.get_ref().1) {
        Ok(identity) => identity,
        Err(e) => {
            warn!(%peer, error = %e, "refusing peer without a usable identity");
            audit::connection(&peer, None, &Outcome::Refused(e.to_string()));
            return;
        }
    };
    let span = info_span!("conn", %peer, identity = %identity.name);
    let admission = current
        .policy
        .admit(&identity, &peer, |vm| ctx.handler.cid_of(vm));
    async move {
        let codec = FrameCodec::<Hello, HelloReply>::new(limits.max_request_frame, MAX_REPLY_FRAME);
        let mut framed = Framed::new(tls, codec);
        let session = match admission {
            Ok(grant) => Session {
                identity,
                peer,
                grant,
            },
            Err(denial) => {
                warn!(reason = %denial, "connection refused by policy");
                audit::connection(
                    &peer,
                    Some(&identity),
                    &Outcome::Refused(denial.to_string()),
                );
                let refusal = ErrorReply::Forbidden {
                    reason: denial.to_string(),
                };
                greet(&mut framed, &identity, Err(refusal), &limits).await;
                return;
            }
        };
        if !session.grant.matched {
            info!("identity matches no policy rule; default role applies");
        }
        let _slot = match ctx.usage.connect(&session.identity.name) {
            Ok(slot) => slot,
            Err(e) => {
                warn!(error = %e, "connection refused");
                audit::connection(
                    &session.peer,
                    Some(&session.identity),
                    &Outcome::Refused(e.to_string()),
                );
                let refusal = ErrorReply::LimitExceeded {
                    limit: e.to_string(),
                    retry_after_ms: None,
                };
                greet(&mut framed, &session.identity, Err(refusal), &limits).await;
                return;
            }
        };
        audit::connection(&session.peer, Some(&session.identity), &Outcome::Admitted);
        let session = Arc::new(session);
        if greet(&mut framed, &session.identity, Ok(session.role()), &limits).await {
            handshake.done();
            let framed = framed.map_codec(FrameCodec::retype::<Request, Response>);
            serve_requests(framed, &session, &ctx, &shutdown).await;
        }
    }
    .instrument(span)
    .await;
}

/// Reads `Hello` and answers it: `Welcome` with `admission`'s role, or
/// `admission`'s refusal. Returns whether the session may go on.
async fn greet<T>(
    framed: &mut Framed<T, FrameCodec<Hello, HelloReply>>,
    identity: &PeerIdentity,
    admission: Result<Option<Role>, ErrorReply>,
    limits: &Limits,
) -> bool
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let reply: HelloReply = match timeout(limits.handshake_timeout, framed.next()).await {
        Err(_) => {
            info!("no Hello within the handshake timeout");
            return false;
        }
        Ok(None) => {
            debug!("closed before Hello");
            return false;
        }
        Ok(Some(Err(e))) => Err(frame_error(&e)),
        Ok(Some(Ok(Err(undecodable)))) => Err(ErrorReply::Malformed {
            reason: format!("expected Hello: {}", undecodable.error),
        }),
        Ok(Some(Ok(Ok(hello)))) if hello.protocol != PROTOCOL_VERSION => {
            Err(ErrorReply::VersionMismatch {
                client: hello.protocol,
                server: PROTOCOL_VERSION,
            })
        }
        Ok(Some(Ok(Ok(hello)))) => admission.map(|role| {
            info!(client = %hello.client_name.escape_debug(), ?role, "session started");
            Welcome {
                protocol: PROTOCOL_VERSION,
                server_version: env!("CARGO_PKG_VERSION").to_owned(),
                identity: identity.name.clone(),
                role,
            }
        }),
    };
    let accepted = reply.is_ok();
    if let Err(e) = &reply {
        info!(error = %e, "session refused");
    }
    if let Err(e) = send(framed, &reply, limits.write_timeout).await {
        debug!(error = %e, "cannot send Hello reply");
        return false;
    }
    if !accepted {
        close(framed, limits.write_timeout).await;
    }
    accepted
}

/// The request loop (step 4 and 5 of the module docs).
async fn serve_requests<T>(
    mut framed: Framed<T, FrameCodec<Request, Response>>,
    session: &Arc<Session>,
    ctx: &ConnectionContext,
    shutdown: &CancellationToken,
) where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let limits = &ctx.limits;
    let mut in_flight = FuturesUnordered::new();
    let mut ready = Vec::new();
    let mut reading = true;
    let idle = sleep_until(Instant::now() + limits.idle_timeout);
    tokio::pin!(idle);
    loop {
        if !reading && in_flight.is_empty() {
            break;
        }
        let can_read = reading && in_flight.len() < limits.max_in_flight;
        tokio::select! {
            Some(response) = in_flight.next(), if !in_flight.is_empty() => {
                ready.clear();
                ready.push(response);
                while let Some(Some(response)) = in_flight.next().now_or_never() {
                    ready.push(response);
                }
                if let Err(e) = send_all(&mut framed, &ready, limits.write_timeout).await {
                    warn!(error = %e, "cannot send response; closing");
                    return;
                }
                idle.as_mut().reset(Instant::now() + limits.idle_timeout);
            }
            frame = framed.next(), if can_read => {
                idle.as_mut().reset(Instant::now() + limits.idle_timeout);
                match frame {
                    None => {
                        debug!("peer closed");
                        reading = false;
                    }
                    Some(Ok(Ok(request))) => match ctx.usage.take(&session.identity.name) {
                        Ok(()) => {
                            in_flight.push(ctx.handler.clone().handle(session.clone(), request));
                        }
                        Err(retry) => {
                            let error = ErrorReply::LimitExceeded {
                                limit: "request rate of this identity".into(),
                                retry_after_ms: Some(
                                    u64::try_from(retry.as_millis()).unwrap_or(u64::MAX).max(1),
                                ),
                            };
                            let outcome = Outcome::Refused(error.to_string());
                            audit::request(&session.identity, &session.peer, &request.body, &outcome);
                            let response = Response { id: request.id, result: Err(error) };
                            if send(&mut framed, &response, limits.write_timeout).await.is_err() {
                                return;
                            }
                        }
                    },
                    Some(Ok(Err(undecodable))) => {
                        let id = peek_request_id(&undecodable.body).unwrap_or(0);
                        info!(id, error = %undecodable.error, "undecodable request");
                        let response = Response {
                            id,
                            result: Err(ErrorReply::Malformed {
                                reason: format!(
                                    "undecodable request (unknown operation or invalid field): {}",
                                    undecodable.error
                                ),
                            }),
                        };
                        if send(&mut framed, &response, limits.write_timeout).await.is_err() {
                            return;
                        }
                    }
                    Some(Err(FrameError::Io(e))) => {
                        debug!(error = %e, "connection lost");
                        reading = false;
                    }
                    Some(Err(e)) => {
                        info!(error = %e, "unreadable frame; closing");
                        {
                            let response = Response { id: 0, result: Err(frame_error(&e)) };
                            // The peer may already be gone; nothing more to do then.
                            let _ = send(&mut framed, &response, limits.write_timeout).await;
                        }
                        reading = false;
                    }
                }
            }
            () = shutdown.cancelled(), if reading => {
                debug!("shutting down: answering requests in flight");
                reading = false;
            }
            () = &mut idle, if in_flight.is_empty() => {
                info!(timeout = ?limits.idle_timeout, "idle timeout; closing");
                reading = false;
            }
        }
    }
    close(&mut framed, limits.write_timeout).await;
    debug!("connection closed");
}

/// The wire error for a framing failure.
fn frame_error(e: &FrameError) -> ErrorReply {
    ErrorReply::Malformed {
        reason: e.to_string(),
    }
}

/// Writes one frame within `limit` (see [`send_all`]).
async fn send<T, M, In>(
    framed: &mut Framed<T, FrameCodec<In, M>>,
    msg: &M,
    limit: Duration,
) -> Result<(), FrameError>
where
    T: AsyncRead + AsyncWrite + Unpin,
    M: serde::Serialize + Replaceable,
{
    send_all(framed, std::slice::from_ref(msg), limit).await
}

/// Writes frames with one flush, all within `limit`. A reply too large for
/// the frame limit is replaced by `Internal` (the reply was built, so it is
/// our fault); the encoder leaves the buffer as it was on that error.
async fn send_all<T, M, In>(
    framed: &mut Framed<T, FrameCodec<In, M>>,
    msgs: &[M],
    limit: Duration,
) -> Result<(), FrameError>
where
    T: AsyncRead + AsyncWrite + Unpin,
    M: serde::Serialize + Replaceable,
{
    let write = async {
        for msg in msgs {
            match framed.feed(msg).await {
                Err(FrameError::TooLarge { len, max }) => {
                    tracing::error!(len, max, "reply exceeds the frame limit");
                    framed.feed(&msg.internal_error()).await?;
                }
                other => other?,
            }
        }
        framed.flush().await
    };
    timeout(limit, write).await.unwrap_or_else(|_| {
        Err(FrameError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "write timed out",
        )))
    })
}

/// Sends TLS close_notify and shuts the transport down, within `limit`.
async fn close<T, C>(framed: &mut Framed<T, C>, limit: Duration)
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    let _ = timeout(limit, framed.get_mut().shutdown()).await;
}

/// A server message that can be swapped for an `Internal` error of the
/// same shape when it cannot be sent.
trait Replaceable: Sized {
    fn internal_error(&self) -> Self;
}

impl Replaceable for Response {
    fn internal_error(&self) -> Self {
        Response {
            id: self.id,
            result: Err(ErrorReply::Internal),
        }
    }
}

impl Replaceable for HelloReply {
    fn internal_error(&self) -> Self {
        Err(ErrorReply::Internal)
    }
}
