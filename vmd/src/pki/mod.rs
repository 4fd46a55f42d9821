//! The daemon's private PKI: one CA that signs the server certificate and
//! the client certificates used for TLS 1.3 mutual authentication.
//!
//! Every key is ECDSA P-256, stored as an unencrypted PKCS#8 PEM. The CA is
//! valid for [`DEFAULT_CA_DAYS`] by default, leaf certificates for
//! [`DEFAULT_LEAF_DAYS`], and leaf certificates are renewed when fewer than
//! [`DEFAULT_RENEW_BEFORE_DAYS`] remain.
//!
//! # Layout on disk
//!
//! ```text
//! <dir>/                 0700
//!   ca.pem               0644  self-signed CA certificate (CN given by the operator)
//!   ca.key               0600  CA private key
//!   server.pem           0644  server certificate: CN "vmd", EKU serverAuth,
//!                              SAN DNS "vmd" + host names, SAN IPs
//!   server.key           0600  server private key
//!   clients/             0700
//!     <name>.pem         0644  client certificate: CN = SAN DNS = <name>, EKU clientAuth
//!     <name>.key         0600  client private key
//! ```
//!
//! Files are written atomically: a temporary file is created next to the
//! target with its final mode, synced, then moved into place. A key file is
//! never overwritten or deleted once it exists.
//!
//! # The `ensure` flow
//!
//! [`ensure`] makes a directory match an [`EnsureSpec`] and is idempotent:
//!
//! 1. Read the CA. If neither `ca.pem` nor `ca.key` exists, generate a new
//!    CA. If only the key exists, re-create the self-signed CA certificate
//!    from that key. If only the certificate exists, or either file cannot be
//!    parsed, or they do not belong together, fail: the CA is never replaced
//!    behind the operator's back. A CA close to expiry is only logged.
//! 2. For the server (if requested) and each client, read the existing key.
//!    An unparsable key is an error naming the file; a missing key is
//!    generated.
//! 3. Check the existing certificate against the key and the CA: it must
//!    parse, carry the key's public key, be signed by the CA, be valid now
//!    and for more than `renew_before_days`, have the right extended key
//!    usage, and contain every requested SAN. Otherwise re-issue it with the
//!    existing key.
//! 4. Only after every check and every signature succeeded in memory, write
//!    the new files: keys first (never replacing one), then certificates.
//! 5. Report which files were created, renewed, or left unchanged.

mod ca;
mod cli;
mod crl;
mod ensure;
mod names;
mod store;
mod summary;

use std::path::{Path, PathBuf};

use time::{Duration, OffsetDateTime};

pub use ca::{CertificateAuthority, IssuedCert, KeyPairPem};
pub use cli::{PkiCommand, run_command};
pub use crl::{CRL_VALIDITY_DAYS, RevokeReport, revoke};
pub use ensure::{EnsureReport, EnsureSpec, ensure};
pub use names::{ClientName, ClientNameError, ServerNames};
pub use store::write_issued;
pub use summary::CertSummary;

/// DNS name (and common name) every server certificate carries; clients
/// verify the server against this name.
pub const SERVER_DNS_NAME: &str = "vmd";

/// Default validity of a new CA, in days (10 years).
pub const DEFAULT_CA_DAYS: u32 = 3650;

/// Default validity of a leaf (server or client) certificate, in days.
pub const DEFAULT_LEAF_DAYS: u32 = 365;

/// Leaf certificates with fewer days than this left are renewed by [`ensure`].
pub const DEFAULT_RENEW_BEFORE_DAYS: u32 = 30;

/// Errors of the PKI module. Every error that involves a file names it.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file (or its directory).
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A directory could not be created.
    #[error("cannot create directory {path}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file holds no readable PEM certificate.
    #[error("no PEM certificate in {path}")]
    CertPem {
        /// The file.
        path: PathBuf,
        /// The PEM error.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// A CRL file is not a valid PEM CRL.
    #[error("malformed certificate revocation list in {path}")]
    CrlParse {
        /// The file.
        path: PathBuf,
    },
    /// The certificate was not issued by this CA.
    #[error("{path} was not issued by this CA")]
    NotIssuedByCa {
        /// The certificate.
        path: PathBuf,
    },
    /// A file holds a certificate that is not valid X.509.
    #[error("malformed certificate in {path}")]
    CertParse {
        /// The file.
        path: PathBuf,
        /// The X.509 error.
        #[source]
        source: x509_parser::error::X509Error,
    },
    /// DER bytes are not a valid X.509 certificate.
    #[error("malformed X.509 certificate")]
    CertDer {
        /// The X.509 error.
        #[source]
        source: x509_parser::error::X509Error,
    },
    /// A file holds no readable PEM private key.
    #[error("no PEM private key in {path}")]
    KeyPem {
        /// The file.
        path: PathBuf,
        /// The PEM error.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// A private key is not in PKCS#8 format.
    #[error("private key in {path} is not PKCS#8")]
    KeyNotPkcs8 {
        /// The file.
        path: PathBuf,
    },
    /// A PKCS#8 private key is not a usable ECDSA P-256 key.
    #[error("private key in {path} is not a valid ECDSA P-256 key")]
    KeyRejected {
        /// The file.
        path: PathBuf,
        /// Why the key was rejected.
        #[source]
        source: rcgen::Error,
    },
    /// A certificate does not carry the public key of its key file.
    #[error("key {key} does not match certificate {cert}")]
    KeyMismatch {
        /// The key file.
        key: PathBuf,
        /// The certificate file.
        cert: PathBuf,
    },
    /// A certificate meant to be the CA lacks `basicConstraints CA:TRUE`.
    #[error("{path} is not a CA certificate")]
    NotCa {
        /// The certificate file.
        path: PathBuf,
    },
    /// A CA certificate cannot be used to issue certificates.
    #[error("cannot use {path} as issuer")]
    Issuer {
        /// The certificate file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: rcgen::Error,
    },
    /// The CA certificate exists but its key does not.
    #[error("CA certificate {cert} exists but its key {key} is missing")]
    CaKeyMissing {
        /// The CA certificate file.
        cert: PathBuf,
        /// The missing CA key file.
        key: PathBuf,
    },
    /// A directory contains no CA.
    #[error("no CA in {dir}; run `vmd pki init --dir {dir}` first", dir = dir.display())]
    NoCa {
        /// The PKI directory.
        dir: PathBuf,
    },
    /// A different key already exists where a new key would be written.
    #[error("refusing to overwrite existing key {path}")]
    KeyExists {
        /// The key file.
        path: PathBuf,
    },
    /// A server host name is not a valid DNS name.
    #[error("invalid DNS name {name:?}")]
    InvalidDnsName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        #[source]
        source: rustls_pki_types::InvalidDnsNameError,
    },
    /// A client name is invalid.
    #[error(transparent)]
    ClientName(#[from] ClientNameError),
    /// Key generation failed.
    #[error("cannot generate an ECDSA P-256 key")]
    KeyGen {
        /// The underlying error.
        #[source]
        source: rcgen::Error,
    },
    /// The system random number generator failed.
    #[error("system random number generator failed")]
    Random,
    /// Building or signing a certificate failed.
    #[error("cannot issue certificate for {subject:?}")]
    Sign {
        /// The common name of the certificate.
        subject: String,
        /// The underlying error.
        #[source]
        source: rcgen::Error,
    },
}

/// Where the PKI lives: `<dir>/ca.pem`, `ca.key`, `server.pem`,
/// `server.key`, `clients/<name>.pem`, `clients/<name>.key`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PkiLayout {
    dir: PathBuf,
}

impl PkiLayout {
    /// A layout rooted at `dir` (which need not exist yet).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The PKI directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `<dir>/ca.pem`.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// `<dir>/ca.key`.
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }

    /// `<dir>/server.pem`.
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }

    /// `<dir>/server.key`.
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }

    /// `<dir>/clients`.
    pub fn clients_dir(&self) -> PathBuf {
        self.dir.join("clients")
    }

    /// `<dir>/clients/<name>.pem`.
    pub fn client_cert(&self, name: &ClientName) -> PathBuf {
        self.clients_dir().join(format!("{name}.pem"))
    }

    /// `<dir>/clients/<name>.key`.
    pub fn client_key(&self, name: &ClientName) -> PathBuf {
        self.clients_dir().join(format!("{name}.key"))
    }
}

/// Validity window of a certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// Valid from one hour ago (to tolerate clock skew between peers) until
    /// `days` days from now, capped at 9999-12-31 23:59:59 UTC (the
    /// RFC 5280 "no well-defined expiration" date).
    pub fn days_from_now(days: u32) -> Self {
        let now = OffsetDateTime::now_utc();
        let latest = time::Date::from_calendar_date(9999, time::Month::December, 31)
            .expect("9999-12-31 is a valid date")
            .with_hms(23, 59, 59)
            .expect("23:59:59 is a valid time")
            .assume_utc();
        let not_after = now
            .checked_add(Duration::days(i64::from(days)))
            .map_or(latest, |t| t.min(latest));
        Self {
            not_before: now - Duration::hours(1),
            not_after,
        }
    }
}

#[cfg(test)]
mod tests;
