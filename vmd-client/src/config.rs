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
//! ```

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
        Ok(Self {
            endpoints,
            auto_tcp,
            ca: file.ca.unwrap_or(defaults.ca),
            cert: file.cert.unwrap_or(defaults.cert),
            key: file.key.unwrap_or(defaults.key),
            server_name: file.server_name.unwrap_or(defaults.server_name),
            connect_timeout: file
                .connect_timeout_ms
                .map_or(defaults.connect_timeout, Duration::from_millis),
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
