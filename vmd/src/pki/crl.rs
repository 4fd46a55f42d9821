//! Revocation: a CRL of the CA, extended one certificate at a time.
//!
//! 1. [`revoke`] reads the certificate to revoke and checks that this CA
//!    issued it.
//! 2. The existing `crl.pem` (if any) gives the serials already revoked and
//!    the last CRL number; the new serial is added (revoking twice is a
//!    no-op) and the list is re-signed with the next number.
//! 3. The daemon honours the file once `[tls] crls` names it and it is
//!    reloaded (SIGHUP).

use std::path::{Path, PathBuf};

use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber};
use time::{Duration, OffsetDateTime};
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;

use super::store::{read_cert_der, read_optional, write_cert};
use super::{CertificateAuthority, PkiError, PkiLayout};

/// How long a CRL is valid before it must be re-issued (by revoking again
/// or `vmd pki revoke --refresh`).
pub const CRL_VALIDITY_DAYS: i64 = 30;

/// What [`revoke`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RevokeReport {
    /// The CRL file written.
    pub crl: PathBuf,
    /// Serials now listed, as hex.
    pub revoked: Vec<String>,
    /// Whether the certificate was already listed.
    pub already_revoked: bool,
}

impl PkiLayout {
    /// The CA's certificate revocation list.
    pub fn crl(&self) -> PathBuf {
        self.dir().join("crl.pem")
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Adds the certificate at `cert` to the CA's CRL (steps 1 and 2).
///
/// # Errors
/// [`PkiError`] if the CA, the certificate or the existing CRL cannot be
/// read, the certificate is not this CA's, or signing fails.
pub fn revoke(layout: &PkiLayout, cert: &Path) -> Result<RevokeReport, PkiError> {
    let ca = CertificateAuthority::load(&layout.ca_cert(), &layout.ca_key())?;
    let der = read_cert_der(cert)?;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| PkiError::CertParse {
            path: cert.to_owned(),
            source: e.into(),
        })?;
    if !ca.signed(&parsed) {
        return Err(PkiError::NotIssuedByCa {
            path: cert.to_owned(),
        });
    }
    let serial = parsed.raw_serial().to_vec();

    let crl_path = layout.crl();
    let (mut serials, number) = match read_optional(&crl_path)? {
        None => (Vec::new(), 0),
        Some(pem) => existing(&pem, &crl_path)?,
    };
    let already_revoked = serials.contains(&serial);
    if !already_revoked {
        serials.push(serial);
    }
    let now = OffsetDateTime::now_utc();
    let params = CertificateRevocationListParams {
        this_update: now,
        next_update: now + Duration::days(CRL_VALIDITY_DAYS),
        crl_number: SerialNumber::from(number + 1),
        issuing_distribution_point: None,
        revoked_certs: serials
            .iter()
            .map(|s| RevokedCertParams {
                serial_number: SerialNumber::from_slice(s),
                revocation_time: now,
                reason_code: None,
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = ca.sign_crl(&params)?;
    write_cert(&crl_path, &crl)?;
    Ok(RevokeReport {
        crl: crl_path,
        revoked: serials.iter().map(|s| hex(s)).collect(),
        already_revoked,
    })
}

/// The serials and CRL number of an existing CRL file.
fn existing(pem: &[u8], path: &Path) -> Result<(Vec<Vec<u8>>, u64), PkiError> {
    use rustls_pki_types::CertificateRevocationListDer;
    use rustls_pki_types::pem::PemObject;
    let malformed = || PkiError::CrlParse {
        path: path.to_owned(),
    };
    let der = CertificateRevocationListDer::from_pem_slice(pem).map_err(|_| malformed())?;
    let (_, crl) = CertificateRevocationList::from_der(&der).map_err(|_| malformed())?;
    let serials = crl
        .iter_revoked_certificates()
        .map(|r| r.raw_serial().to_vec())
        .collect();
    let number = crl
        .crl_number()
        .and_then(|n| u64::try_from(n).ok())
        .unwrap_or(0);
    Ok((serials, number))
}

impl CertificateAuthority {
    /// Signs a CRL; returns it as PEM.
    ///
    /// # Errors
    /// [`PkiError::Sign`] if signing fails.
    pub fn sign_crl(&self, params: &CertificateRevocationListParams) -> Result<String, PkiError> {
        let crl = params
            .signed_by(self.issuer())
            .map_err(|source| PkiError::Sign {
                subject: "certificate revocation list".into(),
                source,
            })?;
        crl.pem().map_err(|source| PkiError::Sign {
            subject: "certificate revocation list".into(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{ClientName, EnsureSpec, ensure};

    #[test]
    fn revoking_adds_serials_and_numbers_the_crl() {
        let dir = tempfile::tempdir().expect("tempdir");
        let layout = PkiLayout::new(dir.path().join("pki"));
        let a: ClientName = "a".parse().expect("name");
        let b: ClientName = "b".parse().expect("name");
        ensure(
            &layout,
            &EnsureSpec {
                clients: vec![a.clone(), b.clone()],
                ..EnsureSpec::dev()
            },
        )
        .expect("PKI");
        let first = revoke(&layout, &layout.client_cert(&a)).expect("revoke a");
        assert_eq!(first.revoked.len(), 1);
        assert!(!first.already_revoked);
        let again = revoke(&layout, &layout.client_cert(&a)).expect("again");
        assert!(again.already_revoked);
        assert_eq!(again.revoked, first.revoked);
        let both = revoke(&layout, &layout.client_cert(&b)).expect("revoke b");
        assert_eq!(both.revoked.len(), 2);
        let pem = std::fs::read(layout.crl()).expect("crl");
        let (serials, number) = existing(&pem, &layout.crl()).expect("parses");
        assert_eq!(serials.len(), 2);
        assert_eq!(number, 3, "each revocation re-signs with the next number");
    }

    #[test]
    fn foreign_certificates_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ours = PkiLayout::new(dir.path().join("ours"));
        let theirs = PkiLayout::new(dir.path().join("theirs"));
        let x: ClientName = "x".parse().expect("name");
        let spec = EnsureSpec {
            clients: vec![x.clone()],
            ..EnsureSpec::dev()
        };
        ensure(&ours, &spec).expect("PKI");
        ensure(&theirs, &spec).expect("PKI");
        assert!(matches!(
            revoke(&ours, &theirs.client_cert(&x)),
            Err(PkiError::NotIssuedByCa { .. })
        ));
        assert!(!ours.crl().exists());
    }
}
