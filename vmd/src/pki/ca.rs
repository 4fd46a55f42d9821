//! Keys, the certificate authority, and certificate issuance.

use std::fmt;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    PublicKeyData, SanType, SerialNumber, SigningKey,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::certificate::X509Certificate;

use super::names::ResolvedServerNames;
use super::summary::{parse_x509, sha256_hex};
use super::{CertSummary, ClientName, PkiError, SERVER_DNS_NAME, ServerNames, Validity, store};

/// An ECDSA P-256 private key together with its PKCS#8 PEM text.
///
/// Renewal re-issues certificates for an existing key, so the key is kept
/// in the exact form it was read in.
pub struct KeyPairPem {
    pem: String,
    key: KeyPair,
}

impl KeyPairPem {
    /// Generates a fresh ECDSA P-256 key.
    ///
    /// # Errors
    ///
    /// [`PkiError::KeyGen`] if the crypto backend fails.
    pub fn generate() -> Result<Self, PkiError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|source| PkiError::KeyGen { source })?;
        Ok(Self {
            pem: key.serialize_pem(),
            key,
        })
    }

    /// Reads a PKCS#8 PEM ECDSA P-256 private key from `path`.
    ///
    /// # Errors
    ///
    /// [`PkiError::Read`] if the file cannot be read, and
    /// [`PkiError::KeyPem`], [`PkiError::KeyNotPkcs8`] or
    /// [`PkiError::KeyRejected`] if it holds no usable key.
    pub fn from_pem_file(path: &Path) -> Result<Self, PkiError> {
        let bytes = std::fs::read(path).map_err(|source| PkiError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&bytes, path)
    }

    /// Parses PEM `bytes` that were read from `path` (used in errors).
    pub(super) fn parse(bytes: &[u8], path: &Path) -> Result<Self, PkiError> {
        let der = PrivateKeyDer::from_pem_slice(bytes).map_err(|source| PkiError::KeyPem {
            path: path.to_owned(),
            source,
        })?;
        let PrivateKeyDer::Pkcs8(pkcs8) = der else {
            return Err(PkiError::KeyNotPkcs8 {
                path: path.to_owned(),
            });
        };
        let key = KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &PKCS_ECDSA_P256_SHA256).map_err(
            |source| PkiError::KeyRejected {
                path: path.to_owned(),
                source,
            },
        )?;
        Ok(Self {
            pem: String::from_utf8_lossy(bytes).into_owned(),
            key,
        })
    }

    /// The private key as PEM text.
    pub fn as_pem(&self) -> &str {
        &self.pem
    }

    /// Lowercase hex SHA-256 of the DER SubjectPublicKeyInfo; equal to
    /// [`CertSummary::spki_sha256`] of every certificate for this key.
    pub fn spki_sha256(&self) -> String {
        sha256_hex(&self.key.subject_public_key_info())
    }
}

impl fmt::Debug for KeyPairPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPairPem")
            .field("spki_sha256", &self.spki_sha256())
            .finish_non_exhaustive()
    }
}

impl PublicKeyData for KeyPairPem {
    fn der_bytes(&self) -> &[u8] {
        self.key.der_bytes()
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        PublicKeyData::algorithm(&self.key)
    }
}

impl SigningKey for KeyPairPem {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.key.sign(msg)
    }
}

/// A freshly issued certificate and the PEM of its private key.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedCert {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PKCS#8 PEM. When the certificate was issued for an
    /// existing key, this is that key's PEM unchanged.
    pub key_pem: String,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"[secret key elided]")
            .finish()
    }
}

/// A CA whose key is loaded, able to issue server and client certificates.
#[derive(Debug)]
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPairPem>,
    cert_der: CertificateDer<'static>,
    summary: CertSummary,
}

impl CertificateAuthority {
    /// Generates a new CA with a fresh key: a self-signed certificate with
    /// common name `common_name`, `basicConstraints CA:TRUE, pathlen:0` and
    /// key usage keyCertSign + cRLSign.
    ///
    /// # Errors
    ///
    /// [`PkiError::KeyGen`], [`PkiError::Random`] or [`PkiError::Sign`] if
    /// key generation or signing fails.
    pub fn generate(common_name: &str, validity: Validity) -> Result<Self, PkiError> {
        Self::self_signed(common_name, validity, KeyPairPem::generate()?)
    }

    /// Creates a self-signed CA certificate for an existing `key`.
    pub(super) fn self_signed(
        common_name: &str,
        validity: Validity,
        key: KeyPairPem,
    ) -> Result<Self, PkiError> {
        let mut params = CertificateParams::default();
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        params.serial_number = Some(random_serial()?);
        params.distinguished_name = common_name_dn(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).map_err(|source| PkiError::Sign {
            subject: common_name.to_owned(),
            source,
        })?;
        let cert_der = cert.der().clone();
        let summary =
            CertSummary::from_der(&cert_der).expect("rcgen produced an unparsable CA certificate");
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert_der,
            summary,
        })
    }

    /// Loads an existing CA from its certificate and key files, checking
    /// that the certificate is a CA and that the key belongs to it.
    ///
    /// # Errors
    ///
    /// [`PkiError::Read`] if a file cannot be read; [`PkiError::CertPem`],
    /// [`PkiError::CertParse`] or a key error if a file cannot be parsed;
    /// [`PkiError::NotCa`] or [`PkiError::KeyMismatch`] if they do not form
    /// a CA.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, PkiError> {
        let cert_der = store::read_cert_der(cert_path)?;
        let key = KeyPairPem::from_pem_file(key_path)?;
        Self::from_parts(cert_der, key, cert_path, key_path)
    }

    /// Builds a CA from an already read certificate and key.
    pub(super) fn from_parts(
        cert_der: CertificateDer<'static>,
        key: KeyPairPem,
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<Self, PkiError> {
        let summary = parse_x509(&cert_der)
            .map(|x509| CertSummary::from_x509(&x509))
            .map_err(|source| PkiError::CertParse {
                path: cert_path.to_owned(),
                source,
            })?;
        if !summary.is_ca {
            return Err(PkiError::NotCa {
                path: cert_path.to_owned(),
            });
        }
        if summary.spki_sha256 != key.spki_sha256() {
            return Err(PkiError::KeyMismatch {
                key: key_path.to_owned(),
                cert: cert_path.to_owned(),
            });
        }
        let issuer =
            Issuer::from_ca_cert_der(&cert_der, key).map_err(|source| PkiError::Issuer {
                path: cert_path.to_owned(),
                source,
            })?;
        Ok(Self {
            issuer,
            cert_der,
            summary,
        })
    }

    /// The signing issuer (for CRLs).
    pub(super) fn issuer(&self) -> &Issuer<'static, KeyPairPem> {
        &self.issuer
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        store::pem_encode("CERTIFICATE", &self.cert_der)
    }

    /// The CA certificate, DER (e.g. for a rustls root store).
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The CA private key, PKCS#8 PEM.
    pub fn key_pem(&self) -> &str {
        self.issuer.key().as_pem()
    }

    /// Facts about the CA certificate.
    pub fn summary(&self) -> &CertSummary {
        &self.summary
    }

    /// Issues the server certificate: common name `"vmd"`, EKU serverAuth,
    /// SAN DNS `"vmd"` plus `names.dns`, SAN IPs `names.ips`.
    ///
    /// With `key: Some(..)` the certificate is issued for that existing key
    /// (renewal); with `None` a fresh key is generated.
    ///
    /// # Errors
    ///
    /// [`PkiError::InvalidDnsName`] for a bad host name, or a key
    /// generation / signing error.
    pub fn issue_server(
        &self,
        names: &ServerNames,
        validity: Validity,
        key: Option<&KeyPairPem>,
    ) -> Result<IssuedCert, PkiError> {
        self.issue_server_resolved(&names.resolve()?, validity, key)
    }

    pub(super) fn issue_server_resolved(
        &self,
        names: &ResolvedServerNames,
        validity: Validity,
        key: Option<&KeyPairPem>,
    ) -> Result<IssuedCert, PkiError> {
        let mut sans = Vec::with_capacity(names.dns.len() + names.ips.len());
        for dns in &names.dns {
            let ia5 = dns.as_str().try_into().map_err(|source| PkiError::Sign {
                subject: SERVER_DNS_NAME.to_owned(),
                source,
            })?;
            sans.push(SanType::DnsName(ia5));
        }
        sans.extend(names.ips.iter().copied().map(SanType::IpAddress));
        self.issue_leaf(
            SERVER_DNS_NAME,
            sans,
            ExtendedKeyUsagePurpose::ServerAuth,
            validity,
            key,
        )
    }

    /// Issues a client certificate: common name and SAN DNS name `name`,
    /// EKU clientAuth.
    ///
    /// With `key: Some(..)` the certificate is issued for that existing key
    /// (renewal); with `None` a fresh key is generated.
    ///
    /// # Errors
    ///
    /// A key generation or signing error.
    pub fn issue_client(
        &self,
        name: &ClientName,
        validity: Validity,
        key: Option<&KeyPairPem>,
    ) -> Result<IssuedCert, PkiError> {
        let ia5 = name.as_str().try_into().map_err(|source| PkiError::Sign {
            subject: name.to_string(),
            source,
        })?;
        self.issue_leaf(
            name.as_str(),
            vec![SanType::DnsName(ia5)],
            ExtendedKeyUsagePurpose::ClientAuth,
            validity,
            key,
        )
    }

    fn issue_leaf(
        &self,
        common_name: &str,
        sans: Vec<SanType>,
        eku: ExtendedKeyUsagePurpose,
        validity: Validity,
        key: Option<&KeyPairPem>,
    ) -> Result<IssuedCert, PkiError> {
        let mut params = CertificateParams::default();
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        // Random, not rcgen's default (a hash of the public key): a renewal
        // for the same key must not reuse the serial number.
        params.serial_number = Some(random_serial()?);
        params.distinguished_name = common_name_dn(common_name);
        params.subject_alt_names = sans;
        // An end entity: BasicConstraints present (critical) but empty, as
        // DER requires for a default `cA FALSE`. rcgen's `ExplicitNoCa`
        // encodes the default explicitly, which strict parsers refuse.
        params.is_ca = IsCa::NoCa;
        params.custom_extensions = vec![end_entity_basic_constraints()];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![eku];
        params.use_authority_key_identifier_extension = true;

        let generated;
        let key = match key {
            Some(key) => key,
            None => {
                generated = KeyPairPem::generate()?;
                &generated
            }
        };
        let cert = params
            .signed_by(key, &self.issuer)
            .map_err(|source| PkiError::Sign {
                subject: common_name.to_owned(),
                source,
            })?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.as_pem().to_owned(),
        })
    }

    /// Whether `leaf` was issued by this CA: its issuer name is the CA's
    /// subject and its signature verifies with the CA key.
    pub(super) fn signed(&self, leaf: &X509Certificate<'_>) -> bool {
        let Ok(ca) = parse_x509(&self.cert_der) else {
            return false;
        };
        if leaf.issuer().as_raw() != ca.subject().as_raw()
            || leaf.signature_algorithm.algorithm
                != x509_parser::oid_registry::OID_SIG_ECDSA_WITH_SHA256
        {
            return false;
        }
        let ca_key = ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_ASN1,
            ca.public_key().subject_public_key.data.as_ref(),
        );
        ca_key
            .verify(
                leaf.tbs_certificate.as_ref(),
                leaf.signature_value.data.as_ref(),
            )
            .is_ok()
    }
}

/// BasicConstraints' object identifier (RFC 5280, 4.2.1.9).
const BASIC_CONSTRAINTS_OID: &[u64] = &[2, 5, 29, 19];

/// BasicConstraints of an end entity, critical, as DER has it: an empty
/// SEQUENCE (`cA` is `DEFAULT FALSE`, so DER leaves it out).
fn end_entity_basic_constraints() -> CustomExtension {
    let mut ext = CustomExtension::from_oid_content(BASIC_CONSTRAINTS_OID, vec![0x30, 0x00]);
    ext.set_criticality(true);
    ext
}

/// Whether a certificate spells out BasicConstraints' default `cA FALSE`
/// (what vmd's PKI wrote before): not DER, refused by strict parsers.
pub(super) fn encodes_default_basic_constraints(cert: &X509Certificate<'_>) -> bool {
    cert.extensions().iter().any(|ext| {
        ext.oid == x509_parser::oid_registry::OID_X509_EXT_BASIC_CONSTRAINTS
            && ext.value == [0x30, 0x03, 0x01, 0x01, 0x00]
    })
}

/// A distinguished name holding only a common name.
fn common_name_dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

/// A random positive 128-bit serial number.
fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| PkiError::Random)?;
    // Positive and without a leading zero byte, so it encodes in 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}
