//! One client connection, generic over the transport stream.
//!
//! 1. TLS handshake (TLS 1.3, client certificate required) and `Hello`
//!    share one deadline, the handshake timeout from the accept: a client
//!    slow in either phase, or in both, is cut when it passes.
//! 2. The verified certificate names the peer ([`PeerIdentity`]); peer and
//!    identity go on the connection's tracing span, which every request
//!    span nests in. The policy admits the peer (key pin, transport, vsock
//!    CID binding) and grants it a role and scopes; refusals are audited.
//!    An identity penalized for spending its refusal budget (see `usage`)
//!    is held until the deadline, then refused.
//! 3. `Hello` → `Welcome`. A wrong protocol version, an unreadable `Hello`,
//!    a policy refusal or a limit (the identity's connection cap, no
//!    session slot: see `slots`) gets an error reply, then the connection
//!    closes. An identity without a role gets its `Welcome` (role none)
//!    and the connection closes: it could only be refused. The identity
//!    is penalized as in step 5, so a reconnecting loop is held.
//! 4. Requests are read and handled concurrently (pipelining), at most
//!    `max_in_flight` at a time; responses go out as they finish, each
//!    carrying its request id. Responses that finish together are written
//!    together: one TLS record and one write for the batch. A
//!    framed-but-undecodable request gets a `Malformed` reply and the
//!    connection goes on; an oversized length prefix gets a `Malformed`
//!    reply and closes (the stream is no longer in sync).
//! 5. Refusals cost the client, not the host. Every `Forbidden`,
//!    `LimitExceeded` or `Malformed` answer spends one of the connection's
//!    `max_refusals_per_connection` (default 16); when they are spent the
//!    connection stops reading, answers what is in flight and closes, and
//!    its identity is penalized (see `usage`). The first
//!    [`audit::REFUSALS_RECORDED_SINGLY`] refused requests are audited one
//!    by one, the rest as one `refusals` record with their count at close.
//! 6. The connection closes when the peer closes, when it has been idle
//!    (nothing in flight) for the idle timeout, when a response cannot be
//!    written within the write timeout, or at shutdown — after in-flight
//!    requests have been answered. A session may also be displaced by one
//!    of a higher role at the connection cap (see `slots`).

use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, sleep_until, timeout, timeout_at};
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span};
use vmd_proto::codec::FrameCodec;
use vmd_proto::frame::{FrameError, MAX_REPLY_FRAME, peek_request_id};
use vmd_proto::{
    ErrorReply, Hello, HelloReply, Op, PROTOCOL_VERSION, Request, Response, Role, Welcome,
};

use crate::audit::{self, Outcome};
use crate::config::Limits;
use crate::handler::Handler;
use crate::metrics::TlsRefusal;
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
    /// The same TLS server config with ALPN `http/1.1`, for the metrics
    /// listener.
    pub(crate) metrics_tls: TlsAcceptor,
    pub(crate) policy: Policy,
}

/// Shared by every connection of one server.
pub(crate) struct ConnectionContext {
    pub(crate) handler: Arc<Handler>,
    pub(crate) limits: Limits,
    pub(crate) usage: Usage,
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
    // The connection may be evicted during its handshake, or displaced as
    // a session by one of a higher role, to make room (see `slots`).
    tokio::select! {
        () = serve_inner(stream, peer.clone(), ctx, shutdown, &handshake) => {}
        () = handshake.evicted() => {
            let why = if handshake.was_session() {
                "displaced by a session of a higher role: connection cap"
            } else {
                "evicted during handshake: connection cap"
            };
            debug!(%peer, "{why}");
            audit::connection(&peer, None, &Outcome::Refused(why.into()));
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
    // One deadline for the TLS handshake and `Hello` together (step 1, 3).
    let deadline = Instant::now() + limits.handshake_timeout;
    let current = ctx.current();
    let Some((tls, identity)) = accept_tls(&current.tls, stream, &peer, deadline).await else {
        return;
    };
    let span = info_span!("conn", %peer, identity = %identity.name);
    let admission = current
        .policy
        .admit(&identity, &peer, |vm| ctx.handler.cid_of(vm));
    async move {
        let codec = FrameCodec::<Hello, HelloReply>::new(limits.max_request_frame, MAX_REPLY_FRAME);
        let mut framed = Framed::new(tls, codec);
        // Refusals before `Hello` is read (read it, then answer) and after.
        let refuse = |framed, identity: &PeerIdentity, why: String, reply: ErrorReply| {
            debug!(reason = %why, "connection refused");
            audit::connection(&peer, Some(identity), &Outcome::Refused(why));
            refuse_hello(framed, reply, deadline, &limits)
        };
        let refuse_after_hello =
            |framed, identity: &PeerIdentity, why: String, reply: ErrorReply| {
                debug!(reason = %why, "connection refused");
                audit::connection(&peer, Some(identity), &Outcome::Refused(why));
                answer_hello(framed, Err(reply), &limits)
            };
        let grant = match admission {
            Ok(grant) => grant,
            Err(denial) => {
                let reply = ErrorReply::Forbidden {
                    reason: denial.to_string(),
                };
                refuse(&mut framed, &identity, denial.to_string(), reply).await;
                return;
            }
        };
        // Reconnecting after spending the refusal budget: held until the
        // deadline, then refused (see `usage`, step 3).
        if let Some(left) = ctx.usage.penalty(&identity.name) {
            sleep_until(deadline).await;
            let reply = ErrorReply::LimitExceeded {
                limit: "refusal budget of this identity spent recently".into(),
                retry_after_ms: Some(u64::try_from(left.as_millis()).unwrap_or(u64::MAX).max(1)),
            };
            let why = "refusal budget spent recently: held until the handshake deadline".to_owned();
            debug!(reason = %why, "connection refused");
            audit::connection(&peer, Some(&identity), &Outcome::Refused(why));
            let reply: HelloReply = Err(reply);
            let _ = send(&mut framed, &reply, limits.write_timeout).await;
            close(&mut framed, limits.write_timeout).await;
            return;
        }
        let hello = match read_hello(&mut framed, deadline).await {
            Ok(hello) => hello,
            Err(NoHello::Refuse(reply)) => {
                answer_hello(&mut framed, Err(reply), &limits).await;
                return;
            }
            Err(NoHello::Late) => {
                let why = "no Hello within the handshake deadline".to_owned();
                audit::connection(&peer, Some(&identity), &Outcome::Refused(why));
                return;
            }
            Err(NoHello::Gone) => return,
        };
        let session = Session {
            identity,
            peer: peer.clone(),
            grant,
        };
        if !session.grant.matched {
            debug!("identity matches no policy rule; default role applies");
        }
        let _slot = match ctx.usage.connect(&session.identity.name) {
            Ok(slot) => slot,
            Err(e) => {
                let reply = ErrorReply::LimitExceeded {
                    limit: e.to_string(),
                    retry_after_ms: None,
                };
                refuse_after_hello(&mut framed, &session.identity, e.to_string(), reply).await;
                return;
            }
        };
        let Some(role) = session.role() else {
            // No rights: told so, then closed; never a session (`slots`, 4).
            audit::connection(
                &session.peer,
                Some(&session.identity),
                &Outcome::Refused("no rights: closed after Welcome".into()),
            );
            if answer_hello(&mut framed, Ok(welcome(&session, &hello)), &limits).await {
                close(&mut framed, limits.write_timeout).await;
            }
            // Coming back at once could only be closed again: held instead.
            ctx.usage.penalize(&session.identity.name);
            return;
        };
        if let Err(full) = handshake.become_session(role) {
            let reply = ErrorReply::LimitExceeded {
                limit: full.to_string(),
                retry_after_ms: None,
            };
            refuse_after_hello(&mut framed, &session.identity, full.to_string(), reply).await;
            return;
        }
        audit::connection(&session.peer, Some(&session.identity), &Outcome::Admitted);
        let session = Arc::new(session);
        if answer_hello(&mut framed, Ok(welcome(&session, &hello)), &limits).await {
            let framed = framed.map_codec(FrameCodec::retype::<Request, Response>);
            serve_requests(framed, &session, &ctx, &shutdown).await;
        }
    }
    .instrument(span)
    .await;
}

/// The TLS handshake by `deadline` and the peer's identity from its
/// verified certificate; `None` (audited, and counted by reason) when the
/// handshake fails or times out, or the certificate names no identity.
/// Shared by the main and the metrics listener.
pub(crate) async fn accept_tls<S>(
    acceptor: &TlsAcceptor,
    stream: S,
    peer: &PeerAddr,
    deadline: Instant,
) -> Option<(tokio_rustls::server::TlsStream<S>, PeerIdentity)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let counters = &crate::metrics::COUNTERS;
    let tls = match timeout_at(deadline, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "TLS handshake refused");
            counters.tls_refusal(TlsRefusal::of(&e));
            audit::connection(peer, None, &Outcome::Refused(format!("TLS: {e}")));
            return None;
        }
        Err(_) => {
            debug!(%peer, "TLS handshake timed out");
            counters.tls_refusal(TlsRefusal::Timeout);
            audit::connection(
                peer,
                None,
                &Outcome::Refused("TLS handshake timed out".into()),
            );
            return None;
        }
    };
    match PeerIdentity::from_connection(tls.get_ref().1) {
        Ok(identity) => Some((tls, identity)),
        Err(e) => {
            debug!(%peer, error = %e, "refusing peer without a usable identity");
            counters.tls_refusal(TlsRefusal::NoIdentity);
            audit::connection(peer, None, &Outcome::Refused(e.to_string()));
            None
        }
    }
}

/// The `Welcome` for an admitted session.
fn welcome(session: &Session, hello: &Hello) -> Welcome {
    debug!(client = %hello.client_name.escape_debug(), role = ?session.role(), "session started");
    Welcome {
        protocol: PROTOCOL_VERSION,
        server_version: env!("CARGO_PKG_VERSION").to_owned(),
        identity: session.identity.name.clone(),
        role: session.role(),
    }
}

/// Why there is no `Hello` to answer.
#[derive(Debug)]
enum NoHello {
    /// Refuse with this reply (unreadable, wrong version).
    Refuse(ErrorReply),
    /// The peer closed.
    Gone,
    /// The handshake deadline passed.
    Late,
}

/// Reads `Hello` by `deadline`.
async fn read_hello<T>(
    framed: &mut Framed<T, FrameCodec<Hello, HelloReply>>,
    deadline: Instant,
) -> Result<Hello, NoHello>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    match timeout_at(deadline, framed.next()).await {
        Err(_) => {
            debug!("no Hello within the handshake deadline");
            Err(NoHello::Late)
        }
        Ok(None) => {
            debug!("closed before Hello");
            Err(NoHello::Gone)
        }
        Ok(Some(Err(e))) => Err(NoHello::Refuse(frame_error(&e))),
        Ok(Some(Ok(Err(undecodable)))) => Err(NoHello::Refuse(ErrorReply::Malformed {
            reason: format!("expected Hello: {}", undecodable.error),
        })),
        Ok(Some(Ok(Ok(hello)))) if hello.protocol != PROTOCOL_VERSION => {
            Err(NoHello::Refuse(ErrorReply::VersionMismatch {
                client: hello.protocol,
                server: PROTOCOL_VERSION,
            }))
        }
        Ok(Some(Ok(Ok(hello)))) => Ok(hello),
    }
}

/// Reads `Hello` (by `deadline`) and answers it with `refusal`, then closes.
async fn refuse_hello<T>(
    framed: &mut Framed<T, FrameCodec<Hello, HelloReply>>,
    refusal: ErrorReply,
    deadline: Instant,
    limits: &Limits,
) where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let reply = match read_hello(framed, deadline).await {
        Ok(_) => refusal,
        Err(NoHello::Refuse(reply)) => reply,
        Err(NoHello::Gone | NoHello::Late) => return,
    };
    answer_hello(framed, Err(reply), limits).await;
}

/// Sends the answer to `Hello`; closes after a refusal. Returns whether
/// the session may go on.
async fn answer_hello<T>(
    framed: &mut Framed<T, FrameCodec<Hello, HelloReply>>,
    reply: HelloReply,
    limits: &Limits,
) -> bool
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let accepted = reply.is_ok();
    if let Err(e) = &reply {
        debug!(error = %e, "session refused");
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

/// A connection's refused requests (module docs, step 5).
#[derive(Debug, Default)]
struct Refusals {
    /// Denials and malformed requests: the budget spent.
    spent: u32,
    /// Refusals recorded singly in the audit log.
    recorded: u32,
    /// Refusals left for the closing summary record.
    unrecorded: u32,
}

impl Refusals {
    /// Counts and audits a refused request (`op` when it was decodable).
    fn note(&mut self, session: &Session, op: Option<&Op>, error: &ErrorReply) {
        if audit::is_denial(error) {
            self.spent = self.spent.saturating_add(1);
        }
        let audited = op.is_none_or(|op| audit::is_audited_refusal(op, error));
        if !audited {
            return;
        }
        match op {
            Some(op) if self.recorded < audit::REFUSALS_RECORDED_SINGLY => {
                self.recorded += 1;
                let outcome = Outcome::Refused(error.to_string());
                audit::request(&session.identity, &session.peer, op, &outcome);
            }
            _ => self.unrecorded = self.unrecorded.saturating_add(1),
        }
    }
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
    let mut refusals = Refusals::default();
    let mut budget_spent = false;
    let idle = sleep_until(Instant::now() + limits.idle_timeout);
    tokio::pin!(idle);
    loop {
        if reading && refusals.spent >= limits.max_refusals {
            debug!(refusals = refusals.spent, "refusal budget spent; closing");
            reading = false;
            budget_spent = true;
        }
        if !reading && in_flight.is_empty() {
            break;
        }
        let can_read = reading && in_flight.len() < limits.max_in_flight;
        tokio::select! {
            Some(answered) = in_flight.next(), if !in_flight.is_empty() => {
                ready.clear();
                ready.push(answered);
                while let Some(Some(answered)) = in_flight.next().now_or_never() {
                    ready.push(answered);
                }
                let responses: Vec<Response> = ready
                    .drain(..)
                    .map(|(op, response): (Op, Response)| {
                        if let Err(e) = &response.result {
                            refusals.note(session, Some(&op), e);
                        }
                        response
                    })
                    .collect();
                if let Err(e) = send_all(&mut framed, &responses, limits.write_timeout).await {
                    debug!(error = %e, "cannot send response; closing");
                    break;
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
                            let (handler, session) = (ctx.handler.clone(), session.clone());
                            let op = request.body.clone();
                            in_flight.push(async move { (op, handler.handle(session, request).await) });
                        }
                        Err(retry) => {
                            let error = ErrorReply::LimitExceeded {
                                limit: "request rate of this identity".into(),
                                retry_after_ms: Some(
                                    u64::try_from(retry.as_millis()).unwrap_or(u64::MAX).max(1),
                                ),
                            };
                            refusals.note(session, Some(&request.body), &error);
                            crate::metrics::COUNTERS.request(request.body.name(), Err(&error));
                            let response = Response { id: request.id, result: Err(error) };
                            if send(&mut framed, &response, limits.write_timeout).await.is_err() {
                                break;
                            }
                        }
                    },
                    Some(Ok(Err(undecodable))) => {
                        let id = peek_request_id(&undecodable.body).unwrap_or(0);
                        debug!(id, error = %undecodable.error, "undecodable request");
                        let error = ErrorReply::Malformed {
                            reason: format!(
                                "undecodable request (unknown operation or invalid field): {}",
                                undecodable.error
                            ),
                        };
                        refusals.note(session, None, &error);
                        let response = Response { id, result: Err(error) };
                        if send(&mut framed, &response, limits.write_timeout).await.is_err() {
                            break;
                        }
                    }
                    Some(Err(FrameError::Io(e))) => {
                        debug!(error = %e, "connection lost");
                        reading = false;
                    }
                    Some(Err(e)) => {
                        debug!(error = %e, "unreadable frame; closing");
                        let error = frame_error(&e);
                        refusals.note(session, None, &error);
                        let response = Response { id: 0, result: Err(error) };
                        // The peer may already be gone; nothing more to do then.
                        let _ = send(&mut framed, &response, limits.write_timeout).await;
                        reading = false;
                    }
                }
            }
            () = shutdown.cancelled(), if reading => {
                debug!("shutting down: answering requests in flight");
                reading = false;
            }
            () = &mut idle, if in_flight.is_empty() => {
                debug!(timeout = ?limits.idle_timeout, "idle timeout; closing");
                reading = false;
            }
        }
    }
    close(&mut framed, limits.write_timeout).await;
    if budget_spent {
        ctx.usage.penalize(&session.identity.name);
    }
    if refusals.unrecorded > 0 {
        let why = if budget_spent {
            "refusal budget spent: connection closed"
        } else {
            "not recorded singly"
        };
        audit::refusals(&session.identity, &session.peer, refusals.unrecorded, why);
    }
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
