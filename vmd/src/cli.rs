//! The `vmd` command line: `serve`, `pki …`, `check-config`.
//!
//! Flags override the config file; `TryFrom<ServeArgs> for Serve` is where
//! the two meet, so `main` only parses and dispatches.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, ConfigError, DEFAULT_CONFIG_PATH, LogFormat, VsockConfig};
use crate::pki::PkiCommand;

/// The vmd daemon: VM information and control for a Ghaf KVM host.
#[derive(Debug, Parser)]
#[command(name = "vmd", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// `vmd` subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve clients over TLS on TCP and AF_VSOCK.
    Serve(ServeArgs),
    /// Manage the certificate authority and certificates.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Validate the config file and load the TLS material it names.
    CheckConfig(ServeArgs),
    /// Ask the running daemon to reload its certificates, CRLs and policy
    /// (sends it SIGHUP; `systemctl reload vmd` does the same).
    Reload {
        /// The daemon's PID [default: the only `vmd serve` process].
        #[arg(long)]
        pid: Option<u32>,
    },
}

/// Finds the PIDs of running `vmd serve` processes in `/proc`.
pub fn find_daemons(proc_root: &std::path::Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|pid: &u32| {
            let Ok(cmdline) = std::fs::read(proc_root.join(pid.to_string()).join("cmdline")) else {
                return false;
            };
            let mut args = cmdline.split(|b| *b == 0);
            let exe = args.next().unwrap_or_default();
            let is_vmd = exe.rsplit(|b| *b == b'/').next() == Some(b"vmd".as_slice());
            is_vmd && args.next() == Some(b"serve".as_slice())
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// Flags of `vmd serve` (and `vmd check-config`).
#[derive(Clone, Debug, Default, Args)]
pub struct ServeArgs {
    /// Config file [default: /etc/vmd/vmd.toml if it exists].
    #[arg(long, short, conflicts_with = "dev")]
    pub config: Option<PathBuf>,
    /// Development mode: create a development PKI on first run (CA, server
    /// certificate, `dev-admin` client) and listen on 127.0.0.1:9876 (and
    /// vsock where present). `vmctl --dev` connects to it.
    #[arg(long)]
    pub dev: bool,
    /// State directory of development mode.
    #[arg(long, env = "VMD_DEV_DIR", requires = "dev")]
    pub dev_dir: Option<PathBuf>,
    /// Listen on this TCP address (repeatable; replaces the configured list).
    #[arg(long = "tcp", value_name = "ADDR")]
    pub tcp: Vec<SocketAddr>,
    /// Do not listen on TCP.
    #[arg(long, conflicts_with = "tcp")]
    pub no_tcp: bool,
    /// Listen on this AF_VSOCK port.
    #[arg(long, value_name = "PORT")]
    pub vsock_port: Option<u32>,
    /// Do not listen on AF_VSOCK.
    #[arg(long, conflicts_with = "vsock_port")]
    pub no_vsock: bool,
    /// CA certificate that client certificates must chain to.
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// Server certificate chain (PEM).
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Log line format.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter, e.g. `info` or `info,vmd=debug`.
    #[arg(long)]
    pub log_level: Option<String>,
}

/// What `vmd serve` will do: the final config, and in development mode the
/// PKI directory to create first.
#[derive(Debug)]
pub struct Serve {
    /// The validated configuration, flags applied.
    pub config: Config,
    /// Development mode's PKI directory.
    pub dev_pki_dir: Option<PathBuf>,
}

impl TryFrom<ServeArgs> for Serve {
    type Error = ConfigError;

    fn try_from(args: ServeArgs) -> Result<Self, ConfigError> {
        let (mut config, dev_pki_dir) = if args.dev {
            let dir = args.dev_dir.unwrap_or_else(vmd_proto::dev::dir);
            (Config::dev(&dir), Some(dir.join("pki")))
        } else {
            let default = PathBuf::from(DEFAULT_CONFIG_PATH);
            match args.config {
                Some(path) => (Config::load(&path)?, None),
                None if default.exists() => (Config::load(&default)?, None),
                None => (Config::default(), None),
            }
        };
        if args.no_tcp {
            config.tcp.clear();
        } else if !args.tcp.is_empty() {
            config.tcp = args.tcp;
        }
        if args.no_vsock {
            config.vsock = None;
        } else if let Some(port) = args.vsock_port {
            let required = config.vsock.is_some_and(|v| v.required);
            config.vsock = Some(VsockConfig { port, required });
        }
        if let Some(ca) = args.ca {
            config.tls.ca = ca;
        }
        if let Some(cert) = args.cert {
            config.tls.cert = cert;
        }
        if let Some(key) = args.key {
            config.tls.key = key;
        }
        if let Some(format) = args.log_format {
            config.log.format = format;
        }
        if let Some(level) = args.log_level {
            if let Err(e) = tracing_subscriber::EnvFilter::try_new(&level) {
                return Err(ConfigError::Invalid {
                    key: "--log-level",
                    reason: e.to_string(),
                });
            }
            config.log.level = level;
        }
        config.check_listeners()?;
        Ok(Self {
            config,
            dev_pki_dir,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Serve, ConfigError> {
        let cli = Cli::try_parse_from(args).expect("valid command line");
        match cli.command {
            Command::Serve(args) => Serve::try_from(args),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn dev_mode_uses_dev_pki_and_loopback() {
        let serve = parse(&["vmd", "serve", "--dev", "--dev-dir", "/tmp/d"]).expect("valid");
        assert_eq!(serve.dev_pki_dir, Some(PathBuf::from("/tmp/d/pki")));
        assert_eq!(serve.config.tls.ca, PathBuf::from("/tmp/d/pki/ca.pem"));
        assert_eq!(
            serve.config.tcp,
            vec!["127.0.0.1:9876".parse().expect("addr")]
        );
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vmd.toml");
        std::fs::write(
            &path,
            "[listen]\ntcp = [\"127.0.0.1:1\"]\n[listen.vsock]\nport = 5\n",
        )
        .expect("write");
        let path = path.to_str().expect("utf-8 path");
        let serve =
            parse(&["vmd", "serve", "-c", path, "--tcp", "[::1]:0", "--no-vsock"]).expect("valid");
        assert_eq!(serve.config.tcp, vec!["[::1]:0".parse().expect("addr")]);
        assert_eq!(serve.config.vsock, None);
        assert_eq!(serve.dev_pki_dir, None);
    }

    #[test]
    fn missing_config_file_is_an_error() {
        let err = parse(&["vmd", "serve", "-c", "/nonexistent/vmd.toml"]).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/vmd.toml"), "{err}");
    }

    #[test]
    fn daemons_are_found_by_command_line() {
        let proc_root = tempfile::tempdir().expect("tempdir");
        for (pid, cmdline) in [
            ("10", "/usr/bin/vmd\0serve\0--dev\0"),
            ("11", "vmd\0pki\0show\0"),
            ("12", "/bin/sh\0-c\0vmd serve\0"),
            ("self", "x"),
        ] {
            let dir = proc_root.path().join(pid);
            std::fs::create_dir(&dir).expect("mkdir");
            std::fs::write(dir.join("cmdline"), cmdline).expect("write");
        }
        assert_eq!(find_daemons(proc_root.path()), vec![10]);
    }

    #[test]
    fn no_listener_is_refused() {
        let err = parse(&["vmd", "serve", "--dev", "--no-tcp", "--no-vsock"]).expect_err("none");
        assert!(err.to_string().starts_with("listen:"), "{err}");
    }
}
