//! The metrics listener against real programs: a real Prometheus server
//! (Debian's `prometheus`) scrapes vmd over mutual TLS with a
//! metrics-only certificate, while vmd serves a real microvm host (systemd
//! booted in nspawn running QEMU); Prometheus's own query API must show the
//! running VM, then the stopped one after `vmctl stop`. The metrics identity
//! is `Forbidden` everything on the main listener; a reader with a visible
//! scope sees only its VMs' series. Scrapes without a certificate, with a
//! foreign CA's certificate, or with an identity no rule names are refused,
//! and the real `vmd` binary's audit log says so. A scraper that stops
//! reading its answers is cut off after the write timeout.
//!
//! A missing `prometheus` (or systemd, QEMU) fails the suite.

#![cfg(feature = "system-tests")]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use serde_json::Value;
use vmd::pki::{CertificateAuthority, Validity};
use vmd::policy::{IdentityRule, Scope};
use vmd_proto::Role;
use vmd_tests::TestPki;
use vmd_tests::process::DaemonProcess;
use vmd_tests::rig::{AUTO, COLD, GUARDED, MicrovmRig};
use vmd_tests::scrape::{self, anonymous_tls, encode_query, metrics_tls, metrics_tls_from};

/// Debian's Prometheus server.
const PROMETHEUS: &str = "/usr/bin/prometheus";

/// A Prometheus server of its own, in a temporary directory.
struct Prometheus {
    child: tokio::process::Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` every second over mTLS with
    /// `identity`'s certificate from `pki`.
    async fn start(pki: &TestPki, identity: &str, target: SocketAddr) -> Self {
        assert!(
            Path::new(PROMETHEUS).exists(),
            "{PROMETHEUS} is missing: install Debian's prometheus package"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = pki.client_files(pki.ca(), identity, Validity::days_from_now(1));
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                r#"global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: vmd
    scheme: https
    tls_config:
      ca_file: {ca:?}
      cert_file: {cert:?}
      key_file: {key:?}
      server_name: {server:?}
    static_configs:
      - targets: ["{target}"]
"#,
                ca = pki.ca_cert().display().to_string(),
                cert = cert.display().to_string(),
                key = key.display().to_string(),
                server = vmd_proto::SERVER_NAME,
            ),
        )
        .expect("prometheus.yml");
        let addr = free_port();
        let child = tokio::process::Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).expect("log"))
            .kill_on_drop(true)
            .spawn()
            .expect("prometheus starts");
        let prometheus = Self {
            child,
            addr,
            _dir: dir,
        };
        prometheus.wait_ready().await;
        prometheus
    }

    async fn wait_ready(&self) {
        for _ in 0..200 {
            if let Ok(answer) = scrape::get(self.addr, "/-/ready").await
                && answer.status == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("prometheus not ready: {}", self.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// The instant vector of `query`, from Prometheus's HTTP API.
    async fn query(&self, query: &str) -> Vec<Value> {
        let path = format!("/api/v1/query?query={}", encode_query(query));
        let answer = scrape::get(self.addr, &path).await.expect("query API");
        assert_eq!(answer.status, 200, "{answer:?}");
        let json: Value = serde_json::from_str(&answer.body).expect("JSON");
        assert_eq!(json["status"], "success", "{json}");
        json["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Waits until `query` gives one sample with `value`; the scrape
    /// target's health is in the panic message otherwise.
    async fn until(&self, query: &str, value: &str) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            let result = self.query(query).await;
            if let [sample] = result.as_slice()
                && sample["value"][1] == value
            {
                return sample.clone();
            }
            if tokio::time::Instant::now() > deadline {
                let targets = scrape::get(self.addr, "/api/v1/targets")
                    .await
                    .map(|a| a.body)
                    .unwrap_or_default();
                panic!("{query} never gave {value}: last {result:?}; targets {targets}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

/// The `vm` label values of `vmd_vm_state` series in a scrape.
fn vms_in(text: &str) -> Vec<String> {
    let mut vms: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("vmd_vm_state{vm=\""))
        .filter_map(|l| l.split('"').next())
        .map(str::to_owned)
        .collect();
    vms.sort();
    vms.dedup();
    vms
}

#[tokio::test]
async fn prometheus_scrapes_a_real_host_over_mtls() {
    let rig = MicrovmRig::start(|c| {
        c.metrics = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        c.policy
            .identities
            .push(IdentityRule::new("prometheus", Some(Role::Metrics)));
        c.policy.identities.push(IdentityRule {
            visible: Scope::of([COLD]),
            ..IdentityRule::new("cold-reader", Some(Role::Reader))
        });
    })
    .await;
    let target = rig.server.metrics_addr.expect("metrics listener bound");
    let prometheus = Prometheus::start(&rig.server.pki, "prometheus", target).await;

    // The running VM, as Prometheus stored it from its scrapes.
    let running = r#"vmd_vm_state{vm="auto-vm",state="running"}"#;
    let sample = prometheus.until(running, "1").await;
    assert_eq!(sample["metric"]["job"], "vmd", "{sample}");
    prometheus
        .until(r#"vmd_vm_state{vm="auto-vm",state="stopped"}"#, "0")
        .await;
    prometheus
        .until(r#"vmd_vm_state{vm="cold-vm",state="stopped"}"#, "1")
        .await;
    let cpu = prometheus
        .query(r#"vmd_vm_cpu_seconds_total{vm="auto-vm"}"#)
        .await;
    assert_eq!(cpu.len(), 1, "QEMU's CPU time from its cgroup: {cpu:?}");
    let kvm = prometheus.query("vmd_host_kvm_available").await;
    assert_eq!(kvm.len(), 1, "{kvm:?}");

    // The change shows in Prometheus's next scrapes.
    rig.vmctl_ok(&["stop", AUTO, "--wait"]).await;
    prometheus
        .until(r#"vmd_vm_state{vm="auto-vm",state="stopped"}"#, "1")
        .await;
    prometheus.until(running, "0").await;
    let ops = prometheus
        .query(r#"vmd_operations_total{kind="shutdown",outcome="succeeded"}"#)
        .await;
    assert_eq!(ops.len(), 1, "{ops:?}");

    // The metrics identity may do nothing else.
    let out = rig.vmctl("prometheus", &["list"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "vmctl list as prometheus succeeded");
    assert!(
        stderr.to_lowercase().contains("forbidden") && stderr.contains("role metrics"),
        "{stderr}"
    );
    let out = rig.vmctl("prometheus", &["start", AUTO]).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .to_lowercase()
            .contains("forbidden")
    );

    // A reader sees only its visible VMs' series; an unscoped one all.
    let pki = &rig.server.pki;
    let scoped = scrape::metrics(target, metrics_tls(pki, "cold-reader"), "GET", "/metrics")
        .await
        .expect("scrape");
    assert_eq!(scoped.status, 200, "{scoped:?}");
    assert!(
        scoped
            .headers
            .to_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{}",
        scoped.headers
    );
    assert_eq!(vms_in(&scoped.body), [COLD], "{}", scoped.body);
    assert!(scoped.body.ends_with("# EOF\n"));
    let all = scrape::metrics(target, metrics_tls(pki, "prometheus"), "GET", "/metrics")
        .await
        .expect("scrape");
    assert_eq!(vms_in(&all.body), [GUARDED, AUTO, COLD], "{}", all.body);

    // Other paths and methods.
    let tls = metrics_tls(pki, "prometheus");
    let answer = scrape::metrics(target, tls.clone(), "GET", "/")
        .await
        .expect("answer");
    assert_eq!(answer.status, 404, "{answer:?}");
    let answer = scrape::metrics(target, tls, "POST", "/metrics")
        .await
        .expect("answer");
    assert_eq!(answer.status, 405, "{answer:?}");
}

/// The real `vmd` binary with the metrics listener, for its audit log;
/// `limits` are more lines of its `[limits]` table.
async fn daemon(pki: &TestPki, limits: &str) -> (DaemonProcess, SocketAddr) {
    let tls = pki.server_paths();
    let dir = pki.scratch();
    let config = dir.join("vmd.toml");
    std::fs::write(
        dir.join("inventory.toml"),
        "[vm.gui-vm]\nhypervisor = \"qemu\"\n",
    )
    .expect("inventory");
    std::fs::write(
        &config,
        format!(
            r#"
            [listen]
            tcp = ["127.0.0.1:0"]
            [listen.vsock]
            enable = false
            [listen.hybrid_vsock]
            enable = false
            [listen.metrics]
            address = "127.0.0.1:0"
            [tls]
            ca = {ca:?}
            cert = {cert:?}
            key = {key:?}
            [limits]
            handshake_timeout_secs = 2
            {limits}
            [vms]
            state_dir = {state:?}
            inventory = {inventory:?}
            systemd_bus = "unix:path={dir}/no-such-bus"
            [[policy.identity]]
            name = "prometheus"
            role = "metrics"
            "#,
            ca = tls.ca.display().to_string(),
            cert = tls.cert.display().to_string(),
            key = tls.key.display().to_string(),
            state = dir.join("microvms").display().to_string(),
            inventory = dir.join("inventory.toml").display().to_string(),
            dir = dir.display(),
        ),
    )
    .expect("config");
    let daemon = DaemonProcess::start(&config).await;
    let listening = daemon
        .wait_for_log(0, |v| {
            v["fields"]["message"] == "listening for metrics scrapes"
        })
        .await;
    let addr = listening["fields"]["addr"]
        .as_str()
        .and_then(|a| a.strip_prefix("https://"))
        .and_then(|a| a.strip_suffix("/metrics"))
        .and_then(|a| a.parse().ok())
        .expect("metrics address in the log");
    (daemon, addr)
}

fn result(fields: &Value) -> &str {
    fields["result"].as_str().unwrap_or("")
}

#[tokio::test]
async fn refused_scrapes_are_audited() {
    let pki = TestPki::new();
    let (daemon, addr) = daemon(&pki, "").await;
    let ok = scrape::metrics(addr, metrics_tls(&pki, "prometheus"), "GET", "/metrics")
        .await
        .expect("the metrics identity scrapes");
    assert_eq!(ok.status, 200, "{ok:?}");
    assert!(
        ok.body.contains("vmd_vm_state{vm=\"gui-vm\""),
        "{}",
        ok.body
    );

    // 1. No client certificate: refused in the handshake.
    let mark = daemon.log_len();
    let answer = scrape::metrics(addr, anonymous_tls(&pki), "GET", "/metrics").await;
    assert!(
        answer.is_err(),
        "a scrape without a certificate got {answer:?}"
    );
    daemon
        .audited(mark, |f| {
            f["event"] == "connection"
                && result(f).starts_with("refused: TLS")
                && result(f).to_lowercase().contains("certificate")
        })
        .await;

    // 2. A certificate from another CA.
    let foreign =
        CertificateAuthority::generate("impostor CA", Validity::days_from_now(30)).expect("CA");
    let mark = daemon.log_len();
    let tls = metrics_tls_from(&pki, &foreign, "prometheus");
    let answer = scrape::metrics(addr, tls, "GET", "/metrics").await;
    assert!(answer.is_err(), "a foreign CA's certificate got {answer:?}");
    daemon
        .audited(mark, |f| {
            f["event"] == "connection"
                && result(f).starts_with("refused: TLS")
                && result(f).to_lowercase().contains("unknown")
        })
        .await;

    // 3. A valid certificate whose identity no rule names: no role, 403.
    let mark = daemon.log_len();
    let answer = scrape::metrics(addr, metrics_tls(&pki, "stranger"), "GET", "/metrics")
        .await
        .expect("an HTTP answer");
    assert_eq!(answer.status, 403, "{answer:?}");
    assert!(!answer.body.contains("vmd_"), "{}", answer.body);
    daemon
        .audited(mark, |f| {
            f["event"] == "connection"
                && f["identity"] == "stranger"
                && result(f).starts_with("refused")
                && result(f).contains("may not read metrics")
        })
        .await;

    // The counters saw the refusals.
    let text = scrape::metrics(addr, metrics_tls(&pki, "prometheus"), "GET", "/metrics")
        .await
        .expect("scrape")
        .body;
    for line in [
        "vmd_tls_refusals_total{reason=\"no_certificate\"} 1",
        "vmd_tls_refusals_total{reason=\"unknown_ca\"} 1",
        "vmd_requests_total{op=\"metrics\",result=\"forbidden\"} 1",
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line}:\n{text}");
    }
    assert!(
        text.lines().any(|l| l
            .starts_with("vmd_connections_total{listener=\"metrics\",transport=\"tcp\"}")),
        "{text}"
    );
}

/// A scraper that sends requests and then stops reading the answers is
/// cut off once an answer makes no progress for the write timeout (hyper
/// has no such deadline of its own): it cannot hold a connection, and the
/// task serving it, for ever.
#[tokio::test]
async fn a_scraper_that_stops_reading_is_cut_off() {
    /// Pipelined scrapes: their answers (kilobytes each) are far more than
    /// the sockets' buffers hold (at most 4 MiB to send here).
    const REQUESTS: usize = 4000;
    let pki = TestPki::new();
    let (_daemon, addr) = daemon(
        &pki,
        "write_timeout_secs = 1\nrequests_per_second = 1000000\nrequest_burst = 1000000",
    )
    .await;
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .set_recv_buffer_size(4096)
        .expect("small receive buffer");
    let tcp = socket.connect(addr).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from(vmd_proto::SERVER_NAME).expect("name");
    let tls = tokio_rustls::TlsConnector::from(metrics_tls(&pki, "prometheus"))
        .connect(name, tcp)
        .await
        .expect("TLS");
    let (mut reader, mut writer) = tokio::io::split(tls);
    let requests = "GET /metrics HTTP/1.1\r\nHost: vmd\r\n\r\n".repeat(REQUESTS);
    let sending = tokio::spawn(async move {
        // Blocks once vmd stops reading; ends when vmd closes.
        let _ = writer.write_all(requests.as_bytes()).await;
        writer
    });
    // Not reading, for well over the write timeout.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut received = Vec::new();
    let read =
        tokio::time::timeout(Duration::from_secs(60), reader.read_to_end(&mut received)).await;
    assert!(
        read.is_ok(),
        "vmd kept the connection open for a reader that had stopped"
    );
    let answers = String::from_utf8_lossy(&received)
        .matches("HTTP/1.1 200 OK")
        .count();
    assert!(
        answers < REQUESTS,
        "all {answers} answers arrived: vmd waited for the reader instead of cutting it off"
    );
    sending.abort();
    // The listener serves the next scraper as before.
    let ok = scrape::metrics(addr, metrics_tls(&pki, "prometheus"), "GET", "/metrics")
        .await
        .expect("a scrape after the cut-off");
    assert_eq!(ok.status, 200, "{ok:?}");
}
