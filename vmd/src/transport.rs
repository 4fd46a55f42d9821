//! Listeners: TCP and AF_VSOCK, behind one [`Listener`] trait so the
//! connection handler is written once, generic over the stream type.
//!
//! The transport peer ([`PeerAddr`]) travels with every connection: the
//! IP and port for TCP, the kernel-reported CID and port for vsock.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;

use std::path::{Path, PathBuf};
use tokio::io::{AsyncRead, AsyncWrite};

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_vsock::{VMADDR_CID_ANY, VsockAddr, VsockListener, VsockStream};
use vmd_proto::VmName;

/// Where a connection came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerAddr {
    /// A TCP client.
    Tcp(SocketAddr),
    /// An AF_VSOCK client: the kernel-reported guest CID and source port.
    Vsock {
        /// The peer's context id.
        cid: u32,
        /// The peer's source port.
        port: u32,
    },
    /// A hybrid vsock client: the VM whose vsock socket it came through.
    HybridVsock {
        /// The VM.
        vm: VmName,
    },
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "tcp:{addr}"),
            Self::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            Self::HybridVsock { vm } => write!(f, "hvsock:{vm}"),
        }
    }
}

/// An address the daemon listens on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    /// A bound TCP socket.
    Tcp(SocketAddr),
    /// A bound AF_VSOCK socket.
    Vsock {
        /// The bound CID (`VMADDR_CID_ANY` = `u32::MAX`).
        cid: u32,
        /// The bound port.
        port: u32,
    },
    /// A hybrid vsock listener: the unix socket `<uds>_<port>` of one VM.
    HybridVsock {
        /// The VM.
        vm: VmName,
        /// The unix socket path.
        path: PathBuf,
    },
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(addr) => write!(f, "tcp://{addr}"),
            Self::Vsock { cid, port } if *cid == VMADDR_CID_ANY => write!(f, "vsock://any:{port}"),
            Self::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
            Self::HybridVsock { vm, path } => write!(f, "hvsock://{} ({vm})", path.display()),
        }
    }
}

/// A bound listening socket that yields streams of one type.
pub trait Listener: Send + Sync + 'static {
    /// The accepted stream.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Waits for the next connection.
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, PeerAddr)>> + Send;

    /// The bound address.
    ///
    /// # Errors
    /// The socket's `getsockname` error.
    fn local_addr(&self) -> io::Result<ListenAddr>;
}

impl Listener for TcpListener {
    type Stream = TcpStream;

    async fn accept(&self) -> io::Result<(TcpStream, PeerAddr)> {
        let (stream, addr) = TcpListener::accept(self).await?;
        // Replies are single small frames: send them now, not after 40 ms.
        stream.set_nodelay(true)?;
        Ok((stream, PeerAddr::Tcp(addr)))
    }

    fn local_addr(&self) -> io::Result<ListenAddr> {
        TcpListener::local_addr(self).map(ListenAddr::Tcp)
    }
}

impl Listener for VsockListener {
    type Stream = VsockStream;

    async fn accept(&self) -> io::Result<(VsockStream, PeerAddr)> {
        let (stream, addr) = VsockListener::accept(self).await?;
        Ok((
            stream,
            PeerAddr::Vsock {
                cid: addr.cid(),
                port: addr.port(),
            },
        ))
    }

    fn local_addr(&self) -> io::Result<ListenAddr> {
        VsockListener::local_addr(self).map(|addr| ListenAddr::Vsock {
            cid: addr.cid(),
            port: addr.port(),
        })
    }
}

/// A hybrid vsock listener: connections on `<uds>_<port>` come from the
/// VM that owns `uds` (the hypervisor or vhost-device-vsock forwards its
/// guest's AF_VSOCK connections to host port `port` there).
#[derive(Debug)]
pub struct HybridListener {
    listener: UnixListener,
    vm: VmName,
    path: PathBuf,
}

impl Listener for HybridListener {
    type Stream = UnixStream;

    async fn accept(&self) -> io::Result<(UnixStream, PeerAddr)> {
        let (stream, _) = self.listener.accept().await?;
        Ok((
            stream,
            PeerAddr::HybridVsock {
                vm: self.vm.clone(),
            },
        ))
    }

    fn local_addr(&self) -> io::Result<ListenAddr> {
        Ok(ListenAddr::HybridVsock {
            vm: self.vm.clone(),
            path: self.path.clone(),
        })
    }
}

/// Binds the hybrid vsock listener of `vm` at `<uds>_<port>`, replacing a
/// stale socket file left by an earlier run (never any other file).
///
/// # Errors
/// The bind error, or `AlreadyExists` if the path is not a socket.
pub fn bind_hybrid(vm: VmName, uds: &Path, port: u32) -> io::Result<HybridListener> {
    use std::os::unix::fs::FileTypeExt;
    let mut path = uds.as_os_str().to_owned();
    path.push(format!("_{port}"));
    let path = PathBuf::from(path);
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(&path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(_) => {}
    }
    Ok(HybridListener {
        listener: UnixListener::bind(&path)?,
        vm,
        path,
    })
}

/// Binds a TCP listener (IPv4 or IPv6; port 0 lets the kernel choose).
///
/// # Errors
/// The bind error.
pub async fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Binds an AF_VSOCK listener on every local CID (`VMADDR_CID_ANY`).
/// `port` `u32::MAX` (`VMADDR_PORT_ANY`) lets the kernel choose.
///
/// # Errors
/// The bind error, for example `ENODEV`/`EAFNOSUPPORT` on a host without
/// vsock.
pub fn bind_vsock(port: u32) -> io::Result<VsockListener> {
    VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_display() {
        assert_eq!(
            PeerAddr::Tcp("127.0.0.1:5".parse().expect("addr")).to_string(),
            "tcp:127.0.0.1:5"
        );
        assert_eq!(
            PeerAddr::Vsock { cid: 3, port: 1024 }.to_string(),
            "vsock:3:1024"
        );
        assert_eq!(
            ListenAddr::Vsock {
                cid: VMADDR_CID_ANY,
                port: 9876
            }
            .to_string(),
            "vsock://any:9876"
        );
        assert_eq!(
            ListenAddr::Tcp("[::1]:9876".parse().expect("addr")).to_string(),
            "tcp://[::1]:9876"
        );
    }
}
