//! Facts about a certificate, for `vmd pki show`, expiry warnings and the
//! checks of [`super::ensure`].

use std::fmt::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use time::{Duration, OffsetDateTime, UtcOffset};
use x509_parser::certificate::X509Certificate;
use x509_parser::error::X509Error;
use x509_parser::extensions::GeneralName;

use super::{PkiError, store};

/// Facts about one certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertSummary {
    /// First common name of the subject, if any.
    pub subject_cn: Option<String>,
    /// First common name of the issuer, if any.
    pub issuer_cn: Option<String>,
    /// SAN DNS names.
    pub dns_names: Vec<String>,
    /// SAN IP addresses.
    pub ip_addresses: Vec<IpAddr>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// Whether `basicConstraints` says CA.
    pub is_ca: bool,
    /// Lowercase hex SHA-256 over the DER SubjectPublicKeyInfo; identifies
    /// the key pair.
    pub spki_sha256: String,
}

impl CertSummary {
    /// Summarizes a DER certificate.
    ///
    /// # Errors
    ///
    /// [`PkiError::CertDer`] if `der` is not an X.509 certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, PkiError> {
        parse_x509(der)
            .map(|x509| Self::from_x509(&x509))
            .map_err(|source| PkiError::CertDer { source })
    }

    /// Summarizes the first certificate in a PEM file.
    ///
    /// # Errors
    ///
    /// [`PkiError::Read`], [`PkiError::CertPem`] or [`PkiError::CertParse`]
    /// if the file cannot be read or holds no valid certificate.
    pub fn from_pem_file(path: &Path) -> Result<Self, PkiError> {
        let der = store::read_cert_der(path)?;
        parse_x509(&der)
            .map(|x509| Self::from_x509(&x509))
            .map_err(|source| PkiError::CertParse {
                path: path.to_owned(),
                source,
            })
    }

    pub(super) fn from_x509(x509: &X509Certificate<'_>) -> Self {
        let first_cn = |name: &x509_parser::x509::X509Name<'_>| {
            name.iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map(str::to_owned)
        };
        let mut dns_names = Vec::new();
        let mut ip_addresses = Vec::new();
        if let Ok(Some(san)) = x509.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(dns) => dns_names.push((*dns).to_owned()),
                    GeneralName::IPAddress(bytes) => {
                        if let Some(ip) = ip_from_bytes(bytes) {
                            ip_addresses.push(ip);
                        }
                    }
                    _ => {}
                }
            }
        }
        Self {
            subject_cn: first_cn(x509.subject()),
            issuer_cn: first_cn(x509.issuer()),
            dns_names,
            ip_addresses,
            not_before: x509.validity().not_before.to_datetime(),
            not_after: x509.validity().not_after.to_datetime(),
            is_ca: x509.is_ca(),
            spki_sha256: sha256_hex(x509.public_key().raw),
        }
    }

    /// Whether the certificate expires within `days` days from now (or has
    /// already expired).
    pub fn expires_within(&self, days: u32) -> bool {
        self.expires_within_at(days, OffsetDateTime::now_utc())
    }

    pub(super) fn expires_within_at(&self, days: u32, now: OffsetDateTime) -> bool {
        self.not_after - now < Duration::days(i64::from(days))
    }
}

impl fmt::Display for CertSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let now = OffsetDateTime::now_utc();
        let list = |items: Vec<String>| {
            if items.is_empty() {
                "-".to_owned()
            } else {
                items.join(", ")
            }
        };
        writeln!(
            f,
            "subject:     CN={}",
            self.subject_cn.as_deref().unwrap_or("-")
        )?;
        writeln!(
            f,
            "issuer:      CN={}",
            self.issuer_cn.as_deref().unwrap_or("-")
        )?;
        writeln!(f, "dns names:   {}", list(self.dns_names.clone()))?;
        let ips = self.ip_addresses.iter().map(ToString::to_string).collect();
        writeln!(f, "ip addrs:    {}", list(ips))?;
        writeln!(f, "not before:  {}", format_time(self.not_before))?;
        let left = self.not_after - now;
        let status = if left.is_negative() {
            "EXPIRED".to_owned()
        } else {
            format!("{} days left", left.whole_days())
        };
        writeln!(f, "not after:   {} ({status})", format_time(self.not_after))?;
        writeln!(f, "ca:          {}", if self.is_ca { "yes" } else { "no" })?;
        write!(f, "spki sha256: {}", self.spki_sha256)
    }
}

/// `YYYY-MM-DD hh:mm:ss UTC`.
fn format_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        Some(IpAddr::V4(Ipv4Addr::from(v4)))
    } else if let Ok(v6) = <[u8; 16]>::try_from(bytes) {
        Some(IpAddr::V6(Ipv6Addr::from(v6)))
    } else {
        None
    }
}

/// Parses a DER certificate.
pub(super) fn parse_x509(der: &[u8]) -> Result<X509Certificate<'_>, X509Error> {
    match x509_parser::parse_x509_certificate(der) {
        Ok((_rest, x509)) => Ok(x509),
        Err(x509_parser::nom::Err::Error(e) | x509_parser::nom::Err::Failure(e)) => Err(e),
        Err(x509_parser::nom::Err::Incomplete(_)) => Err(X509Error::InvalidCertificate),
    }
}

/// Lowercase hex SHA-256 of `data`.
pub(super) fn sha256_hex(data: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = String::with_capacity(digest.as_ref().len() * 2);
    for b in digest.as_ref() {
        write!(out, "{b:02x}").expect("writing to a String cannot fail");
    }
    out
}
