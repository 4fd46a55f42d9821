//! `flood`: what a refusal flood costs the host, and a good client.
//!
//! 1. Unloaded: the good client (`--cert`) sends `Host` one at a time for
//!    the duration; its median latency is the baseline.
//! 2. Flood: `--flooders` tasks with the flooder's certificate
//!    (`--flood-cert`) each open a session and refuse as fast as they can,
//!    reconnecting whenever vmd closes them (an attacker does not stop):
//!    - `forbidden`: 32 pipelined changes the identity may not make
//!      (`Start` as a reader), refilled as answers come;
//!    - `malformed`: 32 pipelined undecodable frames (an unknown
//!      operation), refilled likewise;
//!    - `rightless`: the identity has no role, so each session ends at
//!      `Welcome`; the flooder just reconnects.
//! 3. Half a second into the flood, vmd's CPU time (`--server-pid`) and
//!    the growth of its log file (`--log`) are taken over one window of
//!    the flood alone; then the good client measures again during the
//!    flood. Connections vmd refuses or holds (a penalized identity, see
//!    vmd's `usage`) count as `refused`.
//!
//! Everything stays on the target address (loopback in `scripts/bench`)
//! and ends after the duration; a flooder's step is bounded by the
//! session timeouts of `load`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use vmd_client::ClientTls;
use vmd_proto::{Op, Request, VmName};

use crate::Target;
use crate::load::{self, LoadError, RequestPlan, Stop};
use crate::procfs::CpuClock;
use crate::report::Report;

/// How the flooders refuse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Kind {
    /// Changes the identity may not make.
    Forbidden,
    /// Undecodable frames.
    Malformed,
    /// Sessions of an identity without a role.
    Rightless,
}

/// What `flood` does.
#[derive(Debug)]
pub(crate) struct FloodPlan {
    pub(crate) kind: Kind,
    pub(crate) flooders: usize,
    pub(crate) duration: Duration,
    pub(crate) flood_tls: ClientTls,
    pub(crate) log: Option<PathBuf>,
}

/// Requests each flooder keeps in flight.
const DEPTH: u32 = 32;

#[derive(Debug, Default)]
struct Counts {
    sessions: AtomicU64,
    refused: AtomicU64,
    answers: AtomicU64,
}

/// The good client's median latency in µs, one request at a time.
async fn good_p50(target: &Target, duration: Duration) -> Result<f64, LoadError> {
    let report = load::requests(
        target,
        &RequestPlan {
            op: Op::Host,
            connections: 1,
            pipeline: 1,
            stop: Stop::After(duration),
            warmup: Duration::from_millis(200),
        },
    )
    .await?;
    Ok(report.number("p50_us").unwrap_or(f64::NAN))
}

/// One flooder (module docs, step 2), until `stop`.
async fn flooder(
    addr: std::net::SocketAddr,
    tls: ClientTls,
    kind: Kind,
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
) {
    let start = VmName::new("bench-vm").expect("a valid VM name");
    while !stop.load(Ordering::Relaxed) {
        let mut session = match load::open(addr, &tls).await {
            Ok((session, _)) => session,
            Err(_) => {
                counts.refused.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        counts.sessions.fetch_add(1, Ordering::Relaxed);
        if kind == Kind::Rightless {
            // vmd closes it after Welcome; wait for that, then reconnect.
            let _ = tokio::time::timeout(Duration::from_secs(10), session.next()).await;
            continue;
        }
        let mut id = 0u32;
        let mut send = async |session: &mut load::Session, n: u32| -> bool {
            for _ in 0..n {
                id = id.wrapping_add(1);
                let sent = match kind {
                    Kind::Forbidden => session
                        .feed(&Request {
                            id,
                            body: Op::Start {
                                name: start.clone(),
                            },
                        })
                        .await
                        .is_ok(),
                    // id, then operation 200: a frame vmd cannot decode.
                    _ => session
                        .get_mut()
                        .write_all(&[0, 0, 0, 3, 5, 0xc8, 0x01])
                        .await
                        .is_ok(),
                };
                if !sent {
                    return false;
                }
            }
            session.flush().await.is_ok()
        };
        if !send(&mut session, DEPTH).await {
            continue;
        }
        while !stop.load(Ordering::Relaxed) {
            match tokio::time::timeout(Duration::from_secs(10), session.next()).await {
                Ok(Some(Ok(_))) => {
                    counts.answers.fetch_add(1, Ordering::Relaxed);
                    if !send(&mut session, 1).await {
                        break;
                    }
                }
                _ => break,
            }
        }
    }
}

/// Runs `plan`; see the module docs.
///
/// # Errors
/// [`LoadError`] if the good client cannot be served.
pub(crate) async fn flood(target: &Target, plan: FloodPlan) -> Result<Report, LoadError> {
    let unloaded = good_p50(target, plan.duration).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(Counts::default());
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..plan.flooders {
        tasks.spawn(flooder(
            target.addr,
            plan.flood_tls.clone(),
            plan.kind,
            stop.clone(),
            counts.clone(),
        ));
    }
    // Let the flood start before measuring.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let log_size = || {
        plan.log
            .as_ref()
            .and_then(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
    };
    let (log_before, cpu_before, began) = (
        log_size(),
        target.server_pid.map(CpuClock::of),
        Instant::now(),
    );
    let (answers_before, sessions_before, refused_before) = (
        counts.answers.load(Ordering::Relaxed),
        counts.sessions.load(Ordering::Relaxed),
        counts.refused.load(Ordering::Relaxed),
    );
    // Window B: the flood alone, for vmd's CPU and log growth.
    tokio::time::sleep(plan.duration).await;
    let elapsed = began.elapsed().as_secs_f64();
    let cpu = cpu_before.and_then(CpuClock::elapsed);
    let log_after = log_size();
    let per_s = |n: u64, before: u64| n.saturating_sub(before) as f64 / elapsed;
    let answers = per_s(counts.answers.load(Ordering::Relaxed), answers_before);
    let sessions = per_s(counts.sessions.load(Ordering::Relaxed), sessions_before);
    let refused = per_s(counts.refused.load(Ordering::Relaxed), refused_before);
    // Window C: the good client during the flood.
    let flooded = good_p50(target, plan.duration).await;
    stop.store(true, Ordering::Relaxed);
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}

    let kind = match plan.kind {
        Kind::Forbidden => "forbidden",
        Kind::Malformed => "malformed",
        Kind::Rightless => "rightless",
    };
    let mut report = Report::new("flood")
        .set("kind", kind)
        .set("flooders", plan.flooders)
        .float("seconds", elapsed, 2)
        .float("refusals_answered_per_s", answers, 1)
        .float("sessions_per_s", sessions, 1)
        .float("refused_or_held_per_s", refused, 1)
        .set("refusals_total", counts.answers.load(Ordering::Relaxed))
        .set("sessions_total", counts.sessions.load(Ordering::Relaxed))
        .set(
            "refused_or_held_total",
            counts.refused.load(Ordering::Relaxed),
        )
        .float("good_p50_us_unloaded", unloaded, 1);
    report = match flooded {
        Ok(p50) => report.float("good_p50_us_flood", p50, 1),
        Err(e) => report.set("good_error", e.to_string()),
    };
    if let Some(cpu) = cpu {
        report = report.float("vmd_cpu_pct", cpu.as_secs_f64() * 100.0 / elapsed, 2);
    }
    if let (Some(before), Some(after)) = (log_before, log_after) {
        report = report.float(
            "log_bytes_per_s",
            after.saturating_sub(before) as f64 / elapsed,
            0,
        );
    }
    Ok(report)
}
