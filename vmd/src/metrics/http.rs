//! One connection of the metrics listener: mutual TLS, then HTTP/1.1
//! (`hyper`), the same admission as the main listener's.
//!
//! 1. The TLS handshake is the main listener's (`connection::accept_tls`:
//!    the same server config, client-certificate verifier and CRLs, with
//!    ALPN `http/1.1`), within the handshake timeout; refusals are audited
//!    and counted by reason.
//! 2. The policy admits the peer (key pin, transports, TCP networks) and
//!    grants it a role and a visible scope, as on the main listener. An
//!    identity penalized for spending its refusal budget, one without a
//!    role, one at its connection cap, or one that finds every session slot
//!    taken (see `slots`) is refused: every request on the connection
//!    answers `403` (or `429`, `503` for the limits) with a short body and
//!    the connection closes; the refusal is audited.
//! 3. An admitted identity's requests: `GET /metrics` (also `HEAD`)
//!    answers the scrape ([`super::collect`], [`super::encode`]); another
//!    path `404`, another method `405`. Each request spends a token of the
//!    identity's request rate (`429` without one); `404`, `405` and `429`
//!    spend the connection's refusal budget, and when it is spent the
//!    connection closes and the identity is penalized.
//! 4. The connection closes when the peer closes, when no request head
//!    arrives within the idle timeout, when an answer makes no progress
//!    within the write timeout (a scraper that stopped reading), or at
//!    shutdown (after the request in flight is answered).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONNECTION, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, sleep_until};
use tokio_io_timeout::TimeoutStream;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info_span};

use crate::audit::{self, Outcome};
use crate::connection::{self, ConnectionContext, Session};
use crate::metrics::{COUNTERS, Scrape, collect, encode};
use crate::slots::Handshake;
use crate::transport::PeerAddr;

/// The one path served.
pub const PATH: &str = "/metrics";

/// The label of metrics requests in `requests_total{op}`.
const OP: &str = "metrics";

/// What the connection may do (module docs, step 2).
enum Access {
    /// Scrapes, as this session.
    Granted(Arc<Session>),
    /// Every request answers this status, then the connection closes.
    Refused(StatusCode, &'static str),
}

/// Serves one accepted connection of the metrics listener to the end.
/// Never panics on peer input.
pub(crate) async fn serve<S>(
    stream: S,
    peer: PeerAddr,
    ctx: Arc<ConnectionContext>,
    shutdown: CancellationToken,
    handshake: Handshake,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::select! {
        () = serve_inner(stream, peer.clone(), ctx, shutdown, &handshake) => {}
        () = handshake.evicted() => {
            debug!(%peer, "metrics connection evicted: connection cap");
            audit::connection(&peer, None, &Outcome::Refused("evicted: connection cap".into()));
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
    let deadline = Instant::now() + limits.handshake_timeout;
    let current = ctx.current();
    let Some((tls, identity)) =
        connection::accept_tls(&current.metrics_tls, stream, &peer, deadline).await
    else {
        return;
    };
    let span = info_span!("metrics", %peer, identity = %identity.name);
    async move {
        let refuse = |why: String| {
            debug!(reason = %why, "metrics connection refused");
            audit::connection(&peer, Some(&identity), &Outcome::Refused(why));
        };
        let admission = current
            .policy
            .admit(&identity, &peer, |vm| ctx.handler.cid_of(vm));
        let mut _slot = None;
        let access = match admission {
            Err(denial) => {
                refuse(denial.to_string());
                Access::Refused(StatusCode::FORBIDDEN, "forbidden\n")
            }
            Ok(_) if ctx.usage.penalty(&identity.name).is_some() => {
                // As on the main listener: held until the deadline.
                sleep_until(deadline).await;
                refuse("refusal budget spent recently: held until the handshake deadline".into());
                Access::Refused(
                    StatusCode::TOO_MANY_REQUESTS,
                    "refusal budget spent recently\n",
                )
            }
            Ok(grant) => match (grant.role, ctx.usage.connect(&identity.name)) {
                (None, _) => {
                    refuse("no rights: may not read metrics".into());
                    ctx.usage.penalize(&identity.name);
                    Access::Refused(
                        StatusCode::FORBIDDEN,
                        "forbidden: no role may read metrics\n",
                    )
                }
                (Some(_), Err(e)) => {
                    refuse(e.to_string());
                    Access::Refused(
                        StatusCode::TOO_MANY_REQUESTS,
                        "connection cap of this identity\n",
                    )
                }
                (Some(role), Ok(slot)) => match handshake.become_session(role) {
                    Err(full) => {
                        refuse(full.to_string());
                        Access::Refused(StatusCode::SERVICE_UNAVAILABLE, "connection cap reached\n")
                    }
                    Ok(()) => {
                        _slot = Some(slot);
                        audit::connection(&peer, Some(&identity), &Outcome::Admitted);
                        Access::Granted(Arc::new(Session {
                            identity: identity.clone(),
                            peer: peer.clone(),
                            grant,
                        }))
                    }
                },
            },
        };
        let granted = matches!(access, Access::Granted(_));
        let refusals = Arc::new(AtomicU32::new(0));
        let (access, ctx2, refusals2) = (Arc::new(access), ctx.clone(), refusals.clone());
        let service = service_fn(move |request: Request<Incoming>| {
            let (access, ctx, refusals) = (access.clone(), ctx2.clone(), refusals2.clone());
            async move { Ok::<_, Infallible>(answer(&access, &ctx, &refusals, &request).await) }
        });
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.idle_timeout)
            .max_buf_size(limits.max_request_frame as usize)
            .keep_alive(granted);
        // hyper has no write deadline: an answer that makes no progress
        // for `write_timeout` (a scraper that stopped reading) ends the
        // connection, as on the main listener.
        let mut stream = TimeoutStream::new(tls);
        stream.set_write_timeout(Some(limits.write_timeout));
        let conn = builder.serve_connection(TokioIo::new(Box::pin(stream)), service);
        tokio::pin!(conn);
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    debug!(error = %e, "metrics connection ended");
                }
            }
            () = shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(limits.shutdown_grace, conn).await;
            }
        }
        if refusals.load(Ordering::Relaxed) >= limits.max_refusals {
            ctx.usage.penalize(&identity.name);
        }
        debug!("metrics connection closed");
    }
    .instrument(span)
    .await;
}

/// Answers one request (module docs, step 3).
async fn answer(
    access: &Access,
    ctx: &ConnectionContext,
    refusals: &AtomicU32,
    request: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    let session = match access {
        Access::Refused(status, body) => {
            COUNTERS.request_labelled(OP, status_name(*status));
            return close(reply(*status, body));
        }
        Access::Granted(session) => session,
    };
    let refused = |status: StatusCode, body: &'static str| {
        COUNTERS.request_labelled(OP, status_name(status));
        let spent = refusals.fetch_add(1, Ordering::Relaxed) + 1;
        let why = format!("{} {}: {}", request.method(), request.uri().path(), status);
        if spent <= audit::REFUSALS_RECORDED_SINGLY {
            audit::connection(
                &session.peer,
                Some(&session.identity),
                &Outcome::Refused(why),
            );
        }
        let response = reply(status, body);
        if spent >= ctx.limits.max_refusals {
            debug!(refusals = spent, "refusal budget spent; closing");
            return close(response);
        }
        response
    };
    if let Err(retry) = ctx.usage.take(&session.identity.name) {
        let mut response = refused(
            StatusCode::TOO_MANY_REQUESTS,
            "request rate of this identity\n",
        );
        if let Ok(value) = HeaderValue::from_str(&retry.as_secs().max(1).to_string()) {
            response
                .headers_mut()
                .insert(hyper::header::RETRY_AFTER, value);
        }
        return response;
    }
    if request.uri().path() != PATH {
        return refused(
            StatusCode::NOT_FOUND,
            "not found: the only path is /metrics\n",
        );
    }
    let head = request.method() == Method::HEAD;
    if request.method() != Method::GET && !head {
        let mut response = refused(StatusCode::METHOD_NOT_ALLOWED, "method not allowed: GET\n");
        response
            .headers_mut()
            .insert(hyper::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match scrape(ctx, session).await {
        Ok(text) => {
            COUNTERS.request_labelled(OP, "ok");
            let mut response = Response::new(Full::new(if head {
                Bytes::new()
            } else {
                Bytes::from(text)
            }));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(encode::CONTENT_TYPE));
            response
        }
        Err(e) => {
            error!(error = %e, "cannot encode metrics");
            COUNTERS.request_labelled(OP, "internal");
            reply(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n")
        }
    }
}

/// One scrape for `session`: the host, the VMs it may see, the counters.
///
/// # Errors
/// The encoder's error.
async fn scrape(ctx: &ConnectionContext, session: &Session) -> Result<String, std::fmt::Error> {
    let handler = &ctx.handler;
    let host = handler.host().recent();
    // `list` answers from the live model and does not fail today.
    let vms = handler
        .vms()
        .list(&session.grant.visible, &session.identity.name)
        .await
        .unwrap_or_default();
    let registry = collect(&Scrape {
        host: &host,
        vms: &vms,
        watchers: handler.vms().changes().total_watchers(),
        counters: &COUNTERS,
    });
    encode::encode(&registry)
}

fn reply(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// `response`, closing the connection after it.
fn close(mut response: Response<Full<Bytes>>) -> Response<Full<Bytes>> {
    response
        .headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    response
}

fn status_name(status: StatusCode) -> &'static str {
    match status {
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::TOO_MANY_REQUESTS => "limit_exceeded",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        _ => "other",
    }
}
