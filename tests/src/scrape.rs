//! HTTP clients for the metrics tests: a scrape of vmd's metrics listener
//! over mutual TLS, and a plain GET of Prometheus's query API. One request
//! per connection (`Connection: close`), the answer read to its end.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::TestPki;

/// Longest a request may take.
const PATIENCE: Duration = Duration::from_secs(20);

/// An HTTP answer: status code and body.
#[derive(Debug)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// The head's lines after the status line.
    pub headers: String,
    /// The body.
    pub body: String,
}

/// A TLS client config for the metrics listener (ALPN `http/1.1`) with
/// `name`'s certificate from `pki`'s CA.
pub fn metrics_tls(pki: &TestPki, name: &str) -> Arc<rustls::ClientConfig> {
    http(&pki.raw_client_config(name))
}

/// As [`metrics_tls`], with the certificate issued by `ca` (maybe another
/// CA than the one the daemon trusts).
pub fn metrics_tls_from(
    pki: &TestPki,
    ca: &vmd::pki::CertificateAuthority,
    name: &str,
) -> Arc<rustls::ClientConfig> {
    http(&pki.raw_client_config_from(ca, name))
}

fn http(config: &rustls::ClientConfig) -> Arc<rustls::ClientConfig> {
    let mut config = config.clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A TLS client config that trusts `pki`'s CA and presents no certificate.
///
/// # Panics
/// If rustls cannot build it.
pub fn anonymous_tls(pki: &TestPki) -> Arc<rustls::ClientConfig> {
    let mut config = vmd_client::tls::builder()
        .expect("TLS 1.3")
        .with_root_certificates(pki.roots())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// `method path` on vmd's metrics listener at `addr` over TLS.
///
/// # Errors
/// The TLS handshake's or the connection's error (a refused certificate
/// shows here), or a timeout.
pub async fn metrics(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
) -> std::io::Result<Answer> {
    let work = async {
        let tcp = TcpStream::connect(addr).await?;
        let name = rustls_pki_types::ServerName::try_from(vmd_proto::SERVER_NAME)
            .expect("valid server name");
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await?;
        exchange(stream, method, path, "1.1").await
    };
    tokio::time::timeout(PATIENCE, work)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// `GET path` (with its query) on a plain HTTP server such as Prometheus.
///
/// # Errors
/// The connection's error, or a timeout.
pub async fn get(addr: SocketAddr, path: &str) -> std::io::Result<Answer> {
    let work = async {
        let tcp = TcpStream::connect(addr).await?;
        exchange(tcp, "GET", path, "1.0").await
    };
    tokio::time::timeout(PATIENCE, work)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    method: &str,
    path: &str,
    version: &str,
) -> std::io::Result<Answer> {
    let request =
        format!("{method} {path} HTTP/{version}\r\nHost: vmd\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    stream.flush().await?;
    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw).await {
        Ok(_) => {}
        // A peer that closes without close_notify after a complete answer.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(e),
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("no HTTP head: {text:?}"),
        )
    })?;
    let (status_line, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("no status: {head:?}"),
            )
        })?;
    Ok(Answer {
        status,
        headers: headers.to_owned(),
        body: body.to_owned(),
    })
}

/// Percent-encodes a query parameter's value.
pub fn encode_query(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 3);
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One kept-alive TLS connection to the metrics listener, for repeated
/// scrapes as Prometheus makes them.
#[derive(Debug)]
pub struct KeptAlive {
    stream: tokio_rustls::client::TlsStream<TcpStream>,
    buf: Vec<u8>,
}

impl KeptAlive {
    /// Connects to `addr` with `tls`.
    ///
    /// # Errors
    /// The connection's or handshake's error.
    pub async fn connect(
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
    ) -> std::io::Result<Self> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let name = rustls_pki_types::ServerName::try_from(vmd_proto::SERVER_NAME)
            .expect("valid server name");
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await?;
        Ok(Self {
            stream,
            buf: Vec::new(),
        })
    }

    /// `GET path`; the answer's status and body length.
    ///
    /// # Errors
    /// The connection's error, or an answer without `Content-Length`.
    pub async fn get(&mut self, path: &str) -> std::io::Result<(u16, usize)> {
        let request = format!("GET {path} HTTP/1.1\r\nHost: vmd\r\n\r\n");
        self.stream.write_all(request.as_bytes()).await?;
        self.stream.flush().await?;
        let bad =
            |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
        let head_end = loop {
            if let Some(at) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            self.fill().await?;
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).into_owned();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("no status"))?;
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .ok_or_else(|| bad("no Content-Length"))?;
        while self.buf.len() < head_end + length {
            self.fill().await?;
        }
        self.buf.drain(..head_end + length);
        Ok((status, length))
    }

    async fn fill(&mut self) -> std::io::Result<()> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}
