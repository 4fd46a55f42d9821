//! Daemon configuration: the TOML file, its validation, and defaults.
//!
//! 1. [`ConfigFile`] is the file as written (every key optional, unknown
//!    keys rejected so a typo is an error that names the key).
//! 2. [`Config::from_file`] validates it into a [`Config`]: every value in
//!    range, every error naming its key (`limits.max_connections: …`).
//! 3. The CLI may then override single fields of the `Config` (see `cli`).
//!
//! ```toml
//! [listen]
//! tcp = ["127.0.0.1:9876", "[::1]:9876"]   # [] turns TCP off
//!
//! [listen.vsock]
//! enable = true
//! port = 9876
//! required = false    # true: fail to start when AF_VSOCK cannot be bound
//!
//! [listen.hybrid_vsock]
//! enable = true       # listen on <vsock_uds>_<port> of VMs that declare vsock_uds
//! port = 9876
//!
//! [listen.metrics]
//! address = "10.0.0.1:9100"   # HTTPS GET /metrics (OpenMetrics), same mTLS; off when absent
//!
//! [tls]
//! ca = "/var/lib/vmd/pki/ca.pem"
//! cert = "/var/lib/vmd/pki/server.pem"
//! key = "/var/lib/vmd/pki/server.key"
//! crls = ["/var/lib/vmd/pki/crl.pem"]   # revoked client certificates (reloaded on SIGHUP)
//!
//! [limits]
//! max_connections = 256
//! max_in_flight = 32
//! max_request_frame = 65536
//! handshake_timeout_secs = 10
//! idle_timeout_secs = 300
//! write_timeout_secs = 10
//! shutdown_grace_secs = 10
//! max_connections_per_identity = 32
//! requests_per_second = 200   # per identity, token bucket
//! request_burst = 400
//! max_watchers_per_identity = 16   # Watch requests held open at once
//! max_refusals_per_connection = 16  # refused or malformed requests, then the connection closes
//!
//! [log]
//! format = "plain"    # or "json"
//! level = "info"      # a tracing filter, e.g. "info,vmd=debug"
//!
//! [vms]
//! state_dir = "/var/lib/microvms"          # microvm.nix VMs are discovered here
//! inventory = "/etc/vmd/inventory.toml"    # declared VMs (see `inventory`)
//! max_concurrent_changes = 8
//! systemd_bus = "unix:path=/run/dbus/system_bus_socket"   # default: the system bus
//! qmp_timeout_secs = 5
//!
//! [policy]
//! default_role = "none"     # for identities no rule names: no rights (default)
//!
//! [policy.vsock]
//! allowed_cids = [3, 4]     # only these guests may connect over vsock
//!
//! [[policy.identity]]
//! name = "gui-vm"           # the certificate's SAN DNS name (or CN)
//! role = "operator"         # metrics < reader < operator < admin (metrics: scrape only)
//! vms = ["gui-vm", "app-*"] # what the role may change (default: nothing)
//! visible = ["*"]           # what it may see at all (default: everything)
//! bind_vm = "gui-vm"        # vsock peers must be this VM (or bind_cid = 3)
//! transports = ["vsock"]    # tcp, vsock (default: both)
//! spki_sha256 = "…"         # pin the key (64 hex digits, `vmd pki show`)
//! tcp_networks = ["10.0.0.0/8"]  # TCP peers must come from these networks
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use vmd_proto::frame::MAX_REQUEST_FRAME;
use vmd_proto::{Role, VmName};

use crate::policy::{Binding, IdentityRule, IpNet, Policy, Scope, Transport};
use crate::usage::IdentityLimits;
use crate::vms::inventory::InventorySource;
use crate::vms::ops::OperationLimits;

/// Where the config file is read from when no `--config` is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/vmd/vmd.toml";

/// Where the production PKI lives.
pub const DEFAULT_PKI_DIR: &str = "/var/lib/vmd/pki";

/// A config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (the message names the key).
    #[error("config file {}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line, column and key.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{key}: {reason}")]
    Invalid {
        /// The dotted key, e.g. `limits.max_connections`.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// The config file as written. All keys are optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// `[listen]`
    #[serde(default)]
    pub listen: ListenFile,
    /// `[tls]`
    #[serde(default)]
    pub tls: TlsFile,
    /// `[limits]`
    #[serde(default)]
    pub limits: LimitsFile,
    /// `[log]`
    #[serde(default)]
    pub log: LogFile,
    /// `[vms]`
    #[serde(default)]
    pub vms: VmsFile,
    /// `[policy]`
    #[serde(default)]
    pub policy: PolicyFile,
}

/// `[vms]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmsFile {
    /// The microvm.nix state directory.
    pub state_dir: Option<PathBuf>,
    /// The inventory file.
    pub inventory: Option<PathBuf>,
    /// Changes running at once, host-wide.
    pub max_concurrent_changes: Option<usize>,
    /// The D-Bus address of systemd's bus.
    pub systemd_bus: Option<String>,
    /// Bound on one control-socket session, in seconds.
    pub qmp_timeout_secs: Option<u64>,
    /// The unified cgroup hierarchy's mount point, where units' CPU and
    /// memory use is read (default: found at start).
    pub cgroup_root: Option<PathBuf>,
}

/// `[policy]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// The role of authenticated identities no rule names (default none).
    pub default_role: Option<RoleName>,
    /// `[policy.vsock]`
    #[serde(default)]
    pub vsock: VsockPolicyFile,
    /// `[[policy.identity]]`
    #[serde(default)]
    pub identity: Vec<IdentityFile>,
}

/// `[policy.vsock]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockPolicyFile {
    /// Only these CIDs may connect over vsock.
    pub allowed_cids: Option<Vec<u32>>,
}

/// `[[policy.identity]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityFile {
    /// The certificate identity (SAN DNS name, else CN).
    pub name: String,
    /// Its role.
    pub role: RoleName,
    /// Pin: the certificate key's SPKI SHA-256, hex.
    pub spki_sha256: Option<String>,
    /// VMs the role may change (names and globs).
    pub vms: Option<Vec<String>>,
    /// VMs the identity may see (default all).
    pub visible: Option<Vec<String>>,
    /// vsock peers must be this VM (its CID from the inventory).
    pub bind_vm: Option<VmName>,
    /// vsock peers must have this CID.
    pub bind_cid: Option<u32>,
    /// Allowed transports (default all).
    pub transports: Option<Vec<Transport>>,
    /// TCP peers must be in these networks (CIDR).
    pub tcp_networks: Option<Vec<String>>,
}

/// A role as written in the config file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoleName {
    /// `reader`
    Reader,
    /// `operator`
    Operator,
    /// `admin`
    Admin,
    /// `metrics`: may scrape the metrics listener, nothing else.
    Metrics,
    /// `none`: authenticated, but no rights.
    None,
}

impl RoleName {
    fn role(self) -> Option<Role> {
        match self {
            Self::Reader => Some(Role::Reader),
            Self::Operator => Some(Role::Operator),
            Self::Admin => Some(Role::Admin),
            Self::Metrics => Some(Role::Metrics),
            Self::None => None,
        }
    }
}

/// `[listen]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenFile {
    /// TCP addresses to listen on.
    pub tcp: Option<Vec<SocketAddr>>,
    /// `[listen.vsock]`
    #[serde(default)]
    pub vsock: VsockFile,
    /// `[listen.hybrid_vsock]`
    #[serde(default)]
    pub hybrid_vsock: HybridVsockFile,
    /// `[listen.metrics]`
    #[serde(default)]
    pub metrics: MetricsFile,
}

/// `[listen.metrics]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsFile {
    /// The TCP address of the metrics listener (HTTPS, `GET /metrics`);
    /// absent: no metrics listener.
    pub address: Option<SocketAddr>,
}

/// `[listen.hybrid_vsock]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HybridVsockFile {
    /// Listen on `<vsock_uds>_<port>` for VMs that declare `vsock_uds`.
    pub enable: Option<bool>,
    /// The guest-side port (the host CID's port guests connect to).
    pub port: Option<u32>,
}

/// `[listen.vsock]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockFile {
    /// Listen on AF_VSOCK at all.
    pub enable: Option<bool>,
    /// The vsock port.
    pub port: Option<u32>,
    /// Fail to start if AF_VSOCK cannot be bound.
    pub required: Option<bool>,
}

/// `[tls]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFile {
    /// CA certificate(s) that client certificates must chain to.
    pub ca: Option<PathBuf>,
    /// The server certificate chain.
    pub cert: Option<PathBuf>,
    /// The server private key.
    pub key: Option<PathBuf>,
    /// Certificate revocation lists (PEM) of the CA.
    pub crls: Option<Vec<PathBuf>>,
}

/// `[limits]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    /// Concurrent connections, all listeners together.
    pub max_connections: Option<usize>,
    /// Requests in progress per connection.
    pub max_in_flight: Option<usize>,
    /// Largest request frame body, in bytes.
    pub max_request_frame: Option<u32>,
    /// TLS handshake plus `Hello`, in seconds.
    pub handshake_timeout_secs: Option<u64>,
    /// Close a connection with nothing in flight after this many seconds.
    pub idle_timeout_secs: Option<u64>,
    /// Longest time one response may take to write.
    pub write_timeout_secs: Option<u64>,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace_secs: Option<u64>,
    /// Concurrent connections per identity.
    pub max_connections_per_identity: Option<usize>,
    /// Sustained requests per second per identity.
    pub requests_per_second: Option<u32>,
    /// Requests an identity may send in a burst.
    pub request_burst: Option<u32>,
    /// `Watch` requests an identity may hold open at once.
    pub max_watchers_per_identity: Option<usize>,
    /// Refused (`Forbidden`, `LimitExceeded`) or malformed requests a
    /// connection may send before it is closed.
    pub max_refusals_per_connection: Option<u32>,
}

/// `[log]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogFile {
    /// `plain` or `json`.
    pub format: Option<LogFormat>,
    /// A `tracing` filter directive.
    pub level: Option<String>,
}

/// How log lines look.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event (no colours or timestamps under
    /// journald, which adds its own).
    #[default]
    Plain,
    /// One JSON object per event.
    Json,
}

/// The validated configuration the daemon runs with.
#[derive(Clone, Debug)]
pub struct Config {
    /// TCP listen addresses (may be empty).
    pub tcp: Vec<SocketAddr>,
    /// The AF_VSOCK listener, if enabled.
    pub vsock: Option<VsockConfig>,
    /// The port of the hybrid vsock listeners, if enabled.
    pub hybrid_vsock_port: Option<u32>,
    /// The metrics listener's TCP address, if enabled (off by default).
    pub metrics: Option<SocketAddr>,
    /// TLS material.
    pub tls: TlsPaths,
    /// Resource limits and timeouts.
    pub limits: Limits,
    /// Logging.
    pub log: LogConfig,
    /// Where VMs are declared and how they are reached.
    pub vms: VmsConfig,
    /// Who may do what.
    pub policy: Policy,
}

/// Where VMs are declared and how they are reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmsConfig {
    /// The inventory's sources.
    pub inventory: InventorySource,
    /// Operation registry limits.
    pub operations: OperationLimits,
    /// systemd's bus; `None` for the system bus.
    pub systemd_bus: Option<String>,
    /// Bound on one control-socket session.
    pub qmp_timeout: Duration,
    /// The unified cgroup hierarchy; `None` finds it at start
    /// (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on a hybrid host).
    pub cgroup_root: Option<PathBuf>,
}

impl Default for VmsConfig {
    fn default() -> Self {
        Self {
            inventory: InventorySource::default(),
            operations: OperationLimits::default(),
            systemd_bus: None,
            qmp_timeout: Duration::from_secs(5),
            cgroup_root: None,
        }
    }
}

/// The AF_VSOCK listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// Port (`u32::MAX` lets the kernel choose).
    pub port: u32,
    /// Fail to start when the listener cannot be bound.
    pub required: bool,
}

/// TLS material on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsPaths {
    /// CA certificate(s) for client verification.
    pub ca: PathBuf,
    /// Server certificate chain.
    pub cert: PathBuf,
    /// Server private key.
    pub key: PathBuf,
    /// CRLs honoured for client certificates.
    pub crls: Vec<PathBuf>,
}

impl TlsPaths {
    /// The standard file names inside a PKI directory made by `vmd pki`.
    pub fn in_pki_dir(dir: &Path) -> Self {
        Self {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            crls: Vec::new(),
        }
    }
}

/// Resource limits and timeouts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// Concurrent connections, all listeners together.
    pub max_connections: usize,
    /// Requests in progress per connection; further requests wait unread.
    pub max_in_flight: usize,
    /// Largest request frame body.
    pub max_request_frame: u32,
    /// TLS handshake plus `Hello`.
    pub handshake_timeout: Duration,
    /// Idle connections (nothing in flight) are closed after this.
    pub idle_timeout: Duration,
    /// Longest time one response may take to write (slow readers).
    pub write_timeout: Duration,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace: Duration,
    /// Per-identity connection cap and request rate.
    pub identity: IdentityLimits,
    /// Refused (`Forbidden`, `LimitExceeded`) or malformed requests a
    /// connection may send; the next one closes it (see `connection`).
    pub max_refusals: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            max_in_flight: 32,
            max_request_frame: MAX_REQUEST_FRAME,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            write_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            identity: IdentityLimits::default(),
            max_refusals: 16,
        }
    }
}

/// Logging settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogConfig {
    /// Line format.
    pub format: LogFormat,
    /// A `tracing` filter directive.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Plain,
            level: "info".into(),
        }
    }
}

impl Default for Config {
    /// Loopback TCP and vsock on the default port, the production PKI.
    fn default() -> Self {
        Self {
            tcp: vec![SocketAddr::from(([127, 0, 0, 1], vmd_proto::DEFAULT_PORT))],
            vsock: Some(VsockConfig {
                port: u32::from(vmd_proto::DEFAULT_PORT),
                required: false,
            }),
            hybrid_vsock_port: Some(u32::from(vmd_proto::DEFAULT_PORT)),
            metrics: None,
            tls: TlsPaths::in_pki_dir(Path::new(DEFAULT_PKI_DIR)),
            limits: Limits::default(),
            log: LogConfig::default(),
            vms: VmsConfig::default(),
            policy: Policy::default(),
        }
    }
}

impl Config {
    /// Reads and validates a config file.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file, or the key, that is wrong.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Validates config text; `path` is only used in messages.
    ///
    /// # Errors
    /// As [`Config::load`].
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let file: ConfigFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        Self::from_file(file)
    }

    /// Validates a parsed file, filling defaults.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key.
    pub fn from_file(file: ConfigFile) -> Result<Self, ConfigError> {
        let defaults = Self::default();
        let vsock_enabled = file.listen.vsock.enable.unwrap_or(true);
        let vsock = if vsock_enabled {
            let port = file
                .listen
                .vsock
                .port
                .unwrap_or(u32::from(vmd_proto::DEFAULT_PORT));
            if port == 0 {
                return Err(invalid("listen.vsock.port", "must not be 0"));
            }
            Some(VsockConfig {
                port,
                required: file.listen.vsock.required.unwrap_or(false),
            })
        } else {
            if file.listen.vsock.required == Some(true) {
                return Err(invalid(
                    "listen.vsock.required",
                    "cannot be true when listen.vsock.enable is false",
                ));
            }
            None
        };
        let tls = TlsPaths {
            ca: file.tls.ca.unwrap_or(defaults.tls.ca),
            cert: file.tls.cert.unwrap_or(defaults.tls.cert),
            key: file.tls.key.unwrap_or(defaults.tls.key),
            crls: file.tls.crls.unwrap_or_default(),
        };
        let d = Limits::default();
        let l = file.limits;
        let limits = Limits {
            max_connections: in_range(
                "limits.max_connections",
                l.max_connections.unwrap_or(d.max_connections),
                1,
                1 << 20,
            )?,
            max_in_flight: in_range(
                "limits.max_in_flight",
                l.max_in_flight.unwrap_or(d.max_in_flight),
                1,
                4096,
            )?,
            max_request_frame: in_range(
                "limits.max_request_frame",
                l.max_request_frame.unwrap_or(d.max_request_frame),
                1024,
                MAX_REQUEST_FRAME,
            )?,
            handshake_timeout: secs(
                "limits.handshake_timeout_secs",
                l.handshake_timeout_secs,
                d.handshake_timeout,
            )?,
            idle_timeout: secs(
                "limits.idle_timeout_secs",
                l.idle_timeout_secs,
                d.idle_timeout,
            )?,
            write_timeout: secs(
                "limits.write_timeout_secs",
                l.write_timeout_secs,
                d.write_timeout,
            )?,
            shutdown_grace: secs(
                "limits.shutdown_grace_secs",
                l.shutdown_grace_secs,
                d.shutdown_grace,
            )?,
            max_refusals: in_range(
                "limits.max_refusals_per_connection",
                l.max_refusals_per_connection.unwrap_or(d.max_refusals),
                1,
                1_000_000,
            )?,
            identity: IdentityLimits {
                max_connections: in_range(
                    "limits.max_connections_per_identity",
                    l.max_connections_per_identity
                        .unwrap_or(d.identity.max_connections),
                    1,
                    1 << 20,
                )?,
                requests_per_second: f64::from(in_range(
                    "limits.requests_per_second",
                    l.requests_per_second.unwrap_or(200),
                    1,
                    1_000_000,
                )?),
                burst: in_range(
                    "limits.request_burst",
                    l.request_burst.unwrap_or(d.identity.burst),
                    1,
                    1_000_000,
                )?,
                max_watchers: in_range(
                    "limits.max_watchers_per_identity",
                    l.max_watchers_per_identity
                        .unwrap_or(d.identity.max_watchers),
                    1,
                    4096,
                )?,
            },
        };
        let log = LogConfig {
            format: file.log.format.unwrap_or_default(),
            level: file.log.level.unwrap_or(defaults.log.level),
        };
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log.level) {
            return Err(invalid("log.level", e.to_string()));
        }
        let v = file.vms;
        let vms = VmsConfig {
            inventory: InventorySource {
                state_dir: v.state_dir.unwrap_or(defaults.vms.inventory.state_dir),
                file: v.inventory.or(defaults.vms.inventory.file),
            },
            operations: OperationLimits {
                max_concurrent: in_range(
                    "vms.max_concurrent_changes",
                    v.max_concurrent_changes
                        .unwrap_or(defaults.vms.operations.max_concurrent),
                    1,
                    1024,
                )?,
                ..defaults.vms.operations
            },
            systemd_bus: v.systemd_bus,
            qmp_timeout: secs(
                "vms.qmp_timeout_secs",
                v.qmp_timeout_secs,
                defaults.vms.qmp_timeout,
            )?,
            cgroup_root: v.cgroup_root,
        };
        let policy = policy_from_file(file.policy)?;
        let hybrid = &file.listen.hybrid_vsock;
        let hybrid_vsock_port = if hybrid.enable.unwrap_or(true) {
            let port = hybrid.port.unwrap_or(u32::from(vmd_proto::DEFAULT_PORT));
            Some(in_range("listen.hybrid_vsock.port", port, 1, u32::MAX - 1)?)
        } else {
            None
        };
        Ok(Self {
            tcp: file.listen.tcp.unwrap_or(defaults.tcp),
            vsock,
            hybrid_vsock_port,
            metrics: file.listen.metrics.address,
            tls,
            limits,
            log,
            vms,
            policy,
        })
    }

    /// The development configuration: loopback TCP on the default port,
    /// vsock where present, the PKI in `dev_dir/pki`, and the `dev-admin`
    /// client an admin.
    pub fn dev(dev_dir: &Path) -> Self {
        Self {
            tls: TlsPaths::in_pki_dir(&dev_dir.join("pki")),
            policy: Policy {
                identities: vec![IdentityRule {
                    change: Scope::all(),
                    ..IdentityRule::new(vmd_proto::dev::CLIENT_NAME, Some(Role::Admin))
                }],
                ..Policy::default()
            },
            ..Self::default()
        }
    }

    /// Checks that at least one listener is configured.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] when neither TCP nor vsock is enabled.
    pub fn check_listeners(&self) -> Result<(), ConfigError> {
        if self.tcp.is_empty() && self.vsock.is_none() {
            return Err(invalid(
                "listen",
                "no listener: set listen.tcp or enable listen.vsock",
            ));
        }
        Ok(())
    }
}

/// Validates `[policy]`.
fn policy_from_file(file: PolicyFile) -> Result<Policy, ConfigError> {
    let mut identities: Vec<IdentityRule> = Vec::new();
    for id in file.identity {
        if id.name.is_empty() {
            return Err(invalid("policy.identity.name", "must not be empty"));
        }
        if identities.iter().any(|r| r.name == id.name) {
            return Err(invalid(
                "policy.identity.name",
                format!("{} is listed twice", id.name),
            ));
        }
        if let Some(pin) = &id.spki_sha256
            && (pin.len() != 64 || !pin.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(invalid(
                "policy.identity.spki_sha256",
                format!("{}: expected 64 hex digits (see `vmd pki show`)", id.name),
            ));
        }
        let binding = match (id.bind_vm, id.bind_cid) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "policy.identity.bind_vm",
                    format!("{}: set bind_vm or bind_cid, not both", id.name),
                ));
            }
            (Some(vm), None) => Some(Binding::Vm(vm)),
            (None, Some(cid)) => Some(Binding::Cid(cid)),
            (None, None) => None,
        };
        let scope = |key: &'static str, patterns: Option<Vec<String>>, default: Scope| {
            let Some(patterns) = patterns else {
                return Ok(default);
            };
            for p in &patterns {
                let valid = !p.is_empty()
                    && p.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.*?".contains(c));
                if !valid {
                    return Err(invalid(
                        key,
                        format!("{}: invalid VM pattern {p:?}", id.name),
                    ));
                }
            }
            Ok(Scope::of(patterns))
        };
        let mut tcp_networks = Vec::new();
        for net in id.tcp_networks.unwrap_or_default() {
            tcp_networks.push(net.parse::<IpNet>().map_err(|e| {
                invalid("policy.identity.tcp_networks", format!("{}: {e}", id.name))
            })?);
        }
        identities.push(IdentityRule {
            spki_sha256: id.spki_sha256.map(|p| p.to_ascii_lowercase()),
            role: id.role.role(),
            visible: scope("policy.identity.visible", id.visible, Scope::all())?,
            change: scope("policy.identity.vms", id.vms, Scope::none())?,
            binding,
            transports: id.transports,
            tcp_networks,
            name: id.name,
        });
    }
    Ok(Policy {
        identities,
        default_role: file.default_role.and_then(RoleName::role),
        vsock_allowed_cids: file.vsock.allowed_cids,
    })
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

fn in_range<T: PartialOrd + std::fmt::Display + Copy>(
    key: &'static str,
    value: T,
    min: T,
    max: T,
) -> Result<T, ConfigError> {
    if value < min || value > max {
        return Err(invalid(
            key,
            format!("{value} is out of range ({min} to {max})"),
        ));
    }
    Ok(value)
}

fn secs(key: &'static str, value: Option<u64>, default: Duration) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => Ok(Duration::from_secs(in_range(key, v, 1, 86_400)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn empty_file_gives_defaults() {
        let config = parse("").expect("empty config is valid");
        assert_eq!(config.tcp, Config::default().tcp);
        assert_eq!(config.limits, Limits::default());
        assert_eq!(
            config.vsock,
            Some(VsockConfig {
                port: 9876,
                required: false
            })
        );
    }

    #[test]
    fn full_file_parses() {
        let config = parse(
            r#"
            [listen]
            tcp = ["0.0.0.0:7000", "[::1]:7001"]
            [listen.vsock]
            enable = true
            port = 5000
            required = true
            [tls]
            ca = "/x/ca.pem"
            cert = "/x/s.pem"
            key = "/x/s.key"
            [limits]
            max_connections = 10
            idle_timeout_secs = 60
            [log]
            format = "json"
            level = "debug"
            "#,
        )
        .expect("valid config");
        assert_eq!(config.tcp.len(), 2);
        assert!(config.tcp[1].is_ipv6());
        assert_eq!(
            config.vsock,
            Some(VsockConfig {
                port: 5000,
                required: true
            })
        );
        assert_eq!(config.tls.key, PathBuf::from("/x/s.key"));
        assert_eq!(config.limits.max_connections, 10);
        assert_eq!(config.limits.idle_timeout, Duration::from_secs(60));
        assert_eq!(config.log.format, LogFormat::Json);
        assert_eq!(
            config.metrics, None,
            "the metrics listener is off by default"
        );
    }

    #[test]
    fn metrics_listener_and_role() {
        let config = parse(
            r#"
            [listen.metrics]
            address = "127.0.0.1:9100"
            [[policy.identity]]
            name = "prometheus"
            role = "metrics"
            "#,
        )
        .expect("valid config");
        assert_eq!(
            config.metrics,
            Some(SocketAddr::from(([127, 0, 0, 1], 9100)))
        );
        let rule = config.policy.rule("prometheus").expect("rule");
        assert_eq!(rule.role, Some(Role::Metrics));
        let err = parse("[listen.metrics]\nport = 9100\n").expect_err("unknown key");
        assert!(err.to_string().contains("port"), "{err}");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse("[limits]\nmax_conections = 3\n")
            .expect_err("typo must fail")
            .to_string();
        assert!(err.contains("max_conections"), "{err}");
    }

    #[test]
    fn bad_type_is_named() {
        let err = parse("[listen]\ntcp = [\"not an address\"]\n")
            .expect_err("bad address must fail")
            .to_string();
        assert!(err.contains("tcp"), "{err}");
    }

    #[test]
    fn out_of_range_names_the_key() {
        let err = parse("[limits]\nmax_connections = 0\n").expect_err("0 must fail");
        assert!(
            matches!(
                err,
                ConfigError::Invalid {
                    key: "limits.max_connections",
                    ..
                }
            ),
            "{err}"
        );
        let err = parse("[limits]\nmax_request_frame = 100000000\n").expect_err("too big");
        assert!(
            err.to_string().starts_with("limits.max_request_frame:"),
            "{err}"
        );
        let err = parse("[log]\nlevel = \"info,=[\"\n").expect_err("bad filter");
        assert!(err.to_string().starts_with("log.level:"), "{err}");
    }

    #[test]
    fn vms_and_policy_sections() {
        let config = parse(
            r#"
            [vms]
            state_dir = "/srv/microvms"
            inventory = "/srv/inventory.toml"
            max_concurrent_changes = 2
            systemd_bus = "unix:path=/tmp/bus"
            [policy.vsock]
            allowed_cids = [3]
            [[policy.identity]]
            name = "admin-laptop"
            role = "admin"
            vms = ["*"]
            transports = ["tcp"]
            tcp_networks = ["10.0.0.0/8"]
            spki_sha256 = "ABababababababababababababababababababababababababababababababab"
            [[policy.identity]]
            name = "gui-vm"
            role = "operator"
            vms = ["gui-vm", "app-*"]
            visible = ["gui-vm", "app-*", "net-vm"]
            bind_vm = "gui-vm"
            "#,
        )
        .expect("valid config");
        assert_eq!(
            config.vms.inventory.state_dir,
            PathBuf::from("/srv/microvms")
        );
        assert_eq!(config.vms.operations.max_concurrent, 2);
        assert_eq!(
            config.vms.systemd_bus.as_deref(),
            Some("unix:path=/tmp/bus")
        );
        let policy = &config.policy;
        assert_eq!(policy.default_role, None, "default deny");
        assert_eq!(policy.vsock_allowed_cids, Some(vec![3]));
        let admin = policy.rule("admin-laptop").expect("rule");
        assert_eq!(admin.role, Some(Role::Admin));
        assert_eq!(admin.transports, Some(vec![Transport::Tcp]));
        assert!(
            admin
                .spki_sha256
                .as_deref()
                .is_some_and(|p| p.starts_with("abab"))
        );
        let gui = policy.rule("gui-vm").expect("rule");
        let vm = |n| VmName::new(n).expect("valid");
        assert!(gui.change.contains(&vm("app-1")) && !gui.change.contains(&vm("net-vm")));
        assert!(gui.visible.contains(&vm("net-vm")) && !gui.visible.contains(&vm("admin-vm")));
        assert_eq!(gui.binding, Some(Binding::Vm(vm("gui-vm"))));
    }

    #[test]
    fn policy_errors_name_the_key() {
        for (text, key) in [
            ("name = \"x\"\nrole = \"root\"\n", "root"),
            (
                "name = \"x\"\nrole = \"admin\"\nspki_sha256 = \"abc\"\n",
                "policy.identity.spki_sha256:",
            ),
            (
                "name = \"x\"\nrole = \"admin\"\nbind_vm = \"a\"\nbind_cid = 3\n",
                "policy.identity.bind_vm:",
            ),
            (
                "name = \"x\"\nrole = \"admin\"\nvms = [\"a/b\"]\n",
                "policy.identity.vms:",
            ),
            (
                "name = \"x\"\nrole = \"admin\"\ntcp_networks = [\"10.0.0.0\"]\n",
                "policy.identity.tcp_networks:",
            ),
            (
                "name = \"x\"\nrole = \"admin\"\ntransports = [\"udp\"]\n",
                "udp",
            ),
        ] {
            let err = parse(&format!("[[policy.identity]]\n{text}")).expect_err(text);
            assert!(err.to_string().contains(key), "{key}: {err}");
        }
        let twice = "[[policy.identity]]\nname = \"x\"\nrole = \"admin\"\n".repeat(2);
        let err = parse(&twice).expect_err("duplicate");
        assert!(
            err.to_string().starts_with("policy.identity.name:"),
            "{err}"
        );
    }

    #[test]
    fn vsock_required_needs_enable() {
        let err = parse("[listen.vsock]\nenable = false\nrequired = true\n").expect_err("conflict");
        assert!(
            err.to_string().starts_with("listen.vsock.required:"),
            "{err}"
        );
    }

    #[test]
    fn no_listener_is_an_error() {
        let config = parse("[listen]\ntcp = []\n[listen.vsock]\nenable = false\n").expect("parses");
        assert!(config.check_listeners().is_err());
    }
}
