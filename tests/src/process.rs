//! The `vmd` binary as a separate process: started with a config file and
//! JSON logs, so tests can read its real audit records, send it real
//! signals (SIGHUP reload, SIGTERM) and measure its memory.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Longest wait for the daemon to start, log or stop.
const PATIENCE: Duration = Duration::from_secs(20);

/// A running `vmd serve -c CONFIG --log-format json`.
#[derive(Debug)]
pub struct DaemonProcess {
    child: Child,
    log: Arc<Mutex<Vec<Value>>>,
    port: u16,
}

impl DaemonProcess {
    /// Starts the daemon with `config` and waits until it listens on TCP.
    ///
    /// # Panics
    /// If it does not start or never listens.
    pub async fn start(config: &std::path::Path) -> Self {
        let mut child = Command::new(crate::vmd())
            .arg("serve")
            .arg("-c")
            .arg(config)
            .args(["--log-format", "json", "--log-level", "info"])
            .env_remove("RUST_LOG")
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("vmd starts");
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
        let sink = log.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                // Every line is JSON; keep the rare non-JSON one as a string.
                let value = serde_json::from_str(&line).unwrap_or(Value::String(line));
                sink.lock().expect("log lock").push(value);
            }
        });
        let mut daemon = Self {
            child,
            log,
            port: 0,
        };
        let listening = daemon
            .wait_for_log(0, |v| v["fields"]["message"] == "listening")
            .await;
        let addr = listening["fields"]["addr"]
            .as_str()
            .and_then(|a| a.strip_prefix("tcp://"))
            .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
            .expect("first listener is TCP");
        daemon.port = addr.port();
        daemon
    }

    /// The TCP port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The TCP address it listens on.
    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The daemon's PID.
    ///
    /// # Panics
    /// If it has exited.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// How many log records have arrived so far (a mark for `*_since`).
    pub fn log_len(&self) -> usize {
        self.log.lock().expect("log lock").len()
    }

    /// Waits for a log record after `since` that satisfies `pred`.
    ///
    /// # Panics
    /// If none arrives in time (the message lists what did arrive).
    pub async fn wait_for_log(&self, since: usize, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Some(found) = self.log.lock().expect("log lock")[since..]
                .iter()
                .find(|v| pred(v))
            {
                return found.clone();
            }
            if tokio::time::Instant::now() > deadline {
                let seen = self.log.lock().expect("log lock")[since..].to_vec();
                panic!("expected log record not seen; got {seen:#?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The audit records after `since` whose fields satisfy `pred`, now.
    pub fn audit_records(&self, since: usize, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        self.log.lock().expect("log lock")[since..]
            .iter()
            .filter(|v| v["target"] == "vmd::audit" && pred(&v["fields"]))
            .map(|v| v["fields"].clone())
            .collect()
    }

    /// All log records after `since`, now.
    pub fn records(&self, since: usize) -> Vec<Value> {
        self.log.lock().expect("log lock")[since..].to_vec()
    }

    /// Waits for an audit record after `since` whose fields satisfy `pred`.
    ///
    /// # Panics
    /// As [`DaemonProcess::wait_for_log`].
    pub async fn audited(&self, since: usize, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_for_log(since, |v| v["target"] == "vmd::audit" && pred(&v["fields"]))
            .await
    }

    /// Sends a signal by name (`HUP`, `TERM`).
    ///
    /// # Panics
    /// If `kill` fails.
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{name} {pid}");
    }

    /// Resident memory (`VmRSS`), in KiB.
    ///
    /// # Panics
    /// If /proc cannot be read.
    pub fn rss_kib(&self) -> u64 {
        let pid = self.child.id().expect("running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    /// SIGTERM, then waits for a clean exit.
    ///
    /// # Panics
    /// If it does not exit cleanly in time.
    pub async fn stop(mut self) {
        self.signal("TERM");
        let status = tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("vmd stops after SIGTERM")
            .expect("exit status");
        assert!(status.success(), "vmd exited with {status}");
    }
}
