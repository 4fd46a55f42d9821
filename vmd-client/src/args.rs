//! The connection flags every client program takes (`vmctl`,
//! `vmd-panel`): where vmd listens and as whom to connect. One definition,
//! so the programs read the same config file and take the same flags.
//!
//! The settings are built in layers: the config file (`--config`, else
//! the first of [`ClientConfig::find`], else built-in defaults; `--dev`:
//! the development daemon's), then a program's own choices on top (such as
//! vmctl's `--host`), then these flags ([`ConnectArgs::apply`]).

use std::path::PathBuf;
use std::time::Duration;

use crate::config::ConfigError;
use crate::endpoint::EndpointError;
use crate::{ClientConfig, Endpoint};

/// Where vmd listens and as whom to connect (`#[command(flatten)]`).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct ConnectArgs {
    /// Where vmd listens: tcp://HOST:PORT, vsock://CID:PORT,
    /// hvsock:///PATH:PORT or auto (vsock to the host, then the config's
    /// auto_tcp, else loopback); repeatable, tried in order [default: from
    /// the config file, else tcp://127.0.0.1:9876].
    #[arg(long, short, global = true, value_parser = check_endpoint)]
    pub endpoint: Vec<String>,
    /// Client config file [default: $XDG_CONFIG_HOME/vmd/client.toml, then /etc/vmd/client.toml].
    #[arg(long, short, global = true)]
    pub config: Option<PathBuf>,
    /// Use the development daemon of `vmd serve --dev` and its dev-admin certificate.
    #[arg(long, global = true, conflicts_with = "config")]
    pub dev: bool,
    /// CA certificate (PEM).
    #[arg(long, global = true)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM).
    #[arg(long, global = true)]
    pub cert: Option<PathBuf>,
    /// Client key (PEM).
    #[arg(long, global = true)]
    pub key: Option<PathBuf>,
    /// The name the server certificate must carry.
    #[arg(long, global = true)]
    pub server_name: Option<String>,
    /// Bound on each connection step, in milliseconds.
    #[arg(long, global = true)]
    pub timeout_ms: Option<u64>,
}

/// Checks an `--endpoint` value at parse time; `auto` is expanded once
/// the config (and its `auto_tcp`) is known.
fn check_endpoint(text: &str) -> Result<String, EndpointError> {
    Endpoint::parse_list(text).map(|_| text.to_owned())
}

impl ConnectArgs {
    /// The config file's settings and the file they came from: `--dev`'s
    /// (no file), `--config`, the first file [`ClientConfig::find`] finds,
    /// or the built-in defaults (no file).
    ///
    /// # Errors
    /// If the file cannot be read or is invalid (the error names it).
    pub fn config_file(&self) -> Result<(ClientConfig, Option<PathBuf>), ConfigError> {
        if self.dev {
            return Ok((ClientConfig::dev(), None));
        }
        match self.config.clone().or_else(ClientConfig::find) {
            Some(path) => Ok((ClientConfig::load(&path)?, Some(path))),
            None => Ok((ClientConfig::default(), None)),
        }
    }

    /// Puts the flags on top of `config`: `--endpoint` replaces its
    /// endpoints (`auto` through its `auto_tcp`); the others replace one
    /// setting each.
    ///
    /// # Errors
    /// An `--endpoint` that does not parse.
    pub fn apply(&self, config: &mut ClientConfig) -> Result<(), EndpointError> {
        if !self.endpoint.is_empty() {
            let mut endpoints = Vec::new();
            for text in &self.endpoint {
                endpoints.extend(Endpoint::parse_list_via(text, &config.auto_tcp)?);
            }
            config.endpoints = endpoints;
        }
        for (slot, flag) in [
            (&mut config.ca, &self.ca),
            (&mut config.cert, &self.cert),
            (&mut config.key, &self.key),
        ] {
            if let Some(path) = flag {
                slot.clone_from(path);
            }
        }
        if let Some(name) = &self.server_name {
            config.server_name.clone_from(name);
        }
        if let Some(ms) = self.timeout_ms {
            config.connect_timeout = Duration::from_millis(ms);
        }
        Ok(())
    }

    /// A hint for a failure to load the TLS files: under `--dev` they are
    /// made by the development daemon.
    pub fn tls_hint(&self) -> &'static str {
        if self.dev {
            " (is `vmd serve --dev` running or has it run once?)"
        } else {
            ""
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Program {
        #[command(flatten)]
        connect: ConnectArgs,
    }

    fn parse(args: &[&str]) -> Result<ConnectArgs, clap::Error> {
        Program::try_parse_from(std::iter::once("program").chain(args.iter().copied()))
            .map(|p| p.connect)
    }

    #[test]
    fn flags_replace_the_file_settings() {
        let args = parse(&[
            "--endpoint",
            "tcp://10.0.0.1:9876",
            "-e",
            "auto",
            "--ca",
            "/x/ca.pem",
            "--server-name",
            "edge",
            "--timeout-ms",
            "250",
        ])
        .expect("valid flags");
        let mut config = ClientConfig::default();
        let (cert, key) = (config.cert.clone(), config.key.clone());
        args.apply(&mut config).expect("valid endpoints");
        let endpoints: Vec<String> = config.endpoints.iter().map(ToString::to_string).collect();
        // `auto` is the vsock endpoint to the host, then `auto_tcp`.
        assert_eq!(endpoints[0], "tcp://10.0.0.1:9876");
        assert!(endpoints.len() >= 3, "{endpoints:?}");
        assert_eq!(config.ca, PathBuf::from("/x/ca.pem"));
        assert_eq!((config.cert, config.key), (cert, key), "unset flags keep");
        assert_eq!(config.server_name, "edge");
        assert_eq!(config.connect_timeout, Duration::from_millis(250));
    }

    #[test]
    fn bad_endpoints_and_dev_with_config_are_usage_errors() {
        assert!(parse(&["--endpoint", "http://x"]).is_err());
        assert!(parse(&["--dev", "--config", "/x.toml"]).is_err());
        let dev = parse(&["--dev"]).expect("valid");
        let (config, file) = dev.config_file().expect("no file to read");
        assert!(file.is_none());
        assert_eq!(config.endpoints, ClientConfig::dev().endpoints);
        assert!(dev.tls_hint().contains("vmd serve --dev"));
    }
}
