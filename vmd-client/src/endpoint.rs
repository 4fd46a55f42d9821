//! Where a client connects: `tcp://HOST:PORT`, `vsock://CID:PORT`,
//! `hvsock:///PATH:PORT` (a guest port through its VM's hybrid vsock
//! socket, from the host), or `auto` (vsock to the host, CID 2, then a TCP
//! fallback: loopback unless the client config names another address).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use vmd_proto::DEFAULT_PORT;

/// The vsock CID of the host, as seen from a guest.
pub const HOST_CID: u32 = 2;

/// One place to connect to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A TCP host name or address and port.
    Tcp {
        /// Host name, IPv4 address, or IPv6 address (without brackets).
        host: String,
        /// Port.
        port: u16,
    },
    /// An AF_VSOCK address (from inside a guest, the host is CID 2).
    Vsock {
        /// Context id.
        cid: u32,
        /// Port.
        port: u32,
    },
    /// A guest's vsock port reached from the host through the VM's hybrid
    /// vsock unix socket (cloud-hypervisor, Firecracker, vhost-device-vsock).
    HybridVsock {
        /// The VM's vsock unix socket.
        path: PathBuf,
        /// The guest-side port.
        port: u32,
    },
}

/// An endpoint string could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid endpoint {input:?}: {reason} (expected tcp://HOST:PORT, vsock://CID:PORT or auto)"
)]
pub struct EndpointError {
    input: String,
    reason: &'static str,
}

impl Endpoint {
    /// vmd on this machine's loopback: the TCP half of the default `auto`.
    pub fn loopback() -> Endpoint {
        Endpoint::Tcp {
            host: "127.0.0.1".into(),
            port: DEFAULT_PORT,
        }
    }

    /// What `auto` stands for by default: vsock to the host first, then
    /// loopback TCP.
    pub fn auto() -> Vec<Endpoint> {
        Self::auto_via(Self::loopback())
    }

    /// `auto` with its TCP fallback at `tcp` (a guest names the host's
    /// address on its network, e.g. in `client.toml`'s `auto_tcp`).
    pub fn auto_via(tcp: Endpoint) -> Vec<Endpoint> {
        vec![
            Endpoint::Vsock {
                cid: HOST_CID,
                port: u32::from(DEFAULT_PORT),
            },
            tcp,
        ]
    }

    /// Parses one endpoint, or `auto` into its default list.
    ///
    /// # Errors
    /// [`EndpointError`] saying what is wrong.
    pub fn parse_list(input: &str) -> Result<Vec<Endpoint>, EndpointError> {
        Self::parse_list_via(input, &Self::loopback())
    }

    /// Parses one endpoint, or `auto` with its TCP fallback at `auto_tcp`.
    ///
    /// # Errors
    /// [`EndpointError`] saying what is wrong.
    pub fn parse_list_via(
        input: &str,
        auto_tcp: &Endpoint,
    ) -> Result<Vec<Endpoint>, EndpointError> {
        if input == "auto" {
            Ok(Self::auto_via(auto_tcp.clone()))
        } else {
            input.parse().map(|e| vec![e])
        }
    }
}

impl FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(input: &str) -> Result<Self, EndpointError> {
        let err = |reason| EndpointError {
            input: input.to_owned(),
            reason,
        };
        if let Some(rest) = input.strip_prefix("tcp://") {
            let (host, port) = rest.rsplit_once(':').ok_or_else(|| err("missing :PORT"))?;
            let host = match host.strip_prefix('[') {
                Some(v6) => v6.strip_suffix(']').ok_or_else(|| err("unclosed '['"))?,
                None if host.contains(':') => return Err(err("IPv6 addresses need [brackets]")),
                None => host,
            };
            if host.is_empty() {
                return Err(err("empty host"));
            }
            let port = port
                .parse()
                .map_err(|_| err("port is not a number 0-65535"))?;
            Ok(Endpoint::Tcp {
                host: host.to_owned(),
                port,
            })
        } else if let Some(rest) = input.strip_prefix("vsock://") {
            let (cid, port) = rest.split_once(':').ok_or_else(|| err("missing :PORT"))?;
            Ok(Endpoint::Vsock {
                cid: cid.parse().map_err(|_| err("CID is not a number"))?,
                port: port.parse().map_err(|_| err("port is not a number"))?,
            })
        } else if let Some(rest) = input.strip_prefix("hvsock://") {
            let (path, port) = rest.rsplit_once(':').ok_or_else(|| err("missing :PORT"))?;
            if !path.starts_with('/') {
                return Err(err("the socket path must be absolute"));
            }
            Ok(Endpoint::HybridVsock {
                path: PathBuf::from(path),
                port: port.parse().map_err(|_| err("port is not a number"))?,
            })
        } else {
            Err(err("unknown scheme"))
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp://[{host}]:{port}")
            }
            Endpoint::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
            Endpoint::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
            Endpoint::HybridVsock { path, port } => write!(f, "hvsock://{}:{port}", path.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_displays() {
        for s in [
            "tcp://127.0.0.1:9876",
            "tcp://[::1]:1",
            "tcp://vmd.local:80",
            "vsock://2:9876",
        ] {
            let e: Endpoint = s.parse().expect(s);
            assert_eq!(e.to_string(), s);
        }
        assert_eq!(
            "tcp://[::1]:5".parse::<Endpoint>(),
            Ok(Endpoint::Tcp {
                host: "::1".into(),
                port: 5
            })
        );
    }

    #[test]
    fn rejects_bad_input() {
        for s in [
            "",
            "127.0.0.1:1",
            "tcp://host",
            "tcp://:1",
            "tcp://::1:5",
            "tcp://h:99999",
            "vsock://x:1",
            "vsock://2",
            "http://h:1",
        ] {
            assert!(s.parse::<Endpoint>().is_err(), "{s} should fail");
        }
    }

    #[test]
    fn auto_tries_vsock_first() {
        let list = Endpoint::parse_list("auto").expect("auto");
        assert!(matches!(list[0], Endpoint::Vsock { cid: HOST_CID, .. }));
        assert!(matches!(list[1], Endpoint::Tcp { .. }));
        let tcp: Endpoint = "tcp://10.0.2.100:9876".parse().expect("valid");
        let list = Endpoint::parse_list_via("auto", &tcp).expect("auto");
        assert_eq!(list.len(), 2);
        assert_eq!(list[1], tcp);
        let list = Endpoint::parse_list_via("vsock://3:1", &tcp).expect("one");
        assert_eq!(list, vec![Endpoint::Vsock { cid: 3, port: 1 }]);
    }
}
