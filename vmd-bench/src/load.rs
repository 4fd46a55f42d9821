//! Load against a running vmd over mTLS.
//!
//! `requests`:
//! 1. Opens N sessions (TCP, TLS with the client certificate, `Hello`).
//! 2. Each session writes M requests, then keeps M in flight: every
//!    response is timed from its request's write and answered with a new
//!    request. Responses that are already read are handled together and
//!    their follow-ups go out in one write, as a pipelining client does.
//! 3. Requests answered before the warm-up ends are not counted. The run
//!    ends after the duration (or count); requests in flight then are
//!    drained but not counted.
//!
//! `handshakes`: C tasks each open a session, exchange `Hello`/`Welcome`
//! and close it, in a loop. Without `--resume` every handshake is full
//! (the client keeps no tickets); with it, the client keeps vmd's TLS 1.3
//! tickets and resumes.
//!
//! The sessions are driven directly on the frame codec, not through
//! `vmd_client::Client`: the bench shares two cores with the daemon, and
//! the client library's per-call channels would cost the bench more CPU
//! than the server spends. With `--server-pid`, the daemon's own CPU time
//! per request or handshake is reported as well.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{FutureExt, SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::codec::Framed;
use vmd_client::ClientTls;
use vmd_proto::codec::FrameCodec;
use vmd_proto::frame::{MAX_REPLY_FRAME, MAX_REQUEST_FRAME};
use vmd_proto::{Hello, HelloReply, Op, PROTOCOL_VERSION, Request, Response};

use crate::Target;
use crate::procfs::CpuClock;
use crate::report::Report;

/// A session after `Welcome`, speaking requests.
pub(crate) type Session = Framed<TlsStream<TcpStream>, FrameCodec<Response, Request>>;

/// Longest wait for one connection step.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// A load run failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LoadError {
    /// Connecting or the TLS handshake failed.
    #[error("cannot connect: {0}")]
    Connect(#[source] std::io::Error),
    /// The session was refused or broke.
    #[error("session failed: {0}")]
    Session(String),
    /// A step took longer than its timeout.
    #[error("{0} timed out")]
    Timeout(&'static str),
}

/// Runs one connection step within [`STEP_TIMEOUT`].
async fn within<T>(
    what: &'static str,
    step: impl std::future::Future<Output = Result<T, LoadError>>,
) -> Result<T, LoadError> {
    tokio::time::timeout(STEP_TIMEOUT, step)
        .await
        .map_err(|_| LoadError::Timeout(what))?
}

/// Opens one session; returns it and whether TLS resumed a session.
///
/// # Errors
/// [`LoadError`] for the step that failed.
pub(crate) async fn open(
    addr: std::net::SocketAddr,
    tls: &ClientTls,
) -> Result<(Session, bool), LoadError> {
    let tcp = within("TCP connect", async {
        TcpStream::connect(addr).await.map_err(LoadError::Connect)
    })
    .await?;
    tcp.set_nodelay(true).map_err(LoadError::Connect)?;
    let connector = TlsConnector::from(tls.config().clone());
    let stream = within("TLS handshake", async {
        connector
            .connect(tls.server_name().clone(), tcp)
            .await
            .map_err(LoadError::Connect)
    })
    .await?;
    let resumed = stream.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let mut framed = Framed::new(
        stream,
        FrameCodec::<HelloReply, Hello>::new(MAX_REPLY_FRAME, MAX_REQUEST_FRAME),
    );
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        client_name: "vmd-bench".into(),
    };
    let reply = within("Hello", async {
        framed
            .send(&hello)
            .await
            .map_err(|e| LoadError::Session(e.to_string()))?;
        match framed.next().await {
            Some(Ok(Ok(reply))) => Ok(reply),
            Some(Ok(Err(e))) => Err(LoadError::Session(e.error.to_string())),
            Some(Err(e)) => Err(LoadError::Session(e.to_string())),
            None => Err(LoadError::Session("closed before Welcome".into())),
        }
    })
    .await?;
    reply.map_err(|e| LoadError::Session(format!("refused: {e}")))?;
    Ok((
        framed.map_codec(FrameCodec::retype::<Response, Request>),
        resumed,
    ))
}

/// When a request run ends.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Stop {
    /// After this long (past the warm-up).
    After(Duration),
    /// After this many requests in all (warm-up included).
    Count(u64),
}

/// What `requests` does.
#[derive(Debug)]
pub(crate) struct RequestPlan {
    pub(crate) op: Op,
    pub(crate) connections: usize,
    pub(crate) pipeline: usize,
    pub(crate) stop: Stop,
    pub(crate) warmup: Duration,
}

/// A latency histogram in nanoseconds, 1 ns to 100 s, 3 significant digits.
pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid histogram bounds")
}

/// Shared between the session tasks of one run.
struct Shared {
    stop: AtomicBool,
    /// Requests left to send, for `Stop::Count`.
    budget: AtomicU64,
    measure_from: Instant,
}

impl Shared {
    /// Takes one request from the budget; false once the run is over.
    fn may_send(&self) -> bool {
        if self.stop.load(Ordering::Relaxed) {
            return false;
        }
        self.budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }
}

/// One session's results.
struct Tally {
    latency: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
    /// When the last counted response arrived.
    last: Option<Instant>,
}

/// Runs `plan` against the target; see the module docs.
///
/// # Errors
/// [`LoadError`] if a session cannot be opened or breaks.
pub(crate) async fn requests(target: &Target, plan: &RequestPlan) -> Result<Report, LoadError> {
    let tls = target
        .tls()
        .map_err(|e| LoadError::Session(vmd_client::error_chain(&e)))?;
    let mut sessions = Vec::with_capacity(plan.connections);
    for _ in 0..plan.connections {
        sessions.push(open(target.addr, &tls).await?.0);
    }
    let start = Instant::now();
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        budget: AtomicU64::new(match plan.stop {
            Stop::Count(n) => n,
            Stop::After(_) => u64::MAX,
        }),
        measure_from: start + plan.warmup,
    });
    let cpu_before = target.server_pid.map(CpuClock::of);
    let mut tasks = tokio::task::JoinSet::new();
    for session in sessions {
        let (shared, op, depth) = (shared.clone(), plan.op.clone(), plan.pipeline);
        tasks.spawn(drive(session, op, depth, shared));
    }
    if let Stop::After(duration) = plan.stop {
        tokio::time::sleep(plan.warmup + duration).await;
        shared.stop.store(true, Ordering::Relaxed);
    }
    let mut latency = histogram();
    let (mut errors, mut first_error, mut last) = (0, None, None::<Instant>);
    while let Some(joined) = tasks.join_next().await {
        let tally = joined.map_err(|e| LoadError::Session(e.to_string()))??;
        latency
            .add(&tally.latency)
            .expect("histograms of the same bounds add");
        errors += tally.errors;
        first_error = first_error.or(tally.first_error);
        last = last.max(tally.last);
    }
    let cpu = cpu_before.and_then(|before| before.elapsed());
    let measured = last.map_or(Duration::ZERO, |last| {
        last.saturating_duration_since(shared.measure_from)
    });
    let count = latency.len();
    let rate = count as f64 / measured.as_secs_f64().max(1e-9);
    let us = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
    let mut report = Report::new("requests")
        .set("op", plan.op.name())
        .set("connections", plan.connections)
        .set("pipeline", plan.pipeline)
        .set("requests", count)
        .set("errors", errors)
        .float("seconds", measured.as_secs_f64(), 3)
        .float("req_per_s", rate, 0)
        .float("p50_us", us(0.5), 1)
        .float("p90_us", us(0.9), 1)
        .float("p99_us", us(0.99), 1)
        .float("max_us", latency.max() as f64 / 1000.0, 1);
    if let Some(cpu) = cpu {
        // Warm-up and drain are included in the server's CPU time; count
        // every request sent for the division.
        let all = count + errors;
        report = report.float(
            "server_cpu_us_per_req",
            cpu.as_secs_f64() * 1e6 / (all.max(1) as f64),
            2,
        );
    }
    if let Some(e) = first_error {
        report = report.set("first_error", e);
    }
    Ok(report)
}

/// One session's request loop (module docs, step 2 and 3).
async fn drive(
    mut session: Session,
    op: Op,
    depth: usize,
    shared: Arc<Shared>,
) -> Result<Tally, LoadError> {
    let mut tally = Tally {
        latency: histogram(),
        errors: 0,
        first_error: None,
        last: None,
    };
    let mut sent: HashMap<u32, Instant> = HashMap::with_capacity(depth * 2);
    let mut next_id = 1u32;
    let broken = |e: vmd_proto::frame::FrameError| LoadError::Session(e.to_string());
    for _ in 0..depth {
        if !shared.may_send() {
            break;
        }
        feed(&mut session, &mut sent, &mut next_id, &op)
            .await
            .map_err(broken)?;
    }
    session.flush().await.map_err(broken)?;
    while !sent.is_empty() {
        let mut frame = session.next().await;
        loop {
            let response = match frame {
                Some(Ok(Ok(response))) => response,
                Some(Ok(Err(e))) => return Err(LoadError::Session(e.error.to_string())),
                Some(Err(e)) => return Err(broken(e)),
                None => return Err(LoadError::Session("server closed the session".into())),
            };
            let now = Instant::now();
            let Some(at) = sent.remove(&response.id) else {
                return Err(LoadError::Session(format!(
                    "response to unknown request {}",
                    response.id
                )));
            };
            if now >= shared.measure_from && !shared.stop.load(Ordering::Relaxed) {
                match response.result {
                    Ok(_) => {
                        let ns =
                            u64::try_from(now.duration_since(at).as_nanos()).unwrap_or(u64::MAX);
                        tally.latency.saturating_record(ns.max(1));
                    }
                    Err(e) => {
                        tally.errors += 1;
                        tally.first_error.get_or_insert_with(|| e.to_string());
                    }
                }
                tally.last = Some(now);
            }
            if shared.may_send() {
                feed(&mut session, &mut sent, &mut next_id, &op)
                    .await
                    .map_err(broken)?;
            }
            // Handle what has already arrived before writing.
            match session.next().now_or_never() {
                Some(ready) => frame = ready,
                None => break,
            }
        }
        session.flush().await.map_err(broken)?;
    }
    let _ = session.get_mut().shutdown().await;
    Ok(tally)
}

/// Encodes one request into the write buffer (no flush) and notes when.
async fn feed(
    session: &mut Session,
    sent: &mut HashMap<u32, Instant>,
    next_id: &mut u32,
    op: &Op,
) -> Result<(), vmd_proto::frame::FrameError> {
    let id = *next_id;
    *next_id = next_id.wrapping_add(1).max(1);
    sent.insert(id, Instant::now());
    let request = Request {
        id,
        body: op.clone(),
    };
    // Framed::feed only encodes into the write buffer; it waits only when
    // the buffer is over its high-water mark.
    session.feed(&request).await
}

/// Opens and closes sessions in a loop; see the module docs.
///
/// # Errors
/// [`LoadError`] if TLS material is unusable or a session fails.
pub(crate) async fn handshakes(
    target: &Target,
    connections: usize,
    duration: Duration,
    resume: bool,
) -> Result<Report, LoadError> {
    let tls = target
        .tls()
        .map_err(|e| LoadError::Session(vmd_client::error_chain(&e)))?;
    let tls = if resume {
        tls
    } else {
        tls.without_resumption()
    };
    let stop = Arc::new(AtomicBool::new(false));
    let cpu_before = target.server_pid.map(CpuClock::of);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let (tls, stop, addr) = (tls.clone(), stop.clone(), target.addr);
        tasks.spawn(async move {
            let mut latency = histogram();
            let mut resumed = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let began = Instant::now();
                let (mut session, was_resumed) = open(addr, &tls).await?;
                let ns = u64::try_from(began.elapsed().as_nanos()).unwrap_or(u64::MAX);
                latency.saturating_record(ns.max(1));
                resumed += u64::from(was_resumed);
                let _ = session.get_mut().shutdown().await;
            }
            Ok::<_, LoadError>((latency, resumed))
        });
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut latency = histogram();
    let mut resumed = 0;
    while let Some(joined) = tasks.join_next().await {
        let (h, r) = joined.map_err(|e| LoadError::Session(e.to_string()))??;
        latency.add(&h).expect("histograms of the same bounds add");
        resumed += r;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = cpu_before.and_then(|before| before.elapsed());
    let count = latency.len();
    let us = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
    let mut report = Report::new("handshakes")
        .set("resume", resume)
        .set("connections", connections)
        .set("sessions", count)
        .set("resumed", resumed)
        .float("seconds", elapsed, 3)
        .float("per_s", count as f64 / elapsed, 0)
        .float("p50_us", us(0.5), 1)
        .float("p99_us", us(0.99), 1);
    if let Some(cpu) = cpu {
        let per = cpu.as_secs_f64() / (count.max(1) as f64);
        report = report
            .float("server_cpu_us_per_session", per * 1e6, 1)
            .float("server_sessions_per_cpu_s", 1.0 / per.max(1e-9), 0);
    }
    Ok(report)
}
