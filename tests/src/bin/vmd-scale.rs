//! `vmd-scale`: how `ListVms` and `GetVm` latency grow with the number of
//! declared VMs, against real systemd (booted in systemd-nspawn) running a
//! real QEMU (TCG, no guest OS) per running VM, with vmd over real mTLS.
//!
//! ```text
//! vmd-scale --bench target/release/vmd-bench --vms 1,10,100 [--running 100]
//!           [--seconds 5] [--json]
//! ```
//!
//! 1. For each VM count, lays out a microvm.nix host with that many VMs,
//!    the first `--running` (default: all) wanted by `microvms.target`,
//!    boots the container, starts the target and waits until every running
//!    VM's QMP socket greets.
//! 2. Starts vmd in this process on `127.0.0.1:0` with that inventory and
//!    the container's bus, and the per-identity request rate lifted.
//! 3. Runs `vmd-bench requests` (one connection, one request in flight:
//!    latency, not throughput) for `list` and for `get` of the first VM,
//!    and prints its results with `vms` and `running` added.
//!
//! With `--idle-watchers N --vmd PATH`, instead: one host of the first
//! `--vms` count, and the `vmd` binary started by `vmd-bench idle` with a
//! config for that host (its inventory, the container's bus), so vmd's
//! subscription to systemd's unit signals is live while N `Watch`
//! requests wait and nothing changes for `--idle-seconds` (default 60):
//! its CPU ticks and context switches then are the cost of following
//! systemd without polling.
//!
//! With `--metrics` (with `--idle-watchers`), vmd's metrics listener is on
//! during the idle run (not scraped: it must cost nothing), and afterwards
//! a vmd in this process serving the same host is scraped over one
//! kept-alive mTLS connection, as Prometheus does, for `--seconds`: the
//! scrape's latency percentiles and size (`op` = `scrape`).
//!
//! With `--system-cpu`, each measurement also reports the CPU time every
//! process serving the reads spent per request (`cpu_us_per_req_*`): vmd
//! (this process's threads), the client (`vmd-bench`, reaped child), and,
//! in the container, systemd (its PID 1), dbus-daemon, the QEMUs and the
//! rest (journald, logind, …), from `/proc/PID/task/*/schedstat`; each
//! net of what it burns in an idle window of `--seconds` just before (no
//! client), with the raw numbers and idle rates beside, and
//! `qemu_wakeups_per_req`: the QEMU threads' voluntary context switches
//! per request above idle (0 when reads never reach QEMU).
//!
//! Needs root, systemd-container, dbus and qemu-system-x86, like the
//! `system-tests` suites. It prints numbers; it asserts nothing about them.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::UnixStream;
use vmd::vms::inventory::InventorySource;
use vmd_tests::TestServer;
use vmd_tests::microvm::{DeclaredVm, MicrovmHost};
use vmd_tests::nspawn::SystemdContainer;

struct Args {
    bench: PathBuf,
    vms: Vec<usize>,
    running: Option<usize>,
    seconds: f64,
    json: bool,
    idle_watchers: usize,
    idle_seconds: f64,
    vmd: Option<PathBuf>,
    system_cpu: bool,
    metrics: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: vmd-scale --bench PATH [--vms 1,10,100] [--running N] [--seconds S] [--system-cpu] [--json]\n\
         \x20      vmd-scale --bench PATH --vmd PATH --idle-watchers N [--idle-seconds S] [--vms N] [--metrics] [--json]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut args = Args {
        bench: PathBuf::new(),
        vms: vec![1, 10, 100],
        running: None,
        seconds: 5.0,
        json: false,
        idle_watchers: 0,
        idle_seconds: 60.0,
        vmd: None,
        system_cpu: false,
        metrics: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--bench" => args.bench = value().into(),
            "--vms" => {
                args.vms = value()
                    .split(',')
                    .map(|n| n.parse().unwrap_or_else(|_| usage()))
                    .collect();
            }
            "--running" => args.running = Some(value().parse().unwrap_or_else(|_| usage())),
            "--seconds" => args.seconds = value().parse().unwrap_or_else(|_| usage()),
            "--json" => args.json = true,
            "--idle-watchers" => {
                args.idle_watchers = value().parse().unwrap_or_else(|_| usage());
            }
            "--idle-seconds" => args.idle_seconds = value().parse().unwrap_or_else(|_| usage()),
            "--vmd" => args.vmd = Some(value().into()),
            "--system-cpu" => args.system_cpu = true,
            "--metrics" => args.metrics = true,
            _ => usage(),
        }
    }
    if !args.bench.is_file() {
        eprintln!("vmd-scale: --bench must name the vmd-bench binary");
        usage();
    }
    if args.idle_watchers > 0 && !args.vmd.as_deref().is_some_and(Path::is_file) {
        eprintln!("vmd-scale: --idle-watchers needs --vmd naming the vmd binary");
        usage();
    }
    args
}

/// Waits until QEMU greets on `socket`.
async fn wait_for_qmp(socket: &Path) {
    let ready = async {
        loop {
            if let Ok(stream) = UnixStream::connect(socket).await
                && let Ok(Some(_)) = BufReader::new(stream).lines().next_line().await
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(120), ready)
        .await
        .unwrap_or_else(|_| panic!("QEMU never answered on {}", socket.display()));
}

/// Runs vmd-bench against `server` and returns its JSON results.
async fn bench(args: &Args, server: &TestServer, extra: &[&str]) -> Vec<Value> {
    let mut cmd = tokio::process::Command::new(&args.bench);
    cmd.arg("--json").arg("requests");
    // vmctl's flags name the TLS files; vmd-bench takes the address alone.
    let vmctl = server.vmctl_args("bench");
    for pair in vmctl.chunks(2) {
        match pair[0].as_str() {
            "--endpoint" => {
                cmd.arg("--addr").arg(pair[1].trim_start_matches("tcp://"));
            }
            flag => {
                cmd.arg(flag).arg(&pair[1]);
            }
        }
    }
    cmd.args(["--connections", "1", "--pipeline", "1", "--duration"])
        .arg(args.seconds.to_string())
        .args(extra);
    let out = cmd.output().await.expect("vmd-bench runs");
    assert!(
        out.status.success(),
        "vmd-bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A microvm host of `count` VMs, the first `running` started, in a
/// booted container.
async fn boot_host(count: usize, running: usize) -> (MicrovmHost, SystemdContainer) {
    let declared: Vec<DeclaredVm> = (0..count)
        .map(|i| {
            // MicrovmHost takes static names; a bench run declares few.
            let vm = DeclaredVm::new(Box::leak(format!("vm-{i:03}").into_boxed_str()));
            if i < running { vm.autostart() } else { vm }
        })
        .collect();
    let host = MicrovmHost::new(&declared);
    let container = host
        .container()
        .boot_timeout(Duration::from_secs(120))
        .boot()
        .await;
    let started = Instant::now();
    container.systemctl(&["start", "microvms.target"]).await;
    for vm in declared.iter().filter(|vm| vm.autostart) {
        wait_for_qmp(&host.socket(vm.name)).await;
    }
    eprintln!(
        "vmd-scale: {count} VMs declared, {running} QEMUs up in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    (host, container)
}

async fn measure(args: &Args, count: usize) -> Vec<Value> {
    let running = args.running.unwrap_or(count).min(count);
    let (host, container) = boot_host(count, running).await;
    let server = TestServer::start_with(|c| {
        c.vms.inventory = InventorySource {
            state_dir: host.state_dir(),
            file: Some(host.inventory()),
        };
        c.vms.systemd_bus = Some(container.bus_address());
        c.vms.cgroup_root = container.cgroup_root();
        c.limits.identity.requests_per_second = 1e6;
        c.limits.identity.burst = 1_000_000;
    })
    .await;
    let leader = container.leader();
    let idle = if args.system_cpu {
        Some(system_cpu::idle(leader, args.seconds).await)
    } else {
        None
    };
    let mut results = Vec::new();
    for extra in [&["--op", "list"][..], &["--op", "get", "--vm", "vm-000"]] {
        let before = idle.as_ref().map(|_| system_cpu::Sample::take(leader));
        let mut rows = bench(args, &server, extra).await;
        if let (Some(idle), Some(before)) = (&idle, before) {
            let after = system_cpu::Sample::take(leader);
            rows.iter_mut()
                .for_each(|r| system_cpu::annotate(r, idle, &before, &after));
        }
        results.extend(rows);
    }
    for r in &mut results {
        r["vms"] = count.into();
        r["running"] = running.into();
    }
    server.stop().await;
    container.stop().await;
    results
}

/// `vmd-bench idle` of a `vmd` process serving a booted host, with
/// `--idle-watchers` watches held (see the module docs).
async fn idle_watching(args: &Args, vmd: &Path) -> Vec<Value> {
    let count = args.vms.first().copied().unwrap_or(1);
    let running = args.running.unwrap_or(count).min(count);
    let (host, container) = boot_host(count, running).await;
    let pki = vmd_tests::TestPki::new();
    let tls = pki.server_paths();
    let (cert, key) = pki.client_files(pki.ca(), "bench", vmd::pki::Validity::days_from_now(1));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port();
    let config = pki.scratch().join("vmd.toml");
    let path = |p: &Path| p.display().to_string();
    let metrics = if args.metrics {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port");
        format!("[listen.metrics]\naddress = \"{addr}\"\n")
    } else {
        String::new()
    };
    std::fs::write(
        &config,
        format!(
            "[listen]\ntcp = [\"127.0.0.1:{port}\"]\n[listen.vsock]\nenable = false\n{metrics}\
             [tls]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n\
             [vms]\nstate_dir = {state:?}\ninventory = {inventory:?}\nsystemd_bus = {bus:?}\n{cgroup}\
             [policy]\ndefault_role = \"reader\"\n",
            ca = path(&tls.ca),
            cert = path(&tls.cert),
            key = path(&tls.key),
            state = path(&host.state_dir()),
            inventory = path(&host.inventory()),
            bus = container.bus_address(),
            cgroup = container
                .cgroup_root()
                .map(|root| format!("cgroup_root = {:?}\n", path(&root)))
                .unwrap_or_default(),
        ),
    )
    .expect("write the vmd config");
    let out = tokio::process::Command::new(&args.bench)
        .arg("--json")
        .arg("idle")
        .arg("--addr")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--ca")
        .arg(pki.ca_cert())
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .arg("--vmd")
        .arg(vmd)
        .arg("--config")
        .arg(&config)
        .args(["--clients", "0", "--watchers"])
        .arg(args.idle_watchers.to_string())
        .arg("--seconds")
        .arg(args.idle_seconds.to_string())
        .output()
        .await
        .expect("vmd-bench runs");
    assert!(
        out.status.success(),
        "vmd-bench idle failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut results: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    for r in &mut results {
        r["vms"] = count.into();
        r["running"] = running.into();
        r["systemd"] = "nspawn".into();
        r["metrics_listener"] = args.metrics.into();
    }
    if args.metrics {
        let mut row = scrapes(args, &host, &container).await;
        row["vms"] = count.into();
        row["running"] = running.into();
        results.push(row);
    }
    container.stop().await;
    results
}

/// Scrapes of a vmd in this process serving `host`, over one kept-alive
/// mTLS connection for `--seconds`: latency percentiles and size.
async fn scrapes(args: &Args, host: &MicrovmHost, container: &SystemdContainer) -> Value {
    let server = TestServer::start_with(|c| {
        c.metrics = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
        c.vms.inventory = InventorySource {
            state_dir: host.state_dir(),
            file: Some(host.inventory()),
        };
        c.vms.systemd_bus = Some(container.bus_address());
        c.vms.cgroup_root = container.cgroup_root();
        c.limits.identity.requests_per_second = 1e6;
        c.limits.identity.burst = 1_000_000;
    })
    .await;
    let addr = server.metrics_addr.expect("metrics listener");
    let tls = vmd_tests::scrape::metrics_tls(&server.pki, "bench");
    let mut conn = vmd_tests::scrape::KeptAlive::connect(addr, tls)
        .await
        .expect("metrics connection");
    let (status, bytes) = conn.get("/metrics").await.expect("first scrape");
    assert_eq!(status, 200, "scrape answered {status}");
    let mut latencies = Vec::new();
    let until = Instant::now() + Duration::from_secs_f64(args.seconds);
    while Instant::now() < until {
        let start = Instant::now();
        let (status, _) = conn.get("/metrics").await.expect("scrape");
        latencies.push(start.elapsed());
        assert_eq!(status, 200);
    }
    latencies.sort();
    let pct = |p: usize| {
        let i = (latencies.len() * p / 100).min(latencies.len() - 1);
        u64::try_from(latencies[i].as_micros()).unwrap_or(u64::MAX)
    };
    let row = serde_json::json!({
        "op": "scrape",
        "scrapes": latencies.len(),
        "p50_us": pct(50),
        "p90_us": pct(90),
        "p99_us": pct(99),
        "bytes": bytes,
    });
    server.stop().await;
    row
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    if let Some(vmd) = args.vmd.clone().filter(|_| args.idle_watchers > 0) {
        for r in idle_watching(&args, &vmd).await {
            if args.json {
                println!("{r}");
            } else {
                println!("idle: {r}");
            }
        }
        return;
    }
    for &count in &args.vms {
        for r in measure(&args, count).await {
            if args.json {
                println!("{r}");
            } else {
                println!(
                    "scale: vms={} running={} op={} p50_us={} p90_us={} p99_us={} req_per_s={} errors={}",
                    r["vms"],
                    r["running"],
                    r["op"],
                    r["p50_us"],
                    r["p90_us"],
                    r["p99_us"],
                    r["req_per_s"],
                    r["errors"]
                );
            }
        }
    }
}

/// `--system-cpu` (see the module docs): the CPU time of vmd, its client
/// and every process of the container, per request.
mod system_cpu {
    use std::collections::BTreeMap;
    use std::time::{Duration, Instant};

    use serde_json::Value;

    /// `vmd-bench requests`' default warm-up, seconds: requests answered
    /// then are not in its `requests` count but their CPU is in the window.
    const WARMUP: f64 = 0.5;
    /// Linux's `USER_HZ`, the unit of `cutime`/`cstime`.
    const TICK_NS: f64 = 1e7;
    const GROUPS: [&str; 7] = [
        "vmd",
        "client",
        "systemd",
        "dbus",
        "qemu",
        "other",
        "qemu_wakeups",
    ];

    /// CPU ns per group, and the QEMU threads' voluntary context switches.
    pub(crate) struct Sample {
        at: Instant,
        by: BTreeMap<&'static str, f64>,
        qemus: u64,
    }

    /// Idle rates per group, per second.
    pub(crate) struct Idle(BTreeMap<&'static str, f64>);

    fn stat_fields(pid: u32) -> Option<Vec<String>> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let after = text.rsplit_once(')')?.1;
        Some(after.split_whitespace().map(str::to_owned).collect())
    }

    /// Field `n` of proc(5)'s `/proc/PID/stat` (1-based).
    fn field(fields: &[String], n: usize) -> f64 {
        fields
            .get(n - 3)
            .and_then(|f| f.parse().ok())
            .unwrap_or(0.0)
    }

    /// ns of every live thread of `pid` (schedstat) and their voluntary
    /// context switches.
    fn threads(pid: u32) -> (f64, f64) {
        let (mut ns, mut switches) = (0.0, 0.0);
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return (0.0, 0.0);
        };
        for task in tasks.flatten() {
            let dir = task.path();
            if let Ok(text) = std::fs::read_to_string(dir.join("schedstat")) {
                ns += text
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<f64>().ok())
                    .unwrap_or(0.0);
            }
            if let Ok(text) = std::fs::read_to_string(dir.join("status")) {
                switches += text
                    .lines()
                    .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .unwrap_or(0.0);
            }
        }
        (ns, switches)
    }

    impl Sample {
        /// Looks at this process and every process under `leader`.
        pub(crate) fn take(leader: u32) -> Self {
            let mut by: BTreeMap<&'static str, f64> = GROUPS.iter().map(|g| (*g, 0.0)).collect();
            let mut qemus = 0;
            let me = std::process::id();
            *by.get_mut("vmd").expect("a group") = threads(me).0;
            // Reaped children: the vmd-bench runs.
            if let Some(f) = stat_fields(me) {
                *by.get_mut("client").expect("a group") = (field(&f, 16) + field(&f, 17)) * TICK_NS;
            }
            let mut parent = BTreeMap::new();
            for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|p| p.parse::<u32>().ok())
                else {
                    continue;
                };
                // Field 4 of proc(5): the parent.
                if let Some(ppid) = stat_fields(pid).and_then(|f| f.get(1)?.parse::<u32>().ok()) {
                    parent.insert(pid, ppid);
                }
            }
            let under = |mut pid: u32| {
                while pid > 1 {
                    if pid == leader {
                        return true;
                    }
                    pid = parent.get(&pid).copied().unwrap_or(0);
                }
                false
            };
            for &pid in parent.keys().filter(|&&pid| under(pid)) {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                let group = match comm.trim() {
                    _ if pid == leader => "systemd",
                    "dbus-daemon" | "dbus-broker" | "dbus-broker-lau" => "dbus",
                    c if c.starts_with("qemu-system") => "qemu",
                    _ => "other",
                };
                let (ns, switches) = threads(pid);
                // Children it reaped count for it (systemd's helpers).
                let reaped =
                    stat_fields(pid).map_or(0.0, |f| (field(&f, 16) + field(&f, 17)) * TICK_NS);
                *by.get_mut(group).expect("a group") += ns + reaped;
                if group == "qemu" {
                    *by.get_mut("qemu_wakeups").expect("a group") += switches;
                    qemus += 1;
                }
            }
            Self {
                at: Instant::now(),
                by,
                qemus,
            }
        }
    }

    /// Every group's rate over `seconds` of nothing asked, once the QEMUs
    /// have settled (their firmware done: under 2 % of a core each over a
    /// second, or 30 s and one more per QEMU have passed).
    pub(crate) async fn idle(leader: u32, seconds: f64) -> Idle {
        let mut last = Sample::take(leader);
        let deadline = Instant::now() + Duration::from_secs(30 + last.qemus);
        while Instant::now() < deadline {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = Sample::take(leader);
            let busy = now.by["qemu"] - last.by["qemu"];
            last = now;
            if busy < 0.02e9 * last.qemus as f64 {
                break;
            }
        }
        let a = Sample::take(leader);
        tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
        let b = Sample::take(leader);
        let secs = b.at.duration_since(a.at).as_secs_f64();
        Idle(
            GROUPS
                .iter()
                .map(|g| (*g, (b.by[g] - a.by[g]) / secs))
                .collect(),
        )
    }

    /// Adds the per-request CPU of each group to `row` (a `vmd-bench
    /// requests` result measured between `a` and `b`).
    pub(crate) fn annotate(row: &mut Value, idle: &Idle, a: &Sample, b: &Sample) {
        let requests = row["requests"].as_f64().unwrap_or(0.0);
        let rate = row["req_per_s"].as_f64().unwrap_or(0.0);
        let all = (requests + rate * WARMUP).max(1.0);
        let secs = b.at.duration_since(a.at).as_secs_f64();
        let round = |x: f64, digits: i32| {
            let k = 10f64.powi(digits);
            (x * k).round() / k
        };
        let mut total = 0.0;
        for g in GROUPS {
            let raw = (b.by[g] - a.by[g]) / all;
            // The client does not run in the idle window.
            let idle_rate = if g == "client" { 0.0 } else { idle.0[g] };
            let net = raw - idle_rate * secs / all;
            if g == "qemu_wakeups" {
                // Signed: about 0 (noise either way) unless reads reach QEMU.
                row["qemu_wakeups_per_req"] = round(net, 3).into();
                continue;
            }
            let net = net.max(0.0);
            row[format!("cpu_us_per_req_{g}")] = round(net / 1e3, 1).into();
            row[format!("cpu_us_per_req_{g}_raw")] = round(raw / 1e3, 1).into();
            row[format!("idle_cpu_ms_per_s_{g}")] = round(idle_rate / 1e6, 2).into();
            total += net;
        }
        row["cpu_us_per_req_total"] = round(total / 1e3, 1).into();
    }
}
