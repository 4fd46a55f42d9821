//! The TLS server: TLS 1.3 only, client certificate mandatory.
//!
//! 1. [`server_config`] loads the CA, the server chain and key and any
//!    CRLs (PEM, parsed with `rustls-pki-types`) and builds a rustls
//!    `ServerConfig` whose client verifier is `WebPkiClientVerifier` over
//!    that CA and those CRLs: a client without a certificate, with one from
//!    another CA, an expired one or a revoked one fails the handshake.
//! 2. Client chains are exactly leaf ← vmd CA ([`DirectChainVerifier`]):
//!    a client that presents an intermediate certificate (anything but the
//!    CA certificates themselves) is refused before the library builds a
//!    path, and the leaf must be issued by one of the CAs by name, whatever
//!    the library does with path lengths. vmd's PKI never issues
//!    intermediates; a chain through one means the CA key signed something
//!    vmd did not.
//! 3. TLS 1.3 session resumption uses stateless tickets: after a full
//!    handshake the server sends [`TICKETS_PER_HANDSHAKE`] tickets,
//!    encrypted under keys of this `ServerConfig` alone (ring's
//!    ChaCha20-Poly1305 ticketer), so the server keeps no per-client
//!    session state. A reconnecting client skips the certificate exchange
//!    and its signatures. Every reload builds a new config with new ticket
//!    keys, so tickets issued before a CRL or policy reload no longer
//!    resume: the next connection is a full handshake, checked against the
//!    new CRLs.
//! 4. After the handshake, [`PeerIdentity::from_certificate`] names the
//!    peer by its verified leaf: the first SAN DNS name, else the subject
//!    CN, plus the SHA-256 fingerprint of its public key. A resumed session
//!    carries the leaf of its original handshake;
//!    [`PeerIdentity::from_connection`] refuses it once that certificate
//!    has expired (a ticket may outlive it).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use x509_parser::extensions::GeneralName;

use crate::config::TlsPaths;

/// The ALPN protocol name both ends offer; it keeps other TLS protocols
/// from being mistaken for vmd's.
pub const ALPN: &[u8] = b"vmd/1";

/// Session tickets sent after each full handshake. TLS 1.3 tickets are
/// single-use; two let a client open two connections at once by resumption.
pub const TICKETS_PER_HANDSHAKE: usize = 2;

/// TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds no usable item.
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
    /// A file holds no certificate.
    #[error("{} contains no certificate", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// rustls refused the material (bad CA, key not matching the cert, …).
    #[error("invalid TLS material ({what})")]
    Rustls {
        /// Which part.
        what: &'static str,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// The client verifier could not be built from the CA.
    #[error("cannot build the client certificate verifier from {}", path.display())]
    Verifier {
        /// The CA file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
}

/// Loads every certificate in a PEM file.
///
/// # Errors
/// [`TlsError::Pem`] if unreadable, [`TlsError::NoCertificate`] if empty.
pub fn load_certs(
    path: &Path,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_err = |source| TlsError::Pem {
        what,
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Loads a private key from a PEM file.
///
/// # Errors
/// [`TlsError::Pem`] if unreadable or holding no key.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::Pem {
        what: "private key",
        path: path.to_owned(),
        source,
    })
}

/// Builds the daemon's TLS configuration.
///
/// # Errors
/// [`TlsError`] naming the file or part that is unusable.
pub fn server_config(paths: &TlsPaths) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let anchors = load_certs(&paths.ca, "CA certificate")?;
    let mut roots = RootCertStore::empty();
    for ca in &anchors {
        roots.add(ca.clone()).map_err(|source| TlsError::Rustls {
            what: "CA certificate",
            source,
        })?;
    }
    let mut crls = Vec::new();
    for path in &paths.crls {
        let pem_err = |source| TlsError::Pem {
            what: "certificate revocation list",
            path: path.clone(),
            source,
        };
        for crl in CertificateRevocationListDer::pem_file_iter(path).map_err(pem_err)? {
            crls.push(crl.map_err(pem_err)?);
        }
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .with_crls(crls)
        .build()
        .map_err(|source| TlsError::Verifier {
            path: paths.ca.clone(),
            source,
        })?;
    let chain = load_certs(&paths.cert, "server certificate")?;
    let key = load_key(&paths.key)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Rustls {
            what: "protocol versions",
            source,
        })?
        .with_client_cert_verifier(Arc::new(DirectChainVerifier::new(verifier, anchors)))
        .with_single_cert(chain, key)
        .map_err(|source| TlsError::Rustls {
            what: "server certificate and key",
            source,
        })?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    // Stateless resumption (module docs, step 2): no session cache.
    config.ticketer = rustls::crypto::ring::Ticketer::new().map_err(|source| TlsError::Rustls {
        what: "session ticket keys",
        source,
    })?;
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = TICKETS_PER_HANDSHAKE;
    Ok(Arc::new(config))
}

/// The metrics listener's TLS config: `main` (the same certificates,
/// client-certificate verifier, CRLs and ticket keys) with ALPN
/// `http/1.1` instead of vmd's protocol.
pub fn metrics_config(main: &ServerConfig) -> Arc<ServerConfig> {
    let mut config = main.clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A client chain that is longer than leaf ← vmd CA.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The client sent a certificate other than its leaf and the CA.
    #[error("client chain holds an intermediate certificate: only leaf <- vmd CA is accepted")]
    Intermediate,
    /// The leaf is not issued by a vmd CA (by name).
    #[error("client certificate is not issued directly by the vmd CA")]
    NotDirect,
}

/// The client verifier: `WebPkiClientVerifier` over the vmd CA, refusing
/// every chain but leaf ← CA (module docs, step 2).
#[derive(Debug)]
pub struct DirectChainVerifier {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    /// The CA certificates (DER), the only ones a client may send besides
    /// its leaf.
    anchors: Vec<CertificateDer<'static>>,
    /// The CAs' subject names, raw DER.
    subjects: Vec<Vec<u8>>,
}

impl DirectChainVerifier {
    /// Wraps `inner`, which verifies against `anchors`.
    pub fn new(
        inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
        anchors: Vec<CertificateDer<'static>>,
    ) -> Self {
        let subjects = anchors
            .iter()
            .filter_map(|ca| {
                x509_parser::parse_x509_certificate(ca)
                    .ok()
                    .map(|(_, ca)| ca.subject().as_raw().to_vec())
            })
            .collect();
        Self {
            inner,
            anchors,
            subjects,
        }
    }

    fn refuse(e: ChainError) -> rustls::Error {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
            Arc::new(e),
        )))
    }
}

impl rustls::server::danger::ClientCertVerifier for DirectChainVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        if intermediates
            .iter()
            .any(|cert| !self.anchors.iter().any(|ca| ca.as_ref() == cert.as_ref()))
        {
            return Err(Self::refuse(ChainError::Intermediate));
        }
        let verified = self.inner.verify_client_cert(end_entity, &[], now)?;
        let direct = x509_parser::parse_x509_certificate(end_entity)
            .is_ok_and(|(_, leaf)| self.subjects.iter().any(|s| s == leaf.issuer().as_raw()));
        if !direct {
            return Err(Self::refuse(ChainError::NotDirect));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Who a verified peer is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The first SAN DNS name of the leaf certificate, else its subject CN.
    pub name: String,
    /// Lowercase hex SHA-256 of the leaf's SubjectPublicKeyInfo.
    pub spki_sha256: String,
}

/// A verified certificate carries no usable name.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The handshake left no peer certificate (cannot happen with a
    /// mandatory-client-cert verifier, but is not assumed).
    #[error("peer presented no certificate")]
    NoCertificate,
    /// The certificate does not parse as X.509.
    #[error("peer certificate does not parse")]
    Unparsable,
    /// Neither a SAN DNS name nor a subject CN.
    #[error("peer certificate has neither a SAN DNS name nor a common name")]
    NoName,
    /// The certificate is outside its validity period (a resumed session
    /// whose certificate expired after the ticket was issued).
    #[error("peer certificate is not valid now")]
    Expired,
}

impl PeerIdentity {
    /// Names the peer from its verified leaf certificate (DER).
    ///
    /// # Errors
    /// [`IdentityError`] if the certificate has no usable name.
    pub fn from_certificate(der: &[u8]) -> Result<Self, IdentityError> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|_| IdentityError::Unparsable)?;
        if !cert.validity().is_valid() {
            return Err(IdentityError::Expired);
        }
        let san = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .and_then(|san| {
                san.value.general_names.iter().find_map(|name| match name {
                    GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                    _ => None,
                })
            });
        let name = match san {
            Some(name) => name,
            None => cert
                .subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map(str::to_owned)
                .ok_or(IdentityError::NoName)?,
        };
        let digest = ring::digest::digest(&ring::digest::SHA256, cert.public_key().raw);
        let spki_sha256 = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        Ok(Self { name, spki_sha256 })
    }

    /// Names the peer of a finished server handshake.
    ///
    /// # Errors
    /// [`IdentityError`] if there is no usable peer certificate.
    pub fn from_connection(conn: &rustls::ServerConnection) -> Result<Self, IdentityError> {
        let leaf = conn
            .peer_certificates()
            .and_then(|certs| certs.first())
            .ok_or(IdentityError::NoCertificate)?;
        Self::from_certificate(leaf)
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// rcgen puts a default CN in new params; start from an empty subject.
    fn params(sans: &[&str]) -> rcgen::CertificateParams {
        let sans = sans.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let mut params = rcgen::CertificateParams::new(sans).expect("valid SANs");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
    }

    fn cert_with(params: &rcgen::CertificateParams) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().expect("key generation works");
        params
            .self_signed(&key)
            .expect("self-signing works")
            .der()
            .to_vec()
    }

    #[test]
    fn identity_prefers_san_dns() {
        let mut params = params(&["gui-vm"]);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "other-name");
        let id = PeerIdentity::from_certificate(&cert_with(&params)).expect("named");
        assert_eq!(id.name, "gui-vm");
        assert_eq!(id.spki_sha256.len(), 64);
    }

    #[test]
    fn identity_falls_back_to_cn() {
        let mut params = params(&[]);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "admin-laptop");
        let id = PeerIdentity::from_certificate(&cert_with(&params)).expect("named");
        assert_eq!(id.name, "admin-laptop");
    }

    #[test]
    fn nameless_or_garbage_certificates_are_refused() {
        let params = params(&[]);
        assert!(matches!(
            PeerIdentity::from_certificate(&cert_with(&params)),
            Err(IdentityError::NoName)
        ));
        assert!(matches!(
            PeerIdentity::from_certificate(b"not a certificate"),
            Err(IdentityError::Unparsable)
        ));
    }

    #[test]
    fn missing_files_are_named() {
        let paths = TlsPaths::in_pki_dir(Path::new("/nonexistent/pki"));
        let err = server_config(&paths).expect_err("no files");
        assert!(err.to_string().contains("/nonexistent/pki/ca.pem"), "{err}");
    }
}
