//! A process seen from `/proc`, and the measurements that run the `vmd`
//! binary themselves.
//!
//! `idle`:
//! 1. Starts `vmd serve -c CONFIG` and waits until it accepts TCP.
//! 2. Phase by phase (the client counts given, ascending), opens sessions
//!    until that many are connected, waits a settling second, then samples
//!    the daemon, sleeps the idle window and samples again.
//! 3. Reports per phase: CPU ticks (utime+stime of `/proc/PID/stat`, all
//!    threads), context switches (voluntary and involuntary, summed over
//!    `/proc/PID/task/*/status`), threads, `VmRSS` and `VmHWM`, and the
//!    RSS each extra session costs relative to the previous phase.
//! 4. With `--watchers N`, one more window with one more session holding
//!    N `Watch` requests that nothing answers within it.
//!
//! `startup`: starts the daemon `runs` times; for each, the time from
//! spawning it until a TCP connect succeeds (it listens) and until a first
//! `Host` request over a new mTLS session is answered.

use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use vmd_proto::{Op, Reply, Request, Response};

use crate::load::{self, LoadError, Session};
use crate::report::Report;
use crate::{Daemon, Target};

/// Linux's `USER_HZ`: the unit of `utime`/`stime` (100 on every
/// architecture Linux supports).
const TICKS_PER_SECOND: u64 = 100;

/// How long the daemon may take to listen.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Sessions opened at once while filling a phase.
const OPEN_CONCURRENCY: usize = 8;

/// One look at a process.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Sample {
    /// utime + stime of every thread, dead ones included, in ticks.
    pub(crate) cpu_ticks: u64,
    /// Voluntary context switches of the live threads.
    pub(crate) voluntary: u64,
    /// Involuntary context switches of the live threads.
    pub(crate) involuntary: u64,
    /// Live threads.
    pub(crate) threads: u64,
    /// `VmRSS`, KiB.
    pub(crate) rss_kib: u64,
    /// `VmHWM`, KiB.
    pub(crate) hwm_kib: u64,
}

fn status_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// utime + stime and the thread count from `/proc/PID/stat`.
fn stat(pid: u32) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after
    // the last ')'. Field n of proc(5) is at index n - 3 from there.
    let fields: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
    let num = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some((num(14)? + num(15)?, num(20)?))
}

impl Sample {
    /// Reads `/proc/PID`; `None` if the process is gone.
    pub(crate) fn of(pid: u32) -> Option<Self> {
        let (cpu_ticks, threads) = stat(pid)?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let mut sample = Self {
            cpu_ticks,
            threads,
            rss_kib: status_field(&status, "VmRSS:")?,
            hwm_kib: status_field(&status, "VmHWM:")?,
            ..Self::default()
        };
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))
            .ok()?
            .flatten()
        {
            let Ok(text) = std::fs::read_to_string(task.path().join("status")) else {
                continue; // the thread just exited
            };
            sample.voluntary += status_field(&text, "voluntary_ctxt_switches:").unwrap_or(0);
            sample.involuntary += status_field(&text, "nonvoluntary_ctxt_switches:").unwrap_or(0);
        }
        Some(sample)
    }
}

/// A process's CPU time at one moment.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CpuClock {
    pid: u32,
    ticks: Option<u64>,
}

impl CpuClock {
    pub(crate) fn of(pid: u32) -> Self {
        Self {
            pid,
            ticks: stat(pid).map(|(ticks, _)| ticks),
        }
    }

    /// CPU time used since [`CpuClock::of`].
    pub(crate) fn elapsed(self) -> Option<Duration> {
        let now = stat(self.pid)?.0;
        let ticks = now.checked_sub(self.ticks?)?;
        Some(Duration::from_millis(ticks * 1000 / TICKS_PER_SECOND))
    }
}

/// The daemon, killed (SIGKILL) when dropped.
struct Running {
    child: Child,
    pid: u32,
}

/// Spawns `vmd serve -c CONFIG` with its log discarded.
fn spawn(daemon: &Daemon) -> std::io::Result<Running> {
    let child = Command::new(&daemon.vmd)
        .arg("serve")
        .arg("-c")
        .arg(&daemon.config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child
        .id()
        .ok_or_else(|| std::io::Error::other("vmd exited at once"))?;
    Ok(Running { child, pid })
}

/// Retries a TCP connect until it succeeds; the time since `began`.
async fn until_listening(
    running: &mut Running,
    addr: std::net::SocketAddr,
    began: Instant,
) -> Result<Duration, Box<dyn std::error::Error>> {
    loop {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(began.elapsed());
        }
        if let Some(status) = running.child.try_wait()? {
            return Err(format!(
                "vmd exited with {status} before listening (run it by hand with -c to see why)"
            )
            .into());
        }
        if began.elapsed() > LISTEN_TIMEOUT {
            return Err(format!("vmd did not listen on {addr} within {LISTEN_TIMEOUT:?}").into());
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

/// Opens `n` sessions, a few at a time.
async fn open_many(
    target: &Target,
    tls: &vmd_client::ClientTls,
    n: usize,
) -> Result<Vec<Session>, LoadError> {
    let mut sessions = Vec::with_capacity(n);
    while sessions.len() < n {
        let batch = OPEN_CONCURRENCY.min(n - sessions.len());
        let opened =
            futures_util::future::join_all((0..batch).map(|_| load::open(target.addr, tls))).await;
        for s in opened {
            sessions.push(s?.0);
        }
    }
    Ok(sessions)
}

/// See the module docs.
///
/// # Errors
/// If the daemon does not start or a session cannot be opened.
pub(crate) async fn idle(
    target: &Target,
    daemon: &Daemon,
    window: Duration,
    clients: &[usize],
    watchers: usize,
) -> Result<Vec<Report>, Box<dyn std::error::Error>> {
    let tls = target.tls()?;
    let mut running = spawn(daemon)?;
    until_listening(&mut running, target.addr, Instant::now()).await?;
    let mut phases: Vec<usize> = clients.to_vec();
    phases.sort_unstable();
    phases.dedup();
    let mut sessions = Vec::new();
    let mut reports = Vec::new();
    let mut previous: Option<(usize, Sample)> = None;
    for clients in phases {
        if clients > sessions.len() {
            sessions.extend(open_many(target, &tls, clients - sessions.len()).await?);
        }
        let (before, after) = idle_window(running.pid, window).await?;
        let mut report = idle_report(clients, window, &before, &after);
        if before.threads != after.threads {
            report = report.set("threads_before", before.threads);
        }
        if let Some((n, prev)) = previous.filter(|(n, _)| clients > *n) {
            let per = (after.rss_kib as f64 - prev.rss_kib as f64) / (clients - n) as f64;
            report = report.float("rss_kib_per_extra_client", per, 1);
        }
        previous = Some((clients, after));
        reports.push(report);
    }
    if watchers > 0 {
        // One more connection holding `watchers` long polls that nothing
        // will answer within the window (vmd follows systemd's signals
        // from the first one on, if it has a bus).
        let (mut session, _) = load::open(target.addr, &tls).await?;
        let generation = watch_snapshot(&mut session).await?;
        for id in (2u32..).take(watchers) {
            session
                .send(&Request {
                    id,
                    body: Op::Watch {
                        since: generation,
                        vms: Vec::new(),
                        timeout_ms: 300_000,
                    },
                })
                .await?;
        }
        let (before, after) = idle_window(running.pid, window).await?;
        reports.push(
            idle_report(sessions.len() + 1, window, &before, &after).set("watchers", watchers),
        );
        drop(session);
    }
    drop(sessions);
    running.child.kill().await?;
    Ok(reports)
}

/// A settling second, then samples of `pid` around an idle `window`.
async fn idle_window(
    pid: u32,
    window: Duration,
) -> Result<(Sample, Sample), Box<dyn std::error::Error>> {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = Sample::of(pid).ok_or("vmd is gone")?;
    tokio::time::sleep(window).await;
    let after = Sample::of(pid).ok_or("vmd is gone")?;
    Ok((before, after))
}

/// What an idle window cost the daemon.
fn idle_report(clients: usize, window: Duration, before: &Sample, after: &Sample) -> Report {
    Report::new("idle")
        .set("clients", clients)
        .float("seconds", window.as_secs_f64(), 1)
        .set("cpu_ticks", after.cpu_ticks - before.cpu_ticks)
        .set(
            "voluntary_switches",
            after.voluntary.saturating_sub(before.voluntary),
        )
        .set(
            "involuntary_switches",
            after.involuntary.saturating_sub(before.involuntary),
        )
        .set("threads", after.threads)
        .float("rss_mib", after.rss_kib as f64 / 1024.0, 2)
        .float("hwm_mib", after.hwm_kib as f64 / 1024.0, 2)
}

/// A first `Watch` (a snapshot, answered at once): its generation.
async fn watch_snapshot(session: &mut Session) -> Result<u64, Box<dyn std::error::Error>> {
    session
        .send(&Request {
            id: 1,
            body: Op::Watch {
                since: 0,
                vms: Vec::new(),
                timeout_ms: 1,
            },
        })
        .await?;
    match session.next().await {
        Some(Ok(Ok(Response {
            result: Ok(Reply::Changed(event)),
            ..
        }))) => Ok(event.generation),
        other => Err(format!("no Watch snapshot: {other:?}").into()),
    }
}

/// See the module docs.
///
/// # Errors
/// If the daemon does not start or does not answer.
pub(crate) async fn startup(
    target: &Target,
    daemon: &Daemon,
    runs: usize,
) -> Result<Report, Box<dyn std::error::Error>> {
    let tls = target.tls()?;
    let mut listen = Vec::with_capacity(runs);
    let mut reply = Vec::with_capacity(runs);
    for _ in 0..runs {
        let began = Instant::now();
        let mut running = spawn(daemon)?;
        // From before the spawn: the child may run to its listen() before
        // spawn() returns here.
        listen.push(until_listening(&mut running, target.addr, began).await?);
        let (mut session, _) = load::open(target.addr, &tls).await?;
        session
            .send(&Request {
                id: 1,
                body: Op::Host,
            })
            .await?;
        match session.next().await {
            Some(Ok(Ok(response))) if response.result.is_ok() => {}
            other => return Err(format!("no Host reply: {other:?}").into()),
        }
        reply.push(began.elapsed());
        drop(session);
        running.child.kill().await?;
        // Let the port and the CPU settle before the next run.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The value at `permille` of the sorted runs (nearest rank below).
    let ms = |v: &mut Vec<Duration>, permille: usize| {
        v.sort_unstable();
        let i = (v.len() - 1) * permille.min(1000) / 1000;
        v[i].as_secs_f64() * 1000.0
    };
    Ok(Report::new("startup")
        .set("runs", runs)
        .float("listen_ms_min", ms(&mut listen, 0), 2)
        .float("listen_ms_p50", ms(&mut listen, 500), 2)
        .float("listen_ms_max", ms(&mut listen, 1000), 2)
        .float("first_reply_ms_p50", ms(&mut reply, 500), 2)
        .float("first_reply_ms_max", ms(&mut reply, 1000), 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_process_is_sampled() {
        let sample = Sample::of(std::process::id()).expect("this process is alive");
        assert!(sample.threads >= 1);
        assert!(sample.rss_kib > 0 && sample.hwm_kib >= sample.rss_kib);
        assert!(sample.voluntary + sample.involuntary > 0, "{sample:?}");
    }

    #[test]
    fn cpu_time_only_grows() {
        let clock = CpuClock::of(std::process::id());
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(clock.elapsed().is_some());
    }

    #[test]
    fn a_missing_process_is_none() {
        // PIDs are below 2^22 on Linux.
        assert!(Sample::of(u32::MAX).is_none());
        assert!(CpuClock::of(u32::MAX).elapsed().is_none());
    }

    #[test]
    fn status_fields_parse_with_units() {
        let status = "Name:\tvmd\nVmRSS:\t   6604 kB\nvoluntary_ctxt_switches:\t12\n";
        assert_eq!(status_field(status, "VmRSS:"), Some(6604));
        assert_eq!(status_field(status, "voluntary_ctxt_switches:"), Some(12));
        assert_eq!(status_field(status, "VmHWM:"), None);
    }
}
