//! The client config file (`client.toml`).
//!
//! Looked up in order: an explicit path; `$XDG_CONFIG_HOME/vmd/client.toml`
//! (or `~/.config/vmd/client.toml`); `/etc/vmd/client.toml`. Missing files
//! are fine (built-in defaults apply); a file that exists must be valid.
//!
//! ```toml
//! endpoints = ["auto"]             # or ["vsock://2:9876", "tcp://10.0.0.1:9876"]
//! auto_tcp = "tcp://10.0.2.100:9876"  # where `auto` falls back to (default loopback)
//! ca = "/etc/vmd/ca.pem"
//! cert = "/etc/vmd/client.pem"
//! key = "/etc/vmd/client.key"
//! server_name = "vmd"
//! connect_timeout_ms = 3000
//!
//! # Named hosts, for `vmctl --host NAME` and `vmctl list --all-hosts`.
//! # Each needs its endpoints; ca, cert, key and server_name default to
//! # the top-level ones above.
//! [hosts.edge-1]
//! endpoints = ["tcp://10.0.0.1:9876"]
//! [hosts.edge-2]
//! endpoints = ["tcp://10.0.0.2:9876"]
//! ca = "/etc/vmd/edge-2-ca.pem"
//! server_name = "edge-2"
//! ```
//!
//! The top-level settings are the host vmctl asks without `--host`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::endpoint::{Endpoint, EndpointError};

/// The system-wide client config.
pub const SYSTEM_CONFIG: &str = "/etc/vmd/client.toml";

/// A config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid (the message names the key).
    #[error("{}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// An endpoint does not parse.
    #[error("{}: {key}", path.display())]
    Endpoint {
        /// The file.
        path: PathBuf,
        /// The key that holds it (`endpoints`, `auto_tcp`).
        key: &'static str,
        /// What is wrong.
        #[source]
        source: EndpointError,
    },
    /// `--host` names a host the file does not declare.
    #[error("{}", unknown_host(name, known))]
    UnknownHost {
        /// The name asked for.
        name: String,
        /// The hosts the file declares.
        known: Vec<String>,
    },
}

fn unknown_host(name: &str, known: &[String]) -> String {
    if known.is_empty() {
        format!("no host {name:?}: the config declares no [hosts.NAME]")
    } else {
        format!("no host {name:?}; known hosts: {}", known.join(", "))
    }
}

/// A `[hosts.NAME]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostFile {
    endpoints: Vec<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    server_name: Option<String>,
}

/// A named host: where it listens and, where it differs from the
/// top-level settings, how vmctl authenticates to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostConfig {
    /// Tried in order.
    pub endpoints: Vec<Endpoint>,
    /// The CA that signs this host's certificate.
    pub ca: PathBuf,
    /// This client's certificate for this host.
    pub cert: PathBuf,
    /// This client's key for this host.
    pub key: PathBuf,
    /// The name this host's certificate must carry.
    pub server_name: String,
}

/// Whether `name` can name a host: 1 to 64 ASCII letters, digits, `-`,
/// `_` or `.`.
fn valid_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    endpoints: Option<Vec<String>>,
    auto_tcp: Option<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    server_name: Option<String>,
    connect_timeout_ms: Option<u64>,
    #[serde(default)]
    hosts: BTreeMap<String, HostFile>,
}

/// Client settings, from a file or the defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientConfig {
    /// Tried in order.
    pub endpoints: Vec<Endpoint>,
    /// The TCP endpoint `auto` falls back to after vsock.
    pub auto_tcp: Endpoint,
    /// The vmd CA certificate.
    pub ca: PathBuf,
    /// This client's certificate.
    pub cert: PathBuf,
    /// This client's key.
    pub key: PathBuf,
    /// The name the server certificate must carry.
    pub server_name: String,
    /// Bound on each connection step.
    pub connect_timeout: Duration,
    /// Named hosts (`[hosts.NAME]`), by name.
    pub hosts: BTreeMap<String, HostConfig>,
}

impl Default for ClientConfig {
    /// Loopback TCP (a safe default on a host; guests configure `auto`),
    /// certificates under `/etc/vmd`.
    fn default() -> Self {
        Self {
            endpoints: vec![Endpoint::loopback()],
            auto_tcp: Endpoint::loopback(),
            ca: "/etc/vmd/ca.pem".into(),
            cert: "/etc/vmd/client.pem".into(),
            key: "/etc/vmd/client.key".into(),
            server_name: vmd_proto::SERVER_NAME.into(),
            connect_timeout: crate::client::DEFAULT_CONNECT_TIMEOUT,
            hosts: BTreeMap::new(),
        }
    }
}

impl ClientConfig {
    /// The development client of `vmd serve --dev`.
    pub fn dev() -> Self {
        Self {
            endpoints: vec![Endpoint::loopback()],
            ca: vmd_proto::dev::ca_cert(),
            cert: vmd_proto::dev::client_cert(),
            key: vmd_proto::dev::client_key(),
            ..Self::default()
        }
    }

    /// The settings for the named host: its endpoints and TLS files, the
    /// rest (the timeout, `auto_tcp`) from these settings.
    ///
    /// # Errors
    /// [`ConfigError::UnknownHost`], which lists the known hosts.
    pub fn for_host(&self, name: &str) -> Result<Self, ConfigError> {
        let host = self
            .hosts
            .get(name)
            .ok_or_else(|| ConfigError::UnknownHost {
                name: name.to_owned(),
                known: self.hosts.keys().cloned().collect(),
            })?;
        Ok(Self {
            endpoints: host.endpoints.clone(),
            ca: host.ca.clone(),
            cert: host.cert.clone(),
            key: host.key.clone(),
            server_name: host.server_name.clone(),
            ..self.clone()
        })
    }

    /// The first existing file of the search order, if any.
    pub fn find() -> Option<PathBuf> {
        let user = std::env::var_os("XDG_CONFIG_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
            .map(|dir| dir.join("vmd/client.toml"));
        user.into_iter()
            .chain([PathBuf::from(SYSTEM_CONFIG)])
            .find(|p| p.is_file())
    }

    /// Loads a file.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file and what is wrong.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses file text; `path` is for messages.
    ///
    /// # Errors
    /// As [`ClientConfig::load`].
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let file: File = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let defaults = Self::default();
        let endpoint_err = |key| {
            move |source| ConfigError::Endpoint {
                path: path.to_owned(),
                key,
                source,
            }
        };
        let auto_tcp = match file.auto_tcp {
            None => defaults.auto_tcp,
            Some(text) => match text.parse().map_err(endpoint_err("auto_tcp"))? {
                tcp @ Endpoint::Tcp { .. } => tcp,
                other => {
                    return Err(ConfigError::Parse {
                        path: path.to_owned(),
                        message: format!("auto_tcp must be a tcp:// endpoint, not {other}"),
                    });
                }
            },
        };
        let endpoints = match file.endpoints {
            None => defaults.endpoints,
            Some(list) => {
                let mut endpoints = Vec::new();
                for e in list {
                    endpoints.extend(
                        Endpoint::parse_list_via(&e, &auto_tcp)
                            .map_err(endpoint_err("endpoints"))?,
                    );
                }
                endpoints
            }
        };
        let ca = file.ca.unwrap_or(defaults.ca);
        let cert = file.cert.unwrap_or(defaults.cert);
        let key = file.key.unwrap_or(defaults.key);
        let server_name = file.server_name.unwrap_or(defaults.server_name);
        let mut hosts = BTreeMap::new();
        for (name, host) in file.hosts {
            let parse_err = |message: String| ConfigError::Parse {
                path: path.to_owned(),
                message: format!("[hosts.{name}]: {message}"),
            };
            if !valid_host_name(&name) {
                return Err(parse_err(
                    "a host name is 1 to 64 letters, digits, '-', '_' or '.'".into(),
                ));
            }
            if host.endpoints.is_empty() {
                return Err(parse_err("endpoints is empty".into()));
            }
            let mut endpoints = Vec::new();
            for e in &host.endpoints {
                endpoints.extend(Endpoint::parse_list_via(e, &auto_tcp).map_err(|source| {
                    parse_err(format!("endpoints: {}", crate::error_chain(&source)))
                })?);
            }
            let config = HostConfig {
                endpoints,
                ca: host.ca.unwrap_or_else(|| ca.clone()),
                cert: host.cert.unwrap_or_else(|| cert.clone()),
                key: host.key.unwrap_or_else(|| key.clone()),
                server_name: host.server_name.unwrap_or_else(|| server_name.clone()),
            };
            hosts.insert(name, config);
        }
        Ok(Self {
            endpoints,
            auto_tcp,
            ca,
            cert,
            key,
            server_name,
            connect_timeout: file
                .connect_timeout_ms
                .map_or(defaults.connect_timeout, Duration::from_millis),
            hosts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_file() {
        let config = ClientConfig::parse(
            "endpoints = [\"auto\"]\nca = \"/c\"\ncert = \"/p\"\nkey = \"/k\"\nconnect_timeout_ms = 500\n",
            Path::new("client.toml"),
        )
        .expect("valid");
        assert_eq!(config.endpoints, Endpoint::auto());
        assert_eq!(config.ca, PathBuf::from("/c"));
        assert_eq!(config.connect_timeout, Duration::from_millis(500));
    }

    #[test]
    fn auto_falls_back_to_the_configured_tcp_endpoint() {
        let config = ClientConfig::parse(
            "endpoints = [\"auto\"]\nauto_tcp = \"tcp://10.0.2.100:9876\"\n",
            Path::new("client.toml"),
        )
        .expect("valid");
        let tcp: Endpoint = "tcp://10.0.2.100:9876".parse().expect("valid");
        assert_eq!(config.endpoints, Endpoint::auto_via(tcp.clone()));
        assert_eq!(config.auto_tcp, tcp);
        let err = ClientConfig::parse("auto_tcp = \"vsock://2:1\"\n", Path::new("c.toml"))
            .expect_err("not TCP");
        assert!(
            err.to_string().contains("auto_tcp must be a tcp://"),
            "{err}"
        );
    }

    const HOSTS: &str = "ca = \"/ca\"\ncert = \"/cert\"\nkey = \"/key\"\n\
        [hosts.edge-1]\nendpoints = [\"tcp://10.0.0.1:9876\"]\n\
        [hosts.edge-2]\nendpoints = [\"tcp://10.0.0.2:1\", \"tcp://10.0.0.3:1\"]\n\
        ca = \"/ca2\"\nserver_name = \"edge-2\"\n";

    #[test]
    fn named_hosts_default_to_the_top_level_files() {
        let config = ClientConfig::parse(HOSTS, Path::new("client.toml")).expect("valid");
        assert_eq!(
            config.hosts.keys().collect::<Vec<_>>(),
            ["edge-1", "edge-2"]
        );
        // Without --host: the top-level settings, loopback.
        assert_eq!(config.endpoints, vec![Endpoint::loopback()]);
        let one = config.for_host("edge-1").expect("known");
        assert_eq!(
            one.endpoints,
            vec!["tcp://10.0.0.1:9876".parse().expect("valid")]
        );
        assert_eq!(
            (one.ca.as_path(), one.cert.as_path(), one.key.as_path()),
            (Path::new("/ca"), Path::new("/cert"), Path::new("/key"))
        );
        assert_eq!(one.server_name, "vmd");
        let two = config.for_host("edge-2").expect("known");
        assert_eq!(two.endpoints.len(), 2);
        assert_eq!(two.ca, Path::new("/ca2"));
        assert_eq!(two.cert, Path::new("/cert"));
        assert_eq!(two.server_name, "edge-2");
        assert_eq!(two.connect_timeout, config.connect_timeout);
    }

    #[test]
    fn an_unknown_host_lists_the_known_ones() {
        let config = ClientConfig::parse(HOSTS, Path::new("client.toml")).expect("valid");
        let err = config.for_host("edge-3").expect_err("unknown");
        assert_eq!(
            err.to_string(),
            "no host \"edge-3\"; known hosts: edge-1, edge-2"
        );
        let err = ClientConfig::default()
            .for_host("edge-1")
            .expect_err("none declared");
        assert!(
            err.to_string().contains("declares no [hosts.NAME]"),
            "{err}"
        );
    }

    #[test]
    fn bad_host_tables_say_which_and_why() {
        let cases = [
            ("[hosts.a]\nca = \"/x\"\n", "endpoints"),
            (
                "[hosts.a]\nendpoints = []\n",
                "[hosts.a]: endpoints is empty",
            ),
            (
                "[hosts.a]\nendpoints = [\"x://y\"]\n",
                "[hosts.a]: endpoints: ",
            ),
            (
                "[hosts.a]\nendpoints = [\"auto\"]\nport = 1\n",
                "unknown field `port`",
            ),
            (
                "[hosts.\"a b\"]\nendpoints = [\"auto\"]\n",
                "[hosts.a b]: a host name",
            ),
            ("hosts = 3\n", "hosts"),
        ];
        for (text, expected) in cases {
            let err = ClientConfig::parse(text, Path::new("c.toml")).expect_err(text);
            let chain = crate::error_chain(&err);
            assert!(chain.contains(expected), "{text}: {chain}");
            assert!(chain.starts_with("c.toml: "), "{chain}");
        }
    }

    #[test]
    fn errors_name_the_problem() {
        let err = ClientConfig::parse("endpont = []\n", Path::new("c.toml")).expect_err("typo");
        assert!(err.to_string().contains("endpont"), "{err}");
        let err = ClientConfig::parse("endpoints = [\"x://y\"]\n", Path::new("c.toml"))
            .expect_err("bad endpoint");
        assert!(
            crate::error_chain(&err).contains("x://y"),
            "{}",
            crate::error_chain(&err)
        );
    }
}
