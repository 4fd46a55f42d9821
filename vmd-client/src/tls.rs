//! Client TLS: the vmd CA as the only root, a client certificate, TLS 1.3.
//!
//! Session resumption is on: a [`ClientTls`] keeps the TLS 1.3 tickets vmd
//! sends (in memory, [`RESUMPTION_CACHE`] servers), and its clones share
//! them, so reconnecting with the same `ClientTls` resumes instead of
//! repeating the certificate exchange.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// The ALPN protocol name (must match the daemon's).
pub const ALPN: &[u8] = b"vmd/1";

/// Servers whose session tickets a [`ClientTls`] keeps.
pub const RESUMPTION_CACHE: usize = 32;

/// TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file is unreadable or holds no usable item.
    #[error("cannot load {what} from {}", path.display())]
    Pem {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// rustls refused the material.
    #[error("invalid TLS material ({what})")]
    Rustls {
        /// Which part.
        what: &'static str,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// The server name is not a valid DNS name or IP address.
    #[error("invalid server name {0:?}")]
    ServerName(String),
}

/// A PEM error constructor for one file.
fn pem<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl Fn(rustls_pki_types::pem::Error) -> TlsError + 'a {
    move |source| TlsError::Pem {
        what,
        path: path.to_owned(),
        source,
    }
}

/// A ready client TLS configuration and the name the server must prove.
#[derive(Clone, Debug)]
pub struct ClientTls {
    pub(crate) config: Arc<ClientConfig>,
    pub(crate) server_name: ServerName<'static>,
}

impl ClientTls {
    /// Loads the CA, the client certificate and key (PEM files).
    /// `server_name` is the name in the server certificate (`vmd`).
    ///
    /// # Errors
    /// [`TlsError`] naming the file or part that is unusable.
    pub fn from_files(
        ca: &Path,
        cert: &Path,
        key: &Path,
        server_name: &str,
    ) -> Result<Self, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for ca_cert in CertificateDer::pem_file_iter(ca).map_err(pem("CA certificate", ca))? {
            roots
                .add(ca_cert.map_err(pem("CA certificate", ca))?)
                .map_err(|source| TlsError::Rustls {
                    what: "CA certificate",
                    source,
                })?;
        }
        let chain = CertificateDer::pem_file_iter(cert)
            .map_err(pem("client certificate", cert))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem("client certificate", cert))?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(pem("client key", key))?;
        let mut config = builder()?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|source| TlsError::Rustls {
                what: "client certificate and key",
                source,
            })?;
        config.resumption = rustls::client::Resumption::in_memory_sessions(RESUMPTION_CACHE);
        Self::from_config(config, server_name)
    }

    /// The rustls configuration (shared by every connection made with it).
    pub fn config(&self) -> &Arc<ClientConfig> {
        &self.config
    }

    /// The name the server certificate must carry.
    pub fn server_name(&self) -> &ServerName<'static> {
        &self.server_name
    }

    /// The same identity with session resumption off: every connection
    /// made with the result runs a full handshake.
    #[must_use]
    pub fn without_resumption(&self) -> Self {
        let mut config = (*self.config).clone();
        config.resumption = rustls::client::Resumption::disabled();
        Self {
            config: Arc::new(config),
            server_name: self.server_name.clone(),
        }
    }

    /// Wraps a prepared rustls configuration (for unusual setups and tests).
    /// The vmd ALPN protocol is added.
    ///
    /// # Errors
    /// [`TlsError::ServerName`] if `server_name` is invalid.
    pub fn from_config(mut config: ClientConfig, server_name: &str) -> Result<Self, TlsError> {
        config.alpn_protocols = vec![ALPN.to_vec()];
        let server_name = ServerName::try_from(server_name.to_owned())
            .map_err(|_| TlsError::ServerName(server_name.to_owned()))?;
        Ok(Self {
            config: Arc::new(config),
            server_name,
        })
    }
}

/// A TLS 1.3-only client config builder on the ring provider.
///
/// # Errors
/// [`TlsError::Rustls`] if the provider lacks TLS 1.3 (never with ring).
pub fn builder() -> Result<rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier>, TlsError> {
    ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls {
            what: "protocol versions",
            source,
        })
}
